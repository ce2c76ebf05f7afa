"""Make-up layer and critic (detectron2-free; their norms: tests/layers/test_norm.py)."""
import os

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


def test_critic_with_a_cross_rank_norm_and_a_rank_without_rois(tmp_path, monkeypatch):
    """A cross-rank BN is a collective call: a rank whose batch of RoIs is empty must still join it, or the ranks'
    collectives go out of step and the job hangs (the norms used to be skipped on an empty batch). Rank 1's output
    then equals the plain BN of its own RoIs: rank 0 contributes nothing to the statistics."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    pytest.importorskip("detectron2")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    monkeypatch.syspath_prepend(os.path.dirname(os.path.abspath(__file__)))  # see internet_dist_worker.py
    from internet_dist_worker import critic_worker

    mp.spawn(critic_worker, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"out.{r}") for r in (0, 1))
    assert r0["out"].shape == (0, 16) and r1["out"].shape == (3, 16)
    assert r0["marker"].tolist() == r1["marker"].tolist() == [3.0, 3.0]
    local = InterNetCritic(8, 4, 16, "BN", "sigmoid").train()
    local.load_state_dict(r1["state"])
    with torch.no_grad():
        torch.testing.assert_close(r1["out"], local(r1["x"]), rtol=1e-5, atol=1e-6)


def test_critic_refuses_a_norm_that_cannot_take_an_empty_batch():
    pytest.importorskip("detectron2")
    with pytest.raises(ValueError, match="naiveSyncBN_N"):
        InterNetCritic(8, 4, 16, "naiveSyncBN", "sigmoid")
