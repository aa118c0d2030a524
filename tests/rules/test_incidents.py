"""Incidents and aggregated targets (issue 15, items 1 and 2): one incident per problem, the cause first.

The unit tests drive :class:`FindingProducer` directly; the end-to-end ones run the demo pathologies and read
every surface a user reads (``stethoscope findings``, its ``--json``, report.md, the verdict).
"""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

import stethoscope as st
from stethoscope.cli import app
from stethoscope.console import set_console
from stethoscope.findings import FindingLog
from stethoscope.report import write_report
from stethoscope.rules.base import RuleContext
from stethoscope.rules.model_info import ModelInfo, ParamInfo
from stethoscope.rules.producer import FindingProducer, RulesSettings, describe_scope, scope_pattern
from stethoscope.run import fold_findings
from tests._events import Events

PARAMS = [f"bert.encoder.layer.{i}.{p}" for i in range(6)
          for p in ("attention.self.query.weight", "attention.self.query.bias", "output.dense.weight")]


def make(code: str = "grad.missing", **settings) -> tuple[FindingProducer, Events]:
    events = Events()
    info = ModelInfo(params={n: ParamInfo(n, n.rsplit(".", 1)[0], n.rsplit(".", 1)[1], 4, 1)
                             for n in [*PARAMS, "bert.pooler.dense.weight"]})
    ctx = RuleContext(findings=FindingLog(events), info=info, settings=RulesSettings(**settings))
    return FindingProducer(ctx, code), events


def test_scope_pattern_and_words():
    assert scope_pattern(PARAMS) == "bert.encoder.layer.*"
    assert scope_pattern([f"h.{i}.attn.c_attn.weight" for i in range(4)]) == "h.*.attn.c_attn.weight"
    assert scope_pattern(["a.weight", "b.weight", "c.bias"]) == "*"
    words = describe_scope(PARAMS, "bert.encoder.layer.*", [*PARAMS, "bert.pooler.dense.weight"])
    assert words == "18 parameters — every parameter under `bert.encoder.layer.*` (blocks 0–5)"
    some = describe_scope(PARAMS[:9], "bert.encoder.layer.*", PARAMS)
    assert some == "9 parameters — 9 of the 18 parameters under `bert.encoder.layer.*` (blocks 0–2)"


def test_many_targets_with_one_cause_are_one_finding_with_a_scope():
    prod, events = make()
    for name in PARAMS:
        prod.propose(name, "critical", 0, None, 3, f"{name} got no gradient", "reconnect it")
    written = prod.settle(3)
    assert len(written) == 1 and len(events.rows) == 1
    [ev] = events.rows
    assert ev["target"] == "bert.encoder.layer.*" and ev["severity"] == "critical"
    assert ev["data"]["count"] == 18 and sorted(ev["data"]["members"]) == sorted(PARAMS)
    assert ev["message"].startswith("18 parameters — every parameter under `bert.encoder.layer.*` (blocks 0–5)")
    assert all(prod.is_open(n) for n in PARAMS) and not prod.is_open("bert.pooler.dense.weight")
    assert sorted(prod.open_targets()) == sorted(PARAMS)

    # the next step's candidates on members update the aggregate instead of opening new findings
    for name in PARAMS:
        prod.propose(name, "critical", 0, None, 4, f"{name} got no gradient", "reconnect it")
    prod.settle(4)
    assert [e["event"] for e in events.rows] == ["open"]  # nothing worse: no update event

    # members leave one by one; the aggregate closes with the last
    for name in PARAMS[:-1]:
        prod.release(name, 5)
    assert [e["event"] for e in events.rows] == ["open"] and prod.is_open(PARAMS[-1])
    prod.release(PARAMS[-1], 6)
    assert [e["event"] for e in events.rows] == ["open", "close"] and not prod.open_targets()


def test_few_targets_stay_single_and_the_cap_counts_what_it_leaves_out():
    prod, events = make(aggregate_min=4, max_open=2)
    for i, name in enumerate(PARAMS[:3]):
        prod.propose(name, "warning", 1.0 + i, 0.5, 1, f"{name} is bad", "fix")
    prod.settle(1)
    opened = [e for e in events.rows if e["event"] == "open"]
    assert [e["target"] for e in opened] == [PARAMS[2], PARAMS[1]]  # the worst first, two of three
    assert opened[-1]["data"]["not_opened"]["count"] == 1
    assert "+1 more target(s) of this code not opened" in opened[-1]["message"]


def test_aggregation_off():
    prod, events = make(aggregate_min=0)
    for name in PARAMS:
        prod.propose(name, "critical", 0, None, 1, "m", "h")
    prod.settle(1)
    assert len(events.rows) == 8  # rules.max_open


