"""The one path every finding takes into the finding log: propose during a step, settle at its end.

Whoever finds a problem — a statistics rule, an attention check, the memory monitor, the hang watchdog, a
preflight check, the monitor's own error guard — holds a :class:`FindingProducer` for its finding code and
talks to the log only through it:

* :meth:`~FindingProducer.judge` compares a value with the code's resolved threshold (the config's
  per-pattern overrides apply) and proposes a finding when a level is reached; a value clear of the
  warning level (with hysteresis, ``clear_factor``) closes an open one;
* :meth:`~FindingProducer.propose` proposes a finding whose severity the producer decided itself;
* :meth:`~FindingProducer.release` closes the finding on a target;
* :meth:`~FindingProducer.settle` writes what was proposed: updates of open findings, then new ones worst
  first, at most ``rules.max_open`` open per code (the rest counted in ``data.not_opened``), each marked
  when it opened while a run-wide problem was open (``ctx.shared["cause"]``).

So severity ordering, the open-finding cap and cause marking hold alike for every producer, and nothing
else in the package calls :meth:`FindingLog.report` or :meth:`FindingLog.clear`.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from stethoscope.findings import SEVERITY_RANK, FindingLog, finding_id
from stethoscope.rules import hints as H
from stethoscope.rules.thresholds import Threshold, ThresholdResolver

Text = str | Callable[[], str]


@dataclass
class RulesSettings:
    """The config's ``rules:`` section as plain values (defaults when the section is absent)."""

    window: int = 20
    smoothing: int = 3
    min_history: int = 5
    min_rows: int = 16
    max_open: int = 8
    aggregate_min: int = 4
    explain_normal: bool = False
    saturation_modules: str | list[str] = "auto"

    @classmethod
    def from_config(cls, config: Any) -> RulesSettings:
        section = getattr(config, "rules", None)
        if section is None:
            return cls()
        return cls(**{k: getattr(section, k) for k in cls.__dataclass_fields__ if hasattr(section, k)})


@dataclass
class ProducerContext:
    """What a producer needs: the finding log, the threshold resolver, the ``rules:`` settings (the cap,
    ``explain_normal``) and the run-wide ``shared`` dict (``shared["cause"]``: a run-wide problem now open).
    Rules get a :class:`~stethoscope.rules.base.RuleContext`, which adds facts about the model."""

    findings: FindingLog
    resolver: ThresholdResolver = field(default_factory=ThresholdResolver)
    settings: RulesSettings = field(default_factory=RulesSettings)
    shared: dict = field(default_factory=dict)


