"""``stethoscope compare A B``: two local checkpoints on the same text, or two run directories."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from stethoscope.errors import CompareError


def _kind(path: Path) -> str:
    if not path.exists():
        raise CompareError(f"{str(path)!r} does not exist; pass two checkpoint folders (save_pretrained) or two "
                           "run directories")
    if (path / "config.json").is_file():
        return "model"
    if (path / "meta.json").is_file() or (path / "metrics.jsonl").is_file() or any(path.glob("rank*/meta.json")):
        return "run"
    raise CompareError(f"{str(path)!r} is neither a Hugging Face checkpoint (no config.json) nor a run directory "
                       "(no meta.json or metrics.jsonl)")


def parse_mapping(items: list[str] | None) -> dict[str, str]:
    """``--map B_PREFIX=A_PREFIX`` (repeatable) as a dict."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise CompareError(f"--map {item!r}: write B_PREFIX=A_PREFIX, e.g. --map model.decoder=transformer")
        b, a = item.split("=", 1)
        out[b.strip()] = a.strip()
    return out


def _texts(text: list[str] | None, inputs: Path | None) -> list[str]:
    texts = list(text or [])
    if inputs is not None:
        if not inputs.is_file():
            raise CompareError(f"--inputs {str(inputs)!r} is not a file; pass a text file (one input per line) or "
                               "a JSON list of strings")
        raw = inputs.read_text(encoding="utf-8")
        if inputs.suffix == ".json":
            loaded = json.loads(raw)
            if not isinstance(loaded, list) or not all(isinstance(t, str) for t in loaded):
                raise CompareError(f"--inputs {str(inputs)!r}: the JSON must be a list of strings")
            texts += loaded
        else:
            texts += [line for line in raw.splitlines() if line.strip()]
    if not texts:
        raise CompareError("comparing two checkpoints needs an input: --text \"...\" (repeatable) or --inputs FILE")
    return texts


def run_compare(a: Path, b: Path, *, text: list[str] | None, inputs: Path | None, mapping: list[str] | None,
                match: str, factor: float, backward: bool, as_json: bool, plot: Path | None, sigmas: float,
                rtol: float, console: Any) -> int:
    """Dispatch on what A and B are; print (or write JSON); return the exit code (0 same, 1 they differ)."""
    kind_a, kind_b = _kind(a), _kind(b)
    if kind_a != kind_b:
        raise CompareError(f"{str(a)!r} is a {kind_a} but {str(b)!r} is a {kind_b}: compare two checkpoints or two "
                           "run directories")
    if kind_a == "run":
        from stethoscope.compare.runs import compare_runs

        result = compare_runs(a, b, rtol=rtol, sigmas=sigmas)
    else:
        result = _compare_checkpoints(a, b, _texts(text, inputs), parse_mapping(mapping), match, factor, backward,
                                      progress=not as_json)
    figure = result.plot(plot) if plot is not None else None
    if as_json:
        out = result.as_dict() | ({"plot": str(figure)} if figure else {})
        sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
    else:
        from rich.markup import escape

        from stethoscope.compare.render import print_models, print_runs

        if kind_a == "run":
            print_runs(result, console)
        else:
            print_models(result, console, title=f"A = {a}  ·  B = {b}")
        if figure is not None:
            console.print(f"plot: {escape(str(figure))}", soft_wrap=True)
    return 0 if result.same else 1


def _compare_checkpoints(a: Path, b: Path, texts: list[str], mapping: dict, match: str, factor: float,
                         backward: bool, progress: bool) -> Any:
    """Load both checkpoints offline; tokenise with A's tokenizer (the same token ids go into both)."""
    from stethoscope.compare.models import compare
    from stethoscope.hf_loading import encode, load_local

    ckpt_a, ckpt_b = load_local(a), load_local(b)
    batches = []
    for t in texts:
        enc = encode(ckpt_a, t)
        if backward and ckpt_a.is_lm and "input_ids" in enc:
            enc["labels"] = enc["input_ids"]
        batches.append(enc)
    result = compare(ckpt_a.model, ckpt_b.model, batches, mapping=mapping, match=match, factor=factor,
                     backward=backward, progress=progress)
    ids_b = [ckpt_b.tokenizer(t, return_tensors="pt").get("input_ids") for t in texts]
    if any(x is None or x.shape != y["input_ids"].shape or bool((x != y["input_ids"]).any())
           for x, y in zip(ids_b, batches, strict=True) if "input_ids" in y):
        result.notes.append("B's tokenizer turns the text into other token ids than A's; both models were given "
                            "A's ids")
    return result
