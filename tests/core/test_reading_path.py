"""What a new user trips on between ``pip install`` and the fix (issue 20), one test per item.

Console output is rendered at a fixed width of 80 columns without a terminal (a log file, a CI job), the
way rich's own tests pin the width.
"""

from __future__ import annotations

import functools
import io
import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from rich.console import Console

import stethoscope as st
from stethoscope import cli
from stethoscope import rundir as rd
from stethoscope.console import set_console

from ._helpers import quiet_config, train

README = Path(__file__).resolve().parents[2] / "README.md"
WIDTH = 80


@pytest.fixture
def console80(_core_env) -> io.StringIO:
    """stethoscope's console as a log file of 80 columns (no terminal)."""
    buffer = io.StringIO()
    set_console(Console(file=buffer, width=WIDTH, color_system=None, force_terminal=False))
    return buffer


def run_cli(monkeypatch, capsys, console, *args) -> tuple[int, str, str]:
    """``stethoscope ARGS`` in this process: (exit code, stdout + console, stderr)."""
    monkeypatch.setattr(sys, "argv", ["stethoscope", *map(str, args)])
    start = len(console.getvalue())
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out + console.getvalue()[start:], captured.err


def no_word_cut(text: str, paths: Path | None = None) -> None:
    """No line of ``text`` is wider than 80 columns, but the lines naming a path under ``paths`` (printed
    whole on purpose, so they can be copied)."""
    for line in text.splitlines():
        if paths is None or str(paths) not in line:
            assert len(line.rstrip()) <= WIDTH, line


# ------------------------------------------------------------------------------------------ --version


def test_version(monkeypatch, capsys, console80):
    code, out, _ = run_cli(monkeypatch, capsys, console80, "--version")
    assert code == 0 and out.strip() == f"stethoscope {st.__version__}"


# ------------------------------------------------------------------------------------ run_dir reuse


def _exec_readme_blocks(tmp_path: Path, model, opt, loader) -> dict:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    scope = {"model": model, "opt": opt, "loader": loader}
    for block in blocks[:2]:  # the Monitor snippet, then the load_run example
        exec(compile(block, "README.md", "exec"), scope)
    return scope


def test_the_readme_snippet_runs_twice_and_its_load_run_example_plots(tmp_path, monkeypatch, tiny_gpt2):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    opt = torch.optim.AdamW(tiny_gpt2.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    loader = [{"input_ids": ids, "labels": ids}] * 3
    first = _exec_readme_blocks(tmp_path, tiny_gpt2, opt, loader)
    (tmp_path / "runs" / "exp1" / "notes.txt").write_text("mine")  # a file of the user's own stays
    second = _exec_readme_blocks(tmp_path, tiny_gpt2, opt, loader)  # a rerun: no RunDirError
    assert second["run"].status == "finished" and len(second["run"].scalars()) == 3  # this run's 3 steps
    assert (tmp_path / "runs" / "exp1" / "notes.txt").read_text() == "mine"
    norms = second["norms"]
    assert norms.shape == (3, len(list(tiny_gpt2.parameters()))) and first["norms"].index.tolist() == [0, 1, 2]


def test_run_dir_reuse_names_what_to_pass(tiny_mlp, run_dir):
    path = run_dir()
    st.Monitor(tiny_mlp, run_dir=path, config=quiet_config()).close()
    with pytest.raises(st.RunDirError, match=r"holds a run; pass overwrite=True .* resume=True"):
        st.Monitor(tiny_mlp, run_dir=path)
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.01)
    mon = st.Monitor(tiny_mlp, opt, run_dir=path, config=quiet_config(), overwrite=True)
    train(mon, tiny_mlp, opt, range(2))
    mon.close()
    run = st.load_run(path)
    assert run.meta.get("resumed") is None and sorted(run.scalars().index) == [0, 1]
    # overwrite never empties a folder that holds no run, nor combines with resume
    other = run_dir()
    other.mkdir()
    (other / "data.csv").write_text("x")
    with pytest.raises(st.RunDirError, match="holds no stethoscope run"):
        st.Monitor(tiny_mlp, run_dir=other, overwrite=True)
    assert (other / "data.csv").exists()
    with pytest.raises(st.RunDirError, match="pass one"):
        st.Monitor(tiny_mlp, run_dir=path, overwrite=True, resume=True)


