"""SMDM's masked-diffusion transformer (lit-gpt `TransEncoder`), parameter for parameter (`backbone=smdm`).

Nie et al. 2024 ("Scaling up Masked Diffusion Models on Text") train a bidirectional LLaMA-style
encoder on SlimPajama with the TinyLlama tokenizer. Its safetensors hold, unprefixed:

    transformer.wte.weight                  (32001, C): 32000 tokens + the [MASK] row 32000
    transformer.h.N.norm_1.weight           RMSNorm (eps 1e-5), weight only
    transformer.h.N.attn.attn.weight        (3C, C) fused q, k, v *per query group*: for each
                                            head, its q, k and v rows follow each other
    transformer.h.N.attn.proj.weight        (C, C)
    transformer.h.N.norm_2.weight
    transformer.h.N.mlp.swiglu.w{1,2,3}.weight   xformers SwiGLU: w3(silu(w1 x) * w2 x)
    transformer.ln_f.weight
    lm_head.weight                          (32000, C): no logit for [MASK]

No bias anywhere, full attention (no causal mask), rotate-half rotary over the whole head
(base 10 000), no time conditioning. The head has no [MASK] row, so the output appends one
pinned far below every other logit: (B, L, 32001), SMDM's distribution over its 32000 tokens.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MASK_LOGIT = -1e4  # the appended [MASK] logit: never predicted


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        norm = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (norm * self.weight.float()).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_size = n_heads, dim // n_heads
        self.attn = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_padding: Tensor | None) -> Tensor:
        B, L, C = x.shape
        qkv = self.attn(x).view(B, L, self.n_heads, 3, self.head_size)  # per-group q, k, v
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, hs)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        mask = None if key_padding is None else key_padding[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """(B, H, L, hs) rotated by halves; cos/sin (L, hs/2), computed in float32."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.swiglu = SwiGLU(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.swiglu(x)


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, hidden: int) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(dim)
        self.attn = SelfAttention(dim, n_heads)
        self.norm_2 = RMSNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_padding: Tensor | None) -> Tensor:
        x = x + self.attn(self.norm_1(x), cos, sin, key_padding)
        return x + self.mlp(self.norm_2(x))


class SMDMTransEncoder(nn.Module):
    """SMDM's TransEncoder behind our seam: (x_t, sigma, attention_mask) -> (B, L, V) logits."""

    accepts_sigma: ClassVar[bool] = False  # time-agnostic: sigma is ignored
    supports_span_cache: ClassVar[bool] = False
    causal: ClassVar[bool] = False

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int = 768,
        n_blocks: int = 18,
        n_heads: int = 12,
        intermediate_size: int = 3072,
        max_length: int = 2048,
    ) -> None:
        super().__init__()
        if hidden_size % n_heads != 0:
            raise ValueError(
                f"model.hidden_size={hidden_size} must be divisible by model.n_heads={n_heads}"
            )
        self.vocab_size = vocab_size  # tokens + [MASK]; the head predicts vocab_size - 1
        self.hidden_size = hidden_size
        self.max_length = max_length
        self.head_size = hidden_size // n_heads
        self.lm_head = nn.Linear(hidden_size, vocab_size - 1, bias=False)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, hidden_size),
                h=nn.ModuleList(
                    Block(hidden_size, n_heads, intermediate_size) for _ in range(n_blocks)
                ),
                ln_f=RMSNorm(hidden_size),
            )
        )
        std = math.sqrt(2.0 / 5 / hidden_size)  # SMDM's (GPT-NeoX) initialisation
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=std)

    @property
    def time_conditioned(self) -> bool:
        return False

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (the FLOPs count reads len(blocks) and hidden_size)."""
        return self.transformer.h

    def embedding_parameters(self) -> tuple[nn.Parameter, ...]:
        """Token embedding and head: left out of SMDM's non-embedding parameter count."""
        return (self.transformer.wte.weight, self.lm_head.weight)

    def forward(
        self, x_t: Tensor, sigma: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        B, L = x_t.shape
        if L > self.max_length:
            raise ValueError(
                f"sequence length {L} exceeds the model's max_length={self.max_length}"
            )
        inv = 1.0 / (
            10_000
            ** (torch.arange(0, self.head_size, 2, device=x_t.device).float() / self.head_size)
        )
        ang = torch.outer(torch.arange(L, device=x_t.device).float(), inv)  # (L, hs/2)
        cos, sin = ang.cos(), ang.sin()
        key_padding = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_padding = attention_mask.bool()
        x = self.transformer.wte(x_t)
        for block in self.transformer.h:
            x = block(x, cos, sin, key_padding)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, L, V - 1)
        pinned = logits.new_full((B, L, 1), MASK_LOGIT)
        return torch.cat([logits, pinned], dim=-1)  # (B, L, V): [MASK] last, never predicted
