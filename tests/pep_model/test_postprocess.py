"""Matrix NMS, purify grouping/merging and point NMS on small hand-computed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from pep_model.postprocess import (
    group_by_similarity,
    mask_iou,
    matrix_nms,
    merge_groups,
    point_nms,
)

# ---------------------------------------------------------------------------------------------
# matrix_nms
# ---------------------------------------------------------------------------------------------


def _box_mask(rows: tuple[int, int], cols: tuple[int, int], size: int = 4) -> torch.Tensor:
    """[size, size] bool mask, True on rows[0]..rows[1] x cols[0]..cols[1] (inclusive)."""
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return mask


# Four masks on a 4x4 grid, deliberately not given in score order:
#   input 0 = C: label 0, score 0.5, rows 0-1 x cols 2-3 (4 px)
#   input 1 = A: label 0, score 0.9, rows 0-1 x cols 0-2 (6 px)
#   input 2 = D: label 1, score 0.7, rows 1-2 x cols 0-2 (6 px)
#   input 3 = B: label 0, score 0.8, rows 0-1 x cols 1-3 (6 px)
# IoUs: A,B: inter rows 0-1 x cols 1-2 = 4, union 6+6-4 = 8 -> 0.5
#       A,C: inter rows 0-1 x col 2 = 2, union 6+4-2 = 8 -> 0.25
#       B,C: C inside B, inter 4, union 6 -> 2/3
#       A,D: inter row 1 x cols 0-2 = 3, union 9 -> 1/3 (different labels: no decay)
# Score order A, B, D, C. Compensation (max IoU with a higher same-label mask):
#   comp_A = 0, comp_B = iou(A,B) = 0.5, comp_D = 0 (only label-1 mask).
# Gaussian, sigma 2, decay_j = min_i exp(-2 * (iou_ij^2 - comp_i^2)):
#   B: i=A: exp(-2 * 0.25) = exp(-0.5)                    -> 0.8 * exp(-0.5) = 0.485225
#   C: i=A: exp(-2 * 1/16) = exp(-0.125) = 0.882497
#      i=B: exp(-2 * (4/9 - 1/4)) = exp(-7/18) = 0.677810 -> 0.5 * exp(-7/18) = 0.338905
#   D: no same-label mask above it                         -> 0.7
# Linear, decay_j = min_i (1 - iou_ij) / (1 - comp_i):
#   B: (1 - 0.5) / 1 = 0.5                                 -> 0.4
#   C: min((1 - 0.25) / 1, (1 - 2/3) / (1 - 0.5)) = 2/3    -> 0.333333
# Either way the decayed order is A (0.9), D (0.7), B, C -> keep_inds [1, 2, 3, 0].
HAND_MASKS = torch.stack(
    [
        _box_mask((0, 1), (2, 3)),
        _box_mask((0, 1), (0, 2)),
        _box_mask((1, 2), (0, 2)),
        _box_mask((0, 1), (1, 3)),
    ]
)
HAND_LABELS = torch.tensor([0, 0, 1, 0])
HAND_SCORES = torch.tensor([0.5, 0.9, 0.7, 0.8])


def test_matrix_nms_gaussian_matches_hand_computed_decay():
    scores, labels, masks, keep = matrix_nms(HAND_MASKS, HAND_LABELS, HAND_SCORES, sigma=2.0)
    expected = [0.9, 0.7, 0.8 * math.exp(-0.5), 0.5 * math.exp(-7 / 18)]
    torch.testing.assert_close(scores, torch.tensor(expected))
    assert scores[2].item() == pytest.approx(0.485225, abs=1e-6)
    assert scores[3].item() == pytest.approx(0.338905, abs=1e-6)
    assert keep.tolist() == [1, 2, 3, 0]
    assert keep.dtype == torch.int64
    assert labels.tolist() == [0, 1, 0, 0]
    assert torch.equal(masks, HAND_MASKS[keep])


def test_matrix_nms_linear_matches_hand_computed_decay():
    scores, labels, masks, keep = matrix_nms(HAND_MASKS, HAND_LABELS, HAND_SCORES, kernel="linear")
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7, 0.4, 0.5 * 2 / 3]))
    assert keep.tolist() == [1, 2, 3, 0]
    assert labels.tolist() == [0, 1, 0, 0]
    assert torch.equal(masks, HAND_MASKS[[1, 2, 3, 0]])


def test_matrix_nms_compensation_softens_decay_by_an_already_suppressed_mask():
    # Without compensation B would decay C by exp(-2 * 4/9) = 0.411 (score 0.206);
    # with it, by exp(-7/18) = 0.678 (score 0.339).
    scores, *_ = matrix_nms(HAND_MASKS, HAND_LABELS, HAND_SCORES)
    assert scores[3].item() == pytest.approx(0.5 * math.exp(-7 / 18), abs=1e-6)
    assert scores[3].item() > 0.5 * math.exp(-8 / 9) + 0.05


def test_matrix_nms_different_labels_do_not_decay_each_other():
    # D overlaps A (IoU 1/3) but has another label: undecayed. Same label: decayed by A.
    scores, _, _, keep = matrix_nms(HAND_MASKS, HAND_LABELS, HAND_SCORES)
    assert scores[keep.tolist().index(2)].item() == pytest.approx(0.7)
    same = torch.zeros(4, dtype=torch.int64)
    scores, _, _, keep = matrix_nms(HAND_MASKS, same, HAND_SCORES)
    # i=A: exp(-2 * (1/3)^2) = exp(-2/9); i=B: iou(B,D) = 2/10, exp(-2*(0.04 - 0.25)) > 1.
    assert scores[keep.tolist().index(2)].item() == pytest.approx(0.7 * math.exp(-2 / 9))


def test_matrix_nms_identical_masks_same_vs_different_label():
    masks = torch.stack([_box_mask((0, 1), (0, 1))] * 2)
    scores = torch.tensor([0.9, 0.6])
    same, *_ = matrix_nms(masks, torch.tensor([3, 3]), scores)
    torch.testing.assert_close(same, torch.tensor([0.9, 0.6 * math.exp(-2.0)]))
    linear, *_ = matrix_nms(masks, torch.tensor([3, 3]), scores, kernel="linear")
    torch.testing.assert_close(linear, torch.tensor([0.9, 0.0]))
    different, *_ = matrix_nms(masks, torch.tensor([3, 4]), scores)
    torch.testing.assert_close(different, scores)


def test_matrix_nms_linear_three_identical_masks_stays_finite():
    # comp = 1 for the second mask: (1 - 1) / (1 - 1) must not become NaN.
    masks = torch.stack([_box_mask((0, 1), (0, 1))] * 3)
    scores, *_ = matrix_nms(
        masks, torch.zeros(3, dtype=torch.int64), torch.tensor([0.9, 0.8, 0.7]), kernel="linear"
    )
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.0, 0.0]))


def test_matrix_nms_filter_thr_is_strictly_greater():
    # Decayed scores 0.9, 0.7, 0.485, 0.339: > 0.7 keeps A only (0.7 itself is dropped).
    scores, labels, masks, keep = matrix_nms(HAND_MASKS, HAND_LABELS, HAND_SCORES, filter_thr=0.7)
    assert keep.tolist() == [1]
    assert scores.tolist() == pytest.approx([0.9])
    assert labels.tolist() == [0] and masks.shape == (1, 4, 4)
    _, _, _, keep = matrix_nms(HAND_MASKS, HAND_LABELS, HAND_SCORES, filter_thr=0.45)
    assert keep.tolist() == [1, 2, 3]


def test_matrix_nms_max_num_caps_after_sorting():
    scores, labels, masks, keep = matrix_nms(HAND_MASKS, HAND_LABELS, HAND_SCORES, max_num=2)
    assert keep.tolist() == [1, 2]
    assert scores.shape == (2,) and labels.shape == (2,) and masks.shape == (2, 4, 4)
    _, _, _, keep = matrix_nms(HAND_MASKS, HAND_LABELS, HAND_SCORES, max_num=0)
    assert keep.numel() == 0


def test_matrix_nms_precomputed_mask_area_gives_same_result():
    area = HAND_MASKS.sum(dim=(1, 2))
    a = matrix_nms(HAND_MASKS, HAND_LABELS, HAND_SCORES)
    b = matrix_nms(HAND_MASKS, HAND_LABELS, HAND_SCORES, mask_area=area)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_matrix_nms_empty_input_returns_typed_empty_tensors():
    scores, labels, masks, keep = matrix_nms(
        torch.zeros(0, 5, 6, dtype=torch.bool),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, dtype=torch.float32),
    )
    assert scores.shape == (0,) and scores.dtype == torch.float32
    assert labels.shape == (0,) and labels.dtype == torch.int64
    assert masks.shape == (0, 5, 6) and masks.dtype == torch.bool
    assert keep.shape == (0,) and keep.dtype == torch.int64


def test_matrix_nms_unknown_kernel_raises_naming_it():
    with pytest.raises(ValueError, match="'box'"):
        matrix_nms(HAND_MASKS, HAND_LABELS, HAND_SCORES, kernel="box")


def test_matrix_nms_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="labels"):
        matrix_nms(HAND_MASKS, HAND_LABELS[:3], HAND_SCORES)


def _matrix_nms_by_definition(masks, labels, scores, kernel, sigma):
    """Paper definition, one pair at a time: decayed scores in input order."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    rank = {idx: r for r, idx in enumerate(order)}

    def iou(i, j):
        inter = (masks[i] & masks[j]).sum().item()
        union = (masks[i] | masks[j]).sum().item()
        return inter / union if union else 0.0

    def above(j):  # same-label masks scoring higher than j
        return [i for i in range(n) if rank[i] < rank[j] and labels[i] == labels[j]]

    def f(x):
        return math.exp(-sigma * x * x) if kernel == "gaussian" else 1.0 - x

    out = []
    for j in range(n):
        decay = 1.0
        for i in above(j):
            comp = max([iou(k, i) for k in above(i)], default=0.0)
            decay = min(decay, f(iou(i, j)) / max(f(comp), 1e-6))
        out.append(float(scores[j]) * decay)
    return out


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_matrix_nms_matches_pairwise_definition_on_random_masks(kernel):
    gen = torch.Generator(torch.get_default_device()).manual_seed(0)  # PEP_TEST_DEVICE
    masks = torch.rand(12, 8, 8, generator=gen) > 0.5
    labels = torch.randint(0, 3, (12,), generator=gen)
    scores = torch.rand(12, generator=gen)
    decayed, _, _, keep = matrix_nms(masks, labels, scores, kernel=kernel, sigma=2.0)
    expected = torch.tensor(_matrix_nms_by_definition(masks, labels, scores, kernel, 2.0))
    torch.testing.assert_close(decayed, expected[keep])
    assert sorted(keep.tolist()) == list(range(12))
    assert (decayed[:-1] >= decayed[1:]).all()
    assert (decayed <= scores[keep] + 1e-7).all()


