"""BD3-LM: the block-causal mask by hand, the two limits (block 1 = AR, block L = SUBS), the
clipped schedule and its data-driven choice, the block sampler's exact cache, its exactness
on a toy distribution with block structure, EOS stopping and arbitrary length, and main.py
end to end."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor

from diffusion.noise import Clipped, LogLinear
from diffusion.objectives.ar import AR
from diffusion.objectives.bd3lm import (
    BD3LM,
    block_diff_mask,
    block_diff_rule,
    clip_search_grid,
)
from diffusion.objectives.subs import SUBS
from models.dit import DiT
from samplers.base import model_capabilities
from samplers.block import BlockSampler
from tests.test_main_e2e import ROOT, run_main
from tests.test_samplers import (
    L_TOY,
    MASK,
    N_EXACT,
    NUM_TOKENS,
    ExactDenoiser,
    empirical,
    toy_distribution,
    tv,
    tv_bound,
)

V = 12  # toy vocabulary of the DiT tests; mask id V - 1


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_dit(length: int, seed: int = 0, causal: bool = False) -> DiT:
    """A float64 DiT with every weight random (no zero-initialised gates or head)."""
    torch.manual_seed(seed)
    net = DiT(V, hidden_size=32, n_blocks=2, n_heads=2, max_length=length, cond_dim=16)
    net = net.double().eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    net.causal = causal
    return net


class FixedLogits(torch.nn.Module):
    """A fake backbone: fixed (B, 2L, V) logits, recording what it is called with."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x_t, sigma=None, attention_mask=None, attn_mask=None, positions=None):
        self.seen, self.attn_mask, self.positions = x_t, attn_mask, positions
        return self.logits[:, : x_t.shape[1]].clone()


# ----------------------------------------------------------------------------- the mask

HAND_MASK_L8_B2 = [  # rows: queries x_t 0..7 then x_0 0..7; columns: keys in the same order
    "1100000000000000",
    "1100000000000000",
    "0011000011000000",
    "0011000011000000",
    "0000110011110000",
    "0000110011110000",
    "0000001111111100",
    "0000001111111100",
    "0000000011000000",
    "0000000011000000",
    "0000000011110000",
    "0000000011110000",
    "0000000011111100",
    "0000000011111100",
    "0000000011111111",
    "0000000011111111",
]


def test_block_causal_mask_matches_the_hand_written_one() -> None:
    hand = torch.tensor([[c == "1" for c in row] for row in HAND_MASK_L8_B2])
    assert torch.equal(block_diff_mask(8, 2), hand)
    # the FlexAttention mask_mod evaluates the same rule index by index
    q = torch.arange(16)[:, None].expand(16, 16)
    k = torch.arange(16)[None, :].expand(16, 16)
    assert torch.equal(block_diff_rule(q, k, 8, 2), hand)


def test_block_one_is_the_causal_mask_and_block_length_the_bidirectional_one() -> None:
    L = 6
    m1 = block_diff_mask(L, 1)
    tri = torch.ones(L, L, dtype=torch.bool).tril()
    assert torch.equal(m1[L:, L:], tri)  # x_0 half: causal
    assert torch.equal(m1[:L, L:], tri.tril(-1))  # x_t token i sees x_0 < i
    assert torch.equal(m1[:L, :L], torch.eye(L, dtype=torch.bool))  # and itself
    mL = block_diff_mask(L, L)
    assert bool(mL[:L, :L].all()) and not bool(mL[:L, L:].any())  # MDLM: x_t only


# ----------------------------------------------------------------------------- the limits


def test_block_length_equals_subs_on_the_same_draws() -> None:
    L = 8
    net = random_dit(L)
    x0 = torch.randint(0, V - 1, (5, L), generator=gen(1))
    attn = torch.ones_like(x0)
    bd3 = BD3LM(LogLinear(), V - 1, V, block_size=L)
    subs = SUBS(LogLinear(), V - 1, V)
    for mode in ("train", "eval"):
        bd3.train(mode == "train")
        subs.train(mode == "train")
        a = bd3.loss(net, x0, attn, gen(7))
        b = subs.loss(net, x0, attn, gen(7))
        assert torch.allclose(a.nll, b.nll, atol=1e-5), (a.nll - b.nll).abs().max()
        assert torch.equal(a.mask, b.mask)
        assert float(a.nll.detach().sum()) > 0


