"""benchmarks/diag_pep.py: descriptor ownership, purifying's pair/group statistics, switches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pep_model import build_model, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def diag(load_benchmark):
    return load_benchmark("diag_pep")


def test_owners_and_graph_errors_against_ground_truth(diag):
    masks = torch.zeros(2, 20, 20, dtype=torch.uint8)
    masks[0, 0:10, 0:10] = 1
    masks[1, 0:10, 8:20] = 1  # overlaps object 0 in columns 8-9
    # descriptors (x, y): two on object 0, one on object 1, one on the overlap, one outside
    positions = torch.tensor([[2.0, 2.0], [4.0, 5.0], [15.0, 3.0], [9.0, 4.0], [5.0, 15.0]])
    owners = diag.descriptor_owners(positions, masks)
    assert owners.tolist() == [0, 0, 1, -1, -1]

    similarity = torch.full((5, 5), 0.1)
    similarity.fill_diagonal_(1.0)
    similarity[0, 1] = similarity[1, 0] = 0.9  # same object, above the threshold
    similarity[0, 2] = similarity[2, 0] = 0.8  # different objects, above: a false merge
    scores = torch.tensor([0.9, 0.5, 0.4, 0.3, 0.2])  # descriptor 0 seeds the first group
    stats = diag.graph_stats(similarity, scores, owners, threshold=0.5)
    assert stats["same"].tolist() == pytest.approx([0.9])
    assert sorted(stats["different"].tolist()) == pytest.approx([0.1, 0.8])
    # groups: {0, 1, 2} (objects 0 and 1 merged), {3}, {4}
    assert stats["groups"] == 3 and stats["merged_groups"] == 1
    assert stats["objects_found"] == 2 and stats["split_objects"] == 0

    # below the threshold, object 0's descriptors fall into two groups: a split
    similarity[0, 1] = similarity[1, 0] = 0.3
    stats = diag.graph_stats(similarity, scores, owners, threshold=0.5)
    assert stats["merged_groups"] == 1 and stats["split_objects"] == 1


def test_switched_takes_modules_out_for_inference_and_restores_them(diag):
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        ["model.fpn_channels=32", "model.head_channels=32", "model.tower_convs=1"],
    )
    model = build_model(cfg.model).eval()
    excavating, purifying = model.excavating, model.purifying
    assert excavating is not None and purifying is not None
    image = [torch.rand(3, 64, 64)]
    with diag.switched(model, excavate=False, purify=False):
        assert model.excavating is None and model.purifying is None
        with torch.no_grad():
            (out,) = model(image)  # the Baseline's path: no mining, Matrix NMS
        assert out["masks"].shape[1:] == (64, 64)
    assert model.excavating is excavating and model.purifying is purifying

    # a --try row may take a module out beside its post-processing parameters
    params = diag.parse_try("excavate=false,purify_overlap=similarity")
    assert params == {"excavate": False, "purify_overlap": "similarity"}
    with diag.inference_params(model, **params):
        assert model.excavating is None and model.purifying is purifying
        assert model.config.purify_overlap == "similarity"
    assert model.excavating is excavating and model.config.purify_overlap == "min"


def test_best_ious_per_object_and_per_prediction(diag):
    gt = torch.zeros(2, 10, 10, dtype=torch.bool)
    gt[0, :5, :5] = True  # 25 px
    gt[1, 5:, 5:] = True  # 25 px
    pred = torch.zeros(3, 10, 10, dtype=torch.bool)
    pred[0, :5, :5] = True  # exactly object 0
    pred[1, :5, :4] = True  # 20 of object 0's 25 px: IoU 0.8
    pred[2, 0, 9] = True  # matches nothing
    objects, predictions = diag.best_ious(pred, gt)
    assert objects.tolist() == pytest.approx([1.0, 0.0])
    assert predictions.tolist() == pytest.approx([1.0, 0.8, 0.0])
    none_o, none_p = diag.best_ious(pred[:0], gt)
    assert none_o.tolist() == [0.0, 0.0] and none_p.numel() == 0


@pytest.mark.parametrize("trains_feature", [True, False])
def test_mask_loss_split_adds_up_to_the_models_own_mask_loss(
    diag, tiny_shards, tiny_config, trains_feature
):
    from pipeline import reader

    cfg = tiny_config(
        "model.mask_loss=bce_dice", f"model.mined_mask_trains_feature={str(trains_feature).lower()}"
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    batch = next(reader.local_batches(tiny_shards / "train", cfg.data, 4))
    # the same sub-sampling of descriptors and mined keys in both passes (the module RNG is
    # seeded from torch.initial_seed() when first used)
    torch.manual_seed(1)
    split = diag.mask_loss_split(model, [batch])
    torch.manual_seed(1)
    model._generators.clear()
    with torch.no_grad():
        own = model.train()(*batch)["loss_mask"]
    assert split["original"] > 0 and split["mined"] > 0
    total = split["original"] + split["mined"]
    mean = (
        split["original"] * split["original_loss"] + split["mined"] * split["mined_loss"]
    ) / total
    assert model.config.mask_loss_norm == "originals"  # Eq. 7's sum over N_ori
    assert mean * total / split["original"] == pytest.approx(float(own), rel=1e-5)
    assert model.config.mined_mask_trains_feature is trains_feature  # restored


def test_objects_found_only_with_the_mined_descriptors_are_counted(diag):
    """A stand-in model whose predictions depend on whether excavating is in: with it, it
    finds objects 0 and 1 (1 only at a low score); without it, objects 0 and 2."""
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, :4, :4] = masks[1, 8:, 8:] = masks[2, :4, 10:] = True

    class StandIn:
        excavating, purifying = object(), None

        def __call__(self, images):
            if self.excavating is not None:
                found, scores = masks[[0, 1]], torch.tensor([0.9, 0.6])
            else:
                found, scores = masks[[0, 2]], torch.tensor([0.8, 0.5])
            return [{"masks": found, "scores": scores}]

    model = StandIn()
    batches = [([torch.zeros(3, 16, 16)], [{"masks": masks}])] * 2
    found = diag.found_with_mining(model, batches, min_scores=(0.3, 0.55, 0.7))
    assert found[0.3] == {
        "objects": 6, "with": 4, "without": 4, "only_with": 2, "only_without": 2
    }
    assert found[0.55] == {  # object 2's 0.5 is under the bar
        "objects": 6, "with": 4, "without": 2, "only_with": 2, "only_without": 0
    }
    assert found[0.7]["only_with"] == 0 and found[0.7]["with"] == found[0.7]["without"] == 2
    assert model.excavating is not None  # restored
