"""Config, atomic writes, checkpoints and CLI basics."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from CovidGANSegLib import checkpoints, cli, progress
from CovidGANSegLib.atomic import atomic_directory, atomic_path
from CovidGANSegLib.config import PreprocessConfig
from CovidGANSegLib.errors import CheckpointError, InputError


def test_config_defaults_are_the_papers():
    cfg = PreprocessConfig()
    assert cfg.hu_window == (-1000.0, 400.0)
    assert cfg.target_spacing == (2.0, 2.0, 8.0)
    assert cfg.grid == (128, 128, 32)
    assert cfg.grid_dhw == (32, 128, 128)
    assert cfg.min_slices == 32


def test_config_round_trip_and_checks(tmp_path):
    cfg = PreprocessConfig(grid=(256, 256, 32))
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert PreprocessConfig.from_json(path) == cfg
    with pytest.raises(ValueError, match="hu_window"):
        PreprocessConfig(hu_window=(400, -1000))
    with pytest.raises(ValueError, match="unknown"):
        PreprocessConfig.from_dict({"gird": [1, 2, 3]})


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole"
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_atomic_directory(tmp_path):
    out = tmp_path / "cohort"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "a.txt").write_text("a")
            raise RuntimeError("fail")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic_directory(out):
            pass
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_checkpoint_round_trip_and_errors(tmp_path):
    import torch

    path = tmp_path / "ck.pt"
    checkpoints.save_checkpoint(path, kind="gan", arch="a", config={"x": 1}, model={"w": torch.ones(2)}, iteration=3)
    payload = checkpoints.load_checkpoint(path, kind="gan", arch="a")
    assert payload["iteration"] == 3 and torch.equal(payload["model"]["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match="'seg' checkpoint is needed"):
        checkpoints.load_checkpoint(path, kind="seg")
    with pytest.raises(CheckpointError, match="architecture"):
        checkpoints.load_checkpoint(path, kind="gan", arch="b")
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        checkpoints.load_checkpoint(truncated, kind="gan")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(CheckpointError, match="not a CovidGANSeg checkpoint"):
        checkpoints.load_checkpoint(foreign, kind="gan")
    with pytest.raises(CheckpointError, match="not found"):
        checkpoints.load_checkpoint(tmp_path / "missing.pt", kind="gan")
    assert isinstance(CheckpointError("x"), InputError)


def test_model_card(tmp_path):
    import torch

    path = tmp_path / "model.pt"
    checkpoints.save_checkpoint(path, kind="seg", arch="transunet", config={}, model={"w": torch.ones(1)})
    checkpoints.write_model_card(path, name="demo-seg", kind="seg", arch="transunet", config_name="tiny", config={},
                                 trained_on="phantoms", demo=True)
    card = checkpoints.read_model_card(path, verify=True)
    assert card["demo"] and "not for clinical use" in card["intended_use"]
    assert len(card["sha256"]) == 64
    assert [c["name"] for c in checkpoints.find_models(tmp_path)] == ["demo-seg"]
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        checkpoints.read_model_card(path, verify=True)


def test_progress_lines(capsys):
    progress.set_mode("lines")
    try:
        progress.report(0.5, "half way")
        list(progress.track(range(4), desc="steps"))
    finally:
        progress.set_mode("bar")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "PROGRESS 0.5000 half way"
    assert lines[-1] == "PROGRESS 1.0000 steps done"
    with pytest.raises(ValueError):
        progress.set_mode("fancy")


def test_progress_bar_shows_the_latest_losses(capsys):
    """In ``bar`` mode the training loops put their latest losses after the bar (tqdm postfix);
    outside a bar, and in the other modes, ``postfix`` does nothing."""
    progress.set_mode("bar")
    progress.postfix(loss=1.0)  # no bar running: nothing happens
    for _ in progress.track(range(3), desc="training"):
        progress.postfix(loss=0.123456, best_val_dice=0.5)
    err = capsys.readouterr().err
    assert "training" in err and "loss=0.1235" in err and "best_val_dice=0.5" in err
    progress.set_mode("lines")
    try:
        for _ in progress.track(range(3), desc="training"):
            progress.postfix(loss=0.5)
    finally:
        progress.set_mode("bar")
    assert "loss=" not in capsys.readouterr().out


def test_progress_scopes_nest(capsys):
    progress.set_mode("lines")
    try:
        with progress.scope(0.5, 1.0):
            with progress.scope(0.0, 0.5):
                progress.report(0.5, "inner")
            progress.report(1.0, "outer")
        progress.report(0.25, "top")
    finally:
        progress.set_mode("bar")
    assert capsys.readouterr().out.splitlines() == ["PROGRESS 0.6250 inner", "PROGRESS 1.0000 outer", "PROGRESS 0.2500 top"]


def test_cli_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "CovidGANSegLib", "--help"], capture_output=True, text=True, check=True).stdout
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:
        assert name in out
        sub.choices[name].format_help()  # every subcommand has a working --help


def test_models_command(tmp_path, capsys):
    assert cli.main(["models", str(tmp_path)]) == 0
    assert "no models" in capsys.readouterr().out
