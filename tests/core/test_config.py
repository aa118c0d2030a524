"""Configuration (issue 2, item 8): sources, strict keys with did-you-mean, the kill switch, stop_on."""

from __future__ import annotations

import pytest
import torch

import stethoscope as st
import stethoscope.rules

from ._helpers import batch, quiet_config, train


def test_yaml_file_dict_and_config_object_agree(tmp_path):
    path = tmp_path / "stethoscope.yaml"
    path.write_text(
        "sampling:\n  every: 5\n  warmup_steps: 2\nstats:\n  modules: ['*.attn.*', 'lm_head']\n"
        "thresholds:\n  - {pattern: '*.attn.*', rule: grad.zero_fraction, warning: 0.2}\n"
        "stop_on: critical\n"
    )
    from_file = st.load_config(path)
    from_str_path = st.load_config(str(path))
    from_dict = st.load_config(
        {
            "sampling": {"every": 5, "warmup_steps": 2},
            "stats": {"modules": ["*.attn.*", "lm_head"]},
            "thresholds": [{"pattern": "*.attn.*", "rule": "grad.zero_fraction", "warning": 0.2}],
            "stop_on": "critical",
        }
    )
    from_obj = st.Config(
        sampling={"every": 5, "warmup_steps": 2},
        stats={"modules": ["*.attn.*", "lm_head"]},
        thresholds=[{"pattern": "*.attn.*", "rule": "grad.zero_fraction", "warning": 0.2}],
        stop_on="critical",
    )
    assert from_file == from_str_path == from_dict == from_obj
    assert from_file.sampling.every == 5 and from_file.sampling.after_anomaly == 20  # defaults kept
    assert st.load_config(from_obj) is from_obj
    assert st.load_config(None) == st.Config()


def test_monitor_takes_each_config_source(tiny_mlp, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sampling: {every: 7}\n")
    for i, cfg in enumerate([path, str(path), {"sampling": {"every": 7}}, st.Config(sampling={"every": 7})]):
        mon = st.Monitor(tiny_mlp, run_dir=tmp_path / f"run{i}", config=cfg)
        assert mon.config.sampling.every == 7
        mon.close()
        assert st.load_run(tmp_path / f"run{i}").meta["config"]["sampling"]["every"] == 7


def test_empty_yaml_file_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert st.load_config(path) == st.Config()


def test_unknown_nested_key_names_it_and_suggests():
    with pytest.raises(st.ConfigError) as err:
        st.load_config({"sampling": {"evry": 5}})
    msg = str(err.value)
    assert "sampling.evry" in msg and "did you mean 'every'" in msg
    assert "the config dict" in msg


def test_unknown_top_level_key():
    with pytest.raises(st.ConfigError) as err:
        st.load_config({"samplin": {}})
    assert "samplin" in str(err.value) and "did you mean 'sampling'" in str(err.value)


def test_unknown_key_without_a_close_match_lists_valid_keys():
    with pytest.raises(st.ConfigError, match=r"valid keys here: .*every"):
        st.load_config({"sampling": {"zzzzzz": 1}})


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("stats:\n  epz: 1.0e-6\n")
    with pytest.raises(st.ConfigError) as err:
        st.load_config(path)
    assert "stats.epz" in str(err.value) and "did you mean 'eps'" in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"sampling": {"every": "often"}}, "sampling.every"),
        ({"sampling": {"every": 0}}, "sampling.every"),
        ({"stats": {"eps": -1}}, "stats.eps"),
        ({"stop_on": "warning"}, "stop_on"),
        ({"sampling": 5}, "sampling"),
        ({"thresholds": [{"pattern": "*", "rule": "x", "warnin": 0.1}]}, "thresholds.0.warnin"),
    ],
)
def test_wrong_types_and_values(data, key):
    with pytest.raises(st.ConfigError) as err:
        st.load_config(data)
    assert repr(key) in str(err.value) or key in str(err.value)


def test_a_config_that_is_not_a_mapping():
    for bad in ([1, 2], 42):
        with pytest.raises(st.ConfigError, match="path to a YAML file, a dict"):
            st.load_config(bad)  # type: ignore[arg-type]


def test_a_file_that_is_not_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("sampling:\n  every: 5\nkey: [unclosed\n")
    with pytest.raises(st.ConfigError) as err:
        st.load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "not valid YAML" in msg
    assert "line 3" in msg or "line 4" in msg  # where the parser noticed the unclosed bracket


