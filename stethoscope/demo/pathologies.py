"""Real training problems the demo can inject, each confined to one named module or parameter.

Each pathology breaks the demo's TinyGPT (4 blocks, see :mod:`stethoscope.demo.model`) through a genuine
mechanism, not a faked statistic, so the monitor has to find the problem the way it would in a user's run.
The names below are what the findings must name (``named_modules()`` / ``named_parameters()`` spelling):

``none``
    The healthy run. No warning or critical finding is expected.

``dead-relu`` (from step 0)
    Block 1's MLP activation is swapped for a ReLU and its up-projection bias ``transformer.h.1.mlp.c_fc.bias``
    is set to -10. Its input is a LayerNorm output (norm <= sqrt(C)) and each row of ``c_fc.weight`` has norm
    ~0.23, so every pre-activation is below -7: all 512 ReLU units output 0, their gradient is 0, and with zero
    gradients nothing can revive them (Adam's update for a zero gradient is zero). Expected:
    ``act.dead_features`` on ``transformer.h.1.mlp.act`` (100 % of features) and ``grad.zero_fraction``
    (100 % exact zeros) on ``transformer.h.1.mlp.c_fc.weight``, ``transformer.h.1.mlp.c_fc.bias``,
    ``transformer.h.1.mlp.c_proj.weight``, ``transformer.h.1.ln_2.weight`` and ``transformer.h.1.ln_2.bias``
    (``c_proj.bias`` still learns: its gradient does not pass through the ReLU). The other MLPs keep GELU,
    because ReLU MLPs in a model this small leave 5-25 % of units dead by themselves, which would blur
    where the problem is.

``exploding`` (from step ``steps // 2``)
    The learning rate jumps to 10 for every parameter and gradient clipping is switched off, the classic
    "lr far too high, no clipping". After the first such update the weights are O(10), the loss jumps from
    ~2.5 to the thousands, and the total gradient norm is 50-200x its healthy median for the rest of the
    run (it stays finite). The problem is global, so the expected ``grad.norm_spike`` is on the total
    gradient norm: target ``""`` (the root module's name in ``named_modules()``). The half of the run before
    the onset gives the spike detector its baseline.

``vanishing`` (from step 0)
    Block 0's MLP residual branch is multiplied by a fixed ``out_scale = 1e-4`` (a residual-branch scale
    like GPT-2's 1/sqrt(2 * n_layer), taken far too far). Every gradient inside that branch is scaled by
    the same 1e-4: about three orders of magnitude below the other blocks' for the whole run, while
    staying mostly above the zero threshold (1e-8), so it is "tiny", not "zero". Expected:
    ``grad.vanishing`` on ``transformer.h.0.mlp.c_fc.weight``, ``transformer.h.0.mlp.c_fc.bias``,
    ``transformer.h.0.mlp.c_proj.weight``, ``transformer.h.0.mlp.c_proj.bias``, ``transformer.h.0.ln_2.weight``
    and ``transformer.h.0.ln_2.bias`` (the module: ``transformer.h.0.mlp``).

``nan`` (from step ``steps // 2``)
    Block 2's attention softmax temperature ``transformer.h.2.attn.temperature`` is set to 0.0, so its
    forward divides the attention scores by zero: ``±inf`` scores, ``inf - inf`` inside the softmax, NaN
    probabilities and a NaN output, while its input (``ln_1``'s output) is finite. The demo skips the
    optimizer step when the gradient norm is not finite (as ``GradScaler`` does), so the weights stay
    finite and the same module is the first to produce NaN on every step from the onset on. Expected:
    ``numerics.nonfinite`` on ``transformer.h.2.attn`` (everything downstream, and every gradient, is
    non-finite too, but their inputs already were).

``unused-param`` (from step 0)
    Block 3's MLP registers a gate vector ``transformer.h.3.mlp.gate`` (shape (4C,), meant for a GLU-style
    MLP) that its forward never uses. It is handed to the optimizer, requires grad, and its ``.grad`` stays
    None after every backward. Expected: ``grad.missing`` on ``transformer.h.3.mlp.gate``.

Each class says the same in code: :attr:`Pathology.expected` maps finding codes to the exact targets.
"""

from __future__ import annotations

import difflib
from typing import ClassVar

import torch
import torch.nn as nn

from stethoscope.demo.model import TinyGPT
from stethoscope.errors import ConfigError


class Pathology:
    """The healthy run, and the interface every pathology overrides.

    The runner calls, in order: :meth:`apply` once on the freshly initialised model (before the optimizer
    is built, so structural changes such as a new parameter reach the optimizer), then on every step
    :meth:`before_step`, :meth:`lr` and :meth:`grad_clip`.
    """

    name: ClassVar[str] = "none"
    summary: ClassVar[str] = "healthy training; no problem injected"
    target: ClassVar[str | None] = None  # the one name the main critical finding must carry
    where: ClassVar[str | None] = None  # how the console names the place, when not just `target`
    expected: ClassVar[dict[str, tuple[str, ...]]] = {}  # finding code -> the exact targets it names

    def onset(self, steps: int) -> int:
        """The first step at which the problem is present (0 = from the start)."""
        return 0

    def apply(self, model: TinyGPT) -> None:
        """Change the model before training (and before the optimizer exists)."""

    def before_step(self, step: int, steps: int, model: TinyGPT) -> None:
        """Change the model at the start of ``step`` (called inside the monitor's step)."""

    def lr(self, step: int, steps: int, lr: float) -> float:
        """The learning rate for ``step``, given the healthy schedule's ``lr``."""
        return lr

    def grad_clip(self, step: int, steps: int, clip: float | None) -> float | None:
        """The max gradient norm for ``step`` (None = no clipping), given the healthy setting."""
        return clip

    def describe(self, steps: int) -> str:
        """One line for the console: what was injected, where, and from when."""
        if self.target is None:
            return self.summary
        when = f"from step {self.onset(steps)}" if self.onset(steps) else "from the start"
        codes = ", ".join(self.expected)
        shown = self.where or self.target or "the whole model (total gradient norm)"
        return f"{self.summary} ({when}); expect {codes} on {shown}"


