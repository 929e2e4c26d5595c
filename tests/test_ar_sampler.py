"""The AR baseline's sampling: KV-cached causal DiT decoding equals the full forward, the
sampler draws the same tokens with and without the cache (and the cache makes the work
linear), and temperature / top-k / top-p filter by hand-computed distributions."""

import math

import pytest
import torch

from diffusion.denoiser import ModelDenoiser
from diffusion.noise import LogLinear
from diffusion.objectives.ar import AR
from diffusion.objectives.subs import SUBS
from models.dit import DiT
from samplers.ar import ARSampler

VOCAB, MASK, BOS = 9, 8, 1


def causal_dit(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=VOCAB, hidden_size=32, n_blocks=2, n_heads=4, max_length=16, causal=True)
    args.update(kw)
    model = DiT(**args)
    for p in model.parameters():  # break the zero init so outputs depend on the inputs
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


@pytest.mark.parametrize("time_conditioning", [False, True])
@torch.no_grad()
def test_kv_cache_gives_the_full_forward_logits(time_conditioning):
    model = causal_dit(time_conditioning=time_conditioning)
    if not time_conditioning:  # float64: the two paths must agree to rounding, not roughly
        model = model.double()
    x = torch.randint(0, VOCAB, (2, 12))
    sigma = torch.tensor([0.3, 1.2]) if time_conditioning else None
    full = model(x, sigma)
    cache = model.init_cache(2)
    pieces = [model.forward_cached(x[:, :5], cache, sigma)]  # prefill
    pieces += [model.forward_cached(x[:, i : i + 1], cache, sigma) for i in range(5, 9)]
    pieces.append(model.forward_cached(x[:, 9:], cache, sigma))  # a chunk after single steps
    assert cache.length == 12
    scale = float(full.abs().max())
    tol = 1e-10 if full.dtype == torch.float64 else 2e-5 * scale
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=tol)
    with pytest.raises(ValueError, match="KV cache full"):
        model.forward_cached(x[:, :5], cache, sigma)


def test_kv_cache_serves_a_bidirectional_dit_too():
    """init_cache works for any DiT (the span cache); the AR sampler still needs an AR model."""
    cache = causal_dit(causal=False).init_cache(1)
    assert cache.length == 0 and cache.capacity == 16


class CountingDiT(DiT):
    """Counts the token positions pushed through the network."""

    positions = 0

    def forward(self, x_t, sigma=None, attention_mask=None):
        CountingDiT.positions += x_t.numel()
        return super().forward(x_t, sigma, attention_mask)

    def forward_cached(self, x_new, cache, sigma=None):
        CountingDiT.positions += x_new.numel()
        return super().forward_cached(x_new, cache, sigma)


def ar_denoiser(backbone=None):
    return AR(mask_id=MASK, vocab_size=VOCAB).denoiser(backbone or causal_dit())


def test_same_tokens_with_and_without_cache_and_linear_work():
    torch.manual_seed(0)
    backbone = CountingDiT(
        vocab_size=VOCAB, hidden_size=32, n_blocks=2, n_heads=4, max_length=16, causal=True
    )
    for p in backbone.parameters():
        torch.nn.init.normal_(p, std=0.1)
    denoiser = ar_denoiser(backbone.eval())
    outs, work = {}, {}
    for use_cache in (True, False):
        CountingDiT.positions = 0
        sampler = ARSampler(use_cache=use_cache, bos_id=BOS, top_p=0.95)
        outs[use_cache] = sampler.sample(
            denoiser, 3, 16, generator=torch.Generator().manual_seed(4)
        )
        work[use_cache] = CountingDiT.positions
    assert torch.equal(outs[True].tokens, outs[False].tokens)
    tokens = outs[True].tokens
    assert tokens.shape == (3, 16) and (tokens[:, 0] == BOS).all() and not (tokens == MASK).any()
    assert len(set(map(tuple, tokens.tolist()))) > 1  # it samples, it does not copy
    assert outs[True].nfe == outs[False].nfe == 15
    assert work[True] == 3 * 15  # each position once: linear
    assert work[False] == 3 * sum(range(1, 16))  # the prefix again every step: quadratic