def test_a_consequence_is_linked_to_its_root_and_folded_into_one_incident():
    root, events = make("numerics.nonfinite")
    root.propose("encoder.layer.2.attn", "critical", 12, 1, 7, "NaN born here", "fix the attention")
    root.settle(7)
    root.ctx.shared["cause"] = {"code": "numerics.nonfinite", "target": "encoder.layer.2.attn", "step": 7,
                                "what": "a NaN born in the forward pass"}
    grads = FindingProducer(root.ctx, "grad.nonfinite")
    for name in PARAMS:
        grads.judge(name, 1.0, 7, f"{name} has NaN gradients", "see the root", key="grad.missing",
                    severity="critical")
    grads.settle(7)
    loss = FindingProducer(root.ctx, "custom.loss")
    loss.propose(None, "warning", 9.0, 5.0, 8, "loss high", "lower it")  # proposed: not a linked judgement
    loss.settle(8)
    findings = fold_findings(events.rows)
    by_code = {f.code: f for f in findings}
    nonfinite, consequence = by_code["numerics.nonfinite"], by_code["grad.nonfinite"]
    assert consequence.caused_by == nonfinite.id and consequence.incident == nonfinite.id
    assert consequence.data["caused_by"]["reason"].startswith("opened while a NaN born in the forward pass")
    assert "A consequence: it opened while" in consequence.message
    assert by_code["custom.loss"].caused_by is None and by_code["custom.loss"].incident == "custom.loss:-"


def test_a_root_announced_before_it_opens_still_links(tmp_path):
    """A gradient-norm spike waits for a second sampled step to open; what opened in between is linked."""
    prod, events = make("act.saturation")
    prod.ctx.shared["cause"] = {"code": "grad.norm_spike", "target": "", "step": 5, "what": "a spike"}
    prod.judge("h.0", 1.0, 5, "saturated", "x", key="grad.missing", severity="warning")
    prod.settle(5)
    assert events.rows[0]["data"]["caused_by"]["id"] == "grad.norm_spike:-"


# ---------------------------------------------------------------------- the demo, on every surface
def demo(tmp_path, pathology: str, steps: int) -> tuple[st.Run, str]:
    out = tmp_path / pathology
    result = CliRunner().invoke(app, ["demo", "--pathology", pathology, "--steps", str(steps), "--out", str(out),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    return st.load_run(out), str(out)


@pytest.mark.parametrize(("pathology", "steps", "root"), [
    ("nan", 8, "numerics.nonfinite"),
    ("exploding", 12, "grad.norm_spike"),
    ("dead-relu", 4, "act.dead_features"),
    ("vanishing", 4, "grad.vanishing"),
    ("unused-param", 4, "grad.missing"),
])
def test_the_demo_leads_with_the_injected_cause_everywhere(tmp_path, pathology, steps, root):
    run, out = demo(tmp_path, pathology, steps)
    first = run.incidents[0]
    assert first.root.code == root, [(i.root.code, len(i.consequences)) for i in run.incidents]
    assert run.verdict["cause"]["code"] == root

    buffer = io.StringIO()
    set_console(Console(file=buffer, width=100, color_system=None))
    try:
        CliRunner().invoke(app, ["findings", out])
    finally:
        set_console(None)
    text = buffer.getvalue()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert root in lines[0]  # the verdict names the cause
    assert re.match(rf"^(critical|warning) {re.escape(root)} on ", lines[1]), text
    assert "fix:" in text

    data = json.loads(CliRunner().invoke(app, ["findings", out, "--json"]).output)
    assert data["incidents"][0]["root"] == first.root.id
    assert all("incident" in f and "caused_by" in f for f in data["findings"])

    md = write_report(run.path, plots=False).read_text(encoding="utf-8")
    heading = md.index("### Incident 1")
    assert f"`{root}`" in md[heading: md.index("\n", heading)]
    assert f"**Cause:** `{root}`" in md


def test_the_nan_demo_folds_its_consequences(tmp_path):
    run, _ = demo(tmp_path, "nan", 8)
    first = run.incidents[0]
    codes = {f.code for f in first.consequences}
    assert "grad.nonfinite" in codes, [(f.code, f.target) for f in run.findings]
    # every parameter's NaN gradient is one finding (aggregated), not eight cards
    nonfinite = [f for f in run.findings if f.code == "grad.nonfinite"]
    assert len(nonfinite) == 1 and len(nonfinite[0].members) >= 4


def test_dead_units_explain_the_zero_gradients_of_their_block(tmp_path):
    """Dead ReLUs in block 1 zero the gradients of the parameters around them: one incident, not two."""
    run, _ = demo(tmp_path, "dead-relu", 4)
    loud = [i for i in run.incidents if i.severity != "info"]
    assert len(loud) == 1, [(i.root.code, i.root.target) for i in loud]
    root = loud[0].root
    assert root.code == "act.dead_features" and root.target == "transformer.h.1.mlp.act"
    [zf] = [f for f in loud[0].consequences if f.code == "grad.zero_fraction"]
    assert all(m.startswith("transformer.h.1.") for m in zf.members or [zf.target])
    assert "in the same block `transformer.h.1`" in zf.data["caused_by"]["reason"]


def test_plots_mark_the_first_non_finite_value_not_the_first_unlogged_step(tmp_path):
    """grad_norm is logged on sampled steps only: a step without it is not a NaN."""
    from stethoscope.report.sections.training import training

    run, _ = demo(tmp_path, "nan", 40)  # warm-up 0-9 sampled, NaN from step 20 (sampled again from there)
    panels = {p.title: p for p in training(run).plots[0].panels}
    marks = {name: [x for x, label in p.data["vlines"] if "non-finite" in label] for name, p in panels.items()}
    onset = run.incidents[0].first_step
    assert marks["loss"] and marks["grad_norm"], marks
    assert marks["grad_norm"][0] >= onset > 10 and marks["loss"][0] <= onset, (marks, onset)
    md = write_report(run.path, plots=False).read_text(encoding="utf-8")
    assert "| nan |" in md  # a NaN logged reads nan in the table, never a blank
