"""Typed configuration tree (model / data / train / eval), loaded from YAML with overrides.

One dataclass per section; `load_config(path, overrides=["train.lr=0.02"])` returns the
resolved tree, and `config_to_dict` gives the plain dict that is saved with every run.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override names an unknown key or a value of the wrong type."""


@dataclass
class ModelConfig:
    """The PEP network (paper Sec. 3) and its post-processing thresholds."""

    num_classes: int = 5  # C; class ids 1..C, 0 is background
    backbone: str = "resnet18"  # resnet18 | resnet34 | resnet50 | resnet101
    pretrained_path: str | None = None  # local torchvision ResNet state_dict; no downloads
    norm: str = "frozen_bn"  # backbone norm: frozen_bn | bn | gn
    trainable_layers: int = 5  # backbone stages trained (0..5), as torchvision
    fpn_channels: int = 256
    head_channels: int = 256  # width of the perceiving tower
    tower_convs: int = 4  # 3x3 conv + GN + ReLU blocks in the perceiving tower
    descriptor_dim: int = 256  # C_D: instance descriptor width
    mask_channels: int = 256  # C_B: general (mask) feature width
    mask_stride: int = 4  # stride of the general feature B (4 or 8)
    # Eq. 6: "dynamic" = each descriptor generates a small 1x1 conv stack over [B projected
    # to mask_head_channels; coordinates relative to the descriptor] (CondInst); "linear" =
    # one product of the descriptor with B (needs mask_channels = descriptor_dim), kept only
    # to reproduce the earlier measurements (BENCHMARKS.md).
    mask_head: str = "dynamic"
    mask_head_channels: int = 8  # width of B's projection and of the hidden dynamic convs
    mask_head_layers: int = 3  # dynamic 1x1 convs (8 wide, 3 layers: 169 numbers/descriptor)
    # Mask logits are upsampled (bilinear) by this factor before the loss and decoding, so
    # masks are predicted at mask_stride / mask_upsample (CondInst: 2). 1 = at B's stride.
    mask_upsample: int = 1
    # Side of the square window, in the descriptor's level strides, in which its mask is
    # computed and trained (0 = the whole image). Objects of a level are at most ~12 of its
    # strides (scale_ranges), so 24 leaves room around them; small objects' masks then cost
    # a window instead of the whole map, which pays for a finer mask_upsample.
    mask_window: int = 0
    # The same for mined descriptors, in their original descriptor's level strides, around the
    # key pixel (0 = the whole image). A mined descriptor carries its original's level, not
    # its own object's: the window must also hold a neighbour larger than the original.
    mined_mask_window: int = 0
    # Scale-based FPN level assignment (sqrt(area) in input pixels), one range per level P2..P6.
    # FPN levels the perceiving head runs on (2..6 = P2..P6). [3, 4, 5, 6] skips the stride-4
    # map, which carries ~3/4 of the head's pixels (the lean speed setting, see BENCHMARKS.md).
    perceive_levels: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6])
    # one [lo, hi] sqrt(box area) range per perceived level
    scale_ranges: list[list[float]] = field(
        default_factory=lambda: [[0, 48], [24, 96], [48, 192], [96, 384], [192, 100000]]
    )
    center_radius: float = 0.2  # centre region = box shrunk to this fraction around mass centre
    cls_loss: str = "ce"  # ce (paper Eq. 1-2) | focal
    mask_loss: str = "bce"  # bce (paper Eq. 7) | dice | bce_dice
    excavate: bool = True  # Table 2 switch: object excavating (Sec. 3.3)
    purify: bool = True  # Table 2 switch: instance purifying (Sec. 3.4); off -> Matrix NMS
    # Eq. 8 weights: L_P + alpha L_E + beta L_PE + gamma L_graph + delta L_mask
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    delta: float = 1.0
    # Training-time bounds on descriptor counts (keep cost bounded in crowded images).
    max_train_descriptors: int = 256
    max_train_mined: int = 128
    # Eq. 3's heat maps in training for at most this many of an image's original descriptors
    # (a random subset; 0 = all of them): each map covers the whole image.
    max_train_heat_maps: int = 0
    neighbour_expand: float = 0.5  # enlarge the original box by this fraction to find neighbours
    # Inference.
    score_threshold: float = 0.1  # final filter on the instances' scores
    # Candidate descriptors (original and mined) are selected at this fixed confidence, so the
    # groups purifying forms and the Matrix NMS decay do not depend on score_threshold: a run at
    # any score_threshold >= candidate_threshold equals filtering a run at candidate_threshold
    # (several thresholds from one pass). A lower score_threshold lowers the selection with it.
    candidate_threshold: float = 0.05
    pre_topk: int = 500  # original descriptors kept before excavating / purifying
    excavate_threshold: float = 0.3
    excavate_topk: int = 4  # key pixels per original descriptor
    purify_threshold: float = 0.5
    mask_threshold: float = 0.5
    nms_kernel: str = "gaussian"  # Matrix NMS decay: gaussian | linear
    nms_sigma: float = 2.0
    max_instances: int = 100
    # Added by the model (pep_model/): widths of the small heads and one inference switch.
    excavate_channels: int = 64  # width of the shared excavating feature F_E
    # mined descriptor MLP also sees the descriptor at the key pixel (measured: needed to learn
    # the neighbours' masks; the copied descriptor + coordinates alone reach segm AP ~0.4)
    excavate_local_descriptor: bool = True
    # Whether the mined descriptors' mask loss (Eq. 7) back-propagates into the shared mask
    # path: the general feature B and the mask head's own weights (the dynamic head's
    # controller). Their inputs are detached copies already (`ObjectExcavating.mine`); false
    # keeps the shared mask path to the original descriptors' masks (the mined masks still
    # train the excavating MLP). Default false: with it, `mask_loss_norm: originals` and
    # `purify_trains_descriptors: false` the modules train only their own layers and the
    # shared network trains as the Baseline's (README model card; BENCHMARKS.md, issue 16).
    mined_mask_trains_feature: bool = False
    # Normaliser of the mask loss (Eq. 7 is a sum over the N_all descriptors): "all" = mean
    # over N_all (mined descriptors dilute the originals' weight as they grow in number),
    # "originals" = sum / N_ori (the originals keep their weight; the mined add to it).
    mask_loss_norm: str = "originals"
    purify_embed_dim: int = 64  # width of the purifying embedding whose cosine gives M
    # Eq. 5 also over the descriptors inference will see: the top this many predicted cells
    # of an image (3x3 local maxima of the class scores, detached), each tagged with the
    # ground-truth mask it lies in (or background). 0: the ground-truth positive cells only.
    purify_train_candidates: int = 64
    # Whether Eq. 5 back-propagates into the descriptors D (false: it trains the purifying
    # projection only, as the excavating losses train their own layers).
    purify_trains_descriptors: bool = False
    # How purifying turns descriptors into instances: "mean" = greedy groups at
    # purify_threshold, each one instance with the score-weighted mean of its members' mask
    # probabilities; "seed" = the same groups with the top member's own mask; "decay" = no
    # hard groups: Matrix NMS's score decay with the learned similarity M in place of mask IoU
    # (the default: it beat "mean" by +0.07-0.10 segm AP on the same weights, BENCHMARKS.md).
    purify_merge: str = "decay"
    # What "decay" decays by: "similarity" = the learned M alone; "mean" / "max" / "min" = M
    # combined with the candidates' mask IoU (the evidence Matrix NMS uses) element-wise.
    # Default "min": a pair decays as duplicates only if M and the masks both say so.
    purify_overlap: str = "min"
    point_nms: bool = True  # keep only 3x3 local maxima of class scores as original descriptors


