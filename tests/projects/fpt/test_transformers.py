"""FPT's three transformers against their definitions (FPT paper, Zhang et al., ECCV 2020, and the official
FPT code), and the per-level assembly."""
import math

import pytest
import torch
import torch.nn.functional as F

from d2_refine.projects.fpt import (
    FeaturePyramidTransformer,
    GroundingTransformer,
    RenderingTransformer,
    SelfTransformer,
)
from helpers import cpu_and_cuda

C = 32


def _randomize(module, seed=0):
    """Random weights everywhere (GT's output norm starts at zero: re-init it so every path matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return module


def _st_reference(st, x):
    """ST(x) straight from its definition, with explicit pooling, per-mixture softmax and the pi-weighted sum."""
    n, c, h, w = x.shape
    pooled = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
    q = st.query(x).flatten(2).transpose(1, 2)  # (N, HW, C)
    k = st.query(pooled).flatten(2).transpose(1, 2)
    v = st.value(pooled).flatten(2).transpose(1, 2)
    pi = torch.softmax(q.mean(1) @ st.mixture_prior.t(), -1)
    m, g = st.mixtures, c // st.mixtures
    y = 0
    for i in range(m):
        a = torch.softmax(q[..., i * g:(i + 1) * g] @ k[..., i * g:(i + 1) * g].transpose(1, 2) / math.sqrt(c), -1)
        y = y + pi[:, i, None, None] * a
    y = (y @ v).transpose(1, 2).reshape(n, c, h, w)
    return st.out(y) + x


@pytest.mark.parametrize("impl", ["naive", "chunked", "sdpa", "auto"])
@pytest.mark.parametrize("size", [(9, 7), (8, 8), (1, 5)])
def test_self_transformer_matches_definition(impl, size):
    st = _randomize(SelfTransformer(C, mixtures=2, norm="GN", attn_impl=impl, query_chunk=7)).double().eval()
    x = torch.randn(2, C, *size, dtype=torch.float64)
    torch.testing.assert_close(st(x), _st_reference(st, x), rtol=1e-10, atol=1e-10)


def test_self_transformer_pools_keys_to_ceil_half():
    st = SelfTransformer(C).eval()
    seen = {}
    st.value.register_forward_hook(lambda mod, inp, out: seen.update(kv=out.shape))
    st(torch.randn(1, C, 25, 13))
    assert seen["kv"][-2:] == (13, 7)


def test_self_transformer_dropout_only_in_training():
    st = _randomize(SelfTransformer(C, dropout=0.5)).eval()
    x = torch.randn(1, C, 6, 6)
    torch.testing.assert_close(st(x), st(x))
    st.train()
    torch.manual_seed(0)
    assert not torch.allclose(st(x), st(x))


def test_self_transformer_options():
    st = SelfTransformer(C, mixtures=1, pool_kv=False, share_qk=False, scale=0.5)
    assert st.mixture_prior is None and st.key is not None and st.scale == 0.5
    assert SelfTransformer(C).scale == pytest.approx(1 / math.sqrt(C))
    assert st(torch.randn(1, C, 5, 3)).shape == (1, C, 5, 3)
    with pytest.raises(ValueError, match="divisible"):
        SelfTransformer(C, mixtures=3)


def _gt_reference(gt, fine, coarse):
    n, _, h, w = fine.shape
    q = gt.query(fine).flatten(2).transpose(1, 2)
    k = gt.key(coarse).flatten(2).transpose(1, 2)
    v = gt.value(coarse).flatten(2).transpose(1, 2)
    if gt.mode == "euclidean":
        a = torch.softmax(-gt.temperature * torch.cdist(q, k).pow(2), -1)
    elif gt.mode == "dot":
        a = q @ k.transpose(1, 2) / k.shape[1]
    else:
        a = torch.softmax(q @ k.transpose(1, 2), -1)
    y = (a @ v).transpose(1, 2).reshape(n, -1, h, w)
    return gt.out(y)


@pytest.mark.parametrize("mode", ["euclidean", "dot", "embedded"])
@pytest.mark.parametrize("impl", ["naive", "chunked", "sdpa"])
def test_grounding_transformer_matches_definition(mode, impl):
    gt = _randomize(GroundingTransformer(C, mode=mode, attn_impl=impl, query_chunk=11)).double()
    fine, coarse = torch.randn(2, C, 11, 9, dtype=torch.float64), torch.randn(2, C, 5, 4, dtype=torch.float64)
    out = gt(fine, coarse)
    assert out.shape == fine.shape
    torch.testing.assert_close(out, _gt_reference(gt, fine, coarse), rtol=1e-10, atol=1e-10)


def test_grounding_transformer_defaults_and_silent_start():
    gt = GroundingTransformer(C)
    assert gt.inter_channels == C // 2 and gt.temperature == pytest.approx(1 / math.sqrt(C // 2))
    assert gt.mixture_prior is None
    out = gt(torch.randn(1, C, 8, 8), torch.randn(1, C, 4, 4))
    assert out.abs().max() == 0  # zero-initialised output norm
    assert GroundingTransformer(C, temperature=1.0).temperature == 1.0


def test_grounding_transformer_mixtures_match_naive():
    kw = dict(mode="euclidean", mixtures=4, query_chunk=5)
    ref = _randomize(GroundingTransformer(C, attn_impl="naive", **kw)).double()
    fast = GroundingTransformer(C, attn_impl="sdpa", **kw).double()
    fast.load_state_dict(ref.state_dict())
    fine, coarse = torch.randn(1, C, 7, 6, dtype=torch.float64), torch.randn(1, C, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(fast(fine, coarse), ref(fine, coarse), rtol=1e-10, atol=1e-10)


def _rt_reference(rt, coarse, fine):
    w = F.relu(F.conv2d(fine.mean((2, 3), keepdim=True), rt.weight.conv.weight, rt.weight.conv.bias))  # no norm
    if rt.order == "conv_then_weight":
        q = rt.query.norm(F.conv2d(coarse, rt.query.conv.weight, padding=1)) * w
    else:
        q = rt.query.norm(F.conv2d(coarse * w, rt.query.conv.weight, padding=1))
    v = fine
    convs = [m for m in rt.downsample if not isinstance(m, torch.nn.ReLU)]
    for i, m in enumerate(convs):
        if i > 0:
            v = F.relu(v)
        v = m.norm(F.conv2d(v, m.conv.weight, stride=2, padding=1))
    return F.relu(v + q)


@pytest.mark.parametrize("gap", [1, 2, 3])
@pytest.mark.parametrize("order", ["conv_then_weight", "weight_then_conv"])
def test_rendering_transformer_matches_definition(gap, order):
    rt = _randomize(RenderingTransformer(C, level_gap=gap, order=order)).double()
    fine = torch.randn(2, C, 8 * 2 ** gap, 6 * 2 ** gap, dtype=torch.float64)
    coarse = torch.randn(2, C, 8, 6, dtype=torch.float64)
    assert len([m for m in rt.downsample if not isinstance(m, torch.nn.ReLU)]) == gap
    torch.testing.assert_close(rt(coarse, fine), _rt_reference(rt, coarse, fine))


@pytest.mark.parametrize("norm", ["GN", "BN", ""])
def test_rendering_transformer_channel_weights_depend_on_content(norm):
    """w = ReLU(Conv1x1(GAP(fine)) + b) must follow the content: with a GroupNorm on the 1x1 vector each group of
    pre-activations has mean 0 and energy = group size for every input (C = 64: one channel on per pair, at 1),
    so the total weight of a group would be the same whatever the image. Whatever ``norm`` the RT gets."""
    torch.manual_seed(0)
    channels = 64  # GN: 2 channels per group
    rt = RenderingTransformer(channels, norm=norm).train()
    fines = torch.randn(16, channels, 8, 8) * torch.logspace(-1, 1, 16).view(16, 1, 1, 1)
    with torch.no_grad():
        w = F.relu(rt.weight(F.adaptive_avg_pool2d(fines, 1))).view(16, 32, 2)
    group_mass = w.sum(-1)  # (image, group)
    # the images' total weight per group varies (relative spread across images), and scaling the content changes w
    assert (group_mass.std(0) / group_mass.mean(0).clamp_min(1e-6)).mean() > 0.2
    assert not torch.allclose(w[-1], w[0], rtol=0.1, atol=0.0)
    # pre-activations are not forced to a zero group mean
    with torch.no_grad():
        pre = rt.weight(F.adaptive_avg_pool2d(fines, 1)).view(16, 32, 2)
    assert pre.mean(-1).abs().max() > 1e-3


def test_rendering_transformer_resizes_mismatched_sizes():
    rt = RenderingTransformer(C, level_gap=1)
    assert rt(torch.randn(2, C, 6, 4), torch.randn(2, C, 13, 7)).shape == (2, C, 6, 4)
    with pytest.raises(ValueError, match="level_gap"):
        RenderingTransformer(C, level_gap=0)


def _pyramid(levels=(2, 3, 4, 5), **kw):
    kw = {"self_transformer": {}, "grounding_transformer": {}, "rendering_transformer": {}, **kw}
    return FeaturePyramidTransformer(C, list(levels), **kw)


def _levels(sizes=((25, 17), (13, 9), (7, 5), (4, 3)), n=2):
    return [torch.randn(n, C, h, w) for h, w in sizes]


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_pyramid_preserves_every_level_shape_odd_sizes(device):
    fpt = _pyramid().to(device)
    feats = [f.to(device) for f in _levels()]
    for mode in ("train", "eval"):
        getattr(fpt, mode)()
        outs = fpt(feats)
        assert [o.shape for o in outs] == [f.shape for f in feats]
        assert all(torch.isfinite(o).all() for o in outs)


def test_pyramid_channel_layout_and_pairs():
    fpt = _pyramid()
    assert fpt.input_channels() == {lv: 5 * C for lv in (2, 3, 4, 5)}
    assert sorted(fpt.gt.keys()) == ["p2_p3", "p2_p4", "p2_p5", "p3_p4", "p3_p5", "p4_p5"]
    assert sorted(fpt.rt.keys()) == ["p3_p2", "p4_p2", "p4_p3", "p5_p2", "p5_p3", "p5_p4"]
    assert fpt.rt["p5_p2"].level_gap == 3
    adj = _pyramid(cross_range="adjacent", st_levels=[4, 5])
    assert adj.input_channels() == {2: 2 * C, 3: 3 * C, 4: 4 * C, 5: 3 * C}
    assert sorted(adj.st.keys()) == ["p4", "p5"]
    only_st = _pyramid(grounding_transformer=None, rendering_transformer=None, fuse_kernel=1)
    assert only_st.input_channels() == {lv: 2 * C for lv in (2, 3, 4, 5)} and not len(only_st.gt)
    retina = _pyramid(levels=(3, 4, 5, 6, 7))
    assert retina.input_channels() == {lv: 6 * C for lv in (3, 4, 5, 6, 7)}


def test_pyramid_concatenation_order_st_rt_gt_input():
    """Z_l = [ST, RT nearest-first, GT nearest-first, X_l]: check by reading the fuse conv's input."""
    fpt = _pyramid(fuse_kernel=1).eval()
    feats = _levels()
    seen = {}
    fpt.fuse["p3"].register_forward_hook(lambda m, inp, out: seen.update(z=inp[0]))
    fpt(feats)
    z = seen["z"].split(C, dim=1)
    expected = [fpt.st["p3"](feats[1]), fpt.rt["p3_p2"](feats[1], feats[0]), fpt.gt["p3_p4"](feats[1], feats[2]),
                fpt.gt["p3_p5"](feats[1], feats[3]), feats[1]]
    assert len(z) == len(expected)
    for a, b in zip(z, expected):
        torch.testing.assert_close(a, b)


