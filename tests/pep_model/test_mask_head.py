"""Eq. 6's dynamic mask head: parameter split, agreement with a per-descriptor conv stack,
relative coordinates, and the one thing the linear head cannot do (two look-alikes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from pep_model import build_model, load_checkpoint, save_checkpoint
from pep_model.config import Config, config_to_dict
from pep_model.mask_learning import (
    DynamicMaskHead,
    LinearMaskHead,
    MaskWindow,
    parse_dynamic_params,
)
from pep_model.pep import OUTSIDE_WINDOW_LOGIT
from pep_model.perceiving import relative_coordinates


def test_three_layers_of_eight_take_169_numbers_split_into_weights_and_biases():
    head = DynamicMaskHead(descriptor_dim=16, feature_channels=32, channels=8, num_layers=3)
    assert head.channels == [10, 8, 8, 1]
    assert head.num_params == 10 * 8 + 8 * 8 + 8 * 1 + 8 + 8 + 1 == 169
    params = torch.arange(2 * 169, dtype=torch.float32).view(2, 169)
    weights, biases = parse_dynamic_params(params, head.weight_nums, head.bias_nums, head.channels)
    assert [tuple(w.shape) for w in weights] == [(2, 8, 10), (2, 8, 8), (2, 1, 8)]
    assert [tuple(b.shape) for b in biases] == [(2, 8, 1), (2, 8, 1), (2, 1, 1)]
    assert weights[0][1, 0, 0] == 169  # row-major, descriptor by descriptor
    assert biases[0][0, 0, 0] == 80 + 64 + 8  # biases follow all the weights
    assert biases[2][1, 0, 0] == 169 + 168


def test_relative_coordinates_are_zero_at_the_descriptor_and_scale_with_its_stride():
    locations = torch.tensor([[10.0, 6.0], [10.0, 6.0]])  # the centre of cell (1, 2) at stride 4
    rel = relative_coordinates(locations, torch.tensor([8.0, 16.0]), 4, 5, 4, scale=8.0)
    assert rel.shape == (2, 2, 20)
    assert torch.allclose(rel[:, :, 1 * 5 + 2], torch.zeros(2, 2))
    # one cell to the right: 4 px / (8 x stride)
    assert rel[0, 0, 1 * 5 + 3] == pytest.approx(4 / 64)
    assert rel[1, 0, 1 * 5 + 3] == pytest.approx(4 / 128)
    assert rel[0, 1, 2 * 5 + 2] == pytest.approx(4 / 64)  # one cell down


def test_dynamic_head_equals_each_descriptors_own_conv_stack():
    torch.manual_seed(0)
    head = DynamicMaskHead(descriptor_dim=12, feature_channels=6, channels=4, num_layers=3)
    torch.nn.init.normal_(head.controller.weight, std=0.5)  # far from the near-zero start
    descriptors = torch.randn(3, 12)
    locations = torch.tensor([[2.0, 2.0], [14.0, 6.0], [30.0, 18.0]])
    strides = torch.tensor([4.0, 8.0, 16.0])
    feature = head.mask_input(torch.randn(1, 6, 6, 9))[0]  # 4 x 6 x 9
    got = head(descriptors, locations, strides, feature, 4)
    assert got.shape == (3, 6, 9)
    weights, biases = parse_dynamic_params(
        head.controller(descriptors), head.weight_nums, head.bias_nums, head.channels
    )
    rel = relative_coordinates(locations, strides, 6, 9, 4, head.relative_scale).view(3, 2, 6, 9)
    for i in range(3):
        x = torch.cat([feature, rel[i]])[None]  # 1 x 6 x 6 x 9
        for layer, (w, b) in enumerate(zip(weights, biases)):
            x = F.conv2d(x, w[i][:, :, None, None], b[i][:, 0])
            if layer < len(weights) - 1:
                x = F.relu(x)
        assert torch.allclose(got[i], x[0, 0], atol=1e-5)
    assert head(descriptors[:0], locations[:0], strides[:0], feature, 4).shape == (0, 6, 9)


def _fit(head, feature, descriptors, locations, targets, steps=300):
    """Fit the head and the feature B itself (any B, learned) to the targets: mask IoUs."""
    feature = torch.nn.Parameter(feature.clone())
    optimizer = torch.optim.Adam([feature, *head.parameters()], lr=0.01)
    strides = torch.full((descriptors.shape[0],), 4.0)
    for _ in range(steps):
        logits = head(descriptors, locations, strides, head.mask_input(feature)[0], 4)
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = head(descriptors, locations, strides, head.mask_input(feature)[0], 4)
    inter = ((logits > 0) & (targets > 0.5)).flatten(1).sum(1)
    union = ((logits > 0) | (targets > 0.5)).flatten(1).sum(1)
    return inter / union


def test_only_the_dynamic_head_separates_two_look_alike_objects():
    """Two identical squares, one descriptor each, the descriptors equal: their masks can
    differ only through the descriptors' locations, which the linear head never sees."""
    torch.manual_seed(0)
    h = w = 16  # a 64-px image at stride 4
    targets = torch.zeros(2, h, w)
    targets[0, 3:7, 2:6] = 1
    targets[1, 9:13, 10:14] = 1
    feature = (targets.sum(0) > 0).float()[None, None].repeat(1, 8, 1, 1)  # B: "object here"
    descriptors = torch.ones(2, 8)
    locations = torch.tensor([[16.0, 20.0], [48.0, 44.0]])  # the squares' centres in pixels
    dynamic = _fit(DynamicMaskHead(8, 8, channels=8, num_layers=3), feature, descriptors,
                   locations, targets)
    linear = _fit(LinearMaskHead(), feature, descriptors, locations, targets)
    assert dynamic.min() > 0.9
    assert linear.max() < 0.6  # equal masks: at best both squares, IoU 0.5 with each


