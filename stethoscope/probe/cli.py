"""``stethoscope probe``: run the layer-probing pipeline, or one of its stages.

Heavy imports (torch, transformers, matplotlib) happen inside the commands so ``stethoscope --help``
stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Layer probing with a GO / NOGO decision: which layer separates an attribute, without leaking "
    "another, robustly across texts. Stages: synth -> features -> fit -> report (`run` does them all).",
    no_args_is_help=True,
)

ConfigArg = Annotated[
    Path, typer.Argument(help="the probe YAML config (see docs/probing.md)", show_default=False)
]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="hide progress bars")]
SYNTH_OUTPUTS = ("wav", "metadata.csv", "texts.json", "synth.json", "probe.yaml")  # what `synth OUT_DIR` writes


def _fail(exc: Exception) -> None:
    from stethoscope.console import get_console

    get_console().print(f"[bold red]error:[/bold red] {exc}", soft_wrap=True)
    raise typer.Exit(code=2)


def _guard(fn, *args, **kwargs):
    from stethoscope.errors import StethoscopeError

    try:
        return fn(*args, **kwargs)
    except StethoscopeError as exc:
        _fail(exc)


@app.command()
def run(config: ConfigArg, no_progress: NoProgress = False) -> None:
    """Every stage in order: synth (if the config has a synth section), features, fit, report."""
    from stethoscope.probe.pipeline import run_all

    _guard(run_all, config, progress=not no_progress)


@app.command()
def synth(
    out_dir: Annotated[
        Path | None, typer.Argument(help="where to write the set (omit with --config)", show_default=False)
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="take parameters and dataset.root from this config")
    ] = None,
    targets: Annotated[int, typer.Option(help="target classes (accents)")] = 3,
    groups_per_target: Annotated[int, typer.Option(help="groups (speakers) per target class")] = 8,
    texts: Annotated[int, typer.Option(help="texts read by every group")] = 30,
    target_strength: Annotated[float, typer.Option(help="planted target signal (0 = none)")] = 1.0,
    group_strength: Annotated[float, typer.Option(help="planted group signal, seen as leakage")] = 0.5,
    content_strength: Annotated[float, typer.Option(help="planted content (text) signal")] = 0.5,
    duration: Annotated[float, typer.Option(help="seconds per item (varies +-20%)")] = 0.5,
    sample_rate: Annotated[int, typer.Option(help="Hz")] = 16000,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    force: Annotated[bool, typer.Option("--force", help="write into a folder that is not empty (replaces wav/, "
                                        "metadata.csv, texts.json, synth.json and probe.yaml there)")] = False,
) -> None:
    """Write a synthetic audio set with planted attributes, plus a ready-to-run probe.yaml beside it."""
    from stethoscope.console import get_console

    if config is not None:
        from stethoscope.probe.pipeline import run_synth

        _guard(run_synth, config, force=True)
        return
    if out_dir is None:
        _fail(ValueError("give an output folder (stethoscope probe synth OUT_DIR) or --config CONFIG.yaml"))
    from pydantic import ValidationError

    from stethoscope.probe.config import SynthConfig
    from stethoscope.probe.synth import write_synthetic

    try:
        cfg = SynthConfig(
            targets=targets,
            groups_per_target=groups_per_target,
            texts=texts,
            target_strength=target_strength,
            group_strength=group_strength,
            content_strength=content_strength,
            duration_s=duration,
            sample_rate=sample_rate,
            seed=seed,
        )
    except ValidationError as exc:
        _fail(ValueError(str(exc)))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        _fail(ValueError(f"OUT_DIR {str(out)!r} is a file; pass a folder"))
    existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    replaced = [n for n in SYNTH_OUTPUTS if n in existing]
    if existing and not force:
        shown = ", ".join(existing[:4]) + (", …" if len(existing) > 4 else "")
        what = (f"holds a synthetic set ({', '.join(replaced)})" if replaced
                else f"is not empty ({len(existing)} entries: {shown})")
        _fail(ValueError(f"OUT_DIR {str(out)!r} {what}; pass --force to write the set there (replacing "
                         f"{', '.join(SYNTH_OUTPUTS)}; other files stay), or choose a new folder"))
    path = _guard(write_synthetic, out_dir, cfg, seed=seed)
    yaml_path = out / "probe.yaml"
    yaml_path.write_text(_starter_config(sample_rate), encoding="utf-8")
    console = get_console()
    if replaced:
        console.print(f"replaced {', '.join(replaced)} in {out}", soft_wrap=True)
    console.print(f"wrote {path} and {yaml_path}; next: stethoscope probe run {yaml_path}", soft_wrap=True)


def _starter_config(sample_rate: int) -> str:
    return (
        "# written by `stethoscope probe synth`; every key is documented in docs/probing.md\n"
        "seed: 0\n"
        "output_dir: probe_out\n"
        "dataset:\n"
        "  root: .\n"
        f"  sample_rate: {sample_rate}\n"
        "representations:\n"
        "  - {name: frontend, kind: frontend, pooling: mean_std}\n"
    )


@app.command()
def features(config: ConfigArg, no_progress: NoProgress = False) -> None:
    """Extract pooled hidden states of every configured layer (resumes an interrupted run)."""
    from stethoscope.probe.pipeline import run_features

    _guard(run_features, config, progress=not no_progress)


@app.command()
def fit(config: ConfigArg, no_progress: NoProgress = False) -> None:
    """Fit the probes on stored features; write metrics.csv and the decision."""
    from stethoscope.probe.pipeline import run_fit

    _guard(run_fit, config, progress=not no_progress)


@app.command()
def report(config: ConfigArg) -> None:
    """Write report.md, the heatmaps and the results zip from the fitted metrics."""
    from stethoscope.probe.pipeline import run_report

    _guard(run_report, config)
