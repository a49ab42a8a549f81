"""Fixtures for the model tests: a tiny PEP config and hand-built crowded scenes.

`PEP_TEST_DEVICE=cuda pytest tests/pep_model` runs the model tests on a GPU (default: cpu,
where nothing changes): inside each test module the device is torch's default device, so
the models and tensors the tests build land there. Inputs from session fixtures stay on the
CPU and the model moves them, as in training.
"""

from __future__ import annotations

import os

import pytest
import torch
from torchvision.ops import masks_to_boxes

from pep_model import ModelConfig

DEVICE = torch.device(os.environ.get("PEP_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="module", autouse=True)
def model_device():
    """PEP_TEST_DEVICE, torch's default device for the test module (on the CPU: untouched)."""
    if DEVICE.type == "cpu":
        yield DEVICE
        return
    torch.set_default_device(DEVICE)
    try:
        yield DEVICE
    finally:
        torch.set_default_device("cpu")


def tiny_config(**overrides) -> ModelConfig:
    """ResNet-18 with 32-wide heads: builds in well under a second."""
    values = dict(
        num_classes=3,
        backbone="resnet18",
        norm="bn",
        fpn_channels=32,
        head_channels=32,
        tower_convs=1,
        descriptor_dim=32,
        mask_channels=32,
        mask_stride=4,
        excavate_channels=16,
        purify_embed_dim=16,
    )
    values.update(overrides)
    return ModelConfig(**values)


def make_target(
    height: int,
    width: int,
    shapes: list[tuple[int, int, int, int, int]],
    crowd: list[bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Target dict from (label, x0, y0, x1, y1) rectangles (later ones drawn on top)."""
    masks = torch.zeros((len(shapes), height, width), dtype=torch.uint8)
    for i, (_, x0, y0, x1, y1) in enumerate(shapes):
        masks[i, y0:y1, x0:x1] = 1
    boxes = masks_to_boxes(masks) if shapes else torch.zeros((0, 4))
    boxes[:, 2:] += 1  # COCO-style exclusive right/bottom edges
    target = {
        "labels": torch.tensor([s[0] for s in shapes], dtype=torch.int64),
        "boxes": boxes.float(),
        "masks": masks,
    }
    if crowd is not None:
        target["iscrowd"] = torch.tensor(crowd, dtype=torch.bool)
    return target


@pytest.fixture(scope="session")
def crowded_batch():
    """Two images of different sizes with overlapping rectangles of 3 classes."""
    torch.manual_seed(0)
    images = [torch.rand(3, 96, 96), torch.rand(3, 64, 80)]
    targets = [
        make_target(
            96,
            96,
            [(1, 10, 10, 40, 40), (2, 30, 25, 60, 55), (3, 55, 50, 90, 90), (1, 5, 60, 25, 85)],
        ),
        make_target(64, 80, [(2, 5, 5, 30, 30), (2, 25, 20, 50, 45), (3, 50, 30, 75, 60)]),
    ]
    return images, targets