class DeadReLU(Pathology):
    """ReLU with a -10 bias in ``transformer.h.1.mlp``: every unit of ``transformer.h.1.mlp.act`` is dead."""

    name = "dead-relu"
    summary = "ReLU units of transformer.h.1.mlp pushed dead by a -10 bias"
    target = "transformer.h.1.mlp.act"
    where = "transformer.h.1.mlp.act and the parameters feeding it"
    expected: ClassVar[dict[str, tuple[str, ...]]] = {
        "act.dead_features": ("transformer.h.1.mlp.act",),
        "grad.zero_fraction": (
            "transformer.h.1.mlp.c_fc.weight",
            "transformer.h.1.mlp.c_fc.bias",
            "transformer.h.1.mlp.c_proj.weight",
            "transformer.h.1.ln_2.weight",
            "transformer.h.1.ln_2.bias",
        ),
    }
    layer = 1
    bias = -10.0

    def apply(self, model: TinyGPT) -> None:
        mlp = model.transformer.h[self.layer].mlp
        mlp.act = nn.ReLU()
        with torch.no_grad():
            mlp.c_fc.bias.fill_(self.bias)


class Exploding(Pathology):
    """From ``steps // 2`` on: learning rate 10 for every parameter and no gradient clipping."""

    name = "exploding"
    summary = "learning rate jumps to 10 with gradient clipping off"
    target = ""  # the total gradient norm: the root module
    expected: ClassVar[dict[str, tuple[str, ...]]] = {"grad.norm_spike": ("",)}
    high_lr = 10.0

    def onset(self, steps: int) -> int:
        return steps // 2

    def lr(self, step: int, steps: int, lr: float) -> float:
        return self.high_lr if step >= self.onset(steps) else lr

    def grad_clip(self, step: int, steps: int, clip: float | None) -> float | None:
        return None if step >= self.onset(steps) else clip


class Vanishing(Pathology):
    """``transformer.h.0.mlp``'s residual branch scaled by 1e-4, and with it every gradient inside it."""

    name = "vanishing"
    summary = "transformer.h.0.mlp's output scaled by 1e-4, and with it every gradient inside it"
    target = "transformer.h.0.mlp.c_fc.weight"  # the branch's largest weight; all six are in `expected`
    where = "the parameters of transformer.h.0.mlp and transformer.h.0.ln_2"
    expected: ClassVar[dict[str, tuple[str, ...]]] = {
        "grad.vanishing": (
            "transformer.h.0.mlp.c_fc.weight",
            "transformer.h.0.mlp.c_fc.bias",
            "transformer.h.0.mlp.c_proj.weight",
            "transformer.h.0.mlp.c_proj.bias",
            "transformer.h.0.ln_2.weight",
            "transformer.h.0.ln_2.bias",
        ),
    }
    layer = 0
    scale = 1e-4

    def apply(self, model: TinyGPT) -> None:
        model.transformer.h[self.layer].mlp.out_scale = self.scale


class NaNAttention(Pathology):
    """From ``steps // 2`` on: ``transformer.h.2.attn`` divides its scores by a temperature of 0 -> NaN."""

    name = "nan"
    summary = "transformer.h.2.attn's softmax temperature set to 0 (a division by zero)"
    target = "transformer.h.2.attn"
    expected: ClassVar[dict[str, tuple[str, ...]]] = {"numerics.nonfinite": ("transformer.h.2.attn",)}
    layer = 2

    def onset(self, steps: int) -> int:
        return steps // 2

    def before_step(self, step: int, steps: int, model: TinyGPT) -> None:
        attn = model.transformer.h[self.layer].attn
        attn.temperature = 0.0 if step >= self.onset(steps) else 1.0


class UnusedParam(Pathology):
    """``transformer.h.3.mlp.gate``: registered, optimised, never used in forward, so its grad stays None."""

    name = "unused-param"
    summary = "transformer.h.3.mlp.gate is registered but never used in forward"
    target = "transformer.h.3.mlp.gate"
    expected: ClassVar[dict[str, tuple[str, ...]]] = {"grad.missing": ("transformer.h.3.mlp.gate",)}
    layer = 3

    def apply(self, model: TinyGPT) -> None:
        mlp = model.transformer.h[self.layer].mlp
        width = mlp.c_fc.out_features
        # a GLU-style gate that the forward was never updated to multiply in
        mlp.register_parameter("gate", nn.Parameter(torch.ones(width)))


PATHOLOGIES: dict[str, type[Pathology]] = {
    cls.name: cls for cls in (Pathology, DeadReLU, Exploding, Vanishing, NaNAttention, UnusedParam)
}
"""Every pathology by its command-line name, ``none`` first."""


def get_pathology(name: str) -> Pathology:
    """The pathology called ``name``; an unknown name is a :class:`ConfigError` with a did-you-mean."""
    try:
        return PATHOLOGIES[name]()
    except KeyError:
        close = difflib.get_close_matches(str(name), list(PATHOLOGIES), n=1, cutoff=0.4)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"unknown demo pathology {name!r}: {hint}choose one of {', '.join(PATHOLOGIES)}"
        ) from None
