"""Replay an incident: rerun the saved step's forward and backward, deterministically, under trace mode.

The field notes found a NaN's origin with prints; this reruns the exact inputs (``batch.pt``), RNG states
(``rng.pt``: the same dropout masks) and, when saved, weights (``weights.pt``) of an incident folder, with
:class:`~stethoscope.trace.Trace` recording every module call and its output statistics, and reports:

* the first module (in the order calls finish: a child before its parent) whose output holds NaN/Inf while
  the batch itself was finite — the origin; everything after it only inherits the value;
* the largest activations (abs-max of outputs) of the calls that finished before it;
* the loss and the parameters whose gradients came out non-finite (backward of the model's own loss, of
  ``loss_fn(output, call)`` from the factory, or else of a surrogate: the sum of the outputs' means).

The model comes from ``model`` (an ``nn.Module``), a ``factory`` (``"pkg.mod:fn"`` or a callable returning
a model or ``(model, loss_fn)``) or ``model_dir`` (a local Hugging Face checkpoint, loaded offline).
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import inspect
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stethoscope.hooks import HookSet
from stethoscope.incidents import capture as cap
from stethoscope.incidents.capture import IncidentError


@dataclass
class Activation:
    """One module call's output statistics as trace mode read them."""

    name: str
    cls: str
    call: int
    absmax: float
    mean: float
    std: float
    finite: bool
    inputs_finite: bool = True  # every floating input of the call was finite


@dataclass
class ReplayResult:
    """What a replay found (see the module docstring)."""

    incident: Path
    step: int | None
    triggers: list[str]
    origin: str | None  # module name ("" = the root), "<input>" when the batch itself was non-finite, or None
    origin_class: str | None
    input_nonfinite: list[str]  # paths of batch tensors holding NaN/Inf
    largest: list[Activation]  # before the origin (or in the whole pass when nothing went non-finite)
    nonfinite_modules: int  # calls with a non-finite output
    loss: float | None
    loss_source: str
    nonfinite_grads: list[str]
    grad_norms: list[tuple[str, float]]  # the largest finite parameter-gradient norms
    weights: str
    batch: str
    notes: list[str] = field(default_factory=list)
    trace_path: Path | None = None
    model_source: str = ""

    def as_dict(self) -> dict:
        out = dict(vars(self))
        out["incident"] = str(self.incident)
        out["trace_path"] = str(self.trace_path) if self.trace_path else None
        out["largest"] = [vars(a) for a in self.largest]
        return out


# ---------------------------------------------------------------------- building the model
def load_factory(spec: str | Callable) -> Callable:
    """``"pkg.mod:fn"`` (importable from the current folder too) as the function it names."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise IncidentError(f"--factory {spec!r} is not of the form pkg.mod:fn (a module path, a colon, a function "
                            "that returns the model, or (model, loss_fn))")
    mod_name, fn_name = spec.split(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise IncidentError(f"--factory {spec!r}: cannot import {mod_name!r} ({exc}); run from the folder that "
                            "holds it or install its package") from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise IncidentError(f"--factory {spec!r}: {mod_name!r} has no function {fn_name!r}")
    return fn


def _from_checkpoint(model_dir: str | Path) -> nn.Module:
    from stethoscope.hf_loading import _LM_SUFFIXES, _transformers, check_weight_files

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise IncidentError(f"--model {str(folder)!r} holds no config.json; pass a folder written by "
                            "model.save_pretrained(...)")
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(folder, local_files_only=True)
    archs = list(getattr(config, "architectures", None) or [])
    auto = tf.AutoModelForCausalLM if any(a.endswith(_LM_SUFFIXES) for a in archs) else tf.AutoModel
    check_weight_files(folder)
    try:
        return auto.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise IncidentError(f"could not load the model in {str(folder)!r} with {auto.__name__}: {exc}") from exc


def build_model(model: nn.Module | None, factory: str | Callable | None,
                model_dir: str | Path | None, manifest: dict | None = None) -> tuple[nn.Module, Callable | None, str]:
    """(model, loss_fn or None, where it came from) from exactly one of the three sources; without any, the
    factory the run named (``incidents.factory``, saved in the ``manifest``) with its kwargs. A factory with a
    ``manifest`` parameter gets the incident's manifest (to rebuild the model as it was at that step)."""
    given = [x is not None for x in (model, factory, model_dir)]
    kwargs: dict = {}
    saved = (manifest or {}).get("factory")
    if not any(given) and isinstance(saved, dict) and saved.get("spec"):
        factory, kwargs = saved["spec"], dict(saved.get("kwargs") or {})
        given = [False, True, False]
    if sum(given) != 1:
        raise IncidentError("replay needs exactly one model source: --model MODEL_DIR (a local Hugging Face "
                            "checkpoint) or --factory pkg.mod:fn (a function that builds the model; set "
                            "incidents.factory in the run's config to have it saved with every incident)")
    if model is not None:
        return model, None, type(model).__name__
    if model_dir is not None:
        return _from_checkpoint(model_dir), None, f"checkpoint {model_dir}"
    fn = load_factory(factory)  # type: ignore[arg-type]
    with contextlib.suppress(TypeError, ValueError):  # a builtin or C function has no signature to read
        if "manifest" in inspect.signature(fn).parameters:
            kwargs["manifest"] = manifest or {}
    built = fn(**kwargs)
    loss_fn = None
    if isinstance(built, tuple):
        built, loss_fn = built
    if not isinstance(built, nn.Module):
        raise IncidentError(f"--factory {factory!r} returned {type(built).__name__}, not an nn.Module (or a tuple "
                            "(model, loss_fn))")
    return built, loss_fn, f"factory {factory if isinstance(factory, str) else getattr(factory, '__name__', '?')}"


