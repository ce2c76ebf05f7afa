import pytest
import torch

from d2_refine.projects.iounet.iou_head import IoUHead


@pytest.mark.parametrize("loss", ["smooth_l1", "bce"])
def test_loss_is_zero_not_nan_without_rois(loss):
    head = IoUHead(8, pooler_resolution=3, num_classes=4, fc_dim=16, loss=loss)
    raw = head(torch.zeros((0, 8, 3, 3)))
    out = head.losses(raw, torch.zeros((0,), dtype=torch.int64), torch.zeros((0,)))["loss_iou"]
    assert out.item() == 0.0
    out.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


def test_smooth_l1_target_and_decode():
    head = IoUHead(2, pooler_resolution=1, num_classes=3, fc_dim=4, loss_weight=5.0)
    raw = torch.tensor([[0.0, 0.2, 0.0], [0.0, 0.0, -1.0]])
    classes = torch.tensor([1, 2])
    ious = torch.tensor([0.6, 0.0])  # targets 0.2 (exact) and -1.0 (exact)
    assert head.losses(raw, classes, ious)["loss_iou"].item() == pytest.approx(0.0, abs=1e-7)
    ious = torch.tensor([0.8, 0.0])  # target 0.6 vs 0.2: 0.5 * 0.4**2; mean over 2, x5
    assert head.losses(raw, classes, ious)["loss_iou"].item() == pytest.approx(5 * 0.08 / 2)
    torch.testing.assert_close(head.decode(head.select(raw, classes)), torch.tensor([0.6, 0.0]))


def test_bce_decodes_with_sigmoid():
    head = IoUHead(2, pooler_resolution=1, num_classes=2, fc_dim=4, loss="bce", loss_weight=1.0)
    raw = torch.tensor([[0.0, 2.0]])
    ious = torch.tensor([0.7])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([2.0]), ious)
    assert head.losses(raw, torch.tensor([1]), ious)["loss_iou"].item() == pytest.approx(expected.item())
    assert head.decode(raw)[0, 1].item() == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())


def test_shapes_init_and_agnostic():
    head = IoUHead(16, pooler_resolution=7, num_classes=80, num_fc=2, fc_dim=32)
    assert head(torch.randn(5, 16, 7, 7)).shape == (5, 80)
    assert head.predictor.bias.abs().max() == 0 and head.predictor.weight.std() < 0.02
    agn = IoUHead(16, pooler_resolution=7, num_classes=80, fc_dim=32, cls_agnostic=True)
    x = torch.randn(5, 16, 7, 7)
    assert agn(x).shape == (5, 1)
    assert agn.predict(x, torch.tensor([0, 5, 7, 79, 2])).shape == (5,)


def test_bad_loss_name_raises():
    with pytest.raises(ValueError, match="LOSS"):
        IoUHead(2, loss="l2")
