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
statistic of x_t itself. `causal=True` turns it into the AR backbone.

The span KV cache (`init_cache`, `forward_span`) serves every DiT, causal or not: a span of
positions start .. start + n - 1 is run through the blocks while attending to keys and values
stored for positions outside it (the prefix [0, start), or every cached position outside the
span). AR decoding (`forward_cached`) is the span after the cached prefix; the Fast-dLLM
prefix / dual caches of the confidence sampler and the block sampler use the same call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from diffusion.precision import no_downcast

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


try:  # FlexAttention (torch >= 2.5): the sparse block-causal pattern of BD3-LM on CUDA
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch build
    BlockMask, flex_attention = None, None


_FLEX: list = []  # the compiled flex_attention, built on first use (compiling takes a while)


def _compiled_flex():
    """flex_attention compiled once per process (uncompiled it runs an unfused fallback)."""
    if not _FLEX:
        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX[0]


def masked_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask, key_padding: Tensor | None):
    """Attention under a custom pattern: `attn_mask` (L, L) or (B, L, L) bool (True: query row
    may see key column), dense through SDPA, or a FlexAttention `BlockMask` (CUDA)."""
    if BlockMask is not None and isinstance(attn_mask, BlockMask):
        if key_padding is not None:
            raise ValueError("a FlexAttention BlockMask cannot be combined with padding")
        return _compiled_flex()(q, k, v, block_mask=attn_mask)
    mask = attn_mask.bool()
    mask = mask[None, None] if mask.dim() == 2 else mask[:, None]  # (B | 1, 1, L, L)
    if key_padding is not None:
        mask = mask & key_padding[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


SPAN_CONTEXTS = ("prefix", "all")


@dataclass
class KVCache:
    """Keys and values of every block at the positions stored so far (any DiT).

    keys / values: one (B, H, max_length, D) buffer per block, filled in place;
    length: positions [0, length) hold entries written by `DiT.forward_span`.
    """

    keys: list[Tensor]
    values: list[Tensor]
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


@dataclass(frozen=True)
class Span:
    """Where a span sits in the cache and what it sees (see `DiT.forward_span`)."""

    start: int
    cached: int  # cache.length before this call
    context: str  # "prefix": cached [0, start); "all": also cached [start + n, cached)
    write: bool


def block_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding: Tensor | None,
    causal: bool,
    kv: tuple[Tensor, Tensor, Span] | None = None,
    attn_mask=None,
) -> Tensor:
    """The attention of one block, whatever it is asked to see (every DiT's blocks call it):
    the span KV cache (`kv = (keys, values, span)`, see `span_attention`), a custom pattern
    (`attn_mask`, BD3-LM's block-causal x_t + x_0, used instead of `causal`), or plain
    (causal) attention over the unpadded keys."""
    if kv is not None:
        return span_attention(q, k, v, kv[0], kv[1], kv[2], causal)
    if attn_mask is not None:
        return masked_attention(q, k, v, attn_mask, key_padding)
    return attention(q, k, v, key_padding, causal)


def check_span(n: int, start: int, cache: KVCache, batch: int, context: str) -> None:
    """Refuse a `forward_span` call the cache cannot serve, naming what is wrong."""
    end = start + n
    if context not in SPAN_CONTEXTS:
        raise ValueError(f"forward_span context={context!r}; expected one of {SPAN_CONTEXTS}")
    if start < 0 or start > cache.length:
        raise ValueError(
            f"forward_span start={start} must lie in [0, cache.length={cache.length}] "
            "(positions before the span must be cached)"
        )
    if end > cache.capacity:
        raise ValueError(
            f"KV cache full: span [{start}, {end}) exceeds max_length={cache.capacity}"
        )
    if cache.keys[0].shape[0] != batch:
        raise ValueError(
            f"forward_span batch {batch} != the cache's batch {cache.keys[0].shape[0]}"
        )


