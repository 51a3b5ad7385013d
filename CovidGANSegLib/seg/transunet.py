"""TransUNet 2D for lesion segmentation (paper sections 3.3 and 4.5), written for this project.

Architecture (after Chen et al. 2021, "TransUNet"), one input channel, any input size divisible
by 16 (128 x 128 by default):

* CNN encoder: a stem and four residual stages giving the 1/16 feature map for the transformer.
  With ``stem_stride=1`` (``paper``, ``small``, ``tiny``), the stem is a full-resolution residual
  block (narrow: 32 wide in ``paper``) and the skips are at 1/1, 1/2, 1/4 and 1/8. With
  ``stem_stride=2`` (an option), the stem is one 7 x 7 stride-2 convolution as in the original
  TransUNet's ResNet stem (Chen et al. 2021; He et al. 2016), stage 1 stays at 1/2, the skips are
  at 1/2, 1/4 and 1/8 and the decoder's last (1/1) stage gets a narrow full-resolution residual
  block of the input (``full_res_channels``; TransUNet's cascaded upsampler has no skip there) or
  the input image itself.
* Patch embedding: a 1 x 1 convolution on the 1/16 map (one token per 1/16 cell, i.e. 16 x 16
  image patches), plus learnable position embeddings (bilinearly interpolated when the token grid
  differs from the default image size).
* Vision-transformer blocks: pre-norm, multi-head self-attention through
  ``torch.nn.functional.scaled_dot_product_attention`` (scores scaled by 1/sqrt(d_head), as in
  Vaswani et al.; the seed's code multiplied by sqrt(d), which this does not reproduce), and a GELU
  MLP.
* Cascaded upsampling decoder with skip connections, and a 3 x 3 segmentation head giving one
  channel of logits.
* A projection head (MLP, L2-normalised output) on the mean-pooled transformer tokens, used by the
  enhanced contrastive loss (eq. 4).

Normalisation is GroupNorm (batch-independent: slices segment the same whatever the batch).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from CovidGANSegLib.config import dataclass_from_dict, dataclass_to_dict
from CovidGANSegLib.seg.augmentation import KINDS as AUGMENTATIONS
from torch import nn

#: spatial reduction of the encoder (the token grid is image_size / 16)
DOWNSAMPLE = 16


@dataclass(frozen=True)
class SegConfig:
    """Segmenter configuration: network sizes (both architectures) and training parameters.

    Network (TransUNet):
        in_channels: slices fed to the network: 1 (2D, the paper), or 2 k + 1 for 2.5D, the slice
            with its k neighbours on each side as channels (a vessel continues into the next
            slice, a small lesion ends; predictions are for the centre slice). Both architectures.
        encoder_channels: widths of the stem and of the stages at 1/2, 1/4, 1/8, 1/16.
        encoder_blocks: residual blocks per stage (same length as ``encoder_channels``; the first
            must be 1 with ``stem_stride=2``, where the stem is a single convolution).
        stem_stride: 1: residual stem at full resolution (skips at 1/1, 1/2, 1/4, 1/8); 2: 7 x 7
            stride-2 convolution stem as in TransUNet, stage 1 at 1/2 (skips at 1/2, 1/4, 1/8,
            and the input image as the 1/1 skip).
            Checkpoints written before this field existed load with the default, 1, which is
            the architecture they were trained with.
        full_res_channels: with ``stem_stride=2`` only: width of one light residual block run on
            the input at full resolution whose output is the 1/1 skip (0: the input image itself
            is the 1/1 skip).
        hidden_size, num_heads, mlp_dim, num_layers: the vision transformer.
        decoder_channels: decoder widths at 1/8, 1/4, 1/2 and 1/1.
    Network (U-Net baseline):
        unet_channels: widths at 1/1, 1/2, 1/4, 1/8 and the 1/16 bottleneck.
    Both:
        projection_dim: output size of the projection head for the contrastive loss.
    Training (paper section 4.1.1: Adam 5e-5, x 0.9 every 1,000 steps; tau 0.06):
        learning_rate, lr_step, lr_gamma, batch_size, iterations (total, both phases),
        pretrain_fraction (share of iterations for phase 1, contrastive pre-training),
        tau_init, beta and fn_mode (eq. 5), loss_region (``lung``: eq. 5 and the MSE are averaged
        over the slice's lung pixels, where pseudo-masks are defined and where inference keeps
        lesions; ``all``: over every pixel), loss_band_mm (with ``lung``: the loss of the
        synthetic-lesion pairs, whose labels are exact everywhere, also covers the tissue within
        this in-plane distance of the lung (chest wall, mediastinum) as explicit negatives, and
        model selection on them counts it too; the pseudo-masks' loss stays in the lung; 0: none;
        checkpoints written before this field existed load with 0, how they were trained), loss
        weights of phase 2, positive_fraction (share of each phase-2 batch drawn from slices whose
        pseudo-mask is not empty), val_fraction
        (share of pseudo-mask VOLUMES held out for model selection), val_every,
        checkpoint_every, log_every.
        cpu_bf16: bfloat16 autocast of the training forward passes when training on a CPU with
            native bfloat16 instructions (AVX512-BF16 or AMX, :func:`~CovidGANSegLib.seg.cpu_has_native_bf16`);
            the weights, the losses, validation and inference stay float32. Ignored on CUDA and on
            other CPUs (emulated bfloat16 is slower than float32). Off by default: 1.4x faster
            training steps for ``small`` on the 2-core AMD EPYC here and the same validation Dice at
            500 iterations, but not yet validated at the default demo's 1,500 (docs/ablation.md, "Training
            throughput").
        augmentation: ``light`` (flips, intensity jitter) or ``strong`` (also rotation / zoom,
            blur and noise): :mod:`CovidGANSegLib.seg.augmentation`. Checkpoints written before
            this field existed load with ``light``, the augmentation they were trained with.
    """

    name: str = "small"
    image_size: int = 128
    in_channels: int = 1
    encoder_channels: tuple[int, ...] = (8, 16, 32, 64, 128)
    encoder_blocks: tuple[int, ...] = (1, 1, 1, 1, 1)
    stem_stride: int = 1
    full_res_channels: int = 0
    hidden_size: int = 192
    num_heads: int = 4
    mlp_dim: int = 512
    num_layers: int = 4
    dropout: float = 0.1
    attention_dropout: float = 0.0
    decoder_channels: tuple[int, ...] = (64, 32, 16, 8)
    unet_channels: tuple[int, ...] = (8, 16, 32, 64, 128)
    projection_dim: int = 128
    # training
    learning_rate: float = 3e-4
    lr_step: int = 1000
    lr_gamma: float = 0.9
    batch_size: int = 8
    iterations: int = 1000
    pretrain_fraction: float = 0.2
    tau_init: float = 0.06
    beta: float = 1.0
    fn_mode: str = "soft"
    loss_region: str = "lung"
    loss_band_mm: float = 0.0
    weight_sensitivity: float = 1.0
    weight_mse: float = 1.0
    weight_contrastive: float = 0.1
    positive_fraction: float = 0.5
    val_fraction: float = 0.2
    val_every: int = 100
    checkpoint_every: int = 200
    log_every: int = 10
    cpu_bf16: bool = False
    augmentation: str = "light"

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.image_size % DOWNSAMPLE:
            raise ValueError(f"image_size must be a positive multiple of {DOWNSAMPLE}, got {self.image_size}")
        if self.in_channels < 1 or self.in_channels % 2 == 0:
            raise ValueError(f"in_channels (the slice and its neighbours on both sides, 2.5D) must be odd and >= 1, got {self.in_channels}")
        if len(self.encoder_channels) != 5 or min(self.encoder_channels) < 1:
            raise ValueError(f"encoder_channels needs 5 positive widths (stem, 1/2 .. 1/16), got {self.encoder_channels}")
        if len(self.encoder_blocks) != 5 or min(self.encoder_blocks) < 1:
            raise ValueError(f"encoder_blocks needs 5 counts >= 1, got {self.encoder_blocks}")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {self.stem_stride}")
        if self.full_res_channels < 0 or (self.full_res_channels and self.stem_stride != 2):
            raise ValueError(f"full_res_channels must be >= 0 and needs stem_stride 2, got {self.full_res_channels}")
        if self.stem_stride == 2 and self.encoder_blocks[0] != 1:
            raise ValueError(f"with stem_stride 2 the stem is one convolution: encoder_blocks[0] must be 1, got {self.encoder_blocks[0]}")
        if len(self.decoder_channels) != 4 or min(self.decoder_channels) < 1:
            raise ValueError(f"decoder_channels needs 4 positive widths (1/8 .. 1/1), got {self.decoder_channels}")
        if len(self.unet_channels) != 5 or min(self.unet_channels) < 1:
            raise ValueError(f"unet_channels needs 5 positive widths (1/1 .. 1/16), got {self.unet_channels}")
        if self.hidden_size < 1 or self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a positive multiple of num_heads ({self.num_heads})")
        if self.mlp_dim < 1 or self.num_layers < 1 or self.projection_dim < 1:
            raise ValueError("mlp_dim, num_layers and projection_dim must be >= 1")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError("dropout rates must be in [0, 1)")
        if self.learning_rate <= 0 or self.lr_step < 1 or not 0 < self.lr_gamma <= 1:
            raise ValueError("learning_rate > 0, lr_step >= 1 and 0 < lr_gamma <= 1 are required")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (the contrastive loss needs pairs), got {self.batch_size}")
        if self.iterations < 1 or not 0.0 <= self.pretrain_fraction < 1.0:
            raise ValueError("iterations >= 1 and 0 <= pretrain_fraction < 1 are required")
        if self.tau_init <= 0 or self.beta < 0:
            raise ValueError("tau_init > 0 and beta >= 0 are required")
        if self.fn_mode not in ("soft", "hard"):
            raise ValueError(f"fn_mode must be 'soft' or 'hard', got {self.fn_mode!r}")
        if self.loss_region not in ("lung", "all"):
            raise ValueError(f"loss_region must be 'lung' or 'all', got {self.loss_region!r}")
        if self.loss_band_mm < 0 or (self.loss_band_mm > 0 and self.loss_region != "lung"):
            raise ValueError(f"loss_band_mm must be >= 0 and needs loss_region 'lung', got {self.loss_band_mm} ({self.loss_region!r})")
        if min(self.weight_sensitivity, self.weight_mse, self.weight_contrastive) < 0:
            raise ValueError("loss weights must be >= 0")
        if not 0.0 <= self.positive_fraction <= 1.0 or not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("positive_fraction must be in [0, 1] and val_fraction in [0, 1)")
        if min(self.val_every, self.checkpoint_every, self.log_every) < 1:
            raise ValueError("val_every, checkpoint_every and log_every must be >= 1")
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {self.augmentation!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclass_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SegConfig":
        return dataclass_from_dict(cls, data, "segmenter configuration keys")

    def replace(self, **changes: Any) -> "SegConfig":
        return dataclasses.replace(self, **changes)


#: ``paper``: the seed's TransUNet size (4 heads, MLP 512, 8 blocks, about 67 M parameters; Adam
#: 5e-5) with the original TransUNet's cascaded-upsampler widths (256, 128, 64, 16) (Chen et al.
#: 2021) and a narrow full-resolution stem: one 32-wide residual block at 1/1 whose output feeds the
#: encoder (as in ``small``) and is the 1/1 skip; the first stride-2 block takes it to 64 at 1/2.
#: The parameters sit where they cost least, at 1/16 (a 1472-wide last stage). 7.6 GMAC per
#: 128 x 128 slice, against 17.4 for the first version (64-wide full-resolution stem, decoder
#: 512/256/128/64), 7.7 for the second (7 x 7 stride-2 stem with a 32-wide full-resolution block
#: beside it as the 1/1 skip) and 8.1 for the seed's implementation. ``benchmarks/bench_transunet.py``
#: times them (``paper-v1``, ``paper-v2``) and compares the stem layouts at equal training
#: (``--dice-check``; :class:`CNNEncoder`).
#: ``small``: CPU-sized (about 2.2 M parameters TransUNet, 0.4 M U-Net), Adam 3e-4 so that a few
#: hundred CPU iterations learn something (the paper's 5e-5 is for 10^4 GPU iterations; 1e-3 made
#: the contrastive phase collapse: all projections equal, loss stuck at log((B - 1) / (B/2 - 1))).
#: With synthetic-lesion supervision (exact labels) ``small`` trains end to end from the first
#: iteration with plain BCE (eq. 5 with beta = 0, no MSE term): on the validation cohort this gave
#: Dice 0.446 (mild cases 0.120) against 0.435 (0.043) for the paper's schedule (20 % contrastive
#: phase 1, eq. 5 with beta = 1 plus MSE) at the same 500 iterations (docs/ablation.md). The
#: ``paper`` configuration keeps the paper's schedule and losses.
#: ``tiny``: unit tests only (same learning rate as ``small``).
SEG_CONFIGS: dict[str, SegConfig] = {
    "paper": SegConfig(
        name="paper",
        encoder_channels=(32, 64, 128, 256, 1472),
        encoder_blocks=(1, 1, 2, 1, 1),
        hidden_size=768,
        num_heads=4,
        mlp_dim=512,
        num_layers=8,
        decoder_channels=(256, 128, 64, 16),
        unet_channels=(32, 64, 128, 256, 512),
        learning_rate=5e-5,
        batch_size=8,
        iterations=10000,
        val_every=250,
        checkpoint_every=500,
    ),
    "small": SegConfig(name="small", pretrain_fraction=0.0, beta=0.0, weight_mse=0.0),
    "tiny": SegConfig(
        name="tiny",
        image_size=32,
        encoder_channels=(4, 8, 8, 16, 16),
        hidden_size=16,
        num_heads=2,
        mlp_dim=32,
        num_layers=1,
        dropout=0.0,
        decoder_channels=(8, 8, 4, 4),
        unet_channels=(4, 8, 8, 16, 16),
        projection_dim=8,
        batch_size=4,
        iterations=20,
        val_every=5,
        checkpoint_every=5,
        log_every=1,
    ),
}


def get_seg_config(name_or_path: str | Path) -> SegConfig:
    """A named configuration (``paper``, ``small``, ``tiny``) or a JSON file.

    The JSON may list only some keys; the others come from ``"base"`` (default ``small``).
    """
    key = str(name_or_path)
    if key in SEG_CONFIGS:
        return SEG_CONFIGS[key]
    path = Path(key)
    if not path.is_file():
        raise ValueError(f"unknown segmenter configuration {key!r}: use one of {sorted(SEG_CONFIGS)} or a JSON file")
    data = json.loads(path.read_text())
    base = SEG_CONFIGS.get(data.pop("base", "small"))
    if base is None:
        raise ValueError(f"{path}: 'base' must be one of {sorted(SEG_CONFIGS)}")
    merged = {**base.to_dict(), "name": path.stem, **data}
    return SegConfig.from_dict(merged)


def check_input(x: torch.Tensor, in_channels: int, multiple: int = DOWNSAMPLE) -> None:
    """Raise ``ValueError`` unless ``x`` is ``(B, in_channels, H, W)`` with H, W multiples of 16."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    if x.shape[1] != in_channels:
        raise ValueError(f"expected {in_channels} input channel(s), got {x.shape[1]}")
    if x.shape[2] % multiple or x.shape[3] % multiple or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"height and width must be positive multiples of {multiple}, got {tuple(x.shape[2:])}")


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 8 groups where the width allows, else fewer (batch-size independent)."""
    for groups in (8, 4, 2, 1):
        if channels % groups == 0:
            return nn.GroupNorm(groups, channels)
    return nn.GroupNorm(1, channels)  # pragma: no cover


def conv_norm_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), group_norm(cout), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """Two 3 x 3 convolutions with a (projected) identity shortcut; ``stride`` 2 halves the size."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = group_norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), group_norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)), inplace=True)
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class CNNEncoder(nn.Module):
    """Stem and four residual stages down to 1/16.

    ``stem_stride`` 1: a residual block at full resolution, then four stride-2 stages; the skips
    are at 1/1, 1/2, 1/4 and 1/8. ``stem_stride`` 2: a 7 x 7 stride-2 convolution + norm + ReLU
    (the ResNet stem used by TransUNet, Chen et al. 2021, without its max-pool), a stride-1 stage
    at 1/2 and three stride-2 stages; the skips are at 1/2, 1/4 and 1/8, and the 1/1 skip, where
    TransUNet's cascaded upsampler has none, is either the input image itself (free) or, with
    ``full_res_channels``, one narrow residual block on the input at full resolution. In the
    equal-budget check on phantoms at ``small`` size (``benchmarks/bench_transunet.py
    --dice-check``) the full-resolution stem led: at 300 iterations (two training seeds) the
    stride-2 stem alone scored 0.56 against 0.67, with an 8-wide full-resolution block 0.58 and
    0.64; at 600 iterations and learning rate 1e-3 (eight seeds) 0.693 with the block against 0.730
    (lower in seven seeds of eight), and a stem a quarter as wide as the next stage 0.702.
    ``paper`` therefore keeps the full-resolution stem, 32 wide (half the next stage, as in
    ``small`` and the first ``paper``), instead.

    Returns the 1/16 feature map and the four skips at 1/1, 1/2, 1/4, 1/8 (finest first).
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...], blocks: tuple[int, ...], stem_stride: int = 1,
                 full_res_channels: int = 0) -> None:
        super().__init__()
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        self.stem_stride = stem_stride
        self.in_channels = in_channels
        # with a stride-2 stem: a light full-resolution block for the 1/1 skip, or the input itself
        self.full_res: nn.Module | None = None
        if full_res_channels and stem_stride == 2:
            self.full_res = ResidualBlock(in_channels, full_res_channels)
        stages = []
        cin = in_channels
        for i, (cout, n) in enumerate(zip(channels, blocks)):
            if i == 0 and stem_stride == 2:
                stem = nn.Conv2d(cin, cout, 7, stride=2, padding=3, bias=False)  # (B, C0, H/2, W/2)
                stages.append(nn.Sequential(stem, group_norm(cout), nn.ReLU(inplace=True)))
            else:
                stride = 1 if i == 0 or (i == 1 and stem_stride == 2) else 2
                layers = [ResidualBlock(cin, cout, stride=stride)]
                layers += [ResidualBlock(cout, cout) for _ in range(n - 1)]
                stages.append(nn.Sequential(*layers))
            cin = cout
        self.stages = nn.ModuleList(stages)

    @property
    def skip_channels(self) -> list[int]:
        """Widths of the skips at 1/1, 1/2, 1/4, 1/8 (with ``stem_stride`` 2 the first is the input's)."""
        widths = [self._width(stage) for stage in self.stages[:-1]]
        if self.stem_stride == 1:
            return widths
        return [self.in_channels if self.full_res is None else self._width(self.full_res), *widths[1:]]

    @staticmethod
    def _width(stage: nn.Module) -> int:
        return [m for m in stage.modules() if isinstance(m, nn.Conv2d)][-1].out_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        if self.stem_stride == 2:  # the 1/1 skip: (B, full_res_channels or in_channels, H, W)
            skips.append(x if self.full_res is None else self.full_res(x))
        for i, stage in enumerate(self.stages[:-1]):
            x = stage(x)
            if i > 0 or self.stem_stride == 1:
                skips.append(x)
        return self.stages[-1](x), skips


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention: softmax(Q K^T / sqrt(d_head)) V per head, then an output projection."""

    def __init__(self, hidden: int, heads: int, attention_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.attention_dropout = attention_dropout
        self.drop = nn.Dropout(dropout)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = self.qkv(x)  # (B, N, 3 * hidden)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)  # each (B, heads, N, d)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        # default scale is 1 / sqrt(d_head) (eq. 1 of Vaswani et al.)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attention_dropout if self.training else 0.0)
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, N, hidden)
        return self.drop(self.proj(out))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: x + MSA(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, hidden: int, heads: int, mlp_dim: int, dropout: float = 0.0, attention_dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6)
        self.attn = MultiHeadSelfAttention(hidden, heads, attention_dropout, dropout)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, hidden), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Upsample x2 (bilinear), concatenate the skip, two 3 x 3 conv-norm-ReLU."""

    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.conv1 = conv_norm_relu(cin + skip, cout)
        self.conv2 = conv_norm_relu(cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)  # (B, cin + skip, H, W)
        return self.conv2(self.conv1(x))


class ProjectionHead(nn.Module):
    """MLP to ``dim`` features, L2-normalised (for the contrastive loss, eq. 4)."""

    def __init__(self, cin: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cin, cin), nn.GELU(), nn.Linear(cin, dim))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(pooled), dim=1)


