"""The package's shape (docs/architecture.md), checked so it stays that way.

* nothing outside ``stethoscope/monitor/`` (tests included) touches a ``_`` attribute of a monitor;
* every hook is registered in ``stethoscope/hooks.py`` and every finding written by ``rules/producer.py``;
* no import cycle anywhere in the package (imports inside functions count);
* one removal test for every hook owner: the monitor with all its extensions on a Hugging Face model,
  ``Trace``, step-by-step attention and probe feature capture all leave the model as they found it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import stethoscope as st
from stethoscope.hooks import HookSet, walk_modules

from ._helpers import quiet_config

PKG = Path(st.__file__).parent
TESTS = Path(__file__).parents[1]
MONITOR_NAMES = {"mon", "mon2", "monitor", "m_on"}
HOOK_METHODS = {
    "register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
    "register_full_backward_pre_hook", "register_backward_hook", "register_step_pre_hook",
    "register_step_post_hook", "register_module_forward_hook", "register_module_forward_pre_hook",
}


def _sources(root: Path) -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(root.rglob("*.py"))]


def _is_monitor(node: ast.expr) -> bool:
    """``mon``, ``monitor``, ``x.monitor``, ``self._monitor()`` and the like."""
    if isinstance(node, ast.Name):
        return node.id in MONITOR_NAMES
    if isinstance(node, ast.Attribute):
        return node.attr in ("monitor", "_monitor")
    if isinstance(node, ast.Call):
        return _is_monitor(node.func)
    return False


def test_no_private_monitor_access_outside_the_monitor():
    offenders = []
    for root in (PKG, TESTS):
        for path, tree in _sources(root):
            if path.is_relative_to(PKG / "monitor") or path == Path(__file__):
                continue
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                        and not node.attr.startswith("__") and _is_monitor(node.value)):
                    offenders.append(f"{path.relative_to(PKG.parent)}:{node.lineno} .{node.attr}")
    assert offenders == []


def test_every_hook_is_registered_through_the_hook_set():
    offenders = []
    for path, tree in _sources(PKG):
        if path == PKG / "hooks.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in HOOK_METHODS:
                offenders.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.attr}")
    assert offenders == []


def _findings_receiver(node: ast.expr) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return "findings" in name or name == "log"


def test_every_finding_is_written_by_the_producer():
    offenders = []
    for path, tree in _sources(PKG):
        if path in (PKG / "rules" / "producer.py", PKG / "findings.py"):
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("report", "clear") and _findings_receiver(node.func.value)):
                offenders.append(f"{path.relative_to(PKG.parent)}:{node.lineno} .{node.func.attr}()")
    assert offenders == []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, tree: ast.Module, known: set[str]) -> set[str]:
    """Package modules ``path`` imports, anywhere in it except ``if TYPE_CHECKING:`` blocks."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != me:
                out.add(name)
    return out


def test_no_import_cycle_in_the_package():
    sources = _sources(PKG)
    known = {_module_name(p) for p, _ in sources}
    graph = {_module_name(p): _imports(p, t, known) for p, t in sources}
    # an import of a.b.c also runs a/__init__ and a/b/__init__: count the enclosing packages
    for deps in graph.values():
        for dep in list(deps):
            parts = dep.split(".")
            deps.update(".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i]) in known)
    for node in graph:
        graph[node].discard(node)
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1 and not node.startswith(dep + ".") and dep != "stethoscope":
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []


def test_the_monitor_class_stays_readable_in_one_sitting():
    tree = ast.parse((PKG / "monitor" / "core.py").read_text(encoding="utf-8"))
    [cls] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Monitor"]
    assert cls.end_lineno - cls.lineno < 450


# ---------------------------------------------------------------------- the hook set itself
def test_hook_set_removes_everything_even_when_one_removal_fails():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    calls = []
    with HookSet("test") as hooks:
        hooks.on_modules(model, post=lambda name, m: (lambda *a: calls.append(name)))

        class Broken:
            def remove(self):
                raise RuntimeError("cannot")

        hooks.add(Broken())
        hooks.patch(model, "forward_marker", 1)
        model(torch.zeros(1, 2))
        assert calls == ["0", "1", ""] and len(hooks) == 5 and model.forward_marker == 1
    assert all(not m._forward_hooks for m in model.modules()) and not hasattr(model, "forward_marker")
    hooks.remove()  # twice is fine


def test_hook_set_is_removed_when_the_block_raises():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError), HookSet() as hooks:
        hooks.forward_pre(model, lambda *a: None)
        raise ValueError("inside")
    assert not model._forward_pre_hooks


def test_walk_modules_filters_by_name_and_predicate():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    assert [n for n, _ in walk_modules(model)] == ["", "0", "1", "2"]
    assert [n for n, _ in walk_modules(model, names=["2", ""])] == ["", "2"]
    assert [n for n, _ in walk_modules(model, predicate=lambda n, m: isinstance(m, nn.Linear))] == ["0", "2"]


# ---------------------------------------------------------------------- one removal test for every owner
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
              "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
              "_backward_pre_hooks")


def _hook_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Everything a hook owner could leave behind, as comparable data."""
    state = {f"{name}.{attr}": len(getattr(m, attr, {})) for name, m in model.named_modules() for attr in HOOK_DICTS}
    state.update({f"{name}.keep_attn": getattr(m, "keep_attn", None) for name, m in model.named_modules()})
    state["opt.pre"] = len(opt._optimizer_step_pre_hooks)
    state["opt.post"] = len(opt._optimizer_step_post_hooks)
    state["opt.zero_grad"] = "zero_grad" in vars(opt)
    state["attn_implementation"] = model.config._attn_implementation
    return state


def test_every_owner_leaves_the_model_as_it_found_it(tiny_gpt2, run_dir, tmp_path):
    from stethoscope.attention.stepwise import step_by_step
    from stethoscope.probe.features import _Capture
    from stethoscope.trace import Trace

    model = tiny_gpt2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = _hook_state(model, opt)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))

    # the monitor with every built-in extension it builds by default: attention capture (Hugging Face),
    # memory (input shapes), flight recorder (module events), watchdog
    mon = st.Monitor(model, opt, run_dir=run_dir(), config=quiet_config())
    assert {e for e in ("attention", "memory", "recorder") if mon.extension(e) is not None} == {
        "attention", "memory", "recorder"}
    assert mon.hooks_attached > 2 * len(list(walk_modules(model)))
    for step in range(2):
        with mon.step(step):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    assert _hook_state(model, opt) != before
    mon.close()
    assert mon.hooks_attached == 0 and _hook_state(model, opt) == before

    with Trace(model) as trace:
        model(input_ids=ids)
    assert trace.events > 0 and _hook_state(model, opt) == before

    result = step_by_step(model, input_ids=ids[0, :6], show=False, heatmaps=False)
    assert result is not None and _hook_state(model, opt) == before

    with _Capture(model, {"h0": "transformer.h.0"}, "mean", 1) as cap:
        model(input_ids=ids)
    assert cap.pooled and _hook_state(model, opt) == before
