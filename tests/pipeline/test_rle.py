"""pipeline.rle: compressed RLE written and read in numpy, as pycocotools writes and reads it."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.rle import encode_counts, rles_pixels


def pycocotools_counts(masks: np.ndarray) -> list[str]:
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [rle["counts"].decode("ascii") for rle in rles]


def corner_and_block_masks() -> np.ndarray:
    masks = np.zeros((4, 300, 300), bool)
    masks[0, 100:250, 5:200] = True  # runs longer than 2**5: several 5-bit groups
    masks[1, 0, 0] = masks[1, -1, -1] = True  # foreground first: a first run of 0
    masks[3] = True  # one run of foreground after an empty background run
    return masks  # masks[2] stays empty: a single background run


@pytest.mark.parametrize(
    "masks",
    [
        np.random.default_rng(0).random((6, 13, 11)) > 0.5,  # many short runs
        np.random.default_rng(1).random((3, 40, 300)) > 0.97,  # sparse, wide
        corner_and_block_masks(),
        np.zeros((0, 8, 8), bool),
    ],
    ids=["dense", "sparse", "corners-and-blocks", "none"],
)
def test_encoded_counts_are_pycocotools_and_decode_to_the_same_pixels(masks):
    counts = encode_counts(masks)
    assert counts == pycocotools_counts(masks)
    inst, rows, cols = rles_pixels(counts, masks.shape[1])
    decoded = np.zeros_like(masks)
    decoded[inst, rows, cols] = True
    assert np.array_equal(decoded, masks)


def test_a_large_image_gives_values_of_many_groups():
    mask = np.zeros((1, 2000, 2000), bool)
    mask[0, 1500:, 1900:] = True  # a first run of 3.8 M pixels: 5 groups of 5 bits
    assert encode_counts(mask) == pycocotools_counts(mask)
