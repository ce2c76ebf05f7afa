"""Exact resumption: a hook that checkpoints what detectron2's checkpoints leave out, so that ``--resume`` continues
a run with the same data and random draws as if it had never stopped.

detectron2 restores the model, optimizer, LR scheduler and iteration, but a new process starts its seeded
TrainingSampler stream from the beginning (the resumed iterations would see the first images again) and its global
torch / numpy / python generators from the seed (RoI sampling, augmentations, dropout). :class:`ExactResumeHook`
saves the generators' states in every checkpoint (``checkpoint["trainer"]["hooks"]["ExactResumeHook"]``) and, when
training resumes at iteration k, draws the k batches the interrupted run consumed from the fresh data loader, then
restores the generators. On one process (any DATALOADER.NUM_WORKERS) the resumed iterations then compute the same
losses, bit for bit on the CPU, as an uninterrupted run with the same seed (tests/engine/test_resume.py).

Limits: the checkpoint holds the main process's generators only, so with several processes the other ranks resume
their data stream exactly but their generators from their seeds; an evaluation run at the checkpoint iteration
draws random numbers that the resumed run does not; the fast-forward costs the loading of k batches.
"""
import logging
import random
import time

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["ExactResumeHook", "get_rng_state", "set_rng_state"]


def get_rng_state() -> dict:
    """The torch (and CUDA), numpy and python generator states of this process, as tensors and plain Python values
    (readable by ``torch.load(weights_only=True)``)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states returned by :func:`get_rng_state` (CUDA ones only on as many devices as saved)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class ExactResumeHook(HookBase):
    """Saves the generators with each checkpoint; on resume, fast-forwards the data loader and restores them."""

    def __init__(self):
        self._rng = None  # generator states of the checkpoint being resumed

    def state_dict(self):
        return {"rng": get_rng_state()}

    def load_state_dict(self, state_dict):
        self._rng = state_dict.get("rng")

    def before_train(self):
        start = self.trainer.start_iter
        if start == 0:
            return
        logger = logging.getLogger(__name__)
        t0 = time.perf_counter()
        # the iterator detectron2's SimpleTrainer creates lazily at its first step: created here, as early in the
        # process as in the uninterrupted run (the DataLoader draws its workers' base seed from torch's generator)
        data = getattr(self.trainer, "_trainer", self.trainer)._data_loader_iter
        for _ in range(start):
            next(data)
        logger.info("Resuming at iteration %d: skipped the %d batches already trained on in %.1f s.", start, start,
                    time.perf_counter() - t0)
        if self._rng is None:
            logger.warning("The checkpoint holds no generator states (written without ExactResumeHook): the resumed "
                           "run draws other random numbers than an uninterrupted one.")
        elif comm.is_main_process():
            set_rng_state(self._rng)
