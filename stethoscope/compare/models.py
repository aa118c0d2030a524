"""``st.compare(model_a, model_b, inputs)``: the first module whose output differs, and by how much.

Both models run the same inputs. Model A runs first and every module's inputs and outputs are kept
(:class:`~stethoscope.compare.store.ReferenceStore`: host memory up to a budget, then disk). Model B runs
second and each of its module calls is compared *as it happens* with A's matching call, which is then freed,
so memory stays bounded by A's activations at worst and by the budget in host RAM. Modules are matched

* by name (``named_modules()`` spelling, a ``mapping`` of B-name prefixes to A-name prefixes applied first)
  and call index (a module called twice is compared call by call), or
* by call order, when the trees differ (``match="order"``, or ``"auto"`` when fewer than 90 % of A's called
  modules have a namesake in B): the two sequences of finished calls are aligned on module class names
  (``difflib``), which costs one extra, uncompared forward of B.

Rows come in B's execution order (a module's row when it *finishes*: a child before its parent). The **first
divergence** is the first row whose output differs beyond the tolerance (:mod:`~stethoscope.compare.tolerance`);
the **origin** is the first row whose output differs while its inputs agree: where the difference is born.
A ``torch.compile``'d model is compared at its output only (its inner modules run inside compiled graphs,
and hooking them would change what is compiled).
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from stethoscope.compare.leaves import dims, input_leaves, shape_of, tensor_leaves
from stethoscope.compare.result import Comparison, GradDiff, ModuleDiff
from stethoscope.compare.store import DEFAULT_BUDGET, ReferenceStore
from stethoscope.compare.tolerance import DEFAULT_FACTOR, PairError, pair_error, worst
from stethoscope.errors import CompareError, StructureMismatchError
from stethoscope.hooks import HookSet, is_compiling, walk_modules

NAME_OVERLAP = 0.9  # "auto" matches by name when this share of A's called modules has a namesake in B


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod")


def _rename(name: str, mapping: Mapping[str, str]) -> str:
    """B's module name spelt as A's, by the longest matching prefix in ``mapping`` (B prefix -> A prefix)."""
    for src in sorted(mapping, key=len, reverse=True):
        if name == src or name.startswith(src + ".") or src == "":
            rest = name[len(src):].lstrip(".") if src else name
            dst = mapping[src]
            return f"{dst}.{rest}" if dst and rest else (dst or rest)
    return name


def _batches(inputs: Any) -> list[tuple[tuple, dict]]:
    """``inputs`` as a list of ``(args, kwargs)``: a dict is keyword arguments, a tensor or a tuple positional
    ones, and a list several batches, each compared in turn."""
    items = inputs if isinstance(inputs, list) else [inputs]
    if not items:
        raise CompareError("inputs is an empty list; pass a tensor, a tuple, a dict of keyword arguments, or a "
                           "list of those (one per batch)")
    out = []
    for item in items:
        if isinstance(item, Mapping):
            out.append(((), dict(item)))
        elif isinstance(item, tuple):
            out.append((item, {}))
        elif isinstance(item, torch.Tensor):
            out.append(((item,), {}))
        else:
            raise CompareError(f"cannot use an input of type {type(item).__name__}: pass a tensor, a tuple of "
                               "positional arguments, a dict of keyword arguments, or a list of those")
    return out


def _for_model(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The inputs on the model's device; floating inputs in its parameters' dtype (each model sees the same
    values at its own precision)."""
    p = next(iter(model.parameters()), None)
    if p is None:
        return args, kwargs

    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(device=p.device, dtype=p.dtype if x.is_floating_point() else None)
        if isinstance(x, tuple | list):
            return type(x)(move(v) for v in x)
        if isinstance(x, Mapping):
            return {k: move(v) for k, v in x.items()}
        return x

    return move(args), move(kwargs)


