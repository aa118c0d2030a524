"""Getting at attention probabilities without changing what the model computes.

Three sources, one record (:class:`AttentionCall`) handed to whoever listens:

* **Hugging Face models** dispatch every attention through ``transformers``' ``AttentionInterface`` by the name
  in ``config._attn_implementation`` (``sdpa``, ``eager``, ...). :class:`HFCapture` registers a function under
  ``stethoscope_<name>`` that calls the model's own implementation unchanged and then shows the call —
  queries, keys, values, the mask as given, scaling, the output and any weights it returned — to its
  listeners; it points each config at that name and restores the original on :meth:`HFCapture.remove`. The
  mask builder gets the original implementation's mask function under the new name, so the model builds the
  very same mask. Flex attention, the FlashAttention kernels and hub kernels (``flash_attention_*``,
  ``flex_attention``, names with a ``/``) keep their name, because transformers reads it elsewhere (the mask
  format, padding-free paths, which kernel to load): the same wrapper replaces their entry in the interface
  instead, and passes every module it does not watch straight through. ``paged|*`` is left alone (see
  docs/attention.md).
* **Modules that keep their weights**: a module with ``keep_attn`` and ``last_attn`` attributes (the demo's
  ``CausalSelfAttention``) stores its probabilities when ``keep_attn`` is on.
* **Modules that return their weights**: ``nn.MultiheadAttention`` and modules named by ``attention.modules``
  return ``(output, weights)``; the first 4-D (B, nh, T, S) or 3-D (B, T, S) tensor after the output is read.

Nothing here touches autograd or the random number generator: listeners run under ``no_grad`` and never
call dropout with a non-zero probability.
"""

from __future__ import annotations

import re
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stethoscope.attention.masks import BlockMaskTiles, TileMask, VarlenTiles
from stethoscope.hooks import is_compiling

PREFIX = "stethoscope_"
# Paged attention reads a cache, not the keys it is given: not captured.
_NOT_WRAPPED = re.compile(r"^paged\|")
# Flash and flex kernels (and hub kernels) are captured under their own name: transformers reads the name in
# several places (mask format, padding-free paths, which flash package to load), so it must not change.
_IN_PLACE = re.compile(r"flash|flex|/")


@dataclass
class AttentionCall:
    """One attention computation, as a listener sees it.

    Attributes:
        name: the attention module's name as ``named_modules()`` spells it.
        module: the module itself (only valid during the call).
        query: (B, nh, Tq, hs) — None for module captures.
        key, value: (B, nkv, Tk, hs); ``nkv`` < ``nh`` with grouped-query attention.
        mask: the mask as the implementation received it: additive float, boolean (True = attend) or None.
        scaling: the factor the scores are multiplied by.
        causal: whether the module is meant to be causal (``is_causal``): the truth leaks are measured against.
        implicit_causal: the implementation applies a causal mask itself when ``mask`` is None (SDPA's
            ``is_causal``).
        weights: probabilities the implementation or module returned, (B, nh, Tq, Tk), or None.
        weights_pre_dropout: ``weights`` are the probabilities before dropout (eval, or no dropout).
        softcap, position_bias: score transforms some families apply before the mask.
        implementation: the original implementation's name (``sdpa``, ``eager``, ``module`` ...).
        mask_tiles: the mask of a kernel that takes none as a (B, nh, Tq, Tk) tensor — a flex ``BlockMask``, or
            what a FlashAttention kernel derives from padding, packed sequences, causality and its window —
            evaluated one tile at a time (:mod:`stethoscope.attention.masks`); ``mask`` is None then.
        rerun: calls the original implementation again without dropout and returns its weights (eager
            capture when dropout was on); None when not possible.
    """

    name: str
    module: nn.Module
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    scaling: float | None = None
    causal: bool = False
    implicit_causal: bool = False
    weights: torch.Tensor | None = None
    weights_pre_dropout: bool = True
    softcap: float | None = None
    position_bias: torch.Tensor | None = None
    implementation: str = "module"
    rerun: Callable[[], torch.Tensor | None] | None = None
    mask_tiles: TileMask | None = None
    extra: dict = field(default_factory=dict)


Listener = Callable[[AttentionCall], None]