class FindingProducer:
    """The finding code ``code`` of one producer, between its checks and the finding log.

    Args:
        ctx: a :class:`ProducerContext` (or a rule's :class:`~stethoscope.rules.base.RuleContext`).
        code: the finding code (default: the class attribute, as rules set it).
        thresholds: threshold key -> default :class:`Threshold` (default: the class attribute).
        clear_factor: hysteresis: an open finding closes once the value is below ``clear_factor`` times
            its warning level (above ``1/clear_factor`` times it for lower-is-worse values).
    """

    code: ClassVar[str] = ""
    thresholds: ClassVar[dict[str, Threshold]] = {}
    clear_factor: ClassVar[float] = 0.8
    # set by producers whose findings explain others nearby (``act.dead_features``: "dead units"): while one
    # is open, findings of other codes that open on targets inside its block are linked to it as consequences
    explains: ClassVar[str | None] = None

    def __init__(self, ctx: Any, code: str | None = None, thresholds: dict[str, Threshold] | None = None,
                 clear_factor: float | None = None):
        self.ctx = ctx
        if code is not None:
            self.code = code  # type: ignore[misc]
        if thresholds is not None:
            self.thresholds = thresholds  # type: ignore[misc]
        if clear_factor is not None:
            self.clear_factor = clear_factor  # type: ignore[misc]
        self._candidates: list[_Candidate] = []

    # ------------------------------------------------------------------ reading the state
    def threshold(self, target: str | None, key: str | None = None) -> Threshold:
        """The resolved levels of ``key`` (default: the first threshold key) for ``target``."""
        key = key or next(iter(self.thresholds), self.code)
        return self.ctx.resolver.resolve(key, target, self.thresholds.get(key))

    # ------------------------------------------------------------------ proposing
    def judge(
        self,
        target: str | None,
        value: float | None,
        step: int | None,
        message: Text,
        hint: Text,
        key: str | None = None,
        data: dict | None = None,
        severity: str | None = None,
    ) -> str | None:
        """Compare ``value`` with the resolved threshold: propose a finding on ``target``, or close it.

        ``message`` and ``hint`` may be callables, formatted only when a finding is written. ``severity``
        overrides the computed one (e.g. to lower a critical to a warning for a known-benign case).
        Returns the severity reached, or None.
        """
        th = self.threshold(target, key)
        crossed = sev = th.severity(value)
        if sev is not None and severity is not None:
            sev = severity
        if sev is None:
            if value is not None and th.healthy(float(value), self.clear_factor):
                self.release(target, step, value)
            return None
        # the level the value actually crossed: a severity raised for another reason (a spike that lasts) is
        # shown against the level it passed, never against a level it did not reach
        level = th.level(crossed if SEVERITY_RANK[sev] > SEVERITY_RANK[crossed] else sev)
        self._candidates.append(_Candidate(  # written with the step settle() is given, like every judged one
            sev, _badness(value, th, sev), target, value, level if level is not None else th.shown, None,
            message, hint, data, th.higher_is_worse, linked=True,
        ))
        return sev

    def propose(
        self,
        target: str | None,
        severity: str,
        value: Any,
        threshold: Any,
        step: int | None,
        message: Text,
        hint: Text,
        data: dict | None = None,
        higher_is_worse: bool = True,
    ) -> None:
        """Propose a finding whose severity was decided by the caller (no threshold lookup)."""
        if severity not in SEVERITY_RANK:
            raise ValueError(f"severity must be one of {tuple(SEVERITY_RANK)}, got {severity!r}")
        self._candidates.append(_Candidate(
            severity, _badness_plain(value, threshold, higher_is_worse), target, value, threshold, step,
            message, hint, data, higher_is_worse, linked=False,
        ))

    def note(self, target: str | None, step: int | None, value: Any, message: Text) -> None:
        """An ``info`` finding explaining that something that looks wrong is normal.

        Written only with ``rules.explain_normal: true`` and once per target; it never affects the verdict.
        """
        if not self.ctx.settings.explain_normal:
            return
        noted = self.ctx.shared.setdefault("noted", set())
        key = (self.code, target)
        if key in noted:
            return
        noted.add(key)
        self.propose(target, "info", value, None, step, message, H.join(H.shared("expected")))

    def release(self, target: str | None, step: int | None, value: Any = None) -> None:
        """The condition on ``target`` no longer holds: close its finding if one is open (at once).

        A target folded into an aggregated finding leaves it; the aggregate closes with its last member.
        """
        log = self.ctx.findings
        if log.is_open(self.code, target):
            log.clear(self.code, target, step, value)
            return
        for agg in self._aggregates():
            members = agg.data.get("members") or []
            if target in members:
                members.remove(target)
                agg.data["count"] = len(members)
                if not members:
                    log.clear(self.code, agg.target, step, value)
                return

    def is_open(self, target: str | None) -> bool:
        """Whether ``target`` has an open finding of this code, on its own or folded into an aggregate."""
        if self.ctx.findings.is_open(self.code, target):
            return True
        return any(target in (agg.data.get("members") or ()) for agg in self._aggregates())

    def open_targets(self) -> list[str | None]:
        """Every target with an open finding of this code (the members of aggregated findings included)."""
        out: list[str | None] = []
        for f in list(self.ctx.findings.open.values()):  # a snapshot: the watchdog thread may write meanwhile
            if f.code == self.code:
                out.extend(f.data["members"] if f.data.get("members") else [f.target])
        return out

    def _aggregates(self) -> list:
        return [f for f in list(self.ctx.findings.open.values()) if f.code == self.code and f.data.get("members")]

    # ------------------------------------------------------------------ settling
    def settle(self, step: int | None) -> list[dict]:
        """Write what was proposed since the last settle; returns the events written.

        * A target folded into an open aggregated finding updates that finding.
        * New targets of one severity and one cause, ``rules.aggregate_min`` or more in one step, become one
          finding whose target is their scope (``bert.encoder.layer.*``), the members in ``data.members``.
        * Updates of open findings first, then new ones worst first up to ``rules.max_open`` open for this
          code; what the cap leaves out is counted in the message of the last one opened.
        * A finding that opens while a run-wide problem is open (``ctx.shared["cause"]``: a gradient-norm
          spike, a NaN in the forward pass) is linked to it: ``data.caused_by`` names the root finding and the
          reason (the incident it belongs to), and its message says so.
        """
        if not self._candidates:
            return []
        candidates, self._candidates = self._candidates, []
        candidates.sort(key=lambda c: (-SEVERITY_RANK[c.severity], -c.badness))
        log = self.ctx.findings
        open_now = {f.target: f for f in list(log.open.values()) if f.code == self.code}
        member_of = {m: f.target for f in open_now.values() for m in (f.data.get("members") or ())}
        cause = self._cause()
        for cand in candidates:  # a run-wide cause first; else an open finding that explains this target's block
            cand.cause = cause if cause is not None else self._local_cause(cand.target)
        existing: dict[str | None, _Candidate] = {}
        new: list[_Candidate] = []
        for cand in candidates:
            home = cand.target if cand.target in open_now else member_of.get(cand.target, _NOWHERE)
            if home is _NOWHERE:
                new.append(cand)
            elif home not in existing:  # the worst member speaks for an aggregate (candidates are sorted)
                existing[home] = cand if home == cand.target else self._folded(cand, open_now[home])
        new = self._aggregate(new)
        room = max(0, self.ctx.settings.max_open - len(open_now))
        chosen, dropped = list(existing.values()), []
        for cand in new:
            if room <= 0:
                dropped.extend(cand.members or [cand.target])
                continue
            room -= 1
            chosen.append(cand)
        written = []
        for k, cand in enumerate(chosen):
            current = open_now.get(cand.target)
            data, message = cand.data, cand.message
            if current is None:
                if cand.linked and cand.cause is not None:
                    data = {**(data or {}), **cand.cause}
                if self.explains and not cand.members and cand.target is not None:  # others in its block follow
                    data = {**(data or {}), "explains": {"what": self.explains, "scope": block_of(cand.target)}}
                if dropped and k == len(chosen) - 1:
                    data = {**(data or {}), "not_opened": {"count": len(dropped), "targets": dropped[:10]}}
                    message = _not_opened(message, len(dropped))
            link = (data or {}).get("caused_by") or (current.data.get("caused_by") if current is not None else None)
            if link:  # keep saying so in later updates too: the folded finding shows the last message
                message = _after(message, link)
            event = log.report(
                self.code, cand.target, cand.severity, _plain(cand.value), _plain(cand.threshold),
                _text(message), _text(cand.hint), cand.step if cand.step is not None else step,
                data=data, higher_is_worse=cand.higher_is_worse,
            )
            if event is not None:
                written.append(event)
        return written

    def _local_cause(self, target: str | None) -> dict | None:
        """``data`` linking a finding on ``target`` to an open finding of another code that explains its block
        (the narrowest such block), or None."""
        if target is None:
            return None
        best = None
        for f in list(self.ctx.findings.open.values()):  # the open explaining findings (they survive a resume)
            explains = f.data.get("explains")
            if not explains or f.code == self.code:
                continue
            scope = explains["scope"]
            if not (scope == "" or target == scope or target.startswith(scope + ".")):
                continue
            if best is None or len(scope) > len(best.data["explains"]["scope"]):
                best = f
        if best is None:
            return None
        scope = best.data["explains"]["scope"]
        return {"caused_by": {
            "id": best.id, "code": best.code, "target": best.target, "step": best.first_step,
            "reason": f"opened while {best.data['explains']['what']} in `{best.target}` (`{best.code}`, since step "
                      f"{best.first_step}) were open in the same block `{scope or '<model>'}`",
        }}

    def _cause(self) -> dict | None:
        """``data`` linking a finding that opens now to the open run-wide problem (another code's), or None."""
        cause = self.ctx.shared.get("cause")
        if not cause or cause.get("code") == self.code:
            return None
        code, target = cause["code"], cause.get("target", _NOWHERE)
        log = self.ctx.findings
        root = next((f for f in list(log.open.values())
                     if f.code == code and (target is _NOWHERE or f.target == target)), None)
        if root is not None:
            root_id, target = root.id, root.target
        elif target is not _NOWHERE:  # announced before it opens (a spike waits for confirmation)
            root_id = finding_id(code, target, log.rank)
        else:
            root_id, target = None, None
        what = cause.get("what", "a run-wide problem")
        where = f" on `{target or '<model>'}`" if root_id is not None else ""
        return {
            "after": code, "after_step": cause.get("step"), "after_what": what,  # 0.1's fields, kept
            "caused_by": {
                "id": root_id,
                "code": code,
                "target": target,
                "step": cause.get("step"),
                "reason": f"opened while {what} (`{code}`{where}, since step {cause.get('step')}) was open",
            },
        }

    def _folded(self, cand: _Candidate, agg: Any) -> _Candidate:
        """A member's candidate as an update of the aggregated finding it belongs to."""
        members = list(agg.data.get("members") or ())
        return _Candidate(
            cand.severity, cand.badness, agg.target, cand.value, cand.threshold, cand.step,
            self._aggregate_message(members, agg.data.get("scope", agg.target), cand), cand.hint,
            {"worst": cand.target}, cand.higher_is_worse, cand.linked, members,
        )

    def _aggregate(self, new: list[_Candidate]) -> list[_Candidate]:
        """New candidates of one severity and cause, ``rules.aggregate_min`` or more, as one candidate each."""
        least = getattr(self.ctx.settings, "aggregate_min", 4)
        if least <= 1 or len(new) < least:
            return new
        groups: dict[tuple, list[_Candidate]] = {}
        for cand in new:
            link = (cand.cause or {}).get("caused_by", {}).get("id") if cand.linked else None
            groups.setdefault((cand.severity, link), []).append(cand)
        out: list[_Candidate] = []
        for (severity, _), group in groups.items():
            # info findings (notes that something is normal) stay per target: each says why its target is fine
            if len(group) < least or severity == "info" or any(c.target is None for c in group):
                out.extend(group)
                continue
            worst = group[0]
            members = sorted({str(c.target) for c in group}, key=_natural)
            scope = scope_pattern(members)
            data = {**(worst.data or {}), "members": members[:MAX_MEMBERS], "count": len(members),
                    "scope": scope, "worst": worst.target,
                    "values": {str(c.target): _plain(c.value) for c in group[:20]},
                    "messages": {str(c.target): _text(c.message) for c in group[:20]}}  # each member's own words
            agg = _Candidate(
                worst.severity, worst.badness, scope, worst.value, worst.threshold, worst.step,
                self._aggregate_message(members, scope, worst), worst.hint, data, worst.higher_is_worse,
                worst.linked, members,
            )
            agg.cause = worst.cause
            out.append(agg)
        out.sort(key=lambda c: (-SEVERITY_RANK[c.severity], -c.badness))
        return out

    def _aggregate_message(self, members: list[str], scope: str, worst: _Candidate) -> Callable[[], str]:
        """What an aggregated finding says: how many, where, and the worst member's own message."""
        return lambda: f"{describe_scope(members, scope, self._universe(members))}; the worst, " \
                       f"`{worst.target}`: {_text(worst.message)}"

    def _universe(self, members: list[str]) -> list[str]:
        """Every name of the kind the members are (parameter or module names), for "every ... under"."""
        info = getattr(self.ctx, "info", None)
        if info is None:
            return []
        params = list(getattr(info, "params", {}) or {})
        if params and members[0] in params:
            return params
        return list(getattr(info, "module_types", {}) or {})


