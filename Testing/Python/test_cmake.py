"""The extension's CMake files, configured, built and installed against the stub Slicer_DIR in
``Testing/Slicer/SlicerStub`` (a real Slicer build cannot be configured here), and the installed
tree used the way Slicer uses it. Deliberate breakage (in a temporary copy) must fail the build.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUB = ROOT / "Testing" / "Slicer" / "SlicerStub"
SCRIPTED = "lib/Slicer-5.11/qt-scripted-modules"

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


def _generator() -> list[str]:
    return ["-G", "Ninja"] if shutil.which("ninja") else []


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)


def configure(source: Path, build: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run(["cmake", "-S", str(source), "-B", str(build), f"-DSlicer_DIR={STUB}", *extra, *_generator()])


def listedLibraryFiles(cmakelists: Path) -> list[str]:
    """The files of the CovidGANSegLib_PYTHON_SCRIPTS and _PYTHON_RESOURCES lists."""
    text = cmakelists.read_text()
    files = []
    for name in ("SCRIPTS", "RESOURCES"):
        block = re.search(r"set\(CovidGANSegLib_PYTHON_" + name + r"(.*?)\)", text, re.S).group(1)
        files += [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    return files


def libraryFiles(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / "CovidGANSegLib").rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".") and p.suffix not in (".pyc", ".pyo"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The real source tree configured, built and installed against the stub."""
    work = tmp_path_factory.mktemp("cmake")
    build, prefix = work / "build", work / "install"
    result = configure(ROOT, build)
    assert result.returncode == 0, result.stdout + result.stderr
    result = _run(["cmake", "--build", str(build)])
    assert result.returncode == 0, result.stdout + result.stderr
    result = _run(["cmake", "--install", str(build), "--prefix", str(prefix)])
    assert result.returncode == 0, result.stdout + result.stderr
    return build, prefix


def test_every_library_file_is_listed():
    """Direct message for whoever adds a library file: list it in the top-level CMakeLists.txt."""
    listed = set(listedLibraryFiles(ROOT / "CMakeLists.txt"))
    missing = [f for f in libraryFiles(ROOT) if f not in listed]
    assert not missing, f"add to CovidGANSegLib_PYTHON_SCRIPTS (or _RESOURCES) in CMakeLists.txt: {missing}"
    stale = [f for f in listed if not (ROOT / f).is_file()]
    assert not stale, f"listed in CMakeLists.txt but not present: {stale}"


def test_extension_metadata_and_description_file(built):
    build, _ = built
    s4ext = (build / "CovidGANSeg.s4ext").read_text()
    fields = dict(line.split(" ", 1) for line in s4ext.splitlines() if " " in line)
    assert fields["category"] == "Segmentation"
    assert fields["depends"] == "PyTorch"
    assert fields["homepage"].startswith("https://") and fields["iconurl"].endswith("/main/Resources/Icons/CovidGANSeg.png")
    screenshots = fields["screenshoturls"].split(" ")
    assert [url.rsplit("/main/", 1)[1] for url in screenshots] == ["Resources/Screenshots/slicer_slice_view.png",
                                                                   "Resources/Screenshots/slicer_difference_overlay.png"]
    # the files the URLs name are in the repository: the top-level Resources/ folder, PNG images
    for url in [fields["iconurl"], *screenshots]:
        path = ROOT / url.rsplit("/main/", 1)[1]
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    assert "not for clinical use" in fields["description"]
    assert "Slicer 5.6, 5.8 and 5.10" in fields["description"]
    assert fields["contributors"]


def test_build_and_install_trees_hold_module_resources_and_library(built):
    build, prefix = built
    for tree in (build / SCRIPTED, prefix / SCRIPTED):
        assert (tree / "CovidGANSeg.py").is_file()
        for name in ("__init__.py", "process.py", "jobs.py", "volumeio.py", "segmentations.py", "tables.py", "models.py",
                     "dependencies.py", "display.py"):
            assert (tree / "CovidGANSegModuleLib" / name).is_file(), name
        for resource in ("Resources/UI/CovidGANSeg.ui", "Resources/Icons/CovidGANSeg.png", "Resources/requirements.txt"):
            assert (tree / resource).is_file(), resource
        for f in libraryFiles(ROOT):
            assert (tree / f).is_file(), f"{f} missing from {tree}"
        # nothing else directly in the module folder would be taken for a Slicer module
        assert sorted(p.name for p in tree.glob("*.py")) == ["CovidGANSeg.py"]


