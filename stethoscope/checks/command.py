"""``stethoscope check MODEL_DIR``: preflight on a saved Hugging Face checkpoint, offline.

Loads the model (its language-model head when the config names one) and, when the folder has one, the
tokenizer; builds the optimizer from ``--optimizer-config`` (or the Trainer-like default, see
:mod:`stethoscope.checks.spec`) and runs :func:`stethoscope.preflight`. The exit status is 1 when a finding
reaches ``--fail-on`` (default: critical).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from stethoscope.errors import StethoscopeError

_LEVELS = {"info": 0, "warning": 1, "critical": 2}


def load_checkpoint(path: str | Path) -> tuple[Any, Any]:
    """(model in train mode, tokenizer or None) from a ``save_pretrained`` folder."""
    from stethoscope.hf_loading import _LM_SUFFIXES, _transformers, check_weight_files

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise StethoscopeError(
            f"{str(folder)!r} has no config.json; pass a folder written by model.save_pretrained(...)"
        )
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise StethoscopeError(f"could not read {folder / 'config.json'}: {exc}") from exc
    archs = list(getattr(config, "architectures", None) or [])
    auto = tf.AutoModelForCausalLM if any(a.endswith(_LM_SUFFIXES) for a in archs) else tf.AutoModel
    check_weight_files(folder)
    try:
        model = auto.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise StethoscopeError(f"could not load the model in {str(folder)!r} with {auto.__name__}: {exc}") from exc
    model.train()
    tokenizer = None
    has_tokenizer = any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                                          "vocab.json", "tokenizer.model"))
    if has_tokenizer:
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:
            raise StethoscopeError(f"could not load the tokenizer in {str(folder)!r}: {exc}") from exc
    return model, tokenizer


def run_check(model_dir: Path, optimizer_config: Path | None, fail_on: str, as_json: bool,
              out: Path | None, console: Any) -> int:
    """Run the checks and print them; returns the exit status."""
    from rich.markup import escape

    from stethoscope.checks import preflight
    from stethoscope.checks.spec import build_optimizer, load_spec
    from stethoscope.console import SEVERITY_STYLE

    if fail_on not in ("warning", "critical"):
        raise StethoscopeError(f"--fail-on must be 'warning' or 'critical', got {fail_on!r}")
    spec = load_spec(optimizer_config)
    model, tokenizer = load_checkpoint(model_dir)
    optimizer = build_optimizer(model, spec)
    findings = preflight(
        model, optimizer, tokenizer,
        expected_groups=spec.expected_groups,
        special_tokens=spec.special_tokens or None,
        max_grad_norm=spec.max_grad_norm,
        run_dir=out,
    )
    worst = max((_LEVELS.get(f.severity, 0) for f in findings), default=-1)
    status = 1 if worst >= _LEVELS[fail_on] else 0
    if as_json:
        sys.stdout.write(json.dumps({"model_dir": str(model_dir), "findings": [f.as_dict() for f in findings]},
                                    indent=2, default=str) + "\n")
        return status
    n_params = sum(p.numel() for p in model.parameters())
    console.print(
        f"[bold]{escape(type(model).__name__)}[/] from {escape(str(model_dir))} · {n_params:,} parameters · "
        f"{type(optimizer).__name__} with {len(optimizer.param_groups)} group(s) · tokenizer: "
        f"{escape(type(tokenizer).__name__) if tokenizer is not None else 'none in the folder'}",
        soft_wrap=True,
    )
    if not findings:
        console.print("preflight: no problems found")
        return status
    # one block per finding, not a table: at 80 columns a four-column table folds names mid-word and
    # squeezes each explanation into a column a few words wide
    counts = {lvl: sum(f.severity == lvl for f in findings) for lvl in ("critical", "warning", "info")}
    console.print(f"[bold]preflight: {len(findings)} finding{'s' if len(findings) != 1 else ''}[/] ("
                  + ", ".join(f"{n} {lvl}" for lvl, n in counts.items() if n) + ")")
    for f in findings:
        style = SEVERITY_STYLE.get(f.severity, "")
        console.print(f"[{style}]{f.severity}[/] [bold]{escape(f.code)}[/] on [bold]{escape(f.target or '—')}[/]")
        console.print(escape(_indented(f.message, console.width)), soft_wrap=True)
        console.print(escape(_indented(f"fix: {f.hint}", console.width)), soft_wrap=True)
    return status


def _indented(text: str, width: int) -> str:
    """``text`` wrapped at word boundaries to ``width``, indented two spaces (a name longer than the line is
    kept whole, never cut)."""
    import textwrap

    return textwrap.fill(text, width=max(20, width), initial_indent="  ", subsequent_indent="  ",
                         break_long_words=False, break_on_hyphens=False)
