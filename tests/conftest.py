"""Puts tests/ on sys.path, so that every test file imports the suite's shared helpers with ``from helpers import
...`` (tests/helpers.py): the suite runs with ``--import-mode=importlib`` (pyproject.toml), where test folders are not
packages and test files cannot import each other."""
import os
import sys

import pytest

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture
def threads():
    """``threads(n)`` sets torch's CPU thread count for the test (e.g. 1, where NNPACK is picked); restored after."""
    import torch

    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
