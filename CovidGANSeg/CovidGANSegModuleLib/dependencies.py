"""Python packages the child process needs, installed only when the user agrees.

* torch comes from Slicer's **PyTorch extension** (declared in the extension's
  ``EXTENSION_DEPENDS``): ``PyTorchUtils.PyTorchUtilsLogic().installTorch(...)`` picks the build
  that matches the GPU driver (or the CPU build).
* the other packages (``Resources/requirements.txt``, lower bounds only, never exact pins) through
  ``slicer.packaging.pip_ensure`` where it exists (Slicer 5.12+; a submodule that ``slicer``'s
  ``__init__`` does not import, so it is imported here; it asks and shows progress itself) or, on
  the supported 5.6 - 5.10, ``slicer.util.pip_install`` after our own question.

Nothing is installed at import time, nothing is checked by importing (``importlib.util.find_spec``
only), and once installed everything works offline: the models are local files.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

#: requirement -> module name to look for (the requirements file is the source of truth)
IMPORT_NAMES = {"scikit-image": "skimage", "pyyaml": "yaml"}
TORCH_REQUIREMENT = ">=2.1"


def requirementsFile() -> Path:
    return Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"


def requirements(path: Path | None = None) -> list[str]:
    """Requirement lines (``name>=version``) from the module's requirements file."""
    lines = (path or requirementsFile()).read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def requirementName(requirement: str) -> str:
    for sep in ("[", "<", ">", "=", "!", "~", ";", " "):
        requirement = requirement.split(sep, 1)[0]
    return requirement.strip().lower()


def isInstalled(moduleName: str) -> bool:
    """Whether ``moduleName`` can be imported - without importing it."""
    try:
        return importlib.util.find_spec(moduleName) is not None
    except (ImportError, ValueError):
        return False


def missingPackages(reqs: list[str] | None = None) -> list[str]:
    """Requirements whose package cannot be found (version ranges are pip's business)."""
    out = []
    for req in reqs if reqs is not None else requirements():
        name = requirementName(req)
        if not isInstalled(IMPORT_NAMES.get(name, name.replace("-", "_"))):
            out.append(req)
    return out


def torchInstalled() -> bool:
    return isInstalled("torch")


def slicerPackaging(slicerModule):
    """``slicer.packaging`` (Slicer 5.12+) imported, or None on older Slicer."""
    try:
        return importlib.import_module(slicerModule.__name__ + ".packaging")
    except (ImportError, AttributeError):
        return getattr(slicerModule, "packaging", None)


def ensureDependencies(confirm: Callable[[str], bool], *, slicerModule=None) -> bool:
    """Install what is missing after asking; True when everything needed is present.

    Args:
        confirm: asks the user a yes/no question (``slicer.util.confirmOkCancelDisplay`` in the
            Widget); nothing is installed when it returns False.
        slicerModule: the ``slicer`` module (injectable for tests).
    """
    if slicerModule is None:
        import slicer as slicerModule  # noqa: N813

    if not torchInstalled():
        if not confirm("CovidGANSeg needs PyTorch, which the PyTorch extension installs into Slicer's Python "
                       "(a large download; a build matching your GPU driver is chosen, or the CPU build). Install it now?"):
            log.info("PyTorch installation declined")
            return False
        try:
            import PyTorchUtils  # the PyTorch extension's module (EXTENSION_DEPENDS PyTorch)
        except ImportError as exc:
            raise RuntimeError("The PyTorch extension is not installed: install 'PyTorch' from the Extensions Manager, "
                               "restart Slicer, and try again.") from exc
        # askConfirmation=False: we have just asked
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None and not torchInstalled():
            return False

    missing = missingPackages()
    if not missing:
        return True
    packaging = slicerPackaging(slicerModule)
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        packaging.pip_ensure(missing, requester="CovidGANSeg")  # asks, installs with progress, offers restart
    else:
        if not confirm("CovidGANSeg needs these Python packages: " + ", ".join(missing) + ". Install them now with pip?"):
            log.info("package installation declined: %s", missing)
            return False
        slicerModule.util.pip_install(missing)
    still = missingPackages()
    if still:
        log.warning("still missing after installation: %s", still)
    return not still
