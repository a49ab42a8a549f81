"""Target assignment on hand-built scenes: G_P (levels, cells, crowd), G_E, G_M, key pixels."""

from __future__ import annotations

import torch
from conftest import make_target

from pep_model.excavating import (
    excavate_targets,
    find_key_pixels,
    neighbour_matrix,
    sample_training_keys,
)
from pep_model.perceiving import cells_at, centre_regions, mass_centres, perceive_targets
from pep_model.purifying import graph_targets

STRIDES = (4, 8, 16, 32, 64)
SHAPES = [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]  # a 128 x 128 padded input
RANGES = [[0, 48], [24, 96], [48, 192], [96, 384], [192, 100000]]


def assign(target, radius=0.2):
    crowd = target.get("iscrowd", torch.zeros(len(target["labels"]), dtype=torch.bool))
    return perceive_targets(target["labels"], target["boxes"], target["masks"], crowd,
                            SHAPES, STRIDES, RANGES, radius)


def split_levels(flat):
    out, start = [], 0
    for h, w in SHAPES:
        out.append(flat[start:start + h * w].view(h, w))
        start += h * w
    return out


def positive_cells(level_map, value):
    return {tuple(ij) for ij in (level_map == value).nonzero().tolist()}


def test_instances_mark_centre_cells_on_the_levels_of_their_scale():
    # small 20x20 square -> P2 only; 60x60 square -> P3 and P4 (overlapping ranges)
    target = make_target(128, 128, [(1, 10, 10, 30, 30), (2, 60, 60, 120, 120)])
    cls, ids = assign(target)
    levels, id_levels = split_levels(cls), split_levels(ids)
    # mass centre (19.5, 19.5), half-size 0.2 * 20 / 2 = 2 px -> only cell (4, 4) at stride 4
    assert positive_cells(levels[0], 1) == {(4, 4)}
    assert positive_cells(levels[0], 2) == set()
    # centre (89.5, 89.5), half-size 6 px: stride-8 cell centres 84 and 92 -> 2 x 2 cells
    assert positive_cells(levels[1], 2) == {(10, 10), (10, 11), (11, 10), (11, 11)}
    assert positive_cells(levels[2], 2) == {(5, 5)}
    assert (levels[3] == 0).all() and (levels[4] == 0).all()
    assert positive_cells(id_levels[0], 0) == {(4, 4)}
    assert positive_cells(id_levels[1], 1) == positive_cells(levels[1], 2)
    assert ((cls > 0) == (ids >= 0)).all()


