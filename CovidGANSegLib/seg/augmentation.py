"""Training-time augmentation of 2D slice batches for the segmenters (``SegConfig.augmentation``).

* ``light``: random horizontal / vertical flips and a small intensity jitter (x [0.95, 1.05],
  + [-0.03, 0.03]); the augmentation of every run before ``strong`` existed.
* ``strong``: ``light``, then what separates one CT from another more than a flip does: a random
  rotation (+-15 degrees) and zoom (x 0.85-1.15) of the slice, its targets with it (nearest
  neighbour); a Gaussian blur (sigma 0.5-1.0 pixel: reconstruction kernels and in-plane partial
  volume); Gaussian noise (sigma up to 0.02 of the window, about 28 HU: low-dose noise). Each is
  applied to a sample with probability 1/2 (blur 1/3), drawn from the trainer's seeded generator.

Images are in [0, 1] (the HU window); values outside the rotated / zoomed slice are 0 (air), as
are the targets there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("light", "strong")

#: strong: (max rotation in radians, zoom range, blur sigma range in pixels, max noise sigma)
_ROTATION = math.radians(15.0)
_ZOOM = (0.85, 1.15)
_BLUR_SIGMA = (0.5, 1.0)
_NOISE_SIGMA = 0.02


def light(x: torch.Tensor, targets: tuple[torch.Tensor, ...], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Flips (image and targets alike) and an intensity jitter of the image; ``x`` is (B, C, H, W)."""
    b = x.shape[0]
    r = torch.rand(b, 4, generator=generator).to(x.device)
    fh = (r[:, 0] < 0.5)[:, None, None, None]
    fv = (r[:, 1] < 0.5)[:, None, None, None]

    def flip(t: torch.Tensor) -> torch.Tensor:
        t = torch.where(fh, t.flip(-1), t)
        return torch.where(fv, t.flip(-2), t)

    scale = (1.0 + (r[:, 2] * 2 - 1) * 0.05)[:, None, None, None]
    shift = ((r[:, 3] * 2 - 1) * 0.03)[:, None, None, None]
    return ((flip(x) * scale + shift).clamp(0.0, 1.0), *(flip(t) for t in targets))


def strong(x: torch.Tensor, targets: tuple[torch.Tensor, ...], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """:func:`light`, then rotation / zoom, blur and noise (module docstring)."""
    x, *ts = light(x, targets, generator)
    b = x.shape[0]
    r = torch.rand(b, 9, generator=generator)  # drawn on the CPU generator whatever the device
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    x, ts = _rotate_zoom(x, ts, r[:, 0] < 0.5, (r[:, 1] * 2 - 1) * _ROTATION, _ZOOM[0] + r[:, 2] * (_ZOOM[1] - _ZOOM[0]))
    x = _blur(x, r[:, 3] < 1.0 / 3.0, _BLUR_SIGMA[0] + r[:, 4] * (_BLUR_SIGMA[1] - _BLUR_SIGMA[0]))
    sigma = torch.where(r[:, 5] < 0.5, r[:, 6] * _NOISE_SIGMA, torch.zeros(b)).to(x.device, x.dtype)
    x = (x + noise.to(x.dtype) * sigma[:, None, None, None]).clamp(0.0, 1.0)
    return (x, *ts)


def _rotate_zoom(x: torch.Tensor, targets: list[torch.Tensor], apply: torch.Tensor, angle: torch.Tensor,
                 zoom: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Rotate by ``angle`` and zoom by ``zoom`` the samples where ``apply`` (others unchanged)."""
    if not bool(apply.any()):
        return x, targets
    idx = torch.nonzero(apply).flatten()
    cos, sin, z = torch.cos(angle[idx]), torch.sin(angle[idx]), zoom[idx]
    theta = torch.zeros(len(idx), 2, 3)  # output -> input coordinates: a zoom of z shows 1/z of the slice
    theta[:, 0, 0], theta[:, 0, 1] = cos / z, -sin / z
    theta[:, 1, 0], theta[:, 1, 1] = sin / z, cos / z
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, [len(idx), *x.shape[1:]], align_corners=False)  # (n, H, W, 2)
    dev_idx = idx.to(x.device)
    x = x.clone()
    x[dev_idx] = F.grid_sample(x[dev_idx], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = []
    for t in targets:
        moved = F.grid_sample(t[dev_idx].to(x.dtype), grid.to(x.dtype), mode="nearest", padding_mode="zeros", align_corners=False)
        t = t.clone()
        t[dev_idx] = moved.to(t.dtype) if t.dtype != torch.bool else moved > 0.5
        out.append(t)
    return x, out


def _blur(x: torch.Tensor, apply: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur (5-tap) of the samples where ``apply``, each with its own ``sigma`` in pixels."""
    if not bool(apply.any()):
        return x
    idx = torch.nonzero(apply).flatten()
    n, c, h, w = len(idx), x.shape[1], x.shape[2], x.shape[3]
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma[idx, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0).to(x.device, x.dtype)  # (n * C, 5)
    dev_idx = idx.to(x.device)
    y = x[dev_idx].reshape(1, n * c, h, w)  # one group per sample and channel: (1, n * C, H, W)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), kernel[:, None, :, None], groups=n * c)
    x = x.clone()
    x[dev_idx] = y.reshape(n, c, h, w)
    return x


def augment(kind: str, x: torch.Tensor, targets: tuple[torch.Tensor, ...], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Augment the batch ``x`` (B, C, H, W) and its ``targets`` (B, 1, H, W) with the ``kind`` of :data:`KINDS`."""
    if kind == "light":
        return light(x, targets, generator)
    if kind == "strong":
        return strong(x, targets, generator)
    raise ValueError(f"augmentation must be one of {KINDS}, got {kind!r}")
