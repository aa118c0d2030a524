"""Preflight checks of the optimizer against the model: coverage, duplicates, frozen, foreign, prefix groups.

The HF field note routes parameters to learning-rate groups by name (``visual.*``, ``merger.*``,
``detection_head.*``, ``model.*``, ``lm_head.*`` — "nothing else; any rogue parameter triggers KeyError").
These checks do that for any model: every trainable parameter in exactly one optimizer group, and, with
``expected_groups``, every parameter matching exactly one declared prefix and sitting in the group declared
for it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from stethoscope.naming import clean_name
from stethoscope.rules import hints as H

Report = Callable[..., None]  # report(code, target, severity, message, hint, value=None, threshold=None, data=None)

_SHOW = 12  # names listed in one message


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown + (f" … and {len(names) - _SHOW} more" if len(names) > _SHOW else "")


def _group_label(groups: list[dict], gi: int) -> str:
    name = groups[gi].get("name") if gi < len(groups) else None
    return f"group {gi}" + (f" ({name!r})" if isinstance(name, str) else "")


def check_optimizer(model: Any, optimizer: Any, report: Report) -> dict[int, list[int]]:
    """Coverage of the optimizer's param groups; returns ``id(param) -> [group indices]`` for later checks."""
    named = [(clean_name(n), p) for n, p in model.named_parameters(remove_duplicate=True)]
    by_id = {id(p): (n, p) for n, p in named}
    groups = list(getattr(optimizer, "param_groups", []))
    where: dict[int, list[int]] = {}
    foreign = 0
    for gi, group in enumerate(groups):
        for p in group.get("params", []):
            where.setdefault(id(p), []).append(gi)
            if id(p) not in by_id:
                foreign += 1
    trainable = [(n, p) for n, p in named if p.requires_grad]
    missing = [n for n, p in trainable if id(p) not in where]
    duplicated = {n: where[id(p)] for n, p in named if len(where.get(id(p), [])) > 1}
    frozen = [n for n, p in named if not p.requires_grad and id(p) in where]

    if missing:
        numel = sum(int(p.numel()) for n, p in trainable if id(p) not in where)
        report(
            "preflight.param_missing", missing[0] if len(missing) == 1 else f"{len(missing)} parameters",
            "critical",
            f"{len(missing)} trainable parameter(s) ({numel:,} values) are in no optimizer group and will never "
            f"be updated: {_names(missing)}",
            H.hint("preflight.param_missing"),
            value=len(missing), data={"parameters": missing},
        )
    if duplicated:
        listed = [f"{n} (in {', '.join(_group_label(groups, g) for g in gs)})" for n, gs in duplicated.items()]
        report(
            "preflight.param_duplicate",
            next(iter(duplicated)) if len(duplicated) == 1 else f"{len(duplicated)} parameters", "critical",
            f"{len(duplicated)} parameter(s) appear more than once in the optimizer and get updated (and their "
            f"optimizer state kept) once per appearance: {_names(listed)}",
            H.hint("preflight.param_duplicate"),
            value=len(duplicated), data={"parameters": {n: gs for n, gs in duplicated.items()}},
        )
    if frozen:
        report(
            "preflight.param_frozen", frozen[0] if len(frozen) == 1 else f"{len(frozen)} parameters", "warning",
            f"{len(frozen)} parameter(s) with requires_grad=False are in the optimizer: {_names(frozen)}. They get "
            "no gradient, so they are not trained; with weight decay some optimizers still shrink them",
            H.hint("preflight.param_frozen"),
            value=len(frozen), data={"parameters": frozen},
        )
    if foreign:
        everything = foreign == sum(len(g.get("params", [])) for g in groups)
        report(
            "preflight.param_foreign", None, "critical" if everything else "warning",
            f"the optimizer holds {foreign} tensor(s) that are not parameters of this model"
            + (" — none of its tensors are: it was built for another copy of the model" if everything else ""),
            H.hint("preflight.param_foreign"),
            value=foreign,
        )
    return where


def _matches(name: str, prefix: str) -> bool:
    """``prefix`` matches ``name``: a glob (``visual.*``), or a dotted prefix (``visual`` / ``visual.``)."""
    if any(ch in prefix for ch in "*?["):
        return fnmatch.fnmatchcase(name, prefix)
    p = prefix.rstrip(".")
    return bool(p) and (name == p or name.startswith(p + "."))


def check_groups(model: Any, optimizer: Any, expected: dict[str, list[str] | str], where: dict[int, list[int]] | None,
                 report: Report) -> None:
    """Every trainable parameter matches exactly one declared prefix, and sits in its declared group."""
    expected = {g: [v] if isinstance(v, str) else list(v) for g, v in expected.items()}
    named = [(clean_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
    unmatched: list[str] = []
    ambiguous: dict[str, list[str]] = {}
    assigned: dict[str, str] = {}
    for name, _p in named:
        hits = [g for g, prefixes in expected.items() if any(_matches(name, pre) for pre in prefixes)]
        if not hits:
            unmatched.append(name)
        elif len(hits) > 1:
            ambiguous[name] = hits
        else:
            assigned[name] = hits[0]
    declared = ", ".join(f"{g}: {v}" for g, v in expected.items())
    for name in unmatched:
        report(
            "preflight.param_group", name, "critical",
            f"trainable parameter {name} matches none of the declared group prefixes ({declared})",
            H.hint("preflight.param_group", "unmatched"),
            data={"declared": expected},
        )
    for name, hits in ambiguous.items():
        report(
            "preflight.param_group", name, "critical",
            f"parameter {name} matches the prefixes of several groups: {', '.join(hits)}",
            H.hint("preflight.param_group", "ambiguous"),
            data={"groups": hits},
        )
    if optimizer is None or where is None:
        return
    groups = list(optimizer.param_groups)
    names = {gi: g.get("name") for gi, g in enumerate(groups)}
    named_groups = any(isinstance(v, str) for v in names.values())
    by_name = dict(named)
    # per expected group: the optimizer groups holding its parameters
    homes: dict[str, set[int]] = {}
    for name, group in assigned.items():
        gis = where.get(id(by_name[name]), [])
        homes.setdefault(group, set()).update(gis)
        if named_groups and gis and not any(names.get(gi) == group for gi in gis):
            report(
                "preflight.param_group", name, "critical",
                f"parameter {name} belongs to group {group!r} by its prefix but sits in optimizer "
                f"{', '.join(_group_label(groups, gi) for gi in gis)}",
                H.hint("preflight.param_group", "misplaced"),
                data={"expected": group, "actual": [names.get(gi) for gi in gis]},
            )
    if not named_groups:
        for group, gis in homes.items():
            # a decay / no-decay split of one declared group is normal; different learning rates are not
            lrs = {groups[gi].get("initial_lr", groups[gi].get("lr")) for gi in gis}
            if len(lrs) > 1:
                report(
                    "preflight.param_group", group, "warning",
                    f"the parameters of declared group {group!r} are spread over optimizer groups "
                    f"{sorted(gis)} with different learning rates ({', '.join(str(x) for x in sorted(lrs))})",
                    H.hint("preflight.param_group", "spread"),
                    data={"optimizer_groups": sorted(gis)},
                )