MAX_MEMBERS = 5000  # names kept in an aggregated finding's data.members
_NOWHERE = object()


def _natural(name: str) -> list:
    """Sort key: ``layer.2`` before ``layer.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def block_of(name: str) -> str:
    """The block a module belongs to: up to its last numbered part (``transformer.h.1.mlp.act`` ->
    ``transformer.h.1``), else its parent (``encoder.act`` -> ``encoder``)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1])


def scope_pattern(names: list[str]) -> str:
    """The narrowest glob covering ``names``: ``a.*.c.weight`` when they differ in some dotted parts only,
    else their common dotted prefix and ``*`` (``*`` alone for names with nothing in common)."""
    parts = [n.split(".") for n in names]
    if len({len(p) for p in parts}) == 1:
        columns = list(zip(*parts, strict=True))
        varying = [len(set(col)) > 1 for col in columns]
        if sum(varying) <= 2 and not varying[-1]:  # h.*.attn.c_attn.weight; never a trailing "*.*"
            return ".".join("*" if v else col[0] for col, v in zip(columns, varying, strict=True))
    prefix: list[str] = []
    for col in zip(*parts, strict=False):
        if len(set(col)) > 1:
            break
        prefix.append(col[0])
    if len(prefix) == min(len(p) for p in parts):  # one name is the prefix of the others
        prefix = prefix[:-1]
    return ".".join([*prefix, "*"]) if prefix else "*"


