"""Interrupting a run after a checkpoint and resuming it (``--resume``: ``Trainer.resume_or_load(resume=True)``) gives
the losses and final weights of the uninterrupted run, exactly.

detectron2 alone does not: its checkpoint holds the model, optimizer, scheduler and iteration, but a new process
restarts the seeded TrainingSampler stream at its first batch and the torch / numpy / python generators (RoI sampling,
flips) at the seed. d2_refine's Trainer adds ExactResumeHook (d2_refine/engine/resume.py) when SOLVER.EXACT_RESUME (on
in the shapes configs), which checkpoints the generators and fast-forwards the data loader. One process,
DATALOADER.NUM_WORKERS 0 and a fixed SEED, as train_net.py runs it (default_setup seeds SEED + rank). The per-
iteration losses are read from the trainer's EventStorage, the source of metrics.json: metrics.json itself holds
20-iteration medians written every 20 iterations, which a run restarted mid-window cannot reproduce.
"""
import os

import pytest

pytest.importorskip("detectron2")

from helpers import ROOT  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "Baselines", "mask_rcnn_R_18_FPN_shapes.yaml")
N, K = 4, 2  # iterations of the run; it is interrupted after iteration K - 1, its checkpoint
OPTS = ["SOLVER.MAX_ITER", str(N), "SOLVER.CHECKPOINT_PERIOD", str(K), "SOLVER.WARMUP_ITERS", "2",
        "DATASETS.TEST", "()", "SEED", "7", "DATALOADER.NUM_WORKERS", "0"]


class _Interrupted(Exception):
    pass


def _losses(trainer):
    """{iteration: {loss name: value}} logged by the trainer's EventStorage."""
    out = {}
    for name, buf in trainer.storage.histories().items():
        if name == "total_loss" or name.startswith("loss_"):
            for value, it in buf.values():
                out.setdefault(int(it), {})[name] = value
    return out


def _check_resume(output_dir, opts, start, end, expected, full_dir):
    """Resume the run of ``output_dir`` (``resume_or_load(resume=True)``, as ``--resume``): it starts at ``start``
    and its losses of iterations start .. end - 1 and final weights equal ``expected`` and the final weights in
    ``full_dir`` (the uninterrupted run) exactly, not approximately."""
    import torch

    from d2_refine.utils.testing import smoke_trainer

    resumed = smoke_trainer(CONFIG, output_dir, opts, resume=True)
    assert resumed.start_iter == start
    resumed.train()
    got = _losses(resumed)
    assert sorted(got) == list(range(start, end))
    for i in range(start, end):
        assert got[i] == expected[i], (i, got[i], expected[i])
    a = torch.load(full_dir / "model_final.pth", weights_only=True)["model"]
    b = torch.load(output_dir / "model_final.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_reproduces_uninterrupted_losses_and_weights(tmp_path):
    from detectron2.engine import HookBase

    from d2_refine.utils.testing import smoke_trainer

    class StopAfter(HookBase):
        def after_step(self):
            if self.trainer.iter == K - 1:  # after PeriodicCheckpointer has written model_{K-1}
                raise _Interrupted

    full = smoke_trainer(CONFIG, tmp_path / "full", OPTS)
    full.train()
    expected = _losses(full)
    assert sorted(expected) == list(range(N))

    first = smoke_trainer(CONFIG, tmp_path / "resumed", OPTS)
    first.register_hooks([StopAfter()])
    with pytest.raises(_Interrupted):
        first.train()
    assert (tmp_path / "resumed" / "last_checkpoint").read_text().strip() == f"model_{K - 1:07d}.pth"
    assert not (tmp_path / "resumed" / "model_final.pth").exists()
    assert _losses(first) == {i: expected[i] for i in range(K)}

    _check_resume(tmp_path / "resumed", OPTS, K, N, expected, tmp_path / "full")


@pytest.mark.slow
def test_resume_after_sigkill_loses_nothing(tmp_path):
    """train_net.py killed from outside (SIGKILL, no chance to clean up) while it trains, after a checkpoint was
    written: resuming from that checkpoint (what ``--resume`` does: ``resume_or_load(resume=True)``) gives the
    losses and final weights of an uninterrupted run, exactly. A checkpoint that was being written at the kill is
    not the one ``last_checkpoint`` names, so it is never read."""
    import signal
    import subprocess
    import sys
    import time

    from d2_refine.utils.testing import smoke_trainer, tiny_shapes_opts

    n = 10
    opts = OPTS + ["SOLVER.MAX_ITER", str(n)]
    out = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", CONFIG, *tiny_shapes_opts(out), *opts]
    # the environment of this process (thread counts alike): its checkpoint continues this process's computation
    log = tmp_path / "killed.log"
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    tag = out / "last_checkpoint"
    try:
        deadline = time.monotonic() + 600
        while not (tag.exists() and tag.read_text().strip()):  # the first checkpoint is complete
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # the run goes on training meanwhile: killed mid-iteration
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model_final.pth").exists(), "the run finished before it was killed"
    checkpoint = tag.read_text().strip()
    start = int(checkpoint[len("model_"):-len(".pth")]) + 1  # the first iteration the resumed run trains
    assert 0 < start < n

    full = smoke_trainer(CONFIG, tmp_path / "full", opts)
    full.train()
    expected = _losses(full)
    _check_resume(out, opts, start, n, expected, tmp_path / "full")
