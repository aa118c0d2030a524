"""Layer probing: does a layer separate an attribute, without leaking another, robustly across texts?

The pipeline behind ``stethoscope probe`` (docs/probing.md)::

    from stethoscope.probe import run_all, ProbeAdapter, ModelInputs
    run_all("probe.yaml")                               # synth? -> features -> fit -> report
    run_all("probe.yaml", adapters={"backbone": my_adapter})   # a module built in Python

Names are imported lazily so ``import stethoscope.probe`` (and the CLI's ``--help``) stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ProbeAdapter": "stethoscope.probe.features",
    "ModelInputs": "stethoscope.probe.features",
    "extract_features": "stethoscope.probe.features",
    "resolve_layers": "stethoscope.probe.features",
    "layer_aliases": "stethoscope.probe.features",
    "fit_logistic": "stethoscope.probe.fit",
    "PipelineConfig": "stethoscope.probe.config",
    "load_config": "stethoscope.probe.config",
    "ProbeItem": "stethoscope.probe.manifest",
    "load_manifest": "stethoscope.probe.manifest",
    "write_synthetic": "stethoscope.probe.synth",
    "decide": "stethoscope.probe.decision",
    "run_all": "stethoscope.probe.pipeline",
    "run_synth": "stethoscope.probe.pipeline",
    "run_features": "stethoscope.probe.pipeline",
    "run_fit": "stethoscope.probe.pipeline",
    "run_report": "stethoscope.probe.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stethoscope.probe' has no attribute {name!r}")
