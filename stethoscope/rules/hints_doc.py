"""``docs/hints.md``, generated from the hints table so the page a reviewer reads is the table the code uses.

``python -m stethoscope.rules.hints_doc > docs/hints.md``; ``tests/rules/test_hints.py`` fails when they differ.
"""

from __future__ import annotations

import sys

from stethoscope.rules.hints import table


def _cell(text: str) -> str:
    text = " ".join(str(text).split()).replace("{{", "{").replace("}}", "}")  # format escapes, as printed
    return text.replace("|", "\\|")


def markdown() -> str:
    """``docs/hints.md``: every code's cases and clauses, then the shared clauses with their variants."""
    t = table()
    lines = [
        "# Hints: what each finding suggests",
        "",
        "Generated from `stethoscope/rules/hints.yaml` by `python -m stethoscope.rules.hints_doc > docs/hints.md`;",
        "a test fails when this page and the table disagree. Edit the table, not this page.",
        "",
        "A finding's hint is one *case* of its code: a list of clauses joined with `;`. `{name}` is filled by the",
        "finding (the module, the parameter, a measured value); `{layernorm}`, `{lower_lr}` and the other shared",
        "clauses below are worded for the target (a normalisation layer is not told to get a LayerNorm in front).",
        "A clause is left out when what it needs is unknown, or when its condition (`if`) does not hold.",
        "The meaning and thresholds of each code are in [findings.md](findings.md).",
        "",
        "| code | case | when | clauses |",
        "|---|---|---|---|",
    ]
    for code, cases in t["codes"].items():
        for case, entry in cases.items():
            parts = []
            for clause in entry["says"]:
                if isinstance(clause, dict):
                    parts.append(f"*if {clause['if']}:* {_cell(clause['says'])}")
                else:
                    parts.append(_cell(clause))
            says = "<br>".join(f"{i}. {p}" for i, p in enumerate(parts, 1))
            lines.append(f"| `{code}` | {case} | {_cell(entry.get('when', ''))} | {says} |")
    lines += ["", "## Shared clauses", "", "| clause | variant | text |", "|---|---|---|"]
    for name, variants in t["shared"].items():
        for variant, text in variants.items():
            lines.append(f"| `{{{name}}}` | {variant} | {_cell(text)} |")
    lines += [
        "",
        "Which variant: `layernorm` says `norm` for a normalisation layer; `input_scale` is left out for one, and",
        "`xavier` for a module without a weight matrix. `lower_lr` says `unknown` without a learning rate, `far_above`",
        "past ten times the usual maximum (1e-3 for Adam-family optimizers, 0.1 for SGD; `usual_lr` by the",
        "optimizer's family, `any` when none is known), and `third` otherwise.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown())
