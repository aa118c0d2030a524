"""The probing pipeline's YAML configuration: every key, its default, and why (docs/probing.md).

Relative paths are resolved against the directory of the YAML file, so a config travels with its data.
Unknown keys are errors with a did-you-mean (``stethoscope._strict``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, field_validator, model_validator

from stethoscope._strict import StrictModel, read_yaml, validate_config
from stethoscope.errors import ConfigError


class ColumnsConfig(StrictModel):
    """Which manifest column plays which role (defaults: the field note's ``metadata.csv``)."""

    id: str | None = "utt_id"
    target: str = "accent"
    group: str = "speaker"
    nuisance: str | None = "speaker"
    content: str | None = "text_id"
    audio: str | None = "rel_path"
    text: str | None = None


class DatasetConfig(StrictModel):
    """Where the items are and how to read them."""

    root: Path = Path("data")
    manifest: str = "metadata.csv"
    texts: str | None = "texts.json"
    audio_dir: str = "wav"
    input: Literal["audio", "text"] = "audio"
    sample_rate: int = Field(16000, gt=0)
    columns: ColumnsConfig = ColumnsConfig()
    min_targets: int = Field(3, ge=1)
    min_groups_per_target: int = Field(8, ge=1)
    min_texts_per_group: int = Field(30, ge=1)


class SynthConfig(StrictModel):
    """A synthetic set with planted attributes; written to ``dataset.root`` by the ``synth`` stage."""

    targets: int = Field(3, ge=2)
    groups_per_target: int = Field(8, ge=1)
    texts: int = Field(30, ge=1)
    target_strength: float = Field(1.0, ge=0)
    group_strength: float = Field(0.5, ge=0)
    content_strength: float = Field(0.5, ge=0)
    duration_s: float = Field(0.5, gt=0)
    sample_rate: int = Field(16000, gt=0)
    seed: int | None = None


class FrontEndConfig(StrictModel):
    """Options of the classical log-mel / MFCC baseline (``kind: frontend``)."""

    n_mels: int = Field(64, ge=2)
    n_mfcc: int = Field(20, ge=1)
    win_ms: float = Field(25.0, gt=0)
    hop_ms: float = Field(10.0, gt=0)


PoolingName = Literal["mean", "std", "mean_std", "max", "first", "last"]
EXTRACTION_THREADS = 1  # benchmarks/probe_threads.py (docs/probing.md): one thread never lost much, two lost 4x


class RepresentationConfig(StrictModel):
    """One representation to probe: a Hugging Face checkpoint, a custom module, or the front end."""

    name: str
    kind: Literal["hf", "module", "frontend"] = "hf"
    checkpoint: Path | None = None
    factory: str | None = None
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)
    layers: list[str] | Literal["all"] = "all"
    aliases: dict[str, str] = Field(default_factory=dict)
    pooling: PoolingName | list[PoolingName] = "mean"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(256, ge=1)
    device: str = "auto"
    threads: int | None = Field(EXTRACTION_THREADS, ge=1)
    baseline: bool | None = None
    frontend: FrontEndConfig = FrontEndConfig()

    @field_validator("pooling")
    @classmethod
    def _poolings(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("list at least one pooling (mean, std, mean_std, max, first, last)")
            dupes = sorted({p for p in value if value.count(p) > 1})
            if dupes:
                raise ValueError(f"pooling lists {', '.join(dupes)} twice")
        return value

    @field_validator("layers")
    @classmethod
    def _layer_specs(cls, value):
        from stethoscope.probe.taps import parse_tap

        for spec in [] if value == "all" else value:
            try:
                parse_tap(spec)
            except KeyError as exc:  # ProbeLayerError: a malformed tap spec
                raise ValueError(str(exc)) from None
        return value

    @property
    def poolings(self) -> list[str]:
        """The pooling as a list (one or several)."""
        return [self.pooling] if isinstance(self.pooling, str) else list(self.pooling)

    @model_validator(mode="after")
    def _kind_needs(self):
        if self.kind == "hf" and self.checkpoint is None:
            raise ValueError(
                f"representation {self.name!r} has kind 'hf' but no 'checkpoint' (a local folder)"
            )
        if self.kind == "module" and not self.factory:
            raise ValueError(
                f"representation {self.name!r} has kind 'module' but no 'factory' ('package.module:function')"
            )
        if self.name != self.name.strip() or not self.name or any(c in self.name for c in "/\\:"):
            raise ValueError(f"representation name {self.name!r} must be non-empty without '/', '\\' or ':'")
        return self

    @property
    def is_baseline(self) -> bool:
        """Baselines are reported but never chosen as the best layer (the front end is one by default)."""
        return self.kind == "frontend" if self.baseline is None else self.baseline


class ProbeConfig(StrictModel):
    """The probes: folds, regularisation, solver, and which metrics to compute."""

    folds: int = Field(5, ge=2)
    C: float = Field(1.0, gt=0)
    max_iter: int = Field(500, ge=1)
    tol: float = Field(1e-5, gt=0)
    standardize: bool = True
    control: bool = True
    leakage: bool = True
    text_drop: bool = True
    leakage_chance: Literal["shuffled", "uniform"] = "shuffled"
    confidence: float = Field(0.95, gt=0, lt=1)
    device: str = "cpu"
    layers_per_batch: int | None = Field(None, ge=1)


class DecisionConfig(StrictModel):
    """GO / NOGO thresholds (the field note's defaults)."""

    min_f1_go: float = Field(0.55, ge=0, le=1)
    min_f1_conditional: float = Field(0.45, ge=0, le=1)
    max_f1_nogo: float = Field(0.40, ge=0, le=1)
    leakage_margin_pp: float = Field(7.0, ge=0)
    max_text_drop: float = Field(0.10)

    @model_validator(mode="after")
    def _ordered(self):
        if not self.max_f1_nogo <= self.min_f1_conditional <= self.min_f1_go:
            raise ValueError(
                "thresholds must satisfy max_f1_nogo <= min_f1_conditional <= min_f1_go, got "
                f"{self.max_f1_nogo} / {self.min_f1_conditional} / {self.min_f1_go}"
            )
        return self


class ReportConfig(StrictModel):
    """What the report stage writes."""

    title: str = "Layer probing report"
    figures: bool = True
    zip: bool = True


class PipelineConfig(StrictModel):
    """The whole ``stethoscope probe`` configuration."""

    seed: int = 0
    output_dir: Path = Path("probe_out")
    dataset: DatasetConfig = DatasetConfig()
    synth: SynthConfig | None = None
    representations: list[RepresentationConfig] = Field(
        default_factory=lambda: [RepresentationConfig(name="frontend", kind="frontend")]
    )
    probe: ProbeConfig = ProbeConfig()
    decision: DecisionConfig = DecisionConfig()
    report: ReportConfig = ReportConfig()
    _config_dir: Path | None = PrivateAttr(None)

    @property
    def config_dir(self) -> Path:
        """The folder relative paths were resolved against (the YAML file's), where factories are found too."""
        return self._config_dir or Path.cwd()

    @model_validator(mode="after")
    def _unique_names(self):
        names = [r.name for r in self.representations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"representation names must be unique; repeated: {', '.join(dupes)}")
        if not names:
            raise ValueError("list at least one representation to probe")
        return self

    def resolved(self, base: Path) -> PipelineConfig:
        """A copy with relative paths made absolute against ``base`` (the config file's folder)."""
        cfg = self.model_copy(deep=True)

        def fix(p: Path | None) -> Path | None:
            if p is None:
                return None
            p = Path(p).expanduser()
            return p if p.is_absolute() else (base / p).resolve()

        cfg._config_dir = Path(base).resolve()
        cfg.output_dir = fix(cfg.output_dir)
        cfg.dataset.root = fix(cfg.dataset.root)
        for rep in cfg.representations:
            if rep.checkpoint is not None:
                rep.checkpoint = fix(rep.checkpoint)
        return cfg

    def to_yaml(self) -> str:
        """The configuration as YAML (paths as strings), for ``config.yaml`` in the output folder."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def load_config(source: str | Path | dict | PipelineConfig, base: Path | None = None) -> PipelineConfig:
    """Load and validate a probe config from a YAML path, a dict, or a model; resolve relative paths.

    Args:
        source: the configuration.
        base: folder relative paths are resolved against; defaults to the YAML file's folder, else cwd.

    Raises:
        ConfigError: missing file, bad YAML, unknown key (with did-you-mean) or invalid value.
    """
    if isinstance(source, PipelineConfig):
        return source.resolved(base or Path.cwd())
    if isinstance(source, dict):
        return validate_config(PipelineConfig, source, "probe config").resolved(base or Path.cwd())
    path = Path(source)
    data = read_yaml(path)
    if data is None:
        raise ConfigError(f"configuration file {str(path)!r} is empty; start from docs/probing.md's example")
    cfg = validate_config(PipelineConfig, data, str(path))
    return cfg.resolved(base or path.resolve().parent)


def settings_hash(obj: Any) -> str:
    """Stable short hash of JSON-able settings, to tell whether stored outputs still match the config."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
