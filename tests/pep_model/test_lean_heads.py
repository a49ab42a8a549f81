"""The lean speed setting: perceiving on P3..P6 only and the mask feature B at stride 8."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from pep_model import build_model

LEAN = dict(
    perceive_levels=[3, 4, 5, 6],
    scale_ranges=[[0, 48], [24, 96], [48, 192], [96, 100000]],
    mask_stride=8,
)


def test_lean_model_perceives_only_the_chosen_levels_and_trains(crowded_batch):
    torch.manual_seed(0)
    model = build_model(tiny_config(**LEAN)).train()
    assert model.perceive_strides == (8, 16, 32, 64)
    images, targets = crowded_batch
    features = model.backbone(model.preprocess(images)[0])
    assert features[0].shape[-1] == 96 // 4  # P2 is still built (B fuses it)
    cls_maps, _ = model.perceiving(features[1:], model.perceive_strides)
    assert [m.shape[-1] for m in cls_maps] == [12, 6, 3, 2]
    assert model.mask_feature(features).shape[-2:] == (12, 12)  # 96 px / stride 8

    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.perceiving.cls_logits.weight.grad.abs().sum() > 0


def test_lean_model_predicts_at_each_images_size(crowded_batch):
    torch.manual_seed(0)
    model = build_model(tiny_config(**LEAN)).eval()
    model.set_inference_params(score_threshold=0.0, excavate_threshold=0.0, mask_threshold=0.3)
    images, _ = crowded_batch
    with torch.no_grad():
        preds = model(images)
    for pred, image in zip(preds, images):
        assert pred["masks"].shape[1:] == image.shape[1:]
        assert pred["masks"].shape[0] > 0


@pytest.mark.parametrize(
    "levels, ranges, message",
    [
        ([3, 4, 5, 6], [[0, 48], [24, 96], [48, 192], [96, 384], [192, 1e5]], "one \\[lo, hi"),
        ([4, 3], [[0, 48], [24, 96]], "increasing FPN levels"),
        ([1, 2], [[0, 48], [24, 96]], "increasing FPN levels"),
    ],
)
def test_bad_perceive_levels_are_named(levels, ranges, message):
    with pytest.raises(ValueError, match=message):
        build_model(tiny_config(perceive_levels=levels, scale_ranges=ranges))
