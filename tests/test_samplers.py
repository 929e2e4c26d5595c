"""Tests for samplers/: exactness against a known data distribution, golden steps, caching,
confidence decoding, semi-AR, conditioning, refusals, rendering and the plot script.

The exactness tests use `ExactDenoiser`, whose log p(x0 | x_t) is the exact posterior of a
small data distribution over 4 positions and 3 tokens (81 sequences, with dependencies
between positions). For the absorbing process that posterior does not depend on t, so a
correct sampler must reproduce the data distribution; see `tv_bound` for the tolerance.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor

from samplers.base import (
    Denoiser,
    SampleOutput,
    filter_log_probs,
    guided_log_probs,
    sample_categorical,
    uniform,
)
from samplers.ddpm import DDPMSampler, ddpm_posterior, ddpm_step, unmask_probability
from samplers.ddpm_cache import DDPMCacheSampler

ROOT = Path(__file__).resolve().parents[1]
NUM_TOKENS, L_TOY, MASK = 3, 4, 3  # 3 real tokens, 4 positions, mask_id = 3 (V = 4)


# ----------------------------------------------------------------------------- fixtures


def toy_distribution() -> tuple[Tensor, Tensor]:
    """All 81 sequences (S, L) and their probabilities (S,) float64: strongly dependent."""
    seqs = torch.tensor(list(itertools.product(range(NUM_TOKENS), repeat=L_TOY)))  # (S, L)
    g = torch.Generator().manual_seed(0)
    energy = (
        2.5 * (seqs[:, 0] == seqs[:, 1]).double()
        + 2.0 * (seqs[:, 1] != seqs[:, 2]).double()
        + 3.0 * (seqs[:, 3] == seqs[:, 0]).double()
        + 0.5 * torch.rand(len(seqs), generator=g, dtype=torch.float64)
    )
    p = energy.exp()
    return seqs, p / p.sum()


class ExactDenoiser:
    """log p(x0 | x_t) of the toy distribution, by summing the joint over consistent sequences.

    The posterior of all 4^4 possible x_t is tabulated once, so a call is a lookup. Counts
    its calls; `time_conditioned` is only a declared flag (the output ignores t).
    """

    mask_id = MASK
    vocab_size = NUM_TOKENS + 1

    def __init__(self, time_conditioned: bool = False) -> None:
        self.seqs, self.p = toy_distribution()
        self.onehot = torch.nn.functional.one_hot(self.seqs, NUM_TOKENS).double()  # (S, L, 3)
        states = torch.tensor(list(itertools.product(range(NUM_TOKENS + 1), repeat=L_TOY)))
        post = self.posterior(states).float().log()  # (4^L, L, 3)
        self.table = torch.cat([post, torch.full_like(post[..., :1], -torch.inf)], -1)
        self.time_conditioned = time_conditioned
        self.calls = 0

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t  # linear: each token's unmask time is uniform on [0, 1]

    def posterior(self, x_t: Tensor) -> Tensor:
        """(B, L) -> (B, L, 3) exact p(x0_i = v | visible tokens of x_t)."""
        visible = x_t != MASK  # (B, L)
        agree = (x_t[:, None, :] == self.seqs[None]) | ~visible[:, None, :]  # (B, S, L)
        w = agree.all(-1).double() * self.p  # (B, S)
        post = torch.einsum("bs,slv->blv", w, self.onehot)  # (B, L, 3)
        return post / w.sum(-1)[:, None, None]

    def log_p_x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        index = (x_t * (NUM_TOKENS + 1) ** torch.arange(L_TOY - 1, -1, -1)).sum(-1)  # (B,)
        return self.table[index]  # (B, L, V)


class MarginalDenoiser(ExactDenoiser):
    """A deliberately wrong rule: unmask each position from its data marginal, ignoring context."""

    def log_p_x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        marginals = self.table[-1:].expand(len(x_t), -1, -1)  # row of the all-mask x_t
        clean = torch.nn.functional.one_hot(x_t, NUM_TOKENS + 1).float().log()
        return torch.where((x_t == MASK)[..., None], marginals, clean)


def empirical(tokens: Tensor) -> Tensor:
    """(N, L) tokens -> (S,) empirical distribution over the 81 sequences (same order as seqs)."""
    assert bool((tokens < NUM_TOKENS).all()), "a mask survived sampling"
    index = (tokens * NUM_TOKENS ** torch.arange(L_TOY - 1, -1, -1)).sum(-1)
    return torch.bincount(index, minlength=NUM_TOKENS**L_TOY).double() / len(tokens)


def tv(p: Tensor, q: Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def tv_bound(p: Tensor, n: int, bias: float = 0.0, delta: float = 1e-6) -> float:
    """A bound that a correct sampler exceeds with probability < delta.

    E TV(empirical, p) <= 1/2 sum_k sqrt(p_k (1 - p_k) / n) (Jensen); TV moves by <= 1/n when
    one sample changes, so McDiarmid adds sqrt(log(1/delta) / (2n)). `bias` is the sampler's
    own exact-distribution error (e.g. two tokens unmasked in one ddpm step).
    """
    mean = 0.5 * float((p * (1 - p) / n).sqrt().sum())
    return mean + math.sqrt(math.log(1 / delta) / (2 * n)) + bias


N_EXACT = 20_000
DDPM_STEPS = 1000
# ddpm is exact unless two tokens unmask in the same step; with alpha = 1 - t unmask times are
# iid uniform, so that has probability <= C(L, 2) / steps (union over pairs).
DDPM_BIAS = math.comb(L_TOY, 2) / DDPM_STEPS


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- base pieces


def test_sample_categorical_matches_probabilities_and_skips_zeros() -> None:
    log_p = torch.tensor([0.1, 0.0, 0.6, 0.3]).log().expand(200_000, 4)
    draws = sample_categorical(log_p, uniform((200_000,), gen(), torch.device("cpu")))
    freq = torch.bincount(draws, minlength=4).double() / 200_000
    assert freq[1] == 0
    assert torch.allclose(freq, torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64), atol=5e-3)


def test_filter_log_probs_temperature_top_k_top_p() -> None:
    log_p = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert filter_log_probs(log_p, temperature=0).exp().tolist() == [[1.0, 0.0, 0.0, 0.0]]
    top2 = filter_log_probs(log_p, top_k=2).exp()
    assert torch.allclose(top2, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    nucleus = filter_log_probs(log_p, top_p=0.8).exp()  # 0.5 + 0.3 reaches 0.8
    assert torch.allclose(nucleus, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    hot = filter_log_probs(log_p, temperature=0.5).exp()  # p^2 renormalised
    assert torch.allclose(hot, torch.tensor([[0.25, 0.09, 0.0225, 0.0025]]) / 0.365)


def test_guided_log_probs_formula_and_subs_columns() -> None:
    cond = torch.tensor([[[0.6, 0.4, 0.0]]]).log()  # mask column log 0 = -inf
    uncond = torch.tensor([[[0.3, 0.7, 0.0]]]).log()
    out = guided_log_probs(cond, uncond, cfg_scale=1.0).exp()
    raw = torch.tensor([0.6**2 / 0.3, 0.4**2 / 0.7])  # p_c^(1+w) / p_u^w with w = 1
    assert torch.allclose(out[0, 0, :2], raw / raw.sum()) and out[0, 0, 2] == 0
    assert torch.allclose(guided_log_probs(cond, uncond, 0.0), torch.log_softmax(cond, -1))


def test_exact_denoiser_is_a_denoiser() -> None:
    assert isinstance(ExactDenoiser(), Denoiser)


# ----------------------------------------------------------------------------- ddpm


def test_ddpm_posterior_golden() -> None:
    """MDLM eq. 7 by hand: a_t = 0.3, a_s = 0.6 -> unmask 3/7, stay masked 4/7."""
    p = torch.tensor([0.5, 0.2, 0.3, 0.0])  # mask column (3) has probability 0
    log_p = torch.stack([p.log(), p.log(), torch.tensor([0.0, 1.0, 0.0, 0.0]).log()])[None]
    x_t = torch.tensor([[MASK, MASK, 1]])
    a_t, a_s = torch.tensor([0.3]), torch.tensor([0.6])
    post = ddpm_posterior(log_p, x_t, a_t, a_s, MASK)
    expected = torch.tensor([0.5 * 3 / 7, 0.2 * 3 / 7, 0.3 * 3 / 7, 4 / 7], dtype=torch.float64)
    assert torch.allclose(post[0, 0], expected) and torch.allclose(post[0, 1], expected)
    assert post[0, 2].tolist() == [0.0, 1.0, 0.0, 0.0]  # a clean token never changes
    assert float(unmask_probability(a_t, torch.ones(1))) == 1.0  # the last step resolves all


def test_ddpm_step_draws_from_the_posterior() -> None:
    n = 100_000
    p = torch.tensor([0.5, 0.2, 0.3, 0.0])
    log_p = p.log().expand(n, 2, 4)
    x_t = torch.tensor([[MASK, 2]]).expand(n, 2)
    a_t, a_s = torch.full((n,), 0.3), torch.full((n,), 0.6)
    x_s = ddpm_step(log_p, x_t, a_t, a_s, gen(), MASK)
    assert bool((x_s[:, 1] == 2).all())
    freq = torch.bincount(x_s[:, 0], minlength=4).double() / n
    expected = ddpm_posterior(log_p[:1], x_t[:1], a_t[:1], a_s[:1], MASK)[0, 0]
    assert float((freq - expected).abs().max()) < 5 * math.sqrt(0.25 / n)  # 5 sigma


@pytest.mark.parametrize("cls", [DDPMSampler, DDPMCacheSampler])
def test_ddpm_matches_data_distribution(cls: type[DDPMSampler]) -> None:
    seqs, p = toy_distribution()
    out = cls(steps=DDPM_STEPS).sample(ExactDenoiser(), N_EXACT, L_TOY, generator=gen(1))
    bound = tv_bound(p, N_EXACT, DDPM_BIAS)
    assert tv(empirical(out.tokens), p) < bound


def test_wrong_rules_fail_the_same_bound() -> None:
    """Independent unmasking from marginals, or all tokens in one step, must be caught."""
    _, p = toy_distribution()
    bound = tv_bound(p, N_EXACT, DDPM_BIAS)
    wrong = DDPMSampler(steps=DDPM_STEPS).sample(
        MarginalDenoiser(), N_EXACT, L_TOY, generator=gen(1)
    )
    one_step = DDPMSampler(steps=1).sample(ExactDenoiser(), N_EXACT, L_TOY, generator=gen(1))
    assert tv(empirical(wrong.tokens), p) > 2 * bound
    assert tv(empirical(one_step.tokens), p) > 2 * bound


def test_ddpm_cache_same_samples_fewer_calls() -> None:
    for seed, batch in [(0, 1), (1, 1), (2, 16)]:
        plain, cached = ExactDenoiser(), ExactDenoiser()
        a = DDPMSampler(steps=200).sample(plain, batch, L_TOY, generator=gen(seed))
        b = DDPMCacheSampler(steps=200).sample(cached, batch, L_TOY, generator=gen(seed))
        assert torch.equal(a.tokens, b.tokens)
        assert a.nfe == plain.calls == 200
        assert b.nfe == cached.calls
        # one call per change of x_t: at most one per token in the batch (+ 1)
        assert b.nfe <= batch * L_TOY + 1
        if batch == 1:
            assert b.nfe <= L_TOY + 1


def test_ddpm_cache_refuses_time_conditioned_denoiser() -> None:
    with pytest.raises(ValueError, match=r"sampler=ddpm_cache.*time_conditioning"):
        DDPMCacheSampler(steps=4).sample(ExactDenoiser(time_conditioned=True), 2, L_TOY)
    DDPMSampler(steps=4).sample(ExactDenoiser(time_conditioned=True), 2, L_TOY)  # fine


def test_ddpm_trajectory_and_output() -> None:
    out = DDPMSampler(steps=10).sample(
        ExactDenoiser(), 3, L_TOY, generator=gen(), return_trajectory=True
    )
    assert isinstance(out, SampleOutput) and out.tokens.shape == (3, L_TOY)
    traj = out.trajectory
    assert traj is not None and len(traj) == 11
    assert bool((traj[0] == MASK).all()) and torch.equal(traj[-1], out.tokens)
    for before, after in zip(traj, traj[1:]):  # clean tokens never change
        assert bool(((before == MASK) | (before == after)).all())


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs" / "sampler").glob("*.yaml")), ids=lambda p: p.stem
)
def test_every_sampler_yaml_builds_and_samples(path: Path) -> None:
    sampler = instantiate(OmegaConf.load(path))
    assert sampler.name == path.stem
    assert sampler.num_samples >= 1 and sampler.batch_size >= 1
    if sampler.name == "ar":  # needs an autoregressive model: tests/test_ar_sampler.py
        return
    out = sampler.sample(ExactDenoiser(), 2, L_TOY, generator=gen())
    assert out.tokens.shape[0] == 2 and bool((out.tokens != MASK).all())
