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
modulation and gated residuals are the DiT's fused helpers (`models.dit`), the same values. MDLM feeds sigma = 0
when the model is not time-conditioned, so the adaLN terms are learned constants.
`causal=True` is MDLM's AR baseline `DDIT`: causal attention, no sigma map and no adaLN,
and the [MASK] logit pinned to -1000 (`mask_index`) as MDLM's AR does before its softmax;
it decodes with a KV cache (`init_cache` / `forward_cached`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.dit import gated_residual, modulate, rotate_qkv

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


class TimestepEmbedder(nn.Module):
    """sigma (B,) -> cos/sin features of 256 frequencies -> Linear, SiLU, Linear."""

    def __init__(self, cond_dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )

    def forward(self, sigma: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(10_000) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half
        )
        args = sigma.float()[:, None] * freqs[None]  # (B, half)
        feats = torch.cat([args.cos(), args.sin()], dim=-1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))  # (B, cond_dim)


def rotary_tables(length: int, head_dim: int, device: torch.device, start: int = 0):
    """cos, sin (n, D/2) in float32 for positions start .. length - 1 (both halves of a head
    share them: `rotate_qkv`)."""
    inv_freq = 1.0 / (
        10_000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    )
    pos = torch.arange(start, length, dtype=torch.float32, device=device)
    freqs = torch.outer(pos, inv_freq)  # (n, D/2)
    return freqs.cos(), freqs.sin()


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
        kv: tuple[Tensor, Tensor, int] | None = None,
    ) -> Tensor:
        """x (B, L, C) -> (B, L, C); `kv = (keys, values, start)` decodes causally with a cache."""
        B, L, C = x.shape
        gate1 = gate2 = None
        if c is not None:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, -1)
        h = self.norm1(x)
        if c is not None:
            h = modulate(h, shift1, scale1)
        qkv = self.attn_qkv(h).view(B, L, 3, self.n_heads, C // self.n_heads)
        q, k, v = rotate_qkv(qkv, *rotary)  # (B, H, L, D)
        if kv is not None:
            keys, values, start = kv
            keys[:, :, start : start + L] = k
            values[:, :, start : start + L] = v
            k, v = keys[:, :, : start + L], values[:, :, : start + L]
            total = start + L
            pos = start + torch.arange(L, device=x.device)[:, None]
            mask = torch.arange(total, device=x.device)[None, :] <= pos  # (L, total)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif key_padding is not None:
            mask = key_padding[:, None, None, :]  # (B, 1, 1, L)
            if causal:
                mask = mask & torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
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


@dataclass
class MDLMKVCache:
    """Per-block (B, H, max_length, D) key/value buffers of the causal variant."""

    keys: list[Tensor]
    values: list[Tensor]
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


class MDLMDiT(nn.Module):
    """MDLM's DIT (and, `causal=True`, its AR `DDIT`) with MDLM's parameter names."""

    accepts_sigma: ClassVar[bool] = True  # the diffusion variant embeds sigma (0 if time-agnostic)
    supports_span_cache: ClassVar[bool] = False
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
        self, x_t: Tensor, sigma: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """(B, L) token ids -> (B, L, V) logits."""
        B, L = x_t.shape
        if L > self.max_length:
            raise ValueError(
                f"sequence length {L} exceeds the model's max_length={self.max_length} "
                "(set model.length <= the checkpoint's length)"
            )
        x = self.vocab_embed(x_t)
        c = self._condition(sigma, B, x.device)
        key_padding = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_padding = attention_mask.bool()
        rotary = rotary_tables(L, self.head_dim, x.device)
        for block in self.blocks:
            x = block(x, rotary, c, key_padding, self.causal)
        return self._head(x, c)

    # ---- causal decoding with a KV cache (the AR variant) -----------------------------------
    def init_cache(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> MDLMKVCache:
        if not self.causal:
            raise ValueError("a KV cache needs the causal (AR) variant: backbone.causal=true")
        ref = self.vocab_embed.embedding
        n_heads = self.blocks[0].n_heads
        shape = (batch_size, n_heads, self.max_length, self.head_dim)
        kw = dict(device=device or ref.device, dtype=dtype or ref.dtype)
        return MDLMKVCache(
            keys=[torch.zeros(shape, **kw) for _ in self.blocks],
            values=[torch.zeros(shape, **kw) for _ in self.blocks],
        )

    def forward_cached(
        self, x_new: Tensor, cache: MDLMKVCache, sigma: Tensor | None = None
    ) -> Tensor:
        """Logits (B, n, V) of n new tokens continuing the cached ones (= forward(x)[:, -n:])."""
        B, n = x_new.shape
        start = cache.length
        if start + n > cache.capacity:
            raise ValueError(
                f"KV cache full: {start} cached + {n} new tokens exceed max_length={cache.capacity}"
            )
        x = self.vocab_embed(x_new)
        rotary = rotary_tables(start + n, self.head_dim, x.device, start=start)
        for block, keys, values in zip(self.blocks, cache.keys, cache.values):
            x = block(x, rotary, None, None, True, kv=(keys, values, start))
        cache.length = start + n
        return self._head(x, None)
