"""Make-up layer and critic (detectron2-free; their norms: tests/layers/test_norm.py)."""
import pytest
import torch

from d2_refine.projects.internet.critic import InterNetCritic
from d2_refine.projects.internet.makeup import MakeupLayer
from helpers import cpu_and_cuda


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("factor", [1, 2])
def test_makeup_shapes(device, factor):
    m = MakeupLayer(16, num_conv=2, upsample_factor=factor, norm="Affine").to(device)
    y = m(torch.randn(2, 16, 9, 11, device=device))
    assert y.shape == (2, 16, 9 * factor, 11 * factor)
    assert (y >= 0).all()


def test_makeup_multi_shares_conv_with_per_level_norms():
    m = MakeupLayer(8, norm="Affine", num_levels=3)
    assert len(m.convs) == 1 and len(m.norms) == 3
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(m(x, 0), m(x, 2))
    with torch.no_grad():
        m.norms[2][0].bias.fill_(1.0)
    assert not torch.allclose(m(x, 0), m(x, 2))


def test_makeup_bad_factor():
    with pytest.raises(ValueError, match="UPSAMPLE_FACTOR"):
        MakeupLayer(8, upsample_factor=3)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("norm", ["Affine", "BN", ""])
@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "none"])
def test_critic_output_and_single_roi(device, norm, activation):
    critic = InterNetCritic(16, 14, 32, norm, activation).to(device).train()
    for r in (0, 1, 5):  # empty batch and a single RoI (train-mode BN would fail) included
        x = torch.randn(r, 16, 14, 14, device=device, requires_grad=True)
        y = critic(x)
        assert y.shape == (r, 32) and torch.isfinite(y).all()
        if r:
            y.sum().backward()
            assert torch.isfinite(x.grad).all()
    if activation == "sigmoid" and norm:
        assert (y >= 0.5).all() and (y < 1).all()  # sigmoid after ReLU
    if activation == "softmax":
        torch.testing.assert_close(y.sum(1), torch.ones(5, device=device))


def test_critic_rejects_wrong_size():
    with pytest.raises(ValueError, match="FEAT_POOL_SIZE"):
        InterNetCritic(16, 7)
    with pytest.raises(ValueError, match=r"Tensor\[R, C, 14, 14\]"):
        InterNetCritic(16, 14, 32)(torch.randn(2, 16, 7, 7))
