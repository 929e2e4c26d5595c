"""Fast sampling: the DiT span KV cache (exact where the attention pattern allows it), per-row
caching, Fast-dLLM parallel decoding and caches, the EB-sampler and ReMDM.

The reference for a block-causal pattern is `masked_forward`, an independent slow DiT
forward written here with an explicit softmax over an (L, L) visibility matrix.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from diffusion.denoiser import ModelDenoiser
from diffusion.noise import LogLinear
from diffusion.objectives.subs import SUBS, subs_log_p_x0
from models.dit import DiT, modulate
from samplers.base import GuidedDenoiser, model_capabilities
from samplers.confidence import ConfidenceSampler, eb_counts, factor_counts, threshold_counts
from samplers.ddpm import DDPMSampler
from samplers.ddpm_cache import DDPMCacheSampler
from samplers.first_hitting import FirstHittingSampler
from samplers.remdm import ReMDMSampler, remdm_step, sigma_max
from samplers.semi_ar import SemiARSampler

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


# ----------------------------------------------------------------------------- test denoisers


class TableDenoiser:
    """p(x0 | x_t) of the masked positions is a fixed table (1, L, V - 1), SUBS elsewhere, so
    the output depends on x_t only through which positions are masked. Records every input."""

    def __init__(self, probs: Tensor) -> None:
        self.probs = probs  # (1, L, V - 1)
        self.vocab_size = probs.shape[-1] + 1
        self.mask_id = probs.shape[-1]
        self.time_conditioned = False
        self.capabilities = model_capabilities({"absorbing", "whole_canvas"}, False)
        self.inputs: list[Tensor] = []

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def log_p_x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        self.inputs.append(x_t.clone())
        B, L = x_t.shape
        probs = torch.cat([self.probs[:, :L].expand(B, -1, -1), torch.zeros(B, L, 1)], -1)
        clean = torch.nn.functional.one_hot(x_t, self.vocab_size).float()
        return torch.where((x_t == self.mask_id)[..., None], probs, clean).log()


def table(length: int, vocab: int = 6, seed: int = 0, sharp: float = 1.0) -> TableDenoiser:
    g = torch.Generator().manual_seed(seed)
    logits = sharp * torch.randn(1, length, vocab - 1, generator=g, dtype=torch.float64)
    return TableDenoiser(logits.softmax(-1).float())


def dit_denoiser(length: int = 24, vocab: int = 9, n_blocks: int = 2, seed: int = 0):
    """A tiny bidirectional DiT behind the real MDLM (SUBS) denoiser, float64."""
    torch.manual_seed(seed)
    backbone = DiT(
        vocab_size=vocab, hidden_size=32, n_blocks=n_blocks, n_heads=4, max_length=length
    )
    for p in backbone.parameters():
        torch.nn.init.normal_(p, std=0.3)
    objective = SUBS(LogLinear(), mask_id=vocab - 1, vocab_size=vocab)
    return ModelDenoiser(backbone.double().eval(), objective)


class BlockCausalDenoiser:
    """A block-causal model built on a bidirectional DiT: block k (of `block` positions) sees
    blocks 0..k at every layer (BD3-LM's pattern), computed block by block with forward_span.
    Its span calls honour that pattern, so a prefix / dual cache must be exact on it."""

    def __init__(self, dit: DiT, block: int, mask_id: int) -> None:
        self.dit, self.block, self.mask_id = dit, block, mask_id
        self.block_size = block
        self.vocab_size = dit.vocab_size
        self.time_conditioned = False
        # its whole-canvas pass is block-causal too (block k sees canvas blocks 0..k as they are)
        self.capabilities = model_capabilities({"absorbing", "block_causal", "whole_canvas"}, False)
        self.supports_span_cache = True

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def init_cache(self, batch_size: int):
        return self.dit.init_cache(batch_size)

    def _run(self, x: Tensor, start: int, end: int, cache) -> Tensor:
        edges = list(range(start - start % self.block, end, self.block)) + [end]
        pieces = []
        for a, b in zip(edges[:-1], edges[1:]):
            a = max(a, start)
            pieces.append(self.dit.forward_span(x[:, a:b], a, cache))
        logits = torch.cat(pieces, 1)
        return subs_log_p_x0(logits.log_softmax(-1), x[:, start:end], self.mask_id)

    def log_p_x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self._run(x_t, 0, x_t.shape[1], self.dit.init_cache(x_t.shape[0]))

    def log_p_x0_span(self, x_t, t, start, end, cache, *, context="prefix", write=True):
        # the block pattern sees nothing right of a block, so `context` changes nothing here
        return self._run(x_t, start, end, cache)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def distinct_masked_states(trajectory: list[Tensor], mask_id: int) -> Tensor:
    """(B,) per row: distinct states holding a mask that the row went through."""
    rows = range(trajectory[0].shape[0])
    seen = [
        {tuple(x[b].tolist()) for x in trajectory if bool((x[b] == mask_id).any())} for b in rows
    ]
    return torch.tensor([len(s) for s in seen])


# ----------------------------------------------------------------------------- per-row caching


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_ddpm_cache_is_ddpm_token_for_token_with_per_row_work(batch: int) -> None:
    denoiser = table(10)
    ddpm = DDPMSampler(steps=300).sample(denoiser, batch, 10, generator=gen(batch))
    cached = DDPMCacheSampler(steps=300).sample(
        denoiser, batch, 10, generator=gen(batch), return_trajectory=True
    )
    assert torch.equal(ddpm.tokens, cached.tokens)
    assert ddpm.rows_evaluated == 300 * batch and ddpm.nfe == 300
    distinct = distinct_masked_states(cached.trajectory, denoiser.mask_id)
    assert cached.rows_evaluated <= int(distinct.sum())  # each row: once per distinct state
    assert cached.rows_evaluated / batch <= 10 + 1
    assert cached.nfe <= cached.rows_evaluated


def test_ddpm_cache_per_row_on_a_real_dit_with_prompt_infill_and_cfg() -> None:
    """A tiny DiT behind the MDLM denoiser: sub-batches give ddpm's tokens; CFG and fixed
    tokens work through the sub-batch (the rows' own conditioning masks)."""
    denoiser = dit_denoiser(length=12)
    fixed = torch.zeros(12, dtype=torch.bool)
    fixed[[5, 9]] = True
    kw = dict(
        prefix=torch.tensor([1, 2]),
        fixed_mask=fixed,
        fixed_values=torch.full((12,), 3),
        generator=None,
    )
    outs = {}
    for name, cls in (("ddpm", DDPMSampler), ("ddpm_cache", DDPMCacheSampler)):
        kw["generator"] = gen(7)
        outs[name] = cls(steps=60, cfg_scale=1.5).sample(denoiser, 6, 12, **kw)
    assert torch.equal(outs["ddpm"].tokens, outs["ddpm_cache"].tokens)
    tokens = outs["ddpm_cache"].tokens
    assert bool((tokens[:, :2] == torch.tensor([1, 2])).all() and (tokens[:, [5, 9]] == 3).all())
    # 8 free positions: at most 9 states per row, two passes (CFG) each
    assert outs["ddpm_cache"].rows_evaluated <= 6 * 9 * 2 < outs["ddpm"].rows_evaluated


def test_first_hitting_evaluates_each_row_once_per_token() -> None:
    """Rows with more fixed tokens finish first and are not evaluated after that."""
    denoiser = table(8)
    fixed = torch.zeros(3, 8, dtype=torch.bool)
    fixed[1, :3] = True
    fixed[2, :6] = True
    out = FirstHittingSampler().sample(
        denoiser, 3, 8, generator=gen(), fixed_mask=fixed, fixed_values=torch.zeros(3, 8)
    )
    assert out.nfe == 8 and out.rows_evaluated == 8 + 5 + 2  # one call per unmasked token
    assert [len(x) for x in denoiser.inputs] == [3] * 2 + [2] * 3 + [1] * 3


def test_semi_ar_windows_are_cached_per_row() -> None:
    denoiser = table(12)
    plain = SemiARSampler(steps=100, stride_length=4, cache=False).sample(
        denoiser, 5, 8, generator=gen()
    )
    cached = SemiARSampler(steps=100, stride_length=4).sample(
        denoiser, 5, 8, generator=gen(), return_trajectory=True
    )
    assert torch.equal(plain.tokens, cached.tokens)
    assert plain.rows_evaluated == 2 * 100 * 5
    assert cached.rows_evaluated <= 5 * (9 + 5)  # window 1: <= 8 + 1 states, window 2: <= 4 + 1


# ----------------------------------------------------------------------------- parallel decoding


def test_count_rules_by_hand() -> None:
    scores = torch.tensor([[0.95, 0.5, 0.91, -math.inf], [0.2, 0.3, -math.inf, -math.inf]])
    assert threshold_counts(scores, 0.9).tolist() == [2, 1]  # none above: the best one anyway
    # factor 1: c_(1)=.95 >= 1/2, c_(2)=.91 >= 2/3, c_(3)=.5 < 3/4 -> 2; row 2: .3 < 1/2 -> 1
    assert factor_counts(scores, 1.0).tolist() == [2, 1]
    ent = torch.tensor([[0.05, 0.3, 0.02, math.inf], [0.5, 0.6, 0.7, 0.01]])
    # sorted 0.02, 0.05, 0.3: sums minus max 0, 0.02, 0.07 -> 3 under 0.1;
    # row 2: 0.01, 0.5, 0.6: 0, 0.01, 0.51 -> 2
    assert eb_counts(ent, 0.1).tolist() == [3, 2]
    assert eb_counts(ent, 0.0).tolist() == [1, 1]


def test_threshold_commits_every_token_above_it_and_at_least_one() -> None:
    """Greedy, so each position's confidence is its table's max: every step must commit the
    block's candidates with max p >= threshold, or exactly the single best if none is."""
    denoiser = table(16, sharp=3.0, seed=2)
    best = denoiser.probs[0].max(-1).values  # (L,)
    sampler = ConfidenceSampler(block_length=8, threshold=0.6, temperature=0.0)
    out = sampler.sample(denoiser, 2, 16, generator=gen(), return_trajectory=True)
    mask = denoiser.mask_id
    for before, after in zip(out.trajectory[:-1], out.trajectory[1:]):
        for b in range(2):
            masked = (before[b] == mask).nonzero().flatten()
            block = int(masked.min()) // 8 if len(masked) else None
            if block is None:
                continue
            cand = [int(i) for i in masked if int(i) // 8 == block]
            new = [i for i in range(16) if before[b, i] == mask and after[b, i] != mask]
            above = [i for i in cand if float(best[i]) >= 0.6]
            expect = above or [max(cand, key=lambda i: float(best[i]))]
            assert sorted(new) == sorted(expect)
    steps_plain = ConfidenceSampler(steps=16, block_length=8, temperature=0.0).sample(
        denoiser, 2, 16, generator=gen()
    )
    assert steps_plain.nfe == 16 and out.nfe < steps_plain.nfe


@pytest.mark.parametrize(
    "kwargs", [dict(threshold=0.7), dict(factor=1.0), dict(strategy="eb", eb_gamma=0.5)]
)
def test_adaptive_rules_commit_at_least_one_token_per_step(kwargs) -> None:
    denoiser = table(12, seed=3)
    out = ConfidenceSampler(block_length=4, **kwargs).sample(
        denoiser, 4, 12, generator=gen(), return_trajectory=True
    )
    mask = denoiser.mask_id
    for before, after in zip(out.trajectory[:-1], out.trajectory[1:]):
        for b in range(4):
            if bool((before[b] == mask).any()):
                assert int(((before[b] == mask) & (after[b] != mask)).sum()) >= 1
    assert not bool((out.tokens == mask).any()) and out.nfe <= 12


# ----------------------------------------------------------------------------- KV caches


def _rotated_qkv(blk, z: Tensor, ang: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k (rotated by `ang` (n, D)) and v (B, H, n, D) of block `blk` from its input z."""
    B, n, C = z.shape
    H = blk.n_heads
    D = C // H
    q, k, v = blk.qkv(z).view(B, n, 3, H, D).permute(2, 0, 3, 1, 4)
    c, s = ang.cos(), ang.sin()
    q, k = (t * c + torch.cat([-t[..., D // 2 :], t[..., : D // 2]], -1) * s for t in (q, k))
    return q, k, v


def _finish_block(blk, cond: Tensor, h: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The rest of block `blk` after q, k, v: softmax attention, gated residuals, MLP."""
    B, n, C = h.shape
    _, _, g1, s2, c2, g2 = blk.adaLN(cond).chunk(6, dim=-1)
    att = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v
    out = h + g1[:, None] * blk.proj(att.transpose(1, 2).reshape(B, n, C))
    return out + g2[:, None] * blk.mlp(modulate(blk.norm2(out), s2, c2))


def hybrid_forward(model: DiT, x_ref: Tensor, x: Tensor, a: int, b: int) -> Tensor:
    """The approximation the span cache makes, written independently: logits (B, b - a, V) of
    x[:, a:b] whose queries see their own span's keys/values (from x) and every other
    position's keys/values as computed from the full forward of x_ref (the refresh state)."""
    B, L = x.shape
    ang = torch.cat(
        [torch.outer(torch.arange(L, dtype=torch.float64), model.rotary.inv_freq)] * 2, -1
    )
    h_ref, h = model.embed(x_ref), model.embed(x[:, a:b])
    cond = model._condition(None, B)
    for blk in model.blocks:
        s1, c1 = blk.adaLN(cond).chunk(6, dim=-1)[:2]
        q_r, k_r, v_r = _rotated_qkv(blk, modulate(blk.norm1(h_ref), s1, c1), ang)
        q_s, k_s, v_s = _rotated_qkv(blk, modulate(blk.norm1(h), s1, c1), ang[a:b])
        k_mix = torch.cat([k_r[:, :, :a], k_s, k_r[:, :, b:]], 2)
        v_mix = torch.cat([v_r[:, :, :a], v_s, v_r[:, :, b:]], 2)
        h = _finish_block(blk, cond, h, q_s, k_mix, v_mix)
        h_ref = _finish_block(blk, cond, h_ref, q_r, k_r, v_r)
    return model.final(h, cond)


def refreshed_block_log_p(sampler, model, x_ref, x, lo, hi):
    cache = model.init_cache(x.shape[0])
    t = torch.full((x.shape[0],), 0.5)
    sampler._block_log_p(model, x_ref, t, lo, hi, cache, first=True)
    return sampler._block_log_p(model, x, t, lo, hi, cache, first=False)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@torch.no_grad()
def test_span_cache_is_exact_on_a_block_causal_model(cache: str, caplog) -> None:
    dit = tiny_dit(max_length=16)
    denoiser = BlockCausalDenoiser(dit, block=4, mask_id=VOCAB - 1)
    model = GuidedDenoiser(denoiser, torch.zeros(2, 16, dtype=torch.bool))
    g = torch.Generator().manual_seed(0)
    x_ref = torch.randint(0, VOCAB - 1, (2, 16), generator=g)
    x_ref[:, 8:] = VOCAB - 1  # blocks 2, 3 masked: block 2 is being decoded
    x = x_ref.clone()
    x[:, 9] = 3  # a token committed since the refresh
    sampler = ConfidenceSampler(block_length=4, cache=cache)
    cached = refreshed_block_log_p(sampler, model, x_ref, x, 8, 12)
    uncached = denoiser.log_p_x0(x, None)[:, 8:12]
    assert torch.equal(cached, uncached)
    none = ConfidenceSampler(block_length=4, temperature=0.7, steps=8)
    with_cache = ConfidenceSampler(block_length=4, temperature=0.7, steps=8, cache=cache)
    a = none.sample(denoiser, 3, 16, generator=gen(5))
    with caplog.at_level("WARNING"):
        b = with_cache.sample(denoiser, 3, 16, generator=gen(5))
    assert torch.equal(a.tokens, b.tokens)
    assert "approximation" not in caplog.text  # exact here, and the sampler knows it


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@torch.no_grad()
def test_span_cache_on_a_bidirectional_model_is_the_predicted_approximation(cache: str) -> None:
    """What the cache changes on a bidirectional DiT, documented as a test:
    - at the block's first step (x = refresh state) it is exact;
    - later, the span's queries see keys/values of the other positions from the refresh
      state (prefix: span = [lo, L), the finished blocks stale; dual: span = [lo, hi), the
      masked suffix stale too) — `hybrid_forward`, written independently, predicts it;
    - with a single layer it is exact (layer-0 keys/values depend on the token alone and the
      stale positions did not change); with two it is not."""
    denoiser = dit_denoiser(length=16, vocab=VOCAB)
    model = GuidedDenoiser(denoiser, torch.zeros(2, 16, dtype=torch.bool))
    g = torch.Generator().manual_seed(1)
    x_ref = torch.randint(0, VOCAB - 1, (2, 16), generator=g)
    x_ref[:, 8:] = VOCAB - 1
    x = x_ref.clone()
    x[:, 9] = 3
    sampler = ConfidenceSampler(block_length=4, cache=cache)
    first = refreshed_block_log_p(sampler, model, x_ref, x_ref, 8, 12)
    torch.testing.assert_close(first, denoiser.log_p_x0(x_ref, None)[:, 8:12], rtol=0, atol=1e-10)
    cached = refreshed_block_log_p(sampler, model, x_ref, x, 8, 12)
    hi = 16 if cache == "prefix" else 12
    predicted = hybrid_forward(denoiser.backbone, x_ref, x, 8, hi)[:, :4]
    predicted = denoiser.objective.log_p_x0(predicted, x[:, 8:12])  # SUBS: mask column out
    predicted = subs_log_p_x0(predicted, x[:, 8:12], VOCAB - 1)
    torch.testing.assert_close(cached, predicted, rtol=0, atol=1e-10)
    exact = denoiser.log_p_x0(x, None)[:, 8:12]
    assert not torch.allclose(cached, exact, atol=1e-6)  # two layers: an approximation
    one_layer = dit_denoiser(length=16, vocab=VOCAB, n_blocks=1)
    model1 = GuidedDenoiser(one_layer, torch.zeros(2, 16, dtype=torch.bool))
    cached1 = refreshed_block_log_p(sampler, model1, x_ref, x, 8, 12)
    if cache == "prefix":  # only the prefix, unchanged since the refresh, is stale
        torch.testing.assert_close(
            cached1, one_layer.log_p_x0(x, None)[:, 8:12], rtol=0, atol=1e-10
        )


def test_cache_logs_a_warning_on_a_bidirectional_model(caplog) -> None:
    with caplog.at_level("WARNING"):
        ConfidenceSampler(block_length=4, steps=4, cache="prefix").sample(
            dit_denoiser(length=8, vocab=VOCAB), 1, 8, generator=gen()
        )
    assert "approximation" in caplog.text


def test_cache_refused_without_a_span_cache() -> None:
    with pytest.raises(ValueError, match="sampler.cache=none"):
        ConfidenceSampler(block_length=4, steps=4, cache="dual").sample(table(8), 1, 8)


# ----------------------------------------------------------------------------- ReMDM


@pytest.mark.parametrize("schedule", ["cap", "rescale"])
def test_remdm_eta_zero_is_ddpm(schedule: str) -> None:
    denoiser = table(10)
    base = DDPMSampler(steps=50, top_p=0.9).sample(denoiser, 4, 10, generator=gen(3))
    remdm = ReMDMSampler(steps=50, schedule=schedule, eta=0.0, top_p=0.9)
    assert torch.equal(remdm.sample(denoiser, 4, 10, generator=gen(3)).tokens, base.tokens)


def test_remdm_loop_eta_zero_is_ddpm_on_the_loop_schedule() -> None:
    """eta = 0 in the loop schedule is ancestral sampling with alpha held over [t_off, t_on]."""
    sampler = ReMDMSampler(steps=40, schedule="loop", eta=0.0, t_on=0.5, t_off=0.1)
    times = sampler.model_times()
    grid = torch.linspace(1.0, 0.0, 41, dtype=torch.float64)

    class Reparametrised(TableDenoiser):
        def alpha(self, t: Tensor) -> Tensor:  # ddpm's uniform t -> the loop's model time
            i = (1.0 - t.double()) * 40
            return (1.0 - times[i.round().long()]).to(t.dtype)

    denoiser = table(10)
    moved = Reparametrised(denoiser.probs)
    base = DDPMSampler(steps=40).sample(moved, 3, 10, generator=gen(1))
    assert torch.equal(sampler.sample(denoiser, 3, 10, generator=gen(1)).tokens, base.tokens)
    assert torch.equal(times[grid >= 0.5], grid[grid >= 0.5])
    assert bool((times[(grid < 0.5) & (grid >= 0.1)] == 0.5).all())


def test_remdm_step_probabilities_by_hand() -> None:
    """alpha_t = 0.4, alpha_s = 0.6, sigma = 0.2: masked -> v with (0.6 - 0.8 * 0.4) / 0.6
    = 7/15 (split by p(x0)), stays masked 8/15; clean -> mask with 0.2."""
    n = 200_000
    log_p = torch.tensor([0.25, 0.75, 0.0]).log().expand(n, 2, 3)
    x_t = torch.tensor([[2, 1]]).expand(n, 2)
    a_t, a_s, sig = torch.full((n,), 0.4), torch.full((n,), 0.6), torch.full((n,), 0.2)
    protected = torch.zeros(n, 2, dtype=torch.bool)
    x_s = remdm_step(log_p, x_t, a_t, a_s, sig, protected, gen(), 2)
    freq = torch.bincount(x_s[:, 0], minlength=3).double() / n
    expected = torch.tensor([0.25 * 7 / 15, 0.75 * 7 / 15, 8 / 15], dtype=torch.float64)
    torch.testing.assert_close(freq, expected, atol=5e-3, rtol=0)
    assert abs(float((x_s[:, 1] == 2).double().mean()) - 0.2) < 5e-3
    kept = remdm_step(log_p, x_t, a_t, a_s, sig, torch.ones(n, 2, dtype=torch.bool), gen(), 2)
    assert bool((kept[:, 1] == 1).all())  # protected tokens are never remasked
    assert float(sigma_max(torch.tensor([0.4]), torch.tensor([0.6]))) == pytest.approx(1.0)
    assert float(sigma_max(torch.tensor([0.8]), torch.tensor([0.9]))) == pytest.approx(0.125)


def test_remdm_remasks_and_still_finishes() -> None:
    denoiser = table(10)
    out = ReMDMSampler(steps=60, schedule="rescale", eta=0.5).sample(
        denoiser, 4, 10, generator=gen(), return_trajectory=True
    )
    mask = denoiser.mask_id
    remasked = any(
        bool(((a != mask) & (b == mask)).any()) for a, b in zip(out.trajectory, out.trajectory[1:])
    )
    assert remasked and not bool((out.tokens == mask).any())


# ----------------------------------------------------------------------------- conditioning


NEW_OPTIONS = {
    "threshold": lambda: ConfidenceSampler(block_length=4, threshold=0.5, cfg_scale=0.5),
    "factor": lambda: ConfidenceSampler(block_length=4, factor=1.0, cfg_scale=0.5),
    "eb": lambda: ConfidenceSampler(block_length=4, strategy="eb", cfg_scale=0.5),
    "prefix_cache": lambda: ConfidenceSampler(
        steps=8, block_length=4, cache="prefix", cfg_scale=0.5
    ),
    "dual_cache": lambda: ConfidenceSampler(
        block_length=4, cache="dual", threshold=0.3, cfg_scale=0.5
    ),
    "remdm_cap": lambda: ReMDMSampler(steps=20, eta=0.3, cfg_scale=0.5),
    "remdm_rescale": lambda: ReMDMSampler(steps=20, schedule="rescale", eta=0.5, cfg_scale=0.5),
    "remdm_loop": lambda: ReMDMSampler(
        steps=20, schedule="loop", eta=0.3, cache=True, cfg_scale=0.5
    ),
}


@pytest.mark.parametrize("name", NEW_OPTIONS)
def test_prompt_infill_and_cfg_with_every_new_option(name: str) -> None:
    denoiser = dit_denoiser(length=16, vocab=VOCAB)
    fixed = torch.zeros(16, dtype=torch.bool)
    fixed[[7, 12, 15]] = True
    out = NEW_OPTIONS[name]().sample(
        denoiser,
        3,
        16,
        prefix=torch.tensor([4, 3, 2]),
        generator=gen(),
        return_trajectory=True,
        fixed_mask=fixed,
        fixed_values=torch.full((16,), 1),
    )
    assert not bool((out.tokens == denoiser.mask_id).any())
    for x in out.trajectory:
        assert x[:, :3].tolist() == [[4, 3, 2]] * 3
        assert bool((x[:, [7, 12, 15]] == 1).all())
    assert out.nfe % 2 == 0  # CFG: every conditional pass has its unconditional twin
