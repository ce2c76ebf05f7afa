"""Whether a graph capture is recording the current call (shared by the code paths that must not branch on
tensor values while being captured; docs/EXPORT.md)."""
import torch

__all__ = ["is_tracing_or_exporting"]


def is_tracing_or_exporting() -> bool:
    """True under ``torch.export`` or ``torch.jit.trace``: a branch on tensor values would fail (export) or be
    frozen at the example's outcome (trace)."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()
