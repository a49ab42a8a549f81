"""Instance purifying (paper Sec. 3.4, Fig. 4): a learned similarity graph over descriptors.

All N_all descriptors of an image (original + mined) are nodes; the adjacency M[i, j] is
the sigmoid of a scaled cosine similarity of projected descriptors minus a learned multiple
of their distance (in object sizes of their levels; without it, far-apart objects of one
class that look alike got similarity ~1 and were merged),
trained against G_M[i, j] = 1 iff i and j belong to the same instance (Eq. 5). At inference
descriptors are grouped by M (`postprocess.group_by_similarity`) and each group is merged
into one object (`postprocess.merge_groups`), which replaces NMS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pep_model.perceiving import COORD_SCALE

# Distances between descriptors are divided by RELATIVE_SCALE x sqrt(stride_i * stride_j).
RELATIVE_SCALE = 8.0


def graph_targets(instance_ids: Tensor) -> Tensor:
    """G_M: N x N float, 1 where both descriptors belong to the same (known, >= 0) instance."""
    same = instance_ids[:, None] == instance_ids[None, :]
    known = instance_ids >= 0
    return (same & known[:, None] & known[None, :]).float()


def graph_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Eq. 5: BCE over descriptor pairs, positives and negatives weighted equally.

    Args:
        logits: P similarity logits of the pairs that count (same image, i != j),
            pooled over the batch; targets: P values of G_M for those pairs.
    """
    per_pair = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    pos = targets > 0.5
    zero = logits.sum() * 0
    loss_pos = per_pair[pos].mean() if pos.any() else zero
    loss_neg = per_pair[~pos].mean() if (~pos).any() else zero
    return 0.5 * (loss_pos + loss_neg)


class InstancePurifying(nn.Module):
    """Pairwise similarity M = sigmoid(scale * cos(e_i, e_j) - w * dist_ij + bias).

    Args:
        descriptor_dim: D.
        embed_dim: width of the projected embedding e.
    """

    def __init__(self, descriptor_dim: int, embed_dim: int = 64) -> None:
        super().__init__()
        self.project = nn.Sequential(
            nn.Linear(descriptor_dim + 2, descriptor_dim), nn.ReLU(inplace=True),
            nn.Linear(descriptor_dim, embed_dim),
        )
        self.logit_scale = nn.Parameter(torch.tensor(10.0))
        self.logit_bias = nn.Parameter(torch.tensor(-5.0))
        self.distance_weight = nn.Parameter(torch.tensor(2.0))

    def forward(self, descriptors: Tensor, positions: Tensor, strides: Tensor) -> Tensor:
        """descriptors: N x D, positions: N x 2 pixels, strides: N level strides
        -> N x N similarity logits."""
        x = torch.cat([descriptors, positions / COORD_SCALE], dim=1)
        e = F.normalize(self.project(x), dim=1)  # N x E
        scale = RELATIVE_SCALE * (strides[:, None] * strides[None, :]).sqrt()  # N x N
        distance = torch.cdist(positions, positions) / scale  # N x N
        return (self.logit_scale * (e @ e.t()) - F.softplus(self.distance_weight) * distance
                + self.logit_bias)