def test_block_one_is_the_ar_loss_of_the_same_logits() -> None:
    B, L = 3, 6
    g = gen(2)
    logits = torch.randn(B, 2 * L, V, generator=g)
    logits[..., V - 1] = -1e9  # the mask id carries no mass, as in AR's softmax over real tokens
    x0 = torch.randint(0, V - 1, (B, L), generator=g)
    attn = torch.ones_like(x0)
    bd3 = BD3LM(LogLinear(), V - 1, V, block_size=1).eval()  # evaluation: t = 1, weight 1
    fake = FixedLogits(logits)
    out = bd3.loss(fake, x0, attn, gen(0))
    assert bool((fake.seen[:, :L] == V - 1).all()) and torch.equal(fake.seen[:, L:], x0)
    assert torch.equal(fake.positions, torch.arange(L).repeat(2))
    assert bd3.exact_likelihood  # block 1 is AR: the NLL is exact
    # AR on the same logits: its position i - 1 is our position i (both see x0[< i])
    ar = AR(V - 1, V)  # FixedLogits has no lean head: AR scores its full logits
    shifted = FixedLogits(logits[:, 1:L].repeat(1, 2, 1))
    ar_out = ar.loss(shifted, x0, attn)
    assert torch.allclose(out.nll[:, 1:], ar_out.nll, atol=1e-5)


def test_block_one_network_is_autoregressive() -> None:
    """With every x_t token masked, position i's output depends on x0[< i] only."""
    L = 6
    net = random_dit(L)
    bd3 = BD3LM(LogLinear(), V - 1, V, block_size=1)
    x0 = torch.randint(0, V - 1, (1, L), generator=gen(3))
    masks = torch.full_like(x0, V - 1)
    ones = torch.ones_like(x0)
    base = bd3.backbone_logits(net, masks, x0, ones)
    for i in range(L):
        changed = x0.clone()
        changed[:, i:] = (changed[:, i:] + 1) % (V - 1)
        other = bd3.backbone_logits(net, masks, changed, ones)
        assert torch.allclose(other[:, : i + 1], base[:, : i + 1], atol=1e-12)
        if i + 1 < L:
            assert not torch.allclose(other[:, i + 1 :], base[:, i + 1 :])


def test_time_is_drawn_per_block_and_stratified() -> None:
    bd3 = BD3LM(LogLinear(), V - 1, V, block_size=4)
    t = bd3.sample_block_t(3, 5, torch.device("cpu"), gen(0))  # (3, 5)
    assert t.shape == (3, 5)
    u = ((t - bd3.sampling_eps) / (1 - bd3.sampling_eps)).flatten().sort().values
    strata = torch.floor(u * 15).long()
    assert torch.equal(strata, torch.arange(15))  # one time per stratum of the 15 blocks
    rows = bd3.sample_block_t(2, 5, torch.device("cpu"), gen(0), rows=(torch.tensor([2, 0]), 3))
    assert torch.equal(rows, t[[2, 0]])  # a row's times do not depend on the batch split


def test_bd3lm_refuses_conditioning_and_non_dit_backbones() -> None:
    with pytest.raises(ValueError, match="mask_conditioning=false"):
        BD3LM(LogLinear(), V - 1, V, block_size=4, mask_conditioning=True)
    with pytest.raises(ValueError, match="time_conditioning=false"):
        BD3LM(LogLinear(), V - 1, V, block_size=4, time_conditioning=True)

    class Plain(torch.nn.Module):
        def forward(self, x_t, sigma=None, attention_mask=None):
            return torch.zeros(*x_t.shape, V)

    bd3 = BD3LM(LogLinear(), V - 1, V, block_size=2)
    with pytest.raises(ValueError, match="attn_mask and positions"):
        bd3.loss(Plain(), torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4))


# ----------------------------------------------------------------------------- clipping


