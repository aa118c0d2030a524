"""What the rules need to know about the model and optimizer, taken once at construction as plain data.

Rules must not hold the model (after ``close()`` nothing may reference it), so everything structural they
use is read here, when the monitor is built: module types, which parameter belongs to which module, which
parameters are embeddings or key-projection biases (whose zero gradients are normal), and which optimizer
param group holds each parameter. Names are spelled as the findings spell them (wrapper prefixes removed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stethoscope.naming import clean_name

# Activation modules by class name. "saturating" ones are flat for large |x| on at least one side, so a
# pre-activation beyond the bound starves them of gradient; ReLU-like ones do not saturate (they die).
_SATURATING = {
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "Hardtanh": "hardtanh",
    "ReLU6": "relu6",
    "Hardsigmoid": "hardsigmoid",
    "Softsign": "softsign",
    "LogSigmoid": "logsigmoid",
    "GELU": "gelu",
    "SiLU": "silu",
    "Mish": "mish",
    "ELU": "elu",
    "CELU": "celu",
    "SELU": "selu",
    "Hardswish": "hardswish",
    "Softplus": "softplus",
    "Tanhshrink": "tanhshrink",
    # Hugging Face activation modules (transformers.activations)
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu",
    "FastGELUActivation": "gelu",
    "QuickGELUActivation": "gelu",
    "GELUTanh": "gelu",
    "PytorchGELUTanh": "gelu",
    "AccurateGELUActivation": "gelu",
    "SiLUActivation": "silu",
    "MishActivation": "mish",
    "SigmoidActivation": "sigmoid",
    "ClippedGELUActivation": "gelu",
    "LinearActivation": "linear",
}
_RELU_LIKE = {
    "ReLU": "relu",
    "LeakyReLU": "leaky_relu",
    "PReLU": "prelu",
    "RReLU": "rrelu",
    "ReLUSquaredActivation": "relu",
    "LaplaceActivation": "other",
}
LINEAR_TYPES = ("Linear", "Conv1D", "NonDynamicallyQuantizableLinear", "LazyLinear", "Bilinear")
NORM_TYPES = (
    "LayerNorm",
    "RMSNorm",
    "GroupNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "LlamaRMSNorm",
    "T5LayerNorm",
    "MistralRMSNorm",
    "Qwen2RMSNorm",
    "GemmaRMSNorm",
)

# Separate key projections (their bias gets exactly zero gradient under softmax attention) and fused
# q,k,v projections (one third of their bias does), by the attribute name models give them.
_KEY_PROJ = {"k_proj", "key", "k", "to_k", "wk", "k_lin", "key_proj", "k_linear", "linear_k", "w_k"}
_FUSED_QKV = {
    "c_attn",
    "qkv",
    "qkv_proj",
    "query_key_value",
    "Wqkv",
    "wqkv",
    "to_qkv",
    "qkv_linear",
    "W_pack",
    "in_proj",
}
_ADAM_LIKE = (
    "Adam",
    "AdamW",
    "NAdam",
    "RAdam",
    "Adamax",
    "SparseAdam",
    "AdamW8bit",
    "Adam8bit",
    "Lion",
    "Adafactor",
    "LAMB",
    "Lamb",
    "FusedAdam",
)


def activation_kind(type_name: str) -> str | None:
    """'gelu', 'tanh', 'relu', ... for an activation module's class name, None for anything else."""
    if type_name in _SATURATING:
        return _SATURATING[type_name]
    if type_name in _RELU_LIKE:
        return _RELU_LIKE[type_name]
    return None


def is_saturating(kind: str | None) -> bool:
    return kind is not None and kind in set(_SATURATING.values()) - {"linear"}


@dataclass
class ParamInfo:
    """One trainable parameter: its owner module, local name, size, and what is normal for it."""

    name: str
    owner: str  # the module that registers it ("" for the root)
    local: str  # its attribute name in the owner ("weight", "bias", "in_proj_bias", ...)
    numel: int
    ndim: int
    embedding: bool = False  # rows of absent tokens get no gradient
    key_bias_share: float = 0.0  # share of entries whose gradient is exactly zero under softmax attention
    group: int | None = None  # optimizer param group index, None when not in the optimizer


