"""Every error stethoscope raises on purpose, in one place.

Messages name the bad input and say what to do about it (rich's ``errors.py`` is the model).
All of them derive from :class:`StethoscopeError`, so ``except StethoscopeError`` catches ours only.
"""

from __future__ import annotations


class StethoscopeError(Exception):
    """Base class of every error stethoscope raises deliberately."""


class ConfigError(StethoscopeError, ValueError):
    """A configuration file, dict or value is invalid: names the key, where it is, and the fix."""


class RunDirError(StethoscopeError, OSError):
    """The run directory cannot be used: not writable, not empty without ``resume=True``, or unreadable."""


class MonitorClosedError(StethoscopeError, RuntimeError):
    """A monitor method that records something was called after ``close()``."""


class MonitorUsageError(StethoscopeError, RuntimeError):
    """The monitor was driven in an order it cannot make sense of (e.g. nested ``step()`` blocks)."""


class CriticalFindingError(StethoscopeError, RuntimeError):
    """Raised when ``stop_on: critical`` is set and a critical finding opens.

    Attributes:
        finding: the finding (a dict with the findings.jsonl fields) that stopped the run.
    """

    def __init__(self, finding: dict):
        self.finding = finding
        super().__init__(
            f"critical finding {finding.get('code')} on {finding.get('target')!r} at step "
            f"{finding.get('step')}: {finding.get('message')} (stop_on: critical is set; "
            f"hint: {finding.get('hint')})"
        )


class MissingDependencyError(StethoscopeError, ImportError):
    """An optional dependency is not installed; the message gives the ``pip install`` line."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the optional package {package!r}, which is not installed. "
            f"Install it with: pip install 'stethoscope[{extra}]'"
        )


class PreflightError(StethoscopeError, ValueError):
    """``st.preflight(..., strict=True)`` found problems; the message lists every one of them at once.

    Attributes:
        findings: the preflight findings (warning and critical ones first), each with ``code``, ``target``,
            ``message`` and ``hint``.
    """

    def __init__(self, findings: list):
        self.findings = list(findings)
        lines = [
            f"  [{f.severity}] {f.code} {f.target or '-'}: {f.message} -> fix: {f.hint}" for f in self.findings
        ]
        super().__init__(
            f"preflight found {len(self.findings)} problem(s) (strict=True):\n" + "\n".join(lines)
        )


class CompareError(StethoscopeError, ValueError):
    """``st.compare`` / ``stethoscope compare`` cannot compare what it was given (the message says why)."""


class StructureMismatchError(CompareError):
    """Two matched modules return different structures or shapes.

    Attributes:
        module: the module's name (model A's spelling).
        shape_a, shape_b: what each model returned there (``(2, 5, 64) float32``, or a list of leaves).
    """

    def __init__(self, module: str, shape_a: str, shape_b: str, detail: str = ""):
        self.module, self.shape_a, self.shape_b = module, shape_a, shape_b
        super().__init__(
            f"module {module or '<model>'!r} returns {shape_a} in model A but {shape_b} in model B{detail}: the two "
            "models differ in structure there; compare checkpoints of the same architecture, or pass "
            "mapping= / --map to pair modules with different names, or match='order'"
        )
