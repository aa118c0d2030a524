"""The monitor's configuration: one validated pydantic model with the sections DESIGN.md names.

Load it from a YAML path, a dict, or build it in Python; an unknown or mistyped key is a
:class:`~stethoscope.errors.ConfigError` naming the key, where it came from, and the closest valid key.
Every option is documented in ``docs/configuration.md`` with its default and the reason for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from stethoscope._strict import StrictModel, StrictRootModel, read_yaml, validate_config
from stethoscope.errors import ConfigError
from stethoscope.naming import patterns  # noqa: F401  (re-exported: ``stethoscope.config.patterns``)


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
    update_budget_mb: float | None = Field(
        256.0, ge=0.0,
        description="MiB of parameters copied per device on a sampled step for update ratios (round-robin "
        "across sampled steps; a larger parameter alone); null = all every sampled step",
    )
    per_call: bool = Field(
        False, description="one metrics row per call of a module instead of one aggregated row"
    )
    compile: Literal["auto", "always", "never"] = Field(
        "auto", description="fuse the statistics with torch.compile: auto = for CUDA tensors only"
    )
    loss_spike: float = Field(
        10.0, gt=1.0, description="a loss above this multiple of its running median is an anomaly"
    )
    grad_norm_spike: float = Field(
        10.0, gt=1.0, description="a global grad norm above this multiple of its median is an anomaly"
    )


class ThresholdOverride(StrictModel):
    """A per-name-pattern threshold for one rule; the last matching entry wins (docs/rules.md)."""

    pattern: str = Field(description="glob over the finding's target (or any dotted ancestor of it)")
    rule: str = Field(description="a threshold key (a finding code, or e.g. update.ratio.low) or a glob of keys")
    warning: float | None = Field(None, description="warning level; omitted = inherited; .inf = off")
    critical: float | None = Field(None, description="critical level; omitted = inherited; .inf = off")

    @field_validator("rule")
    @classmethod
    def _known_rule(cls, value: str) -> str:
        from stethoscope.rules.thresholds import check_rule_name

        return check_rule_name(value)


class RulesConfig(StrictModel):
    """Which health rules run and how much history they keep (see docs/rules.md)."""

    enabled: str | list[str] = Field("*", description="finding-code patterns of the rules to run; '' = none")
    disabled: str | list[str] = Field("", description="finding-code patterns of rules not to run")
    window: int = Field(20, ge=4, description="sampled steps of history for baselines and trends")
    smoothing: int = Field(3, ge=1, description="sampled steps averaged before a threshold comparison")
    min_history: int = Field(5, ge=3, description="sampled steps a trend needs before it is judged")
    min_rows: int = Field(16, ge=1, description="rows (batch x positions) needed to call a feature dead")
    max_open: int = Field(8, ge=1, description="most findings one rule keeps open at once (worst first)")
    aggregate_min: int = Field(
        4, ge=0, description="new targets of one code, severity and cause in one step from which they are one "
        "finding with a scope (0 or 1: never)"
    )
    explain_normal: bool = Field(False, description="info findings for known-normal zeros and ratios")
    saturation_modules: str | list[str] = Field(
        "auto", description="'auto' = projections feeding a saturating activation; else module patterns"
    )


class WatchdogConfig(StrictModel):
    """When the hang watchdog speaks up (see docs/watchdog.md)."""

    enabled: bool = True
    stall_seconds: float = Field(300.0, gt=0.0)
    first_call_stall_seconds: float = Field(1800.0, gt=0.0)
    repeat_seconds: float = Field(300.0, gt=0.0)
    on_stall: Literal["dump", "raise", "exit"] = "dump"
    signal: bool = Field(True, description="SIGUSR1 writes a hang dump on demand (main thread, POSIX)")


class TraceConfig(StrictModel):
    """Trace mode's tree: how deep and how many repeated calls are printed (see docs/trace.md)."""

    depth: int = Field(4, ge=0, description="module nesting levels printed; deeper calls are folded")
    repeats: int = Field(2, ge=1, description="consecutive calls of one module class printed before folding")
    stats: bool = Field(False, description="mean, std, abs-max and finiteness of every output in trace.jsonl")
    profile: bool = Field(True, description="the monitor times every module on sampled steps (profile.json)")


class AttentionConfig(StrictModel):
    """Attention capture and invariant checks (see docs/attention.md)."""

    capture: Literal["auto", "eager", "recompute", "off"] = "auto"
    row_sum_tol: float = Field(1.0e-3, gt=0.0)
    sink_share: float = Field(0.5, gt=0.0, le=1.0)
    max_tokens: int = Field(10, ge=1)
    max_sequences: int = Field(
        4, ge=0, description="sequences of each batch checked per sampled step (padded ones first); 0 = all"
    )
    modules: str | list[str] = Field(
        "", description="patterns of plain modules whose output is (output, attention weights); '' = none"
    )
    block_queries: int = Field(
        128, ge=0, description="query rows per block when statistics are computed from q and k; 0 = all"
    )
    block_keys: int = Field(
        1024, ge=0, description="keys per tile of the online softmax (memory: block_queries x block_keys); 0 = all"
    )
    logit_window: int = Field(8, ge=3, description="sampled steps over which a head's max logit must grow")
    logit_growth: float = Field(
        2.0, gt=1.0, description="factor a head's max logit must grow by over attention.logit_window"
    )


