"""The ``stethoscope`` command line (also ``python -m stethoscope``).

Heavy imports (torch, transformers, matplotlib) happen inside the commands so ``--help`` stays fast.
Errors we raise on purpose are printed as one readable line with exit code 2, not a traceback.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from stethoscope.console import get_console
from stethoscope.errors import StethoscopeError

app = typer.Typer(
    help="Diagnose PyTorch and Hugging Face training: what is wrong, where, and what usually fixes it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_LEVELS = {"info": 0, "warning": 1, "critical": 2}


def _show_version(value: bool) -> None:
    if value:
        from stethoscope import __version__

        sys.stdout.write(f"stethoscope {__version__}\n")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", help="print the version and exit", is_eager=True,
                                          callback=_show_version)] = False,
) -> None:
    """Diagnose PyTorch and Hugging Face training: what is wrong, where, and what usually fixes it."""


def _run_dir_warning() -> type[Warning]:
    from stethoscope.run import RunDirWarning

    return RunDirWarning


def _load_quietly(run_dir: Path):
    """``load_run`` without Python's warning lines: what it could not read is printed by :func:`_print_problems`."""
    from stethoscope.run import load_run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _run_dir_warning())
        return load_run(run_dir)


def _print_problems(run) -> None:
    """What could not be read in the run directory, one ``warning:`` line each, on stderr (stdout stays the
    findings, or the JSON, that a script reads)."""
    for text in run.problems:
        sys.stderr.write(f"warning: {text}\n")


@app.command()
def demo(
    steps: Annotated[int | None, typer.Option(help="training steps (default: the demo's own)")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default: stethoscope-runs/demo-<time>)")] = None,
    pathology: Annotated[str, typer.Option(help="inject a problem: none, dead-relu, exploding, vanishing, "
                                                "nan, unused-param")] = "none",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress or summary output")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the run already in --out")] = False,
) -> None:
    """Train the built-in tiny transformer on the bundled corpus with the monitor on."""
    from stethoscope.demo.runner import run_demo

    if out is not None and not overwrite and out.is_dir() and any(out.iterdir()):
        from stethoscope import rundir as rd
        from stethoscope.errors import RunDirError

        what = "holds a run" if rd.holds_run(out) else "is not empty"
        raise RunDirError(f"--out {str(out)!r} {what}; pass --overwrite to replace that run, or choose a new "
                          "folder (without --out the demo writes a fresh stethoscope-runs/demo-<time>)")
    kwargs = {"out": out, "pathology": pathology, "seed": seed, "quiet": quiet, "overwrite": overwrite}
    if steps is not None:
        if steps < 1:
            raise StethoscopeError(f"--steps must be at least 1, got {steps}")
        kwargs["steps"] = steps
    run_demo(**kwargs)


@app.command()
def findings(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by the monitor")],
    as_json: Annotated[bool, typer.Option("--json", help="print the folded findings as JSON")] = False,
    fail_on: Annotated[str | None, typer.Option(help="exit 1 when a finding reaches this level: "
                                                     "warning or critical")] = None,
) -> None:
    """List the findings of a run, most severe first; --fail-on sets the exit code for CI."""
    if fail_on is not None and fail_on not in ("warning", "critical"):
        raise StethoscopeError(f"--fail-on must be 'warning' or 'critical', got {fail_on!r}")
    run = _load_quietly(run_dir)
    _print_problems(run)
    if as_json:
        out = {"run_dir": str(run.path), "status": run.status, "verdict": run.verdict,
               "incidents": [{**i.as_dict(), "replay": (run.capture_of(i.root) or {}).get("folder")}
                             for i in run.incidents],
               "findings": [f.as_dict() for f in run.findings]}
        sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
    else:
        from rich.markup import escape

        from stethoscope.report import build
        from stethoscope.report.summary import print_incidents

        console = get_console()
        content = build(run, findings_only=True)
        console.print(f"verdict: {escape(content.verdict_line)}", soft_wrap=True)  # the report's own words
        if run.findings:
            print_incidents(content, console, run_dir=str(run.path))
        else:
            console.print("no findings")
    if fail_on is not None:
        level = _LEVELS[fail_on]
        if any(_LEVELS.get(f.severity, 0) >= level for f in run.findings):
            raise typer.Exit(1)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by the monitor")],
) -> None:
    """Write report.html (one self-contained page) and report.md for a run directory."""
    from rich.markup import escape

    from stethoscope.report import write_report

    run = _load_quietly(run_dir)
    with warnings.catch_warnings():  # said once, below, with what loading found
        warnings.simplefilter("ignore", _run_dir_warning())
        path = write_report(run)
    _print_problems(run)
    console = get_console()
    console.print(f"report: {escape(str(path.with_name('report.html')))}", soft_wrap=True)
    console.print(f"report: {escape(str(path))}", soft_wrap=True)


