"""The DiT backbone: a bidirectional (or causal) transformer over tokens.

Follows MDLM's DiT (Peebles & Xie's adaLN-zero blocks, rotary positions) and is
read top to bottom in the order data flows: rotary -> time embedding -> block ->
final layer -> DiT. The call is the backbone seam of the project:

    logits = dit(x_t, sigma=None, attention_mask=None)   # (B, L) long -> (B, L, V)

Every block is modulated by a `cond_dim` embedding of `sigma` (adaLN-zero, so a
fresh block starts as the identity); `time_conditioning=False` embeds sigma = 0, as
MDLM does, which keeps the zero-initialised gates (they speed up early training a lot on
the embedded default) while making the output independent of t. With `time_conditioning=True`
it embeds whatever sigma it is given: sigma(t), or (the objective's `mask_conditioning`) a
statistic of x_t itself. `causal=True` turns it into the AR backbone, and then
`forward_cached(x_new, cache)` decodes with a KV cache (`init_cache`): each new token
attends to the stored keys and values, so sampling L tokens costs O(L) block calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # optional: used only on CUDA for unpadded half-precision batches
    from flash_attn import flash_attn_func  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding: Tensor | None, causal: bool) -> Tensor:
    """Multi-head attention on (B, H, L, D) tensors; flash-attn when it applies, else SDPA.

    `key_padding` is (B, L) bool, True for real tokens; padded keys get no weight.
    """
    use_flash = (
        flash_attn_func is not None
        and q.is_cuda
        and key_padding is None
        and q.dtype in (torch.float16, torch.bfloat16)
    )
    if use_flash:
        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal
        )
        return out.transpose(1, 2)
    mask = None
    if key_padding is not None:
        mask = key_padding[:, None, None, :]  # (B, 1, 1, L) broadcast over heads and queries
        if causal:
            L = q.shape[-2]
            tri = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
            mask = mask & tri
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


@dataclass
class KVCache:
    """Keys and values of every block for the tokens decoded so far (causal decoding only).

    keys / values: one (B, H, max_length, D) buffer per block, filled in place;
    length: how many positions hold real entries.
    """

    keys: list[Tensor]
    values: list[Tensor]
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


def cached_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of n new queries (B, H, n, D) over all start + n cached keys.

    Query i sits at position start + i and sees keys 0 .. start + i (SDPA's own
    `is_causal` aligns the triangle top-left, which is wrong once start > 0).
    """
    n, total = q.shape[-2], k.shape[-2]
    if n == 1:  # one new token sees everything cached: no mask needed
        return F.scaled_dot_product_attention(q, k, v)
    start = total - n
    query_pos = start + torch.arange(n, device=q.device)[:, None]  # (n, 1)
    mask = torch.arange(total, device=q.device)[None, :] <= query_pos  # (n, total)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer), cos/sin cached per length."""

    def __init__(self, head_dim: int, base: float = 10_000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        pos = torch.arange(length, device=device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(pos, self.inv_freq)  # (L, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (L, D)
        return emb.cos()[None, None], emb.sin()[None, None]  # (1, 1, L, D)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, L, D) by position: x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of sigma followed by an MLP (DiT)."""

    def __init__(self, cond_dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )

    def forward(self, sigma: Tensor) -> Tensor:
        half = self.freq_dim // 2
        dtype = self.mlp[0].weight.dtype  # float32 params: features in float32 even under autocast
        freqs = torch.exp(
            -math.log(10_000) * torch.arange(half, device=sigma.device, dtype=dtype) / half
        )
        args = sigma.to(dtype)[:, None] * freqs[None]  # (B, half)
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))  # (B, cond_dim)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Pre-LN transformer block; adaLN-zero modulated when `cond_dim` is given."""

    def __init__(
        self, hidden_size: int, n_heads: int, cond_dim: int | None, mlp_ratio: int, dropout: float
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=cond_dim is None)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=cond_dim is None)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_ratio * hidden_size),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_ratio * hidden_size, hidden_size),
        )
        self.dropout = nn.Dropout(dropout)
        self.adaLN = None
        if cond_dim is not None:
            # shift/scale/gate for attention and MLP; zero init -> block starts as identity
            self.adaLN = nn.Linear(cond_dim, 6 * hidden_size)
            nn.init.zeros_(self.adaLN.weight)
            nn.init.zeros_(self.adaLN.bias)

    def forward(
        self,
        x: Tensor,
        rotary: tuple[Tensor, Tensor],
        cond: Tensor | None,
        key_padding: Tensor | None,
        causal: bool,
        kv: tuple[Tensor, Tensor, int] | None = None,
    ) -> Tensor:
        """x (B, L, C) -> (B, L, C). With `kv = (keys, values, start)` (causal decoding) x holds
        the new positions start .. start + L - 1; their keys and values are written into the
        buffers and attention runs over everything cached."""
        B, L, C = x.shape
        if self.adaLN is not None and cond is not None:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(cond).chunk(6, dim=-1)
        else:
            shift1 = scale1 = shift2 = scale2 = None
            gate1 = gate2 = None

        h = self.norm1(x)
        if shift1 is not None:
            h = modulate(h, shift1, scale1)
        q, k, v = self.qkv(h).view(B, L, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)  # (B, H, L, D)
        if kv is None:
            a = attention(q, k, v, key_padding, causal)
        else:
            keys, values, start = kv
            keys[:, :, start : start + L] = k
            values[:, :, start : start + L] = v
            seen_k = keys[:, :, : start + L].to(q.dtype)  # no copy unless autocast changed dtype
            a = cached_attention(q, seen_k, values[:, :, : start + L].to(q.dtype))
        a = a.transpose(1, 2).reshape(B, L, C)
        a = self.dropout(self.proj(a))
        x = x + (a if gate1 is None else gate1[:, None] * a)

        h = self.norm2(x)
        if shift2 is not None:
            h = modulate(h, shift2, scale2)
        m = self.dropout(self.mlp(h))
        return x + (m if gate2 is None else gate2[:, None] * m)