def default_loss(output: Any) -> torch.Tensor:
    """The loss of the optional backward: ``output.loss`` when the model computed one, else the mean square of
    the first floating output tensor (a loss every output has)."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss.reshape(())
    for _, t in tensor_leaves(output):
        if t.is_floating_point() and t.requires_grad:
            return t.float().pow(2).mean()
    raise CompareError("backward=True needs a loss: the output has no .loss and no floating tensor that requires "
                       "grad; pass loss_fn=")


class _CallHooks:
    """Pre/post hook builders that pair each call's entry with its exit: ``enter`` runs at the pre-hook (its
    result is kept on a per-module stack, so a module re-entered before it returns pairs correctly) and
    ``exit`` at the post-hook with the call's index among that module's finished calls."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.pending: dict[str, list] = {}  # name -> stack of what ``enter`` returned (re-entrant calls)

    def enter(self, name: str, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def exit(self, name: str, call: int, entered: Any, module: nn.Module, output: Any) -> None:
        raise NotImplementedError

    def pre(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not is_compiling():
                self.pending.setdefault(name, []).append(self.enter(name, args, kwargs))
        return hook

    def post(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if is_compiling():
                return
            call = self.count.get(name, 0)
            self.count[name] = call + 1
            stack = self.pending.get(name)
            self.exit(name, call, stack.pop() if stack else None, module, output)
        return hook


class _Recorder(_CallHooks):
    """Model A's side: every call's input and output leaves into the store, in finishing order."""

    def __init__(self, store: ReferenceStore):
        super().__init__()
        self.store = store
        self.calls: dict[tuple[str, int], dict] = {}  # (name, call) -> {"cls", "in": [...], "out": [...]}
        self.order: list[tuple[str, int]] = []

    def enter(self, name: str, args: tuple, kwargs: dict) -> list:
        return [(p, self.store.put(t)) for p, t in input_leaves(args, kwargs)]

    def exit(self, name: str, call: int, entered: Any, module: nn.Module, output: Any) -> None:
        outs = [(p, self.store.put(t), shape_of(t), dims(t)) for p, t in tensor_leaves(output)]
        self.calls[(name, call)] = {"cls": type(module).__name__, "in": entered or [], "out": outs}
        self.order.append((name, call))


class _Comparer(_CallHooks):
    """Model B's side: each call compared with A's matching call as it finishes; A's copies freed after."""

    def __init__(self, ref: _Recorder, key_of: Callable[[str, int], tuple[str, int] | None], factor: float,
                 progress: Callable[[], None]):
        super().__init__()
        self.ref, self.key_of, self.factor, self.advance = ref, key_of, factor, progress
        self.rows: list[ModuleDiff] = []
        self.unmatched: list[str] = []

    def enter(self, name: str, args: tuple, kwargs: dict) -> PairError | None:
        """The error of this call's inputs against A's (None when A has no matching call)."""
        call = self.count.get(name, 0)  # the index this call will get when it finishes
        key = self.key_of(name, call + len(self.pending.get(name, [])))
        if key is None or key not in self.ref.calls:
            return None
        stored = dict(self.ref.calls[key]["in"])
        errors = []
        for p, t in input_leaves(args, kwargs):
            if p in stored:
                a = self.ref.store.get(stored[p])
                if a.shape == t.shape:  # a shape change is reported where it is born, at an output
                    errors.append(pair_error(a, t, self.factor))
        return worst(errors)

    def exit(self, name: str, call: int, entered: Any, module: nn.Module, output: Any) -> None:
        key = self.key_of(name, call)
        if key is None or key not in self.ref.calls:
            self.unmatched.append(name if call == 0 else f"{name} (call {call})")
            return
        rec = self.ref.calls.pop(key)
        try:
            self.rows.append(self._row(name, call, key, rec, module, output, entered))
        finally:
            store = self.ref.store
            for _, blob in rec["in"]:
                store.release(blob)
            for _, blob, *_ in rec["out"]:
                store.release(blob)
            self.advance()

    def _row(self, name_b: str, call: int, key: tuple[str, int], rec: dict, module: nn.Module, output: Any,
             in_err: PairError | None) -> ModuleDiff:
        name_a = key[0]
        outs_b = list(tensor_leaves(output))
        paths_a = [p for p, *_ in rec["out"]]
        paths_b = [p for p, _ in outs_b]
        if paths_a != paths_b:
            shape_a = ", ".join(f"{p or 'output'} {s}" for p, _, s, _ in rec["out"]) or "no tensor"
            shape_b = ", ".join(f"{p or 'output'} {shape_of(t)}" for p, t in outs_b) or "no tensor"
            raise StructureMismatchError(name_a, f"[{shape_a}]", f"[{shape_b}]",
                                         f" (tensor leaves {paths_a} vs {paths_b})")
        errors: list[tuple[str, PairError]] = []
        dtype_a = dtype_b = shape = ""
        for (path, blob, s_a, d_a), (_, t) in zip(rec["out"], outs_b, strict=True):
            a = self.ref.store.get(blob)
            if a.shape != t.shape:
                where = f" (output {path!r})" if path else ""
                raise StructureMismatchError(name_a, s_a, shape_of(t), where)
            errors.append((path, pair_error(a, t, self.factor)))
            if not shape:
                shape, dtype_a, dtype_b = d_a, str(a.dtype)[6:], str(t.dtype)[6:]
        e = worst([x for _, x in errors])
        leaf = next((p for p, x in errors if x is e), "")
        inputs_differ = bool(in_err is not None and in_err.differs)
        return ModuleDiff(
            order=len(self.rows), name=name_a, name_b=name_b, cls=type(module).__name__, call=call, shape=shape,
            dtype_a=dtype_a, dtype_b=dtype_b, leaf=leaf, leaves=len(errors),
            rel=e.rel if e else 0.0, max_abs=e.max_abs if e else 0.0, max_rel=e.max_rel if e else 0.0,
            share=e.share if e else 0.0, tol=e.tol if e else 0.0, differs=bool(e and e.differs),
            input_rel=in_err.rel if in_err is not None else None, inputs_differ=inputs_differ,
        )


def _hook(hooks: HookSet, model: nn.Module, side: Any, only_root: bool) -> None:
    """Pre- and post-hooks (with keyword arguments) on every module, or on the root only."""
    hooks.on_modules(model, pre=lambda n, m: side.pre(n), post=lambda n, m: side.post(n),
                     names=[""] if only_root else None, with_kwargs=True, always_call=False)


def _call_sequence(model: nn.Module, args: tuple, kwargs: dict, only_root: bool, seed: int) -> list[tuple]:
    """``(name, call, class)`` of every finished module call of one uncompared forward (for order matching)."""
    seq: list[tuple[str, int, str]] = []
    count: dict[str, int] = {}

    def post(name: str) -> Callable:
        def hook(module: nn.Module, a: tuple, k: dict, out: Any) -> None:
            if not is_compiling():
                seq.append((name, count.setdefault(name, 0), type(module).__name__))
                count[name] += 1
        return hook

    with HookSet("compare.order") as hooks, torch.no_grad(), torch.random.fork_rng(devices=[]):
        hooks.on_modules(model, post=lambda n, m: post(n), names=[""] if only_root else None, with_kwargs=True)
        torch.manual_seed(seed)
        model(*args, **kwargs)
    return seq


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    from stethoscope.naming import clean_name

    return {clean_name(n): p.grad for n, p in model.named_parameters() if p.grad is not None}


@contextlib.contextmanager
def _own_grads(model: nn.Module):
    """Run a backward without touching the gradients the caller's model already holds."""
    params = list(model.parameters())
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g


def compare(
    model_a: nn.Module,
    model_b: nn.Module,
    inputs: Any,
    *,
    mapping: Mapping[str, str] | None = None,
    match: str = "auto",
    factor: float = DEFAULT_FACTOR,
    backward: bool = False,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    memory_budget: int = DEFAULT_BUDGET,
    seed: int = 0,
    progress: bool = True,
) -> Comparison:
    """Run both models on ``inputs`` and compare every module's output, in execution order.

    Args:
        model_a: the reference (e.g. the known-good checkpoint, the fp32 model, the upstream implementation).
        model_b: the model under suspicion.
        inputs: a dict of keyword arguments, a tensor, a tuple of positional arguments, or a list of those
            (several batches; each module's row keeps its worst batch).
        mapping: B-name prefix -> A-name prefix, for trees that name the same modules differently
            (``{"model.decoder": "transformer"}``).
        match: ``"name"``, ``"order"`` (align the call sequences on class names) or ``"auto"``.
        factor: the tolerance in units of the lower dtype's resolution (``rel > factor * eps`` differs).
        backward: also run one backward of ``loss_fn(output)`` in each model and compare parameter gradients.
        loss_fn: the loss for ``backward`` (default :func:`default_loss`).
        memory_budget: bytes of host memory for model A's recorded tensors before they spill to disk.
        seed: both forwards run under this RNG seed (dropout still differs in training mode: call ``.eval()``).
        progress: a progress bar on a terminal.

    Returns:
        A :class:`~stethoscope.compare.result.Comparison`: ``.first``, ``.origin``, ``.same``, ``.table()``,
        ``.plot(path)``.

    Raises:
        StructureMismatchError: two matched modules return different structures or shapes (names the module
            and both shapes).
        CompareError: unusable inputs or options.

    Example:
        >>> result = st.compare(model, model_bf16, {"input_ids": ids})  # doctest: +SKIP
        >>> result.first.name, result.first.rel  # doctest: +SKIP
    """
    if match not in ("auto", "name", "order"):
        raise CompareError(f"match must be 'auto', 'name' or 'order', got {match!r}")
    if factor <= 0:
        raise CompareError(f"factor must be > 0 (the tolerance in units of the dtype's resolution), got {factor}")
    mapping = dict(mapping or {})
    batches = _batches(inputs)
    only_root = _is_compiled(model_a) or _is_compiled(model_b)
    notes: list[str] = []
    if only_root:
        notes.append("a model is torch.compile'd: its inner modules run inside compiled graphs, so only the "
                      "models' outputs are compared (pass the uncompiled module for a per-module comparison)")
    for label, m in (("A", model_a), ("B", model_b)):
        if m.training and any(isinstance(x, nn.Dropout) and x.p > 0 for x in m.modules()):
            notes.append(f"model {label} is in training mode with dropout: call .eval() for a comparison that "
                         "shows only real differences")
    from stethoscope.compare.progress import progress_bar

    result_rows: list[list[ModuleDiff]] = []
    grads: list[GradDiff] = []
    used_match = "output" if only_root else match
    unmatched_a: set[str] = set()
    unmatched_b: set[str] = set()
    store = ReferenceStore(memory_budget)
    peak = 0
    try:
        with progress_bar(progress) as bar:
            for bi, (args, kwargs) in enumerate(batches):
                a_args, a_kwargs = _for_model(model_a, args, kwargs)
                b_args, b_kwargs = _for_model(model_b, args, kwargs)
                ref = _Recorder(store)
                bar.phase(f"batch {bi + 1}/{len(batches)}: model A forward", None)
                grad_ctx = contextlib.nullcontext() if backward else torch.no_grad()
                with HookSet("compare.a") as hooks, grad_ctx, torch.random.fork_rng(devices=[]), \
                        (_own_grads(model_a) if backward else contextlib.nullcontext()):
                    _hook(hooks, model_a, ref, only_root)
                    torch.manual_seed(seed)
                    out_a = model_a(*a_args, **a_kwargs)
                    hooks.remove()
                    grads_a = {}
                    if backward:
                        (loss_fn or default_loss)(out_a).backward()
                        grads_a = {n: store.put(g) for n, g in _grads(model_a).items()}
                    del out_a
                key_of, kind = _matcher(ref, model_b, b_args, b_kwargs, mapping, used_match, only_root, seed)
                if bi == 0 and not only_root:
                    used_match = kind
                bar.phase(f"batch {bi + 1}/{len(batches)}: model B forward, compared as it runs", len(ref.order))
                cmp = _Comparer(ref, key_of, factor, bar.advance)
                with HookSet("compare.b") as hooks, grad_ctx, torch.random.fork_rng(devices=[]), \
                        (_own_grads(model_b) if backward else contextlib.nullcontext()):
                    _hook(hooks, model_b, cmp, only_root)
                    torch.manual_seed(seed)
                    out_b = model_b(*b_args, **b_kwargs)
                    hooks.remove()
                    if backward:
                        (loss_fn or default_loss)(out_b).backward()
                        grads.extend(_compare_grads(store, grads_a, _grads(model_b), mapping, factor, bi))
                    del out_b
                peak = max(peak, store.peak)
                unmatched_a.update(n if c == 0 else f"{n} (call {c})" for n, c in ref.calls)
                unmatched_b.update(cmp.unmatched)
                for rec in ref.calls.values():
                    for _, blob in rec["in"]:
                        store.release(blob)
                    for _, blob, *_ in rec["out"]:
                        store.release(blob)
                result_rows.append(cmp.rows)
    finally:
        spilled = store.spilled
        store.close()
    if spilled:
        notes.append(f"{spilled} of model A's tensors went to a temporary folder (memory_budget "
                     f"{memory_budget / 2**20:.0f} MiB)")
    rows = _merge(result_rows)
    if not rows:
        raise CompareError("no module of model B could be matched with one of model A; pass mapping= (B-name "
                           "prefix -> A-name prefix) or match='order'")
    return Comparison(rows=rows, grads=_merge_grads(grads), match=used_match, factor=factor, notes=notes,
                      unmatched_a=sorted(unmatched_a), unmatched_b=sorted(unmatched_b), batches=len(batches),
                      peak_bytes=peak)


def _matcher(ref: _Recorder, model_b: nn.Module, args: tuple, kwargs: dict, mapping: dict, match: str,
             only_root: bool, seed: int) -> tuple[Callable[[str, int], tuple[str, int] | None], str]:
    """How B's calls find A's: by (mapped) name and call index, or by position in the aligned call order."""
    if only_root:
        return (lambda name, call: ("", call) if name == "" else None), "output"
    names_b = {_rename(n, mapping) for n, _ in walk_modules(model_b)}
    called_a = {n for n, _ in ref.order}
    overlap = len(called_a & names_b) / max(len(called_a), 1)
    if match == "name" or (match == "auto" and overlap >= NAME_OVERLAP):
        return (lambda name, call: (_rename(name, mapping), call)), "name"
    seq_b = _call_sequence(model_b, args, kwargs, only_root, seed)
    cls_a = [ref.calls[k]["cls"] for k in ref.order]
    cls_b = [c for _, _, c in seq_b]
    pairs: dict[tuple[str, int], tuple[str, int]] = {}
    for block in difflib.SequenceMatcher(None, cls_a, cls_b, autojunk=False).get_matching_blocks():
        for i in range(block.size):
            name, call, _ = seq_b[block.b + i]
            pairs[(name, call)] = ref.order[block.a + i]
    return (lambda name, call: pairs.get((name, call))), "order"


def _compare_grads(store: ReferenceStore, grads_a: dict[str, int], grads_b: dict[str, torch.Tensor],
                   mapping: dict, factor: float, batch: int) -> list[GradDiff]:
    out = []
    for name_b, g in grads_b.items():
        name_a = _rename(name_b, mapping)
        blob = grads_a.get(name_a)
        if blob is None:
            continue
        a = store.get(blob)
        if a.shape != g.shape:
            raise StructureMismatchError(name_a, shape_of(a), shape_of(g), " (parameter gradient)")
        e = pair_error(a, g, factor)
        out.append(GradDiff(name=name_a, shape=dims(a), rel=e.rel, max_abs=e.max_abs,
                            max_rel=e.max_rel, share=e.share, tol=e.tol, differs=e.differs))
        store.release(blob)
    return out


def _merge(per_batch: list[list[ModuleDiff]]) -> list[ModuleDiff]:
    """One row per module call, in the first batch's order, keeping each call's worst batch."""
    if len(per_batch) == 1:
        return per_batch[0]
    best: dict[tuple[str, int], ModuleDiff] = {}
    order: list[tuple[str, int]] = []
    for rows in per_batch:
        for r in rows:
            k = (r.name, r.call)
            if k not in best:
                order.append(k)
                best[k] = r
            elif r.severity() > best[k].severity():
                r.order = best[k].order
                best[k] = r
    return [best[k] for k in order]


def _merge_grads(grads: list[GradDiff]) -> list[GradDiff]:
    best: dict[str, GradDiff] = {}
    for g in grads:
        if g.name not in best or g.rel > best[g.name].rel:
            best[g.name] = g
    return list(best.values())
