"""An optimizer built from a small YAML / JSON spec (``stethoscope check --optimizer-config``).

::

    optimizer: AdamW              # a torch.optim class name
    lr: 5.0e-5
    weight_decay: 0.01
    no_decay: [bias, norm]        # name fragments (case-insensitive) whose parameters get weight_decay 0
    kwargs: {betas: [0.9, 0.999]} # any other argument of the optimizer class
    max_grad_norm: 1.0            # the clipping value the training loop uses
    freeze: [bert.embeddings]     # name prefixes set to requires_grad=False first
    groups:                       # optional: named groups by name prefix, each may set lr / weight_decay
      backbone: {prefixes: [bert.], lr: 1.0e-5}
      head: {prefixes: [classifier.]}
    special_tokens: {pad: 0}      # expected special-token ids

Without a spec: AdamW, lr 5e-5, weight decay 0.01 except biases and normalisation weights, clipping at 1.0
(the Hugging Face Trainer's defaults). With ``groups``, each optimizer param group carries a ``name`` and the
groups become preflight's ``expected_groups``: a parameter matching no prefix is left out of the optimizer and
reported.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stethoscope.errors import StethoscopeError

DEFAULT_NO_DECAY = ("bias", "norm", "ln_", "layer_norm", "layernorm")
_KEYS = ("optimizer", "lr", "weight_decay", "no_decay", "kwargs", "max_grad_norm", "freeze", "groups",
         "special_tokens")
_GROUP_KEYS = ("prefixes", "lr", "weight_decay")


@dataclass
class OptimizerSpec:
    optimizer: str = "AdamW"
    lr: float = 5e-5
    weight_decay: float = 0.01
    no_decay: list[str] = field(default_factory=lambda: list(DEFAULT_NO_DECAY))
    kwargs: dict = field(default_factory=dict)
    max_grad_norm: float | None = 1.0
    freeze: list[str] = field(default_factory=list)
    groups: dict[str, dict] = field(default_factory=dict)
    special_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def expected_groups(self) -> dict[str, list[str]] | None:
        return {g: list(v["prefixes"]) for g, v in self.groups.items()} or None


def _unknown(key: str, valid: tuple[str, ...], where: str) -> StethoscopeError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else "valid keys: " + ", ".join(valid)
    return StethoscopeError(f"unknown key {key!r} in {where}: {hint}")


def load_spec(path: str | Path | None) -> OptimizerSpec:
    """Read and validate a spec file (YAML or JSON); ``None`` gives the defaults."""
    if path is None:
        return OptimizerSpec()
    p = Path(path)
    if not p.is_file():
        raise StethoscopeError(f"--optimizer-config {str(p)!r} is not a file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise StethoscopeError(f"could not parse {str(p)!r}: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise StethoscopeError(f"{str(p)!r} must hold a mapping of keys ({', '.join(_KEYS)})")
    for key in data:
        if key not in _KEYS:
            raise _unknown(str(key), _KEYS, str(p))
    spec = OptimizerSpec()
    try:
        if "optimizer" in data:
            spec.optimizer = str(data["optimizer"])
        if "lr" in data:
            spec.lr = float(data["lr"])
        if "weight_decay" in data:
            spec.weight_decay = float(data["weight_decay"])
        if "no_decay" in data:
            spec.no_decay = [str(x) for x in data["no_decay"] or []]
        if "kwargs" in data:
            spec.kwargs = dict(data["kwargs"] or {})
        if "max_grad_norm" in data:
            spec.max_grad_norm = None if data["max_grad_norm"] is None else float(data["max_grad_norm"])
        if "freeze" in data:
            spec.freeze = [str(x) for x in data["freeze"] or []]
        if "special_tokens" in data:
            spec.special_tokens = {str(k): int(v) for k, v in (data["special_tokens"] or {}).items()}
        for name, group in (data.get("groups") or {}).items():
            if not isinstance(group, dict) or "prefixes" not in group:
                raise StethoscopeError(f"group {name!r} in {str(p)!r} needs a 'prefixes' list")
            for key in group:
                if key not in _GROUP_KEYS:
                    raise _unknown(str(key), _GROUP_KEYS, f"group {name!r} of {p}")
            prefixes = group["prefixes"]
            spec.groups[str(name)] = {
                "prefixes": [prefixes] if isinstance(prefixes, str) else [str(x) for x in prefixes],
                **{k: float(group[k]) for k in ("lr", "weight_decay") if k in group},
            }
    except (TypeError, ValueError) as exc:
        raise StethoscopeError(f"invalid value in {str(p)!r}: {exc}") from exc
    return spec


def build_optimizer(model: Any, spec: OptimizerSpec) -> Any:
    """The optimizer the spec describes, over ``model``'s trainable parameters (freezing first)."""
    import torch

    from stethoscope.checks.optimizer import _matches

    cls = getattr(torch.optim, spec.optimizer, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        names = [n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
                 and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != "Optimizer"]
        close = difflib.get_close_matches(spec.optimizer, names, n=1, cutoff=0.5)
        raise StethoscopeError(
            f"optimizer {spec.optimizer!r} is not a torch.optim class"
            + (f": did you mean {close[0]!r}?" if close else f"; use one of {', '.join(sorted(names))}")
        )
    for name, p in model.named_parameters():
        if any(_matches(name, pre) for pre in spec.freeze):
            p.requires_grad_(False)

    def no_decay(name: str) -> bool:
        low = name.lower()
        return any(frag.lower() in low for frag in spec.no_decay)

    groups: list[dict] = []
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if spec.groups:
        for gname, g in spec.groups.items():
            members = [(n, p) for n, p in named if any(_matches(n, pre) for pre in g["prefixes"])]
            wd = g.get("weight_decay", spec.weight_decay)
            lr = g.get("lr", spec.lr)
            decay = [p for n, p in members if not no_decay(n)]
            plain = [p for n, p in members if no_decay(n)]
            for params, w in ((decay, wd), (plain, 0.0)):
                if params:
                    groups.append({"params": params, "weight_decay": w, "lr": lr, "name": gname})
    else:
        decay = [p for n, p in named if not no_decay(n)]
        plain = [p for n, p in named if no_decay(n)]
        groups = [g for g in ({"params": decay, "weight_decay": spec.weight_decay},
                              {"params": plain, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise StethoscopeError("the optimizer spec selects no trainable parameter (check 'freeze' and 'groups')")
    try:
        return cls(groups, lr=spec.lr, **spec.kwargs)
    except TypeError as exc:
        raise StethoscopeError(f"could not build {spec.optimizer}: {exc}") from exc
