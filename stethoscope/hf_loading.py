"""Load a local Hugging Face checkpoint (model and tokenizer from one folder), offline.

Kept apart from the core engine: ``transformers`` is imported only when a function here is called. Nothing is
downloaded: ``HF_HUB_OFFLINE=1`` is set and every ``from_pretrained`` call gets ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stethoscope.errors import MissingDependencyError, StethoscopeError

# Architecture names whose output has next-token logits.
_LM_SUFFIXES = ("LMHeadModel", "ForCausalLM")
DEFAULT_WARMUP = 2  # untraced passes before the timed one (``stethoscope trace --warmup``)


@dataclass
class LocalCheckpoint:
    """A model and tokenizer loaded from ``path``; ``is_lm`` when the model predicts next tokens."""

    path: Path
    model: Any
    tokenizer: Any
    is_lm: bool
    architecture: str


def _transformers() -> Any:
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the network from here
    try:
        import transformers
    except ImportError as e:
        raise MissingDependencyError("transformers", "hf", "loading a Hugging Face checkpoint") from e
    with contextlib.suppress(Exception):  # one traced pass: no "Loading weights" progress bar
        transformers.utils.logging.disable_progress_bar()
    return transformers


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "tf_model.h5", "flax_model.msgpack")


def check_weight_files(folder: Path) -> None:
    """Name an empty or cut-off weights file before transformers fails on it with a message that does not
    ("header too small", "invalid load key").

    Raises:
        StethoscopeError: a weights file is empty, or a ``.safetensors`` file is shorter than its own header.
    """
    import struct

    for pattern in WEIGHT_FILES:
        for f in sorted(folder.glob(pattern)):
            size = f.stat().st_size
            if size == 0:
                raise StethoscopeError(
                    f"{str(f)!r} is empty (0 bytes): the weights were never written or the copy was cut off; "
                    "save the model again with model.save_pretrained(MODEL_DIR), or copy the file again"
                )
            if f.suffix == ".safetensors":
                with open(f, "rb") as fh:
                    head = fh.read(8)
                header = struct.unpack("<Q", head)[0] if len(head) == 8 else None
                if header is None or 8 + header > size:
                    raise StethoscopeError(
                        f"{str(f)!r} is truncated ({size:,} bytes, shorter than its own safetensors header "
                        "says): save the model again with model.save_pretrained(MODEL_DIR), or copy the "
                        "file again"
                    )


def load_local(path: str | Path) -> LocalCheckpoint:
    """Load the model (with its language-model head when the config names one) and tokenizer in ``path``.

    Raises:
        StethoscopeError: the folder, its ``config.json``, its weights or its tokenizer is missing or
            unreadable (the message says which and what to do).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise StethoscopeError(
            f"MODEL_DIR {str(folder)!r} is not a folder; pass the folder that holds the "
            "checkpoint's config.json (as written by save_pretrained)"
        )
    if not (folder / "config.json").is_file():
        raise StethoscopeError(
            f"{str(folder)!r} has no config.json; pass a folder written by "
            "model.save_pretrained(...) (stethoscope never downloads models)"
        )
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise StethoscopeError(f"could not read {folder / 'config.json'}: {exc}") from exc
    archs = list(getattr(config, "architectures", None) or [])
    is_lm = any(a.endswith(_LM_SUFFIXES) for a in archs)
    auto = tf.AutoModelForCausalLM if is_lm else tf.AutoModel
    check_weight_files(folder)
    try:
        model = auto.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise StethoscopeError(
            f"could not load the model in {str(folder)!r} with {auto.__name__}: {exc}"
        ) from exc
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise StethoscopeError(
            f"could not load a tokenizer from {str(folder)!r} ({type(exc).__name__}: {exc}); save one beside the "
            "model with tokenizer.save_pretrained(MODEL_DIR)"
        ) from exc
    model.eval()
    return LocalCheckpoint(folder, model, tokenizer, is_lm, archs[0] if archs else type(model).__name__)


