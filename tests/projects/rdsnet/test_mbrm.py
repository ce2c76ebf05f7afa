"""MBRM (torch-only): known edges of synthetic soft masks, image borders, boxes wider than the image, N = 0."""
import math

import pytest
import torch

from d2_refine.projects.rdsnet.mbrm import (
    MBRM,
    MBRM_DEFAULT_BIAS,
    MBRM_DEFAULT_KERNEL,
    edge_distributions,
    edge_evidence,
    mask_profiles,
    mbrm_refine_boxes,
)
from helpers import cpu_and_cuda


def _ramp(n, lo, hi, s):
    """1-D soft profile on [0, n): 0.5 at pixel indices lo and hi, ~1 between, logistic ramps of scale s."""
    i = torch.arange(n, dtype=torch.float64)
    return torch.sigmoid((i - lo) / s) * torch.sigmoid((hi - i) / s)


def _loop_reference(masks, boxes, kernel, bias, gamma, cutoff):
    """MBRM (RDSNet paper, AAAI 2020) written edge by edge with Python loops (float64), detectron2 box convention."""
    out = []
    for m, (x1, y1, x2, y2) in zip(masks.double(), boxes.double().tolist()):
        h_prof, v_prof = m.max(dim=0).values.tolist(), m.max(dim=1).values.tolist()
        res = []
        for prof, center, side, rev in ((h_prof, x1, x2 - 1 - x1, False), (v_prof, y1, y2 - 1 - y1, False),
                                        (h_prof, x2 - 1, x2 - 1 - x1, True), (v_prof, y2 - 1, y2 - 1 - y1, True)):
            w = list(reversed(kernel)) if rev else list(kernel)
            sigma = max(1.0, gamma * side)
            scores = []
            for i in range(len(prof)):
                e = bias + sum(w[k] * (prof[i + k - 4] if 0 <= i + k - 4 < len(prof) else 0.0) for k in range(9))
                prior = math.exp(-((i - center) ** 2) / (2 * sigma ** 2))
                scores.append(1 / (1 + math.exp(-e)) * (prior if prior > cutoff else 0.0))
            res.append(max(range(len(scores)), key=lambda j: scores[j]))
        out.append([res[0], res[1], res[2] + 1, res[3] + 1])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("s", [0.3, 0.5, 0.8])
def test_recovers_known_edges_of_soft_rectangles(device, s):
    # object: columns 60..230, rows 40..200 (inclusive) -> detectron2 box (60, 40, 231, 201)
    mask = _ramp(256, 40, 200, s)[:, None] * _ramp(256, 60, 230, s)[None, :]
    truth = torch.tensor([60.0, 40.0, 231.0, 201.0])
    g = torch.Generator().manual_seed(0)
    boxes = truth + torch.randint(-4, 5, (40, 4), generator=g).float()
    refined = mbrm_refine_boxes(mask.float().expand(40, -1, -1).to(device), boxes.to(device))
    assert refined.dtype == boxes.dtype
    torch.testing.assert_close(refined.cpu(), truth.expand(40, 4))
    # the jittered inputs really were wrong, so the test can fail
    assert (boxes != truth).any(dim=1).float().mean() > 0.9


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_recovers_known_edges_of_soft_disk(device):
    i = torch.arange(256, dtype=torch.float32)
    yy, xx = torch.meshgrid(i, i, indexing="ij")
    disk = torch.sigmoid((70 - ((xx - 120) ** 2 + (yy - 130) ** 2).sqrt()) / 0.5)
    truth = torch.tensor([50.0, 60.0, 191.0, 201.0])
    boxes = truth + torch.tensor([[3.0, -2.0, -4.0, 1.0], [-3.0, 4.0, 2.0, -4.0]])
    refined = MBRM()(disk.expand(2, -1, -1).to(device), boxes.to(device))
    torch.testing.assert_close(refined.cpu(), truth.expand(2, 4))


def test_vectorised_matches_loop_reference():
    g = torch.Generator().manual_seed(1)
    n, h, w = 6, 23, 31
    masks = torch.rand(n, h, w, generator=g) ** 3
    x1 = torch.randint(0, w - 2, (n,), generator=g).float()
    y1 = torch.randint(0, h - 2, (n,), generator=g).float()
    boxes = torch.stack([x1, y1, (x1 + 2 + torch.rand(n, generator=g) * (w - x1 - 2)).floor(),
                         (y1 + 2 + torch.rand(n, generator=g) * (h - y1 - 2)).floor()], dim=1)
    ours = mbrm_refine_boxes(masks.double(), boxes.double())
    ref = _loop_reference(masks, boxes, MBRM_DEFAULT_KERNEL, MBRM_DEFAULT_BIAS, 0.05, 0.0044)
    torch.testing.assert_close(ours, ref)


