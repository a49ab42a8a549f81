"""Loss terms: finite, each back-propagates into its own head; ablation switches; builder checks."""

from __future__ import annotations

import pytest
import torch
from conftest import make_target, tiny_config
from torchvision.models import resnet18

from pep_model import build_model
from pep_model.backbone import Backbone, PretrainedWeightsError

ALL_KEYS = {"loss_perceive", "loss_excavate", "loss_mined_cls", "loss_graph", "loss_mask"}

# the last layer of the head each loss term must reach
HEAD_OF = {
    "loss_perceive": "perceiving.cls_logits.weight",
    "loss_excavate": "excavating.heat_params.weight",
    "loss_mined_cls": "excavating.mined_cls.weight",
    "loss_graph": "purifying.project.2.weight",
    "loss_mask": "mask_feature.out.weight",
}


@pytest.fixture(scope="module")
def full_model():
    torch.manual_seed(0)
    return build_model(tiny_config()).train()


def test_every_loss_term_is_finite_and_reaches_its_own_head(full_model, crowded_batch):
    images, targets = crowded_batch
    losses = full_model(images, targets)
    assert set(losses) == ALL_KEYS
    params = dict(full_model.named_parameters())
    for key, loss in losses.items():
        assert loss.dim() == 0 and torch.isfinite(loss), key
        full_model.zero_grad()
        loss.backward(retain_graph=True)
        grad = params[HEAD_OF[key]].grad
        assert grad is not None and grad.abs().sum() > 0, f"{key} does not reach its head"
        # the descriptors D are trained by the mask term (and the graph term with
        # purify_trains_descriptors, off by default); the excavating terms read them
        # detached (by design, see pep_model/excavating.py)
        reaches_descriptors = params["perceiving.descriptors.weight"].grad is not None and bool(
            params["perceiving.descriptors.weight"].grad.abs().sum() > 0)
        assert reaches_descriptors == (key == "loss_mask"), key


def test_losses_decrease_on_a_few_steps(crowded_batch):
    torch.manual_seed(0)
    model = build_model(tiny_config()).train()
    images, targets = crowded_batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    totals = []
    for _ in range(8):
        total = sum(model(images, targets).values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(float(total))
    assert totals[-1] < totals[0]


@pytest.mark.parametrize(
    "excavate,purify,absent",
    [
        (False, False, {"loss_excavate", "loss_mined_cls", "loss_graph"}),
        (True, False, {"loss_graph"}),
        (False, True, {"loss_excavate", "loss_mined_cls"}),
    ],
)
def test_switched_off_parts_have_no_loss_and_no_parameters(crowded_batch, excavate, purify,
                                                           absent):
    model = build_model(tiny_config(excavate=excavate, purify=purify)).train()
    images, targets = crowded_batch
    losses = model(images, targets)
    assert set(losses) == ALL_KEYS - absent
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("excavating.") for n in names) == excavate
    assert any(n.startswith("purifying.") for n in names) == purify
    assert (model.excavating is not None) == excavate
    assert (model.purifying is not None) == purify


def test_images_without_targets_give_zero_losses_that_keep_the_graph(full_model):
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [make_target(64, 64, []), make_target(48, 64, [])]
    losses = full_model(images, targets)
    assert set(losses) == ALL_KEYS
    for key in ALL_KEYS - {"loss_perceive", "loss_graph"}:
        assert float(losses[key]) == 0.0, key
    assert torch.isfinite(losses["loss_perceive"]) and losses["loss_perceive"] > 0
    # the graph's predicted candidates are all background here: Eq. 5 keeps them apart
    assert full_model.config.purify_train_candidates > 0 and losses["loss_graph"] > 0
    full_model.zero_grad()
    sum(losses.values()).backward()  # must not raise


def test_crowd_only_image_trains(full_model):
    target = make_target(64, 64, [(1, 0, 0, 40, 40)], crowd=[True])
    losses = full_model([torch.rand(3, 64, 64)], [target])
    assert all(torch.isfinite(v) for v in losses.values())


def test_loss_weights_scale_their_terms(crowded_batch):
    images, targets = crowded_batch
    torch.manual_seed(0)
    base = build_model(tiny_config()).train()
    torch.manual_seed(0)
    weighted = build_model(tiny_config(delta=3.0, gamma=0.0)).train()
    weighted.load_state_dict(base.state_dict())
    torch.manual_seed(1)
    a = base(images, targets)
    torch.manual_seed(1)
    b = weighted(images, targets)
    assert torch.allclose(b["loss_mask"], 3 * a["loss_mask"], rtol=1e-4)
    assert float(b["loss_graph"]) == 0.0
    assert torch.allclose(b["loss_perceive"], a["loss_perceive"])


