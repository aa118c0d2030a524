"""``compare_runs`` / ``stethoscope compare RUN_A RUN_B`` on two demo runs: the same seed and recipe, one with
the ``nan`` pathology (from step ``steps // 2``). They are bit-identical until then, so the comparison must
name that step and the pathology's module."""

from __future__ import annotations

import json

import pytest

from stethoscope.compare import compare_runs
from stethoscope.demo.corpus import ByteCorpus
from stethoscope.demo.model import GPTConfig
from stethoscope.demo.pathologies import get_pathology
from stethoscope.demo.runner import TrainSettings, build, train_step
from stethoscope.errors import CompareError

from .conftest import run_cli

STEPS = 6
# every step sampled; nothing the comparison does not read (attention capture, memory, recorder, report)
CONFIG = {"sampling": {"warmup_steps": 1000}, "report": {"enabled": False}, "attention": {"capture": "off"},
          "memory": {"enabled": False}, "recorder": {"enabled": False}, "stats": {"update_ratio": ""},
          "watchdog": {"enabled": False}, "console": {"quiet": True}}


def demo_run(out, pathology: str, seed: int = 0, config: dict | None = None):
    """The demo's training loop (run_demo's model, optimizer, pathology and batches) at a test's size."""
    from stethoscope.monitor import Monitor

    settings = TrainSettings(batch_size=2)
    model, optimizer, path = build(pathology, seed, GPTConfig(block_size=16, n_embd=32, n_head=2), settings)
    batches = ByteCorpus().batches(settings.batch_size, 16, seed=seed)
    with Monitor(model, optimizer=optimizer, run_dir=out, config=config or CONFIG) as mon:
        for step in range(STEPS):
            x, y = next(batches)
            with mon.step(step):
                loss, _ = train_step(model, optimizer, path, settings, step, STEPS, x, y, mon)
            mon.log(loss=loss)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {name: demo_run(root / name, name) for name in ("none", "nan")}


def test_a_pathology_from_step_k_is_named_at_step_k_and_its_module(runs):
    k = get_pathology("nan").onset(STEPS)
    result = compare_runs(runs["none"], runs["nan"])
    assert result.step == k == 3
    assert result.first.kind == "scalar" and result.first.name == "loss"
    assert result.module.name == get_pathology("nan").target == "transformer.h.2.attn"
    assert result.module.step == k and result.module.kind == "act"
    assert all(s.step >= k for s in result.splits)  # nothing parts ways before the onset
    assert not result.meta_diffs  # same config, versions and model
    assert "step 3" in result.summary() and "transformer.h.2.attn" in result.summary()
    assert list(result.curve_a.index) == list(range(STEPS)) and result.curve_name == "loss"


def test_a_run_against_itself_does_not_part_ways(runs, tmp_path):
    result = compare_runs(runs["none"], runs["none"])
    assert result.same and result.step is None and result.module is None and result.series > 100
    assert result.plot(tmp_path / "loss.png").stat().st_size > 5000


def test_noise_decides_what_parts_ways():
    import numpy as np

    from stethoscope.compare.runs import _first_split

    a = np.array([5.0, 4.0, 4.5, 3.9, 4.2, 3.8, 4.1, 3.0])
    wobble = a + np.array([0, 0.01, -0.02, 0.03, -0.01, 0.02, -0.03, 0.0])  # within step-to-step noise
    assert _first_split(a, wobble, 1e-5, 1e-12, 5.0)[0] == 1  # no history yet at step 1: rtol decides
    late = a.copy()
    late[4:] += [0.01, -0.02, 0.03, -0.01]  # the same wobble once the noise is known (|Δ| ~ 0.5): not apart
    assert _first_split(a, late, 1e-5, 1e-12, 5.0)[0] == -1
    jump = a.copy()
    jump[6] = 9.0
    t, thr, noise = _first_split(a, jump, 1e-5, 1e-12, 5.0)
    assert t == 6 and noise > 0 and thr == pytest.approx(5.0 * noise)
    nan = a.copy()
    nan[4] = np.nan
    assert _first_split(a, nan, 1e-5, 1e-12, 5.0)[0] == 4
    assert _first_split(nan, nan, 1e-5, 1e-12, 5.0)[0] == -1  # NaN in both at the same step agrees


def test_meta_differences_come_first_in_the_cli(runs, tmp_path, monkeypatch, capsys, console_text):
    other = demo_run(tmp_path / "eps", "none", config=CONFIG | {"stats": {"update_ratio": "", "eps": 1e-6}})
    code, out = run_cli(monkeypatch, capsys, console_text, "compare", runs["none"], other)
    assert code == 1
    assert out.index("meta.json differences") < out.index("part ways")
    assert "config.stats.eps" in out
    code, out = run_cli(monkeypatch, capsys, console_text, "compare", runs["none"], runs["nan"], "--json")
    data = json.loads(out[: out.rindex("}") + 1])
    assert code == 1 and data["step"] == 3 and data["module"]["name"] == "transformer.h.2.attn"


def test_runs_without_a_shared_step_are_a_clear_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text('{"schema_version":1,"step":0,"kind":"scalar","name":"loss",'
                                                  '"value":1.0}\n')
    (tmp_path / "b" / "metrics.jsonl").write_text('{"schema_version":1,"step":5,"kind":"scalar","name":"loss",'
                                                  '"value":1.0}\n')
    with pytest.raises(CompareError, match="share no recorded step"):
        compare_runs(tmp_path / "a", tmp_path / "b")
