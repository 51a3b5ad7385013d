"""The training loss log: CSV rows, truncation on resume, optional TensorBoard scalars."""

from __future__ import annotations

import sys
import types

from CovidGANSegLib import losslog

COLUMNS = ("iteration", "loss", "val_dice", "seconds")


def test_rows_are_appended_and_truncated_to_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(losslog, "_tensorboard", lambda run_dir, row: None)
    path = tmp_path / "losses.csv"
    for it in range(1, 6):
        losslog.append_losses(path, {"iteration": it, "loss": 1.0 / it, "val_dice": None, "seconds": 0.1}, COLUMNS)
    rows = losslog.read_losses(path)
    assert [r["iteration"] for r in rows] == ["1", "2", "3", "4", "5"] and rows[0]["val_dice"] == ""
    losslog.truncate_losses(path, 3, COLUMNS)
    assert [r["iteration"] for r in losslog.read_losses(path)] == ["1", "2", "3"]


def test_scalars_go_to_tensorboard_when_it_is_installed(tmp_path, monkeypatch):
    """A stand-in for torch.utils.tensorboard records what would be written (the real package is optional)."""
    written = []

    class Writer:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            written.append((self.log_dir, tag, value, step))

        def flush(self):
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    monkeypatch.setattr(losslog, "_WRITERS", {})
    losslog.append_losses(tmp_path / "losses.csv", {"iteration": 7, "loss": 0.5, "val_dice": float("nan"), "seconds": 2}, COLUMNS)
    assert written == [(str(tmp_path / "tensorboard"), "loss", 0.5, 7), (str(tmp_path / "tensorboard"), "seconds", 2.0, 7)]


def test_no_tensorboard_no_event_files(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when tensorboard is absent
    monkeypatch.setattr(losslog, "_WRITERS", {})
    losslog.append_losses(tmp_path / "losses.csv", {"iteration": 1, "loss": 0.5}, COLUMNS)
    assert not (tmp_path / "tensorboard").exists() and (tmp_path / "losses.csv").is_file()
