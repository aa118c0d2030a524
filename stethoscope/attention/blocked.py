"""The per-head attention statistics without the T×T matrix: query blocks × key tiles, online softmax.

Why: recomputing the probabilities of one sequence of T tokens costs nh·T² floats (4 GiB at T = 8192 with
16 heads), so long-context runs could not be checked. Here the scores exist one tile at a time,
(B, nh, block_queries, block_keys), and every statistic is carried across key tiles with the online-softmax
recurrence FlashAttention uses: a running maximum ``m`` per row, ``l = Σ exp(s - m)``, and every other sum
kept relative to the same ``m`` and rescaled by ``exp(m_old - m_new)`` when the maximum moves. At the end of a
row, with ``p_j = exp(s_j - m) / l``:

* entropy ``-Σ p log p = log l - u / l`` with ``u = Σ exp(s - m) (s - m)``;
* the largest probability is ``1 / l`` (the key at the maximum), so one-hot rows need no second pass;
* the mass on future keys / padding keys is their ``Σ exp(s - m)`` over ``l``;
* the first / last allowed key's probability comes from its score, remembered when the tile passes;
* the row sum is ``l · (1 / l)``: 1 within rounding, NaN for rows whose scores were not finite (so the
  ``nonfinite_rows`` count matches the full matrix's); a kernel's own row sums are only checked where the
  weights are returned (eager).

The row produced has exactly the layout of :func:`stethoscope.attention.checks.head_statistics` (the same
columns, sums and maxima), so rows merge and summarise alike; ``max_logit`` is the largest masked score
``q·k·scaling`` (softcap and position bias applied, as the softmax sees it) over the head's valid rows.
Extra memory is O(B · nh · block_queries · block_keys), flat in T; all work stays on the tensors' device,
with no host read.
"""

from __future__ import annotations

import functools

import torch

from stethoscope.attention.capture import AttentionCall
from stethoscope.attention.checks import (
    COLUMNS,
    MASKED_BELOW,
    ONE_HOT,
    SINK_MIN_KEYS,
    SUM_COLUMNS,
    TAIL,
    WIDTH,
)

BLOCK_QUERIES = 128  # query rows per block
BLOCK_KEYS = 1024  # keys per tile: a tile of scores is (B, nh, 128, 1024) floats
_NEG = float("-inf")
_INF = float("inf")
_NAN = float("nan")


def _mask_rows(mask: torch.Tensor, tq: int, tk: int) -> torch.Tensor:
    """A 4-D mask cut to the call's last ``tq`` query rows and first ``tk`` keys (rows may broadcast)."""
    mask = mask[..., :tk]
    return mask[..., -tq:, :] if mask.shape[-2] > tq else mask


def _rows(t: torch.Tensor, q0: int, q1: int) -> torch.Tensor:
    return t[..., q0:q1, :] if t.shape[-2] != 1 else t


def _tile_masks(call: AttentionCall, mask4: torch.Tensor | None, pad: torch.Tensor | None, tq: int, tk: int,
                q0: int, q1: int, k0: int, k1: int, device: torch.device):
    """(additive, blocked, allowed, future, future_blocked) for one tile.

    ``additive``/``blocked``: the mask as the implementation applies it (what the softmax sees);
    ``allowed``: the keys a query may see by the truth the invariants are checked against (the mask, never a
    future key in a causal module, never padding) — as :func:`checks.allowed_keys` and
    :func:`checks.masked_scores` define them, tile by tile.
    """
    i = torch.arange(q0, q1, device=device)[:, None]  # (Bq, 1) query positions
    j = torch.arange(k0, k1, device=device)[None, :]  # (1, Bk) key positions
    additive = blocked = None
    future_blocked = False
    if call.mask_tiles is not None:  # flex BlockMask, FlashAttention's padding / packing / window: this tile only
        allowed = call.mask_tiles.tile(q0, q1, k0, k1, device)  # (B|1, nh|1, Bq, Bk)
        blocked = ~allowed
    elif mask4 is not None:
        m = _rows(mask4, q0, q1)[..., k0:k1].to(device)  # (B|1, nh|1, Bq|1, Bk)
        if m.dtype == torch.bool:
            blocked, allowed = ~m, m
        else:
            additive = m.float()
            allowed = additive > MASKED_BELOW  # NaN blocks too
            blocked = ~allowed
    elif call.mask is None and call.implicit_causal and tq > 1:
        blocked = j > i  # SDPA's is_causal: top-left aligned
        future_blocked = tk == tq and call.causal  # then the blocked keys are exactly the future ones
        allowed = torch.ones(1, 1, q1 - q0, k1 - k0, dtype=torch.bool, device=device)
    else:
        allowed = torch.ones(1, 1, q1 - q0, k1 - k0, dtype=torch.bool, device=device)
    if isinstance(call.mask, torch.Tensor) and call.mask.dim() == 2 and call.mask.shape[-1] >= tk:
        allowed = call.mask[:, None, None, k0:k1].bool().to(device)  # a 2-D padding mask handed straight through
    future = j > i + (tk - tq)  # (Bq, Bk) keys after the query
    if call.causal:
        allowed = allowed & ~future
    if pad is not None:
        allowed = allowed & ~pad[:, None, None, k0:k1]
    return additive, blocked, allowed, future, future_blocked


