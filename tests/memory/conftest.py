"""Fixtures: the console buffer (``console_text``), seeded torch on one thread, the monitor enabled."""

from tests._console import console_text, quiet  # noqa: F401  (the fixture registers by import)