# ---------------------------------------------------------------------------------------------
# group_by_similarity / merge_groups
# ---------------------------------------------------------------------------------------------


def test_duplicates_of_one_object_merge_into_one_instance():
    similarity = torch.full((3, 3), 0.9)
    scores = torch.tensor([0.25, 0.5, 0.25])
    labels = torch.tensor([2, 1, 2])  # the top member (index 1) has label 1, the majority 2
    mask_probs = torch.tensor([[[1.0, 0.0]], [[0.5, 1.0]], [[0.0, 0.2]]])  # [3, 1, 2]

    group_ids = group_by_similarity(similarity, scores, threshold=0.5)
    assert group_ids.tolist() == [0, 0, 0] and group_ids.dtype == torch.int64

    g_scores, g_labels, g_masks = merge_groups(group_ids, scores, labels, mask_probs)
    # Weights 0.25, 0.5, 0.25 (sum 1):
    #   pixel 0: 0.25 * 1.0 + 0.5 * 0.5 + 0.25 * 0.0 = 0.5
    #   pixel 1: 0.25 * 0.0 + 0.5 * 1.0 + 0.25 * 0.2 = 0.55
    torch.testing.assert_close(g_scores, torch.tensor([0.5]))
    assert g_labels.tolist() == [1]
    torch.testing.assert_close(g_masks, torch.tensor([[[0.5, 0.55]]]))


