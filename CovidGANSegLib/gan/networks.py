"""Networks and configurations of the 3D GAN (paper section 3.1, eq. 1).

* ``DenseUNetGenerator3D`` -- G: a 3D dense U-Net encoder-decoder with noise added in its latent
  space, ``I_H = De(En(I_C) + U_N)`` (eq. 1). By default (``output="residual"``) the decoder
  predicts a *removal fraction* ``a`` in [0, 1] per voxel and G returns
  ``I_H = I_C - m * a * I_C`` (``m`` = lung mask): the pseudo-healthy volume is the input minus a
  non-negative correction restricted to the lungs. It is identical to the input outside the lungs,
  lies in [0, I_C] (so in [0, 1]), and the pseudo-mask of eq. 3, ``I_C - I_H = m * a * I_C``, is
  non-negative: infection only ever *adds* density, so removing it only darkens. The plain form of
  eq. 1 (``output="direct"``, sigmoid output) is available too.
* ``Discriminator3D`` -- D: four strided 3D convolutions, global average pooling and a small dense
  head giving one logit per volume.
* ``GANConfig`` / ``GAN_CONFIGS`` / ``get_gan_config`` -- every hyper-parameter in one registry
  (``paper``, ``quick``, ``tiny``) or a JSON file.

Tensors are ``(B, C, D, H, W)`` with D the slice axis (``config.PreprocessConfig.grid_dhw``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from CovidGANSegLib.config import dataclass_from_dict, dataclass_to_dict

NORMS = ("group", "batch", "none")
OUTPUTS = ("residual", "direct")
NOISES = ("uniform", "perlin", "none")
LOSSES = ("log", "log-saturating", "lsgan")
AMP_DTYPES = ("float16", "bfloat16")
G_UPDATES = ("separate", "joint")
#: slope of the LeakyReLU activations (the predecessor's value)
LEAKY_SLOPE = 0.3
#: initial bias of the residual head: sigmoid(-4) ~ 0.018, so an untrained G is close to identity
RESIDUAL_INIT_BIAS = -4.0


@dataclass(frozen=True)
class GANConfig:
    """All hyper-parameters of the 3D GAN (networks, losses, optimisation, bookkeeping).

    Attributes:
        name: registry name (``paper``, ``quick``, ``tiny``) or ``custom``.
        filters: generator filters per U-Net level, the last one at the bottleneck; the input grid
            must be divisible by ``2 ** (len(filters) - 1)`` along every axis.
        block_layers: 3x3x3 convolutions per dense block (concatenated, then a 1x1x1 transition).
        bottleneck_layers: convolutions of the bottleneck dense block.
        norm: normalisation after each convolution: ``group`` (GroupNorm: independent of the batch
            size, no train / eval gap), ``batch`` or ``none``.
        output: ``residual`` (input minus a non-negative lung-restricted correction, see module
            docstring) or ``direct`` (sigmoid of the decoder output, the literal eq. 1).
        noise: latent noise U_N of eq. 1: ``uniform`` in (-noise_scale, noise_scale) (predecessor:
            0.5), ``perlin`` (smooth fractal gradient noise scaled to [-noise_scale, noise_scale]) or
            ``none``.
        noise_scale: amplitude of U_N.
        noise_at_inference: add U_N in eval mode too. Off by default: inference then uses the
            noise's expectation (zero), so a pseudo-healthy volume is reproducible.
        disc_filters: filters of the discriminator's four strided convolutions.
        disc_hidden: width of the discriminator's dense head.
        loss: adversarial loss: ``log`` (eq. 2 with G minimising ``-log D(G(I_C))``, the
            non-saturating form of the same game), ``log-saturating`` (G minimises
            ``log(1 - D(G(I_C)))`` literally, Algorithm 1 line 11) or ``lsgan`` (predecessor).
        batch_size: volumes per batch (paper 8).
        lr_g, lr_d: Adam learning rates. The paper states 5e-5 for the GAN; we use it for both
            networks in ``paper`` (the predecessor used 1e-3 for D, which with the log loss lets D
            saturate early).
        betas: Adam betas ((0.5, 0.999), the usual choice for GANs).
        lr_step, lr_gamma: StepLR: multiply both learning rates by ``lr_gamma`` every ``lr_step``
            iterations (paper: 0.9 every 1,000).
        iterations: training iterations (paper 10,000).
        adv_weight: weight of G's adversarial loss (Algorithm 1 line 11). Eq. 2 gives no weights;
            0.03 was the best of 0, 0.03, 0.1 and 1 in short runs on phantoms (pseudo-mask Dice
            0.52 vs 0.47 / 0.39 / 0.34, ``benchmarks/results/gan_quality_cuda_*.json``): with weight
            1 the adversarial term also darkens lesion-free lung.
        rec_weight: weight of the MSE between G(noisy healthy) and the clean healthy volume
            (Algorithm 1 line 13). The MSE over a whole volume is small (lesions cover a few % of
            it), so it is weighted up (like the L1 term of pix2pix) or the untrained
            discriminator's gradients dominate G's first updates.
        g_update: ``separate`` (Algorithm 1: one Adam step on the adversarial loss, then one on the
            reconstruction loss) or ``joint`` (one step on their weighted sum).
        amp: mixed precision (autocast + GradScaler) on CUDA; ignored on CPU.
        amp_dtype: ``float16`` (with GradScaler) or ``bfloat16`` (no scaler needed).
        gradient_checkpointing: recompute G's dense blocks in the backward pass to save memory.
        checkpoint_every: write RUN/checkpoints/last.pt every this many iterations (and at the end).
        sample_every: write a Fig. 3 triptych and the loss curves every this many iterations.
        grid: the preprocessing grid (x, y, z) this configuration is meant for (paper 128 x 128 x 32);
            ``train-gan`` uses it unless ``--grid`` is given.
    """

    name: str = "custom"
    filters: tuple[int, ...] = (8, 16, 32, 64, 128)
    block_layers: int = 2
    bottleneck_layers: int = 3
    norm: str = "group"
    output: str = "residual"
    noise: str = "uniform"
    noise_scale: float = 0.5
    noise_at_inference: bool = False
    disc_filters: tuple[int, ...] = (16, 32, 64, 128)
    disc_hidden: int = 64
    loss: str = "log"
    batch_size: int = 8
    lr_g: float = 5e-5
    lr_d: float = 5e-5
    betas: tuple[float, float] = (0.5, 0.999)
    lr_step: int = 1000
    lr_gamma: float = 0.9
    iterations: int = 10000
    adv_weight: float = 0.03
    rec_weight: float = 100.0
    g_update: str = "separate"
    amp: bool = True
    amp_dtype: str = "float16"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    sample_every: int = 500
    grid: tuple[int, int, int] = (128, 128, 32)

    def __post_init__(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"GAN config {self.name!r}: {msg}")

        if len(self.filters) < 2 or any(int(f) < 1 for f in self.filters):
            raise bad(f"filters must be at least two positive channel counts, got {self.filters}")
        if len(self.disc_filters) != 4 or any(int(f) < 1 for f in self.disc_filters):
            raise bad(f"disc_filters must be four positive channel counts, got {self.disc_filters}")
        if self.block_layers < 1 or self.bottleneck_layers < 1:
            raise bad("block_layers and bottleneck_layers must be >= 1")
        for field_name, allowed in (("norm", NORMS), ("output", OUTPUTS), ("noise", NOISES), ("loss", LOSSES), ("amp_dtype", AMP_DTYPES), ("g_update", G_UPDATES)):
            if getattr(self, field_name) not in allowed:
                raise bad(f"{field_name} must be one of {allowed}, got {getattr(self, field_name)!r}")
        if not self.noise_scale >= 0:
            raise bad(f"noise_scale must be >= 0, got {self.noise_scale}")
        if self.disc_hidden < 1 or self.batch_size < 1 or self.iterations < 1:
            raise bad("disc_hidden, batch_size and iterations must be >= 1")
        if not (self.lr_g > 0 and self.lr_d > 0):
            raise bad(f"learning rates must be > 0, got lr_g={self.lr_g}, lr_d={self.lr_d}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad(f"betas must be two values in [0, 1), got {self.betas}")
        if self.lr_step < 1 or not 0 < self.lr_gamma <= 1:
            raise bad(f"lr_step must be >= 1 and lr_gamma in (0, 1], got {self.lr_step}, {self.lr_gamma}")
        if self.adv_weight < 0 or self.rec_weight < 0 or self.adv_weight + self.rec_weight == 0:
            raise bad("adv_weight and rec_weight must be >= 0 and not both 0")
        if self.checkpoint_every < 1 or self.sample_every < 1:
            raise bad("checkpoint_every and sample_every must be >= 1")
        if len(self.grid) != 3 or any(int(g) % self.divisor for g in self.grid):
            raise bad(f"grid {self.grid} (x, y, z) must have three sizes divisible by {self.divisor} (2 ** depth)")

    @property
    def depth(self) -> int:
        """Number of 2x down-samplings of the generator."""
        return len(self.filters) - 1

    @property
    def divisor(self) -> int:
        """Every spatial size of G's input must be divisible by this (``2 ** depth``)."""
        return 2 ** self.depth

    def to_dict(self) -> dict[str, Any]:
        return dataclass_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GANConfig":
        try:
            return dataclass_from_dict(cls, data, "GAN config fields")
        except TypeError as exc:  # e.g. a string where a number is expected
            raise ValueError(f"bad GAN config: {exc}") from exc