def _allowed_counts(allowed: torch.Tensor, nk: int):
    """(count, any, first, last) of the allowed keys per query row of a tile mask ``(..., Bq, Bk)``."""
    first = allowed.to(torch.uint8).argmax(-1)  # (..., Bq) within the tile
    last = nk - 1 - allowed.flip(-1).to(torch.uint8).argmax(-1)
    return allowed.sum(-1), allowed.any(-1), first, last


@functools.lru_cache(maxsize=32)
def _positional_tile(causal: bool, implicit_causal: bool, tq: int, tk: int, q0: int, q1: int, k0: int, k1: int,
                     device: torch.device):
    """A tile's masks where they follow from positions alone (no mask tensor, no padding): the same for every
    layer's call, so computed once. ``(blocked, allowed, future, future_blocked, addend, counts)``, with
    ``addend`` the (Bq, Bk) -inf/0 scores addend of a 2-D ``blocked`` and ``counts`` :func:`_allowed_counts`.
    The tensors are shared: never modified in place."""
    call = AttentionCall(name="", module=None, causal=causal, implicit_causal=implicit_causal)
    _, blocked, allowed, future, future_blocked = _tile_masks(call, None, None, tq, tk, q0, q1, k0, k1, device)
    addend = None
    if blocked is not None and blocked.dim() == 2:
        addend = torch.zeros(blocked.shape, device=device).masked_fill_(blocked, _NEG)  # (Bq, Bk)
    return blocked, allowed, future, future_blocked, addend, _allowed_counts(allowed, k1 - k0)


def release_cached_tiles() -> None:
    """Drop the shared positional tiles (:func:`_positional_tile`), e.g. when the monitor lets go of the model:
    on an accelerator they hold device memory (at most 32 tiles of masks)."""
    _positional_tile.cache_clear()