class MemoryConfig(StrictModel):
    """Memory monitoring (see docs/memory.md)."""

    enabled: bool = Field(True, description="read process RSS (and CUDA memory) at the end of every step")
    leak_window: int = Field(50, ge=3, description="steps over which steady growth is judged a leak")
    every: int = Field(10, ge=1, description="write a memory row every N steps (and on sampled steps)")
    snapshots: int = Field(
        2, ge=0, description="leak investigations per run (two live-tensor snapshots each); 0 = never"
    )
    snapshot_gap: int = Field(5, ge=1, description="steps between the two snapshots of an investigation")
    census_every: int = Field(
        500, ge=0, description="count live tensors every N steps: graph holders piling up are a leak; 0 = off"
    )
    oom_dump: bool = Field(True, description="an out-of-memory error in a step writes crash-*.txt + memory.oom")
    input_shapes: bool = Field(True, description="remember the shapes of the model's inputs (for OOM context)")


class LogitsConfig(StrictModel):
    """The LM head's logit level: ``logits.divergence`` (see docs/findings.md#logitsdivergence)."""

    enabled: bool = Field(True, description="summarise the LM head's logits on sampled steps")
    modules: str | list[str] = Field(
        "auto", description="the LM head: auto = the model's output embeddings (or a module named lm_head), else "
        "name patterns"
    )
    max_rows: int = Field(64, ge=1, description="token positions per call whose logits are summarised (strided)")


class MoEConfig(StrictModel):
    """Mixture-of-experts routing health (see docs/moe.md)."""

    enabled: bool = Field(True, description="watch the routers of mixture-of-experts layers on sampled steps")
    modules: str | list[str] = Field(
        "", description="patterns of extra gate modules returning router logits (and top-k indices); '' = none"
    )
    top_k: int = Field(2, ge=1, description="experts per token of a listed gate that has no top_k attribute")
    window: int = Field(8, ge=1, description="sampled steps whose expert loads are summed before judging them")
    capacity_factor: float = Field(
        1.25, gt=0.0, description="expert capacity over the mean load (Switch's default), unless the model config "
        "sets one"
    )
    min_tokens_per_expert: float = Field(
        16.0, gt=0.0, description="mean routed tokens per expert the window needs before load findings are judged"
    )


class RecorderConfig(StrictModel):
    """The crash flight recorder (see docs/recorder.md): DEBUG events kept in memory, written on a crash."""

    enabled: bool = Field(True, description="keep the ring buffer and write crash-*.txt / .jsonl on a crash")
    capacity: int = Field(4096, ge=16, description="events kept (the oldest are dropped)")
    max_entry_chars: int = Field(1000, ge=80, description="longest text of one event; longer is cut")
    module_events: int = Field(
        2048, ge=0, description="module enter/exit events kept in their own ring; 0 = no module hooks"
    )
    level: str = Field("DEBUG", description="logging level captured for loggers without a level of their own")
    levels: dict[str, str] = Field(
        default_factory=dict, description="logger name -> captured level (e.g. {urllib3: WARNING})"
    )
    on_exception: bool = Field(True, description="dump when an exception leaves a monitored step")
    on_sigterm: bool = Field(True, description="dump on SIGTERM (main thread; the previous handler runs after)")
    on_nonfinite_loss: bool = Field(False, description="dump the first time a logged loss is NaN or Inf")

    @field_validator("level")
    @classmethod
    def _level_name(cls, value: str) -> str:
        return _log_level(value)

    @field_validator("levels")
    @classmethod
    def _level_names(cls, value: dict[str, str]) -> dict[str, str]:
        return {str(k): _log_level(v) for k, v in value.items()}


def _log_level(value: Any) -> str:
    """A logging level name (DEBUG, INFO, WARNING, ERROR, CRITICAL, NOTSET), upper-cased, or ValueError."""
    name = str(value).strip().upper()
    if name == "WARN":
        name = "WARNING"
    if name not in ("NOTSET", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"not a logging level: {value!r} (use DEBUG, INFO, WARNING, ERROR or CRITICAL)")
    return name


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
    state_every_s: float = Field(
        30.0, ge=0.0,
        description="rewrite state.json at most this often on sampled steps (and whenever a finding changed); "
        "0 = after every sampled step",
    )


