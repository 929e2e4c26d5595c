"""MDLM's own DiT, parameter for parameter (`backbone=hf_dit`, MDLM's name for its release).

Our `models.dit.DiT` is MDLM-like but not MDLM's layout: its LayerNorms carry no weight
under adaLN, its embedding is an `nn.Embedding`, its names differ. Published MDLM, SEDD,
AR and BD3-LM weights need the exact layout, so this class reproduces it with MDLM's own
parameter names (a checkpoint's `backbone.*` keys load with no renaming):

    vocab_embed.embedding                  (V, C) bare parameter
    sigma_map.mlp.{0,2}.{weight,bias}      sinusoidal(sigma, 256) -> MLP -> cond_dim
    blocks.N.norm1.weight                  LayerNorm without bias (float32 statistics)
    blocks.N.attn_qkv.weight               (3C, C) packed q, k, v (no bias)
    blocks.N.attn_out.weight               (C, C) no bias
    blocks.N.norm2.weight
    blocks.N.mlp.{0,2}.{weight,bias}       GELU(tanh), ratio 4
    blocks.N.adaLN_modulation.{weight,bias}   (6C, cond_dim): shift/scale/gate x (attn, mlp)
    output_layer.norm_final.weight
    output_layer.linear.{weight,bias}      (V, C)
    output_layer.adaLN_modulation.{weight,bias}  (2C, cond_dim)

Rotary positions rotate q and k by halves (GPT-NeoX style, base 10 000); the rotation, adaLN
modulation, gated residuals and attention are the DiT's helpers (`models.dit`), the same
values. MDLM feeds sigma = 0 when the model is not time-conditioned, so the adaLN terms are
learned constants.
`causal=True` is MDLM's AR baseline `DDIT`: causal attention, no sigma map and no adaLN,
and the [MASK] logit pinned to -1000 (`mask_index`) as MDLM's AR does before its softmax.
BD3-LM's DiT is this one trained on x_t + x_0 under its block-causal mask: `forward` takes
the pattern (`attn_mask`) and the rotary `positions`. Every variant has `models.dit`'s span
KV cache (`init_cache` / `forward_span` / `forward_cached`): AR decoding, block sampling.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.dit import (
    KVCache,
    Rotary,
    Span,
    TimestepEmbedder,
    block_attention,
    check_span,
    empty_cache,
    gated_residual,
    modulate,
    rotate_qkv,
)

AR_MASK_LOGIT = -1000.0  # MDLM's AR sets the [MASK] logit to this before log_softmax


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, statistics in float32 (MDLM's)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), [self.dim]).to(x.dtype) * self.weight


class EmbeddingLayer(nn.Module):
    """A bare (V, C) parameter indexed by token id."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding[x]  # (B, L, C)


class DDiTBlock(nn.Module):
    """adaLN-zero block (or, `adaln=False`, the AR's plain pre-LN block)."""

    def __init__(self, dim: int, n_heads: int, cond_dim: int, adaln: bool, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim)
        )
        self.dropout = nn.Dropout(dropout)
        if adaln:
            self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)
            nn.init.zeros_(self.adaLN_modulation.weight)
            nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(
        self,
        x: Tensor,
        rotary: tuple[Tensor, Tensor],
        c: Tensor | None,
        key_padding: Tensor | None,
        causal: bool,
        kv: tuple[Tensor, Tensor, Span] | None = None,
        attn_mask=None,
    ) -> Tensor:
        """x (B, L, C) -> (B, L, C); `kv = (keys, values, span)`: x holds the positions of a
        span of the KV cache, `attn_mask`: a custom pattern (`models.dit.block_attention`)."""
        B, L, C = x.shape
        gate1 = gate2 = None
        if c is not None:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, -1)
        h = self.norm1(x)
        if c is not None:
            h = modulate(h, shift1, scale1)
        qkv = self.attn_qkv(h).view(B, L, 3, self.n_heads, C // self.n_heads)
        q, k, v = rotate_qkv(qkv, *rotary)  # (B, H, L, D)
        a = block_attention(q, k, v, key_padding, causal, kv, attn_mask)
        a = self.dropout(self.attn_out(a.transpose(1, 2).reshape(B, L, C)))
        x = gated_residual(x, gate1, a)
        h = self.norm2(x)
        if c is not None:
            h = modulate(h, shift2, scale2)
        return gated_residual(x, gate2, self.dropout(self.mlp(h)))


class DDitFinalLayer(nn.Module):
    """norm_final (adaLN-modulated unless AR) and the linear head to the vocabulary."""

    def __init__(self, dim: int, vocab_size: int, cond_dim: int, adaln: bool) -> None:
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, vocab_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        if adaln:
            self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)
            nn.init.zeros_(self.adaLN_modulation.weight)
            nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x: Tensor, c: Tensor | None) -> Tensor:
        h = self.norm_final(x)
        if c is not None:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
            h = modulate(h, shift, scale)
        return self.linear(h)  # (B, L, V)


