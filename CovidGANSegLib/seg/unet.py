"""The predecessor's 2D U-Net baseline (Shabani et al. 2022), with the TransUNet's interface.

A dense U-Net-like network: each level is a small dense block (two 3 x 3 conv-norm-ReLU layers
whose outputs are concatenated with their input, then a 1 x 1 transition), four max-pool
downsamplings to a 1/16 bottleneck, bilinear upsampling with skip connections, one channel of
logits. ``encode`` gives the bottleneck features; the projection head on their global average
feeds the contrastive loss, as in the predecessor (128-unit projection head). Widths come from
``SegConfig.unet_channels``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from CovidGANSegLib.seg.transunet import SEG_CONFIGS, ProjectionHead, SegConfig, check_input, conv_norm_relu, group_norm


class DenseBlock(nn.Module):
    """x -> [x, f1(x), f2([x, f1(x)])] -> 1 x 1 conv to ``cout`` channels."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        growth = max(cout // 2, 1)
        self.layer1 = conv_norm_relu(cin, growth)
        self.layer2 = conv_norm_relu(cin + growth, growth)
        self.transition = nn.Sequential(nn.Conv2d(cin + 2 * growth, cout, 1, bias=False), group_norm(cout), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.layer1(x)
        f2 = self.layer2(torch.cat([x, f1], dim=1))  # (B, cin + growth, H, W) in
        return self.transition(torch.cat([x, f1, f2], dim=1))  # (B, cin + 2 growth, H, W) in


class UNet2D(nn.Module):
    """2D dense U-Net: ``forward(x)`` maps ``(B, 1, H, W)`` to ``(B, 1, H, W)`` logits."""

    arch = "unet"

    def __init__(self, config: SegConfig = SEG_CONFIGS["small"]) -> None:
        super().__init__()
        if not isinstance(config, SegConfig):
            raise ValueError(f"config must be a SegConfig, got {type(config).__name__}")
        self.config = config
        ch = config.unet_channels
        cin = config.in_channels
        self.down = nn.ModuleList()
        for c in ch:
            self.down.append(DenseBlock(cin, c))
            cin = c
        self.up = nn.ModuleList(DenseBlock(ch[i + 1] + ch[i], ch[i]) for i in reversed(range(len(ch) - 1)))
        self.head = nn.Conv2d(ch[0], 1, kernel_size=1)
        self.projection = ProjectionHead(ch[-1], config.projection_dim)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Bottleneck features ``(B, C, H/16, W/16)`` and skips at 1/1 .. 1/8 (finest first)."""
        check_input(x, self.config.in_channels)
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        return skips[-1], skips[:-1]

    def decode(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for block, skip in zip(self.up, reversed(skips)):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))  # (B, C_up + C_skip, H, W)
        return self.head(x)  # (B, 1, H, W)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled bottleneck features, ``(B, C)``."""
        return self.encode(x)[0].mean(dim=(2, 3))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.features(x))

    def forward_with_projection(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bottleneck, skips = self.encode(x)
        return self.decode(bottleneck, skips), self.projection(bottleneck.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bottleneck, skips = self.encode(x)
        return self.decode(bottleneck, skips)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters trained in phase 1 (down path and projection head)."""
        return [p for m in (self.down, self.projection) for p in m.parameters()]


def build_segmenter(arch: str, config: SegConfig) -> nn.Module:
    """``TransUNet`` or ``UNet2D`` by name."""
    from CovidGANSegLib.seg.transunet import TransUNet

    if arch == "transunet":
        return TransUNet(config)
    if arch == "unet":
        return UNet2D(config)
    raise ValueError(f"unknown segmenter architecture {arch!r}: use 'transunet' or 'unet'")
