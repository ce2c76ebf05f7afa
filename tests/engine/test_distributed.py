"""Two CPU processes (gloo) started by detectron2's ``launch`` train the InterNet shapes config with d2_refine's
Trainer (DistributedDataParallel, one image per rank and iteration): both ranks end with the same weights and the
same all-reduced class buffer, though each rank saw its own images, and rank 0's COCOEvaluator scores the model.

``launch`` itself runs on CPU (it picks gloo when CUDA is absent); detectron2's DefaultTrainer does not: it wraps the
model with ``device_ids=[local rank]``, which DistributedDataParallel refuses for a CPU model. d2_refine's Trainer
passes none on CPU (d2_refine/engine/trainer.py).
"""
import math
import os

import pytest

pytest.importorskip("detectron2")

from helpers import ROOT  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "InterNet", "internet_l2_R_18_FPN_shapes.yaml")
# SOLVER.IMS_PER_BATCH 2 of tiny_shapes_opts: one image per rank; a CPU-sized critic
OPTS = ["MODEL.INTERNET.CRITIC_DIM", "64", "SEED", "3"]


@pytest.mark.slow  # two training processes
def test_two_gloo_processes_keep_weights_and_class_buffer_equal(tmp_path, monkeypatch):
    import torch
    import torch.distributed as dist
    from detectron2.engine import launch

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if torch.cuda.is_available():
        pytest.skip("launch picks NCCL and one GPU per process where CUDA is available; this test is the CPU path")
    # the spawned workers unpickle the worker by its module's name: that module's folder goes on sys.path, which
    # they inherit (see distributed_train_worker.py for why it is not in this module)
    monkeypatch.syspath_prepend(os.path.dirname(os.path.abspath(__file__)))
    from distributed_train_worker import train_worker

    launch(train_worker, 2, num_machines=1, machine_rank=0, dist_url=f"file://{tmp_path / 'init'}",
           args=(CONFIG, OPTS, str(tmp_path / "run"), str(tmp_path / "rank")))

    r0, r1 = (torch.load(tmp_path / f"rank.{r}", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    for name in r0["params"]:  # gradients all-reduced by DistributedDataParallel: identical steps
        assert torch.equal(r0["state"][name], r1["state"][name]), name
    for key in ("centroids", "counts"):  # InterNet's buffer: per-class sums and counts all-reduced at each update
        a, b = (r["state"][f"roi_heads.class_buffer.{key}"] for r in (r0, r1))
        assert torch.equal(a, b), key
    assert r0["state"]["roi_heads.class_buffer.counts"].sum() > 0, "the buffer was never updated"
    # buffers are not broadcast (broadcast_buffers=False): BN statistics show each rank had its own images
    bn = [k for k in r0["state"] if k.endswith("running_mean")]
    assert bn and any(not torch.equal(r0["state"][k], r1["state"][k]) for k in bn)
    assert math.isfinite(r0["results"]["bbox"]["AP"]) and math.isfinite(r0["results"]["segm"]["AP"])
    assert (tmp_path / "run" / "model_final.pth").exists()
