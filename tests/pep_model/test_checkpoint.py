"""Checkpoints: plain data, weights_only round trip with identical outputs, clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from pep_model import (
    CheckpointError,
    Config,
    build_model,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)


def test_round_trip_gives_identical_predictions(tmp_path):
    torch.manual_seed(0)
    config = Config(model=tiny_config())
    model = build_model(config.model).eval()
    model.set_inference_params(score_threshold=0.0, excavate_threshold=0.0, mask_threshold=0.3)
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(path, model, config, epoch=3, metrics={"segm_AP": 0.5})

    loaded, loaded_config = load_checkpoint(path)
    assert not loaded.training
    assert loaded_config == config
    loaded.set_inference_params(score_threshold=0.0, excavate_threshold=0.0, mask_threshold=0.3)
    images = [torch.rand(3, 64, 80), torch.rand(3, 48, 48)]
    expected, got = model(images), loaded(images)
    assert sum(p["labels"].numel() for p in expected) > 0
    for a, b in zip(expected, got):
        for key in a:
            assert torch.equal(a[key], b[key]), key

    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["epoch"] == 3 and raw["metrics"] == {"segm_AP": 0.5}
    assert read_checkpoint(path)["config"]["model"]["descriptor_dim"] == 32


def test_model_config_alone_is_wrapped_in_a_full_config(tmp_path):
    model_config = tiny_config(excavate=False, purify=False)
    path = tmp_path / "m.pt"
    save_checkpoint(path, build_model(model_config), model_config)
    model, config = load_checkpoint(path)
    assert config.model == model_config
    assert model.excavating is None and model.purifying is None


def test_missing_or_foreign_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="absent.pt"):
        load_checkpoint(tmp_path / "absent.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt"):
        load_checkpoint(foreign)
