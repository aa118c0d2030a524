"""Hidden states of named layers, pooled over time, stored per layer in memory-mappable ``.npy`` arrays.

Any ``torch.nn.Module`` can be probed through a :class:`ProbeAdapter`: the module plus a callable that
turns a batch of :class:`~stethoscope.probe.manifest.ProbeItem` into its inputs::

    def make_adapter():
        model = MyTTS.load("ckpt/")                       # any nn.Module
        def preprocess(items):                            # list[ProbeItem] -> inputs
            ids, mask = my_tokenize([it.text for it in items])
            return ModelInputs(kwargs={"input_ids": ids}, mask=mask)   # mask: (B, T) valid steps
        return ProbeAdapter(model, preprocess, aliases={"decoder_block_08": "decoder.layers.8"})

A layer can be a *tap* (taps.py): an output path (``lstm:output[1][0]``), a module's input, one layer of
a multi-layer RNN (``lstm.layers.1``, recurrent.py). A forward hook on each tapped module reduces the tensor
to per-item vectors inside the hook, every requested pooling from the one tensor (pooling.py), so full
hidden states never pile up; extraction writes each batch and then marks its items done,
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stethoscope.hooks import HookSet
from stethoscope.probe.config import EXTRACTION_THREADS as DEFAULT_THREADS
from stethoscope.probe.errors import ProbeLayerError, ProbeModelError
from stethoscope.probe.pooling import NONE, pool, pool_steps, step_mask, to_steps  # noqa: F401  (pool: API)
from stethoscope.probe.recurrent import LayerRunner, is_multilayer_rnn, is_state_path, state_to_items
from stethoscope.probe.taps import Inputs, Tap, parse_tap, rnn_layer_of, select

SCHEMA_VERSION = 2
_CHECKPOINT_SECONDS = 5.0
_GENERIC = {
    "layer",
    "layers",
    "h",
    "blocks",
    "block",
    "model",
    "transformer",
    "base_model",
    "module",
    "encoder_layers",
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelInputs:
    """What a preprocessing callable returns when a plain dict or tensor is not enough.

    Attributes:
        args: positional arguments of ``module(...)``.
        kwargs: keyword arguments.
        mask: (B, T) valid time steps of the *input* (1 = real, 0 = padding); mapped proportionally onto
            a layer's own time axis when lengths differ (e.g. audio frames after striding). None = all valid.
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    mask: torch.Tensor | None = None


@dataclass
class ProbeAdapter:
    """A module to probe and the callable that prepares its inputs.

    Attributes:
        module: any ``torch.nn.Module``; hooks go on its named submodules.
        preprocess: ``list[ProbeItem] -> ModelInputs | dict | Tensor | tuple``. A dict is passed as
            keyword arguments and its ``attention_mask`` (if any) is the pooling mask.
        aliases: friendly layer names -> module names, added to the automatic ones.
        time_axis: the time axis of the hooked outputs (1 for (B, T, H), 2 for (B, H, T)).
        cast_inputs: cast floating-point inputs to the module's dtype (False for a front end).
    """

    module: torch.nn.Module
    preprocess: Callable[[list], Any]
    aliases: dict[str, str] = field(default_factory=dict)
    time_axis: int = 1
    cast_inputs: bool = True


def _block_lists(module: torch.nn.Module) -> list[tuple[str, int, str]]:
    """(module name, length, alias prefix) of every list of two or more same-class blocks with weights."""
    found = []
    for name, mod in module.named_modules():
        if not isinstance(mod, torch.nn.ModuleList | torch.nn.Sequential) or len(mod) < 2:
            continue
        if len({type(c) for c in mod}) != 1 or not any(True for _ in mod.parameters()):
            continue
        parts = [p for p in name.split(".") if p and not p.isdigit()]
        owner = next((p for p in reversed(parts) if p.lower() not in _GENERIC), "")
        found.append((name, len(mod), f"{owner}_block_" if owner else "block_"))
    return found