class ReportConfig(StrictModel):
    """What ``close()`` writes into the run directory (docs/report.md)."""

    enabled: bool = Field(True, description="write report.html and report.md when the monitor closes")
    plots: bool = Field(True, description="draw the figures (matplotlib, ~0.1-0.3 s each); False = tables only")


class TensorBoardConfig(StrictModel):
    """The TensorBoard sink (docs/tensorboard.md): off by default; needs ``pip install stethoscope[tensorboard]``."""

    enabled: bool = Field(False, description="write TensorBoard event files with torch's SummaryWriter")
    log_dir: str | None = Field(
        None, description="event file folder; null = <run_dir>/tensorboard (rank{N}/ appended when distributed)"
    )
    histograms: bool = Field(True, description="per-parameter / per-module histograms on sampled steps")


class IncidentsConfig(StrictModel):
    """Incident capture (docs/replay.md): the batch, RNG states and weights of a step whose loss or gradient
    went non-finite or spiked, saved to ``incidents/step-<N>/`` for ``stethoscope replay``."""

    enabled: bool = Field(True, description="keep references to each step's forward inputs; save them on an incident")
    weights: Literal["auto", "before_step", "after_step", "off"] = Field(
        "auto", description="before_step = read the total gradient norm at the optimizer's step pre-hook and "
        "copy the weights to the CPU when it is non-finite or spikes (on an accelerator, one host sync per "
        "optimizer step); after_step = save them as they are at the step's end; auto = before_step where that "
        "read costs no transfer (weights in host memory), after_step on an accelerator; off = no weights"
    )
    spikes: bool = Field(True, description="loss and gradient-norm spikes open incidents too, not only NaN/Inf")
    max_batch_mb: float = Field(
        64.0, gt=0.0, description="past this size every tensor of the batch keeps only its first rows (the most "
        "that fit); the manifest says how many"
    )
    max_weights_mb: float = Field(2048.0, ge=0.0, description="weights larger than this are not saved")
    max_incidents: int = Field(5, ge=0, description="incident folders written per run at most")
    max_calls: int = Field(64, ge=1, description="forward calls of the model kept per step (gradient accumulation)")
    factory: str = Field(
        "", description="pkg.mod:fn that rebuilds your model, written into every incident's manifest so that "
        "`stethoscope replay FOLDER` needs no --factory ('' = none)"
    )
    factory_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments (plain JSON values) the replay passes to that factory"
    )


class DistributedConfig(StrictModel):
    """Multi-process runs under torch.distributed (docs/distributed.md)."""

    reduce_grad_stats: bool = Field(
        False, description="also reduce gradient statistics across ranks (a collective on scheduled steps)"
    )
    merge_timeout: float = Field(
        60.0, ge=0.0, description="seconds rank 0 waits at close for the other ranks before merging"
    )
    heartbeat_seconds: float = Field(
        1.0, gt=0.0, description="how often each rank publishes rank{N}/heartbeat.json (watchdog thread)"
    )


class PerfConfig(StrictModel):
    """The step-time breakdown and straggler detection (docs/perf.md, docs/distributed.md)."""

    enabled: bool = Field(True, description="time each step's phases (a few clock reads per step, no sync)")
    every: int = Field(10, ge=1, description="one kind: perf metrics row per this many steps (their mean)")
    window: int = Field(50, ge=8, description="steps over which the phase findings are judged")
    publish_every: int = Field(
        10, ge=1, description="judge (and publish rank{N}/perf.json when distributed) every this many steps"
    )
    persist: int = Field(3, ge=1, description="judgments in a row a rank must be slow before dist.straggler")
    straggler_min_share: float = Field(
        0.10, ge=0.0, description="a straggler's extra time must also be this share of the median step"
    )
    min_wait_ms: float = Field(
        5.0, ge=0.0, description="perf.input_bound needs a median data wait of at least this many ms"
    )
    min_monitor_ms: float = Field(
        0.5, ge=0.0, description="perf.monitor_overhead needs at least this many ms per step of monitor time"
    )
    device_events: bool = Field(True, description="CUDA events at the phase moments when the model is on CUDA")


class Config(StrictRootModel):
    """The whole monitor configuration. ``Config()`` is the documented default."""

    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    thresholds: list[ThresholdOverride] = Field(default_factory=list)
    rules: RulesConfig = Field(default_factory=RulesConfig)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    trace: TraceConfig = Field(default_factory=TraceConfig)
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    logits: LogitsConfig = Field(default_factory=LogitsConfig)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    recorder: RecorderConfig = Field(default_factory=RecorderConfig)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    tensorboard: TensorBoardConfig = Field(default_factory=TensorBoardConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    incidents: IncidentsConfig = Field(default_factory=IncidentsConfig)
    perf: PerfConfig = Field(default_factory=PerfConfig)
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


