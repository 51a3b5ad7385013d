"""The supported Slicer releases and their Pythons are stated and checked (issue 9 item 5): Slicer 5.6
and 5.8 ship Python 3.9.10, Slicer 5.10 ships Python 3.12. Static checks, no Slicer needed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SLICER_PYTHONS = {"5.6": (3, 9, 10), "5.8": (3, 9, 10), "5.10": (3, 12, 0)}


def _requiresPython() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'^requires-python\s*=\s*"([^"]+)"', text, re.M).group(1)


def _admits(spec: str, version: tuple[int, int, int]) -> bool:
    """``>=``, ``>``, ``<``, ``<=``, ``!=`` clauses separated by commas (what pyproject files use here)."""
    for clause in (c.strip() for c in spec.split(",") if c.strip()):
        op, number = re.match(r"(>=|<=|>|<|!=|==)\s*([\d.]+)", clause).groups()
        bound = tuple(int(x) for x in number.split("."))
        v = version[:len(bound)]
        if not {">=": v >= bound, "<=": v <= bound, ">": v > bound, "<": v < bound, "!=": v != bound, "==": v == bound}[op]:
            return False
    return True


def test_the_library_installs_on_every_supported_slicers_python():
    spec = _requiresPython()
    for release, python in SLICER_PYTHONS.items():
        assert _admits(spec, python), f"requires-python {spec!r} excludes Python {python} of Slicer {release}"


def test_ci_checks_both_pythons():
    run = (ROOT / ".ci" / "run").read_text()
    assert "for version in 3.9 3.12" in run and "compileall" in run and "vermin" in run
    assert "python3 -m venv .venv && .venv/bin/pip install -q -r requirements-ci.txt" in run  # the README command stays


def test_extension_metadata_states_the_supported_releases():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert 'set(CovidGANSeg_SLICER_VERSIONS_SUPPORTED "5.6;5.8;5.10")' in cmake
    assert "For Slicer 5.6, 5.8 and 5.10." in cmake
