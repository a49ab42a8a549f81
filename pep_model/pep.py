"""PEP (Perceive, Excavate and Purify): the composing module.

`PEP.forward(images, targets)` returns the Eq. 8 loss terms in training and per-image
instances in eval, split like detectron2's GeneralizedRCNN: `preprocess` (normalise + pad
with the backbone's `size_divisibility`), `losses`, `inference` and `postprocess`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import masks_to_boxes

from pep_model.backbone import Backbone
from pep_model.config import ModelConfig
from pep_model.excavating import (
    ObjectExcavating,
    excavate_targets,
    find_key_pixels,
    heat_loss,
    neighbour_matrix,
    sample_training_keys,
)
from pep_model.mask_learning import (
    DynamicMaskHead,
    LinearMaskHead,
    MaskFeature,
    MaskWindow,
    downsample_masks,
    per_mask_loss,
)
from pep_model.perceiving import (
    SemanticsPerceiving,
    cell_centres,
    cells_at,
    centre_regions,
    flatten_levels,
    level_cells,
    mass_centres,
    perceive_loss,
    perceive_targets,
    point_nms,
)
from pep_model.postprocess import group_by_similarity, mask_iou, matrix_nms, merge_groups
from pep_model.purifying import InstancePurifying, graph_loss, graph_targets

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Mask logit outside a descriptor's window (`model.mask_window`): certain background.
OUTSIDE_WINDOW_LOGIT = -1e4

# How purifying turns descriptors into instances (`ModelConfig.purify_merge`).
PURIFY_MERGES = ("mean", "seed", "decay")
# What "decay" decays by (`ModelConfig.purify_overlap`): M alone, or M and mask IoU combined.
PURIFY_OVERLAPS = {
    "similarity": lambda sim, iou: sim,
    "mean": lambda sim, iou: (sim + iou) / 2,
    "max": torch.maximum,
    "min": torch.minimum,
}

# ModelConfig fields that may be changed after building (post-processing only).
INFERENCE_PARAMS = (
    "score_threshold", "candidate_threshold", "pre_topk", "excavate_threshold", "excavate_topk",
    "purify_threshold", "mask_threshold", "nms_kernel", "nms_sigma", "max_instances", "point_nms",
    "purify_merge", "purify_overlap",
)


def batch_images(
    images: list[Tensor], size_divisibility: int
) -> tuple[Tensor, list[tuple[int, int]]]:
    """Pad C x H_i x W_i tensors (zeros, bottom/right) into one B x C x H x W batch whose
    H, W are multiples of `size_divisibility` (detectron2's ImageList.from_tensors)."""
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    max_h = max(h for h, _ in sizes)
    max_w = max(w for _, w in sizes)
    div = size_divisibility
    pad_h, pad_w = math.ceil(max_h / div) * div, math.ceil(max_w / div) * div
    batch = images[0].new_zeros((len(images), images[0].shape[0], pad_h, pad_w))
    for b, im in enumerate(images):
        batch[b, :, : im.shape[-2], : im.shape[-1]] = im
    return batch, sizes


def _empty_result(height: int, width: int, device: torch.device) -> dict[str, Tensor]:
    return {
        "labels": torch.zeros(0, dtype=torch.int64, device=device),
        "scores": torch.zeros(0, dtype=torch.float32, device=device),
        "masks": torch.zeros((0, height, width), dtype=torch.bool, device=device),
        "boxes": torch.zeros((0, 4), dtype=torch.float32, device=device),
    }


class PEP(nn.Module):
    """The PEP instance segmentation network (paper Fig. 2).

    Args:
        backbone: ResNet + FPN (P2..P6) exposing `strides` and `size_divisibility`.
        perceiving: semantics perceiving head (P_s, D_s).
        mask_feature: general feature branch B.
        mask_head: Eq. 6, the descriptor-conditioned mask head over B (dynamic or linear).
        excavating: object excavating subnetwork, or None (Table 2 "excavate" off).
        purifying: instance purifying graph, or None (off: Matrix NMS removes duplicates).
        config: the model config (targets, loss weights, post-processing thresholds).

    Loss dict: every term is already multiplied by its Eq. 8 weight (alpha..delta), so
    `sum(losses.values())` is the training objective. Terms of switched-off parts are absent.
    """

    def __init__(
        self,
        backbone: Backbone,
        perceiving: SemanticsPerceiving,
        mask_feature: MaskFeature,
        mask_head: DynamicMaskHead | LinearMaskHead,
        excavating: ObjectExcavating | None,
        purifying: InstancePurifying | None,
        config: ModelConfig,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.perceiving = perceiving
        self.mask_feature = mask_feature
        self.mask_head = mask_head
        self.excavating = excavating
        self.purifying = purifying
        self.config = dataclasses.replace(config)
        self._generators: dict[torch.device, torch.Generator] = {}  # `_module_generator`
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(3, 1, 1), False)

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameters whose gradient norm is clipped together: the shared network, and each
        module on its own, so a module's gradients never rescale the shared network's (with
        the modules' losses kept off it, the shared network trains as the Baseline's, to
        float rounding)."""
        modules = [m for m in (self.excavating, self.purifying) if m is not None]
        own = {id(p) for m in modules for p in m.parameters()}
        shared = [p for p in self.parameters() if id(p) not in own]
        return [shared] + [list(m.parameters()) for m in modules]

    @property
    def size_divisibility(self) -> int:
        return self.backbone.size_divisibility

    @property
    def perceive_strides(self) -> tuple[int, ...]:
        """Strides of the FPN levels the perceiving head runs on (`perceive_levels`)."""
        return tuple(self.backbone.strides[level - 2] for level in self.config.perceive_levels)

    def set_inference_params(self, **params) -> None:
        """Change post-processing thresholds/caps, e.g. `score_threshold=0.05, max_instances=400`.

        Allowed: see INFERENCE_PARAMS. Raises ValueError on any other name.
        """
        unknown = sorted(set(params) - set(INFERENCE_PARAMS))
        if unknown:
            raise ValueError(f"set_inference_params: unknown {unknown}; allowed {INFERENCE_PARAMS}")
        if params.get("purify_merge", "mean") not in PURIFY_MERGES:
            raise ValueError(
                f"set_inference_params: purify_merge must be one of {PURIFY_MERGES}, got "
                f"{params['purify_merge']!r}"
            )
        if params.get("purify_overlap", "similarity") not in PURIFY_OVERLAPS:
            raise ValueError(
                f"set_inference_params: purify_overlap must be one of {tuple(PURIFY_OVERLAPS)}, "
                f"got {params['purify_overlap']!r}"
            )
        self.config = dataclasses.replace(self.config, **params)

    def selection_threshold(self) -> float:
        """Confidence at which candidate descriptors are selected (see candidate_threshold)."""
        return min(self.config.candidate_threshold, self.config.score_threshold)

    def preprocess(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Normalise 3 x H x W images in 0..1 and pad them into one batch."""
        device = self.pixel_mean.device
        normed = [(im.to(device) - self.pixel_mean) / self.pixel_std for im in images]
        return batch_images(normed, self.size_divisibility)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: dict of weighted loss terms. Eval: per image {labels, scores, masks, boxes}."""
        if self.training and targets is None:
            raise ValueError("PEP in training mode needs targets")
        batch, sizes = self.preprocess(images)
        features = self.backbone(batch)  # P2..P6
        perceived = [features[level - 2] for level in self.config.perceive_levels]
        cls_maps, desc_maps = self.perceiving(perceived, self.perceive_strides)
        general = self.mask_feature(features)  # B x C_B x h x w
        if self.training:
            return self.losses(batch, cls_maps, desc_maps, general, targets)
        return self.inference(sizes, cls_maps, desc_maps, general)

    @property
    def mask_output_stride(self) -> int:
        """Stride of the predicted masks: B's, or finer when `mask_upsample` > 1."""
        return self.config.mask_stride // self.config.mask_upsample

    def mask_windows(
        self,
        descriptors: Tensor,
        locations: Tensor,
        loc_strides: Tensor,
        mask_input: Tensor,
        num_windowed: int | None = None,
        frozen: bool = False,
    ) -> list[tuple[Tensor, MaskWindow | None, Tensor]]:
        """Eq. 6 for one image, inside each descriptor's window (`model.mask_window`).

        Args:
            descriptors: N x D at N x 2 pixel locations, of N level strides.
            mask_input: the image's `mask_head.mask_input` of B, c x h x w.
            num_windowed: the first this many descriptors are original ones and get
                `mask_window` windows; the rest are mined and get `mined_mask_window` windows
                (0: the whole map); None: all original.
            frozen: the mask head's own weights enter detached (see `mask_losses`).
        Returns:
            Groups of descriptors sharing a window size: (their indices into the N, their
            windows at `mask_output_stride` or None for the whole map, their mask logits
            N_g x height x width at `mask_output_stride`; bilinear x `mask_upsample` on the
            logits, as CondInst does).
        """
        cfg = self.config
        _, h, w = mask_input.shape
        n = descriptors.shape[0]
        windowed = n if num_windowed is None else num_windowed
        groups: list[tuple[Tensor, MaskWindow | None]] = []
        for start, end, size in ((0, windowed, cfg.mask_window),
                                 (windowed, n, cfg.mined_mask_window)):
            if end <= start:
                continue
            if size <= 0:
                groups.append((torch.arange(start, end, device=descriptors.device), None))
                continue
            for stride in loc_strides[start:end].unique().tolist():
                index = start + (loc_strides[start:end] == stride).nonzero().squeeze(1)
                side = math.ceil(size * stride / cfg.mask_stride)
                window = None if side >= max(h, w) else MaskWindow.around(
                    locations[index], side, h, w, cfg.mask_stride
                )
                groups.append((index, window))
        if n == 0:
            groups.append((torch.arange(0, device=descriptors.device), None))
        up = cfg.mask_upsample
        out = []
        for index, window in groups:
            logits = self.mask_head(
                descriptors[index], locations[index], loc_strides[index], mask_input,
                cfg.mask_stride, window, frozen,
            )
            if up > 1 and logits.shape[0] > 0:
                logits = F.interpolate(
                    logits[:, None], scale_factor=up, mode="bilinear", align_corners=False
                )[:, 0]
            elif up > 1:
                logits = logits.new_zeros((0, logits.shape[1] * up, logits.shape[2] * up))
            out.append((index, None if window is None else window.scaled(up), logits))
        return out

    def masks(
        self,
        descriptors: Tensor,
        locations: Tensor,
        loc_strides: Tensor,
        mask_input: Tensor,
        num_windowed: int | None = None,
    ) -> Tensor:
        """Eq. 6 for one image on the whole map: N x h x w mask logits at
        `mask_output_stride` (B's h x w times `mask_upsample`); outside a descriptor's window
        the logit is OUTSIDE_WINDOW_LOGIT. `num_windowed`: see `mask_windows`."""
        up = self.config.mask_upsample
        h, w = mask_input.shape[-2] * up, mask_input.shape[-1] * up
        out = mask_input.new_full((descriptors.shape[0], h, w), OUTSIDE_WINDOW_LOGIT)
        for index, window, logits in self.mask_windows(
            descriptors, locations, loc_strides, mask_input, num_windowed
        ):
            if window is None:
                out[index] = logits.to(out.dtype)
            else:
                window.paste(logits, out, index)
        return out

    def mask_losses(
        self,
        descriptors: Tensor,
        locations: Tensor,
        loc_strides: Tensor,
        mask_input: Tensor,
        gt_masks: Tensor,
        instance_ids: Tensor,
        num_originals: int | None = None,
        detach_mined: bool = False,
    ) -> Tensor:
        """Eq. 7 for each of one image's N descriptors, in their order: N (float32).

        Args:
            gt_masks: the image's M instance masks at `mask_output_stride` (area fractions).
            instance_ids: N, the instance each descriptor is trained towards.
            num_originals: the first this many descriptors are original ones, the rest mined
                (windows: see `mask_windows`); None: all original.
            detach_mined: the mined descriptors' masks train neither B nor the mask head
                (`mined_mask_trains_feature` false): they see both detached.
        """
        n = descriptors.shape[0]
        n_ori = n if num_originals is None else num_originals
        parts = [(0, n, mask_input, n_ori, False)]
        if detach_mined:
            parts = [(0, n_ori, mask_input, n_ori, False),
                     (n_ori, n, mask_input.detach(), 0, True)]
        indices, losses = [], []
        for start, end, feature, windowed, frozen in parts:
            ids = instance_ids[start:end]
            for index, window, logits in self.mask_windows(
                descriptors[start:end], locations[start:end], loc_strides[start:end], feature,
                windowed, frozen,
            ):
                targets = (
                    gt_masks[ids[index]] if window is None else window.crop(gt_masks, ids[index])
                )
                indices.append(index + start)
                losses.append(per_mask_loss(logits.float(), targets, self.config.mask_loss))
        if not losses:
            return mask_input.new_zeros(0, dtype=torch.float32)
        order = torch.cat(indices).argsort()
        return torch.cat(losses)[order]

    # ------------------------------------------------------------------ training
    def losses(
        self,
        batch: Tensor,
        cls_maps: list[Tensor],
        desc_maps: list[Tensor],
        general: Tensor,
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Eq. 1-8 for a batch: targets per image, descriptors pooled over the batch."""
        cfg = self.config
        device = batch.device
        strides = self.perceive_strides
        pad_h, pad_w = batch.shape[-2:]
        ms = cfg.mask_stride
        mh, mw = general.shape[-2:]
        level_shapes = [tuple(m.shape[-2:]) for m in cls_maps]
        cls_flat = flatten_levels(cls_maps)  # B x L x (C+1)
        desc_flat = flatten_levels(desc_maps)  # B x L x D
        positions, cell_strides = level_cells(level_shapes, strides, device)  # L x 2, L
        key_xs, key_ys = cell_centres(mh, mw, ms, device)
        key_grid = torch.stack([key_xs.repeat(mh), key_ys.repeat_interleave(mw)], 1)  # hw x 2
        excavate_feature = (
            self.excavating.shared_feature(general) if self.excavating is not None else None
        )
        mask_inputs = self.mask_head.mask_input(general)  # B x c x h x w
        candidate_scores = (
            self._foreground(cls_maps).amax(dim=2)
            if self.purifying is not None and cfg.purify_train_candidates > 0 else None
        )  # B x L

        cls_targets, mask_losses = [], []
        num_originals = 0
        heat_preds, heat_gts, mined_preds, mined_gts = [], [], [], []
        pair_logits, pair_gts = [], []
        for b, target in enumerate(targets):
            labels = target["labels"].to(device)
            boxes = target["boxes"].to(device).float()
            n = labels.shape[0]
            masks = target["masks"].to(device).bool()
            padded = torch.zeros((n, pad_h, pad_w), dtype=torch.bool, device=device)
            padded[:, : masks.shape[1], : masks.shape[2]] = masks
            crowd = target.get("iscrowd")
            crowd = (
                torch.zeros(n, dtype=torch.bool, device=device)
                if crowd is None else crowd.to(device).bool()
            )
            cls_t, ids_t = perceive_targets(
                labels, boxes, padded, crowd, level_shapes, strides, cfg.scale_ranges,
                cfg.center_radius,
            )
            cls_targets.append(cls_t)

            # original descriptors: the GT-positive cells, sub-sampled
            pos = (ids_t >= 0).nonzero().squeeze(1)  # N_ori
            if pos.numel() > cfg.max_train_descriptors:
                pos = pos[torch.randperm(pos.numel(), device=device)[: cfg.max_train_descriptors]]
            descriptors = desc_flat[b, pos]  # N_ori x D
            locations = positions[pos]  # N_ori x 2
            loc_strides = cell_strides[pos]  # N_ori
            instance_ids = ids_t[pos]  # N_ori
            num_originals += pos.numel()
            gt_small = downsample_masks(padded, self.mask_output_stride)  # M x h' x w'

            if self.excavating is not None:
                centres = mass_centres(padded)
                valid = (~crowd) & (centres[:, 0] >= 0)
                centre_maps = centre_regions(padded, boxes, centres, mh, mw, ms, cfg.center_radius)
                centre_maps &= valid[:, None, None]
                neighbours = neighbour_matrix(boxes, valid, cfg.neighbour_expand)  # M x M
                generator = self._module_generator(device)
                mapped = torch.arange(pos.numel(), device=device)
                if 0 < cfg.max_train_heat_maps < pos.numel():
                    mapped = torch.randperm(pos.numel(), device=device, generator=generator)[
                        : cfg.max_train_heat_maps
                    ]
                heat = self.excavating.heat_maps(
                    descriptors[mapped], locations[mapped], loc_strides[mapped],
                    excavate_feature[b], ms,
                )  # N_heat x h x w
                heat_preds.append(heat.flatten())
                heat_gts.append(
                    excavate_targets(instance_ids[mapped], neighbours, centre_maps).flatten()
                )
                orig, target_ids, cells = sample_training_keys(
                    instance_ids, neighbours, centre_maps, cfg.max_train_mined, generator
                )
                key_positions = key_grid[cells]  # K x 2
                local = desc_flat[b, cells_at(key_positions, loc_strides[orig], level_shapes,
                                              strides)]  # K x D
                mined, mined_logits = self.excavating.mine(
                    descriptors[orig], locations[orig], loc_strides[orig], key_positions, local
                )
                mined_preds.append(mined_logits)
                mined_gts.append(labels[target_ids])
                descriptors = torch.cat([descriptors, mined])  # N_all x D
                locations = torch.cat([locations, key_positions])
                loc_strides = torch.cat([loc_strides, loc_strides[orig]])
                instance_ids = torch.cat([instance_ids, target_ids])

            mask_losses.append(self.mask_losses(
                descriptors, locations, loc_strides, mask_inputs[b], gt_small, instance_ids,
                pos.numel(), self.excavating is not None and not cfg.mined_mask_trains_feature,
            ))  # N_all

            if self.purifying is not None:
                if candidate_scores is not None:
                    cells, cell_ids = self._graph_candidates(
                        candidate_scores[b], pos, positions, masks, crowd
                    )  # K, K
                    descriptors = torch.cat([descriptors, desc_flat[b, cells]])
                    locations = torch.cat([locations, positions[cells]])
                    loc_strides = torch.cat([loc_strides, cell_strides[cells]])
                    instance_ids = torch.cat([instance_ids, cell_ids])
                if not cfg.purify_trains_descriptors:
                    descriptors = descriptors.detach()
                logits = self.purifying(descriptors, locations, loc_strides)  # N_all x N_all
                off_diag = ~torch.eye(logits.shape[0], dtype=torch.bool, device=device)
                pair_logits.append(logits[off_diag])
                pair_gts.append(graph_targets(instance_ids)[off_diag])

        num_logits = cls_flat.shape[-1]
        losses = {
            "loss_perceive": perceive_loss(
                cls_flat.reshape(-1, num_logits), torch.cat(cls_targets), cfg.cls_loss
            )
        }
        if self.excavating is not None:
            losses["loss_excavate"] = cfg.alpha * heat_loss(
                torch.cat(heat_preds), torch.cat(heat_gts), cfg.cls_loss
            )
            mined_logits = torch.cat(mined_preds)
            mined_loss = (
                F.cross_entropy(mined_logits, torch.cat(mined_gts))
                if mined_logits.shape[0] > 0 else mined_logits.sum() * 0
            )
            losses["loss_mined_cls"] = cfg.beta * mined_loss
        if self.purifying is not None:
            losses["loss_graph"] = cfg.gamma * graph_loss(torch.cat(pair_logits),
                                                          torch.cat(pair_gts))
        per_descriptor = torch.cat(mask_losses)  # N_all over the batch
        if cfg.mask_loss_norm not in ("all", "originals"):
            raise ValueError(
                f"model.mask_loss_norm: unknown {cfg.mask_loss_norm!r}; use all or originals"
            )
        # a mean over N_all; "originals" turns it into sum / N_ori
        norm = (
            per_descriptor.shape[0] / num_originals
            if cfg.mask_loss_norm == "originals" and num_originals > 0 else 1.0
        )
        mean = per_descriptor.mean() if per_descriptor.shape[0] > 0 else general.sum() * 0
        losses["loss_mask"] = cfg.delta * norm * mean
        return losses

    def _module_generator(self, device: torch.device) -> torch.Generator:
        """The RNG of the modules' own training draws (excavating's key pixels), apart from
        the global one: the shared network's draws (descriptor sub-sampling) stay those of
        the Baseline at the same seed. Seeded from `torch.initial_seed()`, which draws
        nothing; not checkpointed (a resumed run restarts its stream)."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(
                torch.initial_seed() + 1
            )
        return self._generators[device]

    @torch.no_grad()
    def _foreground(self, cls_maps: list[Tensor]) -> Tensor:
        """B x L x C class probabilities of every cell, 0 off the 3x3 local maxima with
        `point_nms`: what inference selects from (and `purify_train_candidates` in training)."""
        fg_maps = [m.softmax(dim=1)[:, 1:] for m in cls_maps]
        if self.config.point_nms:
            fg_maps = [point_nms(m) for m in fg_maps]
        return flatten_levels(fg_maps)

    def _graph_candidates(
        self, scores: Tensor, pos: Tensor, positions: Tensor, masks: Tensor, crowd: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Extra purifying-graph nodes of one training image: its top predicted cells.

        Args:
            scores: L, the top of `_foreground`; pos: the cells already in the graph (the
                ground-truth positive ones); positions: L x 2 cell centres in pixels.
            masks: the image's M x H x W ground-truth masks; crowd: M.
        Returns:
            (K cell indices, K instance ids: the one non-crowd mask the cell centre lies in,
            or -1 for background). Cells inside a crowd region, outside the image, in two
            masks or already in `pos` are left out.
        """
        height, width = masks.shape[-2:]
        scores = scores.clone()
        scores[pos] = 0
        inside = (positions[:, 0] < width) & (positions[:, 1] < height)
        scores[~inside] = 0
        k = min(self.config.purify_train_candidates, int((scores > 0).sum()))
        cells = scores.topk(k).indices
        xs = positions[cells, 0].long().clamp(max=width - 1)
        ys = positions[cells, 1].long().clamp(max=height - 1)
        if masks.shape[0] == 0:
            return cells, torch.full_like(cells, -1)
        hit = masks[:, ys, xs]  # M x K
        in_crowd = (hit & crowd[:, None]).any(0)
        hit = hit & ~crowd[:, None]
        count = hit.sum(0)
        ids = torch.where(count == 1, hit.int().argmax(0), torch.full_like(count, -1))
        keep = ~in_crowd & (count <= 1)
        return cells[keep], ids[keep].long()

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def inference(
        self,
        sizes: list[tuple[int, int]],
        cls_maps: list[Tensor],
        desc_maps: list[Tensor],
        general: Tensor,
    ) -> list[dict[str, Tensor]]:
        """Per image: select original descriptors, excavate, purify or Matrix-NMS, masks."""
        cfg = self.config
        device = general.device
        strides = self.perceive_strides
        level_shapes = [tuple(m.shape[-2:]) for m in cls_maps]
        fg_flat = self._foreground(cls_maps)  # B x L x C
        desc_flat = flatten_levels(desc_maps)  # B x L x D
        positions, cell_strides = level_cells(level_shapes, strides, device)
        excavate_feature = (
            self.excavating.shared_feature(general) if self.excavating is not None else None
        )
        mask_inputs = self.mask_head.mask_input(general)
        select = self.selection_threshold()
        results = []
        for b, (height, width) in enumerate(sizes):
            scores, labels = fg_flat[b].max(dim=1)  # L, L
            inside = (positions[:, 0] < width) & (positions[:, 1] < height)
            keep = ((scores > select) & inside).nonzero().squeeze(1)
            if keep.numel() > cfg.pre_topk:
                keep = keep[scores[keep].topk(cfg.pre_topk).indices]
            scores, labels = scores[keep], labels[keep] + 1
            descriptors, locations = desc_flat[b, keep], positions[keep]
            loc_strides = cell_strides[keep]
            if self.excavating is not None and keep.numel() > 0:
                mined = self._excavate(
                    descriptors, locations, loc_strides, desc_flat[b], level_shapes,
                    excavate_feature[b], (height, width),
                )
                descriptors = torch.cat([descriptors, mined[0]])
                locations = torch.cat([locations, mined[1]])
                loc_strides = torch.cat([loc_strides, mined[2]])
                scores = torch.cat([scores, mined[3]])
                labels = torch.cat([labels, mined[4]])
            results.append(self.postprocess(
                descriptors, locations, loc_strides, scores, labels, mask_inputs[b], height, width,
                keep.numel(),
            ))
        return results

    def _excavate(
        self,
        descriptors: Tensor,
        locations: Tensor,
        loc_strides: Tensor,
        all_descriptors: Tensor,
        level_shapes: list[tuple[int, int]],
        feature: Tensor,
        size: tuple[int, int],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Mined descriptors of one image.

        Returns (K x D descriptors, K x 2 key positions, K strides (of their original
        descriptors' levels), K scores, K labels).

        Args:
            descriptors, locations, loc_strides: the N original descriptors of the image.
            all_descriptors: L x D descriptors of every cell (`flatten_levels` order).
            feature: F_E of the image; size: the image's (height, width).
        """
        cfg = self.config
        ms = cfg.mask_stride
        _, mh, mw = feature.shape
        heat = self.excavating.heat_maps(descriptors, locations, loc_strides, feature, ms)
        valid_hw = (math.ceil(size[0] / ms), math.ceil(size[1] / ms))
        orig, cells, heat_values = find_key_pixels(
            heat.sigmoid(), cfg.excavate_threshold, cfg.excavate_topk, valid_hw
        )
        xs, ys = cell_centres(mh, mw, ms, feature.device)
        key_positions = torch.stack([xs[cells % mw], ys[cells // mw]], dim=1)  # K x 2
        local = all_descriptors[
            cells_at(key_positions, loc_strides[orig], level_shapes, self.perceive_strides)
        ]
        mined, logits = self.excavating.mine(
            descriptors[orig], locations[orig], loc_strides[orig], key_positions, local
        )
        cls_scores, cls_labels = logits.softmax(dim=1)[:, 1:].max(dim=1)
        scores = heat_values * cls_scores
        keep = (scores > self.selection_threshold()).nonzero().squeeze(1)
        if keep.numel() > cfg.pre_topk:
            keep = keep[scores[keep].topk(cfg.pre_topk).indices]
        strides = loc_strides[orig]
        return mined[keep], key_positions[keep], strides[keep], scores[keep], cls_labels[keep] + 1

    def postprocess(
        self,
        descriptors: Tensor,
        locations: Tensor,
        loc_strides: Tensor,
        scores: Tensor,
        labels: Tensor,
        feature: Tensor,
        height: int,
        width: int,
        num_originals: int | None = None,
    ) -> dict[str, Tensor]:
        """Masks, duplicate removal (purifying groups or Matrix NMS), rescoring, resizing.

        Args:
            descriptors: N_all x D; locations: N_all x 2 pixels; loc_strides: N_all level
                strides; scores, labels: N_all.
            feature: the image's mask input (`mask_head.mask_input` of B), c x h x w.
            height, width: the image's size (before padding).
            num_originals: the first this many descriptors are original, the rest mined
                (None: all original); see `mask_windows`.
        """
        cfg = self.config
        device = feature.device
        if descriptors.shape[0] == 0:
            return _empty_result(height, width, device)
        ms = self.mask_output_stride
        vh, vw = math.ceil(height / ms), math.ceil(width / ms)
        probs = self.masks(
            descriptors, locations, loc_strides, feature, num_originals
        )[:, :vh, :vw].sigmoid()
        similarity = None  # kept for "decay", where it stands in for mask IoU in Matrix NMS
        if self.purifying is not None:
            similarity = self.purifying(descriptors, locations, loc_strides).sigmoid()  # N x N
            if cfg.purify_merge == "decay":
                similarity = (similarity + similarity.t()) / 2
            else:
                groups = group_by_similarity(similarity, scores, cfg.purify_threshold)
                scores, labels, probs = merge_groups(
                    groups, scores, labels, probs, cfg.purify_merge
                )
                similarity = None
        binary = probs > cfg.mask_threshold
        area = binary.flatten(1).sum(1).float()
        keep = area > 0
        scores, labels, probs, binary, area = (
            scores[keep], labels[keep], probs[keep], binary[keep], area[keep]
        )
        if similarity is not None:
            similarity = similarity[keep][:, keep]
            if cfg.purify_overlap != "similarity":
                similarity = PURIFY_OVERLAPS[cfg.purify_overlap](
                    similarity, mask_iou(binary, area)
                )
        # SOLOv2 "maskness": mean probability inside the binary mask
        scores = scores * (probs * binary).flatten(1).sum(1) / area.clamp(min=1)
        if self.purifying is None or similarity is not None:
            # Matrix NMS, on mask IoU or ("decay") on purifying's learned similarity
            scores, labels, _, kept = matrix_nms(
                binary, labels, scores, cfg.nms_kernel, cfg.nms_sigma, mask_area=area,
                overlap=similarity,
            )
            probs = probs[kept]
        keep = (scores > cfg.score_threshold).nonzero().squeeze(1)
        keep = keep[scores[keep].argsort(descending=True)][: cfg.max_instances]
        if keep.numel() == 0:
            return _empty_result(height, width, device)
        scores, labels, probs = scores[keep], labels[keep], probs[keep]
        full = F.interpolate(probs[:, None], scale_factor=ms, mode="bilinear",
                             align_corners=False)[:, 0, :height, :width]
        masks = full > cfg.mask_threshold  # K x H x W
        nonempty = masks.flatten(1).any(1)
        masks, scores, labels = masks[nonempty], scores[nonempty], labels[nonempty]
        if masks.shape[0] == 0:
            return _empty_result(height, width, device)
        return {
            "labels": labels.to(torch.int64),
            "scores": scores.float(),
            "masks": masks,
            "boxes": masks_to_boxes(masks).float(),
        }