def test_demo_out_existing_names_the_cli_flag(monkeypatch, capsys, console80, tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / rd.META).write_text("{}")
    code, text, _ = run_cli(monkeypatch, capsys, console80, "demo", "--out", out, "--steps", "1", "--quiet")
    assert code == 2 and "--overwrite" in text and "resume" not in text


# ----------------------------------------------------------------------------------- damaged runs


def _finished_run(path: Path, n_findings: int = 6) -> Path:
    path.mkdir(parents=True)
    events = [{"schema_version": 1, "id": f"grad.missing:p{i}", "event": "open", "step": i, "code": "grad.missing",
               "severity": "warning", "target": f"p{i}", "value": 1, "threshold": 1, "message": "m", "hint": "h"}
              for i in range(n_findings)]
    rd.write_json_atomic(path / rd.META, {"schema_version": 1, "status": "finished", "last_step": 5,
                                          "verdict": {"status": "warning",
                                                      "counts": {"info": 0, "warning": n_findings, "critical": 0}}})
    (path / rd.FINDINGS).write_text("".join(json.dumps(e) + "\n" for e in events))
    rows = [{"schema_version": 1, "step": s, "kind": "scalar", "name": "loss", "value": 1.0 / (s + 1)}
            for s in range(6)]
    (path / rd.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load(path: Path) -> st.Run:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = st.load_run(path)
        run.metrics  # noqa: B018  (metrics are read on first use)
    assert [str(w.message) for w in caught if w.category is st.RunDirWarning] == run.problems
    return run


def test_a_sound_run_and_a_killed_writers_torn_last_line_say_nothing(tmp_path):
    assert _load(_finished_run(tmp_path / "sound")).problems == []
    killed = _finished_run(tmp_path / "killed")
    meta = json.loads((killed / rd.META).read_text()) | {"status": "running"}
    rd.write_json_atomic(killed / rd.META, meta)
    with open(killed / rd.METRICS, "a") as fh:
        fh.write('{"schema_version": 1, "step": 6, "ki')
    run = _load(killed)
    assert run.problems == [] and len(run.scalars()) == 6


def test_damage_is_named_with_its_file_and_lines(tmp_path):
    garbage = _finished_run(tmp_path / "garbage")
    lines = (garbage / rd.FINDINGS).read_text().splitlines(keepends=True)
    lines.insert(2, "not json at all\n")
    (garbage / rd.FINDINGS).write_text("".join(lines))
    run = _load(garbage)
    assert len(run.findings) == 6
    assert run.problems == [f"{garbage / rd.FINDINGS}: 1 line could not be read and was skipped (line 3)"]

    meta = _finished_run(tmp_path / "meta")
    (meta / rd.META).write_text('{"status": "fini')
    run = _load(meta)
    assert run.status == "unknown" and len(run.problems) == 1
    assert str(meta / rd.META) in run.problems[0] and "status" in run.problems[0]

    cut = _finished_run(tmp_path / "cut-metrics")
    data = (cut / rd.METRICS).read_bytes()
    (cut / rd.METRICS).write_bytes(data[: len(data) // 2])
    run = _load(cut)
    assert len(run.problems) == 1 and "metrics.jsonl: the last line is cut off" in run.problems[0]

    lost = _finished_run(tmp_path / "lost-findings")
    kept = (lost / rd.FINDINGS).read_text().splitlines(keepends=True)[:3]  # cut at a line boundary
    (lost / rd.FINDINGS).write_text("".join(kept))
    run = _load(lost)
    assert run.problems == [f"{lost / rd.FINDINGS} holds 3 finding(s) but meta.json counted 6 at close: "
                            "findings are missing from the file (truncated?)"]


@pytest.mark.parametrize("command", ["findings", "report"])
def test_findings_and_report_print_the_damage_on_stderr(monkeypatch, capsys, console80, tmp_path, command):
    path = _finished_run(tmp_path / "run")
    with open(path / rd.METRICS, "a") as fh:
        fh.write("garbage\n" + json.dumps({"schema_version": 1, "step": 9, "kind": "scalar", "name": "loss",
                                           "value": 0.1}) + "\n")
    (path / rd.META).write_text("[1, 2]")
    args = [command, path] + (["--json"] if command == "findings" else [])
    code, out, err = run_cli(monkeypatch, capsys, console80, *args)
    assert code == 0
    warned = err.strip().splitlines()
    assert warned[0].startswith("warning: ") and f"{path / rd.META} holds a JSON list" in warned[0]
    if command == "report":  # the report reads the metrics: their damage is said too
        assert warned[1] == f"warning: {path / rd.METRICS}: 1 line could not be read and was skipped (line 7)"
    else:
        assert json.loads(out)["status"] == "unknown"  # stdout stays the JSON a script reads


# --------------------------------------------------------------------------------- 80-column output


def test_findings_values_carry_their_unit_and_the_table_folds_no_word(monkeypatch, capsys, console80, tmp_path):
    from stethoscope.report import findings_table

    path = _finished_run(tmp_path / "run", n_findings=0)
    events = [
        {"id": "a", "event": "open", "step": 0, "code": "act.dead_features", "severity": "critical",
         "target": "transformer.h.1.mlp.act", "value": 1.0, "threshold": 0.25, "message": "m", "hint": "h"},
        {"id": "b", "event": "open", "step": 0, "code": "grad.missing", "severity": "critical",
         "target": "transformer.h.3.mlp.gate", "value": 10, "threshold": 3, "message": "m", "hint": "h"},
        {"id": "c", "event": "open", "step": 4, "code": "grad.norm_spike", "severity": "warning",
         "target": "", "value": 12.5, "threshold": 10.0, "message": "m", "hint": "h"},
        {"id": "d", "event": "open", "step": 1, "code": "grad.nonfinite", "severity": "critical",
         "target": "w", "value": 1, "threshold": 1, "message": "m", "hint": "h"},
    ]
    (path / rd.FINDINGS).write_text("".join(json.dumps(e) + "\n" for e in events))
    code, out, _ = run_cli(monkeypatch, capsys, console80, "findings", path)
    assert code == 0
    assert "value 100.0 % vs threshold 25.0 %" in out
    assert "value 10 steps vs threshold 3 steps" in out
    assert "value 12.5× vs threshold 10×" in out
    assert "value 1 entry vs threshold 1 entry" in out
    buffer = io.StringIO()
    Console(file=buffer, width=WIDTH, color_system=None).print(findings_table(st.load_run(path), width=WIDTH))
    table = buffer.getvalue()
    no_word_cut(table)
    for word in ("act.dead_features", "transformer.h.1.mlp.act", "grad.missing", "transformer.h.3.mlp.gate",
                 "100.0 %", "10 steps", "0 → open"):
        assert word in table, word


def _demo(tmp_path, console, steps, pathology="none", **kwargs) -> tuple[Path, str]:
    from stethoscope.demo import run_demo

    start = len(console.getvalue())
    run_dir = run_demo(steps=steps, out=tmp_path / f"demo-{pathology}", pathology=pathology,
                       config={"report": {"plots": False}}, **kwargs)
    return run_dir, console.getvalue()[start:]


def _step_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("stethoscope · step")]


def test_demo_log_lines_in_order_with_plain_progress(monkeypatch, tmp_path, console80):
    from stethoscope.demo import runner

    monkeypatch.setattr(runner, "PLAIN_PROGRESS_MIN", 3)  # a 3-step run counts as long: progress lines
    _, text = _demo(tmp_path, console80, 3)
    lines = text.splitlines()
    steps = [i for i, ln in enumerate(lines) if ln.startswith("stethoscope · step")]
    trained = next(i for i, ln in enumerate(lines) if ln.startswith("trained 3 steps"))
    assert len(steps) == 3 and steps[-1] < trained  # the last step's line before "trained N steps"
    progress = [ln for ln in lines if ln.startswith("demo · step")]
    assert [ln.split(" · ")[1] for ln in progress] == ["step 1/3 (33 %)", "step 2/3 (66 %)"]
    assert all("elapsed · about" in ln and ln.endswith("s left") for ln in progress)
    assert not any(ln.strip() == "" for ln in lines[steps[0]:trained])  # no blank line left by a bar
    assert "ETA" not in text


def test_demo_on_a_terminal_has_a_progress_bar_with_eta(tmp_path, _core_env):
    buffer = io.StringIO()
    set_console(Console(file=buffer, width=WIDTH, color_system=None, force_terminal=True))
    _demo(tmp_path, buffer, 2)
    assert "ETA" in buffer.getvalue() and "demo · step" not in buffer.getvalue()


def test_unused_param_is_printed_once_with_its_unit_in_the_summary(tmp_path, console80):
    _, text = _demo(tmp_path, console80, 4, pathology="unused-param")
    lines = _step_lines(text)
    assert sum("grad.missing" in ln for ln in lines) == 1 and "grad.missing" in lines[0]
    assert re.search(r"grad\.missing on transformer\.h\.3\.mlp\.gate · value \d+ steps? vs threshold \d+ steps?",
                     text)


# ---------------------------------------------------------------------------------------- preflight


def _gpt2_dir(tmp_path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path / "ckpt"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16)).save_pretrained(path)
    return path


def test_check_says_the_learning_rate_once_and_fits_80_columns(monkeypatch, capsys, console80, tmp_path):
    ckpt = _gpt2_dir(tmp_path)
    spec = tmp_path / "opt.yaml"
    spec.write_text("lr: 0.5\nweight_decay: 0.1\ngroups:\n  blocks: {prefixes: [transformer.h]}\n"
                    "  embed: {prefixes: [transformer.wte, transformer.wpe]}\n")
    code, out, _ = run_cli(monkeypatch, capsys, console80, "check", ckpt, "--optimizer-config", spec)
    assert code == 1  # ln_f is in no declared group: critical
    assert out.count("preflight.lr") == 1 and "learning rate 0.5 is far above" in out
    assert re.search(r"preflight\.lr on (all \d+ param groups|param groups [\d, ()'a-z]+)", out)
    no_word_cut(out, paths=tmp_path)
    # one group, one finding with its own label (unchanged)
    model = torch.nn.Linear(4, 4)
    [f] = st.preflight(model, torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias], "lr": 1e-3}],
                                                lr=0.5))
    assert f.target == "param group 0"


