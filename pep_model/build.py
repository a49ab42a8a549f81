"""Builders: `build_model(ModelConfig) -> PEP`, and checkpoints as plain data.

A checkpoint is `{"model": state_dict, "config": config_to_dict(Config), **extra}` written
with `torch.save` and read with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pep_model.backbone import Backbone
from pep_model.config import Config, ModelConfig, config_from_dict, config_to_dict
from pep_model.excavating import ObjectExcavating
from pep_model.mask_learning import DynamicMaskHead, LinearMaskHead, MaskFeature
from pep_model.pep import PEP, PURIFY_MERGES, PURIFY_OVERLAPS
from pep_model.perceiving import SemanticsPerceiving
from pep_model.purifying import InstancePurifying


class CheckpointError(RuntimeError):
    """A checkpoint file is missing or not a PEP checkpoint."""


def build_model(config: ModelConfig) -> PEP:
    """Build PEP from its config; switched-off parts (excavate/purify) are not constructed."""
    if config.mask_head not in ("dynamic", "linear"):
        raise ValueError(f"model.mask_head must be dynamic or linear, got {config.mask_head!r}")
    if config.mask_head == "linear" and config.mask_channels != config.descriptor_dim:
        raise ValueError(
            f"model.mask_channels ({config.mask_channels}) must equal model.descriptor_dim "
            f"({config.descriptor_dim}) with model.mask_head=linear: a descriptor is then a "
            "1x1 kernel over the mask feature B"
        )
    for name in ("mask_window", "mined_mask_window"):
        side = getattr(config, name)
        if side < 0 or (side > 0 and config.mask_head != "dynamic"):
            raise ValueError(
                f"model.{name} must be 0 (whole image) or a side in level strides with "
                f"model.mask_head=dynamic, got {side} with {config.mask_head}"
            )
    if config.max_train_heat_maps < 0:
        raise ValueError(
            f"model.max_train_heat_maps must be 0 (all original descriptors) or a positive "
            f"count, got {config.max_train_heat_maps}"
        )
    if config.purify_merge not in PURIFY_MERGES:
        raise ValueError(
            f"model.purify_merge must be one of {PURIFY_MERGES}, got {config.purify_merge!r}"
        )
    if config.purify_overlap not in PURIFY_OVERLAPS:
        raise ValueError(
            f"model.purify_overlap must be one of {tuple(PURIFY_OVERLAPS)}, got "
            f"{config.purify_overlap!r}"
        )
    if config.mask_stride not in (4, 8):
        raise ValueError(f"model.mask_stride must be 4 or 8, got {config.mask_stride}")
    if config.mask_upsample not in (1, 2, 4) or config.mask_upsample > config.mask_stride:
        raise ValueError(
            f"model.mask_upsample must be 1, 2 or 4 (at most mask_stride), got "
            f"{config.mask_upsample}"
        )
    backbone = Backbone(
        config.backbone, config.fpn_channels, config.norm, config.trainable_layers,
        config.pretrained_path,
    )
    levels = list(config.perceive_levels)
    if not levels or levels != sorted(set(levels)) or not set(levels) <= {2, 3, 4, 5, 6}:
        raise ValueError(
            f"model.perceive_levels must be increasing FPN levels out of 2..6, got {levels}"
        )
    if len(config.scale_ranges) != len(levels):
        raise ValueError(
            f"model.scale_ranges needs one [lo, hi] per perceived FPN level {levels} "
            f"({len(levels)}), got {len(config.scale_ranges)}"
        )
    perceiving = SemanticsPerceiving(
        config.fpn_channels, config.num_classes, config.head_channels, config.tower_convs,
        config.descriptor_dim,
    )
    fused = tuple(s for s in backbone.strides if s <= 32)
    mask_feature = MaskFeature(config.fpn_channels, config.mask_channels, config.mask_stride,
                               fused)
    mask_head = (
        DynamicMaskHead(config.descriptor_dim, config.mask_channels, config.mask_head_channels,
                        config.mask_head_layers)
        if config.mask_head == "dynamic" else LinearMaskHead()
    )
    # the modules' initial draws leave the global RNG as it was: at one seed, every Table 2
    # variant starts (and, with `PEP._module_generator`, samples) as the Baseline does
    with torch.random.fork_rng(devices=[]):
        excavating = (
            ObjectExcavating(config.mask_channels, config.descriptor_dim, config.num_classes,
                             config.excavate_channels, config.excavate_local_descriptor)
            if config.excavate else None
        )
        purifying = (
            InstancePurifying(config.descriptor_dim, config.purify_embed_dim)
            if config.purify else None
        )
    return PEP(backbone, perceiving, mask_feature, mask_head, excavating, purifying,
               config)


def _as_config(config: Config | ModelConfig) -> Config:
    if isinstance(config, ModelConfig):
        return Config(model=config)
    if isinstance(config, Config):
        return config
    raise TypeError(f"expected a Config or ModelConfig, got {type(config).__name__}")


def save_checkpoint(path: str | Path, model: nn.Module, config: Config | ModelConfig,
                    **extra: Any) -> None:
    """Write `{"model": state_dict, "config": ..., **extra}`; extras must be plain data
    (numbers, strings, lists, dicts, tensors, e.g. an optimizer state_dict)."""
    model = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {**extra, "model": state, "config": config_to_dict(_as_config(config))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict (model state, config dict, extras), loaded weights_only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"{path}: cannot read checkpoint: {e}") from e
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise CheckpointError(f"{path}: not a PEP checkpoint (needs 'model' and 'config' keys)")
    return payload


def checkpoint_config(values: dict[str, Any]) -> Config:
    """The `Config` saved in a checkpoint. Checkpoints written before `model.mask_head`
    existed all had the linear mask head, so a missing key means "linear"."""
    model = values.get("model")
    if isinstance(model, dict) and "mask_head" not in model:
        values = {**values, "model": {**model, "mask_head": "linear"}}
    return config_from_dict(values)


def load_checkpoint(path: str | Path) -> tuple[PEP, Config]:
    """Rebuild the model from a checkpoint's config, load its weights; returns it in eval()."""
    payload = read_checkpoint(path)
    config = checkpoint_config(payload["config"])
    # the weights come from the checkpoint, not from the backbone's pretrained file
    model = build_model(dataclasses.replace(config.model, pretrained_path=None))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match its config: {e}") from e
    model.eval()
    return model, config
