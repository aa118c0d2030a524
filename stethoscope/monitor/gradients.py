"""Gradients and update-to-weight ratios of a sampled step.

Gradients are read once per sampled step at the first of: ``after_backward()``, the optimizer's step
pre-hook, ``optimizer.zero_grad`` or the end of the step. So a step that a ``GradScaler`` skips (its grads
are non-finite and the optimizer never runs) is still read, and read unscaled: before the scaler unscales
them, they are multiplied by 1/scale on the device.

Gradient rows count an entry as zero only where it is exactly zero (the activation rows keep ``stats.eps``):
dead units, cut paths and frozen gradients give exact zeros, while small healthy gradients (the query and key
thirds of a fused attention projection at initialisation) do not (docs/findings.md, ``grad.zero_fraction``).

Update ratios compare a copy of parameters taken at the step pre-hook with the parameters at the post-hook:
``‖Δw‖`` exactly, as the step realised it (rounding to the parameter's dtype included). To bound the extra
memory, a sampled step copies at most ``stats.update_budget_mb`` per device (a parameter larger than that
alone), taking the selected parameters round-robin across sampled steps; ``‖w‖`` of every selected parameter
is read each sampled step without a copy. One device row per device: ``‖Δw‖`` of the measured ones, then
``‖w‖`` of all (``records.py`` marks the others ``measured=False``).

With a ``GradScaler`` handed to the monitor, every step's ``found_inf`` (the scaler's own device flag: it
skipped the optimizer step because a gradient was non-finite) is kept by reference, with no device work and
no sync; at the next sampled step the flags of every step since the previous sampled one and the scale after
this step's ``update()`` ride along as one ``amp`` row in that step's transfer (``StepRecord.amp``).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from stethoscope import stats
from stethoscope.collector import Entry, StepCollector
from stethoscope.distributed import sharded
from stethoscope.hooks import HookSet
from stethoscope.monitor.engine import StatsEngine, no_autocast
from stethoscope.stats import _IDX, RAW_WIDTH

Guard = Callable[..., Any]

# Past this many scaler steps between two sampled steps, the kept found_inf flags are folded into a count on
# the device (one small reduction): their order is lost, their number is not.
AMP_FOLD = 256


class GradientReader:
    """Reads the watched parameters' gradients and measures their updates; see the module docstring.

    Args:
        grad_params: ``(clean name, parameter)`` whose gradients are read (``stats.parameters``).
        update_params: those whose update ratio is measured (``stats.update_ratio``).
        scaler: the ``GradScaler`` in use, if any (held weakly).

    ``read_at_optimizer_step`` is False when a framework calls ``after_backward()`` itself from a hook that
    runs inside the optimizer's ``step()`` after its closure (Lightning): the pre-hook then only snapshots.
    """

    def __init__(self, grad_params: list[tuple[str, nn.Parameter]], update_params: list[tuple[str, nn.Parameter]],
                 engine: StatsEngine, collector: StepCollector, guard: Guard, scaler: Any = None):
        # sharded parameters (FSDP2 / FSDP1) are read apart, as full parameters (see "sharded parameters")
        self.grad_params, self.sharded_grads = sharded.split(grad_params)
        self.update_params, self.sharded_updates = sharded.split(update_params)
        self.scheduled = False  # the schedule picked this step: the same on every rank (collectives allowed)
        self._sharded_snapshot: list = []
        self.engine = engine
        self.collector = collector
        self.guard = guard
        self.read_at_optimizer_step = True
        self._optimizer_ref: Callable[[], Any] = lambda: None
        self._scaler_ref = weakref.ref(scaler) if scaler is not None else None
        self.active = False  # inside a sampled step
        self.read_done = False
        self.missing: list[str] = []
        self._marks: list = []  # per watched parameter: (weakref to its grad, version) at step start
        self._scaler_states: Any = None  # the GradScaler's per-optimizer states at step start
        # per device: (names of all selected parameters, indices of those copied this step, the copies, ‖w‖ of all)
        self._snapshot: list[tuple[torch.device, list[str], list[int], list[torch.Tensor], list]] = []
        self._cursor: dict[torch.device, int] = {}  # per device: the first parameter the next copy takes
        # the scaler's found_inf flag of every scaler step since the last sampled step (device tensors, kept
        # by reference), and those folded into a device count past AMP_FOLD
        self._amp_flags: list[torch.Tensor] = []
        self._amp_folded: torch.Tensor | None = None
        self._amp_folded_steps = 0
        self._amp_last: Callable[[], Any] = lambda: None  # the last flag seen (no update() between two steps)
        # the rows of this optimizer step's read, when it happened at the step pre-hook with every row in host
        # memory: (ids of the parameters read, their rows); lets others take the total norm without a re-read
        self._host_read: tuple[frozenset, list[torch.Tensor], list[int]] | None = None

    @property
    def scaler(self) -> Any:
        return self._scaler_ref() if self._scaler_ref is not None else None

    def attach_optimizer(self, hooks: HookSet, optimizer: torch.optim.Optimizer) -> None:
        """Step pre/post hooks, and ``optimizer.zero_grad`` wrapped to read the gradients it would clear."""
        self._optimizer_ref = weakref.ref(optimizer)
        hooks.step_pre(optimizer, self._optimizer_pre_hook)
        hooks.step_post(optimizer, self._optimizer_post_hook)
        if self.sharded_updates:
            hooks.step_pre(optimizer, self._sharded_pre_hook)
            hooks.step_post(optimizer, self._sharded_post_hook)
        original = optimizer.zero_grad  # bound method; the instance attribute goes on removal

        def zero_grad(*args: Any, **kwargs: Any) -> Any:
            # Only a zero_grad after this step's backward: one at the top of the loop would read last
            # step's gradients (or none) and hide the real ones from the optimizer pre-hook.
            if self.active and not self.read_done and self.changed():
                self.guard("zero_grad", self.read)
            return original(*args, **kwargs)

        hooks.patch(optimizer, "zero_grad", zero_grad)

    # ------------------------------------------------------------------ the step
    def begin_step(self, sampled: bool, scheduled: bool | None = None) -> None:
        self.active = sampled
        self.scheduled = sampled if scheduled is None else bool(scheduled and sampled)
        self._sharded_snapshot = []
        self.read_done = False
        self._marks = self._marks_now() if sampled else []
        scaler = self.scaler
        self._scaler_states = getattr(scaler, "_per_optimizer_states", None)
        self.missing = []
        self._snapshot = []
        self._host_read = None

    def end_step(self) -> list[str]:
        """Read now if nothing did yet; the names that had no gradient."""
        if self.active and not self.read_done:
            self.guard("reading gradients at the end of the step", self.read)
        if self._scaler_ref is not None:
            self.guard("reading the GradScaler's state", self._note_scaler, self.active)
        self.active = False
        return list(self.missing)

    def detach(self) -> None:
        self.grad_params = []
        self.update_params = []
        self.sharded_grads, self.sharded_updates, self._sharded_snapshot = [], [], []
        self._snapshot = []
        self._cursor = {}
        self._marks = []
        self._scaler_states = None
        self._scaler_ref = None
        self._amp_flags, self._amp_folded, self._amp_folded_steps = [], None, 0
        self._amp_last = lambda: None
        self._optimizer_ref = lambda: None
        self.active = False

    # ------------------------------------------------------------------ gradients
    def state_dict(self) -> dict:
        """Where each device's update-ratio round-robin stands, so a resumed run goes on measuring the
        parameters it had not reached instead of starting again at the first."""
        return {"update_cursor": {str(device): i for device, i in self._cursor.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._cursor = {torch.device(d): int(i) for d, i in state.get("update_cursor", {}).items()}

    def _inverse_scale(self) -> torch.Tensor | None:
        """1/scale when a GradScaler is in use and has not unscaled this optimizer's grads yet."""
        scaler = self.scaler
        if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
            return None
        opt = self._optimizer_ref()
        try:
            from torch.amp.grad_scaler import OptState

            states = scaler._per_optimizer_states
            if states is not self._scaler_states:
                return None  # scaler.update() ran in this step (it resets the states): already unscaled
            state = states.get(id(opt)) if opt is not None else None
            if state is not None and state["stage"] is not OptState.READY:
                return None  # already unscaled (or stepped)
            scale = scaler._scale
        except Exception:
            return None
        if scale is None:
            return None
        return scale.double().reciprocal().float()

    def _marks_now(self) -> list:
        """Which gradient tensor each watched parameter holds now, and its version (no host sync)."""
        return [None if (g := p.grad) is None else (weakref.ref(g), g._version) for p in self._mark_params()]

    def changed(self) -> bool:
        """True when a backward pass has written a gradient since the step began."""
        for p, mark in zip(self._mark_params(), self._marks, strict=False):
            g = p.grad
            if g is not None and (mark is None or mark[0]() is not g or mark[1] != g._version):
                return True
        return False

    def read(self) -> None:
        """Queue each watched gradient's statistics row (once per step)."""
        if self.read_done:
            return
        self.read_done = True
        inv = self._inverse_scale()
        # one by one as they come (a scaled copy lives for one row), except small ones, summarised stacked
        queued: list[tuple[str, int, torch.Tensor | None]] = []  # (name, elements, row or None: small)
        small: list[torch.Tensor] = []
        for name, p in self.grad_params:
            g = p.grad
            if g is None:
                self.missing.append(name)
                continue
            if g.is_sparse:
                g = g.coalesce().values()
            if inv is not None:
                g = g.float() * inv.to(g.device)
            if self.engine.stackable(g):
                small.append(g)
                queued.append((name, g.numel(), None))
                continue
            with no_autocast(g.device):
                row = self.engine.compute(g, False, None, eps=0.0)  # a gradient is zero only where exactly 0
            queued.append((name, g.numel(), row))
        small_rows = iter(self.engine.compute_small(small, eps=0.0))
        rows = []
        for name, count, row in queued:
            row = row if row is not None else next(small_rows)
            rows.append(row)
            self.collector.add(Entry("grad", name, "", 0, count), row)
        if inv is None and not self.sharded_grads and all(stats.reads_host(r.device) for r in rows):
            read = {name for name, _, _ in queued}
            ids = frozenset(id(p) for name, p in self.grad_params if name in read)
            self._host_read = (ids, rows, [count for _, count, _ in queued])
        if self.sharded_grads and self.scheduled:
            self._read_sharded(inv)

    def host_grad_norm(self, params: list[torch.Tensor]) -> float | None:
        """Total L2 norm of the gradients of ``params`` from this optimizer step's rows, or None.

        Only when the monitor read exactly those parameters at this step's pre-hook, unscaled, with every row
        in host memory (CPU: no transfer); NaN when an entry was not finite. Otherwise None: compute it.
        """
        if self._host_read is None:
            return None
        ids, rows, counts = self._host_read
        if frozenset(id(p) for p in params) != ids or not rows:
            return None
        raw = torch.stack([r[:RAW_WIDTH] for r in rows]).to(torch.float64).numpy()  # (P, RAW_WIDTH)
        if raw[:, _IDX["nonfinite"]].any():
            return math.nan
        n = np.asarray(counts, dtype=np.float64)
        some = n > 0  # an empty gradient adds nothing (its row holds NaN, not a non-finite entry)
        sums, dev = raw[some, _IDX["sum"]], raw[some, _IDX["dev_norm"]]  # per parameter: Σg, ‖g - mean‖
        squares = dev * dev + sums * sums / n[some]  # Σg² = ‖g - mean‖² + (Σg)²/n
        return math.sqrt(max(float(squares.sum()), 0.0))

    # ------------------------------------------------------------------ the GradScaler
    def _found_inf(self, scaler: Any) -> torch.Tensor | None:
        """This step's found_inf flag (a float32 device scalar, > 0 when the scaler skips the optimizer step),
        or None when the scaler did not unscale this step (no ``step`` / ``unscale_``: accumulation)."""
        states = self._scaler_states  # this step's states: scaler.update() replaces the scaler's dict
        if not isinstance(states, dict) or not states:
            return None
        opt = self._optimizer_ref()
        state = states.get(id(opt)) if opt is not None else None
        chosen = [state] if state is not None else list(states.values())
        flags = [t for st in chosen for t in (st.get("found_inf_per_device") or {}).values()]
        if not flags or any(t is self._amp_last() for t in flags):
            return None
        self._amp_last = weakref.ref(flags[0])
        if len(flags) == 1:
            return flags[0]
        device = flags[0].device  # a model on several devices: one flag per device, any of them counts
        return torch.stack([t.to(device, non_blocking=True).reshape(()) for t in flags]).amax()

    def _note_scaler(self, sampled: bool) -> None:
        """Keep this step's found_inf flag; on a sampled step queue the ``amp`` row (no sync either way)."""
        scaler = self.scaler
        if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
            return
        flag = self._found_inf(scaler)
        if flag is not None:
            self._amp_flags.append(flag)
            if len(self._amp_flags) >= AMP_FOLD:
                self._fold_flags()
        scale = getattr(scaler, "_scale", None)
        if not sampled or not isinstance(scale, torch.Tensor):
            return
        device = scale.device
        folded = (self._amp_folded.to(device, non_blocking=True).reshape(1) if self._amp_folded is not None
                  else torch.zeros(1, dtype=torch.float32, device=device))
        parts = [scale.detach().to(torch.float32).reshape(1).clone(), folded]  # the scale after update()
        if self._amp_flags:
            parts.append(torch.stack([f.to(device, non_blocking=True).reshape(()) for f in self._amp_flags])
                         .gt(0).to(torch.float32))
        entry = Entry("amp", "scaler", "", 0, 0, extra={
            "flags": len(self._amp_flags), "folded": self._amp_folded_steps, "this_step": flag is not None})
        self.collector.add(entry, *parts)
        self._amp_flags, self._amp_folded, self._amp_folded_steps = [], None, 0

    def _fold_flags(self) -> None:
        device = self._amp_flags[0].device
        count = torch.stack([f.to(device, non_blocking=True).reshape(()) for f in self._amp_flags]).gt(0).sum()
        count = count.to(torch.float32)
        self._amp_folded = count if self._amp_folded is None else self._amp_folded.to(device) + count
        self._amp_folded_steps += len(self._amp_flags)
        self._amp_flags = []

    # ------------------------------------------------------------------ updates
    def _optimizer_pre_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self.active:
            return
        self.guard("optimizer step pre-hook", self._before_optimizer_step)

    def _before_optimizer_step(self) -> None:
        # A closure optimizer (LBFGS; Lightning in fp32) enters step() before its forward and backward run:
        # the gradients are read only once a backward has written them (else after_backward or the step's end)
        # only rows read here are what this step applies (an earlier read may precede clipping)
        self._host_read = None
        if self.read_at_optimizer_step and self.changed():
            self.read()
        self._snapshot = []
        if not self.update_params:
            return
        groups: dict[torch.device, tuple[list[str], list[torch.Tensor]]] = {}
        for name, p in self.update_params:
            names, params = groups.setdefault(p.device, ([], []))
            names.append(name)
            params.append(p.detach())
        for device, (names, params) in groups.items():
            chosen = self._choose(device, params)
            if stats.reads_host(device):  # ‖w‖ of a copied parameter from its copy, while still in cache
                copies, weight_norms = [], [None] * len(params)
                for i in chosen:
                    copies.append(params[i].clone())
                    weight_norms[i] = torch.linalg.vector_norm(copies[-1])
                rest = [i for i in range(len(params)) if weight_norms[i] is None]
                for i, norm in zip(rest, torch._foreach_norm([params[i] for i in rest]) if rest else [],
                                   strict=True):
                    weight_norms[i] = norm
            else:  # one fused launch for every norm on an accelerator
                weight_norms = torch._foreach_norm(params)  # P device scalars: ‖w‖ before the step, no copy
                copies = [params[i].clone() for i in chosen]  # at most the budget (or one larger parameter)
            self._snapshot.append((device, names, chosen, copies, weight_norms))

    def _choose(self, device: torch.device, params: list[torch.Tensor]) -> list[int]:
        """Indices of the parameters to copy this step: from the device's cursor on, while within the budget.

        Strict round-robin (the first one that does not fit ends the turn), so every parameter is measured
        once every ``ceil(total bytes / budget)`` sampled steps or so; at least one per step.
        """
        budget_mb = self.engine.cfg.update_budget_mb
        n = len(params)
        if budget_mb is None:
            return list(range(n))
        limit = budget_mb * 2**20
        start = self._cursor.get(device, 0) % n
        chosen: list[int] = []
        used = 0
        for k in range(n):
            i = (start + k) % n
            size = params[i].numel() * params[i].element_size()
            if chosen and used + size > limit:
                break
            chosen.append(i)
            used += size
        return chosen

    def _optimizer_post_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._snapshot:
            return
        self.guard("optimizer step post-hook", self._after_optimizer_step)

    def _after_optimizer_step(self) -> None:
        by_name = dict(self.update_params)
        for device, names, chosen, copies, weight_norms in self._snapshot:
            measured = [names[i] for i in chosen]
            current = [by_name[n].detach() for n in measured]
            # in place in the copies, which are dropped next (torch.dist would allocate a difference per tensor):
            # copies = w_before - w_after = -Δw. In host memory each difference's norm is read right after it is
            # formed, while it is in cache (a second sweep over all of them comes back from memory: 7.6 against
            # 6.4 ms on the reference GPT-2); on an accelerator one fused launch each.
            if stats.reads_host(device):
                delta_norms = []
                for copy, now in zip(copies, current, strict=True):
                    delta_norms.append(torch.linalg.vector_norm(copy.sub_(now)))
            else:
                torch._foreach_sub_(copies, current)
                delta_norms = torch._foreach_norm(copies)
            row = torch.cat([
                torch.stack([d.float() for d in delta_norms]),  # (m,) ‖Δw‖ of the measured parameters
                torch.stack([w.float() for w in weight_norms]),  # (P,) ‖w‖ of every selected parameter
            ])
            self.collector.add(Entry("update", "", "", 0, len(names),
                                     extra={"names": names, "measured": measured}), row)
            self._cursor[device] = (chosen[-1] + 1) % len(names)  # the measurement happened: next turn
        self._snapshot = []

    # ------------------------------------------------------------------ sharded parameters (FSDP2 / FSDP1)
    # Rows of the full parameter from this rank's part and one small all-reduce per batch of parameters
    # (stethoscope/distributed/sharded.py). Collectives: only on scheduled steps, which every rank samples;
    # on a step only an anomaly made sampled, sharded parameters are not read (docs/distributed.md).
    def _mark_params(self) -> list[torch.Tensor]:
        """The tensors whose ``.grad`` tells whether a backward ran: plain parameters, then sharded ones."""
        seen: dict[int, torch.Tensor] = {}
        for sp in self.sharded_grads:
            seen.setdefault(id(sp.param), sp.param)
        return [p for _, p in self.grad_params] + list(seen.values())

    def _read_sharded(self, inv: torch.Tensor | None) -> None:
        for groups, parts in sharded.batches(self.sharded_grads):
            # every rank enters the collective, with or without gradients, so none can wait for another
            locals_ = [sp.local_grad() for sp in parts]
            device = sharded.local_device(parts[0])
            rows, counts = [], []
            for g in locals_:
                if g is None:  # no gradient in this rank's part: it adds nothing (missing, see below)
                    g = torch.empty(0, device=device)
                if inv is not None:
                    g = g.float() * inv.to(g.device)
                with no_autocast(g.device):
                    rows.append(self.engine.compute(g, False, None, eps=0.0))  # (RAW_WIDTH,)
                counts.append(g.numel())
            full = sharded.combine_rows(torch.stack(rows), counts, groups)  # (K, RAW_WIDTH) of the full tensors
            for k, (sp, g) in enumerate(zip(parts, locals_, strict=True)):
                if g is None:
                    self.missing.append(sp.name)
                else:
                    self.collector.add(Entry("grad", sp.name, "", 0, sp.numel), full[k])

    def _sharded_pre_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.active and self.scheduled:
            self.guard("optimizer step pre-hook (sharded)", self._before_sharded_step)

    def _before_sharded_step(self) -> None:
        """Copy this rank's part of each sharded parameter (1/world of it) and its squared norm."""
        self._sharded_snapshot = []
        for groups, parts in sharded.batches(self.sharded_updates):
            locals_ = [sp.local(sp.param.detach()) for sp in parts]
            copies = [t.clone() for t in locals_]
            w2 = torch.stack([t.float().pow(2).sum() for t in locals_])  # (K,) ‖w_part‖²
            self._sharded_snapshot.append((groups, parts, copies, w2))

    def _sharded_post_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._sharded_snapshot:
            self.guard("optimizer step post-hook (sharded)", self._after_sharded_step)

    def _after_sharded_step(self) -> None:
        for groups, parts, copies, w2 in self._sharded_snapshot:
            current = [sp.local(sp.param.detach()) for sp in parts]
            d2 = torch.stack([(c.float() - t.float()).pow(2).sum() for c, t in zip(copies, current, strict=True)])
            norms = sharded.combine_norms(torch.stack([d2, w2], dim=1), groups)  # (K, 2): ‖Δw‖, ‖w‖
            names = [sp.name for sp in parts]
            row = torch.cat([norms[:, 0], norms[:, 1]])  # (2K,): ‖Δw‖ then ‖w‖ for each parameter
            self.collector.add(Entry("update", "", "", 0, len(names), extra={"names": names, "measured": names}),
                               row)
        self._sharded_snapshot = []
