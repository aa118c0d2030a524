"""Preflight checks of hyper-parameters and initialisation: learning rate, clipping, weight scale.

Only values *far* outside what is usual are flagged, and every message says why: a fine-tuning learning
rate of 2e-5 with AdamW is normal, not "too low".
"""

from __future__ import annotations

import math
from typing import Any

from stethoscope.checks.optimizer import Report
from stethoscope.naming import clean_name
from stethoscope.rules import hints as H
from stethoscope.rules.model_info import _ADAM_LIKE

# (lowest usual, highest usual) learning rate per optimizer family; outside both by this much is flagged.
ADAM_LR = (1e-7, 1e-2)
SGD_LR = (1e-5, 10.0)
CLIP = (1e-2, 1e3)  # usual max_grad_norm values lie in 0.1 - 10 (1.0 is the Hugging Face default)
INIT_FACTOR = 10.0  # a linear weight whose std is this far from 1/sqrt(fan_in) (either way) is flagged
MAX_INIT_FINDINGS = 8
# Residual output projections that GPT-2 / Megatron-style inits scale down by 1/sqrt(2 x layers) on purpose.
_RESIDUAL_OUT = {"c_proj", "o_proj", "out_proj", "down_proj", "fc2", "w2", "wo", "dense", "proj"}


def _family(optimizer: Any) -> str | None:
    name = type(optimizer).__name__
    if any(a.lower() in name.lower() for a in _ADAM_LIKE):
        return "adam"
    if name in ("SGD", "ASGD") or name.lower().startswith("sgd"):
        return "sgd"
    return None


def check_lr(optimizer: Any, report: Report) -> None:
    """Learning rates far from the optimizer family's usual range; groups that share a rate and a problem are
    one finding (target ``param groups 0, 1 ('blocks')``, or ``all 4 param groups``), not one per group."""
    family = _family(optimizer)
    kind = type(optimizer).__name__
    low, high = ADAM_LR if family == "adam" else SGD_LR
    shared: dict[tuple[str, float], list[str]] = {}  # (problem, lr) -> the groups' labels, in order
    groups = [g for g in getattr(optimizer, "param_groups", []) if g.get("params")]
    for gi, group in enumerate(getattr(optimizer, "param_groups", [])):
        lr = group.get("initial_lr", group.get("lr"))  # a scheduler's warm-up starts from 0: judge its target
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not group.get("params"):
            continue
        label = f"{gi}" + (f" ({group['name']!r})" if isinstance(group.get("name"), str) else "")
        if lr <= 0 or not math.isfinite(lr):
            problem = "zero"
        elif family in ("adam", "sgd") and lr > high:
            problem = "high"
        elif family in ("adam", "sgd") and lr < low:
            problem = "low"
        else:
            continue
        shared.setdefault((problem, lr), []).append(label)
    for (problem, lr), labels in shared.items():
        if len(labels) == 1:
            label = f"param group {labels[0]}"
        elif len(labels) == len(groups):
            label = f"all {len(labels)} param groups"
        else:
            label = "param groups " + ", ".join(labels)
        if problem == "zero":
            report(
                "preflight.lr", label, "warning",
                f"{label} {'has' if len(labels) == 1 else 'have'} learning rate {lr}: "
                f"{'its' if len(labels) == 1 else 'their'} parameters will not move",
                H.hint("preflight.lr", "zero"),
                value=lr,
            )
        elif family == "adam" and problem == "high":
            report(
                "preflight.lr", label, "warning",
                f"{label}: {kind} learning rate {lr:g} is far above the usual range (about 1e-5 to 3e-3): "
                "Adam-type optimizers normalise the gradient, so every weight moves by about lr per step "
                f"whatever the loss scale — {lr:g} per step is larger than a typical transformer weight (~0.02)",
                H.hint("preflight.lr", "adam_high"),
                value=lr, threshold=high,
            )
        elif family == "adam":
            report(
                "preflight.lr", label, "warning",
                f"{label}: {kind} learning rate {lr:g} is far below anything usual: each weight moves by about "
                f"{lr:g} per step, so 10,000 steps move it by {lr * 1e4:.1g} — below bfloat16 resolution of a "
                "typical weight. (Fine-tuning rates such as 2e-5 are normal; this is 100x smaller)",
                H.hint("preflight.lr", "adam_low"),
                value=lr, threshold=low,
            )
        elif problem == "high":
            report(
                "preflight.lr", label, "warning",
                f"{label}: SGD learning rate {lr:g} is far above the usual range (about 1e-3 to 1; 0.1 with "
                "momentum 0.9 is a classic for CNNs): SGD steps scale with the gradient, so this diverges "
                "unless gradients are tiny",
                H.hint("preflight.lr", "sgd_high"),
                value=lr, threshold=high,
            )
        else:
            report(
                "preflight.lr", label, "warning",
                f"{label}: SGD learning rate {lr:g} is far below the usual range (1e-3 to 1): plain SGD does "
                "not normalise the gradient, so with typical gradient norms the weights barely move. "
                "(Rates like 2e-5 are normal for Adam-type optimizers, not for SGD)",
                H.hint("preflight.lr", "sgd_low"),
                value=lr, threshold=low,
            )


