"""The config's fingerprint: a short hash printed in the report so two reports can be told apart."""

from __future__ import annotations

from stethoscope.probe.config import PipelineConfig, settings_hash


def config_fingerprint(cfg: PipelineConfig) -> str:
    """Short hash of the config, printed in the report so two reports can be told apart."""
    return settings_hash(cfg.model_dump(mode="json", exclude={"output_dir"}))