# ---------------------------------------------------------------------- Hugging Face
# module -> [(capture, name)]: the captures watching it (a monitor and a step-by-step run may overlap)
_WATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_REGISTERED: set[str] = set()


def _modeling_module(module: nn.Module) -> Any:
    return sys.modules.get(type(module).__module__)


def original_function(module: nn.Module, implementation: str) -> Callable | None:
    """The function ``module`` would call for ``implementation`` without stethoscope in between.

    ``eager`` is each family's own ``eager_attention_forward`` (the default its modeling file passes to
    ``get_interface``); anything else comes from the attention interface the modeling file uses (a family may
    override an entry locally).
    """
    mod = _modeling_module(module)
    if implementation == "eager":
        fn = getattr(mod, "eager_attention_forward", None)
        return fn if callable(fn) else None
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    interface = getattr(mod, "ALL_ATTENTION_FUNCTIONS", None) or ALL_ATTENTION_FUNCTIONS
    try:
        return interface[implementation]
    except KeyError:
        return None


def _wrapper(implementation: str, original: Callable | None = None) -> Callable:
    """The function registered as ``stethoscope_<implementation>``, or in place of ``original`` (flash, flex)."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        fn = original if original is not None else original_function(module, implementation)
        if fn is None:  # pragma: no cover - checked when the capture was installed
            raise RuntimeError(f"stethoscope: no original attention function for {implementation!r}")
        out = fn(module, query, key, value, attention_mask, *args, **kwargs)
        watchers = _WATCHED.get(module)
        if watchers and not is_compiling():
            call = None
            for capture, name in list(watchers):
                if call is None:
                    call = _hf_call(name, module, implementation, fn, query, key, value, attention_mask, args,
                                    kwargs, out)
                capture.dispatch(call)
        return out

    attention.__name__ = f"stethoscope_{implementation}_attention"
    attention.__qualname__ = attention.__name__
    return attention


# (id(mapping), name) -> [mapping, original function, wrapper, captures using it]
_SWAPPED: dict[tuple[int, str], list] = {}


def _swap_in(module: nn.Module, implementation: str) -> tuple[int, str] | None:
    """Put the wrapper in place of ``implementation`` in the interface ``module``'s family uses, keeping the name.

    The entry is replaced where the family finds it (a local override of its modeling file's interface, else the
    global mapping) and shared by every capture; modules nobody watches go straight to the original.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    interface = getattr(_modeling_module(module), "ALL_ATTENTION_FUNCTIONS", None) or ALL_ATTENTION_FUNCTIONS
    local = getattr(interface, "_local_mapping", {})
    mapping = local if implementation in local else getattr(interface, "_global_mapping", {})
    if implementation not in mapping:
        return None
    key = (id(mapping), implementation)
    entry = _SWAPPED.get(key)
    if entry is None:
        original = mapping[implementation]
        wrapper = _wrapper(implementation, original)
        mapping[implementation] = wrapper
        entry = _SWAPPED[key] = [mapping, original, wrapper, 0]
    entry[3] += 1
    return key


def _swap_out(key: tuple[int, str]) -> None:
    """One capture less; the last one puts the original function back (unless someone replaced it since)."""
    entry = _SWAPPED.get(key)
    if entry is None:
        return
    entry[3] -= 1
    if entry[3] <= 0:
        mapping, original, wrapper, _ = entry
        if mapping.get(key[1]) is wrapper:
            mapping[key[1]] = original
        del _SWAPPED[key]


def _is_block_mask(mask: Any) -> bool:
    return hasattr(mask, "mask_mod") and hasattr(mask, "kv_num_blocks")


