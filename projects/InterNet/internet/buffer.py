"""The class buffer: one centroid of reliable-set critic outputs per foreground class (torch only).

Its state lives in registered buffers, so it moves with the model, is saved in checkpoints and is never a
parameter. In distributed training every rank must call :meth:`ClassBuffer.update` each step (with an empty
batch when it has nothing): the per-class sums and counts are all-reduced before the update.
"""
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ClassBuffer"]


class ClassBuffer(nn.Module):
    """Per-class centroids ``mu_c`` (Tensor[K, D]) and counts ``n_c`` (Tensor[K]).

    ``size`` 1 (released): running mean over all history,
    ``mu_c <- (mu_c * n_c + sum_c) / (n_c + m_c)``, ``n_c <- n_c + m_c``.
    ``size`` K > 1: count-weighted mean of the last K updates that contained class c (a per-class FIFO of
    per-step sums and counts, ``num_classes * K * D`` floats: 328 MB for COCO with K=1000, D=1024);
    ``n_c`` is then the count inside the window.

    Args:
        num_classes (int): foreground classes (labels ``0 .. num_classes - 1``).
        dim (int): feature dimension.
        size (int): 1 = all history, K > 1 = FIFO window.
    """

    def __init__(self, num_classes: int, dim: int, size: int = 1):
        super().__init__()
        if size < 1:
            raise ValueError(f"MODEL.INTERNET.BUFFER_SIZE must be >= 1, got {size}")
        self.num_classes = num_classes
        self.dim = dim
        self.size = size
        self.register_buffer("centroids", torch.zeros(num_classes, dim))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.float64))
        if size > 1:
            self.register_buffer("fifo_sums", torch.zeros(num_classes, size, dim))
            self.register_buffer("fifo_counts", torch.zeros(num_classes, size, dtype=torch.float64))
            self.register_buffer("fifo_next", torch.zeros(num_classes, dtype=torch.int64))

    @property
    def occupancy(self) -> int:
        """Number of classes with a centroid."""
        return int((self.counts > 0).sum())

    def filled(self) -> torch.Tensor:
        """BoolTensor[K]: classes with a centroid."""
        return self.counts > 0

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Add a step's reliable-set features (detached) to the centroids of their classes.

        Args:
            features (Tensor[R, D]): activated critic outputs (R may be 0).
            labels (LongTensor[R]): their classes in ``[0, num_classes)``.

        Returns:
            Tensor[K]: the step's count per class (after the all-reduce).
        """
        if features.dim() != 2 or features.shape[1] != self.dim or labels.shape != features.shape[:1]:
            raise ValueError(f"features must be Tensor[R, {self.dim}] with labels LongTensor[R], got "
                             f"{tuple(features.shape)} and {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        sums = torch.zeros(self.num_classes, self.dim, dtype=torch.float64, device=self.centroids.device)
        sums.index_add_(0, labels.to(sums.device), features.detach().to(sums))
        step_counts = torch.bincount(labels.to(sums.device), minlength=self.num_classes).to(torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            packed = torch.cat([sums, step_counts[:, None]], dim=1)
            dist.all_reduce(packed)
            sums, step_counts = packed[:, :-1], packed[:, -1]
        present = step_counts > 0
        if not bool(present.any()):
            return step_counts
        if self.size == 1:
            n_old = self.counts[present]
            n_new = n_old + step_counts[present]
            mu = (self.centroids[present].to(torch.float64) * n_old[:, None] + sums[present]) / n_new[:, None]
            self.centroids[present] = mu.to(self.centroids.dtype)
            self.counts[present] = n_new
        else:
            cls = torch.nonzero(present).flatten()
            slot = self.fifo_next[cls]
            self.fifo_sums[cls, slot] = sums[cls].to(self.fifo_sums.dtype)
            self.fifo_counts[cls, slot] = step_counts[cls]
            self.fifo_next[cls] = (slot + 1) % self.size
            n = self.fifo_counts[cls].sum(dim=1)
            mu = self.fifo_sums[cls].to(torch.float64).sum(dim=1) / n[:, None]
            self.centroids[cls] = mu.to(self.centroids.dtype)
            self.counts[cls] = n
        return step_counts

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, size={self.size}"
