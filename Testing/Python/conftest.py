"""Shared pytest fixtures: paths to the shared real CT data and small generated cohorts."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
REAL_CT_DIR = PROJECT_ROOT.parent / "shared" / "data" / "real_ct"


@pytest.fixture(scope="session")
def real_ct_dir() -> Path:
    """The shared real CT volumes (read in place, never copied into the project)."""
    if not REAL_CT_DIR.is_dir():
        pytest.skip(f"shared real CT data not found at {REAL_CT_DIR}")
    return REAL_CT_DIR


@pytest.fixture()
def no_progress_bars():
    """No tqdm bars in a test's output; the previous progress mode is restored after it."""
    from CovidGANSegLib import progress

    previous = progress.get_mode()
    progress.set_mode("none")
    yield
    progress.set_mode(previous)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's small CPU models on one torch thread, then restore the setting.

    Tiny models run fastest on one thread, and OpenMP spin-waits stall badly when the machine's
    cores are shared.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
