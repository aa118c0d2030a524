"""Attention probabilities from a captured call, and the per-head statistics the invariant checks read.

Everything here runs on the tensors' device and returns device tensors: the monitor brings one row per
attention call to the host together with the rest of the step (one transfer per sampled step).

Definitions (B batch, nh heads, Tq queries, Tk keys; "allowed" keys are the ones the mask lets a query see,
and in a causal module never a future one):

* a **valid row** is a query with at least one allowed key that is not itself a padding position;
* **entropy**: ``-sum_j p_ij log p_ij`` of a row, in nats, averaged over valid rows; ``entropy_norm`` divides
  each row's entropy by ``log(allowed keys)`` (1 = uniform, 0 = one-hot), over rows with two or more keys;
* **row-sum error**: ``max |sum_j p_ij - 1|`` over valid rows whose probabilities are not NaN (a NaN comes
  from the scores and is ``numerics.nonfinite``'s business; it is counted in ``nonfinite_rows``);
* **causal leak**: the largest mass a valid row puts on future keys (``j > i + Tk - Tq``);
* **padding mass**: the largest mass a valid row puts on keys the input's attention mask marks as padding;
* **sink share**: the mean mass on the row's first allowed key (and, in a bidirectional module, its last one,
  where encoders keep ``[SEP]``), over rows with at least :data:`SINK_MIN_KEYS` allowed keys, so the first
  rows of a causal pattern (row 0 sees only token 0) do not count;
* **one-hot fraction**: the share of rows with two or more allowed keys whose largest probability is at least
  :data:`ONE_HOT`, among those rows not parked near one-hot on a sink key (that is a sink, not a collapse).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from stethoscope.attention.capture import AttentionCall

ONE_HOT = 0.99  # a row whose largest probability reaches this is "near one-hot"
SINK_MIN_KEYS = 4  # rows seeing fewer keys say nothing about sinks (uniform over 3 keys is already 33 %)
MASKED_BELOW = -1.0e4  # additive mask values at or below this block a key (HF uses finfo.min; old BERT -10000)
CHUNK_ELEMENTS = 1 << 24  # probabilities materialised at once (64 MiB of float32), chunked over the batch

# Per-head columns of a statistics row: summed over calls and chunks ...
SUM_COLUMNS = (
    "sequences",  # batch items seen (to tell a short sequence from a small batch)
    "rows",  # valid query rows
    "entropy_sum",
    "entropy_norm_sum",
    "norm_rows",  # valid rows with >= 2 allowed keys
    "sink_rows",  # valid rows with >= SINK_MIN_KEYS allowed keys
    "sink_first_sum",
    "sink_last_sum",
    "one_hot_rows",
    "sink_one_hot_rows",  # near one-hot rows parked on a sink key (left out of the one-hot fraction)
    "nonfinite_rows",
)
# ... and maximised.
MAX_COLUMNS = ("row_sum_error", "causal_leak", "padding_mass", "max_logit")  # max_logit: NaN = not known
COLUMNS = SUM_COLUMNS + MAX_COLUMNS
WIDTH = len(COLUMNS)
# After the nh x WIDTH block a row carries the token ids at the first and last allowed key of the first
# sequence (-1 when unknown), so a sink can be named.
TAIL = 2


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, T, hs) -> (B, nkv * n_rep, T, hs): each key/value head serves ``n_rep`` query heads."""
    if n_rep == 1:
        return x
    b, nkv, t, hs = x.shape
    return x[:, :, None].expand(b, nkv, n_rep, t, hs).reshape(b, nkv * n_rep, t, hs)


