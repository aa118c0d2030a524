"""Sections appear only when their data exists; data of capabilities still to come lights theirs up; a huge
model stays readable (top-N tables, blocks grouped, plots thinned); the block grouping helper."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import stethoscope as st
from stethoscope.report import build, layer_group, write_report
from stethoscope.report.model import MAX_COLS, MAX_ROWS, TOP_N

from .conftest import SYNTHETIC_FINDINGS, stat_row, write_run


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("transformer.h.3.attn.c_attn.weight", "transformer.h.3"),
        ("transformer.h.3.attn", "transformer.h.3"),
        ("model.layers.12.mlp.down_proj.weight", "model.layers.12"),
        ("encoder.layer.0.attention.self.query.bias", "encoder.layer.0"),
        ("blocks.7.ln1", "blocks.7"),
        ("vision.encoder.layers.2.self_attn", "vision.encoder.layers.2"),
        ("lm_head.weight", "lm_head"),
        ("transformer.wte.weight", "transformer.wte"),
        ("transformer.ln_f", "transformer.ln_f"),
        ("0.weight", "0"),
        ("", "<model>"),
    ],
)
def test_layer_group(name, group):
    assert layer_group(name) == group


def _section_ids(path):
    return [s.id for s in build(st.load_run(path)).sections]


def test_each_kind_of_data_lights_up_its_section(tmp_path):
    rows = []
    for step in range(6):
        rows.append({"step": step, "kind": "scalar", "name": "loss", "value": 3.0 - 0.1 * step})
        for layer in range(3):
            for head in range(4):
                rows.append(
                    {
                        "step": step,
                        "kind": "attn",
                        "name": f"model.layers.{layer}.self_attn",
                        "head": head,
                        "entropy": 2.0 - 0.2 * layer - 0.05 * head,
                        "sink_share": 0.1 * head + 0.05 * layer,
                    }
                )
        rows.append(
            {
                "step": step,
                "kind": "memory",
                "name": "cuda:0",
                "allocated": (100 + 10 * step) * 2**20,
                "reserved": 400 * 2**20,
            }
        )
        rows.append({"step": step, "kind": "memory", "name": "process", "rss": (900 + 30 * step) * 2**20})
        for i in range(20):
            rows.append(
                {"step": step, "kind": "timing", "name": f"model.layers.{i % 3}.m{i}", "mean_ms": 0.5 * i + 1}
            )
    path = write_run(tmp_path / "synthetic", rows, SYNTHETIC_FINDINGS)
    (path / "hang-0001.txt").write_text(
        "hang at step 4 in forward\n" + "".join(f"frame {i}\n" for i in range(60))
    )
    (path / "crash-0001.txt").write_text("RuntimeError: CUDA out of memory\nlast events ...\n")
    (path / "attention").mkdir()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    for i in range(2):
        fig = Figure(figsize=(2, 2))
        fig.subplots().imshow(np.tril(np.random.rand(8, 8)))
        fig.savefig(path / "attention" / f"step0-layer{i}.png")
    (path / "attention" / "step0.txt").write_text("Q/K/V stats ...\n")

    assert _section_ids(path) == ["dumps", "training", "attention", "memory", "timing"]
    write_report(path)
    html = (path / "report.html").read_text()
    md = (path / "report.md").read_text()
    for plot_id in ("attention", "memory", "timing", "attn-img-1", "attn-img-2"):
        assert f'data-plot="{plot_id}"' in html, plot_id
    # dumps linked (relative) with their first lines, cut after 40 lines
    assert 'href="hang-0001.txt"' in html and 'href="crash-0001.txt"' in html
    assert "hang at step 4 in forward" in html and "frame 38" in html and "frame 45" not in html
    assert "[hang-0001.txt](hang-0001.txt)" in md and 'href="attention/step0.txt"' in html
    # slowest modules: slowest first, top N
    timing = next(s for s in build(st.load_run(path)).sections if s.id == "timing")
    assert timing.tables[0].rows[0][0] == "model.layers.1.m19" and len(timing.tables[0].rows) == TOP_N
    # memory in MiB; attention heat maps per layer × head
    memory = next(s for s in build(st.load_run(path)).sections if s.id == "memory")
    assert memory.plots[0].panels[0].data["ylabel"] == "MiB"
    attn = next(s for s in build(st.load_run(path)).sections if s.id == "attention")
    heat = attn.plots[0].panels[0].data
    assert heat["matrix"].shape == (3, 4) and heat["cols"] == [0, 1, 2, 3]


def test_a_section_whose_data_is_odd_does_not_cost_the_report(tmp_path):
    rows = [
        {"step": 0, "kind": "attn", "name": "a", "entropy": "not a number"},
        {"step": 0, "kind": "memory", "name": "m", "note": "text only"},
        {"step": 0, "kind": "timing", "name": "x"},
    ]
    path = write_run(tmp_path / "odd", rows, SYNTHETIC_FINDINGS)
    write_report(path)
    html = (path / "report.html").read_text()
    assert "numerics.nonfinite" in html


def test_huge_model_stays_readable(tmp_path):
    """3,000 parameters in 250 blocks, 300 logged steps: tables capped, blocks merged, page a few MB."""
    rng = np.random.default_rng(0)
    names = [
        f"model.layers.{b}.{m}.{p}"
        for b in range(250)
        for m in ("q", "k", "v", "o", "up", "down")
        for p in ("weight", "bias")
    ]
    assert len(names) == 3000
    rows = []
    steps = range(0, 3000, 10)
    for step in steps:
        rows.append({"step": step, "kind": "scalar", "name": "loss", "value": float(rng.random())})
    for step in steps[::30]:  # 10 sampled steps of every parameter and module: 60k rows
        death = step / 2700
        for i, n in enumerate(names):
            layer = i // 12
            rows.append(
                stat_row(
                    step,
                    "grad",
                    n,
                    norm=float(rng.random()) + 1e-3,
                    zero_fraction=min(1.0, death * layer / 250),
                )
            )
            rows.append(
                {
                    "step": step,
                    "kind": "update",
                    "name": n,
                    "update_norm": 1e-3,
                    "weight_norm": 1.0,
                    "ratio": 1e-3 * (1 + layer),
                }
            )
        for b in range(250):
            rows.append(
                stat_row(
                    step,
                    "act",
                    f"model.layers.{b}.mlp",
                    dead_features=b % 7,
                    features=64,
                    saturation_fraction=0.01 * (b % 5),
                )
            )
    path = write_run(tmp_path / "huge", rows, SYNTHETIC_FINDINGS)
    content = build(st.load_run(path))
    for section in content.sections:
        for table in section.tables:
            assert len(table.rows) <= TOP_N, (section.id, table.caption)
        for plot in section.plots:
            for p in plot.panels or [plot]:
                if p.kind == "heatmap":
                    rows_, cols_ = p.data["matrix"].shape
                    assert rows_ <= MAX_ROWS and cols_ <= MAX_COLS
                    assert rows_ == len(p.data["rows"])
                if p.kind == "lines":
                    assert len(p.data["series"]) <= MAX_ROWS
    zero = next(p for s in content.sections for p in s.plots if p.id == "grad-zero")
    assert zero.data["rows"][0].startswith("model.layers.0 … ")  # neighbouring blocks merged
    # progressive death: the deepest blocks at the last step are dead, the first are not
    assert zero.data["matrix"][-1, -1] > 0.9 and zero.data["matrix"][0, -1] < 0.1
    write_report(path)
    html = (path / "report.html").read_text()
    assert len(html.encode()) < 3_000_000
    assert max(len(re.findall(r"<tr>", t)) for t in html.split("<table")[1:]) <= TOP_N + 1


def test_slowest_modules_from_a_trace_use_self_time(tmp_path):
    """trace.jsonl (``stethoscope trace``): a parent's time includes its children; self time does not."""
    path = write_run(tmp_path / "traced", [])
    events = [  # exit events in call order: children before their parent
        {"event": "exit", "name": "h.0.attn", "depth": 2, "ms": 6.0},
        {"event": "exit", "name": "h.0.mlp", "depth": 2, "ms": 3.0},
        {"event": "exit", "name": "h.0", "depth": 1, "ms": 10.0},
        {"event": "exit", "name": "h.1", "depth": 1, "ms": 2.0},
        {"event": "exit", "name": "", "depth": 0, "ms": 12.5},
    ]
    (path / "trace.jsonl").write_text("".join(json.dumps({"schema_version": 1} | e) + "\n" for e in events))
    timing = next(s for s in build(st.load_run(path)).sections if s.id == "timing")
    rows = {r[0]: r[1] for r in timing.tables[0].rows}
    assert timing.tables[0].rows[0][0] == "h.0.attn"
    assert rows == {"h.0.attn": "6", "h.0.mlp": "3", "h.1": "2", "h.0": "1", "<model>": "0.5"}