def test_clipped_schedule_rates_and_weight() -> None:
    noise = Clipped(beta=0.3, omega=0.8)
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(noise.move_chance(t), torch.tensor([0.3, 0.55, 0.8]))
    # BD3-LM's weight 1 / rate (not the restricted integral's (omega - beta) / rate, which
    # scales each interval's variance by its width squared and tilts the search)
    assert torch.allclose(noise.loss_weight(t), 1 / torch.tensor([0.3, 0.55, 0.8]))
    bd3 = BD3LM(noise, V - 1, V, block_size=4)
    rate, weight = bd3.rate_and_weight(t, (0.3, 0.8))
    assert torch.allclose(rate, noise.move_chance(t)) and torch.allclose(weight, 1 / rate)
    assert torch.allclose(1 - noise.alpha(t), noise.move_chance(t))
    with pytest.raises(ValueError, match="noise.beta"):
        Clipped(beta=0.8, omega=0.3)


def test_clipped_training_evaluates_on_the_full_schedule() -> None:
    """Training masks at rates in [beta, omega]; evaluation integrates over all of [eps, 1]."""
    L = 64
    x0 = torch.randint(0, V - 1, (64, L), generator=gen(0))
    fake = FixedLogits(torch.zeros(64, 2 * L, V))
    bd3 = BD3LM(Clipped(beta=0.4, omega=0.6), V - 1, V, block_size=L)
    assert isinstance(bd3.noise, LogLinear)  # samplers and evaluation see the full schedule
    bd3.train()
    bd3.loss(fake, x0, torch.ones_like(x0), gen(1))
    frac = (fake.seen[:, :L] == V - 1).double().mean(1)
    assert 0.25 < float(frac.min()) and float(frac.max()) < 0.75
    bd3.eval()
    bd3.loss(fake, x0, torch.ones_like(x0), gen(1))
    frac = (fake.seen[:, :L] == V - 1).double().mean(1)
    assert float(frac.min()) < 0.1 and float(frac.max()) > 0.9