def test_two_touching_objects_stay_two_groups_in_seed_order():
    # Descriptors 0, 1 belong to object P, 2, 3 to object Q: 0.9 within, 0.3 across.
    similarity = torch.tensor(
        [
            [1.0, 0.9, 0.3, 0.3],
            [0.9, 1.0, 0.3, 0.3],
            [0.3, 0.3, 1.0, 0.9],
            [0.3, 0.3, 0.9, 1.0],
        ]
    )
    scores = torch.tensor([0.6, 0.8, 0.9, 0.7])  # descriptor 2 (object Q) seeds group 0
    group_ids = group_by_similarity(similarity, scores, threshold=0.5)
    assert group_ids.tolist() == [1, 1, 0, 0]

    labels = torch.tensor([1, 1, 2, 2])
    mask_probs = torch.stack([torch.full((2, 2), v) for v in (0.2, 0.4, 0.6, 0.8)])
    g_scores, g_labels, g_masks = merge_groups(group_ids, scores, labels, mask_probs)
    torch.testing.assert_close(g_scores, torch.tensor([0.9, 0.8]))  # ordered by group id
    assert g_labels.tolist() == [2, 1]
    # Group 0: (0.9 * 0.6 + 0.7 * 0.8) / 1.6 = 1.10 / 1.6 = 0.6875
    # Group 1: (0.6 * 0.2 + 0.8 * 0.4) / 1.4 = 0.44 / 1.4 = 0.314286
    torch.testing.assert_close(g_masks[:, 0, 0], torch.tensor([0.6875, 0.44 / 1.4]))
    assert g_masks.shape == (2, 2, 2)


