"""Preflight checks: what is wrong with a training setup before the first step runs.

    import stethoscope as st
    findings = st.preflight(model, optimizer=opt, tokenizer=tok,
                            expected_groups={"backbone": ["model."], "head": ["lm_head."]},
                            special_tokens={"pad": 0, "<|im_start|>": 151644},
                            max_grad_norm=1.0)
    for f in findings:
        print(f.severity, f.code, f.target, f.message, "->", f.hint)

Every problem is a ``preflight.*`` finding (see docs/findings.md) with a fix; ``strict=True`` raises
:class:`~stethoscope.errors.PreflightError` listing all of them at once. ``stethoscope check MODEL_DIR`` runs
the same checks on a saved checkpoint (docs/preflight.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stethoscope.checks.hparams import check_clip, check_init, check_lr
from stethoscope.checks.optimizer import check_groups, check_optimizer
from stethoscope.checks.tokenizer import check_special_tokens, check_tokenizer_vs_model
from stethoscope.errors import MonitorUsageError, PreflightError
from stethoscope.findings import SEVERITY_RANK, FindingLog
from stethoscope.rules import hints as H
from stethoscope.rules.producer import FindingProducer, ProducerContext, RulesSettings
from stethoscope.run import Finding, fold_findings

__all__ = ["PREFLIGHT_CODES", "preflight"]

# Every code the checks emit (docs/findings.md lists each one).
PREFLIGHT_CODES = (
    "preflight.param_missing",
    "preflight.param_duplicate",
    "preflight.param_frozen",
    "preflight.param_foreign",
    "preflight.param_group",
    "preflight.special_token",
    "preflight.token_config",
    "preflight.vocab_size",
    "preflight.pad_token",
    "preflight.lr",
    "preflight.grad_clip",
    "preflight.init_scale",
)


def preflight(
    model: Any,
    optimizer: Any = None,
    tokenizer: Any = None,
    *,
    expected_groups: dict[str, list[str] | str] | None = None,
    special_tokens: dict[str, int] | None = None,
    max_grad_norm: float | None = None,
    init: bool = True,
    strict: bool = False,
    run_dir: Any = None,
) -> list[Finding]:
    """Check a training setup before it trains; returns the findings, most severe first (empty when healthy).

    Args:
        model: the ``nn.Module`` to train.
        optimizer: its optimizer: every trainable parameter must be in exactly one param group; frozen
            parameters and tensors of another model in it are flagged; learning rates far outside the usual
            range for the optimizer family are warnings.
        tokenizer: a Hugging Face tokenizer: its special ids against ``special_tokens`` and the model config,
            its size against the embedding rows, and whether it has a pad token.
        expected_groups: ``{group: [name prefixes]}`` — every trainable parameter must match exactly one
            group's prefixes (``"visual"``, ``"visual."`` or a glob ``"visual.*"``); when the optimizer's param
            groups carry a ``"name"`` key, each parameter must sit in the group of that name.
        special_tokens: ``{role or token: id}`` — roles are ``pad``, ``bos``, ``eos``, ``unk``, ``sep``,
            ``cls``, ``mask`` (or ``pad_token_id``, ...); any other key is a token string looked up with
            ``convert_tokens_to_ids``.
        max_grad_norm: the clipping value the loop will use (``clip_grad_norm_``), if any.
        init: check each linear layer's weight scale against 1/sqrt(fan_in) (meaningful before training).
        strict: raise :class:`~stethoscope.errors.PreflightError` listing every warning and critical finding.
        run_dir: also record the findings (with ``step: null``): a :class:`~stethoscope.Monitor` (they then
            count in its verdict and report), or the path of a run directory (appended to its
            ``findings.jsonl``; the folder is created if needed).

    Raises:
        PreflightError: with ``strict=True``, when any warning or critical finding was found.
        MonitorUsageError: ``model`` is not an ``nn.Module``.
    """
    from torch import nn

    if not isinstance(model, nn.Module):
        raise MonitorUsageError(f"preflight needs a torch.nn.Module as model, got {type(model).__name__}")
    events: list[dict] = []
    producers = _Producers(FindingLog(None))

    def report(code: str, target: str | None, severity: str, message: str, hint: str, value: Any = None,
               threshold: Any = None, data: dict | None = None) -> None:
        events.extend(producers.report(code, target, severity, value, threshold, message, hint, data))

    where = None
    if optimizer is not None:
        where = check_optimizer(model, optimizer, report)
        check_lr(optimizer, report)
    if expected_groups:
        check_groups(model, optimizer, expected_groups, where, report)
    if tokenizer is not None:
        if special_tokens:
            check_special_tokens(tokenizer, special_tokens, report)
        check_tokenizer_vs_model(tokenizer, model, report)
    elif special_tokens:
        _check_config_tokens(model, special_tokens, report)
    check_clip(max_grad_norm, report)
    if init:
        check_init(model, report)

    if run_dir is not None:
        _record(run_dir, events)
    findings = fold_findings(events)
    if strict:
        bad = [f for f in findings if SEVERITY_RANK.get(f.severity, 0) >= SEVERITY_RANK["warning"]]
        if bad:
            raise PreflightError(bad)
    return findings


def _check_config_tokens(model: Any, expected: dict[str, int], report: Any) -> None:
    """Without a tokenizer: the expected role ids against the model config's."""
    config = getattr(model, "config", None)
    for key, want in expected.items():
        role = key[: -len("_token_id")] if key.endswith("_token_id") else key
        got = getattr(config, f"{role}_token_id", None) if config is not None else None
        if got is not None and got != want and not (isinstance(got, list | tuple) and want in got):
            report(
                "preflight.token_config", f"{role}_token_id", "critical",
                f"model.config.{role}_token_id is {got}, expected {want}",
                H.hint("preflight.token_config", "expected", role=role, want=want),
                value=got, threshold=want,
            )


class _Producers:
    """One :class:`FindingProducer` per preflight code over ``log``: the findings take the one path."""

    def __init__(self, log: FindingLog):
        # every problem found is reported: preflight runs once, a cap would only hide some
        self.ctx = ProducerContext(log, settings=RulesSettings(max_open=1 << 30))
        self.by_code: dict[str, FindingProducer] = {}

    def report(self, code: str, target: str | None, severity: str, value: Any, threshold: Any, message: str,
               hint: str, data: dict | None) -> list[dict]:
        producer = self.by_code.setdefault(code, FindingProducer(self.ctx, code))
        producer.propose(target, severity, value, threshold, None, message, hint, data)
        return producer.settle(None)


def _record(target: Any, events: list[dict]) -> None:
    from stethoscope.monitor import Monitor

    if isinstance(target, Monitor):
        if target.disabled:
            return
        if target.closed:
            raise MonitorUsageError("preflight(run_dir=monitor): the monitor is closed; run preflight before close()")
        into = _Producers(target.findings)
        for ev in events:
            into.report(ev["code"], ev["target"], ev["severity"], ev["value"], ev["threshold"], ev["message"],
                        ev["hint"], ev.get("data"))
        return
    from stethoscope import rundir as rd

    path = Path(target)
    path.mkdir(parents=True, exist_ok=True)
    writer = rd.JsonlWriter(path / rd.FINDINGS)
    try:
        for ev in events:
            writer.write(ev)
    finally:
        writer.close()