def future_mask(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """(Tq, Tk) bool: True where key j is after query i (queries are the last Tq of the Tk positions)."""
    i = torch.arange(tq, device=device)[:, None] + (tk - tq)
    j = torch.arange(tk, device=device)[None, :]
    return j > i


def allowed_keys(call: AttentionCall, tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """Bool, broadcastable to (B, nh, Tq, Tk): the keys each query may see, by the mask as given.

    A causal module never may see a future key, whatever its mask says: that is the invariant checked.
    """
    mask = call.mask
    if call.mask_tiles is not None:  # a kernel's own mask (flex, flash): the whole grid as one tile
        allowed = call.mask_tiles.tile(0, tq, 0, tk, device)
    elif isinstance(mask, torch.Tensor) and mask.dim() == 4:
        mask = mask[..., -tq:, :tk] if mask.shape[-2] >= tq else mask[..., :tk]
        allowed = mask if mask.dtype == torch.bool else mask > MASKED_BELOW
    elif isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[-1] >= tk:
        allowed = mask[:, None, None, :tk].bool()  # a 2-D padding mask handed straight through
    else:
        allowed = torch.ones(1, 1, tq, tk, dtype=torch.bool, device=device)
    allowed = allowed.to(device)
    if call.causal:
        allowed = allowed & ~future_mask(tq, tk, device)
    return allowed


def scores(call: AttentionCall) -> torch.Tensor:
    """Raw attention scores ``q k^T * scaling`` (plus softcap and position bias), float32 (B, nh, Tq, Tk)."""
    q = call.query.detach().float()
    k = call.key.detach().float()
    k = repeat_kv(k, max(1, q.shape[1] // k.shape[1]))
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(call.scaling)  # (B, nh, Tq, Tk), a fresh tensor: in place
    if call.softcap:
        s = s.div_(call.softcap).tanh_().mul_(call.softcap)
    if isinstance(call.position_bias, torch.Tensor):
        s = s.add_(call.position_bias.detach().float())
    return s


def masked_scores(call: AttentionCall, s: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """The scores the softmax sees: the mask as the implementation applies it (blocked keys at -inf).

    ``inplace`` writes into ``s`` (a tensor of the caller's own) instead of a copy.
    """
    tq, tk = s.shape[-2:]
    mask = call.mask
    if call.mask_tiles is not None:
        blocked = ~call.mask_tiles.tile(0, tq, 0, tk, s.device)
        return s.masked_fill_(blocked, float("-inf")) if inplace else s.masked_fill(blocked, float("-inf"))
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        mask = mask[..., :tk].to(s.device)
        inplace = inplace and torch.broadcast_shapes(mask.shape, s.shape) == s.shape
        if mask.dtype == torch.bool:
            blocked = ~mask
        else:
            m = mask.float()
            s = s.add_(m) if inplace else s + m
            blocked = ~(m > MASKED_BELOW)  # NaN blocks too
        return s.masked_fill_(blocked, float("-inf")) if inplace else s.masked_fill(blocked, float("-inf"))
    if mask is None and call.implicit_causal and tq > 1:
        blocked = torch.ones(tq, tk, dtype=torch.bool, device=s.device).tril().logical_not_()  # SDPA's is_causal
        return s.masked_fill_(blocked, float("-inf")) if inplace else s.masked_fill(blocked, float("-inf"))
    return s


def recompute(call: AttentionCall) -> torch.Tensor:
    """Softmax probabilities (before dropout) recomputed from the call's queries, keys and mask, float32.

    Rows the mask blocks entirely come out as NaN (they are not valid rows and are not checked).
    """
    return torch.softmax(masked_scores(call, scores(call), inplace=True), dim=-1)


def pick_sequences(batch: int, limit: int, padding: torch.Tensor | None) -> torch.Tensor | None:
    """The batch items to check when at most ``limit`` may be (0 = all), as a sorted index tensor; None = all.

    Half the places go to the sequences with the most padding (a padding leak only shows where there is
    padding), the rest to the first sequences not taken yet. Chosen on the mask's device: no host read.
    """
    if limit <= 0 or batch <= limit:
        return None
    if not (isinstance(padding, torch.Tensor) and padding.dim() == 2 and padding.shape[0] == batch):
        return torch.arange(limit)
    i = torch.arange(batch, device=padding.device)  # (B,)
    half = (limit + 1) // 2
    counts = padding.sum(-1)  # (B,) padding positions per sequence
    first = torch.topk(counts * batch + (batch - 1 - i), half).indices  # most padding, earliest on ties
    taken = torch.zeros(batch, dtype=torch.bool, device=padding.device).index_fill_(0, first, True)
    rest = torch.topk(torch.where(taken, -2 * batch, -i), limit - half).indices  # earliest not taken
    return torch.cat([first, rest]).sort().values


def select_sequences(call: AttentionCall, probs: torch.Tensor | None, index: torch.Tensor, *others: Any):
    """(call, probs, *others) restricted to the batch items in ``index``.

    ``others`` are per-sequence tensors that go with the call (padding, token ids); a tensor without the
    call's batch dimension (a mask shared by the batch, None) is passed through as it is.
    """
    b = (probs if probs is not None else call.query).shape[0]
    # the first k sequences (no padding to prefer: the usual case) are views, not copies; the index is sorted
    # and unique, so it is 0..k-1 exactly when its last entry is k-1 (read only where it is in host memory)
    k = index.numel()
    first = index.device.type == "cpu" and k > 0 and int(index[-1]) == k - 1

    def take(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == b:
            return t[:k] if first else t.index_select(0, index.to(t.device))
        return t

    part = AttentionCall(**{**call.__dict__, "query": take(call.query), "key": take(call.key),
                            "value": None, "mask": take(call.mask), "position_bias": take(call.position_bias),
                            "weights": None,
                            "mask_tiles": call.mask_tiles.select(index) if call.mask_tiles is not None else None})
    return part, take(probs), *(take(t) for t in others)


def _chunks(call: AttentionCall, probs: torch.Tensor | None):
    """(batch slice, float32 probabilities) pieces of at most about CHUNK_ELEMENTS each."""
    if probs is not None:
        b, h, tq, tk = probs.shape
    else:
        b, h, tq, tk = call.query.shape[0], call.query.shape[1], call.query.shape[2], call.key.shape[2]
    per_item = max(1, h * tq * tk)
    step = max(1, CHUNK_ELEMENTS // per_item)
    for start in range(0, b, step):
        sl = slice(start, min(b, start + step))
        if probs is not None:
            yield sl, probs[sl].detach().float()
        else:
            part = AttentionCall(**{**call.__dict__, "query": call.query[sl], "key": call.key[sl]})
            if isinstance(call.mask, torch.Tensor) and call.mask.dim() >= 3 and call.mask.shape[0] == b:
                part.mask = call.mask[sl]
            if isinstance(call.position_bias, torch.Tensor) and call.position_bias.shape[0] == b:
                part.position_bias = call.position_bias[sl]
            if call.mask_tiles is not None:
                part.mask_tiles = call.mask_tiles.select(torch.arange(sl.start, sl.stop))
            yield sl, recompute(part)


def head_statistics(
    call: AttentionCall,
    probs: torch.Tensor | None = None,
    padding: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """One float32 device row: nh x :data:`WIDTH` per-head statistics, then :data:`TAIL` token ids.

    Args:
        call: the captured call (its mask, causality, and queries/keys when ``probs`` is None).
        probs: (B, nh, Tq, Tk) probabilities to check; None recomputes them from the call.
        padding: (B, Tk) bool, True at padding positions (from the input's 2-D attention mask), or None.
        input_ids: (B, Tk) token ids (to name a sink token), or None.
    """
    sums: torch.Tensor | None = None
    maxes: torch.Tensor | None = None
    first_ids = None
    for sl, p in _chunks(call, probs):
        b, _, tq, tk = p.shape
        device = p.device
        allowed = allowed_keys(call, tq, tk, device)
        if allowed.shape[0] not in (1, b):  # the mask covers the whole batch; this is a slice of it
            allowed = allowed[sl]
        pad = None
        if padding is not None and padding.shape[-1] == tk:
            pad = padding[sl].to(device)
            allowed = allowed & ~pad[:, None, None, :]
        s_part, m_part, ids = _chunk_stats(p, allowed, call.causal, pad,
                                           input_ids[sl] if input_ids is not None else None)
        sums = s_part if sums is None else sums + s_part
        maxes = m_part if maxes is None else torch.fmax(maxes, m_part)
        if first_ids is None:
            first_ids = ids
    return torch.cat([torch.cat([sums, maxes], dim=1).reshape(-1), first_ids])


def _chunk_stats(p, allowed, causal, pad, input_ids):
    b, h, tq, tk = p.shape
    device = p.device
    n_allowed = allowed.sum(-1).expand(b, h, tq)  # (B, nh, Tq); counted before expanding (the mask is small)
    valid = n_allowed > 0
    if pad is not None and tq == tk:  # a padding query's row is noise nobody reads
        valid = valid & ~pad[:, None, :]
    row_sum = p.sum(-1)
    nan_row = torch.isnan(row_sum)
    good = valid & ~nan_row
    zero = torch.zeros((), device=device)
    err = torch.where(good, (row_sum - 1).abs(), zero).amax(dim=(0, 2))  # (nh,) inf stays inf
    # -p log p per entry (0 at p = 0); rows that are not good are dropped below, whatever they hold
    work = p.clamp_min(0)  # (B, nh, Tq, Tk) the one full-size temporary, reused below
    ent = -torch.special.xlogy(work, work, out=work).sum(-1)  # (B, nh, Tq) -p log p summed (0 at p = 0)
    two = good & (n_allowed >= 2)
    ent_norm = ent / torch.log(n_allowed.clamp_min(2).float())
    if causal:
        fut = future_mask(tq, tk, device)
        mass = torch.mul(p, fut, out=work).sum(-1).abs()  # (B, nh, Tq) on future keys
        leak = torch.where(good, mass, zero).amax(dim=(0, 2))
    else:
        leak = torch.zeros(h, device=device)
    if pad is not None:
        pmass = torch.mul(p, pad[:, None, None, :], out=work).sum(-1).abs()  # (B, nh, Tq) on padding keys
        pad_max = torch.where(good, pmass, zero).amax(dim=(0, 2))
    else:
        pad_max = torch.zeros(h, device=device)
    # the first and last key each row may see (allowed may broadcast over heads: index before expanding)
    first_idx = allowed.to(torch.uint8).argmax(-1).expand(b, h, tq)
    last_idx = (tk - 1 - allowed.flip(-1).to(torch.uint8).argmax(-1)).expand(b, h, tq)
    p_first = p.gather(-1, first_idx[..., None]).squeeze(-1)
    p_last = p.gather(-1, last_idx[..., None]).squeeze(-1)
    sink_rows = good & (n_allowed >= SINK_MIN_KEYS)
    top, arg = p.max(-1)
    on_sink = (arg == first_idx) | ((arg == last_idx) if not causal else torch.zeros_like(good))
    sharp = two & (top >= ONE_HOT)
    one_hot = sharp & ~on_sink
    f = torch.float32
    sums = torch.stack(
        [
            torch.full((h,), float(b), device=device),
            good.sum((0, 2)).to(f),
            torch.where(good, ent, zero).sum((0, 2)),
            torch.where(two, ent_norm, zero).sum((0, 2)),
            two.sum((0, 2)).to(f),
            sink_rows.sum((0, 2)).to(f),
            torch.where(sink_rows, p_first, zero).sum((0, 2)),
            torch.where(sink_rows, p_last, zero).sum((0, 2)) if not causal else torch.zeros(h, device=device),
            one_hot.sum((0, 2)).to(f),
            (sharp & on_sink).sum((0, 2)).to(f),
            (valid & nan_row).sum((0, 2)).to(f),
        ],
        dim=1,
    )  # (nh, len(SUM_COLUMNS))
    no_logits = torch.full((h,), float("nan"), device=device)  # probabilities carry no logits: filled by callers
    maxes = torch.stack([err, leak, pad_max, no_logits], dim=1).float()  # (nh, len(MAX_COLUMNS))
    ids = torch.full((TAIL,), -1.0, device=device)
    if input_ids is not None and input_ids.shape[-1] == tk:
        row = allowed.expand(b, h, tq, tk)[0, 0, -1]  # the last query of the first sequence sees the most keys
        if bool(tq) and tk:
            fi = row.to(torch.uint8).argmax()
            li = tk - 1 - row.flip(0).to(torch.uint8).argmax()
            ids = torch.stack([input_ids[0, fi], input_ids[0, li]]).to(torch.float32).to(device)
    return sums, maxes, ids


def summarize(row, heads: int) -> list[dict]:
    """Host side: a (merged) statistics row -> one dict per head with the documented metric names."""
    import numpy as np

    block = np.asarray(row[: heads * WIDTH], dtype=np.float64).reshape(heads, WIDTH)
    out = []
    for h in range(heads):
        c = dict(zip(COLUMNS, block[h].tolist(), strict=True))
        rows, norm_rows, sink_rows = c["rows"], c["norm_rows"], c["sink_rows"]
        off_sink = norm_rows - c["sink_one_hot_rows"]  # rows a collapse is judged on
        first = c["sink_first_sum"] / sink_rows if sink_rows else math.nan
        last = c["sink_last_sum"] / sink_rows if sink_rows else math.nan
        sink_on = "last" if (last == last and last > (first if first == first else -1)) else "first"
        out.append(
            {
                "head": h,
                "rows": int(rows),
                "entropy": c["entropy_sum"] / rows if rows else math.nan,
                "entropy_norm": c["entropy_norm_sum"] / norm_rows if norm_rows else math.nan,
                "sink_share": max(first, last) if sink_rows else math.nan,
                "sink_token": sink_on if sink_rows else None,
                "sink_first": first,
                "sink_last": last,
                "sink_rows": int(sink_rows),
                "one_hot_fraction": c["one_hot_rows"] / off_sink if off_sink else math.nan,
                "one_hot_rows": int(c["one_hot_rows"]),
                "collapse_rows": int(off_sink),
                "collapse_rows_per_sequence": off_sink / c["sequences"] if c["sequences"] else 0.0,
                "row_sum_error": c["row_sum_error"],
                "causal_leak": c["causal_leak"],
                "padding_mass": c["padding_mass"],
                "max_logit": c["max_logit"],
                "nonfinite_rows": int(c["nonfinite_rows"]),
            }
        )
    return out


def merge_rows(rows: list, heads: int):
    """Merge the rows of several calls of one module in a step: sums add, maxima take the max."""
    import numpy as np

    blocks = [np.asarray(r[: heads * WIDTH], dtype=np.float64).reshape(heads, WIDTH) for r in rows]
    ns = len(SUM_COLUMNS)
    merged = blocks[0].copy()
    for blk in blocks[1:]:
        merged[:, :ns] += blk[:, :ns]
        merged[:, ns:] = np.fmax(merged[:, ns:], blk[:, ns:])
    tail = np.asarray(rows[0][heads * WIDTH : heads * WIDTH + TAIL], dtype=np.float64)
    return np.concatenate([merged.reshape(-1), tail])