def layer_aliases(module: torch.nn.Module) -> dict[str, str]:
    """Friendly names for the repeated blocks of a model: ``<owner>_block_<NN>`` -> module name.

    A block list is a ``ModuleList``/``Sequential`` of two or more children of one class. Its owner is
    the nearest path component that is not generic (``layers``, ``h``, ``model``, ...): ``encoder.layer.3``
    becomes ``encoder_block_03``, ``decoder.layers.8`` ``decoder_block_08``, and ``model.layers.0`` (one
    list, no owner) ``block_00``. When the model has one block list, ``block_NN`` names it too. The layers
    of a fused multi-layer RNN ``encoder.lstm`` are ``lstm_layer_NN`` -> ``encoder.lstm.layers.N``.
    """
    lists = _block_lists(module)
    out: dict[str, str] = {}
    for name, n, prefix in lists:
        for i in range(n):
            out.setdefault(f"{prefix}{i:02d}", f"{name}.{i}" if name else str(i))
    if len(lists) == 1:
        name, n, _ = lists[0]
        for i in range(n):
            out.setdefault(f"block_{i:02d}", f"{name}.{i}" if name else str(i))
    for name, n, prefix in _rnn_lists(module):
        for i in range(n):
            out.setdefault(f"{prefix}{i:02d}", f"{name}.layers.{i}")
    return out


def _rnn_lists(module: torch.nn.Module) -> list[tuple[str, int, str]]:
    """(module name, layers, alias prefix) of every fused recurrent module with two or more layers."""
    out = []
    for name, mod in module.named_modules():
        if is_multilayer_rnn(mod):
            parts = [p for p in name.split(".") if p and not p.isdigit()]
            owner = next((p for p in reversed(parts) if p.lower() not in _GENERIC), "")
            out.append((name, mod.num_layers, f"{owner}_layer_" if owner else "rnn_layer_"))
    return out


def _module_or_rnn_layer(name: str, modules: dict[str, torch.nn.Module]) -> bool:
    """Whether ``name`` is a module, or ``<rnn>.layers.<k>`` of a fused multi-layer recurrent module."""
    if name in modules:
        return True
    split = rnn_layer_of(name)
    if split is None or split[0] not in modules or not is_multilayer_rnn(modules[split[0]]):
        return False
    rnn = modules[split[0]]
    if split[1] >= rnn.num_layers:
        raise ProbeLayerError(
            f"layer {name!r}: {split[0]} ({type(rnn).__name__}) has {rnn.num_layers} layers, "
            f"{split[0]}.layers.0 to {split[0]}.layers.{rnn.num_layers - 1}"
        )
    return True


def resolve_layers(
    module: torch.nn.Module, requested: Sequence[str] | str, extra_aliases: dict[str, str] | None = None
) -> dict[str, str]:
    """Map requested layers (aliases, module names or tap specs, or ``"all"``) to tap specs on module names.

    A plain module gives its name (``decoder_block_02`` -> ``decoder.layers.2``); a tap keeps its selector
    and pooling with the module name swapped in (``encoder_block_03:output[0]@first`` ->
    ``encoder.layer.3:output[0]@first``); see :mod:`stethoscope.probe.taps`. Aliases may point at taps.
    ``"all"`` means every block of the model's longest block list, named by its aliases (or, in a model
    without one, every layer of its deepest multi-layer RNN: ``<owner>_layer_NN``), then the user's aliases.

    Raises:
        ProbeLayerError: an unknown name, with the closest aliases and module names; a malformed spec.
    """
    modules = dict(module.named_modules())
    extra = dict(extra_aliases or {})
    aliases = {**layer_aliases(module), **extra}
    for alias, target in extra.items():
        tap = parse_tap(target)
        if not _module_or_rnn_layer(tap.name, modules):
            close = difflib.get_close_matches(tap.name, list(modules), n=3, cutoff=0.5)
            raise ProbeLayerError(
                f"alias {alias!r} points at module {tap.name!r}, which {type(module).__name__} does not have"
                + (f"; closest: {', '.join(close)}" if close else "")
            )
    if requested == "all":
        lists = _block_lists(module)
        rnns = _rnn_lists(module)
        if not lists and not rnns and not extra:
            raise ProbeLayerError(
                f"{type(module).__name__} has no repeated block list (nor multi-layer RNN) to take 'all' from: "
                "list layers by alias or module name (see model.named_modules())"
            )
        names = []
        if lists:
            # the longest list; on a tie the heavier one (transformer blocks over a conv stem)
            weight = {n: sum(p.numel() for p in module.get_submodule(n).parameters()) for n, _, _ in lists}
            name, n, prefix = max(lists, key=lambda x: (x[1], weight[x[0]]))
            names = [f"{prefix}{i:02d}" for i in range(n)]
        elif rnns:
            name, n, prefix = max(rnns, key=lambda x: x[1])
            names = [f"{prefix}{i:02d}" for i in range(n)]
        names += [a for a in extra if a not in names]
    else:
        names = list(requested)
    out: dict[str, str] = {}
    for name in names:
        if name in aliases:
            target = parse_tap(aliases[name])
            out[name] = str(target)
            continue
        tap = parse_tap(name)
        base = aliases.get(tap.name)
        if base is not None:  # an alias with a selector / pooling of its own: the spec's win
            alias_tap = parse_tap(base)
            tap = tap.with_name(alias_tap.name) if tap.explicit else Tap(
                alias_tap.name, alias_tap.source, alias_tap.path, tap.poolings or alias_tap.poolings,
                alias_tap.explicit,
            )
        elif not _module_or_rnn_layer(tap.name, modules):
            close = difflib.get_close_matches(tap.name, [*aliases, *modules], n=3, cutoff=0.5)
            some = ", ".join(list(aliases)[:6])
            raise ProbeLayerError(
                f"layer {tap.name!r} is neither an alias nor a module of {type(module).__name__}"
                + (f"; did you mean {', '.join(map(repr, close))}?" if close else "")
                + (f" (aliases include {some}, ...)" if some else "")
            )
        out[name] = str(tap)
    return out