def encode(checkpoint: LocalCheckpoint, text: str) -> dict:
    """Tokenise ``text`` into the keyword arguments the model's ``forward`` accepts."""
    batch = checkpoint.tokenizer(text, return_tensors="pt")
    ids = batch.get("input_ids")
    if ids is not None and ids.numel() == 0:
        raise StethoscopeError(
            f"the tokenizer in {str(checkpoint.path)!r} turned {text[:40]!r} into no tokens — most likely no "
            "tokenizer files were saved there (transformers then builds an empty one); save the tokenizer "
            "beside the model with tokenizer.save_pretrained(MODEL_DIR)"
        )
    rows = getattr(checkpoint.model.get_input_embeddings(), "num_embeddings", None) if hasattr(
        checkpoint.model, "get_input_embeddings") else None
    if ids is not None and rows is not None and int(ids.max()) >= rows:
        raise StethoscopeError(
            f"the tokenizer in {str(checkpoint.path)!r} produced token id {int(ids.max())}, but the model's "
            f"embedding has {rows} rows: the tokenizer does not belong to this model (or the embedding was not "
            "resized after adding tokens: model.resize_token_embeddings(len(tokenizer)))"
        )
    try:
        accepted = set(inspect.signature(checkpoint.model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - exotic forward
        accepted = {"input_ids", "attention_mask"}
    if checkpoint.is_lm:  # a causal LM built with another family's tokenizer may not know token types
        accepted &= {"input_ids", "attention_mask"}
    return {k: v for k, v in batch.items() if k in accepted}


def top_k_next(checkpoint: LocalCheckpoint, output: Any, k: int) -> list[dict]:
    """The ``k`` most likely next tokens after the last position: token, id, probability."""
    import torch

    logits = output["logits"] if isinstance(output, dict) or hasattr(output, "keys") else output[0]
    probs = torch.softmax(logits[0, -1].float(), dim=-1)
    values, ids = probs.topk(min(k, probs.numel()))
    return [
        {"id": int(i), "token": checkpoint.tokenizer.decode([int(i)]), "prob": float(p)}
        for p, i in zip(values.tolist(), ids.tolist(), strict=True)
    ]


def trace_checkpoint(
    model_dir: str | Path,
    text: str,
    *,
    depth: int | None = None,
    top_k: int = 5,
    repeats: int | None = None,
    stats: bool | None = None,
    out: str | Path | None = None,
    warmup: int = DEFAULT_WARMUP,
    console: Any = None,
) -> dict:
    """``stethoscope trace``: one traced forward pass of a local checkpoint, printed and written to trace.jsonl.

    ``warmup`` untraced passes run first (default 2), so the times show the steady state rather than first-call
    costs (lazy initialisation, allocator growth, kernel selection); the timed pass is the one traced pass,
    and the printed table says so.

    Returns a summary dict (``trace_path``, ``top_k`` — None without a language-model head —, ``modules``,
    ``warmup``).
    """
    import datetime as _dt

    import torch
    from rich.markup import escape
    from rich.table import Table

    from stethoscope.config import TraceConfig
    from stethoscope.console import get_console
    from stethoscope.trace import TRACE, Trace, _count

    defaults = TraceConfig()
    depth = defaults.depth if depth is None else depth
    repeats = defaults.repeats if repeats is None else repeats
    stats = defaults.stats if stats is None else stats
    if top_k < 0 or depth < 0 or repeats < 1 or warmup < 0:
        raise StethoscopeError(
            f"--top-k, --depth and --warmup must be >= 0 and --repeats >= 1 (got {top_k}, {depth}, {warmup}, "
            f"{repeats})"
        )
    console = console or get_console()
    ckpt = load_local(model_dir)
    inputs = encode(ckpt, text)
    if out is None:
        out = Path("stethoscope-runs") / f"trace-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path = Path(out) / TRACE
    with torch.no_grad():
        for _ in range(warmup):  # untraced passes first: times then show steady state, not first-call costs
            ckpt.model(**inputs)
    with torch.no_grad(), Trace(ckpt.model, path, stats=stats) as tr:
        output = ckpt.model(**inputs)
    n_tokens = int(inputs["input_ids"].shape[-1]) if "input_ids" in inputs else 0
    total = tr.params.get("", 0)
    console.print(
        f"[bold]{escape(ckpt.architecture)}[/] from {escape(str(ckpt.path))} · {_count(total)} parameters · "
        f"{n_tokens} tokens · {tr.events} events",
        soft_wrap=True,
    )
    console.print(tr.tree(depth=depth, repeats=repeats))

    times = tr.module_times()
    passes = (f"1 timed pass after {warmup} warm-up pass{'es' if warmup != 1 else ''}" if warmup
              else "1 cold pass, no warm-up: first-call costs included (--warmup N)")
    cells = [[row["name"] or "<model>", row["class"], str(row["calls"]), f"{row['self_ms']:.2f}",
              f"{row['ms']:.2f}", _count(row["params"])] for row in times[:10]]
    console.print(fitted_table(
        f"slowest modules: self time (child modules excluded), {passes}",
        ["module", "class", "calls", "self ms", "total ms", "params"], cells, console.width,
        right=(2, 3, 4, 5),
    ))

    children = [(n, c) for n, c in tr.params.items() if n and "." not in n]
    if children:
        parts = ", ".join(f"{escape(n)} {_count(c)}" for n, c in children)
        console.print(f"parameters: {_count(total)} in all · {parts}", soft_wrap=True)

    predictions = None
    if ckpt.is_lm and top_k > 0:
        predictions = top_k_next(ckpt, output, top_k)
        # the title on its own line: as a table title it wraps at the narrow table's width
        console.print(escape(f"top-{top_k} next tokens after {text[-40:]!r}"), soft_wrap=True, style="italic")
        table = Table()
        for col in ("rank", "token", "id", "prob"):
            table.add_column(col)
        for i, p in enumerate(predictions, 1):
            table.add_row(str(i), escape(repr(p["token"])), str(p["id"]), f"{p['prob']:.4f}")
        console.print(table)
    elif not ckpt.is_lm:
        console.print(
            f"no next-token predictions: {escape(ckpt.architecture)} has no language-model head "
            "(its config names no *LMHeadModel / *ForCausalLM architecture)",
            soft_wrap=True,
        )
    console.print(f"trace: {escape(str(path))}", soft_wrap=True)
    return {"trace_path": path, "top_k": predictions, "modules": times, "is_lm": ckpt.is_lm, "warmup": warmup}


def fitted_table(title: str, columns: list[str], rows: list[list[str]], width: int,
                 right: tuple[int, ...] = ()) -> Any:
    """A rich table that fits ``width`` without folding a word: every cell on one line, the first column (the
    names) the only one cut, with "…", when the line is too short; the title wraps between words."""
    from rich import box
    from rich.cells import cell_len
    from rich.markup import escape
    from rich.table import Table

    widths = [max([cell_len(c)] + [cell_len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    room = width - (sum(widths) - widths[0]) - (3 * len(columns) + 1)  # padding and rules of SIMPLE_HEAD
    table = Table(title=escape(title), title_justify="left", box=box.SIMPLE_HEAD)
    for i, col in enumerate(columns):
        table.add_column(col, justify="right" if i in right else "left", no_wrap=True, overflow="ellipsis",
                         max_width=max(len(col), room) if i == 0 else None, min_width=None if i == 0 else widths[i])
    for r in rows:
        table.add_row(*(escape(c) for c in r))
    return table