@app.command()
def trace(
    model_dir: Annotated[Path, typer.Argument(help="a local Hugging Face checkpoint folder (save_pretrained)")],
    text: Annotated[str, typer.Option("--text", help="the input text of the forward pass")],
    depth: Annotated[int | None, typer.Option(help="module nesting levels printed (default: trace.depth, 4)")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="next-token predictions shown for language models")] = 5,
    repeats: Annotated[int | None, typer.Option(help="consecutive calls of one module class printed before "
                                                     "folding (default: trace.repeats, 2)")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="cheap output statistics in the tree and trace.jsonl")] = False,
    out: Annotated[Path | None, typer.Option(help="folder for trace.jsonl (default: stethoscope-runs/trace-<time>)")] = None,
    warmup: Annotated[int, typer.Option(help="untraced forward passes before the timed one, so times show the "
                                             "steady state, not first-call costs")] = 2,
    attention: Annotated[bool, typer.Option("--attention", help="step-by-step attention logs (attention "
                                                                "introspection)")] = False,
    layers: Annotated[str | None, typer.Option(help="with --attention: the attention layers shown, by position "
                                                    "(0 is the first), e.g. 0,2 or 0-3 (default: all)")] = None,
    heads: Annotated[str | None, typer.Option(help="with --attention: the heads shown in each layer, e.g. 0,1 "
                                                   "(default: all)")] = None,
) -> None:
    """One traced forward pass of a local checkpoint: module tree, times, parameters, top-k next tokens."""
    from stethoscope.hf_loading import trace_checkpoint

    if (layers is not None or heads is not None) and not attention:
        raise StethoscopeError("--layers and --heads select what --attention shows; add --attention")
    if attention:
        from stethoscope.attention.stepwise import parse_selection

        picked = {"layers": parse_selection(layers, "layers"), "heads": parse_selection(heads, "heads")}
    console = get_console()
    result = trace_checkpoint(model_dir, text, depth=depth, top_k=top_k, repeats=repeats, stats=stats or None,
                              out=out, warmup=warmup, console=console)
    if attention:  # step by step: Q/K/V, scores, masks, softmax rows, loss, top-k, heatmaps
        from stethoscope.attention.stepwise import trace_attention

        trace_attention(model_dir, text, out=result["trace_path"].parent / "attention", top_k=top_k,
                        console=console, **picked)


@app.command()
def check(
    model_dir: Annotated[Path, typer.Argument(help="a local Hugging Face checkpoint folder (save_pretrained)")],
    optimizer_config: Annotated[Path | None, typer.Option(
        help="YAML/JSON optimizer spec (default: AdamW 5e-5, weight decay 0.01 except biases and norms)")] = None,
    fail_on: Annotated[str, typer.Option(help="exit 1 when a finding reaches this level: warning or "
                                              "critical")] = "critical",
    as_json: Annotated[bool, typer.Option("--json", help="print the findings as JSON")] = False,
    out: Annotated[Path | None, typer.Option(help="also append the findings to OUT/findings.jsonl")] = None,
) -> None:
    """Preflight checks of a checkpoint and its optimizer: groups, special tokens, learning rate, init."""
    from stethoscope.checks.command import run_check

    code = run_check(model_dir, optimizer_config, fail_on, as_json, out, get_console())
    if code:
        raise typer.Exit(code)