def test_gradients_reach_every_transformer_parameter():
    fpt = _pyramid(grounding_transformer={"mixtures": 2})
    for gt in fpt.gt.values():  # GT starts silent (gamma = beta = 0), which blocks theta/phi/g at step 0
        torch.nn.init.ones_(gt.out.norm.weight)
    outs = fpt(_levels())
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    missing = [n for n, p in fpt.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_pyramid_bad_arguments():
    with pytest.raises(ValueError, match="increasing"):
        _pyramid(levels=(3, 2))
    with pytest.raises(ValueError, match="ST levels"):
        _pyramid(st_levels=[6])
    with pytest.raises(ValueError, match="CROSS_RANGE"):
        _pyramid(cross_range="near")
    with pytest.raises(ValueError, match="expected 4 levels"):
        _pyramid()(_levels()[:3])
    with pytest.raises(ValueError, match="uses 32 groups"):
        FeaturePyramidTransformer(48, [2, 3], self_transformer={})


def test_pyramid_bfloat16_autocast_close_to_float32():
    """Mixed precision (CPU autocast, bfloat16): every transformer (ST, euclidean GT, RT) and the fuse in bfloat16
    stay within bfloat16's tolerance of the float32 pyramid."""
    torch.manual_seed(0)
    fpt = _randomize(_pyramid(), seed=1).eval()
    feats = _levels(n=1)
    with torch.no_grad():
        expected = fpt(feats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = fpt(feats)
    for out, ref in zip(outs, expected):
        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        assert err < 0.02, f"bfloat16 max error {err:.3f} of the level's scale"
