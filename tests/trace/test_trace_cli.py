"""`stethoscope trace MODEL_DIR --text ...` on local checkpoints: a tiny GPT-2 LM and the real MiniLM."""

from __future__ import annotations

import json
import sys

from stethoscope import cli

from .conftest import minilm_dir


def run_cli(monkeypatch, capsys, console_text, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["stethoscope", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, capsys.readouterr().out + console_text.getvalue()


def test_trace_gpt2_prints_tree_times_params_and_top_k(
    monkeypatch, capsys, console_text, gpt2_checkpoint, tmp_path
):
    code, out = run_cli(
        monkeypatch,
        capsys,
        console_text,
        "trace",
        gpt2_checkpoint,
        "--text",
        "the cat sat on the",
        "--top-k",
        "3",
        "--out",
        tmp_path / "t",
    )
    assert code == 0, out
    assert "GPT2LMHeadModel" in out and "transformer.h.1" in out
    assert "slowest modules" in out and "parameters:" in out and "lm_head" in out
    assert "top-3 next tokens" in out
    events = [json.loads(line) for line in (tmp_path / "t" / "trace.jsonl").read_text().splitlines()]
    assert events[0]["inputs"][0]["shape"][0] == 1 and events[-1]["event"] == "exit"


def test_trace_top_k_matches_the_model(gpt2_checkpoint):
    import torch

    from stethoscope.hf_loading import encode, load_local, trace_checkpoint

    result = trace_checkpoint(gpt2_checkpoint, "hello world", top_k=4, out=gpt2_checkpoint.parent / "tk")
    ckpt = load_local(gpt2_checkpoint)
    with torch.no_grad():
        logits = ckpt.model(**encode(ckpt, "hello world")).logits[0, -1]
    assert [p["id"] for p in result["top_k"]] == logits.topk(4).indices.tolist()
    assert (
        abs(sum(p["prob"] for p in result["top_k"]) - logits.softmax(-1).topk(4).values.sum().item()) < 1e-5
    )


def test_trace_real_minilm_has_no_lm_head(monkeypatch, capsys, console_text, tmp_path):
    code, out = run_cli(
        monkeypatch,
        capsys,
        console_text,
        "trace",
        minilm_dir(),
        "--text",
        "Stethoscopes listen to models.",
        "--depth",
        "2",
        "--out",
        tmp_path / "m",
        "--attention",
    )
    assert code == 0, out
    assert "BertModel" in out and "encoder" in out
    assert "no next-token predictions: BertModel has no language-model head" in out
    # --attention: step by step for an encoder; no predictions without a language-model head
    assert "attention step by step · BertModel" in out and "(sum=1.0000)" in out
    assert (tmp_path / "m" / "attention" / "step-by-step.log").is_file()
    assert (tmp_path / "m" / "trace.jsonl").exists()


def test_trace_bad_model_dir_is_a_clean_error(monkeypatch, capsys, console_text, tmp_path):
    code, out = run_cli(monkeypatch, capsys, console_text, "trace", tmp_path / "nope", "--text", "x")
    assert code == 2 and "is not a folder" in out
    (tmp_path / "empty").mkdir()
    code, out = run_cli(monkeypatch, capsys, console_text, "trace", tmp_path / "empty", "--text", "x")
    assert code == 2 and "no config.json" in out


def test_trace_checkpoint_without_tokenizer_or_with_a_foreign_one_is_a_clean_error(
        monkeypatch, capsys, console_text, tmp_path, gpt2_checkpoint):
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    bare = tmp_path / "bare"  # model only: transformers builds an empty tokenizer that yields no tokens
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300, n_positions=32)).save_pretrained(bare)
    code, out = run_cli(monkeypatch, capsys, console_text, "trace", bare, "--text", "hello world")
    assert code == 2 and "into no tokens" in out and "tokenizer.save_pretrained" in out
    foreign = tmp_path / "foreign"  # a 30k-token tokenizer beside a 300-row embedding
    shutil.copytree(bare, foreign)
    for f in gpt2_checkpoint.iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            shutil.copy(f, foreign / f.name)
    code, out = run_cli(monkeypatch, capsys, console_text, "trace", foreign, "--text", "hello world")
    assert code == 2 and "embedding has 300 rows" in out