# ---------------------------------------------------------------------- the replay
def load_manifest(incident: str | Path) -> dict:
    folder = Path(incident)
    path = folder / cap.MANIFEST
    if not path.is_file():
        raise IncidentError(f"{str(folder)!r} is not an incident folder (no manifest.json); pass "
                            "RUN_DIR/incidents/step-<N>")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise IncidentError(f"{str(path)!r} is not valid JSON ({exc})") from exc


def replay(incident: str | Path, model: nn.Module | None = None, *, factory: str | Callable | None = None,
           model_dir: str | Path | None = None, device: str = "cpu", top: int = 5,
           trace_path: str | Path | None = None) -> ReplayResult:
    """Rerun the incident's step (see the module docstring); returns what it found."""
    folder = Path(incident)
    manifest = load_manifest(folder)
    net, loss_fn, source = build_model(model, factory, model_dir, manifest)
    notes: list[str] = []
    weights = _load_weights(net, folder, manifest, notes)
    calls, rngs = cap.load_batch(folder)
    batch_info = manifest.get("batch", {})
    if batch_info.get("rows_kept") == 0:
        raise IncidentError(f"{str(folder)!r}: the batch was over incidents.max_batch_mb and only its shapes were "
                            "saved; raise incidents.max_batch_mb to capture a replayable batch")
    if batch_info.get("rows_kept") is not None:
        notes.append(f"the batch was cut to its first {batch_info['rows_kept']} rows (incidents.max_batch_mb); "
                     "the replay runs those rows only")
    for item in batch_info.get("unsaved", []):
        notes.append(f"input {item['path']} ({item['type']}) was not saved and is passed as None")
    net.to(device)
    net.train(bool(manifest.get("training", True)))
    from stethoscope.trace import Trace

    net.zero_grad(set_to_none=True)
    bad_inputs: list[str] = []
    loss_total, loss_source = 0.0, "none"
    inputs_ok: dict[tuple[str, int], bool] = {}
    with _input_checks(net, inputs_ok), Trace(net, path=trace_path, stats=True) as tr:
        for i, (call, rng) in enumerate(zip(calls, rngs, strict=True)):
            args = _restore(cap.to_device(call["args"], device))
            kwargs = _restore(cap.to_device(call["kwargs"], device))
            bad_inputs += [f"call{i}.{p}" for p, t in _float_tensors((args, kwargs)) if not bool(t.isfinite().all())]
            cap.set_rng_state(rng)
            output = net(*args, **kwargs)
            loss, loss_source = _loss(output, loss_fn, call)
            if loss is not None:
                loss_total += float(loss.detach())
                if loss.requires_grad:
                    loss.backward()
    activations = _activations(tr, inputs_ok)
    origin, origin_cls = _origin(activations, bad_inputs)
    stop = next((k for k, a in enumerate(activations) if not a.finite), len(activations))
    before = [a for a in activations[:stop] if math.isfinite(a.absmax)]
    largest = sorted(before, key=lambda a: -a.absmax)[:top]
    nonfinite_grads, norms = _grads(net)
    if weights.startswith("after"):
        notes.append("the weights are from after the optimizer's step, not the ones the failing forward used: "
                     "an origin found here can differ from the run's")
    return ReplayResult(
        folder, manifest.get("step"), [t["kind"] for t in manifest.get("triggers", [])]
        + [f["code"] for f in manifest.get("findings", [])], origin, origin_cls, bad_inputs, largest,
        sum(1 for a in activations if not a.finite), loss_total if loss_source != "none" else None, loss_source,
        nonfinite_grads, norms[:top], weights, _batch_line(batch_info, len(calls)), notes,
        Path(trace_path) if trace_path is not None else None, source,
    )