def test_a_yaml_file_holding_a_list(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(st.ConfigError, match="mapping"):
        st.load_config(path)


def test_a_missing_file(tmp_path):
    with pytest.raises(st.ConfigError, match="does not exist"):
        st.load_config(tmp_path / "nope.yaml")
    with pytest.raises(st.ConfigError, match="does not exist"):
        st.Monitor(torch.nn.Linear(2, 2), run_dir=tmp_path / "run", config=str(tmp_path / "nope.yaml"))
    assert not (tmp_path / "run").exists()  # nothing created for a bad config


def test_config_error_is_a_value_error():
    assert issubclass(st.ConfigError, ValueError) and issubclass(st.ConfigError, st.StethoscopeError)


def test_config_assignment_is_validated():
    cfg = st.Config()
    with pytest.raises(Exception, match="every"):
        cfg.sampling.every = 0


# ---------------------------------------------------------------- STETHOSCOPE_DISABLE
@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_disable_env_makes_everything_a_no_op(tiny_mlp, tmp_path, monkeypatch, value):
    monkeypatch.setenv("STETHOSCOPE_DISABLE", value)
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    path = tmp_path / "run"
    mon = st.Monitor(tiny_mlp, opt, run_dir=path, config={"sampling": {"evry": 1}})  # not even validated
    assert mon.disabled and mon.run_dir is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_mlp.modules())
    assert not opt._optimizer_step_pre_hooks and "zero_grad" not in vars(opt)
    with mon:
        for step in range(3):
            x, y = batch(step)
            with mon.step(step):
                with mon.step(step + 100):  # not even a usage error
                    pass
                (tiny_mlp(x) - y).pow(2).mean().backward()
                mon.after_backward()
                opt.step()
                opt.zero_grad()
            mon.log(loss="not checked either")
            mon.epoch(step)
            with mon.pause():
                pass
        assert mon.state_dict() == {}
        mon.load_state_dict({"last_step": 3})
    mon.close()
    mon.close()
    with mon.step(10):  # after close: still a no-op
        pass
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_disable_env_zero_means_enabled(tiny_mlp, tmp_path, monkeypatch):
    monkeypatch.setenv("STETHOSCOPE_DISABLE", "0")
    mon = st.Monitor(tiny_mlp, run_dir=tmp_path / "run")
    assert not mon.disabled
    mon.close()


# ---------------------------------------------------------------- stop_on: critical
class CriticalAt:
    """A custom rule (the interface the monitor drives) that reports a critical finding at one step."""

    name = "test.critical_at"

    def __init__(self, run, step):
        self.run, self.step, self.calls = run, step, []

    def observe(self, record):
        self.calls.append(("observe", record.step))
        if record.step == self.step:
            self.run.findings.report(
                "test.critical", "0", "critical", 1.0, 0.5, "it broke", "fix it", record.step
            )

    def finish(self, step):
        self.calls.append(("finish", step))

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def detach(self):
        self.calls.append(("detach", None))


def _with_rule(monkeypatch, step):
    """The built-in rules plus a :class:`CriticalAt` at ``step``, for every monitor built from now on."""
    built = []
    real = stethoscope.rules.default_rules

    def rules(run):
        rule = CriticalAt(run, step)
        built.append(rule)
        return [*real(run), rule]

    monkeypatch.setattr(stethoscope.rules, "default_rules", rules)
    return built


def test_stop_on_critical_raises_a_typed_error(tiny_mlp, run_dir, monkeypatch):
    path = run_dir()
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    built = _with_rule(monkeypatch, 2)
    mon = st.Monitor(tiny_mlp, opt, run_dir=path, config=quiet_config(stop_on="critical"))
    [rule] = built
    with pytest.raises(st.CriticalFindingError) as err, mon:
        train(mon, tiny_mlp, opt, range(10))
    assert err.value.finding["code"] == "test.critical" and err.value.finding["step"] == 2
    assert "test.critical" in str(err.value) and "fix it" in str(err.value)
    # raised at the flush of step 2, i.e. when step 3 began; the monitor is closed and unhooked
    assert ("observe", 3) not in rule.calls and ("detach", None) in rule.calls
    assert mon.closed and all(not m._forward_hooks for m in tiny_mlp.modules())
    run = st.load_run(path)
    # the run ended on an exception (the one stop_on raised): crashed, with that error named
    assert run.status == "crashed" and run.meta["error"].startswith("CriticalFindingError")
    assert run.verdict["status"] == "critical"


def test_without_stop_on_a_critical_finding_does_not_raise(tiny_mlp, run_dir, monkeypatch):
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    _with_rule(monkeypatch, 1)
    mon = st.Monitor(tiny_mlp, opt, run_dir=run_dir(), config=quiet_config())
    train(mon, tiny_mlp, opt, range(4))
    mon.close()
    assert mon.findings.verdict()["status"] == "critical"


def test_stop_on_critical_raised_at_close(tiny_mlp, run_dir, monkeypatch):
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    _with_rule(monkeypatch, 3)
    mon = st.Monitor(tiny_mlp, opt, run_dir=run_dir(), config=quiet_config(stop_on="critical"))
    train(mon, tiny_mlp, opt, range(4))  # step 3 is flushed by close()
    with pytest.raises(st.CriticalFindingError):
        mon.close()
    assert mon.closed and all(not m._forward_hooks for m in tiny_mlp.modules())
