"""TinyGPT: the demo's decoder-only transformer, written to be read (after Karpathy's nanoGPT).

A byte-level GPT: the vocabulary is the 256 byte values, so the demo needs no tokenizer and no download.
Pre-LayerNorm blocks, learned positional embeddings, the token embedding tied to the output head.

Module names follow nanoGPT on purpose, because findings name them and a reader should recognise them::

    transformer.wte                    token embedding (its weight is also lm_head's)
    transformer.wpe                    position embedding
    transformer.h.{i}.ln_1             LayerNorm before attention
    transformer.h.{i}.attn             CausalSelfAttention (the softmax happens inside its forward)
    transformer.h.{i}.attn.c_attn      q, k, v projection, one Linear
    transformer.h.{i}.attn.c_proj      attention output projection
    transformer.h.{i}.ln_2             LayerNorm before the MLP
    transformer.h.{i}.mlp              MLP
    transformer.h.{i}.mlp.c_fc         up-projection C -> 4C
    transformer.h.{i}.mlp.act          GELU (default) or ReLU, a module so hooks see its output
    transformer.h.{i}.mlp.c_proj       down-projection 4C -> C
    transformer.ln_f                   final LayerNorm
    lm_head                            logits over the 256 bytes

Shapes in comments: B batch, T time (sequence length), C channels (n_embd), nh heads, hs head size (C // nh),
V vocabulary.

Two knobs exist only so :mod:`stethoscope.demo.pathologies` can break the model in a realistic way; both
are plain attributes (not parameters) and are inert at their defaults:

* ``CausalSelfAttention.temperature`` (1.0): the softmax temperature. Scores are divided by it, so 0.0 is a
  real division by zero (``±inf`` scores, ``inf - inf`` inside the softmax, NaN probabilities).
* ``MLP.out_scale`` (1.0): a fixed scale on the MLP's residual branch. Scaling a branch down
  (as deep-network recipes do with ``1/sqrt(2 * n_layer)``) scales its gradients down by the same factor;
  taken too far, they vanish.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

ACTIVATIONS = ("gelu", "relu")


@dataclass
class GPTConfig:
    """Sizes of a TinyGPT. The defaults are the demo's: ~0.8 M parameters, a few ms per step on a CPU."""

    vocab_size: int = 256  # bytes: no tokenizer needed
    block_size: int = 64  # longest context the position embedding covers
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2
    activation: str = "gelu"  # "gelu" or "relu" (the dead-relu pathology needs a ReLU to die)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with the softmax written out, so its probabilities can be read.

    PyTorch's fused ``scaled_dot_product_attention`` never materialises the probabilities; the demo exists
    to be looked inside, so it pays for the explicit (B, nh, T, T) matrix. Ask for the probabilities with
    ``forward(x, return_attn=True)``, or set ``keep_attn = True`` and read ``last_attn`` after a forward.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        # q, k, v for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # lower-triangular mask: position t may attend to positions <= t only
        mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer("mask", mask.view(1, 1, config.block_size, config.block_size), persistent=False)
        self.temperature = 1.0  # softmax temperature; see the module docstring
        self.keep_attn = False  # when True, forward stores the probabilities on self.last_attn
        self.last_attn: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        B, T, C = x.size()  # batch, time, channels
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)

        # scores scaled by 1/sqrt(hs) so their variance does not grow with the head size
        att = (q @ k.transpose(-2, -1)) / (math.sqrt(hs) * self.temperature)  # (B, nh, T, T)
        att = att.masked_fill(~self.mask[:, :, :T, :T], float("-inf"))  # no peeking at the future
        att = F.softmax(att, dim=-1)  # (B, nh, T, T), each row sums to 1
        if self.keep_attn:
            self.last_attn = att.detach()
        y = att @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again: (B, T, C)
        y = self.c_proj(y)  # (B, T, C)
        return (y, att) if return_attn else y


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> activation -> C."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # a module rather than F.gelu, so a forward hook sees the post-activation features (dead ReLUs)
        self.act = nn.GELU() if config.activation == "gelu" else nn.ReLU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.out_scale = 1.0  # fixed residual-branch scale; see the module docstring

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(x)  # (B, T, 4C)
        x = self.act(x)  # (B, T, 4C)
        x = self.c_proj(x)  # (B, T, C)
        if self.out_scale != 1.0:
            x = x * self.out_scale
        return x


class Block(nn.Module):
    """One pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class TinyGPT(nn.Module):
    """A small GPT over bytes. ``forward(idx, targets)`` returns ``(logits, loss)``.

    Example:
        >>> model = TinyGPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16))
        >>> idx = torch.randint(0, 256, (3, 16))
        >>> logits, loss = model(idx, targets=idx)
        >>> logits.shape
        torch.Size([3, 16, 256])
    """

    def __init__(self, config: GPTConfig | None = None):
        super().__init__()
        config = config or GPTConfig()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (as in GPT-2): one matrix embeds bytes and scores them. named_parameters() lists it
        # once, as transformer.wte.weight. It also means the embedding's gradient is dense: every row gets
        # a gradient through the output softmax, even for bytes absent from the batch.
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream, so its variance
        # does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Parameters counted once (the tied embedding is not counted twice)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        T = idx.size(1)  # idx is (B, T)
        if self.config.block_size < T:
            raise ValueError(
                f"TinyGPT got a sequence of length {T}, longer than block_size={self.config.block_size}"
            )
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C), broadcast over the batch
        x = tok_emb + pos_emb  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            # next-byte prediction: cross-entropy over (B*T) positions
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """The attention probabilities of every layer for ``idx``: a list of (B, nh, T, T) tensors."""
        attns = [block.attn for block in self.transformer.h]
        previous = [a.keep_attn for a in attns]
        try:
            for a in attns:
                a.keep_attn = True
            self(idx)
            return [a.last_attn for a in attns]
        finally:
            for a, keep in zip(attns, previous, strict=True):
                a.keep_attn = keep
                a.last_attn = None if not keep else a.last_attn

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue ``idx`` (B, T) by sampling ``max_new_tokens`` bytes, cropping the context to block_size."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]  # (B, <=block_size)
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature  # (B, V): the last position predicts the next byte
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)  # (B, V)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T+1)
        return idx
