"""Post-processing of PEP's per-descriptor predictions into final instances (pure torch).

Two ways to turn many descriptors per object into one instance per object
(DESIGN.md, "The model", items 4 and 7):

- `group_by_similarity` + `merge_groups`: instance purifying (paper Sec. 3.4). Descriptors
  whose learned pairwise similarity passes `purify_threshold` form one group, and each group
  becomes one instance.
- `matrix_nms`: SOLOv2's Matrix NMS, which removes duplicates when purifying is switched off
  (the "Baseline" and "+excavating" ablations).

`point_nms` thins a heat map (classification map or excavating map E) to its local maxima.

Every function is vectorised, keeps the device of its inputs, imports nothing but torch,
and returns typed empty tensors for empty input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["group_by_similarity", "mask_iou", "matrix_nms", "merge_groups", "point_nms"]

_KERNELS = ("gaussian", "linear")
_EPS = 1e-6


def matrix_nms(
    masks: Tensor,
    labels: Tensor,
    scores: Tensor,
    kernel: str = "gaussian",
    sigma: float = 2.0,
    filter_thr: float = -1.0,
    max_num: int = -1,
    mask_area: Tensor | None = None,
    overlap: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decay the scores of duplicate masks with SOLOv2's Matrix NMS.

    A mask j is decayed by the same-label masks i that score higher than it:
    decay_j = min_i f(iou_ij) / f(compensate_i), where compensate_i is the largest IoU of
    mask i with any higher-scored same-label mask (how much i is itself suppressed).
    Kernels: "gaussian", exp(-sigma * (iou_ij^2 - compensate_i^2)); "linear",
    (1 - iou_ij) / (1 - compensate_i). Masks of different labels never decay each other.
    Ties in `scores` are ordered by input index (the lower index counts as higher-scored).

    Args:
        masks: [N, H, W] bool binary masks.
        labels: [N] int64 class labels.
        scores: [N] float confidences.
        kernel: "gaussian" or "linear".
        sigma: Gaussian kernel strength (unused by "linear").
        filter_thr: keep only instances whose decayed score is > filter_thr
            (the default -1 keeps all).
        max_num: keep at most this many instances after filtering; negative means no cap.
        mask_area: optional [N] precomputed mask areas (pixel counts); computed if None.
        overlap: optional [N, N] pairwise overlap in 0..1 (input order, symmetric) used
            instead of the masks' IoU, e.g. purifying's learned similarity ("decay" mode).

    Returns:
        (scores [K] decayed, labels [K], masks [K, H, W], keep_inds [K] int64 indices into
        the input), sorted by decayed score, descending. Dtypes follow the inputs.

    Raises:
        ValueError: unknown kernel, or inputs whose shapes do not match.
    """
    if kernel not in _KERNELS:
        raise ValueError(f"matrix_nms: unknown kernel {kernel!r}; expected one of {_KERNELS}")
    if masks.dim() != 3:
        raise ValueError(f"matrix_nms: masks must be [N, H, W], got shape {tuple(masks.shape)}")
    num = masks.shape[0]
    if labels.shape != (num,) or scores.shape != (num,):
        raise ValueError(
            f"matrix_nms: expected labels and scores of shape ({num},) to match masks, got "
            f"labels {tuple(labels.shape)} and scores {tuple(scores.shape)}"
        )
    if mask_area is not None and mask_area.shape != (num,):
        raise ValueError(
            f"matrix_nms: mask_area must have shape ({num},), got {tuple(mask_area.shape)}"
        )
    if overlap is not None and overlap.shape != (num, num):
        raise ValueError(
            f"matrix_nms: overlap must have shape ({num}, {num}), got {tuple(overlap.shape)}"
        )
    if num == 0:
        return _empty_nms_result(masks, labels, scores)

    # Sort by score so that "higher-scored" means "earlier row" (upper triangle).
    scores, order = torch.sort(scores, descending=True, stable=True)  # [N]
    labels = labels[order]
    masks = masks[order]
    if overlap is None:
        overlap = mask_iou(masks, None if mask_area is None else mask_area[order])
    else:
        overlap = overlap[order][:, order].float()
    # pairs[i, j]: i scores higher than j and has the same label, the only pairs that decay.
    pairs = (labels[:, None] == labels[None, :]).triu(diagonal=1)  # [N, N]
    iou = torch.where(pairs, overlap, torch.zeros_like(overlap))  # [N, N]
    compensate = iou.max(dim=0).values[:, None]  # [N, 1], row i: max IoU with a higher i'

    if kernel == "gaussian":
        ratio = torch.exp(-sigma * (iou.square() - compensate.square()))  # [N, N]
    else:
        ratio = (1.0 - iou) / (1.0 - compensate).clamp_min(_EPS)  # [N, N]
    ratio = torch.where(pairs, ratio, torch.ones_like(ratio))
    decay = ratio.min(dim=0).values  # [N], column j: min over the masks above j
    decayed = scores * decay.to(scores.dtype)  # [N]

    decayed, resort = torch.sort(decayed, descending=True, stable=True)  # [N]
    passed = decayed > filter_thr  # [N]
    decayed, keep = decayed[passed], resort[passed]  # [K'], positions in the sorted arrays
    if max_num >= 0:
        decayed, keep = decayed[:max_num], keep[:max_num]  # [K]
    return decayed, labels[keep], masks[keep], order[keep]


