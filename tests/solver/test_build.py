"""SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model": one norm over all gradients (RDSNet's recipe), not one per tensor."""
import os

import pytest
import torch
from torch import nn

from d2_refine.solver import clip_full_model_gradient_norm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _TwoParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(2))
        self.b = nn.Parameter(torch.zeros(2))

    def set_grads(self):
        self.a.grad = torch.tensor([3.0, 0.0])
        self.b.grad = torch.tensor([0.0, 4.0])  # global norm 5, per-tensor norms 3 and 4


def test_clips_the_global_norm():
    m = _TwoParams()
    opt = clip_full_model_gradient_norm(torch.optim.SGD(m.parameters(), lr=1.0), max_norm=1.0)
    m.set_grads()
    opt.step()
    # every gradient scaled by 1/5: the step is -(0.6, 0) and -(0, 0.8) (per-tensor clipping would give 1 and 1)
    torch.testing.assert_close(m.a.detach(), torch.tensor([-0.6, 0.0]))
    torch.testing.assert_close(m.b.detach(), torch.tensor([0.0, -0.8]))
    # below the bound: untouched
    m.set_grads()
    before = (m.a.detach().clone(), m.b.detach().clone())
    clip_full_model_gradient_norm(torch.optim.SGD(m.parameters(), lr=1.0), max_norm=10.0).step()
    torch.testing.assert_close(m.a.detach(), before[0] - torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(m.b.detach(), before[1] - torch.tensor([0.0, 4.0]))


def test_state_dict_is_the_plain_optimizers():
    m = _TwoParams()
    plain = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    clipped = clip_full_model_gradient_norm(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), 1.0)
    assert isinstance(clipped, torch.optim.SGD)
    assert clipped.state_dict() == plain.state_dict()
    with pytest.raises(ValueError, match="CLIP_VALUE must be > 0"):
        clip_full_model_gradient_norm(plain, 0.0)


def _cfg(clip_type):
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.MOMENTUM, cfg.SOLVER.WEIGHT_DECAY = 1.0, 0.0, 0.0
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = clip_type
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    return cfg


@pytest.mark.parametrize("clip_type, a, b", [("full_model", [-0.6, 0.0], [0.0, -0.8]),
                                             ("norm", [-1.0, 0.0], [0.0, -1.0])])
def test_trainer_builds_the_configured_clip(clip_type, a, b):
    cfg = _cfg(clip_type)
    from d2_refine.engine.trainer import Trainer

    m = _TwoParams()
    opt = Trainer.build_optimizer(cfg, m)
    m.set_grads()
    opt.step()
    torch.testing.assert_close(m.a.detach(), torch.tensor(a))
    torch.testing.assert_close(m.b.detach(), torch.tensor(b))


def test_rdsnet_coco_configs_clip_the_full_model_at_35():
    pytest.importorskip("detectron2")
    import glob

    from d2_refine.engine.config import setup_cfg

    paths = sorted(glob.glob(os.path.join(REPO, "configs", "RDSNet", "*_coco.yaml")))
    assert paths
    for path in paths:
        clip = setup_cfg(path).SOLVER.CLIP_GRADIENTS
        assert (clip.ENABLED, clip.CLIP_TYPE, clip.CLIP_VALUE, clip.NORM_TYPE) == (True, "full_model", 35.0, 2.0), path