def test_resample_keeps_every_block_inside_the_interval_with_its_conditional_law() -> None:
    """BD3-LM's training.resample: with [0.4, 0.6] and blocks of 4, every training block has
    exactly 2 of 4 tokens masked (the only fraction inside), the 6 arrangements equally
    often (rejection sampling keeps the rate's law given the count); without it the counts
    vary. An interval no fraction k / 4 reaches is refused; evaluation never resamples."""
    L, B = 16, 600
    x0 = torch.randint(0, V - 1, (B, L), generator=gen(0))
    fake = FixedLogits(torch.zeros(B, 2 * L, V))

    def block_counts(bd3) -> Tensor:
        bd3.loss(fake, x0, torch.ones_like(x0), gen(1))
        masked = (fake.seen[:, :L] == V - 1).view(B, L // 4, 4)
        return masked

    bd3 = BD3LM(Clipped(beta=0.4, omega=0.6), V - 1, V, block_size=4, resample=True).train()
    masked = block_counts(bd3)
    assert bool((masked.sum(-1) == 2).all())
    patterns = (masked.long() * torch.tensor([8, 4, 2, 1])).sum(-1).flatten()
    freq = torch.bincount(patterns, minlength=16)[[3, 5, 6, 9, 10, 12]].double() / len(patterns)
    assert float((freq - 1 / 6).abs().max()) < 0.03  # 2400 blocks: sd of a share ~ 0.008
    plain = BD3LM(Clipped(beta=0.4, omega=0.6), V - 1, V, block_size=4).train()
    assert len(set(block_counts(plain).sum(-1).flatten().tolist())) > 2
    # an upper bound only (beta at sampling_eps, BD3-LM's edge rule): no block above 1 / 2
    upper = BD3LM(Clipped(beta=1e-3, omega=0.5), V - 1, V, block_size=4, resample=True).train()
    counts = block_counts(upper).sum(-1)
    assert int(counts.max()) <= 2 and int((counts == 0).sum()) > 0
    narrow = BD3LM(Clipped(beta=0.3, omega=0.45), V - 1, V, block_size=4, resample=True).train()
    with pytest.raises(ValueError, match=r"no masked fraction k / 4 .* \[0.3, 0.45\]"):
        block_counts(narrow)
    bd3.eval()  # evaluation: the full schedule, nothing redrawn
    assert len(set(block_counts(bd3).sum(-1).flatten().tolist())) > 2


def test_clip_search_grid_by_hand() -> None:
    eps = 1e-3
    assert clip_search_grid([0.5], 0.25, eps) == [(eps, 1.0), (eps, 0.5), (0.25, 0.75), (0.5, 1.0)]


def test_var_min_trains_on_the_lowest_variance_interval() -> None:
    L = 16
    net = random_dit(L)
    bd3 = BD3LM(
        LogLinear(),
        V - 1,
        V,
        block_size=4,
        var_min=True,
        clip_search_widths=[0.5],
        clip_search_delta=0.25,
    )
    assert bd3.training_clip() is None  # nothing measured yet: the full schedule
    bd3.train()
    x_warm = torch.randint(0, V - 1, (2, L), generator=gen(5))
    bd3.loss(net, x_warm, torch.ones_like(x_warm), gen(5))  # a training step came first
    bd3.eval()
    x0 = torch.randint(0, V - 1, (8, L), generator=gen(0))
    with torch.no_grad():
        for _ in range(3):
            bd3.loss(net, x0, torch.ones_like(x0), gen(1))
    variances = bd3.clip_variances()
    assert set(variances) == set(bd3.clip_grid) and all(v > 0 for v in variances.values())
    best = min(variances, key=variances.get)
    bd3.train()
    assert bd3.training_clip() == pytest.approx(best)
    assert "clip" in dict(bd3.named_buffers())  # saved with the checkpoint
    bd3.clip.copy_(torch.tensor([0.3, 0.8], dtype=torch.float64))
    bd3.to(torch.bfloat16)  # Lightning's bf16-true: the interval is not rounded
    assert bd3.clip.dtype == torch.float64 and bd3.clip.tolist() == [0.3, 0.8]


# ----------------------------------------------------------------------------- the block sampler


def recording(denoiser):
    """Wrap `log_p_x0_span` to record every noisy-block call: (canvas, start, end, log_p)."""
    calls = []
    inner = denoiser.log_p_x0_span

    def span(x_t, t, start, end, cache, **kw):
        out = inner(x_t, t, start, end, cache, **kw)
        if not kw.get("write", True):
            calls.append((x_t.clone(), start, end, out))
        return out

    denoiser.log_p_x0_span = span
    return calls


@pytest.mark.parametrize("max_length", [None, 20])
def test_block_sampler_cached_logits_equal_a_full_recomputation(max_length) -> None:
    L, block = 12, 4
    net = random_dit(L)
    bd3 = BD3LM(LogLinear(), V - 1, V, block_size=block).eval()
    denoiser = bd3.denoiser(net)
    calls = recording(denoiser)
    out = BlockSampler(steps=4, max_length=max_length).sample(denoiser, 3, L, generator=gen(0))
    assert out.tokens.shape == (3, max_length or L) and bool((out.tokens != V - 1).all())
    assert len(calls) >= (max_length or L) // block
    for canvas, start, end, cached in calls:
        full_canvas = canvas.clone()
        full_canvas[:, end:] = V - 1  # nothing after the block exists yet
        assert bool((full_canvas[:, :start] != V - 1).all())  # finished blocks are clean
        full = type(denoiser).log_p_x0(denoiser, full_canvas, torch.ones(3))[:, start:end]
        assert torch.equal(cached > -1e5, full > -1e5)
        real = cached > -1e5
        assert float((cached[real] - full[real]).abs().max()) <= 1e-10


class BlockToyDenoiser(ExactDenoiser):
    """The toy distribution with block structure: a span's log p(x0 | x_t) given only the
    prefix committed to the cache (clean) and the span's own visible tokens; positions after
    the span are unknown. Checks the sampler never relies on what it did not commit."""

    block_size = 2
    supports_span_cache = True

    def __init__(self) -> None:
        super().__init__()
        self.capabilities = model_capabilities({"absorbing", "block_causal"}, False)

    def init_cache(self, batch_size: int) -> dict:
        return {"prefix": torch.full((batch_size, L_TOY), MASK), "length": 0}

    def log_p_x0_span(self, x_t, t, start, end, cache, *, context="prefix", write=True):
        assert context == "prefix" and cache["length"] == start
        self.calls += 1
        canvas = cache["prefix"].clone()
        canvas[:, start:end] = x_t[:, start:end]
        index = (canvas * (NUM_TOKENS + 1) ** torch.arange(L_TOY - 1, -1, -1)).sum(-1)  # (B,)
        post = self.table[index][:, start:end, :NUM_TOKENS]  # (B, n, 3) tabulated posterior
        if write:
            assert bool((x_t[:, start:end] != MASK).all()), "a block was cached unfinished"
            cache["prefix"][:, start:end] = x_t[:, start:end]
            cache["length"] = end
        return torch.cat([post, torch.full_like(post[..., :1], -torch.inf)], -1)


class Forgetful(BlockToyDenoiser):
    """A block model that ignores the prefix (independent blocks): the wrong twin."""

    def log_p_x0_span(self, x_t, t, start, end, cache, *, context="prefix", write=True):
        if write:
            return super().log_p_x0_span(x_t, t, start, end, cache, write=True)
        saved = cache["prefix"].clone()
        cache["prefix"][:] = MASK
        out = super().log_p_x0_span(x_t, t, start, end, cache, write=False)
        cache["prefix"][:] = saved
        return out


def test_block_sampler_matches_the_data_distribution() -> None:
    """Exact block by block: each block's ddpm errs only when both tokens unmask in one step."""
    steps = 50
    _, p = toy_distribution()
    out = BlockSampler(steps=steps).sample(BlockToyDenoiser(), N_EXACT, L_TOY, generator=gen(1))
    bias = (L_TOY // 2) * 1 / steps  # per block C(2, 2) / steps
    assert tv(empirical(out.tokens), p) < tv_bound(p, N_EXACT, bias)

    # a sampler that ignores the prefix (independent blocks) is caught by the same bound
    wrong = BlockSampler(steps=steps).sample(Forgetful(), N_EXACT, L_TOY, generator=gen(1))
    assert tv(empirical(wrong.tokens), p) > 2 * tv_bound(p, N_EXACT, bias)


def test_first_hitting_block_sampler_is_exact_with_one_call_per_token() -> None:
    """sampler.first_hitting (BD3-LM's default): one masked position per call, uniform, its
    value from p(x0 | x_t): exact (no step bias), n calls for a block of n masks plus the
    cache writes; a prefix-blind model is caught by the same bound."""
    _, p = toy_distribution()
    den = BlockToyDenoiser()
    sampler = BlockSampler(steps=3, first_hitting=True)  # steps unused: 3 would bias ddpm
    out = sampler.sample(den, N_EXACT, L_TOY, generator=gen(1))
    assert tv(empirical(out.tokens), p) < tv_bound(p, N_EXACT)
    blocks = L_TOY // BlockToyDenoiser.block_size
    assert out.nfe == L_TOY + blocks - 1  # a call per token, a write per finished block

    wrong = sampler.sample(Forgetful(), N_EXACT, L_TOY, generator=gen(1))
    assert tv(empirical(wrong.tokens), p) > 2 * tv_bound(p, N_EXACT)


def test_masked_position_is_uniform_over_a_rows_masks() -> None:
    from samplers.first_hitting import masked_position

    is_mask = torch.tensor([[True, False, True, True], [False] * 4])
    picks = [masked_position(is_mask, torch.tensor([(k + 0.5) / 3, 0.5]))[0][0] for k in range(3)]
    assert [int(p) for p in picks] == [0, 2, 3]  # the k-th third of [0, 1): the k-th mask
    assert masked_position(is_mask, torch.tensor([0.99, 0.5]))[1].tolist() == [True, False]


def test_first_hitting_block_sampler_on_a_bd3lm_dit_unmasks_one_token_per_call() -> None:
    L, block = 12, 4
    denoiser = BD3LM(LogLinear(), V - 1, V, block_size=block).eval().denoiser(random_dit(L))
    calls = recording(denoiser)
    out = BlockSampler(first_hitting=True).sample(denoiser, 3, L, generator=gen(0))
    assert bool((out.tokens != V - 1).all()) and len(calls) == L  # one noisy call per token
    for k, (canvas, start, end, _) in enumerate(calls):  # each call sees one mask fewer
        assert (start, end) == (k // block * block, k // block * block + block)
        assert (canvas[:, start:end] == V - 1).sum(1).tolist() == [block - k % block] * 3


def test_block_sampler_refuses_a_model_without_block_structure() -> None:
    with pytest.raises(ValueError, match="block_causal|block-causal"):
        BlockSampler(steps=4).sample(ExactDenoiser(), 2, L_TOY)
    den = BlockToyDenoiser()
    with pytest.raises(ValueError, match="sampler.block_size=4 differs"):
        BlockSampler(steps=4, block_size=4).sample(den, 2, L_TOY)


def test_block_sampler_stops_at_eos_and_pads_with_it() -> None:
    EOS = 1

    class EOSInSecondBlock(BlockToyDenoiser):
        def log_p_x0_span(self, x_t, t, start, end, cache, *, context="prefix", write=True):
            out = super().log_p_x0_span(x_t, t, start, end, cache, context=context, write=write)
            if start == 2:  # the second block is EOS, then anything
                out = torch.full_like(out, -torch.inf)
                out[:, 0, EOS] = 0.0
                out[:, 1, 0] = 0.0
            return out

    den = EOSInSecondBlock()
    sampler = BlockSampler(steps=8, eos_id=EOS, max_length=12)
    out = sampler.sample(den, 4, L_TOY, generator=gen(0))  # the toy cannot see past L_TOY:
    assert out.tokens.shape == (4, 12)  # it stopped, and the canvas keeps its width
    assert bool((out.tokens[:, 2:] == EOS).all())  # EOS from the first generated EOS on
    keep = BlockSampler(steps=8, eos_id=EOS, stop_at_eos=False).sample(
        den, 4, L_TOY, generator=gen(0)
    )
    assert bool((keep.tokens[:, 3] == 0).all())


class EOSAtRowStart(BlockToyDenoiser):
    """The toy, except that the rows in `eos_rows` start with EOS (id 1) and no other row or
    position ever draws it."""

    eos_rows: tuple[int, ...] = (0,)
    eos_batch: int | None = None  # only batches of this size (None: every batch)

    def log_p_x0_span(self, x_t, t, start, end, cache, *, context="prefix", write=True):
        out = super().log_p_x0_span(x_t, t, start, end, cache, context=context, write=write)
        out[..., 1] = -torch.inf
        if start == 0 and self.eos_batch in (None, x_t.shape[0]):
            for r in self.eos_rows:
                out[r] = -torch.inf
                out[r, 0, 1], out[r, 1, 0] = 0.0, 0.0
        return out


@pytest.mark.parametrize("eos_rows", [(0,), (0, 1)])
def test_block_sampler_keeps_fixed_tokens_after_eos(eos_rows) -> None:
    """An infilled (fixed) token after a row's EOS is conditioning, not output: it stays, and
    it is not cut off when every row stops early."""
    den = EOSAtRowStart()
    den.eos_rows = eos_rows
    fixed = torch.tensor([False, False, False, True])
    out = BlockSampler(steps=8, eos_id=1).sample(
        den, 2, L_TOY, generator=gen(0), fixed_mask=fixed, fixed_values=torch.tensor([0, 0, 0, 2])
    )
    assert out.tokens.shape == (2, L_TOY) and out.tokens[:, 3].tolist() == [2, 2]
    assert out.tokens[0, :3].tolist() == [1, 1, 1]  # EOS from the first generated one on
    assert bool((out.tokens != MASK).all())


def test_block_sampler_batches_that_stop_at_different_blocks_concatenate(tmp_path) -> None:
    """sample_eval draws several batches; early stopping must not change a batch's width."""
    from diffusion.evaluation.sampling import generate

    class Module:
        def to(self, device):
            return self

        def denoiser(self):
            return self.den

    class Decoder:
        def decode(self, tokens):
            return [" ".join(map(str, row)) for row in tokens.tolist()]

    module = Module()
    module.den = EOSAtRowStart()
    module.den.eos_rows, module.den.eos_batch = (0, 1), 2  # batch 1 stops in block 0, not 2
    sampler = BlockSampler(steps=8, eos_id=1, num_samples=3, batch_size=2)
    cfg = OmegaConf.create(
        {"model": {"length": L_TOY}, "eval": {"sample_seed": 0, "device": "cpu"},
         "trainer": {"accelerator": "cpu"}, "sampler": {"steps": 8}}
    )  # fmt: skip
    out = generate(cfg, Decoder(), module, sampler)
    assert out["tokens"].shape == (3, L_TOY) and len(out["texts"]) == 3


@pytest.mark.parametrize("max_length", [None, 20])
def test_block_sampler_guidance_masks_the_windows_prompt(max_length) -> None:
    """CFG with a prompt: the unconditional pass sees the window with its prompt masked (and a
    cache written from that), so its logits equal a full forward of the masked canvas."""
    L, block, P = 12, 4, 4
    net = random_dit(L)
    denoiser = BD3LM(LogLinear(), V - 1, V, block_size=block).eval().denoiser(net)
    calls = recording(denoiser)
    prefix = torch.tensor([1, 2, 3, 4])
    sampler = BlockSampler(steps=4, cfg_scale=1.5, max_length=max_length, stop_at_eos=False)
    out = sampler.sample(denoiser, 2, L, prefix=prefix, generator=gen(0))
    assert out.tokens.shape == (2, max_length or L)
    assert torch.equal(out.tokens[:, :P], prefix.expand(2, -1))
    uncond = [i for i, c in enumerate(calls) if bool((c[0][:, :P] == V - 1).all())]
    assert uncond  # one unconditional pass after each conditional one, prompt in the window
    if max_length is None:
        assert len(calls) == 2 * len(uncond)
    for i in uncond:
        canvas, start, end, cached = calls[i]
        cond_canvas = calls[i - 1][0]
        assert torch.equal(canvas[:, P:], cond_canvas[:, P:]) and calls[i - 1][1] == start
        full_canvas = canvas.clone()
        full_canvas[:, end:] = V - 1
        full = type(denoiser).log_p_x0(denoiser, full_canvas, torch.ones(2))[:, start:end]
        real = cached > -1e5
        assert torch.equal(real, full > -1e5)
        assert float((cached[real] - full[real]).abs().max()) <= 1e-10


def test_block_yaml_builds() -> None:
    sampler = instantiate(OmegaConf.load(ROOT / "configs" / "sampler" / "block.yaml"))
    assert sampler.name == "block" and sampler.block_size is None
    out = sampler.sample(BlockToyDenoiser(), 2, L_TOY, generator=gen())
    assert out.tokens.shape == (2, L_TOY) and bool((out.tokens < NUM_TOKENS).all())


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_bd3lm_end_to_end_train_ppl_eval_sample_eval(tmp_path) -> None:
    overrides = [
        "parameterization=bd3lm",
        "parameterization.block_size=4",
        "parameterization.var_min=true",
        "sampler=block",
    ]
    run_main(tmp_path / "train", *overrides)
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    run_main(tmp_path / "ppl", "mode=ppl_eval", f"eval.checkpoint_path={ckpt}", *overrides)
    stats = json.loads((tmp_path / "ppl" / "ppl_eval.json").read_text())
    assert stats["bound"] is True and stats["ppl"] > 1 and stats["parameterization"] == "BD3LM"
    run_main(
        tmp_path / "sample",
        "mode=sample_eval",
        f"eval.checkpoint_path={ckpt}",
        *overrides,
        "sampler.max_length=48",  # past the training length (32)
    )
    report = json.loads((tmp_path / "sample" / "sample_eval.json").read_text())
    assert report["num_samples"] == 2 and report["entropy"] > 0
    assert 4 <= report["length"] <= 48


@pytest.mark.gpu
def test_flex_attention_mask_equals_the_dense_one_on_cuda() -> None:
    """On CUDA the block-causal pattern runs through FlexAttention; same logits as SDPA's."""
    L = 64
    net = random_dit(L).float().cuda()
    x0 = torch.randint(0, V - 1, (2, L), device="cuda")
    x_t = torch.where(torch.rand(2, L, device="cuda") < 0.5, V - 1, x0)
    ones = torch.ones_like(x0)
    flex = BD3LM(LogLinear(), V - 1, V, block_size=8, attn_backend="flex")
    dense = BD3LM(LogLinear(), V - 1, V, block_size=8, attn_backend="sdpa")
    assert type(flex.attention_pattern(L, x0.device, padded=False)).__name__ == "BlockMask"
    with torch.no_grad():
        a = flex.backbone_logits(net, x_t, x0, ones)
        b = dense.backbone_logits(net, x_t, x0, ones)
    assert torch.allclose(a, b, atol=2e-3, rtol=1e-3), (a - b).abs().max()


def test_clipped_noise_is_refused_outside_bd3lm() -> None:
    """noise=clipped would make a SUBS evaluation integrate over [beta, omega] only: no bound."""
    with pytest.raises(ValueError, match="noise=clipped.*bd3lm"):
        SUBS(noise=Clipped(0.3, 0.8), mask_id=4, vocab_size=5)


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (["sampler=ddpm_cache"], True),  # the root default sampler
        (["sampler=ddpm"], True),
        (["sampler=first_hitting"], True),
        (["sampler=block"], False),
        (["sampler=confidence"], False),  # exact when its blocks align (checked at run time)
        (["sampler=ddpm_cache", "parameterization.block_size=128"], False),  # one block: MDLM
    ],
)
def test_whole_canvas_samplers_are_refused_below_one_block(overrides, refused) -> None:
    """With block_size < model.length a whole-canvas pass reads still-masked earlier blocks
    as clean context: such samplers are refused by name before anything is built."""
    from diffusion.config import ConfigError, validate_config
    from tests.test_bad_input import compose_cfg

    cfg = compose_cfg(["parameterization=bd3lm", "model.length=128", *overrides])
    if not refused:
        validate_config(cfg)
        return
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert "block_size >= model.length" in str(err.value)
    assert "sampler=block" in str(err.value)


@torch.no_grad()
def test_samplers_on_a_block_causal_denoiser_at_run_time() -> None:
    """The same rule on a built model: ddpm refused below one block, allowed at one block;
    the confidence sampler only when every model block starts one of its blocks (then the
    blocks before the one it decodes are clean, the case the block sampler's test shows to
    equal the exact cached pass)."""
    from samplers.base import CapabilityError
    from samplers.confidence import ConfidenceSampler
    from samplers.ddpm import DDPMSampler

    L = 16
    net = random_dit(L)
    small = BD3LM(LogLinear(), V - 1, V, block_size=4, length=L).eval().denoiser(net)
    with pytest.raises(CapabilityError, match="sampler=block"):
        DDPMSampler(steps=4).sample(small, 2, L, generator=gen(0))
    whole = BD3LM(LogLinear(), V - 1, V, block_size=L, length=L).eval().denoiser(net)
    assert DDPMSampler(steps=4).sample(whole, 2, L, generator=gen(0)).tokens.shape == (2, L)
    with pytest.raises(ValueError, match="model block starting at position 4"):
        ConfidenceSampler(steps=16, block_length=8).sample(small, 2, L, generator=gen(0))
    with pytest.raises(ValueError, match="sampler.cache=prefix on a block-causal model"):
        ConfidenceSampler(steps=16, block_length=4, cache="prefix").sample(small, 2, L)
    prompt = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="prompt of 3 tokens"):
        ConfidenceSampler(steps=16, block_length=4).sample(small, 2, L, prefix=prompt)

    out = ConfidenceSampler(steps=16, block_length=2).sample(small, 2, L, generator=gen(0))
    assert bool((out.tokens != V - 1).all()) and out.nfe == 16
    out = ConfidenceSampler(steps=8, block_length=4).sample(small, 2, L, prefix=torch.arange(1, 5))
    assert bool((out.tokens != V - 1).all())


@torch.no_grad()
def test_confidence_cache_warns_on_a_one_block_bd3lm(caplog) -> None:
    """bd3lm with block_size >= length is MDLM: block-causal in name only. Its one block is
    bidirectional, so the confidence sampler's cache is Fast-dLLM's approximation there and
    says so; with blocks that tile the sampler's it is exact and silent (the double in
    tests/test_fast_sampling.py shows the equality)."""
    from samplers.confidence import ConfidenceSampler

    L = 16
    whole = BD3LM(LogLinear(), V - 1, V, block_size=L, length=L).eval().denoiser(random_dit(L))
    with caplog.at_level("WARNING"):
        out = ConfidenceSampler(steps=8, block_length=4, cache="prefix").sample(
            whole, 2, L, generator=gen(0)
        )
    assert bool((out.tokens != V - 1).all())
    assert "approximation" in caplog.text
