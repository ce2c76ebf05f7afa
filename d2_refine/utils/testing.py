"""Helpers shared by the test-suite (kept in the package so every test folder can import them)."""
import pytest
import torch


def cpu_and_cuda():
    """pytest parameters: "cpu", plus "cuda" (skipped with a reason where CUDA is absent)."""
    return ("cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                   reason="CUDA is not available")))