GAN_CONFIGS: dict[str, GANConfig] = {
    # The paper (section 3.1) with the predecessor's generator filters.
    "paper": GANConfig(name="paper"),
    # Small enough for a few minutes on 2 CPU cores on a 64 x 64 x 16 grid, and still learns to remove
    # lesions: on phantoms, pseudo-mask Dice 0.40 after 600 iterations (156 s on one shared CPU core;
    # 0.22 after 300), benchmarks/results/gan_quality_cpu*.json.
    "quick": GANConfig(
        name="quick", filters=(4, 8, 16, 32), block_layers=1, bottleneck_layers=1, disc_filters=(4, 8, 16, 32),
        disc_hidden=32, batch_size=2, lr_g=5e-4, lr_d=2e-4, lr_step=100, lr_gamma=0.9, iterations=600,
        checkpoint_every=200, sample_every=200, grid=(64, 64, 16),
    ),
    # For tests: seconds.
    "tiny": GANConfig(
        name="tiny", filters=(4, 8, 16), block_layers=1, bottleneck_layers=1, disc_filters=(4, 8, 8, 8),
        disc_hidden=8, batch_size=2, lr_g=1e-3, lr_d=1e-3, lr_step=10, lr_gamma=0.9, iterations=4,
        checkpoint_every=2, sample_every=2, grid=(32, 32, 8),
    ),
}