def test_centre_region_stays_inside_the_mask_but_keeps_the_mass_centre_cell():
    # an L shape whose mass centre falls outside the mask
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 0:40, 0:8] = True
    masks[0, 32:40, 0:40] = True
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
    centres = mass_centres(masks)
    region = centre_regions(masks, boxes, centres, 16, 16, 4, radius=1.0)
    ci, cj = int(centres[0, 1] // 4), int(centres[0, 0] // 4)
    assert not masks[0, ci * 4 + 2, cj * 4 + 2]  # the mass centre cell is outside the mask
    assert region[0, ci, cj]
    others = region[0].clone()
    others[ci, cj] = False
    ii, jj = others.nonzero(as_tuple=True)
    assert masks[0, ii * 4 + 2, jj * 4 + 2].all()  # every other marked cell is in the mask


def test_smaller_instance_wins_where_centre_regions_meet():
    # two overlapping 30x30 and 20x20 squares with the same mass-centre cell
    target = make_target(128, 128, [(1, 50, 50, 80, 80), (2, 55, 55, 75, 75)])
    cls, ids = assign(target, radius=1.0)
    p2 = split_levels(cls)[0]
    assert p2[16, 16] == 2  # the cell at (66, 66) is in both; the 20x20 one is smaller
    assert (p2 == 1).any()  # the larger one keeps cells the smaller does not cover
    assert split_levels(ids)[0][16, 16] == 1


def test_crowd_region_is_ignored_and_never_positive():
    target = make_target(128, 128, [(1, 0, 0, 64, 64), (2, 20, 20, 40, 40)], crowd=[True, False])
    cls, ids = assign(target)
    p2 = split_levels(cls)[0]
    assert (p2[:16, :16] != 0).all()  # the crowd area: ignored (-1) or the real instance
    assert positive_cells(p2, 2) != set()
    assert (cls != 1).all()  # the crowd region marks no positives
    assert (p2[16:, :] == 0).all() and (p2[:, 16:] == 0).all()
    assert set(ids[cls == -1].tolist()) == {-1}


def test_image_without_instances_is_all_background():
    target = make_target(128, 128, [])
    cls, ids = assign(target)
    assert cls.shape == (sum(h * w for h, w in SHAPES),)
    assert (cls == 0).all() and (ids == -1).all()


def test_neighbour_heat_targets_contain_exactly_the_overlapping_neighbours():
    # A and B touch; C is far away from both
    shapes = [(1, 10, 10, 40, 40), (2, 35, 10, 65, 40), (3, 90, 90, 120, 120)]
    target = make_target(128, 128, shapes)
    masks, boxes = target["masks"].bool(), target["boxes"]
    valid = torch.ones(3, dtype=torch.bool)
    neighbours = neighbour_matrix(boxes, valid, expand=0.5)
    assert neighbours.tolist() == [[False, True, False], [True, False, False],
                                   [False, False, False]]
    centres = centre_regions(masks, boxes, mass_centres(masks), 32, 32, 4, 0.2)
    heat = excavate_targets(torch.tensor([0, 0, 2]), neighbours, centres)
    assert heat.shape == (3, 32, 32)
    assert torch.equal(heat[0].bool(), centres[1])  # A's descriptors: B's centre only
    assert heat[2].sum() == 0  # C has no neighbours
    # an invalid (crowd) instance is nobody's neighbour
    assert not neighbour_matrix(boxes, torch.tensor([True, False, True]), 0.5)[0, 1]


def test_training_key_pixels_fall_in_the_neighbours_centre_regions():
    target = make_target(128, 128, [(1, 10, 10, 40, 40), (2, 35, 10, 65, 40), (3, 60, 30, 90, 60)])
    masks, boxes = target["masks"].bool(), target["boxes"]
    neighbours = neighbour_matrix(boxes, torch.ones(3, dtype=torch.bool), 0.5)
    centres = centre_regions(masks, boxes, mass_centres(masks), 32, 32, 4, 0.2)
    instance_ids = torch.tensor([0, 0, 1, 2])
    orig, targets, cells = sample_training_keys(instance_ids, neighbours, centres, max_mined=100)
    assert len(orig) == int(neighbours[instance_ids].sum())
    assert neighbours[instance_ids[orig], targets].all()
    assert centres.flatten(1)[targets, cells].all()
    orig, _, _ = sample_training_keys(instance_ids, neighbours, centres, max_mined=2)
    assert len(orig) == 2


def test_inference_key_pixels_are_thresholded_local_maxima():
    heat = torch.zeros(2, 16, 16)
    heat[0, 3, 4] = 0.9
    heat[0, 3, 5] = 0.8  # next to a higher one: not a local maximum
    heat[0, 10, 10] = 0.6
    heat[0, 14, 14] = 0.95  # outside the valid 12 x 12 image area
    heat[1, 8, 8] = 0.2  # below the threshold
    orig, cells, values = find_key_pixels(heat, threshold=0.3, topk=4, valid_hw=(12, 12))
    assert orig.tolist() == [0, 0]
    assert sorted(cells.tolist()) == [3 * 16 + 4, 10 * 16 + 10]
    assert torch.allclose(values.sort().values, torch.tensor([0.6, 0.9]))


def test_graph_targets_are_same_instance_blocks():
    g = graph_targets(torch.tensor([0, 0, 1, 2, 2, -1]))
    expected = torch.zeros(6, 6)
    expected[:2, :2] = 1
    expected[2, 2] = 1
    expected[3:5, 3:5] = 1
    assert torch.equal(g, expected)


def test_cells_at_finds_the_cell_on_the_requested_level():
    points = torch.tensor([[18.0, 30.0], [18.0, 30.0], [127.0, 127.0]])
    idx = cells_at(points, torch.tensor([4.0, 16.0, 64.0]), SHAPES, STRIDES)
    offsets = [0, 32 * 32, 32 * 32 + 16 * 16, 32 * 32 + 16 * 16 + 8 * 8,
               32 * 32 + 16 * 16 + 8 * 8 + 4 * 4]
    assert idx.tolist() == [7 * 32 + 4, offsets[2] + 1 * 8 + 1, offsets[4] + 3]
