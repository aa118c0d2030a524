"""A synthetic audio set whose attributes are planted with known strength.

Each item is a short WAV: background noise, a few random distractor tones, and tones that encode its
*target* (e.g. accent), *group* (speaker) and *content* (text id). Every class of a role owns a random
sparse code over that role's frequency slots (target low, group middle, content high, mel-spaced), and a
role's strength scales the amplitude of its code relative to the distractors. So:

* strength 0 plants nothing: a probe for that role is at chance, and the decision must be NOGO;
* F1 rises with strength, and a planted group shows up as leakage, a planted content as text memory.

The layout is the field note's: ``metadata.csv`` (``utt_id,speaker,accent,text_id,rel_path``),
``wav/<speaker>/<text>.wav``, ``texts.json``; ``synth.json`` records the parameters.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from stethoscope.probe.audio import _hz_to_mel, _mel_to_hz, write_wav
from stethoscope.probe.config import SynthConfig
from stethoscope.probe.errors import ProbeStageError

_WORDS = [
    "the",
    "a",
    "river",
    "stone",
    "light",
    "morning",
    "city",
    "window",
    "quiet",
    "music",
    "garden",
    "paper",
    "old",
    "new",
    "small",
    "bright",
    "cold",
    "house",
    "road",
    "story",
    "water",
    "green",
    "evening",
    "market",
    "voice",
    "letter",
    "train",
    "summer",
    "winter",
    "friend",
    "table",
    "door",
]

# slot ranges as fractions of the Nyquist frequency, and slots per code
_BANDS = {"target": (0.05, 0.20, 8, 2), "group": (0.23, 0.55, 12, 3), "content": (0.58, 0.90, 12, 3)}


def _codes(rng: np.random.Generator, n_values: int, n_slots: int, per_code: int) -> np.ndarray:
    """(n_values, n_slots) 0/1 codes, distinct while the slot combinations allow."""
    seen: set = set()
    out = np.zeros((n_values, n_slots), dtype=np.float32)
    total = math.comb(n_slots, per_code)
    for v in range(n_values):
        for _ in range(100):
            slots = tuple(sorted(rng.choice(n_slots, per_code, replace=False)))
            if slots not in seen or len(seen) >= total:
                break
        seen.add(slots)
        out[v, list(slots)] = 1.0
    return out


def _slots(lo: float, hi: float, n: int, nyquist: float) -> np.ndarray:
    mels = np.linspace(_hz_to_mel(lo * nyquist), _hz_to_mel(hi * nyquist), n)
    return _mel_to_hz(mels)


def write_synthetic(out_dir: str | Path, config: SynthConfig | None = None, seed: int = 0) -> Path:
    """Write the synthetic set into ``out_dir`` (replacing a previous synthetic set there).

    Args:
        out_dir: the dataset root to create.
        config: sizes and strengths; defaults give the field note's minimum (3 x 8 x 30).
        seed: used when ``config.seed`` is None.

    Returns:
        The path of ``metadata.csv``.

    Raises:
        ProbeStageError: ``out_dir`` holds a dataset this function did not write.
    """
    cfg = config or SynthConfig()
    seed = cfg.seed if cfg.seed is not None else seed
    out = Path(out_dir)
    if (out / "metadata.csv").exists() and not (out / "synth.json").exists():
        raise ProbeStageError(
            f"{str(out)!r} already holds a dataset that `synth` did not write (metadata.csv without "
            "synth.json); write the synthetic set elsewhere (dataset.root / OUT_DIR)"
        )
    if (out / "wav").exists() and (out / "synth.json").exists():
        shutil.rmtree(out / "wav")  # only ever remove a folder we wrote
    (out / "wav").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sr = cfg.sample_rate
    nyq = sr / 2
    freqs = {role: _slots(lo, hi, n, nyq) for role, (lo, hi, n, _) in _BANDS.items()}
    n_groups = cfg.targets * cfg.groups_per_target
    codes = {
        "target": _codes(rng, cfg.targets, _BANDS["target"][2], _BANDS["target"][3]),
        "group": _codes(rng, n_groups, _BANDS["group"][2], _BANDS["group"][3]),
        "content": _codes(rng, cfg.texts, _BANDS["content"][2], _BANDS["content"][3]),
    }
    strength = {"target": cfg.target_strength, "group": cfg.group_strength, "content": cfg.content_strength}
    all_freqs = np.concatenate([freqs[r] for r in _BANDS])
    accents = [f"acc{k}" for k in range(cfg.targets)]
    texts = {
        f"t{j + 1:02d}": " ".join(rng.choice(_WORDS, size=int(rng.integers(5, 10)))).capitalize() + "."
        for j in range(cfg.texts)
    }
    text_ids = list(texts)
    rows = []
    base = 0.05  # amplitude of a planted tone at strength 1, per code slot
    for k, accent in enumerate(accents):
        for gi in range(cfg.groups_per_target):
            g = k * cfg.groups_per_target + gi
            speaker = f"spk{accent[3:]}{gi + 1:02d}"
            (out / "wav" / speaker).mkdir(exist_ok=True)
            for j, text_id in enumerate(text_ids):
                n = int(sr * cfg.duration_s * rng.uniform(0.8, 1.2))
                t = np.arange(n) / sr
                wave = rng.normal(0.0, 0.02, n)
                amps = (
                    np.concatenate(
                        [
                            strength["target"] * codes["target"][k],
                            strength["group"] * codes["group"][g],
                            strength["content"] * codes["content"][j],
                        ]
                    )
                    * base
                    * rng.uniform(0.7, 1.3, len(all_freqs))
                )
                # distractors: random slots at random loudness, the variance a planted code must beat
                distract = np.zeros(len(all_freqs))
                pick = rng.choice(len(all_freqs), 6, replace=False)
                distract[pick] = rng.uniform(0.0, 1.0, len(pick)) * base
                amps = amps + distract
                phases = rng.uniform(0, 2 * np.pi, len(all_freqs))
                live = amps > 0
                wave += (
                    amps[live, None] * np.sin(2 * np.pi * all_freqs[live, None] * t + phases[live, None])
                ).sum(0)
                wave *= float(np.exp(rng.normal(0, 0.3)))  # loudness varies per item: never informative
                rel = f"{speaker}/{text_id}.wav"
                write_wav(out / "wav" / rel, wave.astype(np.float32), sr)
                rows.append((f"{speaker}_{text_id}", speaker, accent, text_id, rel))
    with open(out / "metadata.csv", "w", encoding="utf-8") as fh:
        fh.write("utt_id,speaker,accent,text_id,rel_path\n")
        for r in rows:
            fh.write(",".join(r) + "\n")
    (out / "texts.json").write_text(json.dumps(texts, indent=1), encoding="utf-8")
    info = {"schema_version": 1, "seed": seed, **cfg.model_dump(mode="json")}
    info["seed"] = seed
    (out / "synth.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return out / "metadata.csv"


def synth_is_current(out_dir: str | Path, config: SynthConfig, seed: int) -> bool:
    """True when ``out_dir`` already holds the synthetic set these parameters would write."""
    path = Path(out_dir) / "synth.json"
    if not path.is_file() or not (Path(out_dir) / "metadata.csv").is_file():
        return False
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    want = {"schema_version": 1, **config.model_dump(mode="json")}
    want["seed"] = config.seed if config.seed is not None else seed
    return info == want
