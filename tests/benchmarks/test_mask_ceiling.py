"""benchmarks/mask_ceiling.py: the ground truth's own stride-s mask targets, decoded and scored."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils


@pytest.fixture(scope="module")
def ceiling(load_benchmark):
    return load_benchmark("mask_ceiling")


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


@pytest.fixture()
def annotations(tmp_path):
    """One 32x32 image: a 16x16 square on the stride-4 grid, and a single-pixel object."""
    square = np.zeros((32, 32), dtype=np.uint8)
    square[4:20, 8:24] = 1
    dot = np.zeros((32, 32), dtype=np.uint8)
    dot[28, 2] = 1
    anns = [
        {
            "id": i + 1,
            "image_id": 1,
            "category_id": 1,
            "segmentation": _rle(m),
            "area": float(m.sum()),
            "bbox": [0, 0, 1, 1],
            "iscrowd": 0,
        }
        for i, m in enumerate([square, dot])
    ]
    data = {
        "images": [{"id": 1, "width": 32, "height": 32, "file_name": "a.png"}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(data))
    return path


def test_targets_are_area_fractions_and_empty_ones_are_dropped(ceiling):
    masks = torch.zeros(2, 10, 10, dtype=torch.bool)
    masks[0, 0:4, 0:4] = True  # exactly one stride-4 cell
    masks[1, 9, 9] = True  # one pixel of the padded corner cell
    targets = ceiling.stride_targets(masks, 4)
    assert targets.shape == (2, 3, 3)  # 10 px pads to 12
    assert targets[0, 0, 0].item() == 1.0 and targets[0].sum().item() == 1.0
    assert targets[1, 2, 2].item() == pytest.approx(1 / 16)
    decoded = ceiling.decode_targets(targets, 4, (10, 10))
    assert decoded.shape == (2, 10, 10)
    assert decoded[0, 1, 1] and not decoded[0, 6, 6]
    assert not decoded[1].any()  # its stride-4 binary is empty: postprocess drops it


def test_stride_one_is_exact_and_stride_four_loses_the_dot(ceiling, annotations):
    exact = ceiling.ceiling(annotations, max_size=32, stride=1, max_dets=100)
    assert exact["segm/AP"] == pytest.approx(1.0)
    assert exact["dropped"] == 0 and exact["iou_median"] == pytest.approx(1.0)

    coarse = ceiling.ceiling(annotations, max_size=32, stride=4, max_dets=100)
    assert coarse["objects"] == 2 and coarse["dropped"] == 1
    assert coarse["iou_ge_50"] == pytest.approx(0.5)  # the square survives, the dot does not
    # one of two objects can be found at all: recall <= 0.5 at every IoU threshold, so at most
    # 51 of COCOeval's 101 recall points (0, 0.01, .., 0.5) have precision
    assert 0.3 < coarse["segm/AP"] <= 51 / 101 + 1e-6


def test_main_prints_one_row_per_stride(ceiling, annotations, capsys):
    ceiling.main([str(annotations), "--max-size", "32", "--strides", "4", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["4", "1"]
    assert rows[2].split("|")[7].strip() == "1.000"  # stride 1: segm AP 1
