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


class _Process:
    """Stands for train_net.py: checks what is on disk while it 'runs', writes its checkpoints, exits with ``rc``."""

    def __init__(self, out_dir, rc):
        self.out_dir, self.rc = out_dir, rc

    def wait(self, timeout=None):
        import json

        with open(self.out_dir / "run_info.json") as f:  # written before the training starts
            info = json.load(f)
        assert info["code"]["commit"] and info["machine"] and "finished" not in info
        (self.out_dir / "model_final.pth").write_bytes(b"x")
        (self.out_dir / "model_0000249.pth").write_bytes(b"x")
        return self.rc


@pytest.mark.parametrize("rc", [0, -9])
def test_a_run_keeps_its_commit_and_machine_when_cut_off_after_its_final_checkpoint(rc, tmp_path, monkeypatch):
    """A run killed in train_net.py's final evaluation (after model_final.pth) is scored again by the next
    invocation; its record still names the commit and machine it trained with, and says what is unknown."""
    import json
    import subprocess

    from d2_refine.benchmark.entries import ENTRY_BY_NAME
    from d2_refine.benchmark.record import make_record

    out = tmp_path / "mask_rcnn"
    popen = subprocess.Popen  # git (the commit) still runs

    def fake_popen(cmd, **kwargs):
        return _Process(out, rc) if cmd[1].endswith("train_net.py") else popen(cmd, **kwargs)

    monkeypatch.setattr(runs.subprocess, "Popen", fake_popen)
    metrics = {"bbox": {"AP": 50.0}}
    if rc:
        with pytest.raises(subprocess.CalledProcessError):
            runs.train(ENTRY_BY_NAME["mask_rcnn"], str(out), 10, 1, [], 1, sample_every=0.01)
    else:
        runs.train(ENTRY_BY_NAME["mask_rcnn"], str(out), 10, 1, [], 1, sample_every=0.01)
    with open(out / "run_info.json") as f:
        info = json.load(f)
    rec = make_record("mask_rcnn", 1, 10, metrics, str(out))
    assert rec["code"] == info["code"] and rec["code"]["commit"] and rec["machine"] == info["machine"]
    assert rec["trained"]
    if rc:
        assert "finished" not in info and rec["load"] is None and "cut off" in rec["note"]
        assert (out / "model_0000249.pth").exists()  # not cleaned up: the run did not end
    else:
        assert info["finished"] == rec["trained"] and "note" not in rec and not (out / "model_0000249.pth").exists()


def test_a_run_cut_off_in_its_final_evaluation_is_scored_again_and_recorded(tmp_path, monkeypatch):
    """The next invocation finds model_final.pth and no result in metrics.json: it scores the checkpoint, records
    it with the commit and machine of the start and a note, and removes the checkpoints kept for resuming."""
    import json
    import types

    from d2_refine.benchmark.entries import ENTRY_BY_NAME
    from d2_refine.benchmark.record import load_results

    out = tmp_path / "runs" / "seed1" / "mask_rcnn"
    out.mkdir(parents=True)
    for name in ("model_final.pth", "model_0000249.pth"):
        (out / name).write_bytes(b"x")
    start = dict(code=dict(commit="0123abc", dirty=False), machine=dict(host="h"), started="2026-01-01 00:00:00 UTC")
    (out / "run_info.json").write_text(json.dumps(start))
    scored = []
    monkeypatch.setattr(runs, "regime_root", lambda output_dir, iters, regime: str(tmp_path / "runs"))
    monkeypatch.setattr(runs, "final_results", lambda path, iters: None)
    monkeypatch.setattr(runs, "evaluate", lambda entry, out_dir, *a, **k: scored.append(out_dir)
                        or ({"bbox": {"AP": 50.0}}, None, None))
    args = types.SimpleNamespace(output_dir=str(tmp_path), iters=10, regime="finetune", eval_only=False,
                                 results=str(tmp_path / "results.json"), opts=[], num_threads=1)
    (rec,) = runs.run_one(ENTRY_BY_NAME["mask_rcnn"], 1, args)
    assert scored == [str(out)] and rec["scored_again"]["code"]["commit"]
    assert rec["code"] == start["code"] and rec["machine"] == start["machine"] and "cut off" in rec["note"]
    assert load_results(args.results)["records"] == [rec]
    assert (out / "model_final.pth").exists() and not (out / "model_0000249.pth").exists()
