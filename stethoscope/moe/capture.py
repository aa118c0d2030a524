"""Finding the routers of a model and reducing one router call to a device row.

A *router* is the module whose output holds the router logits (N, E) — and, in the Hugging Face 5.x
families, the chosen experts (N, k):

* a module with ``top_k`` and ``num_experts`` (or ``num_local_experts``) that is not itself the MoE block
  (no ``experts`` child): ``MixtralTopKRouter``, ``Qwen2MoeTopKRouter``, ``OlmoeTopKRouter``, a plain top-k
  gate of your own; it returns logits, or a tuple ``(logits, …, indices)``;
* an ``nn.Linear`` named ``gate`` / ``router`` inside a block that has ``experts`` and a top-k attribute
  (Hugging Face 4.x: the block computes the top-k itself, so we recompute it from the logits);
* whatever ``moe.modules`` names (top-k from its ``top_k`` / ``k`` / ``num_experts_per_tok``, else
  ``moe.top_k``).

Everything is reduced on the device with no host sync: counts by ``index_add_`` (``bincount`` would read the
maximum back to size its output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stethoscope.naming import clean_name, make_filter, patterns

TAIL = 5  # tokens, Σ entropy (nats), Σ log Z², Σ log Z, max |logit|
_K_ATTRS = ("top_k", "num_experts_per_tok", "k")
_E_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass
class Router:
    """One router: its name, expert count (None: read from the logits) and top-k."""

    name: str
    module: nn.Module
    experts: int | None
    top_k: int


def _attr(obj: Any, names: tuple[str, ...]) -> int | None:
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _gates(m: nn.Module, experts: int | None) -> bool:
    """Whether ``m`` itself projects to ``experts`` logits: an (E, H) weight of its own or a Linear child to E
    (a whole model carrying ``num_experts`` from its config does not)."""
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == experts:
        return True
    return any(isinstance(c, nn.Linear) and c.out_features == experts for c in m.children())


def find_routers(model: nn.Module, modules: str | list[str] = "", default_k: int = 2) -> list[Router]:
    """Every router of ``model`` (see the module docstring), each once, in module order."""
    named = [(clean_name(n), m) for n, m in model.named_modules()]
    listed = make_filter(patterns(modules)) if patterns(modules) else None
    out: list[Router] = []
    seen: set[int] = set()
    for name, m in named:
        router = None
        if listed is not None and name and listed(name):
            router = Router(name, m, _attr(m, _E_ATTRS), _attr(m, _K_ATTRS) or default_k)
        elif _attr(m, _K_ATTRS) and _attr(m, _E_ATTRS) and not hasattr(m, "experts") and _gates(m, _attr(m, _E_ATTRS)):
            router = Router(name, m, _attr(m, _E_ATTRS), _attr(m, _K_ATTRS))
        elif hasattr(m, "experts") and _attr(m, _K_ATTRS):
            gate = getattr(m, "gate", None) or getattr(m, "router", None)
            if isinstance(gate, nn.Linear):
                k = _attr(m, _K_ATTRS)
                gname = f"{name}.gate" if getattr(m, "gate", None) is gate else f"{name}.router"
                router = Router(gname.lstrip("."), gate, gate.out_features, k)
        if router is not None and id(router.module) not in seen:
            seen.add(id(router.module))
            out.append(router)
    return out


def split_output(output: Any, experts: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(logits (…, E), indices (…, k) or None) from a router's output (a tensor, or a tuple holding them)."""
    if isinstance(output, torch.Tensor):
        return (output, None) if output.is_floating_point() else (None, None)
    if not isinstance(output, tuple | list):
        return None, None
    logits = next((t for t in output if isinstance(t, torch.Tensor) and t.is_floating_point()
                   and (experts is None or t.shape[-1] == experts)), None)
    index = next((t for t in reversed(output) if isinstance(t, torch.Tensor) and not t.is_floating_point()
                  and t.dtype != torch.bool), None)
    return logits, index


def router_row(logits: torch.Tensor, index: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """One call as a (2E + TAIL,) float32 device row: tokens per expert (E), router probability mass per
    expert (E), then :data:`TAIL`. Sums, so calls and steps merge by addition (the max by max)."""
    E = logits.shape[-1]
    z = logits.detach().reshape(-1, E).float()  # (N, E)
    lse = torch.logsumexp(z, dim=-1)  # (N,)
    logp = z - lse[:, None]  # (N, E)
    p = logp.exp()
    entropy = -(p * logp).nan_to_num().sum(dim=-1)  # (N,)
    if index is None:
        index = torch.topk(z, min(top_k, E), dim=-1).indices  # (N, k): the same choice softmax-then-topk makes
    idx = index.detach().reshape(-1).long()  # (N·k,)
    valid = (idx >= 0) & (idx < E)  # dropped / padded slots (-1) count nowhere
    load = torch.zeros(E, device=z.device).index_add_(0, idx.clamp(0, E - 1), valid.float())  # (E,)
    tail = torch.stack([
        torch.full((), float(z.shape[0]), device=z.device), entropy.sum(), (lse * lse).sum(), lse.sum(),
        z.abs().amax() if z.numel() else torch.zeros((), device=z.device),
    ])
    return torch.cat([load, p.sum(dim=0), tail])


def merge_rows(rows: list, experts: int) -> list[float]:
    """Host rows of one router (several calls, or several steps) as one."""
    out = [float(v) for v in rows[0]]
    for r in rows[1:]:
        for i in range(2 * experts + TAIL - 1):
            out[i] += float(r[i])
        out[-1] = max(out[-1], float(r[-1]))
    return out
