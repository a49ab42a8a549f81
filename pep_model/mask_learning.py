"""Mask learning (paper Sec. 3.5): the general feature B and masks M_ind = I_ind (x) B (Eq. 6).

B fuses the FPN levels P2..P5 at `mask_stride` (SOLOv2's mask feature branch: per-level
conv, upsample, sum) and adds two coordinate channels. "Convolved with B" is read as a
descriptor-conditioned convolution (CondInst): each descriptor generates the weights of a
small stack of 1x1 convs that runs on a narrow projection of B concatenated with each
pixel's coordinates relative to the descriptor (`DynamicMaskHead`, the default). The first
reading, one 1x1 product of the descriptor with B (`LinearMaskHead`), cannot put a compact
mask on one of several look-alike neighbours; it is kept to reproduce the old numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pep_model.perceiving import add_coordinates, conv_gn_relu, relative_coordinates


class MaskFeature(nn.Module):
    """The general feature branch B.

    Args:
        in_channels: FPN width.
        channels: mask_channels (output width; equal to the descriptor width for the
            linear head).
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


class MaskWindow:
    """Windows of one size on an h x w map, one per descriptor (`model.mask_window`).

    A descriptor of a level with stride s describes an object of about 12 s pixels or less
    (the scale ranges bound sqrt(box area), so a long thin object can reach past its
    window), so its mask is computed and trained only in a square of `side` cells around its
    location (centred on its cell; with an even side one cell more lies above and left),
    clamped inside the map; outside it the mask is background. This is
    the "mask stride each object needs" lever: the small objects' masks cost a window, not
    the whole image, so they can be predicted at a finer stride.

    Attributes:
        top, left: N int64 cells of each window's first row and column.
        height, width: the windows' size in cells (at most the map's).
    """

    def __init__(self, top: Tensor, left: Tensor, height: int, width: int) -> None:
        self.top, self.left, self.height, self.width = top, left, height, width

    @classmethod
    def around(
        cls, locations: Tensor, side: int, map_height: int, map_width: int, map_stride: int
    ) -> MaskWindow:
        """`side` x `side` cell windows centred on N x 2 pixel locations of a map."""
        height, width = min(side, map_height), min(side, map_width)
        row = torch.div(locations[:, 1], map_stride, rounding_mode="floor").long()
        col = torch.div(locations[:, 0], map_stride, rounding_mode="floor").long()
        top = (row - height // 2).clamp(0, map_height - height)
        left = (col - width // 2).clamp(0, map_width - width)
        return cls(top, left, height, width)

    def scaled(self, factor: int) -> MaskWindow:
        """The same windows on a map `factor` times finer (mask_upsample)."""
        return MaskWindow(
            self.top * factor, self.left * factor, self.height * factor, self.width * factor
        )

    def _cells(self) -> tuple[Tensor, Tensor]:
        rows = self.top[:, None] + torch.arange(self.height, device=self.top.device)
        cols = self.left[:, None] + torch.arange(self.width, device=self.top.device)
        return rows, cols  # N x height, N x width

    def crop_shared(self, feature: Tensor) -> Tensor:
        """Each window of one c x h x w map: N x c x height x width."""
        rows, cols = self._cells()
        return feature[:, rows[:, :, None], cols[:, None, :]].transpose(0, 1)

    def crop(self, maps: Tensor, index: Tensor | None = None) -> Tensor:
        """Each window of its own map: maps[index[i]] (maps[i] without `index`), M x h x w
        -> N x height x width."""
        rows, cols = self._cells()
        if index is None:
            index = torch.arange(maps.shape[0], device=maps.device)
        return maps[index[:, None, None], rows[:, :, None], cols[:, None, :]]

    def paste(self, windows: Tensor, out: Tensor, index: Tensor | None = None) -> Tensor:
        """Write N x height x width window values into maps out[index[i]] (out[i] without
        `index`) of an M x h x w tensor, in place; returns `out`."""
        rows, cols = self._cells()
        if index is None:
            index = torch.arange(windows.shape[0], device=windows.device)
        out[index[:, None, None], rows[:, :, None], cols[:, None, :]] = windows.to(out.dtype)
        return out

    def relative_coordinates(
        self, locations: Tensor, strides: Tensor, map_stride: int, scale: float
    ) -> Tensor:
        """Window cells' offsets from their descriptor, as `relative_coordinates`:
        N x 2 x (height * width) (dx, dy) in units of scale x the descriptor's level stride."""
        rows, cols = self._cells()
        norm = (strides * scale)[:, None, None]
        dx = (cols * map_stride + map_stride // 2)[:, None, :] - locations[:, None, :1]
        dy = (rows * map_stride + map_stride // 2)[:, :, None] - locations[:, None, 1:]
        dx = (dx / norm).expand(-1, self.height, -1)
        dy = (dy / norm).expand(-1, -1, self.width)
        return torch.stack([dx, dy], dim=1).flatten(2)


def mask_logits(descriptors: Tensor, feature: Tensor) -> Tensor:
    """Eq. 6 for one image: N x D descriptors, D x h x w feature -> N x h x w logits."""
    d, h, w = feature.shape
    return (descriptors @ feature.reshape(d, h * w)).view(-1, h, w)


def parse_dynamic_params(
    params: Tensor, weight_nums: list[int], bias_nums: list[int], channels: list[int]
) -> tuple[list[Tensor], list[Tensor]]:
    """Split N x P generated numbers into per-layer weights (N x out x in) and biases
    (N x out x 1); `channels` = [in, hidden..., 1] of the conv stack."""
    n = params.shape[0]
    chunks = torch.split(params, weight_nums + bias_nums, dim=1)
    layers = len(weight_nums)
    weights = [
        chunks[i].reshape(n, channels[i + 1], channels[i]) for i in range(layers)
    ]
    biases = [chunks[layers + i].reshape(n, channels[i + 1], 1) for i in range(layers)]
    return weights, biases


class DynamicMaskHead(nn.Module):
    """Eq. 6 as a descriptor-conditioned conv stack (CondInst's dynamic mask head).

    A linear `controller` turns each descriptor into the weights and biases of
    `num_layers` 1x1 convs (ReLU between them, `channels` wide, one output). They run on
    [B projected to `channels`; the pixels' coordinates relative to the descriptor,
    divided by `relative_scale` x its level stride], all descriptors of an image at once
    as batched matmuls.

    Args:
        descriptor_dim: D.
        feature_channels: C_B, the width of the general feature B.
        channels: width of the projection of B and of the hidden layers (CondInst: 8).
        num_layers: 1x1 convs in the stack (CondInst: 3).
        relative_scale: relative coordinates are in units of this many level strides
            (about one object of that level).
    """

    def __init__(
        self,
        descriptor_dim: int,
        feature_channels: int,
        channels: int = 8,
        num_layers: int = 3,
        relative_scale: float = 8.0,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"model.mask_head_layers must be >= 1, got {num_layers}")
        self.relative_scale = relative_scale
        self.channels = [channels + 2] + [channels] * (num_layers - 1) + [1]
        self.weight_nums = [i * o for i, o in zip(self.channels[:-1], self.channels[1:])]
        self.bias_nums = list(self.channels[1:])
        self.project = nn.Conv2d(feature_channels, channels, 1)
        self.controller = nn.Linear(descriptor_dim, sum(self.weight_nums) + sum(self.bias_nums))
        nn.init.normal_(self.controller.weight, std=0.01)
        nn.init.zeros_(self.controller.bias)

    @property
    def num_params(self) -> int:
        """Numbers generated per descriptor (169 for 3 layers of 8)."""
        return self.controller.out_features

    def mask_input(self, general: Tensor) -> Tensor:
        """B x C_B x h x w -> B x channels x h x w (computed once per batch)."""
        return self.project(general)

    def forward(
        self, descriptors: Tensor, locations: Tensor, strides: Tensor, feature: Tensor,
        feature_stride: int, window: MaskWindow | None = None, frozen: bool = False,
    ) -> Tensor:
        """Mask logits of one image's descriptors, on the whole map or inside their windows.

        Args:
            descriptors: N x D; locations: N x 2 pixel (x, y); strides: N level strides.
            feature: channels x h x w, this image's `mask_input`, at `feature_stride`.
            window: each descriptor's window on the map (all of one size), or None.
            frozen: the controller's weights enter detached (the masks train the
                descriptors only, not this head).
        Returns:
            N x h x w logits, or N x window.height x window.width.
        """
        c, h, w = feature.shape
        n = descriptors.shape[0]
        if window is not None:
            h, w = window.height, window.width
        if n == 0:
            return feature.new_zeros((0, h, w))
        controller = self.controller
        params = (
            F.linear(descriptors, controller.weight.detach(), controller.bias.detach())
            if frozen else controller(descriptors)
        )
        weights, biases = parse_dynamic_params(
            params, self.weight_nums, self.bias_nums, self.channels
        )
        if window is None:
            rel = relative_coordinates(
                locations, strides, h, w, feature_stride, self.relative_scale
            ).to(feature.dtype)  # N x 2 x hw
            # first layer: the shared feature's part once per weight, the coordinates' per pixel
            x = weights[0][:, :, :c] @ feature.reshape(c, h * w)  # N x out x hw
        else:
            rel = window.relative_coordinates(
                locations, strides, feature_stride, self.relative_scale
            ).to(feature.dtype)
            x = torch.bmm(weights[0][:, :, :c], window.crop_shared(feature).flatten(2))
        x = x + weights[0][:, :, c:] @ rel + biases[0]
        for weight, bias in zip(weights[1:], biases[1:]):
            x = torch.baddbmm(bias, weight, F.relu(x))  # N x out x hw
        return x.view(n, h, w)


class LinearMaskHead(nn.Module):
    """Eq. 6 as one 1x1 product of the descriptor with B (needs C_B = D). The degenerate
    reading, kept (`model.mask_head: linear`) to reproduce the earlier measurements."""

    def mask_input(self, general: Tensor) -> Tensor:
        return general

    def forward(
        self, descriptors: Tensor, locations: Tensor, strides: Tensor, feature: Tensor,
        feature_stride: int, window: MaskWindow | None = None, frozen: bool = False,
    ) -> Tensor:
        """N x D descriptors, D x h x w B -> N x h x w logits (locations unused; no
        parameters, so `frozen` changes nothing)."""
        if window is not None:
            raise ValueError("model.mask_window needs model.mask_head=dynamic")
        return mask_logits(descriptors, feature)


def dice_loss(logits: Tensor, targets: Tensor, eps: float = 1.0) -> Tensor:
    """Per-mask Dice loss: N x h x w logits and soft targets -> N."""
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    inter = (probs * targets).sum(1)
    return 1 - (2 * inter + eps) / ((probs * probs).sum(1) + (targets * targets).sum(1) + eps)


def per_mask_loss(logits: Tensor, targets: Tensor, kind: str = "bce") -> Tensor:
    """Eq. 7 for each descriptor: N x h x w logits and GT masks in [0, 1] (area-downsampled
    to the masks' resolution) -> N. kind: "bce" (per-pixel cross-entropy averaged over the
    mask, the paper), "dice", or "bce_dice" (their sum)."""
    if kind not in ("bce", "dice", "bce_dice"):
        raise ValueError(f"model.mask_loss: unknown {kind!r}; use bce, dice or bce_dice")
    loss = logits.new_zeros(logits.shape[0])
    if kind in ("bce", "bce_dice"):
        loss = loss + F.binary_cross_entropy_with_logits(
            logits, targets, reduction="none"
        ).flatten(1).mean(1)
    if kind in ("dice", "bce_dice"):
        loss = loss + dice_loss(logits, targets)
    return loss


def downsample_masks(masks: Tensor, stride: int) -> Tensor:
    """N x H x W binary masks (H, W multiples of stride) -> N x H/s x W/s area fractions."""
    if masks.shape[0] == 0:
        h, w = masks.shape[-2] // stride, masks.shape[-1] // stride
        return masks.new_zeros((0, h, w), dtype=torch.float32)
    return F.avg_pool2d(masks[:, None].float(), stride)[:, 0]
