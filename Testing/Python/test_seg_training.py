"""Segmenter training on a hand-made pseudo-masks folder: steps, outputs, resume equivalence."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from CovidGANSegLib.checkpoints import load_checkpoint, read_model_card
from CovidGANSegLib.config import PreprocessConfig
from CovidGANSegLib.errors import InputError
from CovidGANSegLib.seg import training
from CovidGANSegLib.seg.transunet import SEG_CONFIGS

TINY = SEG_CONFIGS["tiny"]


def make_pseudo_masks(folder: Path, *, n: int = 4, d: int = 4, h: int = 32, w: int = 32, seed: int = 0) -> Path:
    """A synthetic pseudo-masks folder in the format of gan.pseudomasks (no GAN needed)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:h, :w]
    lung2d = ((yy - h / 2) ** 2 / (0.35 * h) ** 2 + (xx - w / 2) ** 2 / (0.4 * w) ** 2) <= 1
    images = np.zeros((n, d, h, w), np.float32)
    masks = np.zeros((n, d, h, w), bool)
    lungs = np.zeros_like(masks)
    for v in range(n):
        for s in range(1, d):  # slice 0 has no lung
            lungs[v, s] = lung2d
            img = np.where(lung2d, 0.1, 0.6) + rng.normal(0, 0.02, (h, w))
            if (v + s) % 2 == 0:
                cy, cx, r = rng.integers(h // 3, 2 * h // 3), rng.integers(w // 3, 2 * w // 3), rng.integers(2, 5)
                blob = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & lung2d
                masks[v, s] = blob
                img[blob] = 0.5
            images[v, s] = np.clip(img, 0, 1)
    sums = masks.reshape(n * d, -1).sum(1)
    order = np.argsort(sums, kind="stable")
    high = [[int(i // d), int(i % d)] for i in order[-(n * d) // 4:] if sums[i] > 0]
    low = [[int(i // d), int(i % d)] for i in order[(n * d) // 4:(n * d) // 2]]
    np.save(folder / "images.npy", images)
    np.save(folder / "pseudo_masks.npy", masks)
    np.save(folder / "lungs.npy", lungs)
    np.save(folder / "difference.npy", masks.astype(np.float32) * 0.4)
    (folder / "severity.json").write_text(json.dumps({"high": high, "low": low}))
    (folder / "index.json").write_text(json.dumps({"preprocess": PreprocessConfig(grid=(w, h, d), min_slices=d).to_dict()}))
    return folder


pytestmark = pytest.mark.usefixtures("no_progress_bars")


@pytest.fixture()
def pm(tmp_path) -> Path:
    return make_pseudo_masks(tmp_path / "pm")


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 1, 32, 32, generator=g)
    y = torch.zeros(4, 1, 32, 32)
    y[:, :, 10:16, 10:16] = 1.0
    x[:, :, 10:16, 10:16] += 0.5
    return x.clamp(0, 1), y, torch.tensor([1, 1, 0, 0])


def _phase2_loss(trainer, x, y) -> float:
    """Eq. 5 + MSE of the trainer's model on a fixed batch, in eval mode."""
    with torch.no_grad():
        trainer.model.eval()
        logits = trainer.model(x)
        return float(trainer.sensitivity(logits, y) + training.mse_to_pseudo_mask(logits, y))


@pytest.mark.parametrize("arch", ["transunet", "unet"])
def test_one_step_reduces_loss_on_fixed_batch(arch):
    trainer = training.SegTrainer(arch, TINY, device="cpu", seed=0)
    x, y, labels = _batch()

    before = _phase2_loss(trainer, x, y)
    trainer.step(x, y, labels, training.PHASE_END_TO_END)
    assert _phase2_loss(trainer, x, y) < before
    # phase 1: the contrastive loss on the same batch falls too
    with torch.no_grad():
        c0 = float(trainer.contrastive(trainer.model.project(x), labels))
    dec_before = [p.detach().clone() for p in trainer.model.head.parameters()] if arch == "transunet" else None
    for _ in range(3):
        trainer.step(x, y, labels, training.PHASE_CONTRASTIVE)
    with torch.no_grad():
        assert float(trainer.contrastive(trainer.model.project(x), labels)) < c0
    if dec_before is not None:  # phase 1 leaves the decoder alone
        assert all(torch.equal(a, b) for a, b in zip(dec_before, trainer.model.head.parameters()))


def test_threshold_choice_from_one_pass_equals_validating_each_threshold():
    """``dice_by_threshold`` (one forward pass) gives ``validate``'s per-volume Dice at every threshold,
    and ``choose_threshold`` takes the best of them (ties: nearer 0.5) for the given weights."""
    trainer = training.SegTrainer("unet", TINY, device="cpu", seed=0)
    x, y, labels = _batch()
    for _ in range(3):
        trainer.step(x, y, labels, training.PHASE_END_TO_END)
    lung = torch.ones_like(y, dtype=torch.bool)
    lung[:, :, :4] = False
    val = training.SliceSet(images=x, masks=y, lungs=lung, labels=labels, index=[(0, 0), (0, 1), (1, 0), (2, 0)])
    thresholds = training.THRESHOLDS
    one_pass = trainer.dice_by_threshold(val, thresholds, batch=3)
    each = {t: trainer.validate(val, threshold=t, batch=3)["val_dice"] for t in thresholds}
    assert one_pass == each
    assert len(set(each.values())) > 1  # the thresholds really differ here, so the choice below can fail
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for p in trainer.model.parameters():  # other current weights: the choice is for ``state``'s
        torch.nn.init.zeros_(p)
    t, dice = training.choose_threshold(trainer, state, val)
    assert dice == max(each.values())
    assert t == min((th for th in thresholds if each[th] == dice), key=lambda th: abs(th - 0.5))
    assert all(float(p.detach().abs().sum()) == 0 for p in trainer.model.parameters())  # current weights restored


@pytest.mark.parametrize("arch", ["transunet", "unet"])
def test_bf16_autocast_only_where_the_cpu_has_it(arch, monkeypatch, caplog):
    x, y, labels = _batch()
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger=training.log.name):
        assert not training.SegTrainer(arch, TINY.replace(cpu_bf16=True), device="cpu").bf16  # emulated bfloat16 is slower than float32
    assert "no native bfloat16" in caplog.text
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    assert not training.SegTrainer(arch, TINY, device="cpu").bf16  # off unless asked for
    trainer = training.SegTrainer(arch, TINY.replace(cpu_bf16=True), device="cpu", seed=0)
    assert trainer.bf16
    trainer.model.eval()
    with torch.no_grad():
        full = trainer.model(x)
        half = trainer._run("forward", x)
    assert half.dtype == torch.float32 and half.shape == full.shape
    gap = float((half - full).abs().max())
    assert 0.0 < gap < 0.1 * float(full.abs().max()) + 0.05  # computed in bfloat16 (not bit-equal), close to float32

    before = _phase2_loss(trainer, x, y)
    for phase in (training.PHASE_CONTRASTIVE, training.PHASE_END_TO_END, training.PHASE_END_TO_END):
        row = trainer.step(x, y, labels, phase)
        assert np.isfinite(row["loss"])
    assert _phase2_loss(trainer, x, y) < before
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # float32 weights, as checkpoints hold


def test_split_is_by_volume():
    train, val = training.split_volumes(10, 0.2, seed=3)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == list(range(10))
    assert training.split_volumes(1, 0.2, 0) == ([0], [])


def test_train_outputs_and_model(pm, tmp_path):
    run = tmp_path / "run"
    model_path = training.train_segmenter(pm, run, model="transunet", config="tiny", iterations=10, device="cpu")
    for name in ("model.pt", "model.pt.json", "losses.csv", "loss_curves.png", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    assert list((run / "samples").glob("iter_*.png"))
    payload = load_checkpoint(model_path, kind="seg", arch="transunet")
    assert PreprocessConfig.from_dict(payload["preprocess"]).grid == (32, 32, 4)
    assert payload["metadata"]["n_val_volumes"] == 1 and payload["metadata"]["pretrain_iterations"] == 2
    assert payload["metadata"]["autocast"] is None  # float32 unless SegConfig.cpu_bf16
    card = read_model_card(model_path, verify=True)
    assert card["kind"] == "seg" and card["arch"] == "transunet" and card["demo"] is False
    # chosen on the pseudo-masks of the validation volume (no synthetic pairs): the names say so
    assert card["val_dice_pseudo_masks"] == payload["metadata"]["val_dice_pseudo_masks"] is not None
    assert "val_dice_synthetic" not in card
    rows = list(csv.DictReader(open(run / "losses.csv")))
    assert [int(r["iteration"]) for r in rows] == list(range(1, 11))
    assert [r["phase"] for r in rows[:3]] == ["1", "1", "2"]
    assert rows[-1]["val_dice"] != ""


def test_resume_equivalence(pm, tmp_path, monkeypatch):
    cfg = TINY.replace(checkpoint_every=3, val_every=2, dropout=0.1)
    straight = training.train_segmenter(pm, tmp_path / "a", model="transunet", config=cfg, iterations=9, device="cpu", seed=5)

    real_step = training.SegTrainer.step

    def killed_step(self, *args, **kwargs):
        if self.iteration == 7:  # killed after the checkpoint at 6 (iteration 7 logged, not saved)
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(training.SegTrainer, "step", killed_step)
    with pytest.raises(KeyboardInterrupt):
        training.train_segmenter(pm, tmp_path / "b", model="transunet", config=cfg, iterations=9, device="cpu", seed=5)
    monkeypatch.setattr(training.SegTrainer, "step", real_step)
    assert not (tmp_path / "b" / "model.pt").exists()
    resumed = training.train_segmenter(pm, tmp_path / "b", model="transunet", config="small", iterations=9, device="cpu", resume=True)
    a = load_checkpoint(straight, kind="seg")
    b = load_checkpoint(resumed, kind="seg")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["metadata"]["best_iteration"] == b["metadata"]["best_iteration"]
    la = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(tmp_path / "a" / "losses.csv"))]
    lb = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(tmp_path / "b" / "losses.csv"))]
    assert la == lb
    sa, sb = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt", kind="seg"), load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt", kind="seg")
    assert torch.equal(sa["contrastive"]["log_tau"], sb["contrastive"]["log_tau"])


def test_run_folder_guards(pm, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(InputError, match="no checkpoint to resume"):
        training.train_segmenter(pm, run, config="tiny", iterations=2, resume=True, device="cpu")
    training.train_segmenter(pm, run, model="unet", config="tiny", iterations=3, device="cpu")
    with pytest.raises(InputError, match="already has a checkpoint"):
        training.train_segmenter(pm, run, model="unet", config="tiny", iterations=3, device="cpu")
    with pytest.raises(InputError, match="not 'transunet'"):
        training.train_segmenter(pm, run, model="transunet", config="tiny", iterations=4, resume=True, device="cpu")
    with pytest.raises(ValueError):
        training.train_segmenter(pm, tmp_path / "x", model="resnet", config="tiny")


def test_bad_pseudo_mask_folders(tmp_path, pm):
    with pytest.raises(InputError, match="missing"):
        training.load_pseudo_masks(tmp_path)
    (pm / "severity.json").write_text(json.dumps({"high": [[99, 0]], "low": []}))
    with pytest.raises(InputError, match="outside"):
        training.load_pseudo_masks(pm)
    (pm / "severity.json").write_text(json.dumps({"high": [], "low": []}))
    (pm / "index.json").write_text("{}")
    with pytest.raises(InputError, match="preprocessing configuration"):
        training.load_pseudo_masks(pm)


def test_no_severity_groups_skips_phase1(tmp_path, pm):
    (pm / "severity.json").write_text(json.dumps({"high": [], "low": []}))
    path = training.train_segmenter(pm, tmp_path / "run", config="tiny", iterations=3, device="cpu")
    assert load_checkpoint(path, kind="seg")["metadata"]["pretrain_iterations"] == 0


def test_slice_stacks_give_each_slice_its_neighbours():
    vol = np.arange(2 * 4 * 2 * 2, dtype=np.float32).reshape(2, 4, 2, 2)  # (N, D, H, W)
    out = training.slice_stacks(vol, np.array([0, 1, 1]), np.array([0, 2, 3]), 1)
    assert out.shape == (3, 3, 2, 2)
    np.testing.assert_array_equal(out[0], vol[0, [0, 0, 1]])  # before the first slice, the first repeats
    np.testing.assert_array_equal(out[1], vol[1, [1, 2, 3]])
    np.testing.assert_array_equal(out[2], vol[1, [2, 3, 3]])
    np.testing.assert_array_equal(training.slice_stacks(vol, np.array([1]), np.array([2]))[:, 0], vol[1, [2]])  # 2D: the slice alone
    with pytest.raises(ValueError):
        training.slice_stacks(vol, np.array([0]), np.array([0]), -1)


@pytest.mark.parametrize("arch", ["transunet", "unet"])
def test_2_5d_segmenter_trains_and_predicts_from_the_neighbouring_slices(pm, tmp_path, arch):
    from CovidGANSegLib.seg.inference import load_segmenter, predict_slices

    with pytest.raises(ValueError, match="odd"):
        TINY.replace(in_channels=2)
    model_path = training.train_segmenter(pm, tmp_path / "run", model=arch, config=TINY.replace(in_channels=3), iterations=4, device="cpu")
    model, payload = load_segmenter(model_path)
    assert payload["config"]["in_channels"] == 3
    image = np.random.default_rng(0).random((4, 32, 32)).astype(np.float32)  # (D, H, W)
    prob = predict_slices(model, image, batch_size=3)  # batches that split the volume
    assert prob.shape == image.shape and np.isfinite(prob).all()
    changed = image.copy()
    changed[2] = 1.0 - changed[2]  # only slice 2 changes
    after = predict_slices(model, changed)
    assert not np.allclose(after[1], prob[1]) and not np.allclose(after[3], prob[3])  # its neighbours see it
    np.testing.assert_allclose(after[0], prob[0], atol=1e-6)  # slice 0's neighbours are 0 and 1 only


def test_a_preprocessed_data_set_trains_on_synthetic_lesions_alone(tmp_path):
    """No GAN, no pseudo-mask: the healthy volumes of a preprocessed data set with synthetic lesions."""
    from CovidGANSegLib.preprocessing import preprocess_dataset
    from CovidGANSegLib.seg.synthetic import SyntheticSupervision
    from CovidGANSegLib.synth.phantoms import write_cohort

    cohort = write_cohort(tmp_path / "cohort", healthy=3, covid=2, seed=4)
    pre = preprocess_dataset(cohort, tmp_path / "pre", PreprocessConfig(grid=(32, 32, 8)))
    data = training.load_training_data(pre)
    assert data.images.shape == (0, 8, 32, 32) and data.healthy.shape == (3, 8, 32, 32) and data.healthy_lungs.any()
    assert len(data.meta["records"]) == 2 and all(r["set"] == "covid" for r in data.meta["records"])
    cfg = TINY.replace(pretrain_fraction=0.0)
    with pytest.raises(InputError, match="no pseudo-masks") as info:
        training.train_segmenter(pre, tmp_path / "half", config=cfg, iterations=2, device="cpu",
                                 synthetic=SyntheticSupervision(fraction=0.5))
    assert str(pre) in str(info.value)
    model = training.train_segmenter(pre, tmp_path / "run", config=cfg, iterations=4, device="cpu", data=cohort,
                                     synthetic=SyntheticSupervision(fraction=1.0, variants_per_volume=1))
    payload = load_checkpoint(model, kind="seg")
    assert payload["metadata"]["n_train_volumes"] == 0 and payload["metadata"]["n_train_healthy_volumes"] == 2
    assert payload["metadata"]["best_iteration"] is not None  # chosen on the synthetic pairs of the third healthy volume
    card = read_model_card(model)
    assert "no pseudo-masks" in card["trained_on"] and card["demo"] is True
    assert card["val_dice_synthetic"] == payload["metadata"]["val_dice_synthetic"] is not None
    assert "val_dice_pseudo_masks" not in card and "val_dice_pseudo_masks" not in payload["metadata"]