def test_prompt_is_kept_and_trajectory_grows_one_token_per_step():
    denoiser = ar_denoiser()
    prefix = torch.tensor([BOS, 4, 2])
    out = ARSampler(bos_id=None).sample(
        denoiser,
        2,
        8,
        prefix=prefix,
        generator=torch.Generator().manual_seed(0),
        return_trajectory=True,
    )
    assert torch.equal(out.tokens[:, :3], prefix.expand(2, -1))
    assert len(out.trajectory) == 1 + 5
    filled = [int((x != MASK).sum()) for x in out.trajectory]
    assert filled == [2 * n for n in range(3, 9)]


def test_refusals_are_clear():
    sampler = ARSampler(bos_id=BOS)
    diffusion = ModelDenoiser(
        causal_dit(causal=False), SUBS(LogLinear(), mask_id=MASK, vocab_size=VOCAB)
    )
    with pytest.raises(ValueError, match="parameterization=ar"):
        sampler.sample(diffusion, 1, 4)
    with pytest.raises(ValueError, match="sampler.bos_id"):
        ARSampler().sample(ar_denoiser(), 1, 4)
    with pytest.raises(ValueError, match="infilling"):
        sampler.sample(
            ar_denoiser(),
            1,
            4,
            fixed_mask=torch.ones(4, dtype=torch.bool),
            fixed_values=torch.zeros(4),
        )


# ---- filters, by hand -----------------------------------------------------------------------
P_NEXT = [0.5, 0.25, 0.15, 0.1]  # next-token distribution over tokens 0..3; the mask is 4


class FixedNextToken:
    """A fake AR denoiser: the next token is always drawn from P_NEXT (plus mass on the mask)."""

    mask_id, vocab_size, capabilities = 4, 5, frozenset({"next_token", "time_agnostic"})

    def __init__(self, mask_mass=0.0):
        p = torch.tensor([*(q * (1 - mask_mass) for q in P_NEXT), mask_mass])
        self.log_p = torch.log(p.clamp_min(1e-300)).float()

    def alpha(self, t):
        return 1 - t

    def log_p_x0(self, x_t, t):
        raise AssertionError("an AR sampler never asks for log p(x0 | x_t)")

    def init_cache(self, batch_size):
        return object()

    def log_p_next(self, x, cache=None):
        return self.log_p.expand(*x.shape, -1)


def frequencies(sampler, denoiser, n=6000):
    out = sampler.sample(
        denoiser, n, 2, prefix=torch.tensor([0]), generator=torch.Generator().manual_seed(1)
    )
    return torch.bincount(out.tokens[:, 1], minlength=5).double() / n


def normalised(p):
    p = torch.tensor(p + [0.0] * (5 - len(p)), dtype=torch.float64)
    return p / p.sum()


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(), normalised(P_NEXT)),
        (dict(top_k=2), normalised([0.5, 0.25])),  # the two most likely, renormalised
        (dict(top_p=0.7), normalised([0.5, 0.25])),  # 0.5 < 0.7 <= 0.75: two tokens
        (dict(top_p=0.8), normalised([0.5, 0.25, 0.15])),  # 0.75 < 0.8 <= 0.9: three
        (dict(temperature=0.5), normalised([q**2 for q in P_NEXT])),  # p^(1/T)
        (dict(temperature=2.0, top_k=3), normalised([q**0.5 for q in P_NEXT[:3]])),
        (dict(temperature=0.0), normalised([1.0])),  # greedy
    ],
)
def test_temperature_top_k_top_p_by_hand(kwargs, expected):
    sampler = ARSampler(**kwargs)
    filtered = sampler.filter(FixedNextToken().log_p[:4].double())
    torch.testing.assert_close(filtered.exp(), expected[:4], atol=1e-9, rtol=1e-6)
    freq = frequencies(sampler, FixedNextToken())
    tolerance = 4 * torch.sqrt(expected * (1 - expected) / 6000) + 1e-12
    assert ((freq - expected).abs() <= tolerance).all(), (freq, expected)


def test_the_mask_is_never_drawn():
    freq = frequencies(ARSampler(), FixedNextToken(mask_mass=0.9))
    assert freq[4] == 0
    assert freq[:4].sum() == pytest.approx(1.0)
    assert math.isclose(float(freq[0]), 0.5, abs_tol=0.03)
