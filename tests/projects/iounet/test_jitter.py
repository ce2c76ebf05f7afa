import pytest
import torch

from d2_refine.projects.iounet.jitter import IoUBalancedJitter, apply_deltas, delta_ious, make_delta_pool, pairwise_iou


def test_delta_pool_size_and_bins():
    deltas = make_delta_pool(16, 16)
    assert deltas.shape == (246016, 4)
    jit = IoUBalancedJitter(num_rois=1000, fg_iou=0.5, bin_pool=4000)
    assert jit.bin_sizes == (4000, 4000, 2372, 670, 79)
    assert len(jit.deltas) == sum(jit.bin_sizes)


def test_delta_iou_is_box_independent():
    deltas = make_delta_pool(4, 4)
    boxes = torch.tensor([[10.0, 20.0, 60.0, 40.0], [0.0, 0.0, 3.0, 300.0]], dtype=torch.float64)
    jittered = apply_deltas(boxes, deltas)
    for i in range(2):
        measured = pairwise_iou(jittered[i], boxes[i : i + 1])[:, 0]
        torch.testing.assert_close(measured, delta_ious(deltas), rtol=1e-9, atol=1e-9)


def test_pool_is_deterministic():
    a, b = IoUBalancedJitter(seed=0), IoUBalancedJitter(seed=0)
    assert torch.equal(a.deltas, b.deltas)
    assert "deltas" not in a.state_dict()  # non-persistent: checkpoints do not carry it


def test_returns_requested_iou_histogram():
    jit = IoUBalancedJitter(num_rois=1000, fg_iou=0.5, bin_pool=4000)
    gt = torch.tensor([[200.0, 200.0, 300.0, 260.0]])
    rois, ious, classes = jit(gt, torch.tensor([3]), image_size=(1000, 1000))
    # one GT: 201 per bin (79 in the top bin), fewer than num_rois, nothing clipped -> exact histogram
    hist = torch.histc(ious, bins=5, min=0.5, max=1.0)
    assert hist.tolist() == [201, 201, 201, 201, 79]
    assert (classes == 3).all()
    assert ious.min() >= 0.5 and ious.max() <= 1.0


def test_many_gts_are_capped_and_balanced():
    torch.manual_seed(0)
    jit = IoUBalancedJitter(num_rois=1000)
    gt = torch.tensor([[10.0, 10, 60, 60], [300, 300, 400, 420], [600, 100, 700, 150]])
    rois = jit.sample(gt, image_size=(1000, 1000))
    assert len(rois) == 1000
    rois, ious, classes = jit.label(rois, gt, torch.tensor([0, 1, 2]))
    hist = torch.histc(ious, bins=5, min=0.5, max=1.0)
    # every bin but the under-filled top one gets about a quarter of what was sampled
    assert (hist[:4] > 180).all() and (hist[:4] < 300).all()
    assert set(classes.tolist()) == {0, 1, 2}


def test_clipped_to_image_and_empty_gt():
    jit = IoUBalancedJitter(num_rois=100)
    rois = jit.sample(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), image_size=(40, 30))
    assert rois[:, 0::2].max() <= 30 and rois[:, 1::2].max() <= 40 and rois.min() >= 0
    rois, ious, classes = jit(torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.int64), (40, 30))
    assert rois.shape == (0, 4) and ious.shape == (0,) and classes.shape == (0,)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="fg_iou"):
        IoUBalancedJitter(fg_iou=1.0)
    with pytest.raises(ValueError, match="xy_steps"):
        make_delta_pool(1, 16)
