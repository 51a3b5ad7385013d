"""Training-time augmentation of the segmenters (seg.augmentation): targets move with the image."""

from __future__ import annotations

import math

import pytest
import torch

from CovidGANSegLib.seg import augmentation
from CovidGANSegLib.seg.transunet import SEG_CONFIGS, SegConfig


def _blobs(b: int = 16, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch whose image is its own target: a bright off-centre disc on dark lung, lung = a wide ellipse."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    centres = torch.randint(size // 4, size // 2, (b, 2), generator=g).float()
    disc = ((yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2) <= 36.0
    lung = (((yy - size / 2) / (0.4 * size)) ** 2 + ((xx - size / 2) / (0.45 * size)) ** 2) <= 1.0
    y = disc[:, None].float()  # (B, 1, H, W)
    x = 0.1 + 0.8 * y
    return x, y, lung[None, None].expand(b, 1, size, size).clone()


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(1, int((a | b).sum()))


@pytest.mark.parametrize("kind", augmentation.KINDS)
def test_targets_move_with_the_image(kind):
    x, y, lung = _blobs()
    ax, ay, alung = augmentation.augment(kind, x, (y, lung), torch.Generator().manual_seed(3))
    assert ax.shape == x.shape and ay.shape == y.shape and alung.shape == lung.shape
    assert ay.dtype == y.dtype and alung.dtype == torch.bool
    assert float(ax.min()) >= 0.0 and float(ax.max()) <= 1.0
    assert set(ay.unique().tolist()) <= {0.0, 1.0}
    for i in range(len(x)):  # the bright disc of the image is where its target went (blur and noise aside)
        assert _iou(ax[i, 0] > 0.5, ay[i, 0] > 0.5) > 0.8, i


def test_strong_moves_some_slices_and_light_moves_none_off_the_flip_grid():
    x, y, lung = _blobs(b=32)
    flips = [y.flip(-1), y.flip(-2), y.flip(-1).flip(-2), y]

    def only_flipped(out):
        return [any(torch.equal(out[i], f[i]) for f in flips) for i in range(len(y))]

    _, ly, _ = augmentation.augment("light", x, (y, lung), torch.Generator().manual_seed(5))
    _, sy, _ = augmentation.augment("strong", x, (y, lung), torch.Generator().manual_seed(5))
    assert all(only_flipped(ly))
    moved = sum(not f for f in only_flipped(sy))
    assert 6 <= moved <= 26  # rotation / zoom on about half of the 32 slices


def test_strong_adds_noise_and_blur_to_some_slices():
    x = torch.full((32, 1, 32, 32), 0.5)
    x[:, :, :, 16:] = 0.2  # one vertical edge: blur softens it, noise roughens flat areas
    y = torch.zeros_like(x)
    ax, _ = augmentation.augment("strong", x, (y,), torch.Generator().manual_seed(11))
    flat = ax[:, 0, 4:12, 2:8].flatten(1).std(dim=1)  # a flat patch, off the rotated border
    assert int((flat > 0.003).sum()) >= 6 and int((flat < 1e-6).sum()) >= 4  # noise on some slices, not all


def test_the_same_generator_state_gives_the_same_batch():
    x, y, lung = _blobs()
    a = augmentation.augment("strong", x, (y, lung), torch.Generator().manual_seed(7))
    b = augmentation.augment("strong", x, (y, lung), torch.Generator().manual_seed(7))
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_light_is_the_flip_and_jitter_of_earlier_runs():
    """A model trained before ``strong`` existed resumes with the same random stream and the same batches."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 8, 8, generator=g)
    y = (x > 0.5).float()
    ax, ay = augmentation.light(x, (y,), torch.Generator().manual_seed(2))
    r = torch.rand(4, 4, generator=torch.Generator().manual_seed(2))
    for i in range(4):
        t = y[i]
        if r[i, 0] < 0.5:
            t = t.flip(-1)
        if r[i, 1] < 0.5:
            t = t.flip(-2)
        assert torch.equal(ay[i], t)
        expect = x[i] if r[i, 0] >= 0.5 else x[i].flip(-1)
        expect = expect if r[i, 1] >= 0.5 else expect.flip(-2)
        expect = (expect * (1 + (r[i, 2] * 2 - 1) * 0.05) + (r[i, 3] * 2 - 1) * 0.03).clamp(0, 1)
        assert torch.allclose(ax[i], expect)


def test_configuration_checks_and_old_checkpoints():
    with pytest.raises(ValueError, match="augmentation"):
        SegConfig(augmentation="heavy")
    with pytest.raises(ValueError, match="augmentation"):
        augmentation.augment("heavy", torch.zeros(2, 1, 8, 8), (), torch.Generator())
    old = SEG_CONFIGS["small"].to_dict()
    del old["augmentation"]  # a configuration stored before the field existed
    assert SegConfig.from_dict(old).augmentation == "light"


def test_rotation_zoom_and_blur_do_what_they_say():
    y = torch.zeros(2, 1, 33, 33)
    y[:, :, 15:18, 8:25] = 1.0  # a horizontal bar through the centre
    lung = y > 0.5
    x = y.clone()
    apply = torch.tensor([True, False])
    angle, zoom = torch.tensor([math.pi / 2, math.pi / 2]), torch.tensor([2.0, 2.0])
    rx, (ry, rlung) = augmentation._rotate_zoom(x, [y, lung], apply, angle, zoom)
    rows, cols = torch.nonzero(ry[0, 0] > 0.5, as_tuple=True)
    assert int(rows.max() - rows.min()) > 2 * int(cols.max() - cols.min())  # now vertical ...
    assert int(rows.max() - rows.min()) >= 28 and int(ry[0].sum()) > 1.5 * int(y[0].sum())  # ... and twice as long
    assert torch.equal(rlung[0], ry[0] > 0.5) and torch.equal(ry[1], y[1]) and torch.equal(rx[1], x[1])
    edge = torch.zeros(2, 1, 16, 16)
    edge[:, :, :, 8:] = 1.0
    blurred = augmentation._blur(edge, torch.tensor([True, False]), torch.tensor([1.0, 1.0]))
    assert 0.0 < float(blurred[0, 0, 5, 7]) < 0.5 < float(blurred[0, 0, 5, 8]) < 1.0  # the edge softened
    assert torch.allclose(blurred[0].mean(), edge[0].mean(), atol=1e-6) and torch.equal(blurred[1], edge[1])