class MDLMDiT(nn.Module):
    """MDLM's DIT (and, `causal=True`, its AR `DDIT`) with MDLM's parameter names."""

    accepts_sigma: ClassVar[bool] = True  # the diffusion variant embeds sigma (0 if time-agnostic)
    supports_span_cache: ClassVar[bool] = True  # init_cache / forward_span (models.dit's cache)
    tokenizer_key: ClassVar[str | None] = None  # sized by the data's tokenizer (GPT-2 + [MASK])
    causal: bool = False  # the instance's setting (backbone.causal: MDLM's AR baseline)

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int = 768,
        n_blocks: int = 12,
        n_heads: int = 12,
        cond_dim: int = 128,
        max_length: int = 1024,
        time_conditioning: bool = False,
        causal: bool = False,
        dropout: float = 0.0,
        mask_index: int | None = None,
    ) -> None:
        super().__init__()
        if hidden_size % n_heads != 0:
            raise ValueError(
                f"model.hidden_size={hidden_size} must be divisible by model.n_heads={n_heads}"
            )
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.causal = causal
        self.time_conditioning = bool(time_conditioning) and not causal
        self.mask_index = mask_index
        self.hidden_size = hidden_size
        self.head_dim = hidden_size // n_heads
        adaln = not causal
        self.vocab_embed = EmbeddingLayer(hidden_size, vocab_size)
        if adaln:
            self.sigma_map = TimestepEmbedder(cond_dim)
        self.blocks = nn.ModuleList(
            DDiTBlock(hidden_size, n_heads, cond_dim, adaln, dropout) for _ in range(n_blocks)
        )
        self.output_layer = DDitFinalLayer(hidden_size, vocab_size, cond_dim, adaln)
        self.rotary = Rotary(self.head_dim)  # a non-persistent table: no key in the state dict

    @property
    def time_conditioned(self) -> bool:
        return self.time_conditioning

    def embedding_parameters(self) -> tuple[nn.Parameter, ...]:
        """The token embedding (a bare parameter): left out of the non-embedding count."""
        return (self.vocab_embed.embedding,)

    def _condition(self, sigma: Tensor | None, B: int, device: torch.device) -> Tensor | None:
        """SiLU(sigma_map(sigma)) (B, cond_dim); sigma = 0 when not time-conditioned (MDLM)."""
        if self.causal:
            return None
        if not self.time_conditioning:
            sigma = torch.zeros(B, device=device)
        elif sigma is None:
            raise ValueError(
                "this MDLM DiT is time-conditioned (time_conditioning=true) and needs sigma"
            )
        return F.silu(self.sigma_map(sigma.reshape(B)))

    def _head(self, x: Tensor, c: Tensor | None) -> Tensor:
        logits = self.output_layer(x, c)
        if self.causal and self.mask_index is not None:
            logits[..., self.mask_index] = AR_MASK_LOGIT
        return logits

    def forward(
        self,
        x_t: Tensor,
        sigma: Tensor | None = None,
        attention_mask: Tensor | None = None,
        attn_mask=None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """(B, L) token ids -> (B, L, V) logits. `attn_mask` (a custom attention pattern, used
        instead of `causal`) and `positions` (L,) rotary positions serve BD3-LM, whose DiT is
        this one trained on x_t + x_0 with both halves at positions 0 .. L - 1."""
        B, L = x_t.shape
        span = L if positions is None else int(positions.max()) + 1
        if span > self.max_length:
            raise ValueError(
                f"sequence length {span} exceeds the model's max_length={self.max_length} "
                "(set model.length <= the checkpoint's length)"
            )
        x = self.vocab_embed(x_t)
        c = self._condition(sigma, B, x.device)
        key_padding = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_padding = attention_mask.bool()
        rotary = self.rotary(L, x.device, positions)
        for block in self.blocks:
            x = block(x, rotary, c, key_padding, self.causal, attn_mask=attn_mask)
        return self._head(x, c)

    # ---- the span KV cache (models.dit's: AR decoding, block sampling, Fast-dLLM caches) ----
    def init_cache(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """Empty keys/values for `batch_size` sequences of up to `max_length` positions."""
        heads = self.blocks[0].n_heads
        return empty_cache(
            len(self.blocks), batch_size, heads, self.head_dim, self.max_length,
            self.vocab_embed.embedding, device, dtype,
        )  # fmt: skip

    def forward_span(
        self,
        x_span: Tensor,
        start: int,
        cache: KVCache,
        sigma: Tensor | None = None,
        *,
        context: str = "prefix",
        write: bool = True,
    ) -> Tensor:
        """Logits (B, n, V) of x_span (B, n) at positions start .. start + n - 1 against the
        cached keys/values (`models.dit.DiT.forward_span` says what each context sees)."""
        B, n = x_span.shape
        end = start + n
        check_span(n, start, cache, B, context)
        x = self.vocab_embed(x_span)
        c = self._condition(sigma, B, x.device)
        cos, sin = self.rotary(end, x.device)
        rotary = (cos[start:], sin[start:])
        span = Span(start=start, cached=cache.length, context=context, write=write)
        for block, keys, values in zip(self.blocks, cache.keys, cache.values):
            x = block(x, rotary, c, None, self.causal, kv=(keys, values, span))
        if write:
            cache.length = max(cache.length, end)
        return self._head(x, c)

    def forward_cached(self, x_new: Tensor, cache: KVCache, sigma: Tensor | None = None) -> Tensor:
        """AR decoding: logits (B, n, V) of n new tokens continuing the cached ones (equal to
        `forward(x)[:, -n:]` for the causal variant); the cache grows."""
        return self.forward_span(x_new, cache.length, cache, sigma, context="prefix", write=True)