def empty_cache(
    n_blocks: int, batch: int, heads: int, head_dim: int, capacity: int, ref: Tensor, device, dtype
) -> KVCache:
    """A KVCache of zeroed (batch, heads, capacity, head_dim) buffers, one pair per block
    (device / dtype default to those of `ref`)."""
    shape = (batch, heads, capacity, head_dim)
    kw = dict(device=device or ref.device, dtype=dtype or ref.dtype)
    return KVCache(
        keys=[torch.zeros(shape, **kw) for _ in range(n_blocks)],
        values=[torch.zeros(shape, **kw) for _ in range(n_blocks)],
    )


def span_attention(
    q: Tensor, k: Tensor, v: Tensor, keys: Tensor, values: Tensor, span: Span, causal: bool
) -> Tensor:
    """Attention of span queries q (B, H, n, D) at positions start .. start + n - 1.

    Keys are the span's own k, v (causal within the span iff `causal`) and the cached keys of
    one block (`keys` / `values`, (B, H, capacity, D)) outside the span: [0, start), plus
    [start + n, cached) when `span.context == "all"`. With `span.write` the span's k, v are
    stored at [start, start + n) first, so the keys are a view of the buffer (no copy).
    Key index j is position j in both layouts, so a causal query i sees j <= start + i or j
    past the span.
    """
    n = q.shape[-2]
    start, end = span.start, span.start + n
    hi = max(span.cached, end) if span.context == "all" else end  # keys at [0, hi)
    if span.write:
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        seen_k, seen_v = keys[:, :, :hi].to(q.dtype), values[:, :, :hi].to(q.dtype)
    else:
        seen_k = torch.cat([keys[:, :, :start].to(q.dtype), k, keys[:, :, end:hi].to(q.dtype)], 2)
        seen_v = torch.cat(
            [values[:, :, :start].to(q.dtype), v, values[:, :, end:hi].to(q.dtype)], 2
        )
    if not causal or n == 1:  # every key present is visible
        return F.scaled_dot_product_attention(q, seen_k, seen_v)
    query_pos = start + torch.arange(n, device=q.device)[:, None]  # (n, 1)
    key_pos = torch.arange(hi, device=q.device)[None, :]  # (1, hi)
    mask = (key_pos <= query_pos) | (key_pos >= end)  # (n, hi)
    return F.scaled_dot_product_attention(q, seen_k, seen_v, attn_mask=mask)


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer, GPT-NeoX halves): cos/sin tables of the angles
    p * inv_freq, built once per (device, inference mode) and grown on demand.

    A table for length L is the first L rows of any longer one (row p depends on p only), so
    one table per key serves every length; `positions` (BD3-LM) are computed on the spot.
    """

    def __init__(self, head_dim: int, base: float = 10_000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """Moves and upcasts apply to `inv_freq`; a cast to a half type does not (Lightning's
        `bf16-true`, `model.half()`): in bf16 the positions above 256 round to even numbers
        and the angles p * inv_freq at p ~ 1000 are off by radians."""
        return super()._apply(no_downcast(fn), recurse)

    def _angles(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        freqs = torch.outer(pos, self.inv_freq)  # (L, D/2) in inv_freq's dtype
        return freqs.cos(), freqs.sin()

    def forward(
        self,
        length: int,
        device: torch.device,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """cos, sin (L, D/2) at positions 0 .. length - 1, or at `positions` (L,) when given
        (BD3-LM's x_t and x_0 halves both sit at 0 .. L - 1), in inv_freq's dtype (`rotate_qkv`
        casts). Both halves of a head share these angles (see `rotate_qkv`)."""
        if positions is not None:
            return self._angles(positions.to(device=device, dtype=self.inv_freq.dtype))
        if torch.compiler.is_compiling():  # no Python-side cache inside a compiled graph
            pos = torch.arange(length, device=device, dtype=self.inv_freq.dtype)
            return self._angles(pos)
        inv = self.inv_freq
        key = (
            torch.device(device), torch.is_inference_mode_enabled(),
            inv.device, inv.dtype, inv.data_ptr(), inv._version,
        )  # fmt: skip
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < length:
            if len(self._tables) > 8:  # devices / dtypes / modes come and go: stay bounded
                self._tables.clear()
            size = max(length, 0 if table is None else 2 * table[0].shape[0])
            pos = torch.arange(size, device=device, dtype=inv.dtype)
            table = self._tables[key] = self._angles(pos)
        return table[0][:length], table[1][:length]


def _rotate_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> None:
    """out = x rotated by +angle (or -angle): halves x1, x2 of the last dim go to
    x1 cos - x2 sin, x2 cos + x1 sin (inverse: x1 cos + x2 sin, x2 cos - x1 sin)."""
    h = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    sign = 1.0 if inverse else -1.0
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=sign)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin, value=-sign)


class _RotateQKV(torch.autograd.Function):
    """q and k of a packed (B, L, 3, H, D) qkv rotated into one new (B, L, 2, H, D) buffer, v a
    view of the input; all three come out as (B, H, L, D) views. The backward writes the inverse
    rotation of q's and k's gradients and v's gradient straight into one packed gradient: no
    copy of v, no stacking of the three gradients, no activations saved (only cos/sin)."""

    @staticmethod
    def forward(ctx, qkv: Tensor, cos: Tensor, sin: Tensor):
        B, L, _, H, D = qkv.shape
        qk = torch.empty((B, L, 2, H, D), dtype=qkv.dtype, device=qkv.device)
        _rotate_into(qk, qkv[:, :, :2], cos, sin, inverse=False)
        ctx.save_for_backward(cos, sin)
        q, k = qk.unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, 2].transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_k: Tensor, grad_v: Tensor):
        cos, sin = ctx.saved_tensors  # (L, 1, 1, D/2): [:, 0] lays them over (B, L, H, D/2)
        B, H, L, D = grad_q.shape
        grad = torch.empty((B, L, 3, H, D), dtype=grad_q.dtype, device=grad_q.device)
        for i, g in enumerate((grad_q, grad_k)):
            _rotate_into(grad[:, :, i], g.transpose(1, 2), cos[:, 0], sin[:, 0], inverse=True)
        grad[:, :, 2].copy_(grad_v.transpose(1, 2))
        return grad, None, None


def rotate_qkv(qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rotary on the packed (B, L, 3, H, D) projections: q, k rotated by position and v as is,
    each (B, H, L, D) (the layout attention takes).

    cos, sin: (L, D/2) from `Rotary`. Equal to rotating q and k separately by
    x * cos + rotate_half(x) * sin with the halves' tables repeated (the classic form).
    """
    cos = cos.to(qkv.dtype)[:, None, None]  # (L, 1, 1, D/2) over (B, L, 2, H, D/2)
    sin = sin.to(qkv.dtype)[:, None, None]
    if torch.compiler.is_compiling():  # plain ops: the compiler fuses them itself
        x1, x2 = qkv[:, :, :2].chunk(2, dim=-1)
        q, k = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
    return _RotateQKV.apply(qkv, cos, sin)


_GELU_C = 2.0 * math.sqrt(2.0 / math.pi)  # tanh-GELU: x * sigmoid(C * (x + K x^3))
_GELU_K = 0.044715


class _TanhGELUCPU(torch.autograd.Function):
    """GELU's tanh form as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): the same function
    (0.5 (1 + tanh u) = sigmoid(2u)), written for CPUs, where ATen's tanh is several times
    slower than its sigmoid. The forward also writes the derivative
    s + x s (1 - s) C (1 + 3K x^2), so the backward is one multiply; it saves that one
    tensor where the stock kernel saves its input (same memory). Three fresh buffers, the
    rest in place (a fresh CPU buffer costs about three in-place passes)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        s = (x * x).mul_(_GELU_C * _GELU_K).add_(_GELU_C).mul_(x).sigmoid_()
        y = x * s
        if ctx.needs_input_grad[0]:
            # x s (1 - s) C (1 + 3K x^2), the polynomial bounded (x^2 <= 1e4, where s(1 - s) is
            # already 0 in float32 and float64): no inf * 0 at huge inputs
            d = (x * x).clamp_(max=1e4).mul_(3 * _GELU_C * _GELU_K).add_(_GELU_C).mul_(y)
            d.addcmul_(d, s, value=-1.0)
            ctx.save_for_backward(s.add_(d))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (derivative,) = ctx.saved_tensors
        return grad * derivative


class TanhGELU(nn.Module):
    """`nn.GELU(approximate="tanh")`, MDLM's MLP activation, with a faster CPU kernel for float32
    and float64 (about 1.5x for forward + backward on a 2-core EPYC); CUDA, half precision and
    compiled graphs take the stock kernel. Values agree to float rounding (tests/test_dit.py)."""

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and not torch.compiler.is_compiling()
        ):
            return _TanhGELUCPU.apply(x)
        return F.gelu(x, approximate="tanh")


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
        exact = torch.promote_types(dtype, torch.float32)  # bf16-true: computed in float32, cast
        freqs = torch.exp(
            -math.log(10_000) * torch.arange(half, device=sigma.device, dtype=exact) / half
        )
        args = sigma.to(exact)[:, None] * freqs[None]  # (B, half)
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1).to(dtype))  # (B, cond_dim)


def _per_row(m: Tensor, x: Tensor) -> Tensor:
    """A (B, C) modulation laid over x: (B, 1, C) for (B, L, C) x; as is for rows (N, C)."""
    return m[:, None] if x.dim() == 3 else m


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (B, L, C) * (1 + scale (B, C)) + shift (B, C), in one fused op (or x (N, C)
    rows with their own (N, C) modulations)."""
    return torch.addcmul(_per_row(shift, x), x, 1 + _per_row(scale, x))


def gated_residual(x: Tensor, gate: Tensor | None, y: Tensor) -> Tensor:
    """x + gate (B, C) * y, (B, L, C), in one fused op (x + y without a gate); rows as above."""
    return x + y if gate is None else torch.addcmul(x, _per_row(gate, x), y)


def at_rows(m: Tensor | None, rows: Tensor, length: int) -> Tensor | None:
    """The modulations of flat positions `rows` (N,) of (B, length): each position's row of a
    per-sample m (B, C), (N, C); a shared m (1, C) or None stays as it is."""
    if m is None or m.shape[0] == 1:
        return m
    return m.index_select(0, torch.div(rows, length, rounding_mode="floor"))


def modulated_norm(
    norm: nn.LayerNorm, x: Tensor, shift: Tensor | None, scale: Tensor | None
) -> Tensor:
    """norm(x), adaLN-modulated by shift / scale (B, C) when given. Modulations shared by every
    row ((1, C): a time-agnostic DiT embeds the same sigma = 0 for all) are the LayerNorm's
    affine weight 1 + scale and bias shift: one fused kernel, as a plain transformer's."""
    if shift is None or scale is None:
        return norm(x)
    if shift.shape[0] == 1:  # (the affine in x's dtype: autocast leaves layer_norm alone)
        weight, bias = (1 + scale[0]).to(x.dtype), shift[0].to(x.dtype)
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)
    return modulate(norm(x), shift, scale)


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
            TanhGELU(),
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
        kv: tuple[Tensor, Tensor, Span] | None = None,
        attn_mask=None,
        rows: Tensor | None = None,
    ) -> Tensor:
        """x (B, L, C) -> (B, L, C). With `kv = (keys, values, span)` x holds the positions
        span.start .. span.start + L - 1, attending as `span_attention` says.

        `rows` (N,) flat positions b * L + i: only they go on past the attention, (N, C) out.
        Exact, since everything after the attention is per position; the last block of a lean
        loss skips the output projection and the MLP where nothing is scored."""
        B, L, C = x.shape
        if self.adaLN is not None and cond is not None:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(cond).chunk(6, dim=-1)
        else:
            shift1 = scale1 = shift2 = scale2 = None
            gate1 = gate2 = None

        h = modulated_norm(self.norm1, x, shift1, scale1)
        qkv = self.qkv(h).view(B, L, 3, self.n_heads, C // self.n_heads)
        q, k, v = rotate_qkv(qkv, *rotary)  # (B, H, L, D)
        a = block_attention(q, k, v, key_padding, causal, kv, attn_mask)
        a = a.transpose(1, 2).reshape(B, L, C)
        if rows is not None:
            x, a = x.flatten(0, 1).index_select(0, rows), a.flatten(0, 1).index_select(0, rows)
            gate1, shift2, scale2, gate2 = (
                at_rows(m, rows, L) for m in (gate1, shift2, scale2, gate2)
            )
        x = self._residual(x, self.proj, a, gate1)
        h = modulated_norm(self.norm2, x, shift2, scale2)
        return self._residual(x, self.mlp[2], self.mlp[1](self.mlp[0](h)), gate2)

    def _residual(self, x: Tensor, linear: nn.Linear, h: Tensor, gate: Tensor | None) -> Tensor:
        """x + gate * dropout(linear(h)). A gate shared by every row ((1, C): a time-agnostic
        DiT) is folded into the linear layer's weights: one matmul, no elementwise pass."""
        if gate is not None and gate.shape[0] == 1:
            g = gate[0]
            bias = None if linear.bias is None else linear.bias * g
            return x + self._dropout(F.linear(h, linear.weight * g[:, None], bias))
        return gated_residual(x, gate, self._dropout(linear(h)))

    def _dropout(self, x: Tensor) -> Tensor:
        return self.dropout(x) if self.dropout.p > 0 else x


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

    def forward(
        self,
        x: Tensor,
        cond: Tensor | None,
        positions_to_score: Tensor | None = None,
        length: int | None = None,
    ) -> Tensor:
        """(B, L, C) -> (B, L, V) logits; with `positions_to_score` (N,) flat indices into the
        B * L positions, only those rows reach the norm and the vocabulary projection: (N, V).
        x may already be those rows, (N, C), from a block given `rows`; `length` is then L."""
        shift = scale = None
        if self.adaLN is not None and cond is not None:
            shift, scale = self.adaLN(cond).chunk(2, dim=-1)
        if positions_to_score is not None:
            if x.dim() == 3:
                length = x.shape[1]
                x = x.flatten(0, 1).index_select(0, positions_to_score)  # (N, C)
            shift, scale = (at_rows(m, positions_to_score, length) for m in (shift, scale))
        return self.linear(modulated_norm(self.norm, x, shift, scale))


def padding_mask(attention_mask: Tensor | None) -> Tensor | None:
    """(B, L) bool key mask, or None when every token is real (flash-attn / SDPA's fast path).

    Under torch.compile the mask is always kept: an all-True mask attends exactly like none,
    and testing `.all()` would read a value back to Python (a graph break)."""
    if attention_mask is None:
        return None
    if torch.compiler.is_compiling() or not bool(attention_mask.all()):
        return attention_mask.bool()
    return None


class DiT(nn.Module):
    """Diffusion transformer over token ids (MDLM's backbone; `causal=True` is its AR twin)."""

    accepts_sigma: ClassVar[bool] = True  # adaLN embeds a conditioning vector (sigma, or 0)
    supports_span_cache: ClassVar[bool] = True  # init_cache / forward_span below
    tokenizer_key: ClassVar[str | None] = None  # trained from scratch on the data's tokenizer
    causal: bool = False  # the instance's setting (backbone.causal)
    scores_positions = True  # forward(..., positions_to_score=) applies the head only there
    # ... and the last block's projection and MLP too (exact; False: the ablation in
    # scripts/benchmark.py --sections backbones)
    prune_last_block: bool = True

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

    def forward(
        self,
        x_t: Tensor,
        sigma: Tensor | None = None,
        attention_mask: Tensor | None = None,
        positions_to_score: Tensor | None = None,
        attn_mask=None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """(B, L) ids -> (B, L, V) logits, or (N, V) at `positions_to_score` (N,) flat indices
        b * L + i (the lean loss: the head runs only where the loss counts).

        x_t may also be (B, L, V) float weights over the vocabulary (DUO's relaxed one-hots:
        the embedding is their weighted sum). `attn_mask`: a custom attention pattern ((L, L) /
        (B, L, L) bool, True = may attend, or a FlexAttention BlockMask) used instead of
        `causal`; `positions` (L,): rotary positions (default 0 .. L - 1). BD3-LM trains on
        x_t + x_0 with both, each half at positions 0 .. L - 1.
        """
        B, L = x_t.shape[:2]
        span = L if positions is None else int(positions.max()) + 1
        if span > self.max_length:
            raise ValueError(
                f"sequence length {span} exceeds the model's max_length={self.max_length} "
                "(set model.length <= model.max_length)"
            )
        if x_t.is_floating_point():  # soft tokens (B, L, V)
            x = x_t.to(self.embed.weight.dtype) @ self.embed.weight  # (B, L, C)
        else:
            x = self.embed(x_t)  # (B, L, C)
        cond = self._condition(sigma, B)
        key_padding = padding_mask(attention_mask)
        rotary = self.rotary(L, x.device, positions)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            rows = positions_to_score if i == last and self.prune_last_block else None
            x = block(x, rotary, cond, key_padding, self.causal, attn_mask=attn_mask, rows=rows)
        return self.final(x, cond, positions_to_score, L)  # (B, L, V) or (N, V)

    def _condition(self, sigma: Tensor | None, B: int) -> Tensor:
        """(B, cond_dim) embedding of sigma; a time-agnostic DiT embeds sigma = 0 (as MDLM),
        so its adaLN-zero gates are learned constants and every block starts as the identity.
        That one embedding is returned once, (1, cond_dim), shared by every row: the blocks
        then fold the modulations into their LayerNorms and linear layers."""
        if not self.time_conditioning:
            zero = torch.zeros(1, device=self.embed.weight.device, dtype=self.embed.weight.dtype)
            return F.silu(self.sigma_embed(zero))  # (1, cond_dim)
        if sigma is None:
            raise ValueError(
                "this DiT is time-conditioned (time_conditioning=true) and needs sigma"
            )
        return F.silu(self.sigma_embed(sigma.reshape(B)))  # (B, cond_dim)

    # ---- the span KV cache (AR decoding, Fast-dLLM prefix / dual caches, block sampling) ---
    def init_cache(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """Empty keys/values for `batch_size` sequences of up to `max_length` positions."""
        block = self.blocks[0]
        head_dim = block.qkv.in_features // block.n_heads
        return empty_cache(
            len(self.blocks), batch_size, block.n_heads, head_dim, self.max_length,
            self.embed.weight, device, dtype,
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
        """Logits (B, n, V) of the tokens x_span (B, n) at positions start .. start + n - 1.

        The span attends to itself (causal within it iff `self.causal`) and to the cached keys
        and values at [0, start) (`context="prefix"`) or at every cached position outside the
        span (`context="all"`: also [start + n, cache.length)). `write=True` stores the span's
        keys/values at [start, start + n) and sets cache.length = max(cache.length, start + n).
        Exact (equal to the full forward) whenever the full model's attention would see the
        same keys: a causal DiT, or a block-causal pattern run block by block.
        """
        B, n = x_span.shape
        end = start + n
        check_span(n, start, cache, B, context)
        x = self.embed(x_span)  # (B, n, C)
        cond = self._condition(sigma, B)
        cos, sin = self.rotary(end, x.device)
        rotary = (cos[start:], sin[start:])  # positions start .. end - 1
        span = Span(start=start, cached=cache.length, context=context, write=write)
        for block, keys, values in zip(self.blocks, cache.keys, cache.values):
            x = block(x, rotary, cond, None, self.causal, kv=(keys, values, span))
        if write:
            cache.length = max(cache.length, end)
        return self.final(x, cond)  # (B, n, V)

    def forward_cached(self, x_new: Tensor, cache: KVCache, sigma: Tensor | None = None) -> Tensor:
        """AR decoding: logits (B, n, V) of n new tokens continuing the `cache.length` cached ones.

        Equal to `forward(x)[:, -n:]` on the whole sequence for a causal DiT; the cache grows.
        """
        return self.forward_span(x_new, cache.length, cache, sigma, context="prefix", write=True)