def test_checkpoints_without_mask_head_load_as_the_linear_head(tmp_path):
    """Checkpoints written before `model.mask_head` existed hold linear-head weights."""
    config = Config(model=tiny_config(mask_head="linear"))
    old = build_model(config.model)
    path = tmp_path / "old.pt"
    save_checkpoint(path, old, config)
    payload = torch.load(path, weights_only=True)
    del payload["config"]["model"]["mask_head"]
    torch.save(payload, path)
    model, loaded = load_checkpoint(path)
    assert loaded.model.mask_head == "linear"
    assert isinstance(model.mask_head, LinearMaskHead)
    assert config_to_dict(loaded) == config_to_dict(config)


def test_the_default_model_uses_the_dynamic_head_for_every_descriptor(crowded_batch):
    images, targets = crowded_batch
    torch.manual_seed(0)
    model = build_model(tiny_config()).train()  # excavate + purify on: mined masks too
    assert isinstance(model.mask_head, DynamicMaskHead)
    calls = []
    forward = model.mask_head.forward

    def spy(descriptors, locations, strides, feature, stride, window=None, frozen=False):
        calls.append((descriptors.shape[0], frozen))
        return forward(descriptors, locations, strides, feature, stride, window, frozen)

    model.mask_head.forward = spy
    losses = model(images, targets)
    # per image: the original descriptors, then the mined ones with the head frozen
    # (mined_mask_trains_feature false, the default)
    assert [frozen for _, frozen in calls] == [False, True] * len(images)
    assert all(n > 0 for n, _ in calls)
    losses["loss_mask"].backward()
    assert model.mask_head.controller.weight.grad.abs().sum() > 0
    assert model.mask_head.project.weight.grad.abs().sum() > 0
    model.eval()
    calls.clear()
    model.set_inference_params(score_threshold=0.0, candidate_threshold=0.0)
    model(images)
    assert len(calls) == len(images)


