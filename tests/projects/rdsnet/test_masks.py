"""Cropping, correlation, mask targets, soft-mask decoding and the OHEM mask loss (torch-only)."""
import pytest
import torch
from torch.nn import functional as F

from d2_refine.projects.rdsnet.mask_loss import ohem_mask_loss, reduce_instance_losses
from d2_refine.projects.rdsnet.masks import (
    correlate,
    crop_bounds,
    crop_region,
    decode_soft_masks,
    downsample_mask_targets,
    to_inclusive,
)
from helpers import cpu_and_cuda


def test_crop_bounds_follow_the_rule():
    # inclusive box x 10..29 (20 px wide), y 5..14 (10 px): pad 0.25 -> 5 px and 2.5 px
    boxes = torch.tensor([[10.0, 5.0, 29.0, 14.0]])
    x1, x2, y1, y2 = crop_bounds(boxes, height=40, width=32, padding=0.25)
    assert (x1.item(), x2.item(), y1.item(), y2.item()) == (5, 32, 2, 16)  # x2' = min(W, 34); y: 2.5 -> 2, 16.5 -> 16
    # pad at least one pixel; at the border x1' is clamped at 0
    x1, x2, y1, y2 = crop_bounds(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), 10, 10, padding=0.1)
    assert (x1.item(), x2.item(), y1.item(), y2.item()) == (0, 2, 0, 2)


def test_crop_region_matches_bounds_and_handles_empty():
    boxes = torch.tensor([[2.0, 3.0, 6.0, 4.0], [-5.0, -5.0, 40.0, 40.0]])
    region = crop_region(boxes, 12, 10, padding=0.0)
    assert region.shape == (2, 12, 10) and region.dtype == torch.bool
    expected = torch.zeros(12, 10, dtype=torch.bool)
    expected[2:5, 1:7] = True  # pad 1 px: y 3-1 .. 4+1 (exclusive 5), x 2-1 .. 6+1 (exclusive 7)
    assert torch.equal(region[0], expected)
    assert region[1].all()  # a box larger than the grid crops nothing away
    assert crop_region(torch.zeros(0, 4), 5, 6, 0.1).shape == (0, 5, 6)


def test_to_inclusive():
    assert torch.equal(to_inclusive(torch.tensor([[1.0, 2.0, 5.0, 9.0]])), torch.tensor([[1.0, 2.0, 4.0, 8.0]]))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_correlate_is_one_product_of_pixel_and_object_reps(device):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(8, 5, 7, generator=g).to(device)
    r = torch.randn(3, 16, generator=g).to(device)
    out = correlate(u, r)
    assert out.shape == (3, 2, 5, 7)
    ref = torch.einsum("dhw,ncd->nchw", u, r.view(3, 2, 8))
    torch.testing.assert_close(out, ref)
    assert correlate(u, r[:0]).shape == (0, 2, 5, 7)
    with pytest.raises(ValueError, match="obj_reps"):
        correlate(u, r[:, :8])


def test_downsample_mask_targets():
    m = torch.zeros(2, 32, 24)
    m[0, 8:24, 4:20] = 1
    t = downsample_mask_targets(m, 4)
    assert t.shape == (2, 8, 6)
    assert t[0].sum() == 16 and t[0, 2:6, 1:5].all() and t[1].sum() == 0
    assert downsample_mask_targets(m[:0], 4).shape == (0, 8, 6)
    many = torch.rand(37, 32, 24, generator=torch.Generator().manual_seed(0)) > 0.5  # resized 16 at a time
    assert torch.equal(downsample_mask_targets(many, 4), downsample_mask_targets(many, 4, chunk=37))
    assert torch.equal(downsample_mask_targets(many, 4), downsample_mask_targets(many, 4, chunk=0))  # one at a time


