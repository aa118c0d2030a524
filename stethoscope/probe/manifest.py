"""The dataset manifest: one row per item, columns mapped to roles, validated before any model runs.

The field note's format is the default::

    metadata.csv   utt_id,speaker,accent,text_id,rel_path     (audio under wav/)
    texts.json     {"t01": "the text read", ...}               (optional)

Roles: ``target`` (what the probe should find), ``group`` (what must never straddle train and test, e.g.
speaker), ``nuisance`` (what must *not* be decodable, e.g. speaker again), ``content`` (what the item
says, e.g. text id: gives the unseen-text split), plus ``audio`` / ``text`` inputs. Any table fits once
its columns are mapped, audio or not.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stethoscope.probe.audio import wav_info
from stethoscope.probe.config import DatasetConfig
from stethoscope.probe.errors import ProbeDataError


@dataclass
class ProbeItem:
    """One item handed to a representation's preprocessing: its index, id, and raw inputs.

    ``sample_rate`` is ``dataset.sample_rate`` on audio sets (``audio`` is resampled to it before
    preprocessing sees the item), so a preprocessing step never has to be told the rate separately.
    """

    index: int
    id: str
    text: str | None = None
    audio_path: Path | None = None
    audio: np.ndarray | None = None  # (S,) float32, filled per batch for audio inputs
    sample_rate: int | None = None
    row: dict = field(default_factory=dict)


@dataclass
class Manifest:
    """A validated dataset: labels per role as string arrays of length N, and the inputs."""

    root: Path
    config: DatasetConfig
    ids: np.ndarray
    target: np.ndarray
    group: np.ndarray
    nuisance: np.ndarray | None
    content: np.ndarray | None
    audio_paths: list[Path] | None
    texts: list[str] | None
    lengths: np.ndarray  # (N,) samples (audio) or characters (text), for length-sorted batching
    rows: list[dict]
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def items(self) -> list[ProbeItem]:
        """The items, in manifest order (audio is loaded later, per batch)."""
        return [
            ProbeItem(
                index=i,
                id=str(self.ids[i]),
                text=None if self.texts is None else self.texts[i],
                audio_path=None if self.audio_paths is None else self.audio_paths[i],
                sample_rate=self.config.sample_rate if self.audio_paths is not None else None,
                row=self.rows[i],
            )
            for i in range(len(self.ids))
        ]

    def summary(self) -> dict:
        """Counts for the report: items, targets, groups per target, content per group."""
        per_target = {str(t): len(np.unique(self.group[self.target == t])) for t in np.unique(self.target)}
        out = {
            "items": len(self),
            "targets": len(per_target),
            "groups": len(np.unique(self.group)),
            "groups_per_target": per_target,
            "input": self.config.input,
            "columns": self.config.columns.model_dump(),
        }
        if self.content is not None:
            per_group = [len(np.unique(self.content[self.group == g])) for g in np.unique(self.group)]
            out["contents"] = len(np.unique(self.content))
            out["min_contents_per_group"] = int(min(per_group))
        if self.nuisance is not None:
            out["nuisance_classes"] = len(np.unique(self.nuisance))
        out["warnings"] = list(self.warnings)
        return out


def _column(frame, name: str | None, role: str, source: str) -> np.ndarray | None:
    if name is None:
        return None
    if name not in frame.columns:
        close = difflib.get_close_matches(name, list(frame.columns), n=1, cutoff=0.5)
        hint = (
            f"did you mean {close[0]!r}?" if close else f"columns are: {', '.join(map(str, frame.columns))}"
        )
        raise ProbeDataError(
            f"dataset.columns.{role} names column {name!r}, which {source} does not have: {hint} "
            f"(set dataset.columns.{role} to an existing column, or null if the role is optional)"
        )
    values = frame[name].astype(str).str.strip().to_numpy()
    empty = np.flatnonzero(values == "")
    if len(empty):
        rows = ", ".join(str(i + 2) for i in empty[:5])  # +2: header line, 1-based
        raise ProbeDataError(
            f"column {name!r} ({role}) is empty on {len(empty)} row(s) of {source} (lines {rows}"
            f"{', ...' if len(empty) > 5 else ''}); fill them or drop those rows"
        )
    return values


def _read_texts(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProbeDataError(f"cannot read texts file {str(path)!r}: {exc}") from None
    if isinstance(data, dict):
        return {str(k): str(v) for k, v in data.items()}
    if isinstance(data, list) and all(isinstance(d, dict) for d in data):
        out = {}
        for d in data:
            key = d.get("text_id", d.get("id"))
            if key is None or "text" not in d:
                raise ProbeDataError(
                    f"texts file {str(path)!r}: list entries need 'id' (or 'text_id') and 'text', got {d!r}"
                )
            out[str(key)] = str(d["text"])
        return out
    raise ProbeDataError(
        f'texts file {str(path)!r} must map text ids to texts ({{"t01": "..."}}) or list '
        '{"id": ..., "text": ...} objects'
    )


def load_manifest(config: DatasetConfig, folds: int = 5, check_audio: bool = True) -> Manifest:
    """Read and validate the manifest described by ``config``.

    Args:
        config: the ``dataset`` section (``root`` already absolute).
        folds: the probe's fold count; fewer groups than this is an error.
        check_audio: read every WAV header, so an unreadable file fails here and not an hour later.

    Raises:
        ProbeDataError: the first problem found, naming the file, column or class and the fix.
    """
    import pandas as pd

    root = Path(config.root)
    path = root / config.manifest
    if not path.is_file():
        raise ProbeDataError(
            f"manifest {str(path)!r} does not exist: set dataset.root / dataset.manifest, "
            "or write a synthetic set with `stethoscope probe synth`"
        )
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)  # 'NA' is an accent, not a missing value
    except Exception as exc:
        raise ProbeDataError(f"cannot parse manifest {str(path)!r} as CSV: {exc}") from None
    if len(frame) == 0:
        raise ProbeDataError(f"manifest {str(path)!r} has no rows")
    source = f"manifest {path.name!r}"
    cols = config.columns
    ids = _column(frame, cols.id, "id", source)
    if ids is None:
        ids = np.array([f"row{i:06d}" for i in range(len(frame))])
    dupes = pd.Series(ids).duplicated(keep=False)
    if dupes.any():
        shown = ", ".join(sorted(set(ids[dupes.to_numpy()]))[:5])
        raise ProbeDataError(f"{source} repeats item ids ({shown}); ids in column {cols.id!r} must be unique")
    target = _column(frame, cols.target, "target", source)
    group = _column(frame, cols.group, "group", source)
    nuisance = _column(frame, cols.nuisance, "nuisance", source)
    content = _column(frame, cols.content, "content", source)

    audio_paths = None
    texts = None
    if config.input == "audio":
        if cols.audio is None:
            raise ProbeDataError(
                "dataset.input is 'audio' but dataset.columns.audio is null: name the path column"
            )
        rel = _column(frame, cols.audio, "audio", source)
        base = root / config.audio_dir
        audio_paths = [base / r for r in rel]
        missing = [p for p in audio_paths if not p.is_file()]
        if missing:
            shown = ", ".join(str(p) for p in missing[:3])
            hint = ""
            if (root / rel[0]).is_file():
                hint = " (the paths exist relative to dataset.root: set dataset.audio_dir: '.')"
            raise ProbeDataError(
                f"{len(missing)} of {len(audio_paths)} audio files listed in {source} are missing, e.g. "
                f"{shown}{hint}"
            )
        lengths = np.zeros(len(audio_paths), dtype=np.int64)
        if check_audio:
            for i, p in enumerate(audio_paths):
                rate, n = wav_info(p)  # raises ProbeDataError naming the file
                if n == 0:
                    raise ProbeDataError(
                        f"audio file {str(p)!r} holds no samples; remove it from the manifest"
                    )
                lengths[i] = round(n * config.sample_rate / rate)
    else:
        if cols.text is not None:
            texts = list(_column(frame, cols.text, "text", source))
        else:
            if content is None or config.texts is None:
                raise ProbeDataError(
                    "dataset.input is 'text' but there is no text: set dataset.columns.text to the column "
                    "holding it, or dataset.columns.content plus dataset.texts (a JSON of id -> text)"
                )
            tpath = root / config.texts
            if not tpath.is_file():
                raise ProbeDataError(f"texts file {str(tpath)!r} does not exist (dataset.texts)")
            mapping = _read_texts(tpath)
            unknown = sorted({c for c in content if c not in mapping})
            if unknown:
                raise ProbeDataError(
                    f"{len(unknown)} content ids of {source} are not in {tpath.name!r}, e.g. "
                    f"{', '.join(unknown[:5])}"
                )
            texts = [mapping[c] for c in content]
        lengths = np.array([len(t) for t in texts], dtype=np.int64)

    rows = frame.to_dict(orient="records")
    manifest = Manifest(
        root, config, ids, target, group, nuisance, content, audio_paths, texts, lengths, rows
    )
    _check_design(manifest, folds, source)
    manifest.warnings = size_warnings(manifest)
    return manifest


def _check_design(m: Manifest, folds: int, source: str) -> None:
    """Errors that make the probes meaningless: one class, a class with one group, too few groups."""
    classes = np.unique(m.target)
    if len(classes) < 2:
        raise ProbeDataError(
            f"the target column has a single class ({classes[0]!r}) in {source}: a probe needs at least two"
        )
    lonely = [str(t) for t in classes if len(np.unique(m.group[m.target == t])) < 2]
    if lonely:
        raise ProbeDataError(
            f"target class(es) {', '.join(map(repr, lonely))} have a single group: group-disjoint folds "
            "would test them on a group never trained on the class; add groups or drop the class"
        )
    n_groups = len(np.unique(m.group))
    if n_groups < folds:
        raise ProbeDataError(
            f"{n_groups} groups cannot fill {folds} group-disjoint folds: set probe.folds to at most "
            f"{n_groups}, or add groups"
        )


def size_warnings(m: Manifest) -> list[str]:
    """The field note's size check: 3 targets, 8 groups per target, 30 texts per group at least."""
    cfg = m.config
    out = []
    classes = np.unique(m.target)
    if len(classes) < cfg.min_targets:
        out.append(f"only {len(classes)} target classes (recommended at least {cfg.min_targets})")
    few = {
        str(t): n
        for t in classes
        if (n := len(np.unique(m.group[m.target == t]))) < cfg.min_groups_per_target
    }
    if few:
        shown = ", ".join(f"{t}: {n}" for t, n in list(few.items())[:6])
        out.append(
            f"{len(few)} target class(es) have fewer than {cfg.min_groups_per_target} groups ({shown})"
        )
    per_group = m.content if m.content is not None else m.ids
    counts = {g: len(np.unique(per_group[m.group == g])) for g in np.unique(m.group)}
    thin = [g for g, n in counts.items() if n < cfg.min_texts_per_group]
    if thin:
        what = "texts" if m.content is not None else "items"
        out.append(
            f"{len(thin)} of {len(counts)} groups have fewer than {cfg.min_texts_per_group} {what} "
            f"(smallest: {min(counts.values())}); results on a set this small are not conclusive"
        )
    return out


def load_audio(items: list[ProbeItem], sample_rate: int) -> list[ProbeItem]:
    """Copies of a batch of items with ``audio`` filled (mono float32 at ``sample_rate``).

    Copies, so the manifest's items never hold waveforms once their batch is done.
    """
    import dataclasses

    from stethoscope.probe.audio import read_wav

    return [
        dataclasses.replace(it, audio=read_wav(it.audio_path, sample_rate), sample_rate=sample_rate)
        if it.audio is None and it.audio_path is not None
        else it
        for it in items
    ]
