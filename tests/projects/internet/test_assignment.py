"""Level assignment and the per-level sets of InterNet (detectron2-free)."""
import pytest
import torch

from d2_refine.projects.internet.assignment import (
    assign_levels,
    fpn_round_levels,
    level_sets,
    pooling_levels,
    roi_size_levels,
)

STRIDES = [4, 8, 16, 32]


def _squares(sides):
    s = torch.tensor(sides, dtype=torch.float32)
    return torch.stack([torch.zeros_like(s), torch.zeros_like(s), s, s], dim=1)


def test_fpn_rule_rounds_instead_of_floor():
    # P4 holds sqrt(wh) in [224 / sqrt(2), 224 * sqrt(2)) = [158.4, 316.8); detectron2's floor rule: [224, 448)
    boxes = _squares([10, 79, 80, 158, 159, 224, 316, 317, 448, 2000])
    expect = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, 3])
    assert torch.equal(fpn_round_levels(boxes, STRIDES), expect)
    assert torch.equal(assign_levels(boxes, STRIDES, "fpn"), expect)


def test_fpn_rule_clamps_to_present_levels_and_handles_zero_area():
    boxes = torch.tensor([[5.0, 5.0, 5.0, 30.0], [0.0, 0.0, 1000.0, 1000.0]])
    assert fpn_round_levels(boxes, [8, 16]).tolist() == [0, 1]


def test_roi_size_rule():
    # finest level with sqrt(wh) <= 14 * stride = 56 / 112 / 224 / 448 px; beyond 448: len(strides)
    boxes = _squares([20, 56, 57, 112, 113, 224, 225, 448, 449])
    assert roi_size_levels(boxes, STRIDES, 14).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    assert pooling_levels(roi_size_levels(boxes, STRIDES, 14), 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3]


def test_unknown_assignment_and_bad_boxes_raise():
    with pytest.raises(ValueError, match="ASSIGNMENT must be one of"):
        assign_levels(_squares([10]), STRIDES, "floor")
    with pytest.raises(ValueError, match=r"Tensor\[R, 4\]"):
        assign_levels(torch.zeros(3, 5), STRIDES)


def test_level_sets_less_and_reliable():
    # RoIs:       0  1  2  3  4  5  6  7
    levels = torch.tensor([0, 0, 1, 1, 2, 3, 3, 1])
    labels = torch.tensor([2, 5, 1, 0, 3, 5, 4, 2])  # 5 = background (num_classes = 5)
    sets = level_sets(levels, labels, 5, [0, 1, 2])
    got = {lvl: (less.tolist(), rel.tolist()) for lvl, less, rel in sets}
    assert got == {0: ([0], [2, 3, 4, 6, 7]), 1: ([2, 3, 7], [4, 6]), 2: ([4], [6])}


def test_level_sets_skip_empty_levels_but_keep_background_only_levels():
    levels = torch.tensor([0, 2, 3])
    labels = torch.tensor([4, 1, 2])  # RoI 0 is background (num_classes 4)
    sets = level_sets(levels, labels, 4, [0, 1, 2])
    got = {lvl: (less.tolist(), rel.tolist()) for lvl, less, rel in sets}
    # level 1 has no RoI at all: skipped; level 0 has only a background RoI: it takes part, empty less set
    assert got == {0: ([], [1, 2]), 2: ([1], [2])}
    assert level_sets(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 4, [0, 1]) == []
