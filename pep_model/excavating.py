"""Object excavating (paper Sec. 3.3, Fig. 3): mine instances around the original ones.

For every original descriptor a descriptor-conditioned heat map E_ind of the centres of
*other* instances around it is predicted by a dynamic 1x1 conv whose weights come from the
descriptor, applied to a shared feature map concatenated with coordinates relative to the
descriptor's location. The relative coordinates enter as the quadratic basis
(dx, dy, dx^2, dy^2, dx*dy) (scaled by the descriptor's level), so one dynamic 1x1 conv can
express "centres (from the features), not of my instance, within this elliptical area
around me". All heat maps come from one batched matmul plus broadcasting.

Key pixels (training: the ground-truth neighbour centres; inference: local maxima of E)
turn a copy of the original descriptor, concatenated with the key pixel's coordinates
(CoordConv), into a new mined descriptor with its own (C+1)-way classification. With
`local_descriptor` (default) the MLP also sees the descriptor found at the key pixel and
predicts the mined descriptor as a correction of it. The excavating subnetwork reads the
shared features and descriptors detached: its losses train its own layers (see
`shared_feature`). At inference a mined descriptor scores E(key pixel) x its class prob.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from pep_model.perceiving import COORD_SCALE, conv_gn_relu, relative_coordinates

# Relative coordinates are divided by RELATIVE_SCALE x (the descriptor's level stride):
# about one object size of that level (scale ranges are ~4-12 strides).
RELATIVE_SCALE = 8.0
MAX_OFFSET = 2.0  # relative coordinates of the heat-map basis are clamped to +-MAX_OFFSET


def neighbour_matrix(boxes: Tensor, valid: Tensor, expand: float) -> Tensor:
    """Which instances are neighbours: M x M bool, [i, j] = j overlaps i's enlarged box.

    The box of i is enlarged by `expand` x its width/height on each side; j is a neighbour
    of i when its box intersects that (positive area). Never i itself; invalid (crowd or
    empty) instances are nobody's neighbours and have none.
    """
    m = boxes.shape[0]
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    big = torch.stack(
        [boxes[:, 0] - expand * w, boxes[:, 1] - expand * h,
         boxes[:, 2] + expand * w, boxes[:, 3] + expand * h], dim=1
    )  # M x 4
    ix = torch.minimum(big[:, None, 2], boxes[None, :, 2]) - torch.maximum(big[:, None, 0],
                                                                            boxes[None, :, 0])
    iy = torch.minimum(big[:, None, 3], boxes[None, :, 3]) - torch.maximum(big[:, None, 1],
                                                                            boxes[None, :, 1])
    overlap = (ix > 0) & (iy > 0)  # M x M
    eye = torch.eye(m, dtype=torch.bool, device=boxes.device)
    return overlap & ~eye & valid[:, None] & valid[None, :]


def excavate_targets(instance_ids: Tensor, neighbours: Tensor, centre_maps: Tensor) -> Tensor:
    """G_E for each original descriptor: 1 on the centre regions of its instance's neighbours.

    Args:
        instance_ids: N_ori int64, the instance each original descriptor belongs to.
        neighbours: M x M bool from `neighbour_matrix`.
        centre_maps: M x h x w bool centre regions at the heat-map resolution.
    Returns:
        N_ori x h x w float in {0, 1}.
    """
    m, h, w = centre_maps.shape
    if instance_ids.numel() == 0 or m == 0:
        return centre_maps.new_zeros((instance_ids.numel(), h, w), dtype=torch.float32)
    rows = neighbours[instance_ids].float()  # N_ori x M
    return (rows @ centre_maps.flatten(1).float() > 0).float().view(-1, h, w)


def sample_training_keys(
    instance_ids: Tensor,
    neighbours: Tensor,
    centre_maps: Tensor,
    max_mined: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training key pixels: one per (original descriptor, neighbour of its instance) pair.

    Pairs are sub-sampled to `max_mined`; each key pixel is a random cell of the neighbour's
    centre region (what a local maximum of a well-trained E would pick), drawn from
    `generator` (default: the global RNG).
    Returns (original index K, target instance K, key cell index K into the flattened map).
    """
    device = instance_ids.device
    if instance_ids.numel() == 0 or centre_maps.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty, empty
    orig, target = neighbours[instance_ids].nonzero(as_tuple=True)  # K, K
    if orig.numel() > max_mined:
        keep = torch.randperm(orig.numel(), device=device, generator=generator)[:max_mined]
        orig, target = orig[keep], target[keep]
    if orig.numel() == 0:
        return orig, target, target.clone()
    # a uniform cell of each target's centre region: the regions' cells listed instance by
    # instance, then one draw per key into its instance's run of that list (a K x hw
    # multinomial cost ~15 ms per crowded image)
    instance, cell = centre_maps.flatten(1).nonzero(as_tuple=True)  # sorted by instance
    counts = torch.bincount(instance, minlength=centre_maps.shape[0])
    starts = counts.cumsum(0) - counts
    u = torch.rand(target.numel(), device=device, generator=generator)
    pick = (u * counts[target]).long().clamp(max=counts[target] - 1)  # each count >= 1
    return orig, target, cell[starts[target] + pick]