def test_decode_soft_masks_order_and_crop():
    # logits at stride 4 of a 32x32 padded input, image 30x28 resized from an original 60x56
    logits = torch.zeros(1, 2, 8, 8)
    logits[0, 1, 2:6, 2:6] = 5.0
    logits[0, 0] = 0.0
    boxes = torch.tensor([[16.0, 16.0, 48.0, 48.0]])
    out = decode_soft_masks(logits, (32, 32), (30, 28), (60, 56), boxes, padding=0.1)
    assert out.shape == (1, 60, 56)
    assert ((out >= 0) & (out <= 1)).all()
    # zero outside the crop window (pad = max(1, 0.1 * 32) = 3.2 -> x in [12, 50), y in [12, 50))
    assert out[0, :12].abs().sum() == 0 and out[0, :, :12].abs().sum() == 0 and out[0, 50:].abs().sum() == 0
    # same as up-sample, cut, resize, softmax by hand
    x = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)[:, :, :30, :28]
    x = F.interpolate(x, size=(60, 56), mode="bilinear", align_corners=True).softmax(1)[:, 1]
    torch.testing.assert_close(out[0, 12:50, 12:50], x[0, 12:50, 12:50])
    assert decode_soft_masks(logits[:0], (32, 32), (30, 28), (60, 56), boxes[:0], 0.1).shape == (0, 60, 56)


def _reference_ohem(logits, targets, ratio):
    out = []
    for lg, t in zip(logits, targets):
        pix = F.cross_entropy(lg[None], t[None].long().clamp(min=0), reduction="none")[0].flatten()
        t = t.flatten()
        pos = (t == 1).nonzero().flatten()
        negs = (t == 0).nonzero().flatten()
        k = int(min(ratio * len(pos), t.numel() - 1))
        hard = negs[pix[negs].argsort(descending=True)[:k]]
        kept = torch.cat([pos, hard])
        out.append(pix[kept].sum() / (len(kept) + 1))
    return torch.stack(out)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_ohem_matches_reference(device):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 2, 9, 11, generator=g, dtype=torch.float64)
    targets = torch.randint(-1, 2, (4, 9, 11), generator=g)
    targets[1] = torch.where(targets[1] == 1, torch.zeros_like(targets[1]), targets[1])  # no positives
    targets[2, :3] = 1  # many positives: fewer negatives than k
    ours = ohem_mask_loss(logits.to(device), targets.to(device), 1.0)
    torch.testing.assert_close(ours.cpu().double(), _reference_ohem(logits, targets, 1.0))
    assert ours[1] == 0


def test_no_positives_gives_zero_loss_not_nan():
    logits = torch.randn(3, 2, 6, 6, requires_grad=True)
    targets = torch.zeros(3, 6, 6)
    targets[2] = -1  # all ignored
    per_instance = ohem_mask_loss(logits, targets)
    total = reduce_instance_losses(per_instance, 3)
    assert torch.equal(per_instance, torch.zeros(3)) and total.item() == 0
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0
    # no instance at all: zero, attached to the graph through the anchor tensor
    anchor = torch.randn(4, requires_grad=True)
    empty = reduce_instance_losses(ohem_mask_loss(torch.zeros(0, 2, 6, 6), torch.zeros(0, 6, 6)), 0, anchor)
    assert empty.item() == 0 and empty.requires_grad
    empty.backward()
    assert torch.equal(anchor.grad, torch.zeros(4))


def test_ohem_gradient_reaches_only_kept_pixels():
    logits = torch.zeros(1, 2, 1, 6, requires_grad=True)
    with torch.no_grad():
        logits[0, 1, 0] = torch.tensor([3.0, 0.0, 2.0, 1.0, -1.0, 0.0])  # bg losses grow with the fg logit
    targets = torch.tensor([[[1, 0, 0, 0, 0, -1]]])
    loss = ohem_mask_loss(logits, targets, 1.0)
    loss.sum().backward()
    touched = logits.grad[0].abs().sum(0)[0] > 0
    # kept: the positive (0) and the hardest negative (2); 1, 3, 4 dropped, 5 ignored
    assert touched.tolist() == [True, False, True, False, False, False]
    torch.testing.assert_close(loss, (F.softplus(torch.tensor([-3.0])) + F.softplus(torch.tensor([2.0]))) / 3)