CHAIN = torch.tensor(
    [
        [1.0, 0.8, 0.1],  # A ~ B
        [0.8, 1.0, 0.8],  # B ~ C
        [0.1, 0.8, 1.0],  # A !~ C
    ]
)


def test_chain_does_not_merge_ends_when_an_end_seeds():
    group_ids = group_by_similarity(CHAIN, torch.tensor([0.9, 0.8, 0.7]), threshold=0.5)
    assert group_ids.tolist() == [0, 0, 1]


def test_chain_middle_seed_takes_both_ends():
    group_ids = group_by_similarity(CHAIN, torch.tensor([0.7, 0.9, 0.8]), threshold=0.5)
    assert group_ids.tolist() == [0, 0, 0]


def test_similarity_threshold_is_inclusive_on_the_symmetrised_matrix():
    # Asymmetric: (0.75 + 0.25) / 2 = 0.5 exactly.
    similarity = torch.tensor([[1.0, 0.75], [0.25, 1.0]])
    scores = torch.tensor([0.9, 0.8])
    assert group_by_similarity(similarity, scores, threshold=0.5).tolist() == [0, 0]
    assert group_by_similarity(similarity, scores, threshold=0.5001).tolist() == [0, 1]
    # Using only one direction would give 0.75 (merge) or 0.25 (no merge) at 0.6 / 0.2.
    assert group_by_similarity(similarity, scores, threshold=0.6).tolist() == [0, 1]
    assert group_by_similarity(similarity, scores, threshold=0.2).tolist() == [0, 0]


def test_seed_joins_its_own_group_even_with_low_self_similarity():
    similarity = torch.zeros(3, 3)
    group_ids = group_by_similarity(similarity, torch.tensor([0.1, 0.3, 0.2]), threshold=0.5)
    assert group_ids.tolist() == [2, 0, 1]


def test_group_by_similarity_empty_input():
    group_ids = group_by_similarity(torch.zeros(0, 0), torch.zeros(0), threshold=0.5)
    assert group_ids.shape == (0,) and group_ids.dtype == torch.int64


def test_group_by_similarity_shape_mismatch_raises():
    with pytest.raises(ValueError, match="similarity"):
        group_by_similarity(torch.zeros(3, 2), torch.zeros(3), threshold=0.5)


def test_merge_groups_empty_input_returns_typed_empty_tensors():
    scores, labels, masks = merge_groups(
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, 3, 5),
    )
    assert scores.shape == (0,) and scores.dtype == torch.float32
    assert labels.shape == (0,) and labels.dtype == torch.int64
    assert masks.shape == (0, 3, 5) and masks.dtype == torch.float32


def test_merge_groups_all_zero_scores_fall_back_to_plain_mean():
    _, _, masks = merge_groups(
        torch.tensor([0, 0]),
        torch.zeros(2),
        torch.tensor([1, 1]),
        torch.tensor([[[0.2]], [[0.6]]]),
    )
    assert torch.isfinite(masks).all()
    torch.testing.assert_close(masks, torch.tensor([[[0.4]]]))


