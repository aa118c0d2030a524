"""The causality check by perturbation: change the future, the past must not move.

Reading the probabilities (``attn.causal_leak``) checks the masks; this checks the whole model from the
outside, whatever its attention kernel: a causal model's output at position ``t`` depends on tokens ``<= t``
only, so replacing every token after ``position`` must leave the outputs at ``0..position`` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class CausalityCheck:
    """Result of :func:`check_causality`.

    Attributes:
        position: the last position kept; every later token was replaced.
        max_change: the largest absolute change of an output at positions ``<= position``.
        scale: the largest absolute output there (for a relative reading).
        passed: ``max_change <= atol + rtol * scale``.
        output: which output was compared (``logits``, ``last_hidden_state`` ...).
    """

    position: int
    max_change: float
    scale: float
    passed: bool
    output: str

    def describe(self) -> str:
        verdict = "causal" if self.passed else "NOT causal"
        return (
            f"causality check: replacing the tokens after position {self.position} changed the {self.output} at "
            f"positions 0..{self.position} by at most {self.max_change:.3g} (scale {self.scale:.3g}): {verdict}"
        )


def model_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
    """Call ``model`` on token ids the way its family expects (keyword arguments for transformers models)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        PreTrainedModel = ()  # type: ignore[assignment]
    if isinstance(model, PreTrainedModel):
        kwargs = {"input_ids": input_ids}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return model(**kwargs)
    return model(input_ids)


def main_output(output: Any) -> tuple[str, torch.Tensor]:
    """The tensor to compare and its name: logits, else the last hidden state, else the first tensor."""
    for attr in ("logits", "last_hidden_state"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return attr, value
    if isinstance(output, torch.Tensor):
        return "output", output
    if isinstance(output, tuple | list):
        for value in output:
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return "output[0]", value
    raise TypeError(f"cannot find a tensor output in {type(output).__name__}")


def vocab_size(model: nn.Module, input_ids: torch.Tensor) -> int:
    for holder in (getattr(model, "config", None),):
        n = getattr(holder, "vocab_size", None)
        if isinstance(n, int) and n > 1:
            return n
    emb = getattr(model, "get_input_embeddings", None)
    if callable(emb):
        with_weight = emb()
        if isinstance(getattr(with_weight, "num_embeddings", None), int):
            return with_weight.num_embeddings
    return int(input_ids.max()) + 2


@torch.no_grad()
def check_causality(
    model: nn.Module,
    input_ids: torch.Tensor,
    position: int | None = None,
    attention_mask: torch.Tensor | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> CausalityCheck:
    """Replace every token after ``position`` and measure how much the outputs up to ``position`` move.

    Args:
        model: a causal model (``model(input_ids)``, or a transformers model).
        input_ids: (B, T) token ids, T >= 2.
        position: last kept position (default ``T // 2 - 1``, so half the sequence changes).
        attention_mask: passed through unchanged.
        atol, rtol: the change allowed (float rounding), absolute and relative to the outputs' scale.

    Example:
        >>> check_causality(model, ids).passed  # doctest: +SKIP
        True
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    t = input_ids.shape[-1]
    if t < 2:
        raise ValueError("check_causality needs at least two tokens")
    position = max(0, t // 2 - 1) if position is None else int(position)
    if not 0 <= position < t - 1:
        raise ValueError(f"position must be in [0, {t - 2}] for {t} tokens, got {position}")
    was_training = model.training
    model.eval()
    try:
        name, base = main_output(model_forward(model, input_ids, attention_mask))
        changed = input_ids.clone()
        n = vocab_size(model, input_ids)
        changed[:, position + 1 :] = (changed[:, position + 1 :] + 1 + n // 2) % n  # every later token differs
        _, other = main_output(model_forward(model, changed, attention_mask))
    finally:
        model.train(was_training)
    past_a = base[:, : position + 1].float()
    past_b = other[:, : position + 1].float()
    change = float((past_a - past_b).abs().max())
    scale = float(past_a.abs().max())
    return CausalityCheck(position, change, scale, change <= atol + rtol * scale, name)