def test_an_empty_or_cut_safetensors_file_is_named(monkeypatch, capsys, console80, tmp_path):
    ckpt = _gpt2_dir(tmp_path)
    weights = ckpt / "model.safetensors"
    full = weights.read_bytes()
    weights.write_bytes(b"")
    for command in (["check", ckpt], ["trace", ckpt, "--text", "hi"]):
        code, out, _ = run_cli(monkeypatch, capsys, console80, *command)
        assert code == 2 and f"{str(weights)!r} is empty (0 bytes)" in out and "save_pretrained" in out
    weights.write_bytes(full[:100])
    code, out, _ = run_cli(monkeypatch, capsys, console80, "check", ckpt)
    assert code == 2 and f"{str(weights)!r} is truncated" in out


# ------------------------------------------------------------------------------------------- trace


def _lm_dir(tmp_path: Path) -> Path:
    """A 2-layer, 2-head GPT-2 LM saved with an offline word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    path = tmp_path / "lm"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16,
                                bos_token_id=0, eos_token_id=0)).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i + 1 for i in range(31)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return path


def test_trace_warms_up_by_default_and_says_how_many_passes_were_timed(monkeypatch, capsys, console80, tmp_path):
    from stethoscope import hf_loading

    lm = _lm_dir(tmp_path)
    calls = []
    real = hf_loading.load_local

    def counting(path):
        ckpt = real(path)
        forward = ckpt.model.forward
        ckpt.model.forward = functools.wraps(forward)(lambda *a, **k: (calls.append(1), forward(*a, **k))[1])
        return ckpt

    monkeypatch.setattr(hf_loading, "load_local", counting)
    code, out, _ = run_cli(monkeypatch, capsys, console80, "trace", lm, "--text", "w1 w2", "--out", tmp_path / "t")
    assert code == 0 and len(calls) == 3  # 2 warm-up passes, then the timed one
    assert "1 timed pass after 2 warm-up passes" in " ".join(out.split())
    no_word_cut(out, paths=tmp_path)
    calls.clear()
    code, out, _ = run_cli(monkeypatch, capsys, console80, "trace", lm, "--text", "w1 w2", "--out", tmp_path / "c",
                           "--warmup", "0")
    assert code == 0 and len(calls) == 1 and "1 cold pass, no warm-up" in " ".join(out.split())


def test_trace_attention_picks_layers_and_heads(monkeypatch, capsys, console80, tmp_path):
    lm = _lm_dir(tmp_path)
    base = ["trace", lm, "--text", "w1 w2 w3", "--top-k", "0", "--warmup", "0"]
    code, every, _ = run_cli(monkeypatch, capsys, console80, *base, "--out", tmp_path / "all", "--attention")
    assert code == 0 and every.count("· head ") == 4
    code, one, _ = run_cli(monkeypatch, capsys, console80, *base, "--out", tmp_path / "one", "--attention",
                           "--layers", "1", "--heads", "0")
    assert code == 0 and one.count("· head ") == 1 and "transformer.h.1.attn · head 0" in one
    assert "showing layers 1 of 2 and heads 0 of 2: 1 of 4 heads" in one
    log = (tmp_path / "one" / "attention" / "step-by-step.log").read_text()
    assert log.count("=== ") == 1  # the files hold the same selection
    code, bad, _ = run_cli(monkeypatch, capsys, console80, *base, "--out", tmp_path / "bad", "--attention",
                           "--layers", "5")
    assert code == 2 and "--layers 5: the model has 2 attention layers (0 to 1)" in bad
    code, bad, _ = run_cli(monkeypatch, capsys, console80, *base, "--out", tmp_path / "x", "--heads", "0")
    assert code == 2 and "add --attention" in bad
    code, bad, _ = run_cli(monkeypatch, capsys, console80, *base, "--out", tmp_path / "y", "--attention",
                           "--heads", "a")
    assert code == 2 and "--heads takes numbers and ranges" in bad


# ------------------------------------------------------------------------------------------- probe


def test_probe_synth_refuses_a_non_empty_folder_without_force(monkeypatch, capsys, console80, tmp_path):
    pytest.importorskip("stethoscope.probe.cli")
    out = tmp_path / "set"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    small = ["--targets", "2", "--groups-per-target", "2", "--texts", "2", "--duration", "0.1",
             "--sample-rate", "8000"]
    code, text, _ = run_cli(monkeypatch, capsys, console80, "probe", "synth", out, *small)
    assert code == 2 and "is not empty" in text and "--force" in text and "mine.txt" in text
    assert not (out / "metadata.csv").exists()
    code, text, _ = run_cli(monkeypatch, capsys, console80, "probe", "synth", out, *small, "--force")
    assert code == 0 and (out / "metadata.csv").is_file() and (out / "mine.txt").read_text() == "keep"
    code, text, _ = run_cli(monkeypatch, capsys, console80, "probe", "synth", out, *small)
    assert code == 2 and "holds a synthetic set" in text
    code, text, _ = run_cli(monkeypatch, capsys, console80, "probe", "synth", out, *small, "--force")
    assert code == 0 and "replaced wav, metadata.csv" in text


# ------------------------------------------------------------------------------------------ report


def test_a_healthy_report_shows_no_logits_as_saturated_no_black_heatmaps_and_says_the_axis_is_uneven(run_dir):
    from stethoscope.report import build

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight.mul_(4.0)  # some pre-activations beyond ±3: saturation worth a picture
        model[2].weight.mul_(40.0)  # logits far beyond ±3: normal for logits
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    path = run_dir()
    mon = st.Monitor(model, opt, run_dir=path, config={"console": {"quiet": True}, "report": {"plots": False}},
                     schedule=lambda step: step < 3 or step % 5 == 0)
    train(mon, model, opt, range(11))
    mon.close()
    content = build(st.load_run(path))
    [acts] = [s for s in content.sections if s.id == "activations"]
    [table] = acts.tables
    cells = {row[0]: row for row in table.rows}
    assert "<model> [0]" not in cells and not any(n.startswith("<model>") for n in cells)  # no duplicate of "2"
    assert cells["2"][table.columns.index("saturated")] == "—"  # logits: no saturation shown
    assert any("`2` produces the model's output (logits)" in n for n in acts.notes)
    assert any(n.startswith("Dead features: none") for n in acts.notes)
    [heat] = [p for p in acts.plots[0].panels]
    assert heat.data["rows"] and "2" not in heat.data["rows"]
    assert heat.data["xlabel"] == "sampled step (uneven: 0–2 every step, then 5, 10)"
    [grads] = [s for s in content.sections if s.id == "gradients"]
    assert any(n.startswith("Zero-gradient fraction: none") for n in grads.notes)
    assert not [p for p in grads.plots if p.id == "grad-zero"]
