"""Hidden states of named layers, pooled over time, stored per layer in memory-mappable ``.npy`` arrays.

Any ``torch.nn.Module`` can be probed through a :class:`ProbeAdapter`: the module plus a callable that
turns a batch of :class:`~stethoscope.probe.manifest.ProbeItem` into its inputs::

    def make_adapter():
        model = MyTTS.load("ckpt/")                       # any nn.Module
        def preprocess(items):                            # list[ProbeItem] -> inputs
            ids, mask = my_tokenize([it.text for it in items])
            return ModelInputs(kwargs={"input_ids": ids}, mask=mask)   # mask: (B, T) valid steps
        return ProbeAdapter(model, preprocess, aliases={"decoder_block_08": "decoder.layers.8"})

A forward hook on each requested module pools its output over time (mean, or mean and std) inside the
hook, so full hidden states never pile up; extraction writes each batch and then marks its items done,
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
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
from stethoscope.probe.errors import ProbeLayerError, ProbeModelError

SCHEMA_VERSION = 1
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
    list, no owner) ``block_00``. When the model has one block list, ``block_NN`` names it too.
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
    return out


def resolve_layers(
    module: torch.nn.Module, requested: Sequence[str] | str, extra_aliases: dict[str, str] | None = None
) -> dict[str, str]:
    """Map requested layers (aliases or module names, or ``"all"``) to module names, in request order.

    ``"all"`` means every block of the model's longest block list, named by its aliases, then the
    user's aliases.

    Raises:
        ProbeLayerError: an unknown name, with the closest aliases and module names.
    """
    modules = dict(module.named_modules())
    extra = dict(extra_aliases or {})
    aliases = {**layer_aliases(module), **extra}
    for alias, target in extra.items():
        if target not in modules:
            close = difflib.get_close_matches(target, list(modules), n=3, cutoff=0.5)
            raise ProbeLayerError(
                f"alias {alias!r} points at module {target!r}, which {type(module).__name__} does not have"
                + (f"; closest: {', '.join(close)}" if close else "")
            )
    if requested == "all":
        lists = _block_lists(module)
        if not lists and not extra:
            raise ProbeLayerError(
                f"{type(module).__name__} has no repeated block list to take 'all' from: list layers by "
                "alias or module name (see model.named_modules())"
            )
        names = []
        if lists:
            # the longest list; on a tie the heavier one (transformer blocks over a conv stem)
            weight = {n: sum(p.numel() for p in module.get_submodule(n).parameters()) for n, _, _ in lists}
            name, n, prefix = max(lists, key=lambda x: (x[1], weight[x[0]]))
            names = [f"{prefix}{i:02d}" for i in range(n)]
        names += [a for a in extra if a not in names]
    else:
        names = list(requested)
    out: dict[str, str] = {}
    for name in names:
        if name in aliases:
            out[name] = aliases[name]
        elif name in modules and name != "":
            out[name] = name
        else:
            close = difflib.get_close_matches(name, [*aliases, *modules], n=3, cutoff=0.5)
            some = ", ".join(list(aliases)[:6])
            raise ProbeLayerError(
                f"layer {name!r} is neither an alias nor a module of {type(module).__name__}"
                + (f"; did you mean {', '.join(map(repr, close))}?" if close else "")
                + (f" (aliases include {some}, ...)" if some else "")
            )
    return out


def _first_tensor(out: Any) -> torch.Tensor | None:
    """The hidden state in a module output: a tensor, the first of a tuple, ``last_hidden_state``, ..."""
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    if isinstance(out, dict) or hasattr(out, "keys"):
        if "last_hidden_state" in out:
            return _first_tensor(out["last_hidden_state"])
        for v in out.values():
            t = _first_tensor(v)
            if t is not None:
                return t
        return None
    if isinstance(out, tuple | list):
        for v in out:
            t = _first_tensor(v)
            if t is not None:
                return t
        return None
    if dataclasses.is_dataclass(out):
        for f in dataclasses.fields(out):
            t = _first_tensor(getattr(out, f.name))
            if t is not None:
                return t
    return None


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, mode: str, time_axis: int = 1) -> torch.Tensor:
    """Pool a layer output over time.

    Args:
        hidden: (B, T, H) (or the time axis elsewhere, see ``time_axis``); (B, H) is returned as is
            (with a zero std for ``mean_std``).
        mask: (B, T_in) valid steps of the input; when T_in differs from this layer's T, each item's
            valid length is scaled proportionally (ceil).
        mode: ``mean`` -> (B, H); ``mean_std`` -> (B, 2H) mean then population std.
        time_axis: where T is in ``hidden``.

    Returns:
        (B, D) float32.
    """
    h = hidden.float()
    if h.dim() == 2:
        return h if mode == "mean" else torch.cat([h, torch.zeros_like(h)], dim=1)
    if time_axis != 1:
        h = h.movedim(time_axis, 1)
    h = h.reshape(h.shape[0], h.shape[1], -1)  # (B, T, H)
    B, T, _ = h.shape
    if mask is None:
        m = torch.ones(B, T, dtype=h.dtype, device=h.device)
    else:
        mask = mask.to(h.device)
        if mask.shape[1] == T:
            m = mask.to(h.dtype)
        else:
            valid = torch.ceil(mask.float().sum(1) * (T / mask.shape[1])).clamp(1, T)  # (B,)
            m = (torch.arange(T, device=h.device)[None] < valid[:, None]).to(h.dtype)
    n = m.sum(1, keepdim=True).clamp_min(1.0)  # (B, 1)
    mean = torch.einsum("bth,bt->bh", h, m) / n  # (B, H)
    if mode == "mean":
        return mean
    var = torch.einsum("bth,bt->bh", (h - mean[:, None]).square(), m) / n
    return torch.cat([mean, var.sqrt()], dim=1)


class _Capture:
    """Forward hooks on named modules that pool each output as it is produced; removed on exit."""

    def __init__(self, module: torch.nn.Module, layers: dict[str, str], mode: str, time_axis: int):
        self.module, self.layers, self.mode, self.time_axis = module, layers, mode, time_axis
        self.mask: torch.Tensor | None = None
        self.pooled: dict[str, torch.Tensor] = {}
        self.hooks = HookSet("probe features")

    def __enter__(self) -> _Capture:
        try:
            for alias, name in self.layers.items():
                self.hooks.forward(self.module.get_submodule(name), self._hook(alias))
        except BaseException:
            self.hooks.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.remove()

    def _hook(self, alias: str):
        def hook(_mod, _inp, out):
            t = _first_tensor(out)
            if t is None:
                raise ProbeModelError(
                    f"layer {alias!r} ({self.layers[alias]}) returned {type(out).__name__} without a floating "
                    "tensor to probe; pick the module whose output is the hidden state"
                )
            self.pooled[alias] = pool(t, self.mask, self.mode, self.time_axis)

        return hook


def _to_device(obj: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
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
    pooling: str = "mean",
    batch_size: int = 16,
    dtype: str = "float32",
    device: str = "auto",
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
        layers: alias -> module name (see :func:`resolve_layers`).
        out_dir: this representation's folder; one ``<alias>.npy`` (N, D) per layer, ``done.npy``,
            ``meta.json``.
        pooling: ``mean`` or ``mean_std``.
        batch_size: items per forward pass.
        dtype: ``float32``, ``float16`` or ``bfloat16`` for the module's weights and floating inputs
            (features are stored as float32). The module is moved to ``device`` and cast in place, and
            left in eval or train mode as it came.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...
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
    settings = dict(settings or {})
    settings.update(layers=layers, pooling=pooling, dtype=dtype)
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
    for alias, info in meta["layers"].items():
        arrays[alias] = open_memmap(out / info["file"], mode="r+")
    todo = batches(lengths if lengths is not None else np.zeros(n), batch_size, skip=done.astype(bool))
    if todo:
        _run(
            items,
            adapter,
            layers,
            todo,
            arrays,
            done,
            meta,
            out,
            pooling,
            dtype,
            device,
            load,
            progress,
            description,
        )
    missing = [a for a in layers if a not in meta["layers"]]
    if missing and n:
        raise ProbeModelError(
            f"layers {', '.join(missing)} never ran during the forward pass: the module's forward does not "
            "call them (pick layers on the path from input to output)"
        )
    meta["complete"] = bool(done.all())
    meta_path.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return FeatureSet(out, meta)


def _run(
    items, adapter, layers, todo, arrays, done, meta, out, pooling, dtype, device, load, progress, description
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
            _Capture(module, layers, pooling, adapter.time_axis) as cap,
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
                    values = cap.pooled[alias].float().cpu().numpy()  # (B, D)
                    if values.shape[0] != len(idx):
                        raise ProbeModelError(
                            f"layer {alias!r} returned a batch of {values.shape[0]} for {len(idx)} items: "
                            "the adapter's outputs must be batch-first (or set time_axis)"
                        )
                    if alias not in arrays:
                        file = _file_name(alias)
                        arrays[alias] = open_memmap(
                            out / file, mode="w+", dtype=np.float32, shape=(n, values.shape[1])
                        )
                        meta["layers"][alias] = {
                            "module": layers[alias],
                            "dim": int(values.shape[1]),
                            "file": file,
                        }
                        (out / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
                    if values.shape[1] != arrays[alias].shape[1]:
                        raise ProbeModelError(
                            f"layer {alias!r} pooled to {values.shape[1]} features in this batch but "
                            f"{arrays[alias].shape[1]} before: its output is probably not (batch, time, "
                            "features); set the adapter's time_axis (2 for (batch, channels, time))"
                        )
                    arrays[alias][idx] = values
                finished[idx] = True  # in memory; on disk at the next checkpoint, after the rows
                if time.monotonic() - last_checkpoint > _CHECKPOINT_SECONDS:
                    _checkpoint(arrays, done, finished)
                    last_checkpoint = time.monotonic()
                advance(len(idx))
    finally:
        _checkpoint(arrays, done, finished)  # also on ^C or an error: finished batches are kept
        module.train(was_training)


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


def load_factory(spec: str, kwargs: dict | None = None) -> ProbeAdapter:
    """Build an adapter from ``"package.module:function"`` (the function returns a ProbeAdapter or a
    ``(module, preprocess)`` pair)."""
    if ":" not in spec:
        raise ProbeModelError(f"factory {spec!r} must look like 'package.module:function'")
    mod_name, fn_name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ProbeModelError(
            f"cannot import factory {spec!r}: {exc} (is the package on PYTHONPATH?)"
        ) from None
    made = fn(**(kwargs or {}))
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