@dataclass
class DataConfig:
    """Shard preparation and the training-side reader."""

    max_size: int = 512  # longer side after resize in prepare (aspect kept)
    train_size: list[int] = field(default_factory=lambda: [256])  # scale-jitter: longer sides
    flip_prob: float = 0.5
    val_fraction: float = 0.2  # generated data only
    generated_images: int = 400  # generated data only
    generated_size: int = 256  # generated data only
    generated_object_scale: float = 1.0  # generated data only: object sizes x this
    generated_max_objects: int = 20  # generated data only: objects per image, at most
    # generated data only: "shapes" (the original scenes), "crowd" (dense same-class packs,
    # visible masks) or "amodal" (the same images, full-extent masks): pipeline.synth
    generated_scene: str = "shapes"
    reader_cpus: float = 0.5  # CPUs per Ray Data decode task
    # Training shards up to this size (MiB on disk, encoded) are read once and kept in Ray's
    # object store across epochs; larger ones are re-read every epoch. 0: always re-read.
    cache_shards_mb: float = 1024


@dataclass
class TrainConfig:
    """Optimisation recipe (paper Sec. 4.1 for the COCO configs) and Ray Train settings."""

    epochs: int = 12
    batch_size: int = 4  # per worker
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    optimizer: str = "sgd"  # sgd | adamw
    milestones: list[int] = field(default_factory=lambda: [9, 11])  # epochs where lr *= lr_gamma
    lr_gamma: float = 0.1
    warmup_iters: int = 100
    grad_clip: float = 10.0  # max gradient norm, per `PEP.clip_groups` (shared net, each module)
    amp: bool = True  # mixed precision, only used on GPU
    seed: int = 0
    num_workers: int = 1
    # CPUs each Ray Train worker reserves, and its torch threads (intra-op parallelism). One
    # CPU-only worker on a small machine trains faster with all cores than DDP over them.
    cpus_per_worker: int = 1
    use_gpu: str = "auto"  # auto | true | false
    max_failures: int = 2
    # A step whose loss is not finite on any worker is skipped by every worker (counted in
    # the epoch's `skipped_steps`); this many in a row stop the run with an error.
    max_nonfinite_steps: int = 5


@dataclass
class EvalConfig:
    """Evaluation and validation during training."""

    every_epochs: int = 1
    max_dets: int = 100
    score_thresholds: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.4, 0.5])
    batch_size: int = 4
    num_replicas: int = 1
    # Validation beside training scores the first `val_images` val images only (0: all); the
    # final evaluation always scores the whole val split.
    val_images: int = 0


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a dataclass field annotation, converting ints to floats."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            kwargs[name] = _build(hints[name], value, key)
        else:
            kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one `a.b=value` override (value parsed as YAML) to a nested dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. train.lr=0.02")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def config_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Build a `Config` from a (partial) nested dict plus `key=value` overrides."""
    tree = json.loads(json.dumps(values or {}))  # deep copy
    for override in overrides or []:
        _apply_override(tree, override)
    return _build(Config, tree, "")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (missing keys take defaults) and apply `key=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return config_from_dict(values, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path or '<defaults>'}: {e}") from None


def config_to_dict(config: Config) -> dict[str, Any]:
    """The plain nested dict of a config (what is saved with runs and checkpoints)."""
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML that `load_config` reads back unchanged."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
