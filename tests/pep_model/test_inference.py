"""Eval output contract: per-image sizes, dtypes, score order, caps, typed empty results."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from pep_model import build_model
from pep_model.pep import batch_images


@pytest.fixture(scope="module", params=[(True, True), (False, False)], ids=["pep", "baseline"])
def eval_model(request):
    excavate, purify = request.param
    torch.manual_seed(0)
    model = build_model(tiny_config(excavate=excavate, purify=purify)).eval()
    # an untrained model: accept everything so the outputs are not empty
    model.set_inference_params(score_threshold=0.0, excavate_threshold=0.0, mask_threshold=0.3)
    return model


def check_prediction(pred, height, width, max_instances):
    assert set(pred) == {"labels", "scores", "masks", "boxes"}
    k = pred["labels"].shape[0]
    assert k <= max_instances
    assert pred["labels"].dtype == torch.int64 and pred["labels"].shape == (k,)
    assert pred["scores"].dtype == torch.float32 and pred["scores"].shape == (k,)
    assert pred["masks"].dtype == torch.bool and pred["masks"].shape == (k, height, width)
    assert pred["boxes"].dtype == torch.float32 and pred["boxes"].shape == (k, 4)
    if k:
        assert (pred["scores"][:-1] >= pred["scores"][1:]).all()
        assert pred["masks"].flatten(1).any(1).all()
        assert (pred["boxes"][:, 2:] >= pred["boxes"][:, :2]).all()
        assert (pred["boxes"][:, 2] <= width).all() and (pred["boxes"][:, 3] <= height).all()


def test_predictions_have_each_images_size_and_types(eval_model):
    sizes = [(70, 90), (64, 48), (100, 33)]
    images = [torch.rand(3, h, w) for h, w in sizes]
    preds = eval_model(images)
    assert len(preds) == len(images)
    for pred, (h, w) in zip(preds, sizes):
        check_prediction(pred, h, w, eval_model.config.max_instances)
    assert sum(p["labels"].numel() for p in preds) > 0  # the contract was checked on something
    labels = torch.cat([p["labels"] for p in preds])
    assert ((labels >= 1) & (labels <= eval_model.config.num_classes)).all()


def test_max_instances_caps_the_output(eval_model):
    eval_model.set_inference_params(max_instances=2)
    try:
        preds = eval_model([torch.rand(3, 96, 96), torch.rand(3, 64, 64)])
    finally:
        eval_model.set_inference_params(max_instances=100)
    assert all(p["labels"].numel() <= 2 for p in preds)
    assert any(p["labels"].numel() == 2 for p in preds)


def test_nothing_above_threshold_gives_typed_empty_results(eval_model):
    eval_model.set_inference_params(score_threshold=1.0)
    try:
        preds = eval_model([torch.rand(3, 50, 60), torch.zeros(3, 32, 32)])
    finally:
        eval_model.set_inference_params(score_threshold=0.0)
    for pred, (h, w) in zip(preds, [(50, 60), (32, 32)]):
        check_prediction(pred, h, w, 100)
        assert pred["labels"].numel() == 0


@pytest.mark.parametrize("merge", ["seed", "decay"])
def test_purify_merge_modes_keep_the_output_contract(eval_model, merge):
    if eval_model.purifying is None:
        pytest.skip("purify_merge applies to purifying")
    images = [torch.rand(3, 70, 90), torch.rand(3, 64, 48)]
    torch.manual_seed(3)
    eval_model.set_inference_params(purify_merge=merge)
    try:
        preds = eval_model(images)
    finally:
        eval_model.set_inference_params(purify_merge="mean")
    for pred, (h, w) in zip(preds, [(70, 90), (64, 48)]):
        check_prediction(pred, h, w, eval_model.config.max_instances)
    assert sum(p["labels"].numel() for p in preds) > 0
    with pytest.raises(ValueError, match="purify_merge must be one of"):
        eval_model.set_inference_params(purify_merge="max")


def test_unknown_inference_parameter_is_rejected(eval_model):
    with pytest.raises(ValueError, match="num_classes"):
        eval_model.set_inference_params(num_classes=3)


def test_batch_images_pads_to_the_size_divisibility():
    images = [torch.ones(3, 33, 70), torch.ones(3, 64, 20)]
    batch, sizes = batch_images(images, 32)
    assert batch.shape == (2, 3, 64, 96)
    assert sizes == [(33, 70), (64, 20)]
    assert batch[0, :, 33:].abs().sum() == 0 and batch[0, :, :, 70:].abs().sum() == 0
    assert batch[1, :, :64, :20].eq(1).all()


def test_eval_is_deterministic(eval_model):
    image = torch.rand(3, 64, 64)
    a, b = eval_model([image])[0], eval_model([image])[0]
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("overlap,bias", [("min", 100.0), ("max", -100.0)])
def test_decay_by_similarity_and_iou_reduces_to_matrix_nms_when_the_similarity_is_moot(
    overlap, bias
):
    # purifying is built last, so one seed gives both models the same shared weights
    models = []
    for purify in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_config(excavate=False, purify=purify)).eval()
        model.set_inference_params(score_threshold=0.0, mask_threshold=0.3)
        models.append(model)
    baseline, purifying = models
    with torch.no_grad():  # M = 1 everywhere (min -> IoU) or 0 everywhere (max -> IoU)
        purifying.purifying.logit_scale.fill_(0.0)
        purifying.purifying.distance_weight.fill_(-100.0)
        purifying.purifying.logit_bias.fill_(bias)
    images = [torch.rand(3, 70, 90), torch.rand(3, 64, 48)]
    expected = baseline(images)
    purifying.set_inference_params(purify_merge="decay", purify_overlap=overlap)
    got = purifying(images)
    assert sum(p["labels"].numel() for p in expected) > 1
    for a, b in zip(expected, got):
        for key in a:
            torch.testing.assert_close(a[key], b[key], msg=key)
    with torch.no_grad():
        purifying.purifying.logit_bias.fill_(-100.0)
    purifying.set_inference_params(purify_overlap="similarity")  # M = 0 alone: no decay
    assert any(
        a["scores"].shape != b["scores"].shape or not torch.allclose(a["scores"], b["scores"])
        for a, b in zip(expected, purifying(images))
    )
    with pytest.raises(ValueError, match="purify_overlap must be one of"):
        purifying.set_inference_params(purify_overlap="iou")


def test_decay_with_every_mask_empty_gives_typed_empty_results(eval_model):
    if eval_model.purifying is None:
        pytest.skip("decay applies to purifying")
    eval_model.set_inference_params(purify_merge="decay", purify_overlap="min",
                                    mask_threshold=1.0)  # no pixel passes: all masks empty
    try:
        (pred,) = eval_model([torch.rand(3, 64, 64)])
    finally:
        eval_model.set_inference_params(purify_merge="mean", mask_threshold=0.3)
    check_prediction(pred, 64, 64, eval_model.config.max_instances)
    assert pred["labels"].numel() == 0