def test_upsampled_masks_are_trained_and_decoded_at_the_finer_stride(crowded_batch):
    images, targets = crowded_batch
    torch.manual_seed(0)
    model = build_model(tiny_config(excavate=False, purify=False, mask_upsample=2))
    assert model.mask_output_stride == 2
    feature = torch.randn(1, 32, 24, 24)
    mask_input = model.mask_head.mask_input(feature)[0]
    logits = model.masks(torch.randn(3, 32), torch.rand(3, 2) * 96, torch.full((3,), 4.0),
                         mask_input)
    assert logits.shape == (3, 48, 48)  # B at stride 4 (24 x 24) -> stride 2
    assert model.masks(torch.randn(0, 32), torch.rand(0, 2), torch.ones(0), mask_input).shape == (
        0, 48, 48,
    )
    losses = model.train()(images, targets)
    assert torch.isfinite(losses["loss_mask"])
    model.eval().set_inference_params(score_threshold=0.0, candidate_threshold=0.0)
    with torch.no_grad():
        outputs = model(images)
    for image, out in zip(images, outputs):
        assert out["masks"].shape[1:] == image.shape[1:]
    with pytest.raises(ValueError, match="mask_upsample"):
        build_model(tiny_config(mask_upsample=3))


def test_windows_are_centred_on_the_descriptor_and_clamped_inside_the_map():
    # stride-4 map of 10 x 12 cells; 4 x 4 windows
    locations = torch.tensor([[22.0, 18.0], [1.0, 1.0], [47.0, 39.0]])
    window = MaskWindow.around(locations, 4, 10, 12, 4)
    assert window.top.tolist() == [2, 0, 6]  # cell row 4 - 2; clamped at 0; 9 - 2 -> 10 - 4
    assert window.left.tolist() == [3, 0, 8]
    maps = torch.arange(3 * 10 * 12, dtype=torch.float32).view(3, 10, 12)
    crops = window.crop(maps)
    assert crops.shape == (3, 4, 4)
    assert torch.equal(crops[0], maps[0, 2:6, 3:7])
    assert torch.equal(window.crop(maps, torch.tensor([2, 2, 0]))[0], maps[2, 2:6, 3:7])
    pasted = window.paste(crops, torch.full((3, 10, 12), -1.0))
    inside = torch.zeros(3, 10, 12, dtype=torch.bool)
    for i, (top, left) in enumerate(zip(window.top.tolist(), window.left.tolist())):
        inside[i, top : top + 4, left : left + 4] = True
    assert torch.equal(pasted[inside], maps[inside])
    assert (pasted[~inside] == -1).all()
    fine = window.scaled(2)
    assert (fine.top.tolist(), fine.height) == ([4, 0, 12], 8)
    # a window larger than the map is the whole map
    whole = MaskWindow.around(locations, 32, 10, 12, 4)
    assert (whole.height, whole.width, whole.top.tolist()) == (10, 12, [0, 0, 0])


def test_dynamic_head_in_a_window_equals_the_whole_map_head_there():
    torch.manual_seed(0)
    head = DynamicMaskHead(descriptor_dim=12, feature_channels=6, channels=4, num_layers=3)
    torch.nn.init.normal_(head.controller.weight, std=0.5)
    descriptors = torch.randn(3, 12)
    locations = torch.tensor([[2.0, 2.0], [14.0, 26.0], [30.0, 18.0]])
    strides = torch.tensor([4.0, 4.0, 8.0])
    feature = head.mask_input(torch.randn(1, 6, 9, 11))[0]
    whole = head(descriptors, locations, strides, feature, 4)
    window = MaskWindow.around(locations, 5, 9, 11, 4)
    windowed = head(descriptors, locations, strides, feature, 4, window)
    assert windowed.shape == (3, 5, 5)
    assert torch.allclose(windowed, window.crop(whole), atol=1e-5)