@app.command()
def replay(
    incident: Annotated[Path, typer.Argument(help="an incident folder: RUN_DIR/incidents/step-<N>")],
    model: Annotated[Path | None, typer.Option("--model", help="a local Hugging Face checkpoint folder")] = None,
    factory: Annotated[str | None, typer.Option(help="pkg.mod:fn returning the model (or (model, loss_fn)); "
                                                     "default: the run's incidents.factory")] = None,
    device: Annotated[str, typer.Option(help="where the replay runs (cpu, cuda)")] = "cpu",
    top: Annotated[int, typer.Option(help="largest activations and gradient norms shown")] = 5,
    out: Annotated[Path | None, typer.Option(help="folder for the replay's trace.jsonl")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Rerun an incident's forward and backward under trace mode: the first non-finite module, the largest
    activations on the way."""
    from stethoscope.incidents.cli import run_replay

    run_replay(incident, model, factory, device, top, out, as_json, get_console())


@app.command()
def compare(
    a: Annotated[Path, typer.Argument(help="a checkpoint folder (save_pretrained) or a run directory")],
    b: Annotated[Path, typer.Argument(help="the second one, of the same kind")],
    text: Annotated[list[str] | None, typer.Option("--text", help="input text (repeatable; checkpoints)")] = None,
    inputs: Annotated[Path | None, typer.Option(help="texts, one per line, or a JSON list (checkpoints)")] = None,
    mapping: Annotated[list[str] | None, typer.Option("--map", help="B_PREFIX=A_PREFIX module-name mapping "
                                                                   "(repeatable)")] = None,
    match: Annotated[str, typer.Option(help="pair modules by name, order (call order) or auto")] = "auto",
    factor: Annotated[float, typer.Option(help="tolerance in units of the lower dtype's eps")] = 8.0,
    backward: Annotated[bool, typer.Option("--backward", help="also compare gradients of one backward")] = False,
    sigmas: Annotated[float, typer.Option(help="runs: step-to-step noise multiples that count as apart")] = 5.0,
    rtol: Annotated[float, typer.Option(help="runs: relative difference always counted as noise")] = 1e-5,
    plot: Annotated[Path | None, typer.Option(help="write the figure (error growth / loss curves) here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the comparison as JSON")] = False,
) -> None:
    """Two checkpoints on the same inputs, or two run directories: where they part ways, and by how much.
    Exit code 0 when they agree, 1 when they differ."""
    from stethoscope.compare.command import run_compare

    code = run_compare(a, b, text=text, inputs=inputs, mapping=mapping, match=match, factor=factor,
                       backward=backward, as_json=as_json, plot=plot, sigmas=sigmas, rtol=rtol,
                       console=get_console())
    if code:
        raise typer.Exit(code)


def _mount_optional() -> None:
    """Sub-commands that live in their own packages."""
    try:
        from stethoscope.probe.cli import app as probe_app
    except ImportError:
        return
    app.add_typer(probe_app, name="probe")


_mount_optional()


def _click_exceptions() -> tuple[type, ...]:
    """ClickException from click and from the copy typer may bundle (typer >= 0.29 ships its own)."""
    found = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            found.append(__import__(module, fromlist=["ClickException"]).ClickException)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def main() -> None:
    """Entry point: run the app and turn our own errors into a clean message and exit code 2."""
    try:
        code = app(standalone_mode=False)  # without standalone mode click *returns* typer.Exit's code
    except StethoscopeError as err:
        from rich.markup import escape  # paths like runs/[exp1] are text, not markup

        get_console().print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)  # one line
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:
        if isinstance(exc, _click_exceptions()):  # usage errors: a message, not a traceback
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if isinstance(code, int) and code:  # e.g. --fail-on
        sys.exit(code)


if __name__ == "__main__":
    main()