def test_training_mode_requires_targets(full_model):
    with pytest.raises(ValueError, match="targets"):
        full_model([torch.rand(3, 64, 64)])


def test_linear_mask_head_rejects_mask_channels_different_from_descriptor_dim():
    with pytest.raises(ValueError, match="mask_channels"):
        build_model(tiny_config(mask_head="linear", mask_channels=16))
    build_model(tiny_config(mask_channels=16))  # the dynamic head projects B to its own width
    with pytest.raises(ValueError, match="mask_head"):
        build_model(tiny_config(mask_head="conv"))


def test_pretrained_backbone_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    reference = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone = Backbone("resnet18", 32, norm="frozen_bn", pretrained_path=str(path))
    body = backbone.fpn.body
    assert torch.equal(body.conv1.weight, reference.conv1.weight)
    assert torch.equal(body.layer1[0].bn1.running_var, reference.layer1[0].bn1.running_var)


def test_missing_or_mismatched_pretrained_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(PretrainedWeightsError, match="nope.pth"):
        Backbone("resnet18", 32, pretrained_path=str(missing))
    wrong = tmp_path / "r18.pth"
    torch.save(resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(PretrainedWeightsError, match="r18.pth"):
        Backbone("resnet34", 32, pretrained_path=str(wrong))


def test_mined_masks_can_be_kept_from_training_the_general_feature(crowded_batch):
    images, targets = crowded_batch

    def losses_and_model(trains_feature):
        torch.manual_seed(0)
        cfg = tiny_config(excavate=True, purify=False, mined_mask_trains_feature=trains_feature)
        model = build_model(cfg)
        torch.manual_seed(1)  # the same descriptor and key sub-sampling in both
        return model.train()(images, targets), model

    full, full_model = losses_and_model(True)
    cut, cut_model = losses_and_model(False)
    for key in full:  # the forward pass is the same
        assert float(cut[key]) == pytest.approx(float(full[key]), rel=1e-5)
    for model, losses in ((full_model, full), (cut_model, cut)):
        model.zero_grad()
        losses["loss_mask"].backward()
        # the mined masks still train the excavating MLP
        assert model.excavating.mined_descriptor.weight.grad.abs().sum() > 0
    full_b = full_model.mask_feature.out.weight.grad
    cut_b = cut_model.mask_feature.out.weight.grad
    assert cut_b.abs().sum() > 0  # the original descriptors' masks still train B
    assert not torch.allclose(cut_b, full_b)  # but the mined ones no longer do



def test_heat_maps_train_on_a_random_subset_of_the_original_descriptors(crowded_batch):
    images, targets = crowded_batch

    def heat_map_rows(limit):
        torch.manual_seed(0)
        model = build_model(tiny_config(excavate=True, purify=False,
                                        max_train_heat_maps=limit)).train()
        rows, heat_maps = [], model.excavating.heat_maps

        def counted(descriptors, *args):
            rows.append(descriptors.shape[0])
            return heat_maps(descriptors, *args)

        model.excavating.heat_maps = counted
        losses = model(images, targets)
        losses["loss_excavate"].backward()
        assert torch.isfinite(losses["loss_excavate"])
        assert model.excavating.heat_params.weight.grad.abs().sum() > 0
        return rows

    every = heat_map_rows(0)  # one map per original descriptor
    assert len(every) == len(images) and min(every) > 3
    assert heat_map_rows(3) == [3] * len(images)
    with pytest.raises(ValueError, match="max_train_heat_maps"):
        build_model(tiny_config(max_train_heat_maps=-1))


def test_mask_loss_norm_originals_keeps_the_originals_weight(crowded_batch):
    images, targets = crowded_batch

    def loss_mask(**overrides):
        torch.manual_seed(0)
        model = build_model(tiny_config(excavate=True, purify=False, **overrides)).train()
        torch.manual_seed(1)  # the same descriptor and key sub-sampling in every call
        return float(model(images, targets)["loss_mask"])

    # without mined descriptors N_all = N_ori: both normalisers agree
    assert loss_mask(max_train_mined=0, mask_loss_norm="originals") == pytest.approx(
        loss_mask(max_train_mined=0, mask_loss_norm="all"), rel=1e-6
    )
    # with them, sum / N_ori exceeds the mean over N_all by N_all / N_ori > 1
    assert loss_mask(mask_loss_norm="originals") > 1.2 * loss_mask(mask_loss_norm="all")
    with pytest.raises(ValueError, match="mask_loss_norm: unknown 'sum'"):
        loss_mask(mask_loss_norm="sum")


def test_graph_candidates_are_the_top_predicted_cells_tagged_by_the_mask_they_lie_in(
    crowded_batch,
):
    _, targets = crowded_batch
    model = build_model(tiny_config(purify_train_candidates=6))
    target = targets[0]
    masks = target["masks"].bool()
    crowd = torch.tensor([False, False, False, True])  # the last rectangle is a crowd region
    positions = torch.tensor(
        [[15.0, 15.0], [45.0, 40.0], [80.0, 80.0], [10.0, 70.0], [92.0, 5.0], [35.0, 35.0],
         [100.0, 10.0], [20.0, 20.0]]
    )  # cell 6 lies outside the 96 x 96 image
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.95, 0.3])
    pos = torch.tensor([7])  # already a ground-truth positive node
    cells, ids = model._graph_candidates(scores, pos, positions, masks, crowd)
    # 0: in rectangle 0 only; 1: in 1 only; 2: in 2 only; 3: in the crowd region (left out);
    # 4: background; 5: in rectangles 0 and 1 (left out); 6: outside; 7: already a node
    assert cells.tolist() == [0, 1, 2, 4]
    assert ids.tolist() == [0, 1, 2, -1]