def describe_scope(members: list[str], scope: str, universe: list[str]) -> str:
    """``96 parameters — every parameter under `bert.encoder.layer.*` (blocks 0–5)``, in words."""
    noun = "parameter" if any(m.rsplit(".", 1)[-1] in ("weight", "bias") for m in members) else "target"
    n = len(members)
    under = [u for u in universe if fnmatch.fnmatchcase(u, scope)] if universe else []
    if scope == "*":
        where = "across the model"
    elif under and len(under) == n:
        where = f"every {noun} under `{scope}`"
    elif under:
        where = f"{n} of the {len(under)} {noun}s under `{scope}`"
    else:
        where = f"under `{scope}`"
    blocks = _blocks(members, scope)
    return f"{n} {noun}s — {where}" + (f" ({blocks})" if blocks else "")


def _blocks(members: list[str], scope: str) -> str:
    """``blocks 0–5`` when the members sit in numbered blocks (the first dotted part that is a number)."""
    depth = next((i for i, t in enumerate(scope.split(".")) if t == "*"), None)
    if depth is None:
        return ""
    numbers = set()
    for m in members:
        parts = m.split(".")
        if depth >= len(parts) or not parts[depth].isdigit():
            return ""
        numbers.add(int(parts[depth]))
    if len(numbers) < 2:
        return ""
    ordered = sorted(numbers)
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"blocks {ordered[0]}–{ordered[-1]}"
    return "blocks " + ", ".join(map(str, ordered[:12])) + (" …" if len(ordered) > 12 else "")