def check_clip(max_grad_norm: float | None, report: Report) -> None:
    if max_grad_norm is None:
        return
    v = float(max_grad_norm)
    low, high = CLIP
    if v <= 0 or not math.isfinite(v):
        report(
            "preflight.grad_clip", "max_grad_norm", "critical",
            f"max_grad_norm is {v}: clip_grad_norm_ scales every gradient to norm {v}, so nothing trains",
            H.hint("preflight.grad_clip", "off"),
            value=v,
        )
    elif v < low:
        report(
            "preflight.grad_clip", "max_grad_norm", "warning",
            f"max_grad_norm {v:g} is far below the usual 0.1 - 10: almost every step is clipped, so the gradient's "
            "size is thrown away (with SGD the effective learning rate becomes lr x max_grad_norm / ‖g‖)",
            H.hint("preflight.grad_clip", "low"),
            value=v, threshold=low,
        )
    elif v > high:
        report(
            "preflight.grad_clip", "max_grad_norm", "warning",
            f"max_grad_norm {v:g} is far above the usual 0.1 - 10: it never clips, so a loss spike passes "
            "through in full",
            H.hint("preflight.grad_clip", "high"),
            value=v, threshold=high,
        )


def check_init(model: Any, report: Report) -> None:
    """Per linear layer, the weight's std against 1/sqrt(fan_in); only far-off scales are flagged.

    A residual output projection (``c_proj``, ``o_proj``, ``down_proj``, ...) may be smaller by a further
    1/sqrt(2 x layers): GPT-2 and Megatron scale it down on purpose. Skipped: weights that are exactly zero (zero-initialised by design: LoRA's B, adapter up-projections,
    zero-init output layers) and weights shared with an embedding (a tied LM head follows the embedding's
    own scale).
    """
    import torch
    from torch import nn

    embed_ptrs = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.weight is not None:
            embed_ptrs.add(m.weight.data_ptr())
    config = getattr(model, "config", None)
    layers = 1
    for key in ("n_layer", "num_hidden_layers", "num_layers", "n_layers"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            layers = v
            break
    flagged = []
    for raw, m in model.named_modules():
        tname = type(m).__name__
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.is_meta:
            continue
        if isinstance(m, nn.Linear):
            fan_in = w.shape[1]
        elif tname == "Conv1D":  # Hugging Face GPT-2: weight is (in, out)
            fan_in = w.shape[0]
        else:
            continue
        if fan_in < 1 or w.numel() < 2 or w.data_ptr() in embed_ptrs:
            continue
        with torch.no_grad():
            std = float(w.detach().float().std())
        if not math.isfinite(std):
            report(
                "preflight.init_scale", clean_name(raw) or "<model>", "critical",
                f"{clean_name(raw) or '<model>'}.weight holds NaN or Inf before training",
                H.hint("preflight.init_scale", "nonfinite"),
                value=std,
            )
            continue
        if std == 0.0:
            continue  # zero-initialised by design
        ref = 1.0 / math.sqrt(fan_in)
        ratio = std / ref
        low = 1.0 / INIT_FACTOR
        if raw.rpartition(".")[2] in _RESIDUAL_OUT:
            low /= math.sqrt(2 * layers)  # scaled residual init, by design
        if ratio > INIT_FACTOR or ratio < low:
            flagged.append((abs(math.log(ratio)), clean_name(raw) or "<model>", std, ref, ratio, fan_in, low))
    flagged.sort(reverse=True)
    for _, name, std, ref, ratio, fan_in, low in flagged[:MAX_INIT_FINDINGS]:
        big = ratio > 1
        report(
            "preflight.init_scale", name, "warning",
            f"{name}.weight has std {std:.3g}, {ratio:.3g}x 1/sqrt(fan_in) = {ref:.3g} (fan_in {fan_in}): "
            + ("outputs grow by about that factor per layer, which saturates activations and blows up the "
               "first gradients" if big else
               "outputs shrink by about that factor per layer, so the signal and the gradients fade with depth"),
            H.hint("preflight.init_scale", "scale"),
            value=round(ratio, 4), threshold=INIT_FACTOR if big else round(low, 4),
            data={"std": std, "reference": ref, "fan_in": fan_in},
        )
    if len(flagged) > MAX_INIT_FINDINGS:
        rest = [n for _, n, *_ in flagged[MAX_INIT_FINDINGS:]]
        report(
            "preflight.init_scale", f"{len(rest)} more layers", "warning",
            f"{len(rest)} more linear layers have a weight scale more than {INIT_FACTOR:g}x away from "
            f"1/sqrt(fan_in): {', '.join(rest[:12])}{' …' if len(rest) > 12 else ''}",
            H.hint("preflight.init_scale", "more"),
            value=len(rest), data={"layers": rest},
        )