def test_edge_evidence_is_zero_padded_cross_correlation():
    prof = torch.rand(2, 12, dtype=torch.float64)
    w = torch.tensor(MBRM_DEFAULT_KERNEL, dtype=torch.float64)
    b = torch.tensor([MBRM_DEFAULT_BIAS], dtype=torch.float64)
    padded = torch.nn.functional.pad(prof, (4, 4))
    for reverse in (False, True):
        k = w.flip(0) if reverse else w
        expected = torch.sigmoid(b + torch.stack([(padded[:, i:i + 9] * k).sum(1) for i in range(12)], dim=1))
        torch.testing.assert_close(edge_evidence(prof, w, b, reverse=reverse), expected)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_box_at_image_border(device):
    # object touching the left/top border and the right/bottom border: columns 0..99 of 100, rows 0..69 of 80
    mask = _ramp(80, -50, 69, 0.5)[:, None] * _ramp(100, -50, 150, 0.5)[None, :]
    boxes = torch.tensor([[0.0, 0.0, 100.0, 70.0], [2.0, 1.0, 97.0, 68.0]])
    refined = mbrm_refine_boxes(mask.float().expand(2, -1, -1).to(device), boxes.to(device))
    torch.testing.assert_close(refined.cpu(), torch.tensor([[0.0, 0.0, 100.0, 70.0]]).expand(2, 4))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_box_wider_than_image(device):
    # the object spans the whole width
    # (rows 20..99 of 120, all 50 columns); the detector's box sticks out on both sides
    mask = _ramp(120, 20, 99, 0.5)[:, None] * torch.ones(1, 50, dtype=torch.float64)
    boxes = torch.tensor([[-6.0, 18.0, 57.0, 102.0], [-8.0, 22.0, 58.0, 98.0]])
    refined = mbrm_refine_boxes(mask.float().expand(2, -1, -1).to(device), boxes.to(device))
    torch.testing.assert_close(refined.cpu(), torch.tensor([[0.0, 20.0, 50.0, 100.0]]).expand(2, 4))
    assert torch.isfinite(refined).all()


def test_edge_without_prior_mass_keeps_detector_edge():
    mask = torch.zeros(1, 20, 20)
    mask[0, 5:15, 5:15] = 1
    # left/right priors (sigma 1) sit 30+ pixels outside the image: no mass -> keep the input edges
    boxes = torch.tensor([[-40.0, 5.0, -30.0, 15.0]])
    refined = mbrm_refine_boxes(mask, boxes)
    assert torch.isfinite(refined).all()
    assert refined[0, 0] == -40 and refined[0, 2] == -30
    assert 0 <= refined[0, 1] < 20 and 0 < refined[0, 3] <= 20


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_zero_detections(device):
    module = MBRM().to(device)
    out = module(torch.zeros(0, 30, 40, device=device), torch.zeros(0, 4, device=device))
    assert out.shape == (0, 4) and out.device.type == device
    h, v = mask_profiles(torch.zeros(0, 30, 40))
    assert h.shape == (0, 40) and v.shape == (0, 30)


def test_expectation_decode_is_the_mean_of_the_edge_distributions():
    mask = _ramp(256, 40, 200, 0.8)[:, None] * _ramp(256, 60, 230, 0.8)[None, :]
    boxes = torch.tensor([[62.0, 37.0, 234.0, 200.0]])
    exp = mbrm_refine_boxes(mask.float()[None], boxes, decode="expectation")
    kernel, bias = torch.tensor(MBRM_DEFAULT_KERNEL), torch.tensor([MBRM_DEFAULT_BIAS])
    left, top, right, bottom, valid = edge_distributions(*mask_profiles(mask.float()[None]), boxes, kernel, bias)
    assert valid.all()
    idx = torch.arange(256, dtype=torch.float32)
    expected = torch.stack([(d[0] * idx).sum() for d in (left, top, right, bottom)]) + torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(exp[0], expected)
    assert (exp != exp.round()).any()
    # within the prior's reach of the input edges
    assert (exp - boxes).abs().max() < 3.3 * 0.05 * 172
    with pytest.raises(ValueError, match="decode"):
        mbrm_refine_boxes(mask.float()[None], boxes, decode="mean")


def test_profiles_path_equals_masks_path_and_config_kernel_is_used():
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(4, 30, 40, generator=g)
    boxes = torch.tensor([[3.0, 4.0, 30.0, 25.0]]).expand(4, 4)
    a = mbrm_refine_boxes(masks, boxes)
    b = mbrm_refine_boxes(boxes=boxes, profiles=mask_profiles(masks))
    torch.testing.assert_close(a, b)
    # a different kernel changes the answer (the kernel really is read)
    flat = MBRM(kernel=[0.0] * 9, bias=0.0)(masks, boxes)
    torch.testing.assert_close(flat, boxes)  # constant evidence: argmax of the prior = the input edges
    with pytest.raises(ValueError, match="odd"):
        MBRM(kernel=[1.0, 2.0])
