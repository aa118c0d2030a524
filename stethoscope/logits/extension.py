"""The monitor's logits extension: the LM head's output summarised on the device on sampled steps.

The head is the model's output embeddings (``get_output_embeddings()``, Hugging Face) or the modules named by
``logits.modules``. Its forward hook reduces a strided sample of at most ``logits.max_rows`` rows of the
(…, V) logits to eight numbers on the device and queues them (kind ``logits``), so they reach the host in
the step's one transfer. :meth:`LogitsExtension.observe` writes one ``kind: "logits"`` metrics row per head
and runs :class:`~stethoscope.logits.rules.LogitDivergence`.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any

import torch
from torch import nn

from stethoscope.collector import Entry
from stethoscope.extensions import Extension
from stethoscope.hooks import is_compiling
from stethoscope.logits.rules import HeadLogits, LogitDivergence
from stethoscope.naming import clean_name, make_filter, patterns
from stethoscope.rundir import SCHEMA_VERSION

WIDTH = 8  # rows, Σ mean logit, Σ log Z, max log Z, min log Z, max logit, min logit, vocabulary


def extension(run: Any) -> LogitsExtension | None:
    cfg = run.config.logits
    model = run.model
    if not cfg.enabled or model is None:
        return None
    heads = find_heads(model, cfg.modules)
    if not heads:
        return None
    return LogitsExtension(run, heads)


def find_heads(model: nn.Module, modules: str | list[str]) -> dict[str, nn.Module]:
    """name -> module of the LM head(s): ``auto`` takes the output embeddings of a Hugging Face model, else a
    module named ``lm_head``; other patterns name them."""
    names = {m: clean_name(n) for n, m in model.named_modules()}
    pats = patterns(modules)
    if pats == ["auto"]:
        get = getattr(model, "get_output_embeddings", None)
        head = None
        with contextlib.suppress(Exception):
            head = get() if callable(get) else None
        if isinstance(head, nn.Module) and head in names:
            return {names[head]: head}
        return {name: m for m, name in names.items() if name.split(".")[-1] == "lm_head"}
    listed = make_filter(pats)
    return {name: m for m, name in names.items() if name and listed(name)}


def logit_row(logits: torch.Tensor, max_rows: int) -> torch.Tensor:
    """The (WIDTH,) float32 device summary of (…, V) logits over an evenly strided sample of rows (no sync)."""
    vocab = logits.shape[-1]
    z = logits.detach().reshape(-1, vocab)  # (N, V)
    if z.shape[0] > max_rows:
        z = z[:: math.ceil(z.shape[0] / max_rows)]  # (≤ max_rows, V): the cost stays flat in batch × length
    z = z.float()
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    n = torch.full((1,), float(z.shape[0]), device=z.device)
    return torch.cat([
        n, z.mean(dim=-1).sum().reshape(1), lse.sum().reshape(1), lse.amax().reshape(1), lse.amin().reshape(1),
        z.amax().reshape(1), z.amin().reshape(1), torch.full((1,), float(vocab), device=z.device),
    ])


def merge(rows: list) -> list[float]:
    """Several calls' rows (host) as one: counts and sums add, extremes take the extreme."""
    out = [float(v) for v in rows[0]]
    for r in rows[1:]:
        out[0] += float(r[0])
        out[1] += float(r[1])
        out[2] += float(r[2])
        out[3] = max(out[3], float(r[3]))
        out[4] = min(out[4], float(r[4]))
        out[5] = max(out[5], float(r[5]))
        out[6] = min(out[6], float(r[6]))
    return out


class LogitsExtension(Extension):
    """Watches the LM head's logits (see the module docstring)."""

    name = "logits"

    def __init__(self, run: Any, heads: dict[str, nn.Module]):
        self._run = run
        self.heads = list(heads)
        self._max_rows = run.config.logits.max_rows
        self._hooks = run.hooks("logits")
        for name, module in heads.items():
            self._hooks.forward(module, self._make_hook(name))
        section = getattr(run.config, "rules", None)
        enabled = make_filter(patterns(getattr(section, "enabled", "*")))
        disabled = make_filter(patterns(getattr(section, "disabled", "")))
        code = LogitDivergence.code
        self.rule = LogitDivergence(run.rule_context) if enabled(code) and not disabled(code) else None

    def _make_hook(self, name: str):
        ref = weakref.ref(self)

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            ext = ref()
            if ext is None or is_compiling() or not ext._run.sampling:
                return None
            if isinstance(output, torch.Tensor) and output.is_floating_point() and output.dim() >= 2:
                ext._run.guard(f"logits of {name or '<model>'}", ext._measure, name, output)
            return None

        return hook

    def _measure(self, name: str, output: torch.Tensor) -> None:
        self._run.queue(Entry("logits", name, "", 0, output.numel()), logit_row(output, self._max_rows))

    def observe(self, record: Any) -> None:
        if not record.sampled:
            return
        groups: dict[str, list] = {}
        for entry, row in getattr(record, "extras", {}).get("logits", []):
            if row is not None and len(row) == WIDTH:
                groups.setdefault(entry.name, []).append(row)
        heads = []
        for name, rows in groups.items():
            r = merge(rows)
            if r[0] <= 0:
                continue
            heads.append(HeadLogits(name=name, rows=int(r[0]), mean_logit=r[1] / r[0], log_z=r[2] / r[0],
                                    log_z_max=r[3], log_z_min=r[4], logit_max=r[5], logit_min=r[6], vocab=int(r[7])))
        if not heads:
            return
        run = self._run
        if not run.metrics_capped:
            for h in heads:
                run.write_metrics({
                    "schema_version": SCHEMA_VERSION, "step": record.step, "kind": "logits", "name": h.name,
                    "rows": h.rows, "mean_logit": _plain(h.mean_logit), "log_z": _plain(h.log_z),
                    "log_z_max": _plain(h.log_z_max), "logit_max": _plain(h.logit_max),
                    "logit_min": _plain(h.logit_min), "vocab": h.vocab,
                })
            run.flush_metrics()
        if self.rule is not None:
            self.rule.check_heads(record.step, heads)

    def state_dict(self) -> dict:
        return {"rule": self.rule.state_dict() if self.rule is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        if self.rule is not None:
            self.rule.load_state_dict(state.get("rule", {}))

    def detach(self) -> None:
        self._hooks.remove()
        if self.rule is not None:
            with contextlib.suppress(Exception):
                self.rule.detach()


def _plain(v: float) -> float | None:
    return None if math.isnan(v) else v
