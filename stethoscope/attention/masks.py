"""Masks that are not tensors, evaluated one (query block × key tile) at a time.

Why: flex attention takes its mask as a ``BlockMask`` (block sparsity plus a ``mask_mod`` function) and the
FlashAttention kernels take none at all — a 2-D padding mask, packed-sequence boundaries (``cu_seqlens`` or
``position_ids``), ``is_causal`` and a sliding window. Expanding either into a (Tq, Tk) tensor would bring
back the T×T memory the blocked statistics avoid, so each is kept as a :class:`TileMask`: ``tile(q0, q1, k0,
k1)`` returns the boolean mask (True = the kernel lets the query see the key) of one tile only, on the
device, without a host read. ``select(index)`` restricts it to some batch items (the checked sequences).
"""

from __future__ import annotations

import torch


class TileMask:
    """The interface: a kernel's mask, one tile at a time."""

    def tile(self, q0: int, q1: int, k0: int, k1: int, device: torch.device) -> torch.Tensor:
        """Bool (B|1, nh|1, q1 - q0, k1 - k0): True where query i may see key j."""
        raise NotImplementedError

    def select(self, index: torch.Tensor) -> TileMask:
        """The same mask for the batch items in ``index`` only."""
        raise NotImplementedError


def _dense_blocks(num: torch.Tensor, indices: torch.Tensor, n_kv_blocks: int) -> torch.Tensor:
    """(B, H, nQb) counts + (B, H, nQb, K) kv block indices -> (B, H, nQb, nKVb) bool: which blocks are listed."""
    listed = torch.arange(indices.shape[-1], device=indices.device) < num[..., None]  # (B, H, nQb, K)
    target = torch.where(listed, indices.long(), n_kv_blocks)  # unlisted slots go to a spare column
    dense = torch.zeros(*indices.shape[:-1], n_kv_blocks + 1, dtype=torch.bool, device=indices.device)
    return dense.scatter_(-1, target, True)[..., :n_kv_blocks]


