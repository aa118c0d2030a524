"""The stages of ``stethoscope probe``: synth -> features -> fit -> report, each runnable alone.

Every stage reads the config, writes into ``output_dir`` and reuses what earlier stages wrote there::

    output_dir/
      config.yaml            the configuration used (paths resolved)
      dataset.json           manifest summary and size warnings
      features/<rep>/        <layer>.npy (N, D) float32 per layer, done.npy, meta.json   (features)
      metrics.csv            one row per representation/layer                             (fit)
      details.json           per-fold scores and the target confusion of every row        (fit)
      decision.json          verdict, best layer, rationale                               (fit, report)
      figures/*.png, report.md, probe_results.zip                                         (report)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stethoscope._format import format_fixed
from stethoscope.console import get_console
from stethoscope.probe.config import PipelineConfig, RepresentationConfig, load_config, settings_hash
from stethoscope.probe.errors import ProbeDataError, ProbeStageError
from stethoscope.probe.fingerprint import config_fingerprint  # noqa: F401  (importable from here too)
from stethoscope.probe.manifest import Manifest, load_audio, load_manifest

SCHEMA_VERSION = 1
METRIC_COLUMNS = [
    "representation",
    "layer",
    "module",
    "dim",
    "baseline",
    "n_items",
    "n_classes",
    "folds",
    "target_f1",
    "target_f1_std",
    "target_f1_ci_low",
    "target_f1_ci_high",
    "target_acc",
    "chance_f1",
    "majority_acc",
    "control_f1",
    "selectivity",
    "selectivity_ci_low",
    "selectivity_ci_high",
    "nuisance_f1",
    "nuisance_chance_f1",
    "leakage",
    "leakage_ci_low",
    "leakage_ci_high",
    "text_f1_seen",
    "text_f1_unseen",
    "text_drop",
    "text_drop_ci_low",
    "text_drop_ci_high",
    "converged",
    "iterations",
    "status",
]


def _prepare(config) -> PipelineConfig:
    cfg = load_config(config) if not isinstance(config, PipelineConfig) else config
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    return cfg


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, default=_json_default), encoding="utf-8")


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


# --- synth ---------------------------------------------------------------------------------------


def run_synth(config, force: bool = False) -> Path:
    """Write the config's synthetic set into ``dataset.root`` (skipped when already there)."""
    from stethoscope.probe.synth import synth_is_current, write_synthetic

    cfg = _prepare(config)
    if cfg.synth is None:
        raise ProbeStageError(
            "the config has no 'synth' section: add one (e.g. `synth: {targets: 3}`) or pass an output folder "
            "to `stethoscope probe synth OUT_DIR`"
        )
    root = Path(cfg.dataset.root)
    if not force and synth_is_current(root, cfg.synth, cfg.seed):
        get_console().print(f"synthetic set in {root} is up to date")
        return root / "metadata.csv"
    path = write_synthetic(root, cfg.synth, seed=cfg.seed)
    get_console().print(f"wrote synthetic set: {path}")
    return path


# --- features ------------------------------------------------------------------------------------


def _manifest(cfg: PipelineConfig, check_audio: bool = True) -> Manifest:
    manifest = load_manifest(cfg.dataset, cfg.probe.folds, check_audio=check_audio)
    _write_json(
        Path(cfg.output_dir) / "dataset.json", {"schema_version": SCHEMA_VERSION, **manifest.summary()}
    )
    return manifest


def build_adapter(rep: RepresentationConfig, cfg: PipelineConfig):
    """The adapter of one representation (imports transformers only for ``kind: hf``)."""
    from stethoscope.probe import features as F

    if rep.kind == "frontend":
        if cfg.dataset.input != "audio":
            raise ProbeDataError(
                f"representation {rep.name!r} is the audio front end but dataset.input is "
                f"{cfg.dataset.input!r}: remove it or probe an audio set"
            )
        fe = rep.frontend
        return F.frontend_adapter(cfg.dataset.sample_rate, fe.n_mels, fe.n_mfcc, fe.win_ms, fe.hop_ms)
    if rep.kind == "hf":
        return F.hf_adapter(
            rep.checkpoint, cfg.dataset.input, max_length=rep.max_length, sample_rate=cfg.dataset.sample_rate
        )
    return F.load_factory(
        rep.factory, rep.factory_kwargs, base_dir=cfg.config_dir, sample_rate=cfg.dataset.sample_rate
    )


def _rep_settings(rep: RepresentationConfig, cfg: PipelineConfig) -> dict:
    s = rep.model_dump(mode="json", exclude={"name", "baseline", "device", "batch_size", "threads"})
    s["input"] = cfg.dataset.input
    s["sample_rate"] = cfg.dataset.sample_rate
    if rep.kind == "frontend":
        s["dtype"] = "float32"
    return s