def get_gan_config(name_or_path: str | Path | GANConfig) -> GANConfig:
    """A registry configuration by name, or one read from a JSON file.

    The JSON file holds GANConfig fields; an optional ``"base"`` names the registry entry whose
    values the file overrides (default ``paper``), e.g. ``{"base": "quick", "iterations": 1000}``.

    Raises:
        ValueError: unknown name, missing / unreadable file, unknown field or bad value.
    """
    if isinstance(name_or_path, GANConfig):
        return name_or_path
    key = str(name_or_path)
    if key in GAN_CONFIGS:
        return GAN_CONFIGS[key]
    path = Path(key)
    if not (path.suffix.lower() == ".json" or path.is_file()):
        raise ValueError(f"unknown GAN config {key!r}: use one of {sorted(GAN_CONFIGS)} or a JSON file")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read GAN config JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a GAN config JSON must be an object of fields")
    base_name = data.pop("base", "paper")
    if base_name not in GAN_CONFIGS:
        raise ValueError(f"{path}: unknown base config {base_name!r}, use one of {sorted(GAN_CONFIGS)}")
    merged = {**GAN_CONFIGS[base_name].to_dict(), "name": data.pop("name", path.stem), **data}
    try:
        return GANConfig.from_dict(merged)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu`` / ``cuda`` / ``cuda:N`` as given
    (:mod:`CovidGANSegLib.protocol`'s policy).

    Raises:
        ValueError: unknown device string; :class:`~CovidGANSegLib.protocol.CudaMissingError` (a
            ``ValueError``) when CUDA is asked for but not available.
    """
    from CovidGANSegLib import protocol

    return torch.device(protocol.resolve_device(device, torch.cuda.is_available))


# --------------------------------------------------------------------------------------------
# building blocks


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(math.gcd(4, channels), channels)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    return nn.Identity()


class _ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, norm: str) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, kernel, padding=kernel // 2, bias=norm == "none"),
            _norm(norm, cout),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        )


class DenseBlock3D(nn.Module):
    """Dense block: each 3x3x3 convolution sees the concatenation of the block input and all
    previous outputs; a 1x1x1 transition maps the concatenation to ``cout`` channels."""

    def __init__(self, cin: int, cout: int, layers: int, norm: str) -> None:
        super().__init__()
        growth = cout
        self.layers = nn.ModuleList(_ConvNormAct(cin + i * growth, growth, 3, norm) for i in range(layers))
        self.transition = _ConvNormAct(cin + layers * growth, cout, 1, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))  # (B, sum C, D, H, W)
        return self.transition(torch.cat(features, dim=1))


def perlin_noise_torch(shape: tuple[int, ...], res: tuple[int, int, int], *, octaves: int = 2,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fractal 3D gradient (Perlin) noise of ``shape = (N, D, H, W)``, normalised to [-1, 1] per item.

    Drawn from torch's global RNG (so seeding and checkpointed RNG states cover it). ``res`` is the
    number of lattice periods of the first octave per axis (at least 1); each further octave doubles
    it (capped at the size along that axis).
    """
    if len(shape) != 4:
        raise ValueError(f"shape must be (N, D, H, W), got {shape}")
    n, *size = shape
    total = torch.zeros(shape, device=device, dtype=dtype)
    amp = 1.0
    for octave in range(octaves):
        r = [max(1, min(int(res[a]) * 2 ** octave, size[a])) for a in range(3)]
        grads = torch.randn(n, r[0] + 1, r[1] + 1, r[2] + 1, 3, device=device, dtype=dtype)
        grads = grads / grads.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        coords = []
        for a in range(3):
            t = torch.arange(size[a], device=device, dtype=dtype) * (r[a] / size[a])
            i = t.floor().long().clamp(max=r[a] - 1)
            coords.append((i, t - i.to(dtype)))
        (i0, f0), (i1, f1), (i2, f2) = coords
        f0, f1, f2 = f0[:, None, None], f1[None, :, None], f2[None, None, :]  # broadcast to (D, H, W)
        fade = lambda f: f * f * f * (f * (f * 6 - 15) + 10)  # noqa: E731
        w0, w1, w2 = fade(f0), fade(f1), fade(f2)
        value = torch.zeros(shape, device=device, dtype=dtype)
        for c0 in (0, 1):
            for c1 in (0, 1):
                for c2 in (0, 1):
                    g = grads[:, (i0 + c0)[:, None, None], (i1 + c1)[None, :, None], (i2 + c2)[None, None, :]]  # (N, D, H, W, 3)
                    dot = g[..., 0] * (f0 - c0) + g[..., 1] * (f1 - c1) + g[..., 2] * (f2 - c2)
                    weight = (w0 if c0 else 1 - w0) * (w1 if c1 else 1 - w1) * (w2 if c2 else 1 - w2)
                    value = value + weight * dot
        total = total + amp * value
        amp *= 0.5
    peak = total.flatten(1).abs().amax(dim=1).clamp_min(1e-6)
    return total / peak.view(n, 1, 1, 1)


# --------------------------------------------------------------------------------------------
# generator


class DenseUNetGenerator3D(nn.Module):
    """G of paper eq. 1: ``I_H = De(En(I_C) + U_N)``, a 3D dense U-Net with latent noise.

    Encoder: a dense block per level followed by 2x max pooling; the bottleneck dense block gives
    the latent ``En(I_C)`` of ``filters[-1]`` channels at 1 / 2**depth of the input size, to which
    U_N (uniform or Perlin noise of the same shape) is *added*, exactly as in eq. 1 (the
    predecessor concatenated it instead). Decoder: trilinear 2x up-sampling, a 1x1x1 convolution,
    concatenation with the encoder's skip features and a dense block per level. The head gives
    one channel; see the module docstring for the ``residual`` and ``direct`` output forms. All
    activations are LeakyReLU(0.3) as in the predecessor.

    ``forward(x, lung_mask=None)``: ``x`` is ``(B, 1, D, H, W)`` in [0, 1] with D, H, W divisible
    by ``2 ** depth``; ``lung_mask`` (same shape, bool or {0, 1}) restricts the residual
    correction to the lungs (without it the correction may act anywhere). Returns the
    pseudo-healthy volume, ``(B, 1, D, H, W)`` in [0, 1].
    """

    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        if not isinstance(config, GANConfig):
            raise ValueError(f"config must be a GANConfig, got {type(config).__name__}")
        self.config = config
        f = [int(c) for c in config.filters]
        self.depth = config.depth
        self.gradient_checkpointing = bool(config.gradient_checkpointing)
        cin = 1
        self.encoder = nn.ModuleList()
        for level in range(self.depth):
            self.encoder.append(DenseBlock3D(cin, f[level], config.block_layers, config.norm))
            cin = f[level]
        self.bottleneck = DenseBlock3D(cin, f[-1], config.bottleneck_layers, config.norm)
        self.reduce = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in range(self.depth):
            self.reduce.append(_ConvNormAct(f[level + 1], f[level], 1, config.norm))
            self.decoder.append(DenseBlock3D(2 * f[level], f[level], config.block_layers, config.norm))
        self.head = nn.Conv3d(f[0], 1, kernel_size=1)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.constant_(self.head.bias, RESIDUAL_INIT_BIAS if config.output == "residual" else 0.0)

    def check_input(self, x: torch.Tensor, lung_mask: torch.Tensor | None = None) -> None:
        """Raise ValueError unless ``x`` is (B, 1, D, H, W) with sizes divisible by 2**depth."""
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"generator input must be a (B, 1, D, H, W) tensor, got {tuple(getattr(x, 'shape', ()))}")
        div = 2 ** self.depth
        if any(s % div or s == 0 for s in x.shape[2:]):
            raise ValueError(f"generator input size {tuple(x.shape[2:])} must be divisible by {div} (2 ** depth) along D, H and W")
        if lung_mask is not None and tuple(lung_mask.shape) != tuple(x.shape):
            raise ValueError(f"lung_mask shape {tuple(lung_mask.shape)} differs from the input's {tuple(x.shape)}")

    def latent_noise(self, latent: torch.Tensor) -> torch.Tensor:
        """U_N of eq. 1, the shape of the latent ``(B, C, d, h, w)``."""
        s = self.config.noise_scale
        if self.config.noise == "uniform":
            return (torch.rand_like(latent) * 2 - 1) * s  # uniform(-s, s)
        b, c, d, h, w = latent.shape
        noise = perlin_noise_torch((b * c, d, h, w), (1, 2, 2), device=latent.device, dtype=latent.dtype)
        return noise.view(b, c, d, h, w) * s  # (B*C, d, h, w) -> (B, C, d, h, w)

    def _run(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return _checkpoint(block, h, use_reentrant=False)
        return block(h)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """En(I_C): latent ``(B, filters[-1], D/2**depth, ...)`` and the skip features."""
        skips = []
        h = x
        for block in self.encoder:
            h = self._run(block, h)
            skips.append(h)
            h = F.max_pool3d(h, 2)
        return self._run(self.bottleneck, h), skips

    def decode(self, z: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """De(z): one channel at the input resolution (logits of the output form)."""
        h = z
        for level in reversed(range(self.depth)):
            h = F.interpolate(h, scale_factor=2, mode="trilinear", align_corners=False)
            h = self.reduce[level](h)
            h = self._run(self.decoder[level], torch.cat([h, skips[level]], dim=1))  # (B, 2 f, D, H, W)
        return self.head(h)

    def forward(self, x: torch.Tensor, lung_mask: torch.Tensor | None = None, *, noise: bool | None = None) -> torch.Tensor:
        self.check_input(x, lung_mask)
        z, skips = self.encode(x)
        add_noise = (self.training or self.config.noise_at_inference) if noise is None else noise
        if add_noise and self.config.noise != "none" and self.config.noise_scale > 0:
            z = z + self.latent_noise(z)  # eq. 1: En(I_C) + U_N
        logits = self.decode(z, skips).float()
        if self.config.output == "direct":
            return torch.sigmoid(logits)
        removal = torch.sigmoid(logits)  # fraction of the input intensity removed, in [0, 1]
        if lung_mask is not None:
            removal = removal * lung_mask.to(removal.dtype)
        xc = x.float().clamp(0.0, 1.0)
        return xc - removal * xc  # I_C minus a non-negative correction: in [0, I_C]


# --------------------------------------------------------------------------------------------
# discriminator


class Discriminator3D(nn.Module):
    """D: a 3D CNN of four strided convolutions, global average pooling and a dense head.

    ``forward(x)`` with ``x`` of shape ``(B, 1, D, H, W)`` (any size) returns one logit per
    volume, ``(B, 1)``: the log loss of eq. 2 applies a sigmoid (``D(I) = sigmoid(logit)``), the
    least-squares option regresses the raw score.
    """

    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        if not isinstance(config, GANConfig):
            raise ValueError(f"config must be a GANConfig, got {type(config).__name__}")
        layers: list[nn.Module] = []
        cin = 1
        for i, cout in enumerate(int(c) for c in config.disc_filters):
            layers.append(nn.Conv3d(cin, cout, 3, stride=2, padding=1))
            if i > 0 and config.norm != "none":
                layers.append(nn.GroupNorm(math.gcd(4, cout), cout))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(cin, config.disc_hidden), nn.LeakyReLU(0.2, inplace=True), nn.Linear(config.disc_hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"discriminator input must be a (B, 1, D, H, W) tensor, got {tuple(getattr(x, 'shape', ()))}")
        h = self.features(x)  # (B, C, D/16, H/16, W/16)
        h = h.mean(dim=(2, 3, 4))  # global average pooling -> (B, C)
        return self.head(h).float()  # (B, 1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