class _Capture:
    """Forward hooks that reduce each tap's tensor to per-item vectors as it is produced; removed on exit.

    One hook per module serves all of its taps (output, input, per-layer RNN outputs), and every pooling of
    a tap is computed from the one captured tensor: ``pooled[alias]`` is ``{pooling: (B, D)}``, or
    ``{"none": (B, D)}`` for a 2-D output stored as it is.
    """

    def __init__(
        self, module: torch.nn.Module, layers: dict[str, str], mode: str | Sequence[str], time_axis: int
    ):
        self.module, self.layers, self.time_axis = module, layers, time_axis
        self.modes = [mode] if isinstance(mode, str) else list(mode)
        self.mask: torch.Tensor | None = None
        self.pooled: dict[str, dict[str, torch.Tensor]] = {}
        self.hooks = HookSet("probe features")
        modules = dict(module.named_modules())
        self.by_module: dict[str, list[tuple[str, Tap, int | None]]] = {}
        for alias, spec in layers.items():
            tap = parse_tap(spec)
            name, k = tap.name, None
            if name not in modules and rnn_layer_of(name) is not None:
                name, k = rnn_layer_of(name)
            self.by_module.setdefault(name, []).append((alias, tap, k))

    def __enter__(self) -> _Capture:
        try:
            for name, entries in self.by_module.items():
                mod = self.module.get_submodule(name)
                runner = LayerRunner(mod) if any(k is not None for _, _, k in entries) else None
                self.hooks.forward(mod, self._hook(entries, runner), with_kwargs=True)
        except BaseException:
            self.hooks.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.remove()

    def _hook(self, entries: list[tuple[str, Tap, int | None]], runner: LayerRunner | None):
        def hook(mod, args, kwargs, out):
            per_layer = None
            if runner is not None:
                per_layer = runner.run(args, kwargs, max(k for _, _, k in entries if k is not None))
            for alias, tap, k in entries:
                if k is None:
                    obj = out if tap.source == "output" else Inputs(args, kwargs)
                elif tap.source == "output":
                    obj = per_layer[k]
                else:  # what layer k reads: the input, or the previous layer's output
                    obj = Inputs((args[0] if args else kwargs["input"],) if k == 0 else (per_layer[k - 1][0],), {})
                self.pooled[alias] = self._reduce(alias, tap, select(obj, tap, alias), mod)

        return hook

    def _reduce(self, alias: str, tap: Tap, value: Any, mod: torch.nn.Module) -> dict[str, torch.Tensor]:
        modes = list(tap.poolings or self.modes)
        if isinstance(value, torch.nn.utils.rnn.PackedSequence):
            h, lengths = torch.nn.utils.rnn.pad_packed_sequence(value, batch_first=True)  # (B, T, H), (B,)
            h = h.float().reshape(h.shape[0], h.shape[1], -1)
            m = (torch.arange(h.shape[1])[None] < lengths[:, None]).float().to(h.device)  # (B, T) own lengths
            return pool_steps(h, m, modes)
        h = value.float()
        rnn = isinstance(mod, torch.nn.RNNBase)
        if rnn and is_state_path(mod, tap.path, tap.source):
            return {NONE: state_to_items(h)}  # final states: one vector per item already
        if h.dim() == 2:
            return {NONE: h}  # already pooled: stored once, as it is
        if h.dim() < 2:
            raise ProbeModelError(
                f"layer {alias!r} ({tap}) is a {h.dim()}-D tensor {tuple(h.shape)}; a probe needs one row "
                "per item: shorten the path so the batch axis stays"
            )
        time_axis = self.time_axis
        if rnn:  # a recurrent module's sequences are (T, B, H) unless batch_first
            time_axis = 1
            if not mod.batch_first:
                h = h.transpose(0, 1)
        h = to_steps(h, time_axis)  # (B, T, H)
        return pool_steps(h, step_mask(self.mask, h.shape[0], h.shape[1], h.device), modes)


