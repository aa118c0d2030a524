"""Preflight checks of the tokenizer against the expected special tokens and the model's config.

The HF field note asserts at start-up that ``tokenizer.convert_tokens_to_ids(tok) == EXPECTED_ID`` for every
special token; here that is one finding per mismatch, plus the checks nobody writes until they bite: the
tokenizer's special ids against the model config's, the vocabulary against the embedding rows, and a pad
token for batching.
"""

from __future__ import annotations

from typing import Any

from stethoscope.checks.optimizer import Report
from stethoscope.rules import hints as H

ROLES = ("pad", "bos", "eos", "unk", "sep", "cls", "mask")
_CONFIG_ROLES = ("pad", "bos", "eos", "decoder_start", "sep", "cls")


def _role_id(tokenizer: Any, role: str) -> Any:
    return getattr(tokenizer, f"{role}_token_id", None)


def check_special_tokens(tokenizer: Any, expected: dict[str, int], report: Report) -> None:
    """``expected``: role (``pad``, ``eos``, ... or ``pad_token_id``) or token string -> expected id."""
    unk = getattr(tokenizer, "unk_token_id", None)
    for key, want in expected.items():
        role = key[: -len("_token_id")] if key.endswith("_token_id") else key
        if role in ROLES:
            got = _role_id(tokenizer, role)
            what = f"tokenizer.{role}_token_id"
            token = getattr(tokenizer, f"{role}_token", None)
        else:
            try:
                got = tokenizer.convert_tokens_to_ids(key)
            except Exception:
                got = None
            what = f"convert_tokens_to_ids({key!r})"
            token = key
            if got is not None and got == unk and key != getattr(tokenizer, "unk_token", None):
                report(
                    "preflight.special_token", key, "critical",
                    f"special token {key!r} is not in the tokenizer's vocabulary ({what} gives the unknown-token "
                    f"id {got}); expected id {want}",
                    H.hint("preflight.special_token", "missing", token=repr(key)),
                    value=got, threshold=want,
                )
                continue
        if got != want:
            report(
                "preflight.special_token", key, "critical",
                f"{what} is {got!r} (token {token!r}), expected {want}",
                H.hint("preflight.special_token", "drifted"),
                value=got, threshold=want,
            )


def check_tokenizer_vs_model(tokenizer: Any, model: Any, report: Report) -> None:
    config = getattr(model, "config", None)
    gen = getattr(model, "generation_config", None)
    for role in _CONFIG_ROLES:
        tok_id = _role_id(tokenizer, role) if role != "decoder_start" else None
        for source_name, source in (("model.config", config), ("model.generation_config", gen)):
            cfg_id = getattr(source, f"{role}_token_id", None) if source is not None else None
            if tok_id is None or cfg_id is None:
                continue
            ok = tok_id in cfg_id if isinstance(cfg_id, list | tuple) else tok_id == cfg_id
            if not ok:
                report(
                    "preflight.token_config", f"{role}_token_id",
                    "critical" if role == "pad" and source_name == "model.config" else "warning",
                    f"tokenizer.{role}_token_id is {tok_id} but {source_name}.{role}_token_id is {cfg_id}"
                    + (": padding positions are masked from the loss or attention by one id and written with "
                       "another" if role == "pad" else
                       ": generation stops (or starts) on a different token than the data uses"),
                    H.hint("preflight.token_config", "tokenizer", source=source_name, role=role),
                    value=tok_id, threshold=cfg_id,
                    data={"tokenizer": tok_id, "config": cfg_id, "source": source_name},
                )
    try:
        size = len(tokenizer)
    except Exception:
        size = getattr(tokenizer, "vocab_size", None)
    rows = None
    try:
        emb = model.get_input_embeddings()
        rows = int(emb.weight.shape[0])
    except Exception:
        rows = getattr(config, "vocab_size", None) if config is not None else None
    if isinstance(size, int) and isinstance(rows, int) and size > rows:
        report(
            "preflight.vocab_size", "embeddings", "critical",
            f"the tokenizer has {size} tokens but the input embedding has {rows} rows: ids {rows}..{size - 1} "
            "index past the table (an index error on CPU, a device-side assert on CUDA)",
            H.hint("preflight.vocab_size"),
            value=size, threshold=rows,
        )
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "pad_token_id", None) is None:
        report(
            "preflight.pad_token", "pad_token", "warning",
            "the tokenizer has no pad token: batching sequences of different lengths with padding fails "
            "(or a pad id is invented somewhere else)",
            H.hint("preflight.pad_token"),
        )
