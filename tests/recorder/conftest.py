"""Fixtures: the console buffer (``console_text``), seeded torch on one thread, the monitor enabled."""

import gc

import pytest

from tests._console import console_text, quiet  # noqa: F401  (the fixture registers by import)


@pytest.fixture(autouse=True)
def collected_heap():
    # A monitor an earlier test abandoned inside a reference cycle (a `pytest.raises` traceback holding its
    # frame) keeps the logging levels it lowered until the collector frees it: these tests read the global
    # logging state, so they start from a collected heap.
    gc.collect()
    yield
