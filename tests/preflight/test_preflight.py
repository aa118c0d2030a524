"""st.preflight and `stethoscope check`: each problem a named preflight.* finding with a fix; healthy is silent."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from torch import nn

import stethoscope as st
from stethoscope import cli


def gpt2(**overrides) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)
    cfg.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**cfg))


def word_tokenizer(pad: str = "[PAD]", n_words: int = 55):
    """An offline WordLevel tokenizer: [PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3, then words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, "[SEP2]": 4, **{f"w{i}": i + 5 for i in range(n_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]")


def codes(findings) -> list[tuple[str, str | None]]:
    return [(f.code, f.target) for f in findings]


def test_healthy_setup_is_silent():
    model = gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)  # a fine-tuning rate: normal, not "too low"
    found = st.preflight(model, opt, word_tokenizer(), special_tokens={"pad": 0, "eos": 2, "[SEP2]": 4},
                         expected_groups={"body": ["transformer"], "head": ["lm_head"]}, max_grad_norm=1.0)
    assert found == []


def test_missing_and_duplicated_parameters_are_both_named():
    model = gpt2()
    params = dict(model.named_parameters())
    kept = [p for n, p in params.items() if n != "transformer.ln_f.weight"]
    with pytest.warns(UserWarning, match="duplicate"):
        opt = torch.optim.AdamW([*kept, params["transformer.h.1.mlp.c_fc.bias"]], lr=1e-4)
    found = st.preflight(model, opt)
    assert codes(found) == [("preflight.param_duplicate", "transformer.h.1.mlp.c_fc.bias"),
                            ("preflight.param_missing", "transformer.ln_f.weight")]
    missing, dup = found[1], found[0]
    assert missing.severity == dup.severity == "critical"
    assert "transformer.ln_f.weight" in missing.message and "add_param_group" in missing.hint
    assert dup.data["parameters"] == {"transformer.h.1.mlp.c_fc.bias": [0, 0]}


def test_frozen_and_foreign_parameters():
    model = gpt2()
    model.transformer.wpe.weight.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    assert codes(st.preflight(model, opt)) == [("preflight.param_frozen", "transformer.wpe.weight")]
    copy_ = copy.deepcopy(model)  # the optimizer still holds the original's parameters
    [f] = [f for f in st.preflight(copy_, opt) if f.code == "preflight.param_foreign"]
    assert f.severity == "critical" and "another copy" in f.message


def test_expected_groups_name_rogue_and_misplaced_parameters():
    model = gpt2()
    body = [p for n, p in model.named_parameters() if n.startswith("transformer.h.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("transformer.h.")]
    opt = torch.optim.AdamW([{"params": body, "name": "blocks"}, {"params": rest, "name": "head"}], lr=1e-4)
    expected = {"blocks": ["transformer.h"], "embed": ["transformer.wte", "transformer.wpe.*"]}
    found = st.preflight(model, opt, expected_groups=expected)
    by_target = {f.target: f for f in found}
    assert "transformer.ln_f.weight" in by_target  # matches no declared prefix: named
    assert "matches none of the declared group prefixes" in by_target["transformer.ln_f.weight"].message
    assert "belongs to group 'embed'" in by_target["transformer.wte.weight"].message  # sits in 'head'
    assert all(f.code == "preflight.param_group" for f in found)


def test_pad_id_differing_from_the_model_config_is_found():
    model = gpt2(pad_token_id=5)  # the config says 5, the tokenizer pads with 0
    [f] = st.preflight(model, tokenizer=word_tokenizer())
    assert (f.code, f.target, f.severity) == ("preflight.token_config", "pad_token_id", "critical")
    assert "tokenizer.pad_token_id is 0 but model.config.pad_token_id is 5" in f.message


def test_expected_special_tokens_vocab_and_pad():
    tok = word_tokenizer()
    found = st.preflight(gpt2(), tokenizer=tok, special_tokens={"eos": 7, "<|im_start|>": 9}, init=False)
    assert codes(found) == [("preflight.special_token", "<|im_start|>"), ("preflight.special_token", "eos")]
    assert "not in the tokenizer's vocabulary" in found[0].message
    small = gpt2(vocab_size=40)  # 60 tokens, 40 embedding rows
    [f] = st.preflight(small, tokenizer=tok, init=False)
    assert f.code == "preflight.vocab_size" and "resize_token_embeddings" in f.hint
    no_pad = gpt2(pad_token_id=None)
    tok.pad_token = None
    assert codes(st.preflight(no_pad, tokenizer=tok, init=False)) == [("preflight.pad_token", "pad_token")]


def test_learning_rate_and_clipping_far_outside_the_usual():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    assert st.preflight(model, torch.optim.AdamW(model.parameters(), lr=2e-5), max_grad_norm=1.0) == []
    assert st.preflight(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)) == []
    [f] = st.preflight(model, torch.optim.AdamW(model.parameters(), lr=0.5))
    assert f.code == "preflight.lr" and f.severity == "warning" and "normalise the gradient" in f.message
    [f] = st.preflight(model, torch.optim.SGD(model.parameters(), lr=2e-6))
    assert "not for SGD" in f.message  # the Adam range differs from SGD's
    [f] = st.preflight(model, max_grad_norm=0.0)
    assert (f.code, f.severity) == ("preflight.grad_clip", "critical")
    [f] = st.preflight(model, max_grad_norm=1e5)
    assert f.code == "preflight.grad_clip" and "never clips" in f.message


def test_init_scale_flags_far_off_layers_and_skips_zero_init():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        model[2].weight.mul_(40.0)  # 40x the default scale
        model[4].weight.zero_()  # a zero-initialised output layer, by design
    [f] = st.preflight(model)
    assert (f.code, f.target) == ("preflight.init_scale", "2")
    assert f.value > 10 and "1/sqrt(fan_in)" in f.message


def test_strict_raises_listing_everything_and_run_dir_records_with_null_step(run_dir):
    model = gpt2(pad_token_id=5)
    opt = torch.optim.AdamW(list(model.parameters())[1:], lr=3.0)
    with pytest.raises(st.PreflightError) as info:
        st.preflight(model, opt, word_tokenizer(), strict=True)
    text = str(info.value)
    assert "preflight found 3 problem(s)" in text
    for code in ("preflight.param_missing", "preflight.token_config", "preflight.lr"):
        assert code in text
    assert len(info.value.findings) == 3
    path = run_dir()
    st.preflight(model, opt, word_tokenizer(), run_dir=path)
    events = [json.loads(line) for line in (path / "findings.jsonl").read_text().splitlines()]
    assert {e["step"] for e in events} == {None} and len(events) == 3
    # into a live monitor: the findings count in its verdict and show in its report
    path2 = run_dir()
    mon = st.Monitor(model, opt, run_dir=path2, config={"console": {"quiet": True}, "report": {"plots": False}})
    st.preflight(model, opt, word_tokenizer(), run_dir=mon)
    mon.close()
    run = st.load_run(path2)
    assert run.verdict["status"] == "critical"
    assert "Preflight checks" in (path2 / "report.md").read_text(encoding="utf-8")


def test_stethoscope_check_on_a_saved_checkpoint(tmp_path, monkeypatch, capsys, console_text):
    model = gpt2(pad_token_id=5)
    model.save_pretrained(tmp_path / "ckpt")
    word_tokenizer().save_pretrained(tmp_path / "ckpt")

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["stethoscope", "check", str(tmp_path / "ckpt"), *args])
        start = len(console_text.getvalue())
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        return code, capsys.readouterr().out + console_text.getvalue()[start:]

    code, out = run()
    assert code == 1  # a critical finding: the pad id differs from the config
    assert "preflight.token_config" in out and "pad_token_id" in out
    spec = tmp_path / "opt.yaml"
    spec.write_text("lr: 1.0e-2\nweight_decay: 0.1\ngroups:\n  blocks: {prefixes: [transformer.h]}\n"
                    "  embed: {prefixes: [transformer.wte, transformer.wpe]}\n")
    code, out = run("--optimizer-config", str(spec), "--json")
    found = json.loads(out)["findings"]
    targets = {(f["code"], f["target"]) for f in found}
    assert ("preflight.param_group", "transformer.ln_f.weight") in targets
    assert ("preflight.param_missing", "2 parameters") in targets
    assert code == 1
    model.config.pad_token_id = 0
    model.save_pretrained(tmp_path / "ckpt")
    code, out = run("--fail-on", "warning", "--json")
    # the config is fixed, but generation_config.json still says 5: generation would pad with another id
    [f] = json.loads(out)["findings"]
    assert (f["code"], f["severity"], f["data"]["source"]) == ("preflight.token_config", "warning",
                                                              "model.generation_config")
    assert code == 1
    model.generation_config.pad_token_id = 0
    model.save_pretrained(tmp_path / "ckpt")
    code, out = run("--fail-on", "warning")
    assert code == 0 and "no problems found" in out
    spec.write_text("lr: 1e-4\nlearning_rate: 3\n")
    code, out = run("--optimizer-config", str(spec))
    assert code == 2 and "unknown key 'learning_rate'" in out and "valid keys: optimizer, lr" in out