class TransUNet(nn.Module):
    """TransUNet 2D: ``forward(x)`` maps ``(B, 1, H, W)`` in [0, 1] to ``(B, 1, H, W)`` logits."""

    arch = "transunet"

    def __init__(self, config: SegConfig = SEG_CONFIGS["small"]) -> None:
        super().__init__()
        if not isinstance(config, SegConfig):
            raise ValueError(f"config must be a SegConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.encoder = CNNEncoder(c.in_channels, c.encoder_channels, c.encoder_blocks, c.stem_stride, c.full_res_channels)
        self.patch_embed = nn.Conv2d(c.encoder_channels[-1], c.hidden_size, kernel_size=1)
        self.grid = c.image_size // DOWNSAMPLE
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, c.hidden_size))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.embed_drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(c.hidden_size, c.num_heads, c.mlp_dim, c.dropout, c.attention_dropout) for _ in range(c.num_layers)
        )
        self.norm = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.conv_more = conv_norm_relu(c.hidden_size, c.encoder_channels[-1])
        skips = list(reversed(self.encoder.skip_channels))  # widths at 1/8, 1/4, 1/2, 1/1
        cins = [c.encoder_channels[-1], *c.decoder_channels[:-1]]
        self.decoder = nn.ModuleList(DecoderBlock(ci, s, co) for ci, s, co in zip(cins, skips, c.decoder_channels))
        self.head = nn.Conv2d(c.decoder_channels[-1], 1, kernel_size=3, padding=1)
        self.projection = ProjectionHead(c.hidden_size, c.projection_dim)

    def position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        """Position embeddings for a ``gh x gw`` token grid (interpolated if not the default)."""
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        pos = rearrange(self.pos_embed, "1 (gh gw) c -> 1 c gh gw", gh=self.grid)  # (1, hidden, g, g)
        pos = F.interpolate(pos, size=(gh, gw), mode="bilinear", align_corners=False)
        return rearrange(pos, "1 c gh gw -> 1 (gh gw) c")  # (1, gh * gw, hidden)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """CNN + transformer encoder: ``((B, hidden, H/16, W/16) tokens map, skips finest first)``."""
        check_input(x, self.config.in_channels)
        feat, skips = self.encoder(x)  # (B, C16, H/16, W/16)
        gh, gw = feat.shape[2:]
        tokens = rearrange(self.patch_embed(feat), "b c gh gw -> b (gh gw) c")  # (B, N, hidden)
        tokens = self.embed_drop(tokens + self.position_embedding(gh, gw))
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return rearrange(tokens, "b (gh gw) c -> b c gh gw", gh=gh), skips  # (B, hidden, gh, gw)

    def decode(self, encoded: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Cascaded upsampler: 1/16 -> 1/8, 1/4, 1/2, 1/1, each stage with its skip."""
        x = self.conv_more(encoded)  # (B, C16, H/16, W/16)
        for block, skip in zip(self.decoder, reversed(skips)):
            x = block(x, skip)
        return self.head(x)  # (B, 1, H, W)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Mean-pooled encoder (transformer) features, ``(B, hidden)``."""
        encoded, _ = self.encode(x)
        return encoded.mean(dim=(2, 3))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised projections of the pooled encoder features, ``(B, projection_dim)``."""
        return self.projection(self.features(x))

    def forward_with_projection(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and projections from one encoder pass (phase-2 training)."""
        encoded, skips = self.encode(x)
        return self.decode(encoded, skips), self.projection(encoded.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encoded, skips = self.encode(x)
        return self.decode(encoded, skips)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters trained in phase 1 (encoder, embeddings, transformer, projection head)."""
        modules = [self.encoder, self.patch_embed, self.blocks, self.norm, self.projection]
        return [self.pos_embed] + [p for m in modules for p in m.parameters()]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