class BlockMaskTiles(TileMask):
    """A flex ``BlockMask`` as the kernel applies it: a key is seen when its block is listed as full, or listed
    as partial and ``mask_mod(b, h, q_idx, kv_idx)`` is True.

    ``mask_mod`` is called on broadcast index tensors of one tile (how transformers' own mask functions are
    written); one that cannot broadcast is vmapped over the tile instead, as ``create_mask`` does. The batch
    index it sees is the original one, also after :meth:`select`.
    """

    def __init__(self, block_mask, batch: torch.Tensor):
        self.block_mask = block_mask
        self.batch = batch  # (B,) original batch index of each row of the call
        self._dense: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def select(self, index: torch.Tensor) -> BlockMaskTiles:
        out = BlockMaskTiles(self.block_mask, self.batch.index_select(0, index.to(self.batch.device)))
        out._dense = self._dense
        return out

    def _blocks(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(partial, full) listed blocks, each (Bm, Hm, nQb, nKVb) bool: (T / block size)² per item, not T²."""
        if self._dense is None:
            bm = self.block_mask
            n_kv = -(-bm.seq_lengths[1] // bm.BLOCK_SIZE[1])
            partial = _dense_blocks(bm.kv_num_blocks, bm.kv_indices, n_kv)
            full = None
            if bm.full_kv_num_blocks is not None:
                full = _dense_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, n_kv)
            self._dense = (partial, full)
        return self._dense

    def _mask_mod(self, b, h, q, k) -> torch.Tensor:
        fn = self.block_mask.mask_mod
        try:
            out = fn(b[:, None, None, None], h[None, :, None, None], q[None, None, :, None], k[None, None, None, :])
            return out.expand(b.numel(), h.numel(), q.numel(), k.numel())
        except Exception:  # written for scalars only: vmap it over the tile, innermost dimension first
            for dims in ((None, None, None, 0), (None, None, 0, None), (None, 0, None, None), (0, None, None, None)):
                fn = torch.vmap(fn, in_dims=dims, out_dims=0)
            return fn(b, h, q, k)

    def tile(self, q0: int, q1: int, k0: int, k1: int, device: torch.device) -> torch.Tensor:
        bm = self.block_mask
        partial, full = self._blocks()
        dev = partial.device
        qbs, kbs = bm.BLOCK_SIZE
        qi = torch.arange(q0, q1, device=dev)  # (Bq,) query positions
        kj = torch.arange(k0, k1, device=dev)  # (Bk,) key positions
        b = self.batch.to(dev)
        sb = b if partial.shape[0] > 1 else torch.zeros_like(b)  # a BlockMask with B = 1 serves every item
        heads = torch.arange(partial.shape[1], device=dev)

        def at(blocks: torch.Tensor) -> torch.Tensor:  # (B, Hm, Bq, Bk) block membership of each element
            return blocks[sb][:, :, qi // qbs][:, :, :, kj // kbs]

        allowed = at(partial) & self._mask_mod(b, heads, qi, kj).to(dev, torch.bool)
        if full is not None:
            allowed = allowed | at(full)
        return allowed.to(device)


class VarlenTiles(TileMask):
    """What a FlashAttention kernel attends to, from the arguments transformers gives it.

    The kernel works on unpadded, concatenated sequences: each key has a rank inside its sequence, each query a
    "diagonal" — the rank of the last key it may see causally, bottom-right aligned as FlashAttention ≥ 2.1
    does (the last query of a sequence sees its last key). Query i sees key j when both are in the same
    sequence, the key is not padding, and (causal) ``rank[j] <= diag[i]``; a sliding window ``w`` further
    keeps ``rank[j] >= diag[i] - (w - 1)`` (and ``<= diag[i] + w - 1`` when not causal) — in ranks, i.e.
    counting real tokens, exactly as the kernel counts them.

    Args:
        keep: (B, Tk) bool, False at keys the kernel never sees (padding, or past the last sequence).
        k_seg, k_rank: (B, Tk) the key's sequence id and rank in it.
        q_seg, q_diag: (B, Tq) the query's sequence id and diagonal.
    """

    def __init__(self, keep, k_seg, k_rank, q_seg, q_diag, causal: bool, window: int | None):
        self.keep, self.k_seg, self.k_rank, self.q_seg, self.q_diag = keep, k_seg, k_rank, q_seg, q_diag
        self.causal = causal
        self.window = window

    @classmethod
    def build(cls, tq: int, tk: int, device: torch.device, causal: bool, window: int | None = None,
              attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
              cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
              batch: int = 1) -> VarlenTiles:
        """The mask for transformers' ``_flash_attention_forward`` paths, in its order of precedence: a 2-D
        padding mask (unpad, varlen); ``cu_seq_lens_q/k`` (padding-free); ``position_ids`` restarting inside a
        batch of one (packed sequences); else one plain sequence per batch item."""
        j = torch.arange(tk, device=device)[None, :]  # (1, Tk)
        i = torch.arange(tq, device=device)[None, :]  # (1, Tq)
        if isinstance(attention_mask, torch.Tensor):
            keep = attention_mask[:, -tk:].to(device).bool()  # (B, Tk)
            keep_q = keep[:, -tq:] if tq > 1 else torch.ones_like(keep[:, -1:])  # a single query is never unpadded
            k_rank = keep.long().cumsum(-1) - 1
            q_diag = keep_q.long().cumsum(-1) - 1 + (keep.sum(-1, keepdim=True) - keep_q.sum(-1, keepdim=True))
            zeros_k, zeros_q = torch.zeros_like(k_rank), torch.zeros_like(q_diag)
            return cls(keep, zeros_k, k_rank, zeros_q, q_diag, causal, window)
        if cu_seqlens_q is None and isinstance(position_ids, torch.Tensor) and batch == 1 and tq == tk and tq > 1:
            pos = position_ids.reshape(1, -1)[:, -tq:].to(device)  # (1, T)
            start = pos == pos.min()  # every packed sequence restarts from the same first position
            seg = start.long().cumsum(-1) - 1
            first = torch.where(start, i, 0).cummax(-1).values  # index of the sequence's first token
            rank = i - first
            return cls(seg >= 0, seg, rank, seg, rank, causal, window)
        if cu_seqlens_q is not None and cu_seqlens_k is not None:
            cq = cu_seqlens_q.to(device).long()  # (n + 1,)
            ck = cu_seqlens_k.to(device).long()
            n = ck.numel() - 1
            k_seg = torch.searchsorted(ck[1:], j, right=True)  # (1, Tk); n past the last sequence
            q_seg = torch.searchsorted(cq[1:], i, right=True)
            ks, qs = k_seg.clamp_max(n - 1), q_seg.clamp_max(n - 1)
            k_rank = j - ck[ks]
            len_k = ck[qs + 1] - ck[qs]
            len_q = cq[qs + 1] - cq[qs]
            q_diag = (i - cq[qs]) + (len_k - len_q)
            return cls(k_seg < n, k_seg, k_rank, q_seg, q_diag, causal, window)
        keep = torch.ones(1, tk, dtype=torch.bool, device=device)
        return cls(keep, torch.zeros_like(j), j, torch.zeros_like(i), i + (tk - tq), causal, window)

    def select(self, index: torch.Tensor) -> VarlenTiles:
        def take(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, index.to(t.device)) if t.shape[0] > 1 else t

        return VarlenTiles(take(self.keep), take(self.k_seg), take(self.k_rank), take(self.q_seg),
                           take(self.q_diag), self.causal, self.window)

    def tile(self, q0: int, q1: int, k0: int, k1: int, device: torch.device) -> torch.Tensor:
        rank = self.k_rank[:, None, k0:k1].to(device)  # (B, 1, Bk)
        diag = self.q_diag[:, q0:q1, None].to(device)  # (B, Bq, 1)
        allowed = self.keep[:, None, k0:k1].to(device) & (self.q_seg[:, q0:q1, None].to(device)
                                                         == self.k_seg[:, None, k0:k1].to(device))
        if self.causal:
            allowed = allowed & (rank <= diag)
        if self.window is not None:
            allowed = allowed & (rank >= diag - (self.window - 1))
            if not self.causal:
                allowed = allowed & (rank <= diag + (self.window - 1))
        return allowed[:, None]  # (B, 1, Bq, Bk)