@dataclass
class ModelInfo:
    """Plain-data description of a model (and optimizer) for the rules. Holds no tensor or module."""

    module_types: dict[str, str] = field(default_factory=dict)
    params: dict[str, ParamInfo] = field(default_factory=dict)
    optimizer: str | None = None  # class name
    adam_like: bool = False
    group_hparams: list[dict] = field(default_factory=list)  # lr, betas, eps, weight_decay at construction
    scaler: bool = False  # a GradScaler was handed to the monitor

    def is_linear(self, module: str) -> bool:
        return self.module_types.get(module, "") in LINEAR_TYPES

    def is_norm(self, module: str) -> bool:
        t = self.module_types.get(module, "")
        return t in NORM_TYPES or t.endswith(("LayerNorm", "RMSNorm"))

    def removes_bias(self, module: str) -> bool:
        """A batch/instance normalisation: it subtracts each channel's mean, so a bias added just before it
        (a Linear's or Conv's) changes nothing downstream and gets exactly zero gradient (up to rounding)."""
        t = self.module_types.get(module, "")
        return t.startswith(
            ("BatchNorm", "SyncBatchNorm", "LazyBatchNorm", "InstanceNorm", "LazyInstanceNorm")
        )

    def activation(self, module: str) -> str | None:
        return activation_kind(self.module_types.get(module, ""))

    def params_of(self, module: str) -> list[str]:
        """The trainable parameters ``module`` registers itself (not its children's)."""
        by_owner = self.__dict__.get("_by_owner")
        if by_owner is None or by_owner[0] != len(self.params):
            index: dict[str, list[str]] = {}
            for p in self.params.values():
                index.setdefault(p.owner, []).append(p.name)
            by_owner = self.__dict__["_by_owner"] = (len(self.params), index)
        return by_owner[1].get(module, [])

    @classmethod
    def inspect(cls, model: Any, optimizer: Any = None, scaler: bool = False) -> ModelInfo:
        """Read the structure of ``model`` (an ``nn.Module``) and ``optimizer`` into plain data."""
        info = cls(scaler=scaler)
        if model is None:
            return info
        modules = dict(model.named_modules())
        for raw, module in modules.items():
            info.module_types[clean_name(raw)] = type(module).__name__
        ids: dict[int, str] = {}
        for raw, p in model.named_parameters():
            if not p.requires_grad:
                continue
            name = clean_name(raw)
            owner_raw, _, local = raw.rpartition(".")
            owner = clean_name(owner_raw)
            owner_mod = modules.get(owner_raw)
            pi = ParamInfo(name, owner, local, int(p.numel()), int(p.dim()))
            pi.embedding = _is_embedding(owner_mod, local, p)
            pi.key_bias_share = _key_bias_share(owner_raw, local, owner_mod, modules, p)
            info.params[name] = pi
            ids[id(p)] = name
        if optimizer is not None:
            info.optimizer = type(optimizer).__name__
            info.adam_like = any(a.lower() in info.optimizer.lower() for a in _ADAM_LIKE)
            for gi, group in enumerate(getattr(optimizer, "param_groups", [])):
                info.group_hparams.append(
                    {
                        k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in group.items()
                        if k in ("lr", "betas", "eps", "weight_decay", "momentum")
                        and isinstance(v, int | float | tuple)
                    }
                )
                for p in group.get("params", []):
                    name = ids.get(id(p))
                    if name is not None:
                        info.params[name].group = gi
        return info


def _is_embedding(owner: Any, local: str, p: Any) -> bool:
    if owner is None or local != "weight" or p.dim() != 2:
        return False
    t = type(owner).__name__
    import torch.nn as nn

    return isinstance(owner, nn.Embedding | nn.EmbeddingBag) or t.endswith("Embedding")


def _key_bias_share(owner_raw: str, local: str, owner: Any, modules: dict, p: Any) -> float:
    """Share of this bias whose gradient is exactly zero under softmax attention (0 when not a key bias).

    Softmax is unchanged by adding a constant to a row of scores, and a key bias adds ``q_t . b_k`` to every
    score of query row t: a per-row constant, so its gradient is exactly zero. (Not with rotary position
    embeddings, which rotate the bias per position; then the observed gradient is simply not zero and the
    exemption changes nothing.)
    """
    if owner is None:
        return 0.0
    if type(owner).__name__ == "MultiheadAttention" and local == "in_proj_bias":
        return 1.0 / 3.0
    if local != "bias" or p.dim() != 1:
        return 0.0
    attr = owner_raw.rpartition(".")[2]
    if attr in _KEY_PROJ:
        return 1.0
    if attr in _FUSED_QKV:
        n_out = int(p.numel())
        parent = modules.get(owner_raw.rpartition(".")[0])
        kv = _kv_width(parent)
        if kv and 0 < kv < n_out:
            return kv / n_out
        if getattr(parent, "is_cross_attention", False):
            return 0.5  # GPT-2 cross-attention fuses only k and v into c_attn
        return 1.0 / 3.0
    return 0.0


def _kv_width(parent: Any) -> int | None:
    """Width of the key projection when an attention module says how many key/value heads it has."""
    if parent is None:
        return None
    n_kv = getattr(parent, "num_key_value_heads", None) or getattr(parent, "num_kv_heads", None)
    head_dim = getattr(parent, "head_dim", None)
    if isinstance(n_kv, int) and isinstance(head_dim, int):
        return n_kv * head_dim
    return None
