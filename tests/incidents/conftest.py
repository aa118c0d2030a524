"""One intra-op thread for these tests (module fixtures included: the tiny models run ~40x slower when two
threads share busy cores), and the console captured (``console_text``)."""

from __future__ import annotations

import pytest
import torch

from tests._console import console_text  # noqa: F401  (the fixture registers by import)


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