def blocked_statistics(
    call: AttentionCall,
    padding: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    block_queries: int = BLOCK_QUERIES,
    block_keys: int = BLOCK_KEYS,
) -> torch.Tensor:
    """One float32 device row, nh x WIDTH per-head statistics then TAIL token ids, from queries and keys.

    Args:
        call: a captured call with ``query`` (B, nh, Tq, hs) and ``key`` (B, nkv, Tk, hs); its mask, scaling,
            softcap, position bias and causality as :func:`checks.recompute` reads them.
        padding: (B, Tk) bool, True at padding positions, or None.
        input_ids: (B, Tk) token ids (to name a sink token), or None.
        block_queries, block_keys: the tile; 0 = the whole length.
    """
    q_all = call.query.detach()  # (B, nh, Tq, hs)
    k_all = call.key.detach()  # (B, nkv, Tk, hs)
    b, h, tq, _ = q_all.shape
    tk = k_all.shape[2]
    n_rep = max(1, h // k_all.shape[1])
    device = q_all.device
    bq = block_queries if block_queries > 0 else max(tq, 1)
    bk = block_keys if block_keys > 0 else max(tk, 1)
    mask4 = _mask_rows(call.mask, tq, tk) if isinstance(call.mask, torch.Tensor) and call.mask.dim() == 4 else None
    pad = padding.to(device) if padding is not None and padding.shape[-1] == tk else None
    bias = call.position_bias.detach() if isinstance(call.position_bias, torch.Tensor) else None
    if bias is not None:
        bias = bias[..., -tq:, :tk] if bias.shape[-2] > tq else bias[..., :tk]
    # keys past the diagonal are blocked by SDPA's is_causal and by the truth alike: their tiles are skipped
    skip_future = mask4 is None and call.mask is None and call.implicit_causal and call.causal and tq == tk
    two_d = isinstance(call.mask, torch.Tensor) and call.mask.dim() == 2
    sink_by_score = call.causal and pad is None and not two_d
    # masks from positions alone (the same tiles in every layer): cached
    positional = call.mask_tiles is None and mask4 is None and call.mask is None and pad is None
    f32 = torch.float32
    zero = torch.zeros((), device=device)
    sums = torch.zeros(h, len(SUM_COLUMNS), device=device)
    maxes = torch.full((h, 4), _NEG, device=device)  # row_sum_error, causal_leak, padding_mass, max_logit
    maxes[:, :3] = 0.0
    ids = torch.full((TAIL,), -1.0, device=device)
    sums[:, 0] = float(b)
    for q0 in range(0, tq, bq):
        q1 = min(tq, q0 + bq)
        nq = q1 - q0
        qb = q_all[:, :, q0:q1].float()  # (B, nh, Bq, hs)
        shape = (b, h, nq)
        # Per row, carried across key tiles (the first tile sets them; there is no state before it):
        # m the running max of the masked scores, l = Σ exp(s - m), u = Σ exp(s - m) (s - m), fut / padm the
        # Σ exp(s - m) on future / padding keys, the allowed keys' count, the first and last allowed key (tk / -1
        # while none) with their masked scores, and the key at the running max (``arg``), to tell a sink's top
        # key from a one-hot row's. ``arg`` is not needed where every key before the first allowed one is
        # blocked (causal, no padding beside the mask): the top key is the first allowed one exactly when its
        # score is the row's maximum.
        m = l = u = fut = padm = n_allowed = first = last = s_first = s_last = arg = None  # noqa: E741
        k_end = min(tk, q1) if skip_future else tk
        for k0 in range(0, k_end, bk):
            k1 = min(k_end, k0 + bk)
            kt = k_all[:, :, k0:k1].float()
            if n_rep > 1:
                kt = kt[:, :, None].expand(b, kt.shape[1], n_rep, k1 - k0, kt.shape[-1]).reshape(b, h, k1 - k0, -1)
            nk = k1 - k0
            if positional:
                blocked, allowed, future, future_blocked, addend, counts = _positional_tile(
                    call.causal, call.implicit_causal, tq, tk, q0, q1, k0, k1, device)
                additive = None
            else:
                additive, blocked, allowed, future, future_blocked = _tile_masks(
                    call, mask4, pad, tq, tk, q0, q1, k0, k1, device)
                addend, counts = None, _allowed_counts(allowed, nk)
            if blocked is not None and blocked.dim() == 2 and additive is None and not call.softcap and bias is None:
                # one (Bq, Bk) mask for every sequence and head (SDPA's is_causal): scaled and masked by the
                # product itself, -inf added at blocked keys (a broadcast masked_fill_ costs more than the bmm)
                if addend is None:
                    addend = torch.zeros(blocked.shape, device=device).masked_fill_(blocked, _NEG)  # (Bq, Bk)
                s = torch.baddbmm(addend, qb.reshape(b * h, nq, -1), kt.reshape(b * h, nk, -1).transpose(1, 2),
                                  alpha=call.scaling).view(b, h, nq, nk)  # (B, nh, Bq, Bk)
            else:
                s = torch.matmul(qb, kt.transpose(-1, -2)).mul_(call.scaling)  # (B, nh, Bq, Bk)
                if call.softcap:
                    s = s.div_(call.softcap).tanh_().mul_(call.softcap)
                if bias is not None:
                    s = s.add_(_rows(bias, q0, q1)[..., k0:k1].float())
                if additive is not None:
                    s = s.add_(additive)
                if blocked is not None:
                    s = s.masked_fill_(blocked, _NEG)
            # --- the tile's sums. Its own softmax kernel gives p = exp(s - t_max) / L (fast at blocked keys: a
            # plain exp of -inf or of an underflow takes several times longer on CPU); every tile sum then is L
            # times a sum over p.
            t_max = s.amax(-1)  # (B, nh, Bq); NaN propagates: such rows end NaN, counted as non-finite
            p = torch.softmax(s, -1)  # (B, nh, Bq, Bk); 0 at blocked keys, NaN where a row has no key here
            none = t_max == _NEG  # rows with every key of this tile blocked: they add nothing
            # what the truth allows: counts, first and last allowed key and their scores (read from s before
            # s becomes s - t_max below)
            t_allowed, any_allowed, t_first, t_last = (c.expand(shape) for c in counts)  # (B, nh, Bq) each
            t_s_first = s.gather(-1, t_first[..., None]).squeeze(-1)
            t_s_last = s.gather(-1, t_last[..., None]).squeeze(-1)
            t_arg = None if sink_by_score else s.argmax(-1)  # (B, nh, Bq)
            d = s.sub_(torch.where(none, zero, t_max)[..., None])  # s - t_max in place, -inf at blocked keys
            d = d.nan_to_num_(nan=_NAN, posinf=_INF, neginf=0.0)  # p is 0 there: the product must be too
            tile_l = torch.where(none, zero, 1.0 / p.amax(-1))  # L = Σ exp(s - t_max): the top p is 1 / L
            tile_u = torch.where(none, zero, d.mul_(p).sum(-1))  # Σ p (s - t_max), the products in place
            with_fut = call.causal and not future_blocked  # (else: no leak to measure, or exactly 0)
            tile_fut = torch.where(none, zero, torch.linalg.vecdot(p, future.to(p.dtype))) if with_fut else None
            tile_pad = None
            if pad is not None:
                pad_keys = pad[:, None, None, k0:k1].to(p.dtype)  # (B, 1, 1, Bk)
                tile_pad = torch.where(none, zero, (p * pad_keys).sum(-1))
            if m is None:  # the first tile: its sums are the row's, relative to its own maximum
                m, l, u = t_max, tile_l, tile_l * tile_u  # noqa: E741
                fut = tile_l * tile_fut if with_fut else torch.zeros(shape, device=device)
                padm = tile_l * tile_pad if pad is not None else None
                if t_arg is not None:
                    arg = torch.where(t_max > _NEG, t_arg + k0, 0)  # a row with nothing seen keeps key 0
                n_allowed = t_allowed.to(torch.float32)
                first = torch.where(any_allowed, t_first + k0, tk)
                s_first = torch.where(any_allowed, t_s_first, _NEG)
            else:  # the online softmax: move every sum to the new maximum
                new_m = torch.maximum(m, t_max)
                safe = torch.where(new_m == _NEG, zero, new_m)  # rows with nothing seen yet keep 0
                alpha = torch.exp(m - safe)  # 0 when m was -inf
                beta = torch.where(none, zero, tile_l * torch.exp(t_max - safe))  # the tile's Σ exp(s - m_new)
                shift = torch.where(l > 0, m - safe, zero)  # (m_old - m_new); 0 when nothing was summed
                # Σ e (s - m_new) = β (Σ p (s - t_max) + (t_max - m_new)), with e = exp(s - m_new) = β p
                u = alpha * (u + shift * l) + beta * (tile_u + torch.where(none, zero, t_max - safe))
                l = alpha * l + beta  # noqa: E741
                if with_fut:
                    fut = alpha * fut + beta * tile_fut
                if pad is not None:
                    padm = alpha * padm + beta * tile_pad
                if t_arg is not None:
                    moved = t_max > m  # strictly: ties keep the earlier key, as argmax over the whole row does
                    arg = torch.where(moved, t_arg + k0, arg)
                m = new_m
                n_allowed = n_allowed + t_allowed
                take_first = any_allowed & (first == tk)
                first = torch.where(take_first, t_first + k0, first)
                s_first = torch.where(take_first, t_s_first, s_first)
            last = torch.where(any_allowed, t_last + k0, -1 if last is None else last)
            s_last = torch.where(any_allowed, t_s_last, _NEG if s_last is None else s_last)
            if q1 == tq and k1 == k_end and input_ids is not None and input_ids.shape[-1] == tk:
                # the last query of the first sequence sees the most keys: its first and last allowed key
                # none allowed: first is tk, last -1; taken modulo tk that is key 0 and key tk - 1
                ends = torch.stack([first[0, 0, -1], last[0, 0, -1]]).remainder_(tk)  # (2,)
                ids = input_ids[0].to(device)[ends].to(f32)
        # --- rows of this block, finished
        inv = 1.0 / l
        row_sum = l * inv  # 1 within rounding; NaN for non-finite scores or rows the mask blocks entirely
        valid = n_allowed > 0
        if pad is not None and tq == tk:
            valid = valid & ~pad[:, None, q0:q1]  # a padding query's row is noise nobody reads
        nan_row = torch.isnan(row_sum)
        good = valid & ~nan_row
        two = good & (n_allowed >= 2)
        ent = torch.log(l) - u * inv  # (B, nh, Bq)
        ent_norm = ent / torch.log(n_allowed.clamp_min(2))
        safe_m = torch.where(m == _NEG, zero, m)
        p_first = torch.exp(s_first - safe_m) * inv
        p_last = torch.exp(s_last - safe_m) * inv
        first_idx = torch.where(first == tk, 0, first)
        last_idx = torch.where(last < 0, tk - 1, last)
        sink_rows = good & (n_allowed >= SINK_MIN_KEYS)
        if arg is None:
            on_sink = s_first == m
        else:
            on_sink = (arg == first_idx) | ((arg == last_idx) if not call.causal else torch.zeros_like(good))
        sharp = two & (inv >= ONE_HOT)  # the largest probability is exp(m - m) / l
        one_hot = sharp & ~on_sink
        # every sum and maximum of the block in one masked reduction each (the row columns, in order)
        one, nothing = torch.ones_like(ent), torch.zeros_like(ent)  # (B, nh, Bq)
        masks = torch.stack([good, good, two, two, sink_rows, sink_rows, sink_rows, one_hot, sharp & on_sink,
                             valid & nan_row])  # (10, B, nh, Bq)
        values = torch.stack([one, ent, ent_norm, one, one, p_first, nothing if call.causal else p_last, one, one,
                              one])  # (10, B, nh, Bq)
        counted = torch.where(masks, values, zero).sum((1, 3))  # (10, nh)
        sums += torch.cat([torch.zeros(1, h, device=device), counted]).T  # (nh, len(SUM_COLUMNS)); sequences: above
        extremes = torch.stack([
            (row_sum - 1).abs(),
            (fut * inv).abs() if call.causal else nothing,
            (padm * inv).abs() if pad is not None else nothing,
            m,
        ])  # (4, B, nh, Bq)
        fill = torch.zeros(4, 1, 1, 1, device=device)
        fill[3] = _NEG  # an invalid row's largest logit is no logit at all
        block_max = torch.where(good, extremes, fill).amax(dim=(1, 3)).T  # (nh, 4)
        maxes = torch.maximum(maxes, block_max)
    # no valid row: the largest logit is unknown, not -inf
    maxes[:, 3].masked_fill_(maxes[:, 3] == _NEG, _NAN)
    row = torch.cat([sums, maxes], dim=1)  # (nh, WIDTH)
    return torch.cat([row.reshape(-1), ids])


def max_logits(call: AttentionCall, padding: torch.Tensor | None = None, block_queries: int = BLOCK_QUERIES,
               block_keys: int = BLOCK_KEYS) -> torch.Tensor:
    """(nh,) float32 on the device: the largest masked score per head (NaN without a valid row).

    For calls whose probabilities come from elsewhere (returned weights) but whose queries and keys are known.
    """
    row = blocked_statistics(call, padding, None, block_queries, block_keys)
    h = call.query.shape[1]
    return row[: h * WIDTH].reshape(h, WIDTH)[:, COLUMNS.index("max_logit")]