def run_features(config, adapters: dict | None = None, progress: bool = True) -> dict:
    """Extract and store the features of every representation (resuming unfinished ones).

    Args:
        config: path, dict or :class:`PipelineConfig`.
        adapters: optional ``{representation name: ProbeAdapter}`` built in Python, used instead of the
            config's ``checkpoint`` / ``factory`` (the config still names the layers).
        progress: show progress bars.

    Returns:
        ``{representation name: FeatureSet}``.
    """
    from stethoscope.probe import features as F

    cfg = _prepare(config)
    manifest = _manifest(cfg)
    console = get_console()
    for w in manifest.warnings:
        console.print(f"[yellow]warning:[/yellow] dataset: {w}")
    items = manifest.items()
    load = None
    if cfg.dataset.input == "audio":
        rate = cfg.dataset.sample_rate

        def load(batch):
            return load_audio(batch, rate)

    out = {}
    ids = [str(i) for i in manifest.ids]
    for rep in cfg.representations:
        settings = _rep_settings(rep, cfg)
        settings["request"] = settings_hash(settings)  # the config's request, before loading any model
        path = Path(cfg.output_dir) / "features" / rep.name
        stored = F.completed_features(path, ids, settings["request"])
        if stored is not None and rep.name not in (adapters or {}):
            console.print(f"features {rep.name}: up to date ({len(stored.layers)} layers)")
            out[rep.name] = stored
            continue
        adapter = (adapters or {}).get(rep.name) or build_adapter(rep, cfg)
        layers = F.resolve_layers(adapter.module, rep.layers, {**adapter.aliases, **rep.aliases})
        settings["layers"] = layers
        out[rep.name] = F.extract_features(
            items,
            adapter,
            layers,
            path,
            pooling=rep.poolings,
            batch_size=rep.batch_size,
            dtype="float32" if rep.kind == "frontend" else rep.dtype,
            device=rep.device,
            threads=rep.threads,
            lengths=manifest.lengths,
            load=load,
            settings=settings,
            progress=progress,
            description=f"features {rep.name}",
        )
    return out


# --- fit -----------------------------------------------------------------------------------------


@dataclass
class FitOutputs:
    """What the fit stage produced: the metrics rows and per-row details."""

    rows: list[dict]
    details: dict


def _load_layers(
    cfg: PipelineConfig, manifest: Manifest
) -> list[tuple[RepresentationConfig, str, dict, object]]:
    from stethoscope.probe.features import _ids_hash, open_features

    out = []
    ids_hash = _ids_hash([str(i) for i in manifest.ids])
    for rep in cfg.representations:
        fs = open_features(Path(cfg.output_dir) / "features" / rep.name)
        if fs.meta.get("ids") != ids_hash:
            raise ProbeStageError(
                f"features of {rep.name!r} were extracted from another manifest: rerun "
                "`stethoscope probe features CONFIG`"
            )
        if not fs.complete:
            raise ProbeStageError(
                f"features of {rep.name!r} are incomplete (an interrupted extraction): rerun "
                "`stethoscope probe features CONFIG` to finish them"
            )
        for layer in fs.layers:
            out.append((rep, layer, fs.meta["layers"][layer], fs))
    return out


def run_fit(config, progress: bool = True) -> FitOutputs:
    """Fit every probe of every stored layer; write metrics.csv, details.json and decision.json."""
    import torch

    from stethoscope.probe.decision import decide, row_status
    from stethoscope.probe.features import resolve_device
    from stethoscope.probe.probing import build_design, metric_rows, score_layers

    cfg = _prepare(config)
    manifest = _manifest(cfg, check_audio=False)
    layers = _load_layers(cfg, manifest)
    design = build_design(
        manifest.target, manifest.group, manifest.nuisance, manifest.content, cfg.probe, cfg.seed
    )
    console = get_console()
    device = resolve_device(cfg.probe.device)
    # layers of one dimension are fitted together; the batch is capped by layers_per_batch
    by_dim: dict[int, list[int]] = {}
    for i, (_, _, info, _) in enumerate(layers):
        by_dim.setdefault(int(info["dim"]), []).append(i)
    rows: list[dict | None] = [None] * len(layers)
    confusions: list = [None] * len(layers)
    per_fold: list = [None] * len(layers)
    cap = cfg.probe.layers_per_batch or len(layers)
    chunks = [idx[j : j + cap] for idx in by_dim.values() for j in range(0, len(idx), cap)]
    with _status(progress, console, f"fitting probes on {len(layers)} layers"):
        for chunk in chunks:
            X = torch.from_numpy(
                np.stack([np.asarray(layers[i][3].array(layers[i][1]), dtype=np.float32) for i in chunk])
            ).to(device)  # (L, N, D)
            scores = score_layers(X, design, cfg.probe)
            chunk_rows = metric_rows(scores, design, cfg.probe.confidence)
            for j, i in enumerate(chunk):
                rows[i] = chunk_rows[j]
                confusions[i] = scores.confusion[j]
                per_fold[i] = {k: v[j] for k, v in scores.per_fold.items()}
            del X
    out_rows = []
    for i, (rep, layer, info, _) in enumerate(layers):
        row = {
            "representation": rep.name,
            "layer": layer,
            "module": info["module"],
            "dim": int(info["dim"]),
            "baseline": rep.is_baseline,
            "n_items": len(manifest),
            "n_classes": len(design.target_classes),
            "folds": design.folds,
            **rows[i],
        }
        row["status"] = row_status(row, cfg.decision)
        out_rows.append({c: row.get(c) for c in METRIC_COLUMNS})
    _write_metrics(Path(cfg.output_dir) / "metrics.csv", out_rows)
    details = {
        "schema_version": SCHEMA_VERSION,
        "target_classes": [str(c) for c in design.target_classes],
        "notes": design.notes,
        "rows": [
            {
                "representation": r["representation"],
                "layer": r["layer"],
                "confusion": confusions[i],
                "per_fold": per_fold[i],
            }
            for i, r in enumerate(out_rows)
        ],
    }
    _write_json(Path(cfg.output_dir) / "details.json", details)
    decision = decide(_read_metrics(Path(cfg.output_dir) / "metrics.csv"), cfg.decision, manifest.warnings)
    _write_json(Path(cfg.output_dir) / "decision.json", decision.to_dict())
    unconverged = [f"{r['representation']}:{r['layer']}" for r in out_rows if not r["converged"]]
    if unconverged:
        console.print(
            f"[yellow]warning:[/yellow] probes of {', '.join(unconverged[:5])} stopped before tol "
            f"(probe.max_iter={cfg.probe.max_iter}); raise max_iter or lower C"
        )
    _print_summary(out_rows, decision, console)
    return FitOutputs(out_rows, details)


