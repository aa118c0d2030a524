"""Which dataset indices each batch came from, and a sampler that skips the ones an incident named.

A map-style ``DataLoader`` draws its indices from its batch sampler (or sampler) in the main process, in
order, even with worker processes; it hands batches out in that same order (``in_order``, the default). So
recording each index list the sampler yields, and pairing them first-in first-out with the batches the
loader yields, says which indices every batch holds — without touching the dataset or the workers.

:func:`watch_loader` does this on a loader that already exists (the user's, or the Hugging Face Trainer's),
by giving the loader and its sampler a recording subclass until the hooks are removed. An
``IterableDataset`` has no indices: nothing is recorded, and the incident's manifest says so.

On restart, ``SkipSampler(sampler, "run/incidents/skip_batches.json")`` leaves those indices out.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from stethoscope.errors import StethoscopeError
from stethoscope.hooks import HookSet

_RECORDING: dict[tuple[str, type], type] = {}


def _recording_sampler(cls: type) -> type:
    """``cls`` whose iteration also appends each yielded index list to the instance's queue."""
    sub = _RECORDING.get(("sampler", cls))
    if sub is None:
        def __iter__(self):
            queue = self.__dict__.get("_stethoscope_queue")
            for item in super(sub, self).__iter__():
                if queue is not None:
                    queue.append(item)
                yield item

        sub = _RECORDING[("sampler", cls)] = type(f"Recording{cls.__name__}", (cls,), {"__iter__": __iter__})
        sub.__module__ = cls.__module__
    return sub


def _recording_loader(cls: type) -> type:
    """``cls`` whose iteration pairs each yielded batch with the oldest recorded index list."""
    sub = _RECORDING.get(("loader", cls))
    if sub is None:
        def __iter__(self):
            watch = self.__dict__.get("_stethoscope_watch")
            if watch is not None:
                watch.queue.clear()  # a new pass: index lists of an abandoned one are stale
            for batch in super(sub, self).__iter__():
                if watch is not None:
                    watch.yielded()
                yield batch

        sub = _RECORDING[("loader", cls)] = type(f"Recording{cls.__name__}", (cls,), {"__iter__": __iter__})
        sub.__module__ = cls.__module__
    return sub


def _set_class(obj: Any, cls: type) -> None:
    """``obj.__class__ = cls``, also through a wrapper that makes ``__class__`` a read-only property (accelerate's
    ``DataLoaderShard`` reports its inner DataLoader's class): the assignment goes to ``object``'s own slot."""
    try:
        _OBJECT_CLASS.__set__(obj, cls)
    except AttributeError as exc:  # pragma: no cover - CPython always has the slot
        raise TypeError(str(exc)) from exc


_OBJECT_CLASS = object.__dict__["__class__"]


def _swap(obj: Any, make: Callable[[type], type]) -> type:
    """Give ``obj`` its recording class; returns the class it had."""
    cls = type(obj)
    _set_class(obj, make(cls))
    return cls


class LoaderWatch:
    """Index lists of one loader's batches, handed to ``on_batch`` as the loader yields each batch."""

    def __init__(self, loader: Any, on_batch: Callable[[Any], None]):
        self.loader = loader
        self.on_batch = on_batch
        self.queue: deque = deque()
        self.batches = 0
        self.unpaired = 0  # batches yielded with no recorded index list (should stay 0)

    def yielded(self) -> None:
        self.batches += 1
        if self.queue:
            self.on_batch(_plain(self.queue.popleft()))
        else:
            self.unpaired += 1
            self.on_batch(None)


def indices_source(loader: Any) -> tuple[Any, str] | None:
    """(the object whose iteration yields one batch's indices, its kind), or None when the loader exposes
    none (an ``IterableDataset``, out-of-order loading, not a DataLoader)."""
    if getattr(loader, "in_order", True) is False:
        return None
    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is not None:
        return batch_sampler, "batch_sampler"
    sampler = getattr(loader, "sampler", None)
    dataset = getattr(loader, "dataset", None)
    try:
        from torch.utils.data import IterableDataset
    except ImportError:  # pragma: no cover
        return None
    if sampler is None or isinstance(dataset, IterableDataset):
        return None
    return sampler, "sampler"


def watch_loader(loader: Any, hooks: HookSet, on_batch: Callable[[Any], None]) -> LoaderWatch | None:
    """Record the indices of every batch ``loader`` yields from now on (``on_batch(indices)`` per batch);
    undone when ``hooks`` is removed. None when the loader exposes no indices."""
    found = indices_source(loader)
    if found is None or "_stethoscope_watch" in getattr(loader, "__dict__", {}):
        return None
    source, _kind = found
    watch = LoaderWatch(loader, on_batch)
    try:
        source_cls = _swap(source, _recording_sampler)
    except TypeError:  # a sampler whose class cannot be swapped (slots, an extension type)
        return None
    try:
        loader_cls = _swap(loader, _recording_loader)
    except TypeError:
        _set_class(source, source_cls)
        return None
    source.__dict__["_stethoscope_queue"] = watch.queue
    loader.__dict__["_stethoscope_watch"] = watch

    def undo() -> None:
        _set_class(loader, loader_cls)
        _set_class(source, source_cls)
        loader.__dict__.pop("_stethoscope_watch", None)
        source.__dict__.pop("_stethoscope_queue", None)

    hooks.on_remove(undo)
    return watch


def _plain(item: Any) -> Any:
    """An index list as JSON-ready values (tensors and NumPy integers become ints)."""
    if hasattr(item, "tolist"):
        return item.tolist()
    if isinstance(item, list | tuple):
        return [_plain(i) for i in item]
    if isinstance(item, int | str | float):
        return item
    return str(item)


# ---------------------------------------------------------------------- on restart
def skip_indices(path: str | Path) -> set:
    """Every dataset index named in a ``skip_batches.json`` (or an incident folder's parent's one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "skip_batches.json"
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise StethoscopeError(f"{str(path)!r} does not exist: pass the skip_batches.json of a run's incidents "
                               "folder (RUN_DIR/incidents/skip_batches.json)") from exc
    except (OSError, ValueError) as exc:
        raise StethoscopeError(f"{str(path)!r} is not a readable skip_batches.json ({exc})") from exc
    out: set = set()
    for entry in entries.get("batches", []):
        for batch in entry.get("indices", []):
            out.update(_flat(batch))
    return out


def _flat(item: Any) -> Iterator:
    if isinstance(item, list):
        for i in item:
            yield from _flat(i)
    elif item is not None:
        yield item


class SkipSampler:
    """``sampler`` without the dataset indices a ``skip_batches.json`` names (pass it to your DataLoader on
    restart: ``DataLoader(ds, sampler=SkipSampler(RandomSampler(ds), path), ...)``)."""

    def __init__(self, sampler: Any, skip: str | Path | set):
        self.sampler = sampler
        self.skip = skip if isinstance(skip, set) else skip_indices(skip)

    def __iter__(self) -> Iterator:
        return (i for i in self.sampler if i not in self.skip)

    def __len__(self) -> int:
        return sum(1 for _ in self)