class FinalLayer(nn.Module):
    """LayerNorm (adaLN-modulated when conditioned) and the projection to the vocabulary."""

    def __init__(self, hidden_size: int, vocab_size: int, cond_dim: int | None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=cond_dim is None)
        self.linear = nn.Linear(hidden_size, vocab_size)
        self.adaLN = None
        if cond_dim is not None:
            self.adaLN = nn.Linear(cond_dim, 2 * hidden_size)
            nn.init.zeros_(self.adaLN.weight)
            nn.init.zeros_(self.adaLN.bias)
        # MDLM zero-inits the output: the first prediction is uniform over the vocabulary
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, cond: Tensor | None) -> Tensor:
        h = self.norm(x)
        if self.adaLN is not None and cond is not None:
            shift, scale = self.adaLN(cond).chunk(2, dim=-1)
            h = modulate(h, shift, scale)
        return self.linear(h)


class DiT(nn.Module):
    """Diffusion transformer over token ids (MDLM's backbone; `causal=True` is its AR twin)."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int = 768,
        n_blocks: int = 12,
        n_heads: int = 12,
        max_length: int = 1024,
        time_conditioning: bool = False,
        cond_dim: int = 128,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        causal: bool = False,
    ) -> None:
        super().__init__()
        cond = cond_dim  # adaLN-zero always: MDLM feeds sigma = 0 when time-agnostic
        if hidden_size % n_heads != 0:
            raise ValueError(
                f"model.hidden_size={hidden_size} must be divisible by model.n_heads={n_heads}"
            )
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.causal = causal
        self.time_conditioning = time_conditioning
        self.embed = nn.Embedding(vocab_size, hidden_size)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.rotary = Rotary(hidden_size // n_heads)
        self.sigma_embed = TimestepEmbedder(cond)
        self.blocks = nn.ModuleList(
            Block(hidden_size, n_heads, cond, mlp_ratio, dropout) for _ in range(n_blocks)
        )
        self.final = FinalLayer(hidden_size, vocab_size, cond)

    @property
    def time_conditioned(self) -> bool:
        return self.time_conditioning

    def forward(
        self, x_t: Tensor, sigma: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        B, L = x_t.shape
        if L > self.max_length:
            raise ValueError(
                f"sequence length {L} exceeds the model's max_length={self.max_length} "
                "(set model.length <= model.max_length)"
            )
        x = self.embed(x_t)  # (B, L, C)
        cond = self._condition(sigma, B)
        key_padding = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_padding = attention_mask.bool()
        rotary = self.rotary(L, x.device)
        for block in self.blocks:
            x = block(x, rotary, cond, key_padding, self.causal)
        return self.final(x, cond)  # (B, L, V)

    def _condition(self, sigma: Tensor | None, B: int) -> Tensor:
        """(B, cond_dim) embedding of sigma; a time-agnostic DiT embeds sigma = 0 (as MDLM),
        so its adaLN-zero gates are learned constants and every block starts as the identity."""
        if not self.time_conditioning:
            sigma = torch.zeros(B, device=self.embed.weight.device, dtype=self.embed.weight.dtype)
        elif sigma is None:
            raise ValueError(
                "this DiT is time-conditioned (time_conditioning=true) and needs sigma"
            )
        return F.silu(self.sigma_embed(sigma.reshape(B)))  # (B, cond_dim)

    # ---- causal decoding with a KV cache (the AR sampler) -----------------------------------
    def init_cache(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """Empty keys/values for `batch_size` sequences of up to `max_length` tokens."""
        if not self.causal:
            raise ValueError(
                "a KV cache needs a causal DiT (backbone.causal=true): in a bidirectional model "
                "every new token changes the states of the earlier ones"
            )
        ref = self.embed.weight
        block = self.blocks[0]
        head_dim = block.qkv.in_features // block.n_heads
        shape = (batch_size, block.n_heads, self.max_length, head_dim)
        kw = dict(device=device or ref.device, dtype=dtype or ref.dtype)
        return KVCache(
            keys=[torch.zeros(shape, **kw) for _ in self.blocks],
            values=[torch.zeros(shape, **kw) for _ in self.blocks],
        )

    def forward_cached(self, x_new: Tensor, cache: KVCache, sigma: Tensor | None = None) -> Tensor:
        """Logits (B, n, V) of n new tokens (B, n) that continue the `cache.length` cached ones.

        Equal to `forward(x)[:, -n:]` on the whole sequence; the cache is extended in place.
        """
        B, n = x_new.shape
        start = cache.length
        if start + n > cache.capacity:
            raise ValueError(
                f"KV cache full: {start} cached + {n} new tokens exceed max_length={cache.capacity}"
            )
        x = self.embed(x_new)  # (B, n, C)
        cond = self._condition(sigma, B)
        cos, sin = self.rotary(start + n, x.device)
        rotary = (cos[:, :, start:], sin[:, :, start:])  # positions start .. start + n - 1
        for block, keys, values in zip(self.blocks, cache.keys, cache.values):
            x = block(x, rotary, cond, None, True, kv=(keys, values, start))
        cache.length = start + n
        return self.final(x, cond)  # (B, n, V)
