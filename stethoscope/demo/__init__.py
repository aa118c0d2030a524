"""The built-in demo: a nanoGPT-style TinyGPT trained on bundled Python documentation, monitor on.

``stethoscope demo`` (or :func:`run_demo`) trains it for a minute on a CPU and writes a run directory;
``--pathology`` injects one real, localised training problem (see :mod:`stethoscope.demo.pathologies`).

Example:
    >>> from stethoscope.demo import run_demo
    >>> run_dir = run_demo(steps=50, pathology="dead-relu")  # doctest: +SKIP
"""

from stethoscope.demo.corpus import ByteCorpus
from stethoscope.demo.model import GPTConfig, TinyGPT
from stethoscope.demo.pathologies import PATHOLOGIES, Pathology, get_pathology
from stethoscope.demo.runner import DEFAULT_STEPS, TrainSettings, run_demo

__all__ = [
    "DEFAULT_STEPS",
    "PATHOLOGIES",
    "ByteCorpus",
    "GPTConfig",
    "Pathology",
    "TinyGPT",
    "TrainSettings",
    "get_pathology",
    "run_demo",
]
