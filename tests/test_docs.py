"""The docs promise every option and every finding code is documented: hold them to it."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

import stethoscope as st

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        for c in candidates:
            if isinstance(c, type) and issubclass(c, BaseModel):
                out.extend(_fields(c, prefix + name + "."))
    return out


def test_every_config_option_is_documented():
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    def documented(dotted: str) -> bool:
        leaf = dotted.split(".")[-1]
        section, _, rest = dotted.partition(".")
        return (f"`{dotted}" in text or f"`{section}[].{rest}`" in text or f"`{leaf}`" in text or f"`{leaf}:" in text
                or re.search(rf"^#+ {re.escape(dotted)}\b", text, re.M) is not None)

    missing = [f for f in _fields(st.Config) if not documented(f)]
    assert not missing, f"options missing from docs/configuration.md: {missing}"


def test_every_registered_finding_code_is_documented():
    from stethoscope.rules import registered_rules

    text = (DOCS / "findings.md").read_text(encoding="utf-8")
    codes = set(registered_rules()) | {"monitor.error", "monitor.storage"}
    missing = sorted(c for c in codes if not re.search(rf"`{re.escape(c)}`", text))
    assert not missing, f"finding codes missing from docs/findings.md: {missing}"


def test_readme_opens_with_the_two_commands():
    lines = [ln for ln in (DOCS.parent / "README.md").read_text(encoding="utf-8").splitlines() if ln.strip()]
    commands = [ln for ln in lines[:6] if ln.startswith("pip install")]
    assert len(commands) == 2
    assert "stethoscope demo" in commands[0] and "pytest" in commands[1]
    assert all(c.startswith("pip install torch==2.13.0") for c in commands)