def test_installed_library_imports_and_runs_from_the_install_tree(built, tmp_path):
    _, prefix = built
    tree = prefix / SCRIPTED
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import CovidGANSegLib, CovidGANSegLib.checkpoints, CovidGANSegLib.quantify; "
            "print(CovidGANSegLib.__file__)")
    result = _run([sys.executable, "-c", code, str(tree)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve().is_relative_to(tree.resolve())
    # the child process the module starts: "python -m CovidGANSegLib" with the install tree on PYTHONPATH
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    result = _run([sys.executable, "-c", "import CovidGANSegLib, sys; print(CovidGANSegLib.__file__)"], cwd=tmp_path, env=env)
    assert Path(result.stdout.strip()).resolve().is_relative_to(tree.resolve()), result.stdout + result.stderr
    result = _run([sys.executable, "-m", "CovidGANSegLib", "models", str(tmp_path), "--json"], cwd=tmp_path, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
    # the named training plans are installed beside the code and load from there
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from CovidGANSegLib import plan; "
            "print(plan.PLANS_DIR); s = plan.load_plan('quick').segmenter; print(s.iterations_of('transunet'), s.iterations_of('unet'))")
    result = _run([sys.executable, "-c", code, str(tree)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plans_dir, *iterations = result.stdout.split()
    from CovidGANSegLib.demo import QUICK  # the source tree's quick plan: the installed one must be the same

    assert Path(plans_dir).resolve().is_relative_to(tree.resolve())
    assert [int(n) for n in iterations] == [QUICK.seg_iterations_of("transunet"), QUICK.seg_iterations_of("unet")]


def test_installed_module_loads_in_the_harness(built, tmp_path):
    """Slicer loads the installed CovidGANSeg.py; its helper package and resources come from the install tree."""
    _, prefix = built
    tree = prefix / SCRIPTED
    code = f"""
import sys
sys.path.insert(0, {str(ROOT / 'Testing' / 'Slicer')!r})
from slicer_harness import slicerCoreAvailable
if not slicerCoreAvailable():
    print("SKIP"); raise SystemExit(0)
import slicer_harness, slicer
h = slicer_harness.install()
module = h.loadScriptedModule({str(tree / 'CovidGANSeg.py')!r})
import CovidGANSegModuleLib, CovidGANSegLib
instance = slicer.modules.CovidGANSegInstance
print(CovidGANSegModuleLib.__file__)
print(slicer.modules.covidganseg.icon)
print(instance.resourcePath("UI/CovidGANSeg.ui"))
print(module.CovidGANSegLogic().getParameterNode().device)
"""
    result = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    if lines == ["SKIP"]:
        pytest.skip("slicer-core is not importable")
    moduleLib, icon, uiPath, device = lines[-4:]
    assert Path(moduleLib).resolve().is_relative_to(tree.resolve())
    assert Path(icon).resolve() == (tree / "Resources/Icons/CovidGANSeg.png").resolve()
    assert Path(uiPath).is_file() and device == "auto"


# --------------------------------------------------------------------------------------------
# deliberate failures in a temporary copy of the sources
# --------------------------------------------------------------------------------------------

@pytest.fixture
def sourceCopy(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy2(ROOT / "CMakeLists.txt", src / "CMakeLists.txt")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "CovidGANSeg", src / "CovidGANSeg", ignore=ignore)
    shutil.copytree(ROOT / "CovidGANSegLib", src / "CovidGANSegLib", ignore=ignore)
    shutil.copytree(ROOT / "Resources", src / "Resources", ignore=ignore)
    return src


def test_the_copy_configures(sourceCopy, tmp_path):
    result = configure(sourceCopy, tmp_path / "build")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("breakage,message", [
    ("missing module helper", "listed file .*CovidGANSegModuleLib/tables.py does not exist"),
    ("missing ui", "listed file .*Resources/UI/CovidGANSeg.ui does not exist"),
    ("missing library file", "listed file .*CovidGANSegLib/quantify.py does not exist"),
    ("unlisted library file", "CovidGANSegLib/gan/new_network.py is part of the Python package 'CovidGANSegLib'"),
    ("unlisted helper", "CovidGANSegModuleLib/extra.py is part of the Python package 'CovidGANSegModuleLib'"),
    ("unlisted resource", "Resources/Icons/other.png is in Resources/ but not in RESOURCES"),
    ("second module file", "helper.py is in the module folder but not in SCRIPTS"),
    ("no EXTENSION_DEPENDS", "EXTENSION_DEPENDS is not set"),
    ("missing screenshot", "Resources/Screenshots/slicer_slice_view.png .extension icon / screenshot. is missing"),
    ("Slicer 5.4", "CovidGANSeg needs Slicer 5.6 or newer .supported: 5.6;5.8;5.10., found 5.4"),
])
def test_breakage_fails_the_configuration(sourceCopy, tmp_path, breakage, message):
    src = sourceCopy
    if breakage == "missing module helper":
        (src / "CovidGANSeg/CovidGANSegModuleLib/tables.py").unlink()
    elif breakage == "missing ui":
        (src / "CovidGANSeg/Resources/UI/CovidGANSeg.ui").unlink()
    elif breakage == "missing library file":
        (src / "CovidGANSegLib/quantify.py").unlink()
    elif breakage == "unlisted library file":
        (src / "CovidGANSegLib/gan/new_network.py").write_text("# new\n")
    elif breakage == "unlisted helper":
        (src / "CovidGANSeg/CovidGANSegModuleLib/extra.py").write_text("# new\n")
    elif breakage == "unlisted resource":
        shutil.copy2(src / "CovidGANSeg/Resources/Icons/CovidGANSeg.png", src / "CovidGANSeg/Resources/Icons/other.png")
    elif breakage == "second module file":
        (src / "CovidGANSeg/helper.py").write_text("# would be loaded as a module\n")
    elif breakage == "no EXTENSION_DEPENDS":
        text = (src / "CMakeLists.txt").read_text()
        (src / "CMakeLists.txt").write_text(re.sub(r"set\(EXTENSION_DEPENDS [^\n]*\n", "", text))
    elif breakage == "missing screenshot":
        (src / "Resources/Screenshots/slicer_slice_view.png").unlink()
    extra = ["-DSLICER_STUB_VERSION=5.4.0"] if breakage == "Slicer 5.4" else []
    result = configure(src, tmp_path / "build", *extra)
    assert result.returncode != 0, f"{breakage}: configuration should fail\n{result.stdout}"
    output = " ".join((result.stdout + result.stderr).split())  # CMake wraps long messages
    assert re.search(message, output), output