def find_key_pixels(
    heat: Tensor, threshold: float, topk: int, valid_hw: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Inference key pixels: local maxima (3x3) of E above `threshold`, top-k per descriptor.

    Args:
        heat: N x h x w probabilities; valid_hw: the image's extent on this map.
    Returns:
        (original index K, cell index K into the flattened map, heat value K).
    """
    n, h, w = heat.shape
    if n == 0 or topk <= 0:
        empty = torch.zeros(0, dtype=torch.int64, device=heat.device)
        return empty, empty, heat.new_zeros(0)
    peaks = F.max_pool2d(heat[:, None], 3, stride=1, padding=1)[:, 0]
    heat = heat * (peaks == heat)
    heat[:, valid_hw[0]:, :] = 0
    heat[:, :, valid_hw[1]:] = 0
    values, cells = heat.flatten(1).topk(min(topk, h * w), dim=1)  # N x k
    keep = values > threshold
    orig = torch.arange(n, device=heat.device)[:, None].expand_as(cells)
    return orig[keep], cells[keep], values[keep]


def heat_loss(logits: Tensor, targets: Tensor, kind: str = "ce") -> Tensor:
    """Eq. 3 over all heat maps: "ce" = BCE with positives and negatives weighted equally;
    "focal" = sigmoid focal loss normalised by the number of positive pixels."""
    if logits.numel() == 0:
        return logits.sum() * 0
    pos = targets > 0.5
    if kind == "focal":
        return sigmoid_focal_loss(logits, targets, reduction="sum") / pos.sum().clamp(min=1)
    per_pixel = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    loss_neg = per_pixel[~pos].mean() if (~pos).any() else per_pixel.sum() * 0
    loss_pos = per_pixel[pos].mean() if pos.any() else per_pixel.sum() * 0
    return 0.5 * (loss_pos + loss_neg)


class ObjectExcavating(nn.Module):
    """Descriptor-conditioned neighbour-centre heat maps and the mined-descriptor MLP.

    Args:
        in_channels: width of the shared input feature (the general feature B).
        descriptor_dim: D.
        num_classes: C (mined classification has C+1 outputs).
        channels: width of the shared excavating feature F_E.
        local_descriptor: also feed the descriptor found at the key pixel (on the original
            descriptor's level) into the mined-descriptor MLP, and predict the mined
            descriptor as a correction of it (zero-initialised residual).
        prior_prob: initial heat-map probability (bias init).
    """

    num_basis = 5  # dx, dy, dx^2, dy^2, dx*dy

    def __init__(
        self,
        in_channels: int,
        descriptor_dim: int,
        num_classes: int,
        channels: int = 64,
        local_descriptor: bool = True,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.local_descriptor = local_descriptor
        self.feature = nn.Sequential(conv_gn_relu(in_channels, channels),
                                     nn.Conv2d(channels, channels, 1))
        # dynamic 1x1 conv weights: channels for F_E, num_basis for coords, 1 bias
        self.heat_params = nn.Linear(descriptor_dim, channels + self.num_basis + 1)
        nn.init.normal_(self.heat_params.weight, std=0.01)
        nn.init.zeros_(self.heat_params.bias)
        with torch.no_grad():
            self.heat_params.bias[channels + 2:channels + 4] = -1.0  # start peaked around self
            self.heat_params.bias[-1] = -math.log((1 - prior_prob) / prior_prob)
        self.mine_mlp = nn.Sequential(
            nn.Linear(descriptor_dim * (2 if local_descriptor else 1) + 4, descriptor_dim),
            nn.ReLU(inplace=True),
            nn.Linear(descriptor_dim, descriptor_dim), nn.ReLU(inplace=True),
        )
        self.mined_descriptor = nn.Linear(descriptor_dim, descriptor_dim)
        if local_descriptor:  # start from the key pixel's own descriptor
            nn.init.zeros_(self.mined_descriptor.weight)
            nn.init.zeros_(self.mined_descriptor.bias)
        self.mined_cls = nn.Linear(descriptor_dim, num_classes + 1)
        nn.init.normal_(self.mined_cls.weight, std=0.01)
        nn.init.zeros_(self.mined_cls.bias)

    def shared_feature(self, general_feature: Tensor) -> Tensor:
        """F_E: B x C_B x h x w -> B x channels x h x w.

        The heat maps read the shared feature and the descriptors detached, so Eq. 3 trains
        the excavating layers only (measured on the overfit test: with it flowing into the
        shared trunk, gradient spikes of norm ~250 hit the perceiving/mask layers and the
        original descriptors' masks degraded, segm AP 0.40-0.48 vs 0.53 detached).
        """
        return self.feature(general_feature.detach())

    def heat_maps(
        self, descriptors: Tensor, positions: Tensor, strides: Tensor, feature: Tensor,
        feature_stride: int,
    ) -> Tensor:
        """E_ind logits for N descriptors of one image.

        Args:
            descriptors: N x D; positions: N x 2 pixel (x, y); strides: N level strides.
            feature: channels x h x w (F_E of the image), at `feature_stride`.
        Returns:
            N x h x w logits.
        """
        c, h, w = feature.shape
        params = self.heat_params(descriptors.detach())  # N x (c + 5 + 1)
        w_feat, w_coord, bias = params[:, :c], params[:, c:-1], params[:, -1:]
        heat = w_feat @ feature.reshape(c, h * w)  # N x hw
        # bounded basis: neighbours lie within ~2 object sizes; keeps the squares small
        rel = relative_coordinates(positions, strides, h, w, feature_stride, RELATIVE_SCALE)
        dx, dy = rel.clamp(-MAX_OFFSET, MAX_OFFSET).unbind(1)  # N x hw each
        heat = heat + bias + w_coord[:, :1] * dx + w_coord[:, 1:2] * dy
        heat = heat + w_coord[:, 2:3] * dx * dx + w_coord[:, 3:4] * dy * dy
        heat = heat + w_coord[:, 4:5] * dx * dy
        return heat.view(-1, h, w)

    def mine(
        self, descriptors: Tensor, positions: Tensor, strides: Tensor, key_positions: Tensor,
        local: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Mined descriptors from copies of the original ones and their key pixels.

        Args:
            descriptors: K x D copies of the original descriptors.
            positions: K x 2 their pixel locations; strides: K their level strides.
            key_positions: K x 2 key pixel locations.
            local: K x D descriptors at the key pixels (needed iff `local_descriptor`).
        Returns:
            (K x D mined descriptors, K x (C+1) class logits).
        """
        offsets = (key_positions - positions) / (strides[:, None] * RELATIVE_SCALE)  # K x 2
        # detached copies: Eq. 4 and the mined descriptors' mask/graph terms train this MLP,
        # not D (measured, "+excavating" overfit test: segm AP 0.53 with gradients into D,
        # 0.59 without; the originals' masks degraded otherwise)
        descriptors = descriptors.detach()
        local = local.detach() if local is not None else None
        parts = [descriptors, key_positions / COORD_SCALE, offsets]
        if self.local_descriptor:
            parts.append(local)
        x = torch.cat(parts, dim=1)
        hidden = self.mine_mlp(x)
        mined = self.mined_descriptor(hidden)
        if self.local_descriptor:
            mined = mined + local
        return mined, self.mined_cls(hidden)
