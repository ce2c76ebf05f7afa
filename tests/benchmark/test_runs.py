"""d2_refine.benchmark.runs: the run folders and the parameters counted at inference."""

import pytest

from d2_refine.benchmark import runs


def test_seed_one_reads_the_single_seed_layout_where_only_it_has_a_checkpoint(tmp_path):
    assert runs.run_dir(str(tmp_path), "iounet", 1) == str(tmp_path / "seed1" / "iounet")
    (tmp_path / "iounet").mkdir()
    (tmp_path / "iounet" / "model_final.pth").write_bytes(b"x")
    assert runs.run_dir(str(tmp_path), "iounet", 1) == str(tmp_path / "iounet")
    assert runs.run_dir(str(tmp_path), "iounet", 2) == str(tmp_path / "seed2" / "iounet")
    (tmp_path / "seed1" / "iounet").mkdir(parents=True)
    (tmp_path / "seed1" / "iounet" / "model_final.pth").write_bytes(b"x")
    assert runs.run_dir(str(tmp_path), "iounet", 1) == str(tmp_path / "seed1" / "iounet")


def test_inference_parameters_leave_out_what_inference_does_not_run():
    torch = pytest.importorskip("torch")
    from torch import nn

    class Model(nn.Module):  # a shared layer run twice, a training-only critic, a scale held by the model itself
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 4)  # 20
            self.head = nn.Linear(4, 2)  # 10
            self.critic = nn.Sequential(nn.Linear(4, 100), nn.Linear(100, 1))  # 601, training only
            self.scale = nn.Parameter(torch.ones(1))  # 1

        def forward(self, x):
            x = self.shared(self.shared(x)) * self.scale
            return self.head(x) if not self.training else self.critic(x).sum() + self.head(x).sum()

    model = Model().eval()
    total = sum(p.numel() for p in model.parameters())
    assert total == 632 and runs.inference_parameters(model, [torch.zeros(1, 4)] * 2) == 31
    assert not any(m._forward_pre_hooks for m in model.modules())  # the hooks are gone afterwards