def _register(implementation: str) -> str:
    """Register the wrapper (and the original's mask function) under ``stethoscope_<implementation>``."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = PREFIX + implementation
    if name in _REGISTERED:
        return name
    AttentionInterface.register(name, _wrapper(implementation))
    # The mask builder looks the implementation up by name; without an entry it builds no mask at all, which
    # is also what an implementation registered without a mask function gets.
    if implementation in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    _REGISTERED.add(name)
    return name


def _hf_call(name, module, implementation, fn, query, key, value, mask, args, kwargs, out) -> AttentionCall:
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(module, "scaling", None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    dropout = float(kwargs.get("dropout", 0.0) or 0.0)
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    weights = out[1] if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], torch.Tensor) else None
    pre_dropout = dropout == 0.0 or not module.training
    # SDPA (and implementations like it) apply `is_causal` themselves when no mask is given; eager does not
    implicit_causal = implementation != "eager" and causal
    tiles = None
    if _IN_PLACE.search(implementation):
        weights = None  # flex returns the log-sum-exp there (on GPU), flash nothing: never probabilities
        pre_dropout = True  # the statistics are recomputed before dropout anyway
        b, tq, tk = query.shape[0], query.shape[2], key.shape[2]
        if "flex" in implementation:
            implicit_causal = False  # flex applies the mask it is given and nothing else
            if _is_block_mask(mask):
                tiles = BlockMaskTiles(mask, torch.arange(b, device=query.device))
                mask = None
            elif isinstance(mask, torch.Tensor) and mask.dim() == 4:
                mask = mask[:, :1].float()  # flex adds head 0 of a tensor mask as a score bias (a bool one too)
        elif mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            # FlashAttention: padding, packed sequences, causality and the window are the kernel's arguments
            tiles = VarlenTiles.build(tq, tk, query.device, causal, kwargs.get("sliding_window"), attention_mask=mask,
                                      position_ids=kwargs.get("position_ids"),
                                      cu_seqlens_q=kwargs.get("cu_seq_lens_q"),
                                      cu_seqlens_k=kwargs.get("cu_seq_lens_k"), batch=b)
            mask = None
            implicit_causal = False

    def rerun() -> torch.Tensor | None:
        kw = dict(kwargs)
        kw["dropout"] = 0.0  # dropout with p = 0 returns its input and draws no random numbers
        with torch.no_grad():
            again = fn(module, query, key, value, mask, *args, **kw)
        return again[1] if isinstance(again, tuple) and len(again) > 1 else None

    return AttentionCall(
        name=name,
        module=module,
        query=query,
        key=key,
        value=value,
        mask=mask,
        scaling=float(scaling),
        causal=causal,
        implicit_causal=implicit_causal,
        weights=weights,
        weights_pre_dropout=pre_dropout,
        softcap=kwargs.get("softcap"),
        position_bias=kwargs.get("position_bias"),
        implementation=implementation,
        rerun=None if pre_dropout else rerun,
        mask_tiles=tiles,
    )


def _configs(model: nn.Module) -> list[Any]:
    """Every distinct transformers config the model's modules hold (sub-models may have their own)."""
    try:
        from transformers import PretrainedConfig
    except ImportError:  # pragma: no cover - transformers is optional
        return []
    seen: dict[int, Any] = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if isinstance(cfg, PretrainedConfig) and id(cfg) not in seen:
            seen[id(cfg)] = cfg
            stack = [cfg]
            while stack:  # sub-configs (vision/text towers) carry their own implementation
                c = stack.pop()
                for key in getattr(c, "sub_configs", {}) or {}:
                    sub = getattr(c, key, None)
                    if isinstance(sub, PretrainedConfig) and id(sub) not in seen:
                        seen[id(sub)] = sub
                        stack.append(sub)
    return list(seen.values())


def is_hf_model(model: nn.Module) -> bool:
    """True when some module of ``model`` holds a transformers config (so attention goes through the interface)."""
    if "transformers" not in sys.modules:
        return False
    return bool(_configs(model))