def test_windowed_masks_train_and_decode_and_only_the_dynamic_head_has_them(crowded_batch):
    images, targets = crowded_batch
    torch.manual_seed(0)
    model = build_model(tiny_config(excavate=False, purify=False, mask_window=6,
                                    mask_upsample=2))
    whole = build_model(tiny_config(excavate=False, purify=False, mask_upsample=2))
    whole.load_state_dict(model.state_dict())
    mask_input = model.mask_head.mask_input(torch.randn(1, 32, 24, 24))[0]
    descriptors = torch.randn(3, 32)
    locations = torch.tensor([[40.0, 40.0], [8.0, 90.0], [50.0, 20.0]])
    strides = torch.tensor([4.0, 4.0, 16.0])  # 6 x 4 px -> 6-cell windows; 6 x 16 px: whole
    logits = model.masks(descriptors, locations, strides, mask_input)
    reference = whole.masks(descriptors, locations, strides, mask_input)
    assert logits.shape == reference.shape == (3, 48, 48)
    inside = logits != OUTSIDE_WINDOW_LOGIT
    assert inside[0].sum() == inside[1].sum() == 12 * 12  # 6 cells of B, upsampled x2
    assert inside[2].all()
    # same numbers inside the window, away from its border (bilinear edges differ)
    assert torch.allclose(logits[0, 14:26, 14:26][1:-1, 1:-1],
                          reference[0, 14:26, 14:26][1:-1, 1:-1], atol=1e-5)
    assert torch.allclose(logits[2], reference[2], atol=1e-5)
    losses = model.train()(images, targets)
    losses["loss_mask"].backward()
    assert torch.isfinite(losses["loss_mask"])
    assert model.mask_head.controller.weight.grad.abs().sum() > 0
    model.eval().set_inference_params(score_threshold=0.0, candidate_threshold=0.0)
    with torch.no_grad():
        outputs = model(images)
    for image, out in zip(images, outputs):
        assert out["masks"].shape[1:] == image.shape[1:]
    with pytest.raises(ValueError, match="mask_window"):
        build_model(tiny_config(mask_head="linear", mask_window=6))


def test_mined_descriptors_get_their_own_window_and_windows_train_under_autocast(crowded_batch):
    images, targets = crowded_batch
    torch.manual_seed(0)
    model = build_model(tiny_config(mask_window=6))  # excavating on: mined descriptors too
    mask_input = model.mask_head.mask_input(torch.randn(1, 32, 24, 24))[0]
    locations = torch.tensor([[40.0, 40.0], [40.0, 40.0], [80.0, 20.0]])
    descriptors = torch.randn(3, 32)
    # the last two are mined: by default their masks take the whole map
    logits = model.masks(descriptors, locations, torch.full((3,), 4.0), mask_input,
                         num_windowed=1)
    inside = logits != OUTSIDE_WINDOW_LOGIT
    assert inside[0].sum() == 6 * 6
    assert inside[1:].all()
    # mined_mask_window: a window of that many of the original's level strides around the key
    model.config.mined_mask_window = 10
    windowed = model.masks(descriptors, locations, torch.full((3,), 4.0), mask_input,
                           num_windowed=1)
    inside = windowed != OUTSIDE_WINDOW_LOGIT
    assert inside[0].sum() == 6 * 6 and inside[1].sum() == inside[2].sum() == 10 * 10
    assert inside[2, 0:10, 14:24].all()  # around cell (5, 20), shifted inside the map
    assert inside[1, 5:15, 5:15].all()  # around cell (10, 10)
    assert torch.equal(windowed[0], logits[0])
    assert torch.allclose(windowed[inside], logits[inside], atol=1e-5)  # same numbers inside
    # the mined masks' loss trains inside their windows, with both windows on
    model.train()
    losses = model(images, targets)
    assert torch.isfinite(losses["loss_mask"])
    with pytest.raises(ValueError, match="mined_mask_window"):
        build_model(tiny_config(mined_mask_window=-1))
    # GPU training runs under autocast (train.amp); bfloat16 on the CPU takes the same path
    for window in (0, 6):
        model = build_model(tiny_config(mask_window=window)).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model(images, targets)
        assert losses["loss_mask"].dtype == torch.float32
        sum(losses.values()).backward()
        assert torch.isfinite(losses["loss_mask"])
