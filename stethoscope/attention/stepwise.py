"""Step-by-step mode: one short sequence's attention, layer by layer and head by head, then the prediction.

What the attention field note logs by hand for one batch, for any model::

    import stethoscope as st
    result = st.attention.step_by_step(model, tokenizer, "the cat sat on the", out_dir="runs/sbs")

For every attention call and head: Q, K, V statistics (and the first values of Q), the raw scores
``q k^T * scale``, the scores after the mask (blocked keys shown as ``-inf``), the softmax weights with each
row's sum; then the loss (for causal language models, the labels being the text shifted by one), the top-k
next tokens with their probabilities (models with a language-model head), and the causality check by
perturbation (causal models). Printed with rich, written to ``OUT/step-by-step.log`` and ``.json``, and one
heatmap per layer and head (``OUT/heatmaps/``). ``stethoscope trace MODEL_DIR --text ... --attention`` runs
it on a local checkpoint.

Queries and keys come from the same capture as the monitor's (the Hugging Face attention wrapper); the demo's
nanoGPT-style attention is read from its ``c_attn`` projection. The forward pass runs once, in eval mode,
under ``no_grad``; the model's attention implementation is restored afterwards.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stethoscope.attention import capture as cap
from stethoscope.attention.checks import masked_scores, repeat_kv, scores
from stethoscope.attention.perturb import CausalityCheck, check_causality, main_output, model_forward
from stethoscope.errors import StethoscopeError
from stethoscope.hooks import HookSet
from stethoscope.naming import clean_name

LOG = "step-by-step.log"
JSON = "step-by-step.json"


@dataclass
class HeadStep:
    """One head of one attention call."""

    layer: str
    head: int
    kv_head: int
    q: dict
    k: dict
    v: dict
    q_sample: list  # first 3 tokens x first 5 dims of Q
    scale: float | None
    raw_scores: list | None  # (T, T) or None when only weights were available
    masked_scores: list | None  # -inf where the mask blocks
    weights: list
    row_sums: list
    returned_diff: float | None = None  # max |model's own weights - softmax(masked scores)|, when it gave both
    heatmap: str | None = None


@dataclass
class StepByStep:
    """What :func:`step_by_step` found; ``log_path`` / ``json_path`` / ``heatmaps`` point at the files."""

    text: str | None
    tokens: list[str]
    input_ids: list[int]
    heads: list[HeadStep]
    method: str
    causal: bool
    is_lm: bool
    loss: float | None = None
    loss_note: str = ""
    top_k: list[dict] | None = None
    top_k_note: str = ""
    causality: CausalityCheck | None = None
    embedding: dict | None = None
    notes: list[str] = field(default_factory=list)
    log_path: Path | None = None
    json_path: Path | None = None
    heatmaps: list[Path] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "schema_version": 1,
            "text": self.text,
            "tokens": self.tokens,
            "input_ids": self.input_ids,
            "method": self.method,
            "causal": self.causal,
            "is_lm": self.is_lm,
            "embedding": self.embedding,
            "heads": [_jsonable(vars(h)) for h in self.heads],
            "loss": self.loss,
            "loss_note": self.loss_note,
            "top_k": self.top_k,
            "top_k_note": self.top_k_note,
            "causality": vars(self.causality) if self.causality else None,
            "notes": self.notes,
        }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def _stats(t: torch.Tensor) -> dict:
    t = t.detach().float()
    return {
        "shape": list(t.shape),
        "min": float(t.min()),
        "max": float(t.max()),
        "mean": float(t.mean()),
        "std": float(t.std()) if t.numel() > 1 else 0.0,
    }


# ---------------------------------------------------------------------- capturing one forward pass
class _Recorder:
    """Collects every attention call of one forward pass (tensors detached and kept)."""

    def __init__(self) -> None:
        self.calls: list[cap.AttentionCall] = []

    def __call__(self, call: cap.AttentionCall) -> None:
        kept = cap.AttentionCall(**call.__dict__)
        for attr in ("query", "key", "value", "mask", "weights", "position_bias"):
            v = getattr(kept, attr)
            if isinstance(v, torch.Tensor):
                setattr(kept, attr, v.detach().clone())
        kept.rerun = None
        kept.module = None  # type: ignore[assignment]
        self.calls.append(kept)


def _nano_hooks(names: dict[nn.Module, str], recorder: _Recorder, hooks: HookSet) -> None:
    """Hooks for modules that keep their weights; nanoGPT-style ones (``c_attn``, ``n_head``) also give Q/K/V."""
    for module, name in names.items():
        if not cap.keeps_weights(module):
            continue
        hooks.on_remove(functools.partial(_restore_keep, module, module.keep_attn))
        module.keep_attn = True
        box: dict = {}
        c_attn = getattr(module, "c_attn", None)
        n_head = getattr(module, "n_head", None)
        if isinstance(c_attn, nn.Module) and isinstance(n_head, int):
            hooks.forward(c_attn, lambda _m, _a, out, box=box: box.__setitem__("qkv", out.detach()))

        def after(mod: nn.Module, args: tuple, output: Any, name=name, box=box, n_head=n_head) -> None:
            weights = getattr(mod, "last_attn", None)
            if weights is None and isinstance(output, tuple):
                weights = cap.returned_weights(output)
            call = cap.AttentionCall(name=name, module=mod, weights=weights, causal=cap.module_causal(mod),
                                     implicit_causal=cap.module_causal(mod), implementation="module")
            qkv = box.pop("qkv", None)
            if qkv is not None and qkv.dim() == 3 and qkv.shape[-1] % 3 == 0:
                b, t, c3 = qkv.shape
                c = c3 // 3
                hs = c // n_head
                q, k, v = (x.view(b, t, n_head, hs).transpose(1, 2) for x in qkv.split(c, dim=2))
                call.query, call.key, call.value = q, k, v
                temperature = float(getattr(mod, "temperature", 1.0) or 1.0)
                call.scaling = 1.0 / (math.sqrt(hs) * temperature) if temperature else float("inf")
            recorder(call)

        hooks.forward(module, after)


def _restore_keep(module: nn.Module, keep: bool) -> None:
    module.keep_attn = keep
    if not keep:
        module.last_attn = None


def _encode(model: nn.Module, tokenizer: Any, text: str | None, input_ids: Any, max_tokens: int,
            notes: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    mask = None
    if input_ids is not None:
        ids = torch.as_tensor(input_ids)
    elif text is None:
        raise StethoscopeError("step_by_step needs text (with a tokenizer) or input_ids")
    elif tokenizer is not None:
        batch = tokenizer(text, return_tensors="pt")
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
    else:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab != 256:
            raise StethoscopeError(
                "step_by_step got text but no tokenizer; pass the model's tokenizer (or input_ids). Without one "
                "only byte-level models (vocabulary of 256, like the demo's TinyGPT) can read text"
            )
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    ids = ids[:1]
    if ids.shape[-1] > max_tokens:
        notes.append(f"the text has {ids.shape[-1]} tokens; only the first {max_tokens} are shown "
                     "(attention.max_tokens)")
        ids = ids[:, :max_tokens]
        mask = mask[:1, :max_tokens] if mask is not None else None
    if mask is not None and bool((mask != 0).all()):
        mask = None  # no padding in one sequence: leave the model its own default path
    tokens = [_token_text(tokenizer, int(i)) for i in ids[0].tolist()]
    return ids, mask, tokens


def _token_text(tokenizer: Any, i: int) -> str:
    if tokenizer is None:
        return bytes([i]).decode("utf-8", errors="replace") if 0 <= i < 256 else str(i)
    try:
        return tokenizer.convert_ids_to_tokens(i)
    except Exception:
        try:
            return tokenizer.decode([i])
        except Exception:
            return str(i)


def _decode(tokenizer: Any, i: int) -> str:
    if tokenizer is None:
        return _token_text(None, i)
    try:
        return tokenizer.decode([i])
    except Exception:
        return str(i)


def _has_lm_head(model: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get() is not None
        except Exception:
            return False
    return isinstance(getattr(model, "lm_head", None), nn.Module)


# ---------------------------------------------------------------------- the public entry point
def step_by_step(
    model: nn.Module,
    tokenizer: Any = None,
    text: str | None = None,
    *,
    input_ids: Any = None,
    out_dir: str | Path | None = None,
    max_tokens: int | None = None,
    top_k: int = 5,
    console: Any = None,
    heatmaps: bool = True,
    show: bool = True,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> StepByStep:
    """One forward pass of a short sequence, every attention computation shown and written.

    Args:
        model: a transformers model (any family: causal, bidirectional, rotary, grouped-query), the demo's
            TinyGPT, or a model whose attention modules keep their weights (``keep_attn`` / ``last_attn``).
        tokenizer: turns ``text`` into ids and ids back into tokens (optional for byte-level models).
        text: the input; or pass ``input_ids`` (one sequence).
        out_dir: where ``step-by-step.log``, ``step-by-step.json`` and ``heatmaps/`` go (None: nothing written).
        max_tokens: longest sequence shown (default ``attention.max_tokens``, 10); longer input is cut.
        top_k: next-token predictions shown (models with a language-model head).
        console: a rich console (default: stethoscope's).
        heatmaps: draw one PNG per layer and head (needs ``out_dir``).
        show: print to the console (the log file is written either way).
        layers: the attention layers to show, by position (0 = the first attention layer the pass ran);
            None shows every layer. Files and heatmaps hold the same selection.
        heads: the heads to show in each selected layer (0-based); None shows every head.

    Returns:
        a :class:`StepByStep` with every matrix, the loss, the predictions and the file paths.
    """
    from stethoscope.config import AttentionConfig
    from stethoscope.console import get_console

    max_tokens = AttentionConfig().max_tokens if max_tokens is None else int(max_tokens)
    if max_tokens < 1:
        raise StethoscopeError(f"max_tokens must be >= 1, got {max_tokens}")
    notes: list[str] = []
    ids, mask, tokens = _encode(model, tokenizer, text, input_ids, max_tokens, notes)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = ids.to(device)
    mask = mask.to(device) if mask is not None else None

    names: dict[nn.Module, str] = {}
    for raw, module in model.named_modules():
        names.setdefault(module, clean_name(raw))
    recorder = _Recorder()
    hooks = HookSet("attention step by step")
    emb_box: dict = {}
    was_training = model.training
    model.eval()
    try:
        if cap.is_hf_model(model):
            hf = hooks.add(cap.HFCapture(model, names))
            hf.listeners.append(recorder)
            for impl, what in hf.implementations.items():
                if not what.startswith("wrapped"):
                    notes.append(f"{impl}: {what}")
        _nano_hooks(names, recorder, hooks)
        get_emb = getattr(model, "get_input_embeddings", None)
        emb = get_emb() if callable(get_emb) else getattr(getattr(model, "transformer", None), "wte", None)
        if isinstance(emb, nn.Module):
            hooks.forward(emb, lambda _m, _a, out: emb_box.__setitem__("x", out.detach()))
        with torch.no_grad():
            output = model_forward(model, ids, mask)
    finally:
        hooks.remove()
        model.train(was_training)

    if not recorder.calls:
        raise StethoscopeError(
            f"no attention computation was seen in {type(model).__name__}: step-by-step mode reads attention "
            "through the transformers attention interface (sdpa / eager) or modules that keep their weights "
            "(keep_attn / last_attn)"
        )
    all_heads = [h for call in recorder.calls for h in _heads_of(call, tokens)]
    selected = select_heads(all_heads, layers, heads, notes)
    causal = any(c.causal for c in recorder.calls)
    methods = sorted({"queries and keys (recomputed)" if c.query is not None else "module weights"
                      for c in recorder.calls})
    result = StepByStep(
        text=text,
        tokens=tokens,
        input_ids=ids[0].tolist(),
        heads=selected,
        method=", ".join(methods),
        causal=causal,
        is_lm=_has_lm_head(model),
        notes=notes,
        embedding=_stats(emb_box["x"]) if "x" in emb_box else None,
    )
    _predictions(result, model, tokenizer, output, ids, top_k)
    if causal and ids.shape[-1] >= 2:
        try:
            result.causality = check_causality(model, ids, attention_mask=mask)
        except Exception as exc:  # a model that cannot be called this way: say so, do not fail the mode
            result.notes.append(f"causality check skipped: {type(exc).__name__}: {exc}")
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if heatmaps:
            from stethoscope.attention.plots import draw_heatmaps

            result.heatmaps = draw_heatmaps(result, out / "heatmaps")
        result.json_path = out / JSON
        result.json_path.write_text(json.dumps(result.as_dict(), indent=1), encoding="utf-8")
        result.log_path = out / LOG
    _render(result, console or get_console(), show)
    return result


MANY_HEADS = 8  # showing more heads than this without a selection adds a note on how to pick some


def parse_selection(text: str | None, what: str) -> list[int] | None:
    """``"0,2,5-7"`` -> ``[0, 2, 5, 6, 7]`` (None for None or ""); a clear error for anything else."""
    if text is None or not text.strip():
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise StethoscopeError(
                f"--{what} takes numbers and ranges such as 0,2,5-7 (0 is the first); got {text!r}"
            ) from None
        if first < 0 or last < first:
            raise StethoscopeError(f"--{what}: {part!r} is not a range of numbers >= 0 (e.g. 0,2,5-7)")
        out.extend(range(first, last + 1))
    return sorted(set(out))


def select_heads(heads: list[HeadStep], layers: Sequence[int] | None, wanted: Sequence[int] | None,
                 notes: list[str]) -> list[HeadStep]:
    """The heads of the selected layers (by position) and head numbers; a note says what was picked, or, for
    a long unselected pass, how to pick."""
    names = list(dict.fromkeys(h.layer for h in heads))
    n_heads = max((h.head for h in heads), default=-1) + 1
    for sel, count, what in ((layers, len(names), "layers"), (wanted, n_heads, "heads")):
        bad = [i for i in (sel or []) if i >= count]
        if bad:
            raise StethoscopeError(
                f"--{what} {', '.join(map(str, bad))}: the model has {count} attention {what} (0 to {count - 1})"
            )
    if layers is None and wanted is None:
        if len(heads) > MANY_HEADS:
            notes.append(f"all {len(heads)} heads of {len(names)} layers are shown; pick some with --layers and "
                         "--heads (e.g. --layers 0 --heads 0,1; layers= / heads= in Python)")
        return heads
    keep_layers = {names[i] for i in layers} if layers is not None else set(names)
    keep_heads = set(wanted) if wanted is not None else None
    out = [h for h in heads if h.layer in keep_layers and (keep_heads is None or h.head in keep_heads)]
    shown_layers = ", ".join(str(i) for i, n in enumerate(names) if n in keep_layers)
    shown_heads = "all" if keep_heads is None else ", ".join(map(str, sorted(keep_heads)))
    notes.append(f"showing layers {shown_layers} of {len(names)} and heads {shown_heads} of {n_heads}: "
                 f"{len(out)} of {len(heads)} heads")
    return out


def _heads_of(call: cap.AttentionCall, tokens: list[str]) -> list[HeadStep]:
    """Per-head matrices of one call (the first sequence of the batch)."""
    out = []
    raw = masked = recomputed = None
    if call.query is not None and call.key is not None:
        all_scores = scores(call)
        raw = all_scores[0]  # (nh, Tq, Tk)
        masked = masked_scores(call, all_scores)[0]
        recomputed = torch.softmax(masked, dim=-1)
    # the weights the model itself used when it gave them (eval mode: before any dropout), else recomputed
    if call.weights is not None:
        weights = call.weights[0].float()
    elif recomputed is not None:
        weights = recomputed
    else:
        return out
    nh = weights.shape[0]
    k_full = v_full = None
    if call.key is not None:
        rep = max(1, nh // call.key.shape[1])
        k_full = repeat_kv(call.key.float(), rep)[0]
        v_full = repeat_kv(call.value.float(), rep)[0] if call.value is not None else None
    # the model's own weights against a correct softmax of its masked scores (0 when its attention is right)
    returned = recomputed if (call.weights is not None and recomputed is not None) else None
    for h in range(nh):
        kv_head = h // max(1, nh // call.key.shape[1]) if call.key is not None else h
        w = weights[h]
        out.append(
            HeadStep(
                layer=call.name,
                head=h,
                kv_head=kv_head,
                q=_stats(call.query[0, h]) if call.query is not None else {},
                k=_stats(k_full[h]) if k_full is not None else {},
                v=_stats(v_full[h]) if v_full is not None else {},
                q_sample=call.query[0, h, :3, :5].float().tolist() if call.query is not None else [],
                scale=call.scaling,
                raw_scores=raw[h].tolist() if raw is not None else None,
                masked_scores=masked[h].tolist() if masked is not None else None,
                weights=w.tolist(),
                row_sums=w.sum(-1).tolist(),
                returned_diff=float((returned[h] - w).abs().max()) if returned is not None else None,
            )
        )
    return out


def _predictions(result: StepByStep, model: nn.Module, tokenizer: Any, output: Any, ids: torch.Tensor,
                 top_k: int) -> None:
    try:
        _, logits = main_output(output)
    except TypeError:
        logits = None
    arch = type(model).__name__
    if not result.is_lm or logits is None or logits.dim() != 3:
        result.loss_note = f"no loss: {arch} has no language-model head, so there are no labels to form from the text"
        result.top_k_note = f"no next-token predictions: {arch} has no language-model head (an encoder such as " \
                            "BERT / MiniLM gives hidden states, not token probabilities)"
        return
    if not result.causal:
        result.loss_note = "no loss: the model is not causal (a masked LM needs masked positions to score)"
        result.top_k_note = "no next-token predictions: the model is not causal"
        return
    logits = logits.float()
    if ids.shape[-1] >= 2:
        # next-token labels: position t predicts token t + 1
        result.loss = float(F.cross_entropy(logits[0, :-1], ids[0, 1:]))
    else:
        result.loss_note = "no loss: one token has no next token to predict"
    if top_k > 0:
        probs = torch.softmax(logits[0, -1], dim=-1)
        values, idx = probs.topk(min(top_k, probs.numel()))
        result.top_k = [
            {"rank": r + 1, "id": int(i), "token": _decode(tokenizer, int(i)), "prob": float(p)}
            for r, (p, i) in enumerate(zip(values.tolist(), idx.tolist(), strict=True))
        ]


# ---------------------------------------------------------------------- text
def _label(tok: str, width: int = 8) -> str:
    tok = re.sub(r"\s", "·", tok)
    return tok if len(tok) <= width else tok[: width - 1] + "…"


def _matrix(rows: list, tokens: list[str], fmt: str, sums: list | None = None) -> list[str]:
    n_cols = len(rows[0]) if rows else 0
    col_tokens = tokens[-n_cols:] if len(tokens) >= n_cols else tokens + [""] * (n_cols - len(tokens))
    row_tokens = tokens[-len(rows):] if len(tokens) >= len(rows) else tokens
    head = " " * 10 + "".join(f"{_label(t):>9}" for t in col_tokens)
    lines = [head]
    for i, row in enumerate(rows):
        cells = "".join(f"{'-inf' if v == float('-inf') else format(v, fmt):>9}" for v in row)
        tail = f"   (sum={sums[i]:.4f})" if sums is not None else ""
        lines.append(f"{_label(row_tokens[i] if i < len(row_tokens) else ''):>9} {cells}{tail}")
    return lines


def _stat_line(label: str, s: dict) -> str:
    if not s:
        return f"{label}: not available"
    return (f"{label}: shape {tuple(s['shape'])}, range [{s['min']:.4f}, {s['max']:.4f}], mean {s['mean']:.4f}, "
            f"std {s['std']:.4f}")


def lines(result: StepByStep) -> list[str]:
    """The step-by-step report as plain text lines (what the log file holds)."""
    out = [
        f"step-by-step attention: {len(result.tokens)} tokens, {len({h.layer for h in result.heads})} attention "
        f"layer(s), {len(result.heads)} head(s); probabilities from {result.method}",
        "tokens: " + " ".join(f"{i}:{_label(t, 16)}" for i, t in enumerate(result.tokens)),
        "input ids: " + " ".join(str(i) for i in result.input_ids),
    ]
    out += [f"note: {n}" for n in result.notes]
    if result.embedding:
        out.append(_stat_line("embedding output", result.embedding))
    for h in result.heads:
        out.append("")
        out.append(f"=== {h.layer} · head {h.head}" + (f" (key/value head {h.kv_head})" if h.kv_head != h.head else ""))
        out.append(_stat_line("Q", h.q))
        out.append(_stat_line("K", h.k))
        out.append(_stat_line("V", h.v))
        if h.q_sample:
            out.append("Q, first tokens x first dims: " + "; ".join(
                " ".join(f"{v:.4f}" for v in row) for row in h.q_sample))
        if h.raw_scores is not None:
            out.append(f"scores q·k^T × {h.scale:.4g} (before the mask):")
            out += _matrix(h.raw_scores, result.tokens, ".3f")
            out.append("scores after the mask (-inf = blocked):")
            out += _matrix(h.masked_scores, result.tokens, ".3f")
        out.append("softmax weights (each row should sum to 1):")
        out += _matrix(h.weights, result.tokens, ".4f", sums=h.row_sums)
        if h.returned_diff is not None:
            out.append(f"max |model's weights - softmax of its masked scores| = {h.returned_diff:.3g}")
    out.append("")
    if result.loss is not None:
        out.append(f"loss (next-token cross-entropy over {len(result.tokens) - 1} positions): {result.loss:.6f}")
    elif result.loss_note:
        out.append(result.loss_note)
    if result.top_k:
        out.append(f"top-{len(result.top_k)} next tokens after the last position:")
        for p in result.top_k:
            out.append(f"  {p['rank']}. {p['token']!r} (id {p['id']}): {p['prob']:.4g}")
    elif result.top_k_note:
        out.append(result.top_k_note)
    if result.causality is not None:
        out.append(result.causality.describe())
    return out


def _render(result: StepByStep, console: Any, show: bool) -> None:
    from rich.markup import escape

    text = lines(result)
    if result.log_path is not None:
        result.log_path.write_text("\n".join(text) + "\n", encoding="utf-8")
    if not show:
        return
    for line in text:
        if line.startswith("=== "):
            console.rule(escape(line[4:]), align="left")
        elif line.startswith(("loss", "top-", "causality check", "no loss", "no next-token")):
            style = "red" if "NOT causal" in line else "bold"
            console.print(f"[{style}]{escape(line)}[/]", soft_wrap=True)
        else:
            console.print(escape(line), soft_wrap=True, highlight=False)
    if result.log_path is not None:
        console.print(f"step-by-step log: {escape(str(result.log_path))}", soft_wrap=True)


def trace_attention(model_dir: str | Path, text: str, out: str | Path, top_k: int = 5, console: Any = None,
                    max_tokens: int | None = None, layers: Sequence[int] | None = None,
                    heads: Sequence[int] | None = None) -> StepByStep:
    """``stethoscope trace MODEL_DIR --text ... --attention [--layers 0,2 --heads 0]``: step-by-step mode on a
    local checkpoint, for every attention layer and head or the selected ones."""
    from rich.markup import escape

    from stethoscope.console import get_console
    from stethoscope.hf_loading import load_local

    console = console or get_console()
    ckpt = load_local(model_dir)
    # a causal LM saved with another family's tokenizer may not know token types
    tokenizer = _IdsOnly(ckpt.tokenizer) if ckpt.is_lm else ckpt.tokenizer
    console.rule(f"attention step by step · {escape(ckpt.architecture)}", align="left")
    result = step_by_step(ckpt.model, tokenizer, text, out_dir=out, top_k=top_k, console=console,
                          max_tokens=max_tokens, layers=layers, heads=heads)
    if result.heatmaps:
        console.print(f"heatmaps: {len(result.heatmaps)} PNG(s) in {escape(str(result.heatmaps[0].parent))}",
                      soft_wrap=True)
    return result


class _IdsOnly:
    """A tokenizer view that returns only input ids and the attention mask (what any causal LM accepts)."""

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer

    def __call__(self, text: str, **kwargs: Any) -> dict:
        batch = self._tok(text, **kwargs)
        return {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)