class HFCapture:
    """Route a Hugging Face model's attention through stethoscope's wrapper while installed.

    Args:
        model: any module containing transformers models (a ``PreTrainedModel`` or a wrapper around one).
        names: module -> name, as findings should spell it.
        eager: switch to each family's eager attention (what ``output_attentions`` uses) instead of keeping
            the current implementation.

    Attributes:
        implementations: original implementation name -> what was done with it ("wrapped", or why not).
    """

    def __init__(self, model: nn.Module, names: dict[nn.Module, str], eager: bool = False):
        self.listeners: list[Listener] = []
        self._restore: list[tuple[Any, str]] = []  # (config, original _attn_implementation_internal)
        self._watched: list[weakref.ref] = []
        self._swapped: list[tuple[int, str]] = []  # interface entries replaced in place
        self.implementations: dict[str, str] = {}
        configs = _configs(model)
        samples: dict[int, nn.Module] = {}  # config id -> one module reading it (to find its family's eager)
        for module in model.modules():
            cfg = getattr(module, "config", None)
            if cfg is not None and id(cfg) not in samples:
                samples[id(cfg)] = module
        for cfg in configs:
            current = getattr(cfg, "_attn_implementation", None)
            if not isinstance(current, str) or not current:
                continue
            original = current[len(PREFIX):] if current.startswith(PREFIX) else current
            wanted = "eager" if eager else original
            if _NOT_WRAPPED.search(wanted):
                self.implementations[original] = (f"not captured: {wanted} reads its keys from a paged cache, "
                                                  "not from the call")
                continue
            sample = samples.get(id(cfg))
            if _IN_PLACE.search(wanted):
                key = _swap_in(sample, wanted) if sample is not None else None
                if key is None:
                    self.implementations[original] = f"not captured: no {wanted!r} in the attention interface"
                    continue
                self._swapped.append(key)
                self.implementations[original] = "wrapped"
                continue
            if wanted == "eager" and getattr(cfg, "reorder_and_upcast_attn", False):
                self.implementations[original] = "not captured: GPT-2's reorder_and_upcast_attn path is eager-only"
                continue
            if wanted == "eager" and sample is not None and original_function(sample, "eager") is None:
                self.implementations[original] = "not captured: the model's file has no eager_attention_forward"
                continue
            target = _register(wanted)
            if current != target:
                self._restore.append((cfg, current))
                cfg._attn_implementation_internal = target  # not the setter: sub-configs are handled one by one
            self.implementations[original] = "wrapped" if not eager else f"wrapped (switched to eager from {original})"
        for module, name in names.items():
            if _looks_like_hf_attention(module):
                _WATCHED.setdefault(module, []).append((self, name))
                self._watched.append(weakref.ref(module))

    @property
    def active(self) -> bool:
        """Some config was routed through the wrapper and some attention module is watched."""
        wrapped = any(v.startswith("wrapped") for v in self.implementations.values())
        return wrapped and bool(self._watched)

    def dispatch(self, call: AttentionCall) -> None:
        for listener in list(self.listeners):
            listener(call)

    def remove(self) -> None:
        """Restore every config's implementation and stop watching (safe to call twice)."""
        for cfg, value in reversed(self._restore):
            cfg._attn_implementation_internal = value
        self._restore = []
        for key in self._swapped:
            _swap_out(key)
        self._swapped = []
        for ref in self._watched:
            module = ref()
            if module is None:
                continue
            watchers = _WATCHED.get(module)
            if watchers:
                watchers[:] = [w for w in watchers if w[0] is not self]
                if not watchers:
                    _WATCHED.pop(module, None)
        self._watched = []
        self.listeners = []


def _looks_like_hf_attention(module: nn.Module) -> bool:
    """An attention module of a transformers model: it reads its config and lives in a modeling file that
    dispatches through the attention interface."""
    mod = _modeling_module(module)
    if mod is None or not getattr(mod, "__name__", "").startswith("transformers."):
        return False
    return hasattr(module, "config") and hasattr(mod, "ALL_ATTENTION_FUNCTIONS")


# ---------------------------------------------------------------------- plain modules
def keeps_weights(module: nn.Module) -> bool:
    """The demo's protocol: ``keep_attn`` switches storing the probabilities on ``last_attn``."""
    return hasattr(module, "keep_attn") and hasattr(module, "last_attn")


def module_causal(module: nn.Module) -> bool:
    """Whether a plain attention module is meant to be causal: its ``is_causal`` attribute, else its class name."""
    flag = getattr(module, "is_causal", None)
    if isinstance(flag, bool):
        return flag
    return "causal" in type(module).__name__.lower()


def returned_weights(output: Any) -> torch.Tensor | None:
    """The attention weights in a ``(output, weights, ...)`` tuple: the first 4-D, else 3-D, float tensor."""
    if not isinstance(output, tuple | list) or len(output) < 2:
        return None
    for want in (4, 3):
        for t in output[1:]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == want:
                return t if want == 4 else t.unsqueeze(1)  # (B, T, S): heads averaged -> one "head"
    return None
