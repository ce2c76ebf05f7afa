"""d2_refine.layers.norm.get_norm: detectron2's get_norm contract ("" = no norm, callables, its names) plus "Affine",
and the BN that survives one value per channel."""
import pytest
import torch
from torch import nn

from d2_refine.layers.norm import AffineChannel2d, GuardedBatchNorm2d, get_norm
from d2_refine.utils.env import has_detectron2


def test_empty_and_none_mean_no_norm_as_in_detectron2():
    assert get_norm("", 4) is None and get_norm(None, 4) is None
    if has_detectron2():
        from detectron2.layers import get_norm as d2_get_norm

        assert d2_get_norm("", 4) is None


def test_names_and_callables():
    assert isinstance(get_norm("Affine", 4), AffineChannel2d)
    assert isinstance(get_norm("BN", 4), GuardedBatchNorm2d) and isinstance(get_norm("BN", 4), nn.BatchNorm2d)
    gn = get_norm("GN", 64)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 32
    assert isinstance(get_norm(lambda c: nn.LayerNorm(c), 5), nn.LayerNorm)
    n = get_norm("Affine", 3)
    assert sum(p.numel() for p in n.parameters() if p.requires_grad) == 6
    with pytest.raises(ValueError, match="multiple of 32"):
        get_norm("GN", 48)


@pytest.mark.skipif(not has_detectron2(), reason="detectron2 is not installed")
def test_other_names_are_detectron2s():
    from detectron2.layers import FrozenBatchNorm2d

    assert isinstance(get_norm("FrozenBN", 8), FrozenBatchNorm2d)
    with pytest.raises(ValueError, match="unknown norm 'Batch'"):
        get_norm("Batch", 8)


def test_affine_is_a_per_channel_scale_and_shift():
    n = AffineChannel2d(2)
    with torch.no_grad():
        n.weight.copy_(torch.tensor([2.0, 3.0]))
        n.bias.copy_(torch.tensor([1.0, -1.0]))
    x = torch.ones(1, 2, 2, 2)
    torch.testing.assert_close(n(x)[0, :, 0, 0], torch.tensor([3.0, 2.0]))


def test_guarded_bn_uses_running_stats_for_one_value_per_channel():
    bn = GuardedBatchNorm2d(4).train()
    with torch.no_grad():
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(4.0)
    x = torch.full((1, 4, 1, 1), 3.0)
    torch.testing.assert_close(bn(x), torch.full((1, 4, 1, 1), 1.0), rtol=1e-4, atol=1e-4)
    assert bn.running_mean.eq(1.0).all()  # not updated by the guarded call
    bn(torch.randn(3, 4, 2, 2))  # normal path updates the statistics
    assert not bn.running_mean.eq(1.0).all()
