"""CUDA tests (issue 17, item 6): each is marked ``cuda`` and skips cleanly where no GPU is present.

Run them on a GPU machine with ``pytest -m cuda tests/cuda`` or ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import pytest
import torch

from tests._console import console_text  # noqa: F401  (autouse: monitor enabled, seeded, captured console)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def free_cuda_cache():
    """Each test's CUDA allocations go back to the device, so memory readings start from a clean cache."""
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