def test_merge_groups_seed_mode_keeps_the_top_members_own_mask():
    probs = torch.tensor([[[0.2]], [[0.9]], [[0.6]], [[0.1]]])
    scores, labels, masks = merge_groups(
        torch.tensor([0, 0, 1, 1]),
        torch.tensor([0.3, 0.8, 0.5, 0.5]),
        torch.tensor([1, 2, 3, 4]),
        probs,
        mask="seed",
    )
    torch.testing.assert_close(scores, torch.tensor([0.8, 0.5]))
    assert labels.tolist() == [2, 3]  # a score tie goes to the lower index
    torch.testing.assert_close(masks, torch.tensor([[[0.9]], [[0.6]]]))
    with pytest.raises(ValueError, match="unknown mask 'max'"):
        merge_groups(
            torch.tensor([0]),
            torch.ones(1),
            torch.ones(1, dtype=torch.int64),
            probs[:1],
            mask="max",
        )


def test_merge_groups_rejects_gaps_in_group_ids():
    with pytest.raises(ValueError, match=r"\[1\]"):
        merge_groups(
            torch.tensor([0, 2]),
            torch.ones(2),
            torch.ones(2, dtype=torch.int64),
            torch.zeros(2, 1, 1),
        )


# ---------------------------------------------------------------------------------------------
# point_nms
# ---------------------------------------------------------------------------------------------


def test_point_nms_keeps_only_local_maxima():
    heat = torch.tensor(
        [
            [
                [0.1, 0.2, 0.1, 0.0, 0.0],
                [0.2, 0.9, 0.3, 0.0, 0.0],
                [0.1, 0.3, 0.2, 0.1, 0.0],
                [0.0, 0.0, 0.1, 0.5, 0.4],
                [0.0, 0.0, 0.0, 0.4, 0.6],
            ]
        ]
    )
    kept = point_nms(heat)
    expected = torch.zeros_like(heat)
    expected[0, 1, 1] = 0.9
    expected[0, 4, 4] = 0.6  # 0.5 at (3, 3) is beaten by its neighbour 0.6
    # Corners of the zero background equal their 3x3 max (0) and stay 0.
    torch.testing.assert_close(kept, expected)


def test_point_nms_channels_are_independent_and_batched_input_works():
    heat = torch.zeros(2, 3, 3)
    heat[0, 1, 1] = 0.8
    heat[1, 1, 2] = 0.5
    heat[1, 1, 1] = 0.4  # beaten within its own channel only
    kept = point_nms(heat)
    assert kept[0, 1, 1] == pytest.approx(0.8)
    assert kept[1, 1, 2] == pytest.approx(0.5) and kept[1, 1, 1] == 0
    torch.testing.assert_close(point_nms(heat[None]), kept[None])


def test_point_nms_rejects_even_kernel():
    with pytest.raises(ValueError, match="odd"):
        point_nms(torch.zeros(1, 3, 3), kernel=2)


def test_matrix_nms_decays_by_a_given_overlap_instead_of_mask_iou():
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, :2], masks[1, 2:], masks[2, :, :2] = True, True, True  # 0 and 1 do not overlap
    labels = torch.ones(3, dtype=torch.int64)
    scores = torch.tensor([0.9, 0.8, 0.7])
    overlap = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
    decayed, _, _, keep = matrix_nms(masks, labels, scores, "linear", overlap=overlap)
    by_index = dict(zip(keep.tolist(), decayed.tolist()))
    assert by_index[1] == pytest.approx(0.8 * 0.1)  # decayed by its 0.9 "overlap" with 0
    assert by_index[2] == pytest.approx(0.7)  # its masks overlap 0 and 1, the given 0 counts
    with pytest.raises(ValueError, match="overlap must have shape"):
        matrix_nms(masks, labels, scores, overlap=overlap[:2])


def test_mask_iou_matches_hand_counts():
    masks = torch.zeros(3, 2, 4, dtype=torch.bool)
    masks[0, :, :2] = True  # 4 px
    masks[1, :, 1:3] = True  # 4 px, 2 shared with 0
    masks[2, 0, 3] = True  # 1 px, apart
    iou = mask_iou(masks)
    torch.testing.assert_close(
        iou, torch.tensor([[1.0, 2 / 6, 0.0], [2 / 6, 1.0, 0.0], [0.0, 0.0, 1.0]])
    )
    torch.testing.assert_close(mask_iou(masks, torch.tensor([4, 4, 1])), iou)
    assert mask_iou(masks[:0]).shape == (0, 0)  # nothing left after the empty-mask filter
