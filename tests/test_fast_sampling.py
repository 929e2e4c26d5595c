"""Fast sampling: the DiT span KV cache (exact where the attention pattern allows it).

The reference for a block-causal pattern is `masked_forward`, an independent slow DiT
forward written here with an explicit softmax over an (L, L) visibility matrix.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from models.dit import DiT, modulate

VOCAB = 11


def tiny_dit(causal: bool = False, **kw) -> DiT:
    torch.manual_seed(0)
    args = dict(vocab_size=VOCAB, hidden_size=32, n_blocks=2, n_heads=4, max_length=24)
    args.update(kw)
    model = DiT(causal=causal, **args)
    for p in model.parameters():  # break the zero init so outputs depend on the inputs
        torch.nn.init.normal_(p, std=0.3)
    return model.double().eval()


def block_causal(length: int, block: int) -> Tensor:
    """(L, L) bool: query i sees key j iff block(j) <= block(i) (BD3-LM's pattern)."""
    b = torch.arange(length) // block
    return b[None, :] <= b[:, None]


def masked_forward(model: DiT, x: Tensor, visible: Tensor, sigma: Tensor | None = None) -> Tensor:
    """DiT logits (B, L, V) with attention restricted to `visible` (L, L), by explicit softmax."""
    B, L = x.shape
    h = model.embed(x)
    cond = model._condition(sigma, B)
    pos = torch.arange(L, dtype=torch.float64)
    for blk in model.blocks:
        H = blk.n_heads
        D = h.shape[-1] // H
        inv = model.rotary.inv_freq  # 10000^(-2i/D), rounded to float32 as the DiT stores it
        ang = torch.cat([torch.outer(pos, inv)] * 2, dim=-1)  # (L, D)
        s1, c1, g1, s2, c2, g2 = blk.adaLN(cond).chunk(6, dim=-1)
        z = modulate(blk.norm1(h), s1, c1)
        q, k, v = blk.qkv(z).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
        q, k = (
            t * ang.cos() + torch.cat([-t[..., D // 2 :], t[..., : D // 2]], -1) * ang.sin()
            for t in (q, k)
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, L, L)
        scores = scores.masked_fill(~visible, -math.inf)
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, H * D)
        h = h + g1[:, None] * blk.proj(a)
        h = h + g2[:, None] * blk.mlp(modulate(blk.norm2(h), s2, c2))
    return model.final(h, cond)


@torch.no_grad()
def test_masked_forward_reference_matches_the_dit() -> None:
    """The slow reference is the DiT itself under full and causal visibility."""
    x = torch.randint(0, VOCAB, (2, 10))
    for causal in (False, True):
        model = tiny_dit(causal)
        visible = torch.ones(10, 10, dtype=torch.bool)
        if causal:
            visible = visible.tril()
        torch.testing.assert_close(masked_forward(model, x, visible), model(x), rtol=0, atol=1e-10)


@torch.no_grad()
def test_forward_span_block_by_block_is_the_block_causal_forward() -> None:
    model = tiny_dit()
    x = torch.randint(0, VOCAB, (3, 12))
    reference = masked_forward(model, x, block_causal(12, 4))
    cache = model.init_cache(3)
    pieces = [model.forward_span(x[:, s : s + 4], s, cache) for s in (0, 4, 8)]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, 1), reference, rtol=0, atol=1e-10)
    # the full forward differs: the earlier blocks see the later ones there
    assert not torch.allclose(model(x)[:, :8], reference[:, :8])


@pytest.mark.parametrize("time_conditioning", [False, True])
@torch.no_grad()
def test_forward_span_on_a_causal_dit_is_the_forward(time_conditioning: bool) -> None:
    model = tiny_dit(causal=True, time_conditioning=time_conditioning)
    x = torch.randint(0, VOCAB, (2, 13))
    sigma = torch.tensor([0.4, 1.1]) if time_conditioning else None
    cache = model.init_cache(2)
    pieces = [model.forward_span(x[:, a:b], a, cache, sigma) for a, b in ((0, 5), (5, 6), (6, 13))]
    torch.testing.assert_close(torch.cat(pieces, 1), model(x, sigma), rtol=0, atol=1e-10)


@torch.no_grad()
def test_context_all_sees_both_sides_and_write_false_leaves_the_cache() -> None:
    """Bidirectional: after caching the whole sequence, a span with context="all" recovers
    the full forward of that span; with context="prefix" it is the forward of x[:, :end]."""
    model = tiny_dit()
    x = torch.randint(0, VOCAB, (2, 14))
    full = model(x)
    cache = model.init_cache(2)
    torch.testing.assert_close(model.forward_span(x, 0, cache), full, rtol=0, atol=1e-10)
    before = [k.clone() for k in cache.keys]
    dual = model.forward_span(x[:, 4:8], 4, cache, context="all", write=False)
    torch.testing.assert_close(dual, full[:, 4:8], rtol=0, atol=1e-10)
    prefix = model.forward_span(x[:, 4:8], 4, cache, context="prefix", write=False)
    # the prefix keys came from the full sequence, the span sees no suffix: neither forward
    assert not torch.allclose(prefix, model(x[:, :8])[:, 4:8])
    assert not torch.allclose(prefix, full[:, 4:8])
    assert cache.length == 14 and all(torch.equal(a, b) for a, b in zip(before, cache.keys))
    # a changed span written with context="all" replaces exactly its own positions
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % VOCAB
    model.forward_span(y[:, 4:8], 4, cache, context="all", write=True)
    changed = [(a != b).any(dim=(0, 1, 3)) for a, b in zip(before, cache.keys)]
    assert changed[0].nonzero().flatten().tolist() == [5]  # layer 0 keys: the token alone
    assert changed[1].nonzero().flatten().tolist() == [4, 5, 6, 7]  # layer 1: the whole span


def test_forward_span_refuses_bad_calls() -> None:
    model = tiny_dit()
    cache = model.init_cache(1)
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="cache.length=0"):
        model.forward_span(x, 2, cache)
    with pytest.raises(ValueError, match="context="):
        model.forward_span(x, 0, cache, context="suffix")
    with pytest.raises(ValueError, match="KV cache full"):
        model.forward_span(torch.zeros(1, 25, dtype=torch.long), 0, cache)
    with pytest.raises(ValueError, match="batch 2"):
        model.forward_span(torch.zeros(2, 4, dtype=torch.long), 0, cache)
