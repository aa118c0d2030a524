"""The layers inside a multi-layer ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``, which is one module to hooks.

A fused recurrent module only exposes its top layer's frames, yet a middle layer is often the best one to
probe. :class:`LayerRunner` recomputes layer ``k`` from the inputs the fused module was called with: a
single-layer module of the same class runs with layer ``k``'s own weights (``torch.func.functional_call``,
no copies), fed the previous layer's output and layer ``k``'s slice of the initial state. It is the same
kernel on the same numbers, so the top layer matches the fused module bit for bit (tested), and packed
inputs stay packed. Inter-layer dropout is a training-time thing; extraction runs in eval mode.

Final states of a recurrent module are laid out ``(num_layers * dirs, B, H)``, not batch first:
:func:`state_to_items` turns them into one row per item.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def is_multilayer_rnn(module: nn.Module) -> bool:
    """A fused recurrent module with two or more layers."""
    return isinstance(module, nn.RNNBase) and module.num_layers >= 2


class LayerRunner:
    """Runs the first layers of a fused recurrent module one by one and returns each layer's output.

    Args:
        rnn: the fused module (``nn.LSTM``, ``nn.GRU`` or ``nn.RNN``).
    """

    def __init__(self, rnn: nn.RNNBase):
        self.rnn = rnn
        self._singles: dict[int, nn.RNNBase] = {}

    def _single(self, k: int) -> nn.RNNBase:
        """A one-layer module shaped like layer ``k`` (its own random weights are never used)."""
        if k not in self._singles:
            rnn = self.rnn
            dirs = 2 if rnn.bidirectional else 1
            out_size = (getattr(rnn, "proj_size", 0) or rnn.hidden_size) * dirs
            kwargs: dict[str, Any] = {
                "num_layers": 1,
                "bias": rnn.bias,
                "batch_first": rnn.batch_first,
                "bidirectional": rnn.bidirectional,
            }
            if isinstance(rnn, nn.LSTM):
                kwargs["proj_size"] = rnn.proj_size
            if type(rnn) is nn.RNN:
                kwargs["nonlinearity"] = rnn.nonlinearity
            w = rnn.weight_ih_l0
            self._singles[k] = type(rnn)(
                rnn.input_size if k == 0 else out_size,
                rnn.hidden_size,
                device=w.device,
                dtype=w.dtype,
                **kwargs,
            ).eval()
        return self._singles[k]

    def run(self, args: tuple, kwargs: dict, upto: int) -> list[Any]:
        """Outputs ``(output, state)`` of layers ``0..upto`` for the fused module's call ``(args, kwargs)``.

        Each has the fused module's output structure for a one-layer module: ``output`` is (B, T, dirs*H)
        (or (T, B, ...) without ``batch_first``, or a ``PackedSequence``) and ``state`` (dirs, B, H), a
        ``(h_n, c_n)`` pair for an LSTM.
        """
        rnn = self.rnn
        x = args[0] if args else kwargs["input"]
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        dirs = 2 if rnn.bidirectional else 1
        outs = []
        for k in range(upto + 1):
            single = self._single(k)
            params = {
                name: getattr(rnn, name.replace("_l0", f"_l{k}")) for name in single._flat_weights_names
            }
            if hx is None:
                hk = None
            elif isinstance(hx, tuple):  # LSTM (h_0, c_0): (L * dirs, B, H) each
                hk = tuple(s[k * dirs : (k + 1) * dirs] for s in hx)
            else:
                hk = hx[k * dirs : (k + 1) * dirs]
            out = torch.func.functional_call(single, params, (x,) if hk is None else (x, hk))
            outs.append(out)
            x = out[0]
        return outs


def is_state_path(module: nn.Module, tap_path: tuple, source: str) -> bool:
    """Whether a tap reads a recurrent module's final state (``output[1]...``), laid out (layers*dirs, B, H)."""
    return (
        isinstance(module, nn.RNNBase)
        and source == "output"
        and bool(tap_path)
        and tap_path[0] == ("index", 1)
    )


def state_to_items(state: torch.Tensor) -> torch.Tensor:
    """(L * dirs, B, H) final states -> (B, L * dirs * H), layers then directions; (B, H) is kept."""
    if state.dim() == 3:
        return state.transpose(0, 1).reshape(state.shape[1], -1)
    return state
