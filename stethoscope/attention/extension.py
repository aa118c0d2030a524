"""The monitor's attention extension: capture on sampled steps, per-head metrics, invariant findings.

Built automatically by every :class:`~stethoscope.monitor.Monitor` (see :mod:`stethoscope.extensions`);
``attention.capture: off``, or a model without a recognisable attention, builds nothing. Per sampled step:

1. each attention call is shown to :meth:`AttentionExtension._on_call` (through the Hugging Face wrapper or a
   module hook); the per-head statistics row is computed on the device and queued on the monitor's step
   collector (kind ``attn``), so it reaches the host in the step's one transfer;
2. when the step's record is flushed, :meth:`observe` merges the calls of each module, writes one
   ``kind: "attn"`` metrics row per module and head, and runs the attention rules.

``mon.extension("attention")`` returns it; ``.methods`` says how each module's probabilities were obtained.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any

import torch
from torch import nn

from stethoscope.attention import capture as cap
from stethoscope.attention.blocked import blocked_statistics, max_logits, release_cached_tiles
from stethoscope.attention.checks import (
    COLUMNS,
    TAIL,
    WIDTH,
    head_statistics,
    merge_rows,
    pick_sequences,
    select_sequences,
    summarize,
)
from stethoscope.attention.rules import RULES, LogitGrowth, ModuleAttention, RowSum, Sink
from stethoscope.collector import Entry
from stethoscope.extensions import Extension
from stethoscope.hooks import is_compiling
from stethoscope.naming import clean_name, make_filter, patterns
from stethoscope.rundir import SCHEMA_VERSION

_METRIC_KEYS = (
    "entropy", "entropy_norm", "sink_share", "sink_token", "one_hot_fraction", "row_sum_error", "causal_leak",
    "padding_mass", "max_logit", "rows", "nonfinite_rows",
)


def extension(run: Any) -> AttentionExtension | None:
    cfg = run.config.attention
    if cfg.capture == "off":
        return None
    model = run.model
    if model is None:
        return None
    ext = AttentionExtension(run, model)
    # kept, without hooks, when it found attention it cannot capture: monitor.unobserved reports it from here
    return ext if ext.watching or ext.not_captured else None


class AttentionExtension(Extension):
    """Attention capture for one monitor. See the module docstring for the flow.

    Attributes:
        mode: the configured ``attention.capture``.
        methods: module name -> how its probabilities were obtained on the last sampled step
            (``recompute``, ``returned``, ``eager (re-run without dropout)``, ``module``).
        implementations: Hugging Face implementation name -> what was done with it.
        tokenizer: optional; set it (``mon.extension("attention").tokenizer = tok``) to name sink tokens.
    """

    name = "attention"

    def __init__(self, run: Any, model: nn.Module):
        self._run = run
        cfg = run.config.attention
        self.mode = cfg.capture
        self.methods: dict[str, str] = {}
        self.implementations: dict[str, str] = {}
        self.tokenizer: Any = None
        self._hooks = run.hooks("attention")
        self._keep: list[tuple[weakref.ref, bool]] = []  # modules with keep_attn, and the user's own setting
        self._hf: cap.HFCapture | None = None
        self._sampled = False
        self._padding: torch.Tensor | None = None  # (B, T) True at padding, from the model's attention_mask
        self._input_ids: torch.Tensor | None = None
        self._causal: dict[str, bool] = {}
        self._heads: dict[str, int] = {}

        names: dict[nn.Module, str] = {}
        for raw, module in model.named_modules():
            names.setdefault(module, clean_name(raw))
        if self.mode in ("auto", "eager", "recompute") and cap.is_hf_model(model):
            self._hf = cap.HFCapture(model, names, eager=self.mode == "eager")
            self.implementations = dict(self._hf.implementations)
            if self._hf.active:
                self._hf.listeners.append(self._on_call)
                self._hooks.add(self._hf)  # the patched attention functions go back with the hooks
            else:
                self._hf.remove()
                self._hf = None
            # the input's padding and token ids, from the transformers models' own forward
            from transformers import PreTrainedModel

            for module in names:
                if isinstance(module, PreTrainedModel):
                    self._hooks.forward_pre(module, self._inputs_hook, with_kwargs=True)
        listed = make_filter(patterns(cfg.modules))
        module_hooks = 0
        for module, name in names.items():
            if cap.keeps_weights(module):
                self._keep.append((weakref.ref(module), bool(module.keep_attn)))
                self._hooks.forward(module, self._make_module_hook(name, kept=True))
                module_hooks += 1
            elif (isinstance(module, nn.MultiheadAttention) or (name and listed(name))) and \
                    not cap._looks_like_hf_attention(module):
                self._hooks.forward(module, self._make_module_hook(name, kept=False))
                module_hooks += 1
        self.watching = self._hf is not None or module_hooks > 0
        self._rules = []
        if not self.watching:
            self.detach()
            return
        self._rules = self._build_rules(run, cfg)

    @property
    def not_captured(self) -> dict[str, str]:
        """Implementation name -> why its attention is not captured (``paged|eager``: no q and k to read)."""
        return {k: v for k, v in self.implementations.items() if v.startswith("not captured")}

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _build_rules(run: Any, cfg: Any) -> list:
        ctx = run.rule_context
        section = getattr(run.config, "rules", None)
        enabled = make_filter(patterns(getattr(section, "enabled", "*")))
        disabled = make_filter(patterns(getattr(section, "disabled", "")))
        rules = []
        for cls in RULES:
            if not enabled(cls.code) or disabled(cls.code):
                continue
            if cls is RowSum:
                rules.append(RowSum(ctx, cfg.row_sum_tol))
            elif cls is Sink:
                rules.append(Sink(ctx, cfg.sink_share))
            elif cls is LogitGrowth:
                rules.append(LogitGrowth(ctx, cfg.logit_window, cfg.logit_growth))
            else:
                rules.append(cls(ctx))
        return rules

    def _inputs_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._run.sampling or is_compiling():
            return None
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self._padding = mask.detach() == 0
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
            self._input_ids = ids.detach()
        return None

    def _make_module_hook(self, name: str, kept: bool):
        ref = weakref.ref(self)

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            ext = ref()
            if ext is None or not ext._sampled or is_compiling():
                return None
            run = ext._run
            if not run.sampling:
                return None
            if kept:
                weights = getattr(module, "last_attn", None)
                if not isinstance(weights, torch.Tensor):
                    return None
                if not ext._user_keeps(module):
                    module.last_attn = None  # ours to drop: the user did not ask to keep it
            else:
                weights = cap.returned_weights(output)
                if weights is None:
                    return None
            call = cap.AttentionCall(name=name, module=module, weights=weights, causal=cap.module_causal(module),
                                     implementation="module")
            run.guard(f"attention capture of {name or '<model>'}", ext._measure, call)
            return None

        return hook

    def _user_keeps(self, module: nn.Module) -> bool:
        return any(r() is module and keep for r, keep in self._keep)

    # ------------------------------------------------------------------ the step
    def begin_step(self, step: int, sampled: bool) -> None:
        self._sampled = sampled
        self._padding = None
        self._input_ids = None
        for ref, user_keep in self._keep:
            module = ref()
            if module is not None:
                module.keep_attn = user_keep or sampled

    def end_step(self, step: int, failed: BaseException | None) -> None:
        self._sampled = False
        self._padding = None
        self._input_ids = None
        for ref, user_keep in self._keep:
            module = ref()
            if module is not None:
                module.keep_attn = user_keep

    def _on_call(self, call: cap.AttentionCall) -> None:
        if not self._run.sampling:
            return
        self._run.guard(f"attention capture of {call.name or '<model>'}", self._measure, call)

    def _measure(self, call: cap.AttentionCall) -> None:
        """Probabilities by the configured method, then the per-head row onto the step's collector."""
        probs, method = self._probabilities(call)
        if probs is None and call.query is None:
            return
        padding, ids = self._padding, self._input_ids
        batch = (probs if probs is not None else call.query).shape[0]
        index = pick_sequences(batch, self._run.config.attention.max_sequences, padding)
        if index is not None:  # a bounded share of the batch: the cost stays flat as batches grow
            call, probs, padding, ids = select_sequences(call, probs, index, padding, ids)
        cfg = self._run.config.attention
        if probs is None:  # from queries and keys, one tile at a time: no (Tq, Tk) matrix per head
            row = blocked_statistics(call, padding, ids, cfg.block_queries, cfg.block_keys)
        else:
            row = head_statistics(call, probs, padding, ids)
            if call.query is not None and call.key is not None:  # returned weights: the logits from q and k
                heads = (row.numel() - TAIL) // WIDTH
                block = row[: heads * WIDTH].reshape(heads, WIDTH)  # a view: filled in place
                block[:, COLUMNS.index("max_logit")] = max_logits(call, padding, cfg.block_queries, cfg.block_keys)
        heads = (row.numel() - TAIL) // WIDTH
        self.methods[call.name] = method
        self._causal[call.name] = call.causal
        self._heads[call.name] = heads
        self._run.queue(
            Entry("attn", call.name, "", 0, heads, extra={"heads": heads, "method": method, "causal": call.causal}),
            row,
        )

    def _probabilities(self, call: cap.AttentionCall) -> tuple[torch.Tensor | None, str]:
        if call.implementation == "module":
            return call.weights, "module"
        if self.mode == "recompute" or call.weights is None:
            if self.mode == "eager" and call.rerun is not None:
                again = call.rerun()
                if again is not None:
                    return again, "returned (re-run without dropout)"
            return None, "recompute"
        if call.weights_pre_dropout:
            return call.weights, "returned"
        if call.rerun is not None:  # the returned weights are after dropout: ask the same function again
            again = call.rerun()
            if again is not None:
                return again, "returned (re-run without dropout)"
        return None, "recompute"

    # ------------------------------------------------------------------ the record
    def observe(self, record: Any) -> None:
        if not record.sampled:
            return
        rows = getattr(record, "extras", {}).get("attn", [])
        if not rows:
            return
        groups: dict[str, list] = {}
        meta: dict[str, dict] = {}
        for entry, row in rows:
            if row is None:
                continue
            groups.setdefault(entry.name, []).append(row)
            meta.setdefault(entry.name, entry.extra)
        modules = []
        for name, parts in groups.items():
            info = meta[name]
            heads = int(info["heads"])
            parts = [p for p in parts if len(p) == heads * WIDTH + TAIL]
            if not parts:
                continue
            merged = merge_rows(parts, heads)
            first, last = merged[heads * WIDTH : heads * WIDTH + TAIL]
            modules.append(
                ModuleAttention(
                    name=name,
                    heads=summarize(merged, heads),
                    causal=bool(info["causal"]),
                    method=str(info["method"]),
                    first_token=int(first) if first >= 0 else None,
                    last_token=int(last) if last >= 0 else None,
                    extra={"calls": len(parts)},
                )
            )
        self._write(record.step, modules)
        token_text = None
        if self.tokenizer is not None:
            tok = self.tokenizer

            def token_text(i: int) -> str:
                return tok.decode([i])

        for rule in self._rules:
            if isinstance(rule, Sink):
                rule.token_text = token_text
            rule.check_modules(record.step, modules)

    def _write(self, step: int | None, modules: list[ModuleAttention]) -> None:
        run = self._run
        if run.metrics_capped:
            return
        for m in modules:
            for h in m.heads:
                row = {"schema_version": SCHEMA_VERSION, "step": step, "kind": "attn", "name": m.name,
                       "head": h["head"], "method": m.method, "calls": m.extra.get("calls", 1), "causal": m.causal}
                for key in _METRIC_KEYS:
                    v = h[key]
                    row[key] = None if isinstance(v, float) and math.isnan(v) else v
                run.write_metrics(row)
        run.flush_metrics()

    # ------------------------------------------------------------------ lifecycle
    def state_dict(self) -> dict:
        return {"mode": self.mode, "methods": dict(self.methods), "implementations": dict(self.implementations)}

    def load_state_dict(self, state: dict) -> None:
        self.methods.update(state.get("methods", {}))

    def close(self, status: str) -> None:
        return None

    def detach(self) -> None:
        self._hooks.remove()
        self._hf = None
        for ref, user_keep in self._keep:
            module = ref()
            if module is not None:
                module.keep_attn = user_keep
                if not user_keep:
                    module.last_attn = None
        self._keep = []
        self._padding = None
        self._input_ids = None
        release_cached_tiles()
        for rule in getattr(self, "_rules", []):
            with contextlib.suppress(Exception):
                rule.detach()