def _to_device(obj: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    if isinstance(obj, torch.nn.utils.rnn.PackedSequence):  # a namedtuple that must not be rebuilt by field
        obj = obj.to(device)
        return obj.to(dtype) if dtype is not None and obj.data.is_floating_point() else obj
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device)
        return obj.to(dtype) if dtype is not None and obj.is_floating_point() else obj
    if isinstance(obj, dict) or (hasattr(obj, "keys") and hasattr(obj, "items")):
        return {k: _to_device(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_to_device(v, device, dtype) for v in obj)
    return obj


def _as_inputs(raw: Any) -> ModelInputs:
    if isinstance(raw, ModelInputs):
        return raw
    if isinstance(raw, torch.Tensor):
        return ModelInputs(args=(raw,))
    if isinstance(raw, dict) or (hasattr(raw, "keys") and hasattr(raw, "items")):
        kwargs = dict(raw.items())
        return ModelInputs(kwargs=kwargs, mask=kwargs.get("attention_mask"))
    if isinstance(raw, tuple | list):
        return ModelInputs(args=tuple(raw))
    raise ProbeModelError(
        f"preprocess returned {type(raw).__name__}; return a ModelInputs, a dict of keyword arguments, "
        "a tensor or a tuple of positional arguments"
    )


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def batches(lengths: np.ndarray, batch_size: int, skip: np.ndarray | None = None) -> list[np.ndarray]:
    """Index batches, longest items first so padding is minimal; items where ``skip`` is set are left out."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    if skip is not None:
        order = order[~skip[order]]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _ids_hash(ids: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:16]


def _file_name(alias: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", alias) + ".npy"


@dataclass
class FeatureSet:
    """Stored features of one representation: per-layer (N, D) arrays (memory-mapped) and metadata."""

    path: Path
    meta: dict

    @property
    def layers(self) -> list[str]:
        return list(self.meta["layers"])

    def array(self, layer: str) -> np.ndarray:
        """(N, D) float32 memory map of one layer."""
        info = self.meta["layers"][layer]
        return np.load(self.path / info["file"], mmap_mode="r")

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))


def open_features(path: str | Path) -> FeatureSet:
    """Open a representation's feature folder written by :func:`extract_features`."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        from stethoscope.probe.errors import ProbeStageError

        raise ProbeStageError(f"no features in {str(path)!r}: run `stethoscope probe features CONFIG` first")
    return FeatureSet(path, json.loads(meta_path.read_text(encoding="utf-8")))


def completed_features(path: str | Path, ids: Sequence[str], request: str) -> FeatureSet | None:
    """The stored features at ``path`` if they are complete, for these items and this request; else None.

    Lets a rerun skip loading a model whose features are already there.
    """
    meta_path = Path(path) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    ok = (
        meta.get("complete")
        and meta.get("ids") == _ids_hash(ids)
        and meta.get("settings_detail", {}).get("request") == request
    )
    return FeatureSet(Path(path), meta) if ok else None


def extract_features(
    items: Sequence,
    adapter: ProbeAdapter,
    layers: dict[str, str],
    out_dir: str | Path,
    *,
    pooling: str | Sequence[str] = "mean",
    batch_size: int = 16,
    dtype: str = "float32",
    device: str = "auto",
    threads: int | None = DEFAULT_THREADS,
    lengths: np.ndarray | None = None,
    load: Callable[[list], list] | None = None,
    settings: dict | None = None,
    progress: bool = True,
    description: str = "features",
) -> FeatureSet:
    """Run ``adapter.module`` over the items and store pooled outputs of ``layers``; resume if interrupted.

    Args:
        items: the items (``ProbeItem``), in the order rows of the arrays will have.
        adapter: module + preprocessing.
        layers: name -> tap spec (see :func:`resolve_layers` and :mod:`stethoscope.probe.taps`).
        out_dir: this representation's folder; one ``<feature>.npy`` (N, D) per stored feature,
            ``done.npy``, ``meta.json``.
        pooling: one pooling or several (:data:`~stethoscope.probe.pooling.POOLINGS`), all computed in the
            same forward pass. A layer with several poolings is stored as ``<layer>@<pooling>`` per pooling;
            a layer with one, or a 2-D (already pooled) output, as ``<layer>``. A tap's ``@`` overrides it.
        batch_size: items per forward pass.
        dtype: ``float32``, ``float16`` or ``bfloat16`` for the module's weights and floating inputs
            (features are stored as float32). The module is moved to ``device`` and cast in place, and
            left in eval or train mode as it came.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...
        threads: CPU threads of the forward passes (``torch.set_num_threads``, restored afterwards); None
            leaves torch's setting. The default comes from ``benchmarks/probe_threads.py`` (docs/probing.md).
        lengths: (N,) item lengths for length-sorted batching (less padding); None keeps the order.
        load: called on each batch before preprocessing (e.g. reading its audio).
        settings: everything that determines the features (checkpoint, layers, pooling, ...): stored
            outputs made with other settings or other items are discarded, not mixed.
        progress: show a progress bar on the shared console.
        description: the progress bar's label.

    Returns:
        The :class:`FeatureSet`.
    """
    out = Path(out_dir)
    ids = [str(getattr(it, "id", i)) for i, it in enumerate(items)]
    n = len(items)
    poolings = [pooling] if isinstance(pooling, str) else list(pooling)
    layers = {alias: str(parse_tap(spec)) for alias, spec in layers.items()}  # canonical, validated
    settings = dict(settings or {})
    settings.update(layers=layers, pooling=poolings if len(poolings) > 1 else poolings[0], dtype=dtype)
    from stethoscope.probe.config import settings_hash

    key = {"ids": _ids_hash(ids), "settings": settings_hash(settings), "n_items": n}
    meta_path = out / "meta.json"
    meta = None
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            meta = None
        if meta is None or {k: meta.get(k) for k in key} != key:
            shutil.rmtree(out)  # made from other items or settings: start over rather than mix
            meta = None
    out.mkdir(parents=True, exist_ok=True)
    if meta is None:
        meta = {
            "schema_version": SCHEMA_VERSION,
            **key,
            "settings_detail": json.loads(json.dumps(settings, default=str)),
            "layers": {},
            "complete": False,
        }
        meta_path.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    from numpy.lib.format import open_memmap

    done_path = out / "done.npy"
    done = open_memmap(done_path, mode="r+" if done_path.is_file() else "w+", dtype=np.uint8, shape=(n,))
    arrays: dict[str, np.ndarray] = {}
    for feature, info in meta["layers"].items():
        arrays[feature] = open_memmap(out / info["file"], mode="r+")
    todo = batches(lengths if lengths is not None else np.zeros(n), batch_size, skip=done.astype(bool))
    if todo:
        with _threads(threads):
            _run(
                items,
                adapter,
                layers,
                todo,
                arrays,
                done,
                meta,
                out,
                poolings,
                dtype,
                device,
                load,
                progress,
                description,
            )
    produced = {info.get("layer", feature) for feature, info in meta["layers"].items()}
    missing = [a for a in layers if a not in produced]
    if missing and n:
        raise ProbeModelError(
            f"layers {', '.join(missing)} never ran during the forward pass: the module's forward does not "
            "call them (pick layers on the path from input to output)"
        )
    meta["complete"] = bool(done.all())
    meta_path.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return FeatureSet(out, meta)


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the extraction, the caller's setting back afterwards."""
    if threads is None or threads == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _feature_name(layer: str, pooling: str, several: bool) -> str:
    """``layer`` for a layer stored once, ``layer@pooling`` for one of several poolings."""
    return f"{layer}@{pooling}" if several else layer


def _run(
    items, adapter, layers, todo, arrays, done, meta, out, poolings, dtype, device, load, progress, description
) -> None:
    from numpy.lib.format import open_memmap

    from stethoscope.console import get_console

    module = adapter.module
    dev = resolve_device(device)
    torch_dtype = _DTYPES[dtype]
    was_training = module.training
    module.eval()
    module.to(dev)
    if torch_dtype != torch.float32:
        module.to(torch_dtype)
    cast = torch_dtype if adapter.cast_inputs else None
    n = len(items)
    total = sum(len(b) for b in todo)
    bar_ctx = _progress(progress, description, total, get_console())
    finished = done.astype(bool)  # (N,) items whose rows are written
    last_checkpoint = time.monotonic()
    try:
        with (
            bar_ctx as advance,
            _Capture(module, layers, poolings, adapter.time_axis) as cap,
            torch.inference_mode(),
        ):
            for idx in todo:
                batch = [items[i] for i in idx]
                if load is not None:
                    batch = load(batch)
                inputs = _as_inputs(adapter.preprocess(batch))
                cap.mask = inputs.mask
                cap.pooled = {}
                module(*_to_device(inputs.args, dev, cast), **_to_device(inputs.kwargs, dev, cast))
                for alias in layers:
                    if alias not in cap.pooled:
                        continue
                    per_pooling = cap.pooled[alias]
                    for mode, tensor in per_pooling.items():
                        feature = _feature_name(alias, mode, len(per_pooling) > 1)
                        values = tensor.float().cpu().numpy()  # (B, D)
                        _store(feature, alias, mode, layers[alias], values, idx, arrays, meta, out, n, open_memmap)
                finished[idx] = True  # in memory; on disk at the next checkpoint, after the rows
                if time.monotonic() - last_checkpoint > _CHECKPOINT_SECONDS:
                    _checkpoint(arrays, done, finished)
                    last_checkpoint = time.monotonic()
                advance(len(idx))
    finally:
        _checkpoint(arrays, done, finished)  # also on ^C or an error: finished batches are kept
        module.train(was_training)


def _store(feature, alias, mode, spec, values, idx, arrays, meta, out, n, open_memmap) -> None:
    """Write one batch of one feature, creating its array (and its meta entry) on first sight."""
    if values.shape[0] != len(idx):
        raise ProbeModelError(
            f"layer {alias!r} ({spec}) returned a batch of {values.shape[0]} for {len(idx)} items: "
            "the adapter's outputs must be batch-first (or set time_axis); for a state laid out "
            "(layers, batch, features), take a path into it"
        )
    owner = meta["layers"].get(feature, {}).get("layer", alias)
    if owner != alias:
        raise ProbeLayerError(
            f"layers {owner!r} and {alias!r} would both be stored as {feature!r}; name one by an alias "
            "(aliases: {name: spec})"
        )
    if feature not in arrays:
        file = _file_name(feature)
        arrays[feature] = open_memmap(out / file, mode="w+", dtype=np.float32, shape=(n, values.shape[1]))
        meta["layers"][feature] = {
            "module": spec,
            "layer": alias,
            "pooling": mode,
            "dim": int(values.shape[1]),
            "file": file,
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    if values.shape[1] != arrays[feature].shape[1]:
        raise ProbeModelError(
            f"layer {alias!r} pooled to {values.shape[1]} features in this batch but "
            f"{arrays[feature].shape[1]} before: its output is probably not (batch, time, "
            "features); set the adapter's time_axis (2 for (batch, channels, time))"
        )
    arrays[feature][idx] = values


def _checkpoint(arrays: dict, done: np.ndarray, finished: np.ndarray) -> None:
    """Flush the feature rows, then mark their items done: ``done.npy`` never runs ahead of the rows.

    Checkpoints are throttled (every few seconds) because each is an ``msync`` per array; a crash loses at
    most the batches since the last one.
    """
    for arr in arrays.values():
        arr.flush()
    done[:] = finished
    done.flush()


@contextlib.contextmanager
def _progress(enabled: bool, description: str, total: int, console) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda k: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda k: bar.advance(task, k)


# --- adapters for the three representation kinds ---------------------------------------------------


def load_factory(
    spec: str, kwargs: dict | None = None, *, base_dir: Path | None = None, sample_rate: int | None = None
) -> ProbeAdapter:
    """Build an adapter from ``"package.module:function"`` or ``"path/to/file.py:function"``.

    The module is looked for on ``sys.path``, then in ``base_dir`` (the config's folder; see
    :mod:`stethoscope.probe.factory`). The function gets ``kwargs``, plus ``sample_rate`` when it has such a
    parameter, and returns a ProbeAdapter or a ``(module, preprocess)`` pair.
    """
    from stethoscope.probe.factory import call_factory, factory_folder, import_factory, on_path

    fn = import_factory(spec, base_dir)
    with on_path(factory_folder(spec, base_dir)):
        made = call_factory(fn, kwargs or {}, sample_rate)
    if isinstance(made, ProbeAdapter):
        return made
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        return ProbeAdapter(made[0], made[1])
    raise ProbeModelError(
        f"factory {spec!r} returned {type(made).__name__}; return a ProbeAdapter or (module, preprocess)"
    )


def hf_adapter(
    checkpoint: str | Path, modality: str, *, max_length: int = 256, sample_rate: int = 16000
) -> ProbeAdapter:
    """Adapter for a local Hugging Face checkpoint: tokenizer for text, feature extractor for audio."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise ProbeModelError(
            f"checkpoint folder {str(path)!r} does not exist (representations[].checkpoint)"
        )
    try:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        from stethoscope.errors import MissingDependencyError

        raise MissingDependencyError("transformers", "probe", "probing a Hugging Face checkpoint") from exc
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ProbeModelError(
            f"cannot load a model from {str(path)!r}: {type(exc).__name__}: {exc}"
        ) from None
    if modality == "text":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)

        def preprocess(items):
            return tok(
                [it.text for it in items],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
    else:
        from transformers import AutoFeatureExtractor

        fe = AutoFeatureExtractor.from_pretrained(path, local_files_only=True)

        def preprocess(items):
            return fe(
                [it.audio for it in items],
                sampling_rate=sample_rate,
                padding=True,
                return_attention_mask=True,
                return_tensors="pt",
            )

    return ProbeAdapter(model, preprocess)


def frontend_adapter(
    sample_rate: int, n_mels: int = 64, n_mfcc: int = 20, win_ms: float = 25.0, hop_ms: float = 10.0
) -> ProbeAdapter:
    """The log-mel / MFCC baseline as an adapter with layers ``logmel`` and ``mfcc``."""
    from stethoscope.probe.audio import FrontEnd

    fe = FrontEnd(sample_rate, n_mels, n_mfcc, win_ms, hop_ms)

    def preprocess(items):
        waves = [torch.from_numpy(np.asarray(it.audio, dtype=np.float32)) for it in items]
        lengths = torch.tensor([len(w) for w in waves])
        batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)  # (B, S)
        frames = fe.logmel.frames(lengths)  # (B,)
        t = int(fe.logmel.frames(torch.tensor(batch.shape[1])))
        mask = torch.arange(t)[None] < frames[:, None]  # (B, T) frame-level
        return ModelInputs(args=(batch,), mask=mask)

    return ProbeAdapter(fe, preprocess, aliases={"logmel": "logmel", "mfcc": "mfcc"}, cast_inputs=False)
