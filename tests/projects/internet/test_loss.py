"""loss_intertwiner: distances, missing classes, empty sets, OT variant, POT optional (detectron2-free)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from d2_refine.projects.internet.loss import IntertwinerOT, intertwiner_loss

pytestmark = pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")


def _data(seed=0, r=9, k=4, d=6):
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(r, d, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0])[:r]
    centroids = torch.rand(k, d, generator=g, dtype=torch.float64)
    return feats, labels, centroids


@pytest.mark.parametrize("distance", ["l2", "l1", "kl"])
def test_class_level_matches_formula(distance):
    feats, labels, mu = _data()
    filled = torch.tensor([True, True, False, True])  # class 2 missing from the buffer: skipped
    loss = intertwiner_loss(feats, labels, mu, filled, distance)
    sbar = torch.stack([feats[labels == c].mean(0) for c in (0, 1, 3)])
    m = mu[[0, 1, 3]]
    ref = {"l2": (sbar - m) ** 2, "l1": (sbar - m).abs(), "kl": m * (m.log() - sbar.log())}[distance].mean()
    torch.testing.assert_close(loss, ref.clamp_min(0))
    loss.backward()
    assert feats.grad[labels == 2].abs().sum() == 0 and feats.grad[labels != 2].abs().sum() > 0


def test_instance_level_matches_formula():
    feats, labels, mu = _data(1)
    filled = torch.tensor([True, False, True, True])
    loss = intertwiner_loss(feats, labels, mu, filled, "l2", instance_level=True)
    keep = labels != 1
    torch.testing.assert_close(loss, ((feats[keep] - mu[labels[keep]]) ** 2).mean())


@pytest.mark.parametrize("distance", ["l2", "l1", "kl", "ot"])
def test_no_nan_without_filled_classes_or_rois(distance):
    ot = IntertwinerOT(6, 5) if distance == "ot" else None
    feats, labels, mu = _data()
    for f, y, filled in ((feats, labels, torch.zeros(4, dtype=torch.bool)),
                         (feats[:0], labels[:0], torch.ones(4, dtype=torch.bool))):
        loss = intertwiner_loss(f, y, mu, filled, distance, ot=ot)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.isfinite(feats.grad).all()


def test_single_roi_and_kl_with_zeros_is_finite():
    feats = torch.tensor([[0.0, 1.0]], requires_grad=True)
    mu = torch.tensor([[0.5, 0.5]])
    loss = intertwiner_loss(feats, torch.tensor([0]), mu, torch.tensor([True]), "kl")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(feats.grad).all()


def test_centroids_get_no_gradient():
    feats, labels, mu = _data()
    mu = mu.clone().requires_grad_()
    intertwiner_loss(feats, labels, mu, torch.ones(4, dtype=torch.bool), "l2").backward()
    assert mu.grad is None


def test_ot_loss_finite_with_gradient_to_features_and_modules():
    torch.manual_seed(0)
    feats, labels, mu = _data(2, d=32)
    feats = feats.detach().float().requires_grad_()
    ot = IntertwinerOT(32, 16, epsilon=1.0, iters=5, cost="sqeuclidean")
    loss = intertwiner_loss(feats, labels, mu.float(), torch.ones(4, dtype=torch.bool), "ot", ot=ot)
    assert torch.isfinite(loss) and loss.item() >= 0
    loss.backward()
    assert feats.grad.abs().sum() > 0 and ot.generator.weight.grad.abs().sum() > 0


def test_ot_cosine_cost_is_gradient_free_as_released():
    torch.manual_seed(0)
    feats, labels, mu = _data(3, d=32)
    feats = feats.detach().float().requires_grad_()
    ot = IntertwinerOT(32, 16, cost="cosine")
    loss = intertwiner_loss(feats, labels, mu.float(), torch.ones(4, dtype=torch.bool), "ot", ot=ot)
    loss.backward()
    assert torch.isfinite(loss)
    assert feats.grad is None or feats.grad.abs().max() < 1e-6


def test_bad_distance_raises():
    feats, labels, mu = _data()
    with pytest.raises(ValueError, match="LOSS must be one of"):
        intertwiner_loss(feats, labels, mu, torch.ones(4, dtype=torch.bool), "l3")
    with pytest.raises(ValueError, match="needs the IntertwinerOT"):
        intertwiner_loss(feats, labels, mu, torch.ones(4, dtype=torch.bool), "ot")


def test_ot_loss_without_pot_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ot", None)  # "import ot" raises ImportError, as when POT is not installed
    monkeypatch.setitem(sys.modules, "ot.batch", None)
    with pytest.raises(ImportError) as e:
        IntertwinerOT(8, 4)  # when the model is built, not at the first training step
    msg = str(e.value)
    assert "\n" not in msg and 'pip install "d2_refine[methods]"' in msg and 'MODEL.INTERNET.LOSS "ot"' in msg


def test_importing_internet_does_not_need_pot():
    """A fresh interpreter where POT cannot be imported: InterNet (and its l2 loss) still import and run."""
    code = textwrap.dedent("""
        import sys
        sys.modules["ot"] = None  # blocks "import ot" and "import ot.batch"
        import torch
        import d2_refine.projects.internet as internet
        from d2_refine.projects.internet.loss import intertwiner_loss
        loss = intertwiner_loss(torch.rand(3, 4), torch.tensor([0, 1, 1]), torch.rand(2, 4),
                                torch.ones(2, dtype=torch.bool), "l2")
        assert torch.isfinite(loss) and sys.modules["ot"] is None
        print("ok")
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
