"""The report's sections, registered by the modules that build them.

A section is one small module: a function ``run -> Section | None`` (None when the run has no data for it)
decorated with :func:`register_section`, which names the section and places it on the page. The report
imports the modules listed in :data:`SECTION_MODULES` (importlib, like the monitor's extensions) and asks the
registry for the builders in order; nothing else lists the sections, and no section module imports the report
beyond this registry and :mod:`stethoscope.report.model`.

Example (a module of its own, added to :data:`SECTION_MODULES`)::

    from stethoscope.report.model import Section, Table
    from stethoscope.report.registry import register_section

    @register_section("throughput", order=95)
    def throughput(run):
        rows = run.metrics_of("throughput")
        if rows.empty:
            return None
        return Section("throughput", "Throughput", tables=[Table(["step", "tokens/s"], ...)])
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Modules whose import registers the built-in sections; the page order is each section's ``order``.
SECTION_MODULES: tuple[str, ...] = (
    "stethoscope.report.sections.dumps",
    "stethoscope.checks.report",
    "stethoscope.report.sections.training",
    "stethoscope.report.sections.gradients",
    "stethoscope.report.sections.activations",
    "stethoscope.report.sections.updates",
    "stethoscope.attention.report",
    "stethoscope.moe.report",
    "stethoscope.memory.report",
    "stethoscope.report.sections.timing",
    "stethoscope.perf.report",
)


@dataclass(frozen=True)
class SectionBuilder:
    """A registered section: its id, its place on the page (lower first) and the function that builds it."""

    name: str
    order: int
    build: Callable[[Any], Any]


_REGISTERED: dict[str, SectionBuilder] = {}


def register_section(name: str, order: int) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn(run) -> Section | None`` as the section ``name``, placed by ``order``.

    Registering a name again replaces the earlier builder (a module reloaded, or a section overridden).
    """

    def register(fn: Callable) -> Callable:
        _REGISTERED[name] = SectionBuilder(name, order, fn)
        return fn

    return register


def _raises(exc: Exception) -> Callable[[Any], Any]:
    def build(run: Any) -> Any:
        raise exc

    return build


def section_builders(modules: tuple[str, ...] | None = None) -> list[SectionBuilder]:
    """Import the section modules (default: :data:`SECTION_MODULES`) and return every registered section,
    in page order. A module that fails to import becomes a builder that raises its error (placed last), so
    the report shows a note in its place instead of failing."""
    failed: dict[str, SectionBuilder] = {}
    for i, path in enumerate(SECTION_MODULES if modules is None else modules):
        try:
            importlib.import_module(path)
        except Exception as exc:
            package, _, name = path.rpartition(".")
            if name == "report":  # stethoscope.memory.report: the memory section
                name = package.rpartition(".")[2]
            failed[name] = SectionBuilder(name, 10_000 + i, _raises(exc))
    builders = [b for b in _REGISTERED.values() if b.name not in failed] + list(failed.values())
    return sorted(builders, key=lambda b: b.order)