def test_graph_candidates_join_eq5_and_can_be_kept_from_training_the_descriptors(
    crowded_batch,
):
    images, targets = crowded_batch

    def graph_loss_and_model(**overrides):
        torch.manual_seed(0)
        model = build_model(tiny_config(excavate=False, purify=True, **overrides)).train()
        torch.manual_seed(1)
        return model(images, targets)["loss_graph"], model

    plain, _ = graph_loss_and_model(purify_train_candidates=0, purify_trains_descriptors=True)
    with_candidates, model = graph_loss_and_model(purify_train_candidates=16,
                                                  purify_trains_descriptors=True)
    assert with_candidates.item() != pytest.approx(plain.item(), rel=1e-4)
    model.zero_grad()
    with_candidates.backward()
    assert model.perceiving.descriptors.weight.grad.abs().sum() > 0
    detached, model = graph_loss_and_model(purify_train_candidates=16,
                                           purify_trains_descriptors=False)
    assert detached.item() == pytest.approx(with_candidates.item(), rel=1e-5)
    model.zero_grad()
    detached.backward()
    assert model.perceiving.descriptors.weight.grad is None
    assert model.purifying.project[0].weight.grad.abs().sum() > 0


def test_isolated_modules_leave_the_shared_network_training_as_the_baselines(crowded_batch):
    # modules off the shared network (Eq. 5 detached, mined masks off B and the mask head,
    # the originals' mask loss whole; the defaults), their own RNG and their own gradient
    # clipping: the shared weights follow the Baseline's step for step (to float rounding,
    # which a long run amplifies like a change of seed)
    isolated = dict(purify_trains_descriptors=False, purify_train_candidates=16,
                    mined_mask_trains_feature=False, mask_loss_norm="originals",
                    max_train_descriptors=8,  # the shared sub-sampling draws from the RNG
                    max_train_heat_maps=3)  # so does excavating's own, from its own RNG
    images, targets = crowded_batch
    trained = {}
    for excavate, purify in [(False, False), (True, True)]:
        torch.manual_seed(0)
        model = build_model(tiny_config(excavate=excavate, purify=purify, **isolated)).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
        for _ in range(3):
            losses = model(images, targets)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            for params in model.clip_groups():
                torch.nn.utils.clip_grad_norm_(params, 0.5)  # low: clipping does act
            optimizer.step()
        trained[excavate] = model
    baseline, pep = trained[False], trained[True]
    assert len(pep.clip_groups()) == 3 and len(baseline.clip_groups()) == 1
    shared = dict(baseline.named_parameters())
    for name, value in pep.named_parameters():
        if name.startswith(("excavating.", "purifying.")):
            continue
        torch.testing.assert_close(value, shared.pop(name), rtol=1e-4, atol=1e-5, msg=name)
    assert not shared  # the Baseline has no parameter PEP lacks
    moved = torch.cat([p.detach().flatten() for p in pep.excavating.parameters()])
    assert moved.abs().sum() > 0  # and the modules did train