def _status(enabled: bool, console, text: str):
    import contextlib

    return console.status(text) if enabled else contextlib.nullcontext()


def _write_metrics(path: Path, rows: list[dict]) -> None:
    """metrics.csv with floats rounded to 6 decimals, so the same config gives the same bytes."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    frame.to_csv(path, index=False, float_format="%.6f", na_rep="")


def _read_metrics(path: Path) -> list[dict]:
    import pandas as pd

    if not path.is_file():
        raise ProbeStageError(f"no metrics at {str(path)!r}: run `stethoscope probe fit CONFIG` first")
    frame = pd.read_csv(path, keep_default_na=True)
    rows = frame.to_dict(orient="records")
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float) and math.isnan(v):
                r[k] = math.nan
        r["baseline"] = str(r.get("baseline")).lower() == "true"
        r["representation"], r["layer"] = str(r["representation"]), str(r["layer"])
    return rows


def _print_summary(rows: list[dict], decision, console) -> None:
    from rich.table import Table

    table = Table(title="probe metrics", show_lines=False)
    for col in ("layer", "F1", "95% CI", "leak", "drop", "select.", "status"):
        table.add_column(col, justify="left" if col in ("layer", "status") else "right", overflow="fold")
    short = {"go": "GO", "go_conditional": "GO (cond.)", "inconclusive": "INCONCL.", "nogo": "NOGO"}
    for r in rows:
        table.add_row(
            f"{r['representation']}:{r['layer']}",
            _f(r["target_f1"]),
            f"{_f(r['target_f1_ci_low'], 2)}-{_f(r['target_f1_ci_high'], 2)}",
            _f(r["leakage"]),
            _f(r["text_drop"]),
            _f(r["selectivity"]),
            short.get(r["status"], r["status"]),
        )
    console.print(table)
    style = {"go": "bold green", "go_conditional": "yellow", "inconclusive": "yellow", "nogo": "bold red"}
    console.print(f"Decision: [{style[decision.code]}]{decision.verdict}[/] - {decision.rationale}")
    for note in decision.notes:
        console.print(f"  note: {note}")


_f = format_fixed  # fixed decimals, "n/a" for None / NaN


# --- report --------------------------------------------------------------------------------------


def run_report(config) -> Path:
    """Figures, ``report.md`` and the results zip from what ``fit`` wrote (thresholds re-applied)."""
    from stethoscope.probe.decision import decide, row_status
    from stethoscope.probe.report import write_report

    cfg = _prepare(config)
    out = Path(cfg.output_dir)
    rows = _read_metrics(out / "metrics.csv")
    for r in rows:
        r["status"] = row_status(r, cfg.decision)  # thresholds may have changed since fit
    details_path = out / "details.json"
    if not details_path.is_file():
        raise ProbeStageError(
            f"no {details_path.name} in {str(out)!r}: run `stethoscope probe fit CONFIG` first"
        )
    details = json.loads(details_path.read_text(encoding="utf-8"))
    dataset = {}
    if (out / "dataset.json").is_file():
        dataset = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    decision = decide(rows, cfg.decision, dataset.get("warnings"))
    _write_json(out / "decision.json", decision.to_dict())
    path = write_report(cfg, rows, details, dataset, decision)
    get_console().print(f"report: {path}")
    return path


def run_all(config, adapters: dict | None = None, progress: bool = True) -> Path:
    """Every stage in order: synth (if the config has a ``synth`` section), features, fit, report."""
    cfg = _prepare(config)
    if cfg.synth is not None:
        run_synth(cfg)
    run_features(cfg, adapters=adapters, progress=progress)
    run_fit(cfg, progress=progress)
    return run_report(cfg)