def mask_iou(masks: Tensor, mask_area: Tensor | None = None) -> Tensor:
    """[N, N] float IoU of [N, H, W] binary masks (`mask_area`: their pixel counts, optional)."""
    flat = masks.flatten(1).float()  # [N, H*W]
    area = flat.sum(dim=1) if mask_area is None else mask_area.float()  # [N]
    inter = flat @ flat.T  # [N, N]
    union = (area[:, None] + area[None, :] - inter).clamp_min(_EPS)  # [N, N]
    return inter / union


def _empty_nms_result(
    masks: Tensor, labels: Tensor, scores: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Typed empty (scores [0], labels [0], masks [0, H, W], keep_inds [0] int64)."""
    return (
        scores.new_zeros(0),
        labels.new_zeros(0),
        masks.new_zeros((0, *masks.shape[1:])),
        torch.zeros(0, dtype=torch.int64, device=labels.device),
    )


def group_by_similarity(similarity: Tensor, scores: Tensor, threshold: float) -> Tensor:
    """Group descriptors of the same instance (instance purifying, paper Sec. 3.4).

    Greedy seed grouping: the highest-scored unassigned descriptor seeds a group, and every
    unassigned descriptor whose similarity to the seed is >= `threshold` joins it; repeat
    until all are assigned. Connected components of the thresholded graph were rejected on
    purpose: a chain A~B, B~C would merge two touching objects A and C through one ambiguous
    descriptor B. Here membership is decided against the seed only, so A and C stay apart
    when A seeds (if B seeds, all three join B's group). The seed always joins its own group.
    Similarity need not be symmetric; the symmetrised (M + M^T) / 2 is used.

    Args:
        similarity: [N, N] pairwise similarity in 0..1 (the learned matrix M).
        scores: [N] descriptor confidences, which pick the seeds; ties go to the lower index.
        threshold: minimum symmetrised similarity to the seed for joining its group.

    Returns:
        [N] int64 group id per descriptor, 0..G-1 in seed order (group 0 is seeded by the
        highest-scored descriptor).

    Raises:
        ValueError: shapes do not match.
    """
    num = scores.shape[0] if scores.dim() == 1 else -1
    if num < 0 or similarity.shape != (num, num):
        raise ValueError(
            "group_by_similarity: expected similarity [N, N] and scores [N], got "
            f"{tuple(similarity.shape)} and {tuple(scores.shape)}"
        )
    group_ids = torch.full((num,), -1, dtype=torch.int64, device=scores.device)
    if num == 0:
        return group_ids

    sym = (similarity + similarity.T) / 2  # [N, N]
    order = torch.argsort(scores, descending=True, stable=True)  # [N]
    unassigned = torch.ones(num, dtype=torch.bool, device=scores.device)  # [N]
    group = 0
    while bool(unassigned.any()):  # one iteration per group
        # Highest-scored unassigned descriptor: first True of `unassigned` in score order.
        seed = order[torch.argmax(unassigned[order].to(torch.uint8))]
        members = unassigned & (sym[seed] >= threshold)  # [N]
        members[seed] = True
        group_ids[members] = group
        unassigned &= ~members
        group += 1
    return group_ids


def merge_groups(
    group_ids: Tensor, scores: Tensor, labels: Tensor, mask_probs: Tensor, mask: str = "mean"
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge each group of descriptors into one instance.

    Group score = the highest member score; label = the label of that top-scoring member
    (ties go to the lower index, matching the seed chosen by `group_by_similarity`);
    mask (`mask="mean"`) = the score-weighted mean of the members' mask probabilities (the
    plain mean if all member scores are zero), or (`mask="seed"`) the top member's own.

    Args:
        group_ids: [N] int64 group ids covering 0..G-1 without gaps (as returned by
            `group_by_similarity`).
        scores: [N] float member confidences.
        labels: [N] int64 member class labels.
        mask_probs: [N, H, W] float member mask probabilities.

    Returns:
        (scores [G], labels [G], mask_probs [G, H, W]), row g for group id g. Dtypes follow
        the inputs.

    Raises:
        ValueError: shapes do not match, or group ids are not exactly 0..G-1.
    """
    num = group_ids.shape[0] if group_ids.dim() == 1 else -1
    if (
        num < 0
        or scores.shape != (num,)
        or labels.shape != (num,)
        or mask_probs.dim() != 3
        or mask_probs.shape[0] != num
    ):
        raise ValueError(
            "merge_groups: expected group_ids, scores, labels [N] and mask_probs [N, H, W], got "
            f"{tuple(group_ids.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)}, "
            f"{tuple(mask_probs.shape)}"
        )
    if mask not in ("mean", "seed"):
        raise ValueError(f"merge_groups: unknown mask {mask!r}; use mean or seed")
    if num == 0:
        empty_masks = mask_probs.new_zeros((0, *mask_probs.shape[1:]))
        return scores.new_zeros(0), labels.new_zeros(0), empty_masks
    if int(group_ids.min()) < 0:
        raise ValueError(f"merge_groups: negative group id {int(group_ids.min())}")
    counts = torch.bincount(group_ids)  # [G]
    if not bool((counts > 0).all()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"merge_groups: group ids must cover 0..G-1; ids {missing} are empty")
    num_groups = counts.shape[0]

    # Top member per group: sort by score, then (stably) by group; each group's first entry.
    order = torch.argsort(scores, descending=True, stable=True)  # [N]
    order = order[torch.argsort(group_ids[order], stable=True)]  # [N] grouped, best first
    starts = torch.cumsum(counts, dim=0) - counts  # [G]
    top = order[starts]  # [G]
    if mask == "seed":
        return scores[top], labels[top], mask_probs[top]

    weights = scores.to(mask_probs.dtype)  # [N]
    weight_sum = weights.new_zeros(num_groups).index_add_(0, group_ids, weights)  # [G]
    no_weight = weight_sum <= 0  # [G] groups whose members all score 0: plain mean
    weights = torch.where(no_weight[group_ids], torch.ones_like(weights), weights)
    weight_sum = torch.where(no_weight, counts.to(weights.dtype), weight_sum)
    weighted = mask_probs * weights[:, None, None]  # [N, H, W]
    summed = mask_probs.new_zeros((num_groups, *mask_probs.shape[1:]))
    summed.index_add_(0, group_ids, weighted)  # [G, H, W]
    merged = summed / weight_sum[:, None, None]  # [G, H, W]
    return scores[top], labels[top], merged


def point_nms(heat: Tensor, kernel: int = 3) -> Tensor:
    """Keep only the cells that are the maximum of their kernel x kernel neighbourhood.

    SOLOv2's `points_nms` uses kernel 2 with a crop, which compares a cell with its upper and
    left neighbours only; here the window is centred on the cell, so kernel must be odd
    (3 = the 3x3 neighbourhood). Cells equal to their neighbourhood maximum are kept, so a
    plateau keeps all its cells.

    Args:
        heat: [C, H, W] (or [B, C, H, W]) float non-negative heat map, e.g. probabilities.
        kernel: odd window size.

    Returns:
        Tensor shaped like `heat`: local maxima keep their value, other cells are 0.

    Raises:
        ValueError: kernel is not a positive odd integer, or heat is not 3-D/4-D.
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"point_nms: kernel must be a positive odd integer, got {kernel}")
    if heat.dim() not in (3, 4):
        raise ValueError(
            f"point_nms: heat must be [C, H, W] or [B, C, H, W], got {tuple(heat.shape)}"
        )
    if heat.numel() == 0:
        return heat.clone()
    local_max = F.max_pool2d(heat, kernel, stride=1, padding=kernel // 2)  # like heat
    return torch.where(local_max == heat, heat, torch.zeros_like(heat))
