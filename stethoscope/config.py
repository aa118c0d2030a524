"""The monitor's configuration: one validated pydantic model with the sections DESIGN.md names.

Load it from a YAML path, a dict, or build it in Python; an unknown or mistyped key is a
:class:`~stethoscope.errors.ConfigError` naming the key, where it came from, and the closest valid key.
Every option is documented in ``docs/configuration.md`` with its default and the reason for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from stethoscope._strict import StrictModel, read_yaml, validate_config
from stethoscope.errors import ConfigError


class SamplingConfig(StrictModel):
    """Which steps get full statistics: the first ``warmup_steps``, then every ``every``-th."""

    warmup_steps: int = Field(10, ge=0, description="steps sampled at the start of the run")
    every: int = Field(50, ge=1, description="sample one step in this many after the warm-up")
    after_anomaly: int = Field(
        20, ge=0, description="steps sampled in a row after a non-finite loss or a spike"
    )


class StatsConfig(StrictModel):
    """What gets statistics and with which bounds."""

    eps: float = Field(1.0e-8, ge=0.0, description="|x| <= eps counts as zero")
    saturation: float = Field(3.0, gt=0.0, description="|x| > saturation counts as saturated")
    modules: str | list[str] = Field(
        "*", description="module name patterns whose outputs get statistics; '' = none"
    )
    parameters: str | list[str] = Field(
        "*", description="parameter name patterns whose gradients get statistics; '' = none"
    )
    update_ratio: str | list[str] = Field(
        "*", description="parameter name patterns whose update-to-weight ratio is measured; '' = off"
    )
    per_call: bool = Field(
        False, description="one metrics row per call of a module instead of one aggregated row"
    )
    loss_spike: float = Field(
        10.0, gt=1.0, description="a loss above this multiple of its running median is an anomaly"
    )
    grad_norm_spike: float = Field(
        10.0, gt=1.0, description="a global grad norm above this multiple of its median is an anomaly"
    )


class ThresholdOverride(StrictModel):
    """A per-name-pattern threshold for one rule; the last matching entry wins."""

    pattern: str
    rule: str
    warning: float | None = None
    critical: float | None = None


class WatchdogConfig(StrictModel):
    """When the hang watchdog speaks up (see docs/watchdog.md)."""

    enabled: bool = True
    stall_seconds: float = Field(300.0, gt=0.0)
    first_call_stall_seconds: float = Field(1800.0, gt=0.0)
    repeat_seconds: float = Field(300.0, gt=0.0)
    on_stall: Literal["dump", "raise", "exit"] = "dump"


class AttentionConfig(StrictModel):
    """Attention capture and invariant checks (see docs/attention.md)."""

    capture: Literal["auto", "eager", "recompute", "off"] = "auto"
    row_sum_tol: float = Field(1.0e-3, gt=0.0)
    sink_share: float = Field(0.5, gt=0.0, le=1.0)
    max_tokens: int = Field(10, ge=1)


class MemoryConfig(StrictModel):
    """Memory monitoring (see docs/memory.md)."""

    leak_window: int = Field(50, ge=3)


class ConsoleConfig(StrictModel):
    """What the monitor prints while training."""

    quiet: bool = Field(False, description="print nothing while training; files are written as usual")
    every: int = Field(
        0, ge=0, description="print a line every N logged steps (0 = on sampled steps only)"
    )


class StorageConfig(StrictModel):
    """Bounds on what the run directory may grow to."""

    max_metrics_mb: float = Field(
        1024.0, gt=0.0, description="past this size metrics.jsonl keeps only scalar rows"
    )


class Config(StrictModel):
    """The whole monitor configuration. ``Config()`` is the documented default."""

    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    thresholds: list[ThresholdOverride] = Field(default_factory=list)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    stop_on: Literal["critical"] | None = None

    @field_validator("stop_on", mode="before")
    @classmethod
    def _stop_on_null(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in ("null", "none", ""):
            return None
        return value


def load_config(config: Config | dict | str | Path | None) -> Config:
    """A :class:`Config` from a path to a YAML file, a dict, a Config, or None (the defaults)."""
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, str | Path):
        data = read_yaml(config)
        return validate_config(Config, data, source=str(config))
    if isinstance(config, dict):
        return validate_config(Config, config, source="the config dict")
    raise ConfigError(
        f"config must be a path to a YAML file, a dict or a stethoscope.Config, got {type(config).__name__}"
    )


def patterns(value: str | list[str]) -> list[str]:
    """A pattern option as a list; '' (or an empty list) means none."""
    if isinstance(value, str):
        return [] if value == "" else [value]
    return [v for v in value if v != ""]
