"""Every hook stethoscope puts on a model or an optimizer goes through a :class:`HookSet`.

A diagnostics tool must leave the model as it found it. Instead of each feature keeping its own list of
handles and its own removal loop, each owner (the monitor's statistics, the flight recorder, the attention
capture, ``Trace``, probe feature extraction, ...) holds one ``HookSet``: it registers forward hooks,
optimizer step hooks and attribute patches, and :meth:`HookSet.remove` takes every one of them off — all of
them even when one removal fails, and more than once without harm. Used as a context manager it removes
them in ``finally``::

    with HookSet() as hooks:
        for name, module in walk_modules(model, predicate=lambda n, m: isinstance(m, nn.Linear)):
            hooks.forward(module, make_hook(name))
        model(x)
    # every hook is off here, whatever happened inside

:func:`walk_modules` is the one module walk: names as ``named_modules()`` spells them with wrapper prefixes
removed, each name once (the outer module of a DDP / ``torch.compile`` wrapper wins), optionally filtered
by a list of names or a predicate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

from stethoscope.naming import clean_name


class Removable(Protocol):
    def remove(self) -> Any: ...


def is_compiling() -> bool:
    """True while ``torch.compile`` traces: hooks then return at once, so they add no graph breaks."""
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def walk_modules(
    model: nn.Module,
    names: Iterable[str] | None = None,
    predicate: Callable[[str, nn.Module], bool] | None = None,
) -> Iterator[tuple[str, nn.Module]]:
    """``(clean name, module)`` for each module of ``model`` once, in ``named_modules()`` order.

    ``names`` keeps only those names (``""`` is the root); ``predicate(name, module)`` keeps those it
    accepts. A wrapper's inner module that cleans to an already seen name is skipped.
    """
    wanted = set(names) if names is not None else None
    seen: set[str] = set()
    for raw, module in model.named_modules():
        name = clean_name(raw)
        if name in seen:
            continue
        seen.add(name)
        if wanted is not None and name not in wanted:
            continue
        if predicate is not None and not predicate(name, module):
            continue
        yield name, module


class _Patch:
    """An attribute set on an object, put back (or deleted, when it was the class's) on :meth:`remove`."""

    def __init__(self, obj: Any, attr: str, value: Any):
        self.obj, self.attr = obj, attr
        self.had_own = attr in getattr(obj, "__dict__", {})
        self.old = obj.__dict__[attr] if self.had_own else None
        setattr(obj, attr, value)

    def remove(self) -> None:
        if self.obj is None:
            return
        obj, self.obj = self.obj, None
        if self.had_own:
            setattr(obj, self.attr, self.old)
        else:
            with contextlib.suppress(AttributeError):
                delattr(obj, self.attr)  # the class attribute shows through again


class _Call:
    """A callable run once on :meth:`remove` (for hooks a library installs with its own undo)."""

    def __init__(self, undo: Callable[[], Any]):
        self.undo: Callable[[], Any] | None = undo

    def remove(self) -> None:
        undo, self.undo = self.undo, None
        if undo is not None:
            undo()


class HookSet:
    """The hooks of one owner, registered through it and removed together.

    Args:
        owner: who holds these hooks (for ``repr`` and debugging).
    """

    def __init__(self, owner: str = ""):
        self.owner = owner
        self._handles: list[Removable] = []

    # ------------------------------------------------------------------ registering
    def forward_pre(self, module: nn.Module, fn: Callable, *, with_kwargs: bool = False) -> Removable:
        """``module.register_forward_pre_hook(fn)``, kept for removal."""
        return self.add(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def forward(
        self, module: nn.Module, fn: Callable, *, with_kwargs: bool = False, always_call: bool = False
    ) -> Removable:
        """``module.register_forward_hook(fn)``, kept for removal."""
        return self.add(module.register_forward_hook(fn, with_kwargs=with_kwargs, always_call=always_call))

    def step_pre(self, optimizer: torch.optim.Optimizer, fn: Callable) -> Removable:
        """``optimizer.register_step_pre_hook(fn)``, kept for removal."""
        return self.add(optimizer.register_step_pre_hook(fn))

    def step_post(self, optimizer: torch.optim.Optimizer, fn: Callable) -> Removable:
        """``optimizer.register_step_post_hook(fn)``, kept for removal."""
        return self.add(optimizer.register_step_post_hook(fn))

    def patch(self, obj: Any, attr: str, value: Any) -> Removable:
        """Set ``obj.attr = value`` until removal (then the old instance attribute, or the class's, is back)."""
        return self.add(_Patch(obj, attr, value))

    def on_remove(self, undo: Callable[[], Any]) -> Removable:
        """Call ``undo`` when the set is removed (hooks installed by other means, e.g. a function registry)."""
        return self.add(_Call(undo))

    def add(self, handle: Removable) -> Removable:
        """Keep anything with a ``remove()`` method for removal with the rest."""
        self._handles.append(handle)
        return handle

    def on_modules(
        self,
        model: nn.Module,
        pre: Callable[[str, nn.Module], Callable | None] | None = None,
        post: Callable[[str, nn.Module], Callable | None] | None = None,
        *,
        names: Iterable[str] | None = None,
        predicate: Callable[[str, nn.Module], bool] | None = None,
        with_kwargs: bool = False,
        always_call: bool = False,
    ) -> int:
        """Hook every module :func:`walk_modules` yields: ``pre(name, module)`` / ``post(name, module)``
        build the hook functions (None: no hook on that module). Returns how many modules got a hook."""
        hooked = 0
        for name, module in walk_modules(model, names, predicate):
            fn_pre = pre(name, module) if pre is not None else None
            fn_post = post(name, module) if post is not None else None
            if fn_pre is not None:
                self.forward_pre(module, fn_pre, with_kwargs=with_kwargs)
            if fn_post is not None:
                self.forward(module, fn_post, with_kwargs=with_kwargs, always_call=always_call)
            hooked += fn_pre is not None or fn_post is not None
        return hooked

    # ------------------------------------------------------------------ removing
    def remove(self) -> None:
        """Remove every hook (in reverse order of registration); safe to call again."""
        handles, self._handles = self._handles, []
        for handle in reversed(handles):
            with contextlib.suppress(Exception):
                handle.remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __bool__(self) -> bool:  # an empty set is still a set (``if hooks:`` must not mean "has hooks")
        return True

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"HookSet({self.owner!r}, {len(self)} hooks)"
