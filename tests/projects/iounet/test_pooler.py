"""PrRoIPooler: detectron2's multi-level ROIPooler on Precise RoI Pooling, in float32 and under autocast."""
import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.structures import Boxes  # noqa: E402

from d2_refine.projects.iounet import PrRoIPooler  # noqa: E402

SCALES = (1 / 4, 1 / 8, 1 / 16)


def _pyramid(seed=0, channels=8, size=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, channels, int(size * s), int(size * s), generator=g) for s in SCALES]


def _boxes():
    # small and large boxes, so that every level gets some
    return [Boxes(torch.tensor([[3.2, 4.1, 15.7, 13.9], [10.5, 2.0, 50.3, 44.8], [0.5, 0.5, 63.0, 60.2]])),
            Boxes(torch.tensor([[20.1, 18.3, 31.6, 36.0], [5.0, 12.0, 60.0, 58.0]]))]


def _pool(pooler, feats, boxes, weights, autocast):
    """pooled features and the gradients w.r.t. the (pre-layer) features and the boxes of sum(weights * pooled);
    features pass through a 1x1 identity conv, which autocast runs in bfloat16 (as a backbone would)."""
    feats = [f.clone().requires_grad_() for f in feats]
    boxes = [Boxes(b.tensor.clone().requires_grad_()) for b in boxes]
    conv = torch.nn.Conv2d(8, 8, 1)
    torch.nn.init.dirac_(conv.weight)
    torch.nn.init.zeros_(conv.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = pooler([conv(f) for f in feats], boxes)
    (out.float() * weights).sum().backward()
    return out, [f.grad for f in feats], [b.tensor.grad for b in boxes]


@pytest.mark.parametrize("aligned", [False, True])
def test_autocast_bfloat16_matches_float32(aligned):
    pooler = PrRoIPooler(5, SCALES, aligned=aligned, canonical_box_size=32, canonical_level=3)
    feats, boxes = _pyramid(), _boxes()
    weights = torch.randn(5, 8, 5, 5, generator=torch.Generator().manual_seed(1))
    out, fgrads, bgrads = _pool(pooler, feats, boxes, weights, autocast=True)
    expected, efgrads, ebgrads = _pool(pooler, feats, boxes, weights, autocast=False)
    assert out.dtype == torch.bfloat16 and expected.dtype == torch.float32
    # bfloat16 features (8 significant bits), pooled in float32: within 2e-2 of float32 for unit-variance maps;
    # the box gradients (differences of line integrals, summed over 8 channels x 25 bins, up to ~4) within 5e-2
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=0)
    for a, b in zip(fgrads, efgrads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=2e-2, rtol=0)
    for a, b in zip(bgrads, ebgrads):
        assert torch.isfinite(a).all() and a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=5e-2, rtol=0)


@pytest.mark.parametrize("aligned", [False, True])
def test_one_call_for_all_levels_equals_roipoolers_loop(aligned):
    """PrRoIPooler pools all levels in one multilevel_prroi_pool call; detectron2's ROIPooler loop (a level
    assignment, then a PrRoIPool call per level) gives the same features and gradients."""
    from detectron2.modeling.poolers import ROIPooler

    pooler = PrRoIPooler(5, SCALES, aligned=aligned, canonical_box_size=32, canonical_level=3)
    feats = [f.double() for f in _pyramid(seed=2)]
    boxes = [Boxes(b.tensor.double()) for b in _boxes()]
    weights = torch.randn(5, 8, 5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def run(forward):
        fs = [f.clone().requires_grad_() for f in feats]
        bs = [Boxes(b.tensor.clone().requires_grad_()) for b in boxes]
        out = forward(fs, bs)
        (out * weights).sum().backward()
        return [out] + [f.grad for f in fs] + [b.tensor.grad for b in bs]

    fused = run(pooler)
    loop = run(lambda fs, bs: ROIPooler.forward(pooler, fs, bs))
    for a, b in zip(fused, loop):
        torch.testing.assert_close(a, b)
    assert fused[-1].abs().sum() > 0