def _load_weights(net: nn.Module, folder: Path, manifest: dict, notes: list[str]) -> str:
    info = manifest.get("weights") or {}
    path = folder / cap.WEIGHTS
    if not info.get("file") or not path.is_file():
        notes.append(f"no weights were saved ({info.get('note', 'see manifest.json')}): the model's own weights "
                     "were used")
        return "the model's own (none saved)"
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise IncidentError(f"the saved weights in {str(path)!r} do not fit the model given ({' '.join(first)}); "
                            "build the same architecture the run trained") from exc
    return {"before_optimizer_step": "before the optimizer's step (the failing forward's)",
            "unchanged_by_step": "unchanged by the step (its update was skipped): the weights the failing forward used",
            }.get(info.get("when"), f"after the optimizer's step ({info.get('when')})")


def _restore(obj: Any) -> Any:
    """Markers of unsaved inputs become None."""
    if isinstance(obj, dict):
        if set(obj) == {"__unsaved__"}:
            return None
        return {k: _restore(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        out = [_restore(v) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    return obj


def _float_tensors(obj: Any) -> list[tuple[str, torch.Tensor]]:
    from stethoscope.flatten import iter_float_tensors

    return list(iter_float_tensors(obj))


def _loss(output: Any, loss_fn: Callable | None, call: dict) -> tuple[torch.Tensor | None, str]:
    if loss_fn is not None:
        return loss_fn(output, call), "loss_fn from the factory"
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is None and isinstance(output, tuple) and output and isinstance(output[-1], torch.Tensor) \
            and output[-1].dim() == 0:
        loss = output[-1]
    if isinstance(loss, torch.Tensor) and loss.dim() == 0:
        return loss, "the model's own loss"
    if isinstance(output, torch.Tensor) and output.dim() == 0:
        return output, "the model's output (a scalar)"
    tensors = [t for _, t in _float_tensors(output)]
    if not tensors:
        return None, "none"
    return sum(t.float().mean() for t in tensors), "surrogate: the sum of the outputs' means (no loss was found)"


def _input_checks(net: nn.Module, inputs_ok: dict[tuple[str, int], bool]) -> HookSet:
    """Hooks that note, per (module, call), whether every floating input was finite: a child called on a
    value its parent's own code made non-finite (``attn.c_proj`` after a division by zero in ``attn``) is not
    the origin; the parent is."""
    calls: collections.Counter = collections.Counter()

    def pre(name: str, _module: nn.Module):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            index = calls[name]
            calls[name] += 1
            inputs_ok[(name, index)] = all(bool(t.isfinite().all()) for _, t in _float_tensors((args, kwargs)))

        return hook

    hooks = HookSet("replay")
    hooks.on_modules(net, pre, with_kwargs=True)
    return hooks


def _activations(tr: Any, inputs_ok: dict[tuple[str, int], bool]) -> list[Activation]:
    """Every traced call with statistics, in the order calls finished (a child before its parent)."""
    out = []
    for c in sorted((c for c in tr.all_calls() if c.end is not None), key=lambda c: c.end):
        if not c.stats:
            continue
        absmax = max(s["absmax"] for s in c.stats)
        finite = all(s["finite"] and math.isfinite(s["absmax"]) for s in c.stats)
        s0 = c.stats[0]
        out.append(Activation(c.name, c.cls, c.call, absmax, s0["mean"], s0["std"], finite,
                              inputs_ok.get((c.name, c.call), True)))
    return out


def _origin(activations: list[Activation], bad_inputs: list[str]) -> tuple[str | None, str | None]:
    """The first call to finish whose output is non-finite while its inputs were finite (the module whose own
    computation made it); else the first non-finite one."""
    if bad_inputs:
        return "<input>", None
    bad = [a for a in activations if not a.finite]
    first = next((a for a in bad if a.inputs_finite), bad[0] if bad else None)
    return (first.name, first.cls) if first is not None else (None, None)


def _grads(net: nn.Module) -> tuple[list[str], list[tuple[str, float]]]:
    bad, norms = [], []
    for name, p in net.named_parameters():
        if p.grad is None:
            continue
        n = float(p.grad.detach().float().norm())
        if math.isfinite(n):
            norms.append((name, n))
        else:
            bad.append(name)
    norms.sort(key=lambda x: -x[1])
    return bad, norms


def _batch_line(info: dict, calls: int) -> str:
    kept = info.get("rows_kept")
    size = info.get("bytes_saved", 0)
    what = "complete" if kept is None else f"first {kept} rows of each tensor"
    return f"{calls} forward call(s), {len(info.get('tensors', []))} tensors, {size / 1024:.1f} KiB ({what})"


# ---------------------------------------------------------------------- printing
def render(result: ReplayResult, console: Any) -> None:
    """The replay's findings on ``console``: origin, largest activations on the way, loss and gradients."""
    from rich.markup import escape
    from rich.table import Table

    triggers = ", ".join(result.triggers) or "-"
    console.print(f"[bold]replay[/] of {escape(str(result.incident))} (step {result.step}; {escape(triggers)})",
                  soft_wrap=True)
    console.print(f"  weights: {escape(result.weights)}", soft_wrap=True)
    console.print(f"  batch: {escape(result.batch)}", soft_wrap=True)
    if result.origin == "<input>":
        console.print("[bold red]first non-finite:[/] the batch itself: "
                      + escape(", ".join(result.input_nonfinite[:5])), soft_wrap=True)
    elif result.origin is not None:
        name = result.origin or "<model>"
        console.print(f"[bold red]first non-finite module:[/] {escape(name)} ({result.origin_class}): its output "
                      f"holds NaN/Inf while its inputs were finite ({result.nonfinite_modules} calls non-finite in "
                      "all; the others inherit the value)", soft_wrap=True)
    else:
        console.print("[bold green]no module output went non-finite[/] in the replay", soft_wrap=True)
    if result.largest:
        where = "before it" if result.origin is not None else "in the pass"
        table = Table(title=f"largest activations {where}", title_justify="left")
        for col in ("module", "class", "call", "abs max", "mean", "std"):
            table.add_column(col, justify="right" if col not in ("module", "class") else "left")
        for a in result.largest:
            table.add_row(escape(a.name or "<model>"), a.cls, str(a.call), f"{a.absmax:.4g}", f"{a.mean:.4g}",
                          f"{a.std:.4g}")
        console.print(table)
    loss = "not computed" if result.loss is None else f"{result.loss:.6g}"
    console.print(f"  loss: {loss} ({escape(result.loss_source)})", soft_wrap=True)
    if result.nonfinite_grads:
        console.print(f"  non-finite gradients: {len(result.nonfinite_grads)} parameters (first in parameter order: "
                      f"{escape(result.nonfinite_grads[0])})", soft_wrap=True)
    elif result.grad_norms:
        top = ", ".join(f"{n} {v:.3g}" for n, v in result.grad_norms[:3])
        console.print(f"  gradients finite; largest norms: {escape(top)}", soft_wrap=True)
    for note in result.notes:
        console.print(f"  note: {escape(note)}", soft_wrap=True)
    if result.trace_path is not None:
        console.print(f"  trace: {escape(str(result.trace_path))}", soft_wrap=True)
