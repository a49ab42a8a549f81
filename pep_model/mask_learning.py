"""Mask learning (paper Sec. 3.5): the general feature B and masks M_ind = I_ind (x) B (Eq. 6).

B fuses the FPN levels P2..P5 at `mask_stride` (SOLOv2's mask feature branch: per-level
conv, upsample, sum), adds two coordinate channels and maps to `mask_channels` (= D, so a
descriptor is a 1x1 dynamic conv kernel over B and all masks are one matrix product).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pep_model.perceiving import add_coordinates, conv_gn_relu


class MaskFeature(nn.Module):
    """The general feature branch B.

    Args:
        in_channels: FPN width.
        channels: mask_channels (output width, equal to the descriptor width).
        mask_stride: output stride (4 or 8).
        level_strides: strides of the fused FPN levels (those <= 32 of P2..P6).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        mask_stride: int = 4,
        level_strides: tuple[int, ...] = (4, 8, 16, 32),
    ) -> None:
        super().__init__()
        self.mask_stride = mask_stride
        self.level_strides = level_strides
        self.lateral = nn.ModuleList(conv_gn_relu(in_channels, channels) for _ in level_strides)
        self.fuse = conv_gn_relu(channels + 2, channels)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        """features: FPN levels (first len(level_strides) used) -> B: B x C_B x H/ms x W/ms."""
        base, first = features[0].shape[-2:], self.level_strides[0]
        size = (base[0] * first // self.mask_stride, base[1] * first // self.mask_stride)
        fused = None
        for feature, stride, lateral in zip(features, self.level_strides, self.lateral):
            if stride < self.mask_stride:  # pool first: the lateral conv runs at mask_stride
                feature = F.avg_pool2d(feature, self.mask_stride // stride)
            x = lateral(feature)
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            fused = x if fused is None else fused + x
        return self.out(self.fuse(add_coordinates(fused, self.mask_stride)))


def mask_logits(descriptors: Tensor, feature: Tensor) -> Tensor:
    """Eq. 6 for one image: N x D descriptors, D x h x w feature -> N x h x w logits."""
    d, h, w = feature.shape
    return (descriptors @ feature.reshape(d, h * w)).view(-1, h, w)


def dice_loss(logits: Tensor, targets: Tensor, eps: float = 1.0) -> Tensor:
    """Per-mask Dice loss: N x h x w logits and soft targets -> N."""
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    inter = (probs * targets).sum(1)
    return 1 - (2 * inter + eps) / ((probs * probs).sum(1) + (targets * targets).sum(1) + eps)


def mask_loss(logits: Tensor, targets: Tensor, kind: str = "bce") -> Tensor:
    """Eq. 7 averaged over the N_all descriptors.

    Args:
        logits: N x h x w predicted mask logits; targets: N x h x w GT masks in [0, 1]
            (area-downsampled to B's resolution).
        kind: "bce" (per-pixel cross-entropy, the paper), "dice", or "bce_dice" (sum).
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets)
    if kind == "dice":
        return dice_loss(logits, targets).mean()
    if kind == "bce_dice":
        return F.binary_cross_entropy_with_logits(logits, targets) + dice_loss(
            logits, targets
        ).mean()
    raise ValueError(f"model.mask_loss: unknown {kind!r}; use bce, dice or bce_dice")


def downsample_masks(masks: Tensor, stride: int) -> Tensor:
    """N x H x W binary masks (H, W multiples of stride) -> N x H/s x W/s area fractions."""
    if masks.shape[0] == 0:
        h, w = masks.shape[-2] // stride, masks.shape[-1] // stride
        return masks.new_zeros((0, h, w), dtype=torch.float32)
    return F.avg_pool2d(masks[:, None].float(), stride)[:, 0]