class _Candidate:
    """A proposed finding, waiting for :meth:`FindingProducer.settle`."""

    __slots__ = ("badness", "cause", "data", "higher_is_worse", "hint", "linked", "members", "message", "severity",
                 "step", "target", "threshold", "value")

    def __init__(self, severity: str, badness: float, target: str | None, value: Any, threshold: Any,
                 step: int | None, message: Text, hint: Text, data: dict | None, higher_is_worse: bool,
                 linked: bool, members: list[str] | None = None):
        self.severity, self.badness, self.target, self.value = severity, badness, target, value
        self.threshold, self.step, self.message, self.hint = threshold, step, message, hint
        self.data, self.higher_is_worse, self.linked = data, higher_is_worse, linked
        self.members = members
        self.cause: dict | None = None  # the caused_by link it opens with, decided at settle


# ---------------------------------------------------------------------- small helpers
def _after(message: Text, link: dict) -> Callable[[], str]:
    """A message that says it opened while a run-wide problem was already open (likely its consequence)."""
    return lambda: f"{_text(message)}. A consequence: it {link.get('reason', 'opened during a run-wide problem')}"


def _not_opened(message: Text, count: int) -> Callable[[], str]:
    return lambda: f"{_text(message)} (+{count} more target(s) of this code not opened: rules.max_open)"


def _text(t: Text) -> str:
    return t() if callable(t) else str(t)


def _plain(v: Any) -> Any:
    """A JSON-friendly number: NaN as None, ±inf as strings; everything else as it is."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _badness(value: Any, th: Threshold, sev: str) -> float:
    """How far past its level a value is (log scale), to open the worst findings first."""
    level = th.level(sev)
    return _badness_plain(value, level, th.higher_is_worse)


def _badness_plain(value: Any, level: Any, higher_is_worse: bool) -> float:
    try:
        v = abs(float(value))
        level = abs(float(level)) if level is not None else 0.0
    except (TypeError, ValueError):
        return 0.0
    if not math.isfinite(v):
        return math.inf
    if level <= 0 or v <= 0:
        return v
    r = math.log(v / level)
    return r if higher_is_worse else -r
