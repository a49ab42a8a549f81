"""Shared fixtures: one Ray instance per test session, tiny generated datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance with 2 CPUs, started once for the whole test session."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


TINY_OVERRIDES = [
    # A very small PEP and budget for tests that train through Ray Train.
    "model.fpn_channels=32",
    "model.head_channels=32",
    "model.tower_convs=1",
    "model.descriptor_dim=32",
    "model.mask_channels=32",
    "data.train_size=[96]",
    "data.max_size=96",
    "train.batch_size=2",
    "train.warmup_iters=5",
    "train.epochs=2",
    "train.milestones=[100]",
    "eval.batch_size=4",
]


@pytest.fixture(scope="session")
def tiny_config():
    """Factory: configs/tiny.yaml with TINY_OVERRIDES plus the given `key=value` overrides."""
    from pep_model import load_config

    def make(*overrides: str):
        return load_config(ROOT / "configs" / "tiny.yaml", TINY_OVERRIDES + list(overrides))

    return make


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory):
    """A generated crowded-scenes COCO folder: 12 train + 4 val images of 96 px."""
    from pipeline.synth import make_dataset

    root = tmp_path_factory.mktemp("tiny_coco")
    make_dataset(root, images=16, size=96, seed=3, val_fraction=0.25)
    return root


@pytest.fixture(scope="session")
def tiny_shards(ray_session, tiny_coco, tmp_path_factory):
    """`tiny_coco` prepared into train/ and val/ shards (a `--data` shards root)."""
    from pipeline.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("tiny_shards")
    for split in ("train", "val"):
        prepare(
            tiny_coco / split / "annotations.json",
            tiny_coco / split / "images",
            root / split,
            PrepareConfig(max_size=96),
        )
    return root
