"""Progress reporting: tqdm bars for people, parseable lines for the Slicer module.

The CLI chooses the mode (``--progress bar|lines|none``). In ``lines`` mode every update is one
line on stdout, ``PROGRESS <fraction> <message>`` (format owned by :mod:`CovidGANSegLib.protocol`),
flushed at once, which the Slicer module reads from its child process to drive one progress bar
and a status text.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from CovidGANSegLib import protocol

T = TypeVar("T")

_MODES = ("bar", "lines", "none")
_mode = "bar"
_bar: Any = None  # the innermost tqdm bar of ``track`` (for ``postfix``)
_scopes: list[tuple[float, float]] = []


def set_mode(mode: str) -> None:
    global _mode
    if mode not in _MODES:
        raise ValueError(f"progress mode must be one of {_MODES}, got {mode!r}")
    _mode = mode


def get_mode() -> str:
    return _mode


@contextlib.contextmanager
def scope(start: float, end: float) -> Iterator[None]:
    """Map the progress reported inside the block (0..1) onto [start, end] of the enclosing scope.

    A multi-step command (the demo, ``segment``) wraps each step so that the steps' own 0..1
    progress drives one overall bar.
    """
    lo, hi = _scopes[-1] if _scopes else (0.0, 1.0)
    _scopes.append((lo + (hi - lo) * start, lo + (hi - lo) * end))
    try:
        yield
    finally:
        _scopes.pop()


def report(fraction: float, message: str) -> None:
    """Report progress of the current step (0..1, mapped through any enclosing ``scope``) with a status text."""
    lo, hi = _scopes[-1] if _scopes else (0.0, 1.0)
    fraction = lo + (hi - lo) * min(max(float(fraction), 0.0), 1.0)
    if _mode == "lines":
        print(protocol.format_progress(fraction, message), file=sys.stdout, flush=True)
    elif _mode == "bar":
        print(f"[{fraction * 100:5.1f} %] {message}", file=sys.stderr, flush=True)


def postfix(**values: float) -> None:
    """Show ``values`` (e.g. the latest losses) after the innermost running bar (``bar`` mode only)."""
    if _mode == "bar" and _bar is not None:
        _bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)


def track(iterable: Iterable[T], *, total: int | None = None, desc: str = "", start: float = 0.0, end: float = 1.0) -> Iterator[T]:
    """Iterate with a tqdm bar (``bar``) or ``PROGRESS`` lines mapped onto [start, end] (``lines``)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if _mode == "bar":
        from tqdm.auto import tqdm

        global _bar
        bar = tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, file=sys.stderr)
        outer, _bar = _bar, bar
        try:
            yield from bar
        finally:
            _bar = outer
            bar.close()
        return
    step = max(1, (total or 1) // 50)
    for i, item in enumerate(iterable):
        if _mode == "lines" and total and i % step == 0:
            report(start + (end - start) * i / total, f"{desc} {i}/{total}")
        yield item
    if _mode == "lines":
        report(end, f"{desc} done")
