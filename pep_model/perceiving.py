"""Semantics perceiving (paper Sec. 3.2): per-level classification P_s and descriptors D_s.

Also holds the geometry shared by the other components (cell centres, coordinate
channels, centre regions) and the pure target assignment `perceive_targets` (G_P_s).

Cell (i, j) of a map with stride r stands for the input pixel (j*r + r//2, i*r + r//2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Coordinate channels are absolute pixel positions / COORD_SCALE, so a pixel gets the same
# coordinate whatever the batch padding (unlike [-1, 1] over the padded map).
COORD_SCALE = 512.0


def cell_centres(height: int, width: int, stride: int, device: torch.device | None = None):
    """Pixel coordinates of the cell centres of an h x w map: (xs [w], ys [h]), float."""
    xs = torch.arange(width, device=device, dtype=torch.float32) * stride + stride // 2
    ys = torch.arange(height, device=device, dtype=torch.float32) * stride + stride // 2
    return xs, ys


def coordinate_grid(height: int, width: int, stride: int, device=None) -> Tensor:
    """2 x h x w CoordConv channels (x, y) = absolute pixel position / COORD_SCALE."""
    xs, ys = cell_centres(height, width, stride, device)
    grid_y, grid_x = torch.meshgrid(ys / COORD_SCALE, xs / COORD_SCALE, indexing="ij")
    return torch.stack([grid_x, grid_y])


def add_coordinates(feature: Tensor, stride: int) -> Tensor:
    """Concatenate the 2 coordinate channels: B x C x h x w -> B x (C+2) x h x w."""
    b, _, h, w = feature.shape
    coords = coordinate_grid(h, w, stride, feature.device).to(feature.dtype)
    return torch.cat([feature, coords.unsqueeze(0).expand(b, -1, -1, -1)], dim=1)


def relative_coordinates(
    locations: Tensor, strides: Tensor, height: int, width: int, feature_stride: int,
    scale: float,
) -> Tensor:
    """Each pixel's offset from each descriptor's location, in units of scale x its level
    stride: N x 2 pixel (x, y) locations, N strides -> N x 2 x (h * w) (dx, dy)."""
    xs, ys = cell_centres(height, width, feature_stride, locations.device)
    norm = (strides * scale)[:, None]  # N x 1
    dx = (xs.repeat(height)[None, :] - locations[:, :1]) / norm  # N x hw
    dy = (ys.repeat_interleave(width)[None, :] - locations[:, 1:]) / norm
    return torch.stack([dx, dy], dim=1)


def mass_centres(masks: Tensor) -> Tensor:
    """Mask centres of mass in pixels: N x H x W -> N x 2 (x, y); empty masks give (-1, -1)."""
    n, h, w = masks.shape
    m = masks.float()
    area = m.sum(dim=(1, 2))  # N
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)
    cx = (m.sum(dim=1) * xs).sum(dim=1) / area.clamp(min=1)
    cy = (m.sum(dim=2) * ys).sum(dim=1) / area.clamp(min=1)
    centres = torch.stack([cx, cy], dim=1)
    return torch.where(area[:, None] > 0, centres, torch.full_like(centres, -1.0))


def sample_at_cells(masks: Tensor, height: int, width: int, stride: int) -> Tensor:
    """Mask values at the cell centres of an h x w map: N x H x W -> N x h x w (bool)."""
    xs, ys = cell_centres(height, width, stride, masks.device)
    xs = xs.long().clamp(max=masks.shape[2] - 1)
    ys = ys.long().clamp(max=masks.shape[1] - 1)
    return masks[:, ys][:, :, xs].bool()


def centre_regions(
    masks: Tensor, boxes: Tensor, centres: Tensor, height: int, width: int, stride: int,
    radius: float,
) -> Tensor:
    """Centre region of each instance on an h x w map of the given stride.

    The region is the box around the mask's mass centre with half-sizes radius * (w/2, h/2)
    of the instance box, intersected with the mask, plus always the cell holding the mass
    centre (so every non-empty instance marks at least one cell).

    Args:
        masks: N x H x W instance masks at (padded) input resolution.
        boxes: N x 4 xyxy boxes in pixels.
        centres: N x 2 mass centres (x, y) in pixels, from `mass_centres`.
    Returns:
        N x h x w bool.
    """
    n = masks.shape[0]
    if n == 0:
        return torch.zeros(0, height, width, dtype=torch.bool, device=masks.device)
    xs, ys = cell_centres(height, width, stride, masks.device)
    half_w = radius * (boxes[:, 2] - boxes[:, 0]) / 2  # N
    half_h = radius * (boxes[:, 3] - boxes[:, 1]) / 2
    in_x = (xs[None, :] - centres[:, :1]).abs() <= half_w[:, None]  # N x w
    in_y = (ys[None, :] - centres[:, 1:]).abs() <= half_h[:, None]  # N x h
    region = in_y[:, :, None] & in_x[:, None, :] & sample_at_cells(masks, height, width, stride)
    valid = centres[:, 0] >= 0
    ci = (centres[:, 1] / stride).long().clamp(0, height - 1)
    cj = (centres[:, 0] / stride).long().clamp(0, width - 1)
    idx = torch.arange(n, device=masks.device)
    region[idx[valid], ci[valid], cj[valid]] = True
    return region


def perceive_targets(
    labels: Tensor,
    boxes: Tensor,
    masks: Tensor,
    iscrowd: Tensor,
    level_shapes: list[tuple[int, int]],
    strides: list[int] | tuple[int, ...],
    scale_ranges: list[list[float]],
    center_radius: float,
) -> tuple[Tensor, Tensor]:
    """Ground truth G_P_s for one image, all levels flattened and concatenated.

    Each non-crowd instance is assigned to every level whose scale range contains
    sqrt(box area) (ranges may overlap, as in SOLO) and marks its centre region there with
    its class. Where centre regions of several instances meet, the smaller instance (box
    area) wins. Background cells covered by a crowd mask are ignored (label -1).

    Args:
        labels: N int64 classes in 1..C.
        boxes: N x 4 xyxy boxes in pixels.
        masks: N x H x W masks at the padded input size.
        iscrowd: N bool.
        level_shapes: (h, w) of each level's map; strides: its stride.
    Returns:
        cls_targets: L int64 (-1 ignore, 0 background, 1..C), L = sum of h*w over levels.
        instance_ids: L int64 index of the instance a positive cell belongs to, else -1.
    """
    device = masks.device
    n = labels.shape[0]
    masks = masks.bool()
    crowd = iscrowd.bool()
    centres = mass_centres(masks)  # N x 2
    valid = (~crowd) & (centres[:, 0] >= 0)
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    scale = area.sqrt()
    cls_out, ids_out = [], []
    for (h, w), stride, (lo, hi) in zip(level_shapes, strides, scale_ranges):
        cls_map = torch.zeros(h * w, dtype=torch.int64, device=device)
        ids_map = torch.full((h * w,), -1, dtype=torch.int64, device=device)
        on_level = valid & (scale >= lo) & (scale <= hi)  # N
        if n > 0:
            region = centre_regions(masks, boxes, centres, h, w, stride, center_radius)
            region = region.flatten(1) & on_level[:, None]  # N x L_s
            # smaller instance wins: argmin of area among the instances marking a cell
            cost = area[:, None].expand_as(region).masked_fill(~region, math.inf)  # N x L_s
            best_cost, best = cost.min(dim=0)  # L_s
            positive = torch.isfinite(best_cost)
            cls_map[positive] = labels[best[positive]]
            ids_map[positive] = best[positive]
            if crowd.any():
                crowd_cells = sample_at_cells(masks[crowd], h, w, stride).flatten(1).any(dim=0)
                cls_map[crowd_cells & ~positive] = -1
        cls_out.append(cls_map)
        ids_out.append(ids_map)
    return torch.cat(cls_out), torch.cat(ids_out)


def softmax_focal_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0) -> Tensor:
    """Per-sample softmax focal loss: L x K logits, L targets in 0..K-1 -> L."""
    log_p = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    return -((1 - log_p.exp()) ** gamma) * log_p


def perceive_loss(logits: Tensor, targets: Tensor, kind: str = "ce") -> Tensor:
    """Eq. 1-2 over all cells of all levels of the batch, normalised by (#positives + 1).

    Args:
        logits: L x (C+1) class logits; targets: L int64 (-1 ignored).
        kind: "ce" (the paper's cross-entropy) or "focal" (softmax focal, gamma 2).
    """
    keep = targets >= 0
    num_pos = (targets > 0).sum().clamp(min=0).float()
    if kind == "ce":
        per_cell = F.cross_entropy(logits[keep], targets[keep], reduction="none")
    elif kind == "focal":
        per_cell = softmax_focal_loss(logits[keep], targets[keep])
    else:
        raise ValueError(f"model.cls_loss: unknown {kind!r}; use ce or focal")
    return per_cell.sum() / (num_pos + 1.0)


def conv_gn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv + GroupNorm + ReLU, the building block of all head towers."""
    # 32 groups at width 256 (8 channels each); >= 2 channels per group so a 1x1 map (P6 of
    # a small image) still normalises. Measured at width 32: 16 groups trains the excavating
    # variants well, 4 groups did not.
    groups = math.gcd(32, max(out_channels // 2, 1))
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(inplace=True),
    )


class SemanticsPerceiving(nn.Module):
    """Shared tower over every FPN level, then P_s ((C+1)-way logits) and D_s (descriptors).

    Args:
        in_channels: FPN width.
        num_classes: C (the classifier has C+1 outputs, 0 = background).
        channels: tower width.
        num_convs: 3x3 conv + GN + ReLU blocks in the tower.
        descriptor_dim: width of the instance descriptors D_s.
        prior_prob: initial foreground probability per class (focal-loss style bias init).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        num_convs: int = 4,
        descriptor_dim: int = 256,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        layers = [conv_gn_relu(in_channels + 2 if i == 0 else channels, channels)
                  for i in range(num_convs)]
        self.tower = nn.Sequential(*layers)
        tower_out = channels if num_convs > 0 else in_channels + 2
        self.cls_logits = nn.Conv2d(tower_out, num_classes + 1, 3, padding=1)
        self.descriptors = nn.Conv2d(tower_out, descriptor_dim, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # background starts at probability ~ 1 - C * prior_prob
        nn.init.constant_(self.cls_logits.bias[:1], math.log(max(1.0 / prior_prob - num_classes,
                                                                  1.0)))
        nn.init.normal_(self.descriptors.weight, std=(2.0 / tower_out / 9) ** 0.5)

    def forward(
        self, features: list[Tensor], strides: list[int] | tuple[int, ...]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """features: per level B x C_fpn x h x w -> (logits B x (C+1) x h x w, D B x D x h x w)."""
        logits, descriptors = [], []
        for feature, stride in zip(features, strides):
            x = self.tower(add_coordinates(feature, stride))
            logits.append(self.cls_logits(x))
            descriptors.append(self.descriptors(x))
        return logits, descriptors


def flatten_levels(maps: list[Tensor]) -> Tensor:
    """Per-level B x K x h x w maps -> B x L x K (cells of all levels, level-major)."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


def level_cells(
    level_shapes: list[tuple[int, int]], strides: list[int] | tuple[int, ...], device=None
) -> tuple[Tensor, Tensor]:
    """Pixel positions L x 2 (x, y) and strides L of all cells, in `flatten_levels` order."""
    positions, cell_strides = [], []
    for (h, w), stride in zip(level_shapes, strides):
        xs, ys = cell_centres(h, w, stride, device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        positions.append(torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1))
        cell_strides.append(torch.full((h * w,), float(stride), device=device))
    return torch.cat(positions), torch.cat(cell_strides)


def cells_at(
    points: Tensor, point_strides: Tensor, level_shapes: list[tuple[int, int]],
    strides: list[int] | tuple[int, ...],
) -> Tensor:
    """Index (in `flatten_levels` order) of the cell holding each point on a given level.

    Args:
        points: K x 2 pixel (x, y); point_strides: K, the stride of the level to look on.
    Returns:
        K int64 indices.
    """
    device = points.device
    heights = torch.tensor([h for h, _ in level_shapes], device=device)
    widths = torch.tensor([w for _, w in level_shapes], device=device)
    offsets = torch.cumsum(heights * widths, 0) - heights * widths
    level_strides = torch.tensor(list(strides), device=device, dtype=point_strides.dtype)
    level = (point_strides[:, None] == level_strides[None, :]).int().argmax(dim=1)  # K
    offsets_t, widths_t, heights_t = offsets[level], widths[level], heights[level]
    col = torch.minimum((points[:, 0] / point_strides).long().clamp(min=0), widths_t - 1)
    row = torch.minimum((points[:, 1] / point_strides).long().clamp(min=0), heights_t - 1)
    return offsets_t + row * widths_t + col


def point_nms(scores: Tensor, kernel: int = 3) -> Tensor:
    """Keep cells that are the maximum of their class score in a k x k window (SOLOv2).

    scores: B x C x h x w -> same shape with non-maxima zeroed.
    """
    peaks = F.max_pool2d(scores, kernel, stride=1, padding=kernel // 2)
    return scores * (peaks == scores)
