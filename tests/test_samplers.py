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

from samplers.analytic import AnalyticSampler, analytic_posterior, log_score_from_log_p_x0
from samplers.base import (
    Denoiser,
    GuidedDenoiser,
    SampleOutput,
    filter_log_probs,
    guided_log_probs,
    model_capabilities,
    sample_categorical,
    uniform,
)
from samplers.confidence import ConfidenceSampler, num_transfer_tokens
from samplers.ddpm import DDPMSampler, ddpm_posterior, ddpm_step, unmask_probability
from samplers.ddpm_cache import DDPMCacheSampler
from samplers.first_hitting import FirstHittingSampler, alpha_inverse
from samplers.render import render_gif
from samplers.semi_ar import SemiARSampler

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
        self.capabilities = model_capabilities({"absorbing", "whole_canvas"}, time_conditioned)
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


class ScoreDenoiser(ExactDenoiser):
    """ExactDenoiser that also offers SEDD's `log_score` (which the analytic sampler must use)."""

    def __init__(self) -> None:
        super().__init__()
        self.capabilities = model_capabilities({"absorbing", "log_score", "whole_canvas"}, False)
        self.score_calls = 0

    def log_score(self, x_t: Tensor, t: Tensor) -> Tensor:
        self.score_calls += 1
        table = self.table[(x_t * (NUM_TOKENS + 1) ** torch.arange(L_TOY - 1, -1, -1)).sum(-1)]
        return log_score_from_log_p_x0(table, self.alpha(t)).float()


class FixedDenoiser:
    """Any length: p(x0 | x_t) is a fixed table (B, L, V-1) at masked positions, SUBS elsewhere.

    Records every x_t it is called with.
    """

    def __init__(self, probs: Tensor, time_conditioned: bool = False) -> None:
        self.probs = probs  # (B, L, V - 1)
        self.vocab_size = probs.shape[-1] + 1
        self.mask_id = probs.shape[-1]
        self.time_conditioned = time_conditioned
        self.capabilities = model_capabilities({"absorbing", "whole_canvas"}, time_conditioned)
        self.inputs: list[Tensor] = []

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def log_p_x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        self.inputs.append(x_t.clone())
        probs = torch.cat(
            [self.probs.expand(len(x_t), *x_t.shape[1:], -1), torch.zeros(*x_t.shape, 1)], -1
        )  # (B, L, V)
        clean = torch.nn.functional.one_hot(x_t, self.vocab_size).float()
        return torch.where((x_t == self.mask_id)[..., None], probs, clean).log()


def random_denoiser(length: int, vocab: int = 6, seed: int = 0, **kwargs) -> FixedDenoiser:
    g = torch.Generator().manual_seed(seed)
    return FixedDenoiser(torch.rand(1, length, vocab - 1, generator=g).softmax(-1), **kwargs)


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


N_EXACT = 10_000
DDPM_STEPS = 500
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


EXACT_CASES = {
    "ddpm": (lambda: DDPMSampler(steps=DDPM_STEPS), ExactDenoiser, DDPM_BIAS),
    "ddpm_cache": (lambda: DDPMCacheSampler(steps=DDPM_STEPS), ExactDenoiser, DDPM_BIAS),
    "analytic": (lambda: AnalyticSampler(steps=DDPM_STEPS), ExactDenoiser, DDPM_BIAS),
    "analytic_score": (lambda: AnalyticSampler(steps=DDPM_STEPS), ScoreDenoiser, DDPM_BIAS),
    "first_hitting": (FirstHittingSampler, ExactDenoiser, 0.0),  # exact: one token per event
}
MEASURED_TV: dict[str, float] = {}


@pytest.mark.parametrize("case", EXACT_CASES)
def test_sampler_matches_data_distribution(case: str) -> None:
    make, denoiser_cls, bias = EXACT_CASES[case]
    _, p = toy_distribution()
    denoiser = denoiser_cls()
    out = make().sample(denoiser, N_EXACT, L_TOY, generator=gen(1))
    MEASURED_TV[case] = tv(empirical(out.tokens), p)
    assert MEASURED_TV[case] < tv_bound(p, N_EXACT, bias), MEASURED_TV[case]
    if case == "analytic_score":  # the model's own score is used, not log p(x0 | x_t)
        assert denoiser.score_calls == DDPM_STEPS and denoiser.calls == 0


@pytest.mark.slow  # 50 s of wrong-rule sampling (CI's second tier): keeps the default tier under 10 min
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
    denoiser = random_denoiser(64)
    if not sampler.requirements(vars(sampler)) <= denoiser.capabilities:
        return  # block (block-causal) and uniform (uniform-state): tests/test_bd3lm.py, test_duo.py
    out = sampler.sample(denoiser, 2, 64, generator=gen())
    assert out.tokens.shape[0] == 2 and bool((out.tokens != denoiser.mask_id).all())


# ----------------------------------------------------------------------------- analytic


def test_analytic_posterior_golden_equals_ddpm() -> None:
    """SEDD's Tweedie step with MDLM's score relation is MDLM eq. 7 (hand values as above)."""
    p = torch.tensor([0.5, 0.2, 0.3, 0.0])
    log_p = torch.stack([p.log(), torch.tensor([0.0, 1.0, 0.0, 0.0]).log()])[None]  # (1, 2, 4)
    x_t = torch.tensor([[MASK, 1]])
    a_t, a_s = torch.tensor([0.3]), torch.tensor([0.6])
    post = analytic_posterior(log_score_from_log_p_x0(log_p, a_t), x_t, a_t, a_s, MASK)
    expected = torch.tensor([0.5 * 3 / 7, 0.2 * 3 / 7, 0.3 * 3 / 7, 4 / 7], dtype=torch.float64)
    assert torch.allclose(post[0, 0], expected) and post[0, 1].tolist() == [0, 1, 0, 0]
    final = analytic_posterior(log_score_from_log_p_x0(log_p, a_t), x_t, a_t, torch.ones(1), MASK)
    assert final[0, 0, MASK] == 0  # the last step resolves every mask
    assert torch.allclose(post, ddpm_posterior(log_p, x_t, a_t, a_s, MASK))


# ----------------------------------------------------------------------------- first hitting


def test_first_hitting_one_call_per_token_and_event_times() -> None:
    denoiser = random_denoiser(12)
    out = FirstHittingSampler().sample(denoiser, 1, 12, generator=gen(), return_trajectory=True)
    assert out.nfe == 12 and len(out.trajectory) == 13
    for before, after in zip(out.trajectory, out.trajectory[1:]):  # exactly one token per event
        assert int((before != after).sum()) == 1
    model = GuidedDenoiser(denoiser, torch.zeros(1, 12, dtype=torch.bool))
    t = alpha_inverse(
        model, torch.tensor([0.3], dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    )
    assert abs(float(t) - 0.7) < 1e-6
    timed = random_denoiser(12, time_conditioned=True)
    assert FirstHittingSampler().sample(timed, 2, 12, generator=gen()).nfe == 12


# ----------------------------------------------------------------------------- confidence


def test_num_transfer_tokens_even_split() -> None:
    assert num_transfer_tokens(torch.tensor([7, 4, 0]), 3).tolist() == [
        [3, 2, 2],
        [2, 1, 1],
        [0, 0, 0],
    ]


@pytest.mark.parametrize("strategy", ["low_confidence", "margin", "entropy"])
def test_confidence_commits_top_k_per_sample_blocks_left_to_right(strategy: str) -> None:
    """Sample 0 is most confident at the right end of each block, sample 1 at the left end."""
    length, block, steps, vocab = 8, 4, 4, 5  # 2 blocks x 2 steps: 2 tokens per step
    peak = torch.linspace(0.3, 0.9, length)  # confidence of token 0 by position
    rest = ((1 - peak) / (vocab - 1))[:, None].expand(length, vocab - 1)
    probs = torch.cat([peak[:, None], rest], -1)  # (L, V - 1); token 0 is the argmax
    order = torch.stack([probs, probs.flip(0)])  # (2, L, V - 1): per-sample confidence order
    within = torch.cat([order[:, :block].flip(1), order[:, block:].flip(1)], 1)  # reverse in block
    denoiser = FixedDenoiser(within)
    sampler = ConfidenceSampler(steps=steps, block_length=block, strategy=strategy, temperature=0)
    out = sampler.sample(denoiser, 2, length, generator=gen(), return_trajectory=True)
    assert out.nfe == steps and bool((out.tokens == 0).all())
    committed = [(x != denoiser.mask_id) for x in out.trajectory]
    # step 1: both samples commit 2 tokens of block 1, their own most confident ones
    assert committed[1].sum(1).tolist() == [2, 2]
    assert committed[1][0].nonzero().flatten().tolist() == [0, 1]  # within: left most confident
    assert committed[1][1].nonzero().flatten().tolist() == [2, 3]
    assert not bool(committed[2][:, block:].any())  # block 2 untouched until block 1 is done
    assert bool(committed[2][:, :block].all())
    assert committed[3].sum(1).tolist() == [6, 6]


def test_confidence_random_strategy_and_eos_stop() -> None:
    eos = 2
    probs = torch.zeros(1, 8, 4)
    probs[0, :, 1] = 1.0
    probs[0, 1, :] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # the model emits EOS at position 1
    denoiser = FixedDenoiser(probs)
    sampler = ConfidenceSampler(
        steps=8, block_length=2, strategy="random", stop_at_eos=True, eos_id=eos
    )
    out = sampler.sample(denoiser, 3, 8, generator=gen())
    assert out.nfe == 2  # first block only: every sample ended
    assert out.tokens[:, :2].tolist() == [[1, eos]] * 3 and bool((out.tokens[:, 2:] == eos).all())


def test_confidence_eos_stop_ignores_an_infilled_eos() -> None:
    """A fixed EOS (infilling) is conditioning: it must not end the rows' decoding."""
    eos = 2
    probs = torch.zeros(1, 8, 4)
    probs[0, :, 1] = 1.0
    denoiser = FixedDenoiser(probs)
    sampler = ConfidenceSampler(
        steps=8, block_length=2, strategy="random", stop_at_eos=True, eos_id=eos
    )
    fixed = torch.zeros(8, dtype=torch.bool)
    fixed[1] = True
    out = sampler.sample(
        denoiser, 3, 8, generator=gen(), fixed_mask=fixed, fixed_values=torch.full((8,), eos)
    )
    assert out.nfe == 7 and bool((out.tokens[:, 2:] == 1).all())  # 1 + 2 + 2 + 2: all blocks


# ----------------------------------------------------------------------------- semi-AR


class WindowDenoiser(FixedDenoiser):
    """Refuses inputs longer than its training length (as a positional-embedding model would)."""

    def log_p_x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        assert x_t.shape[1] == self.probs.shape[1], "semi_ar passed more than the model length"
        return super().log_p_x0(x_t, t)


def test_semi_ar_longer_than_training_length_keeps_earlier_strides() -> None:
    g = torch.Generator().manual_seed(3)
    denoiser = WindowDenoiser(torch.rand(1, 8, 5, generator=g).softmax(-1))
    sampler = SemiARSampler(steps=16, stride_length=4, num_strides=2)
    out = sampler.sample(denoiser, 3, 8, generator=gen(), return_trajectory=True)
    assert out.tokens.shape == (3, 16) and bool((out.tokens != denoiser.mask_id).all())
    traj = out.trajectory
    first_window_done = 16  # steps of the first window
    first = traj[first_window_done][:, :4]
    assert bool((first != denoiser.mask_id).all())
    assert all(torch.equal(x[:, :4], first) for x in traj[first_window_done:])
    assert bool((traj[first_window_done][:, 8:] == denoiser.mask_id).all())  # not yet generated
    assert out.nfe <= 3 * (3 * 8 + 1)  # cached: at most tokens + 1 calls per window


def test_semi_ar_cache_refuses_time_conditioned() -> None:
    timed = random_denoiser(8, time_conditioned=True)
    with pytest.raises(ValueError, match=r"sampler=semi_ar.*time_conditioning"):
        SemiARSampler(steps=4, stride_length=4).sample(timed, 1, 8)
    out = SemiARSampler(steps=4, stride_length=4, cache=False).sample(timed, 1, 8)
    assert out.tokens.shape == (1, 12) and out.nfe == 8


# ----------------------------------------------------------------------------- conditioning


ALL_SAMPLERS = {
    "ddpm": lambda: DDPMSampler(steps=20, top_k=3, top_p=0.9, cfg_scale=0.5),
    "ddpm_cache": lambda: DDPMCacheSampler(steps=20, temperature=0.7, cfg_scale=0.5),
    "analytic": lambda: AnalyticSampler(steps=20, cfg_scale=0.5),
    "semi_ar": lambda: SemiARSampler(steps=10, stride_length=4, num_strides=1, cfg_scale=0.5),
    "confidence": lambda: ConfidenceSampler(steps=6, block_length=4, cfg_scale=0.5),
    "first_hitting": lambda: FirstHittingSampler(top_k=2, cfg_scale=0.5),
}


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_prompt_and_fixed_tokens_never_change(name: str) -> None:
    denoiser = random_denoiser(12)
    sampler = ALL_SAMPLERS[name]()
    total = 12 + (4 if name == "semi_ar" else 0)  # fixed_mask covers the output length
    prefix = torch.tensor([4, 3, 2])
    fixed_mask = torch.zeros(total, dtype=torch.bool)
    fixed_mask[[6, 10, total - 1]] = True
    fixed_values = torch.full((total,), 1)
    out = sampler.sample(
        denoiser,
        3,
        12,
        prefix=prefix,
        generator=gen(),
        return_trajectory=True,
        fixed_mask=fixed_mask,
        fixed_values=fixed_values,
    )
    assert len(out.trajectory) > 2 and bool((out.tokens != denoiser.mask_id).all())
    for x in out.trajectory:
        assert x[:, :3].tolist() == [[4, 3, 2]] * 3
        assert bool((x[:, [6, 10, total - 1]] == 1).all())
    # unsupervised CFG: every conditional call is followed by one with the prompt masked
    calls = denoiser.inputs
    assert out.nfe == len(calls) and len(calls) % 2 == 0
    mask = denoiser.mask_id
    for cond, uncond in zip(calls[::2], calls[1::2]):
        assert bool(((uncond == cond) | (uncond == mask)).all())  # only masking differs
        assert int((uncond == mask).sum()) > int((cond == mask).sum())
        if name != "semi_ar":  # (later semi_ar windows condition on their context instead)
            # (per-row caching may evaluate a sub-batch)
            assert cond[:, :3].tolist() == [[4, 3, 2]] * len(cond)
            assert bool((uncond[:, :3] == mask).all())


def test_conditional_samples_are_exact() -> None:
    """With x0 = 1 prompted and x3 = 0 fixed, (x1, x2) follow the data's conditional law."""
    seqs, p = toy_distribution()
    fixed_mask = torch.tensor([False, False, False, True])
    fixed_values = torch.tensor([0, 0, 0, 0])
    out = FirstHittingSampler().sample(
        ExactDenoiser(),
        N_EXACT,
        L_TOY,
        prefix=torch.tensor([1]),
        generator=gen(5),
        fixed_mask=fixed_mask,
        fixed_values=fixed_values,
    )
    keep = (seqs[:, 0] == 1) & (seqs[:, 3] == 0)
    conditional = torch.where(keep, p, torch.zeros_like(p))
    conditional = conditional / conditional.sum()
    assert tv(empirical(out.tokens), conditional) < tv_bound(conditional, N_EXACT)


# ----------------------------------------------------------------------------- display


def test_render_gif_frames_and_mask_colour(tmp_path: Path) -> None:
    from PIL import Image

    out = DDPMSampler(steps=6).sample(
        random_denoiser(10), 2, 10, generator=gen(), return_trajectory=True
    )
    path = render_gif(out.trajectory, lambda v: f"w{v}", tmp_path / "t.gif", mask_id=5)
    changed = 1 + sum(
        not torch.equal(a[0], b[0]) for a, b in zip(out.trajectory, out.trajectory[1:])
    )
    with Image.open(path) as gif:
        assert gif.n_frames == changed
        first = gif.convert("RGB")
        assert (190, 190, 190) in {c for _, c in first.getcolors(10_000)}  # masks drawn grey
        gif.seek(gif.n_frames - 1)
        assert (190, 190, 190) not in {c for _, c in gif.convert("RGB").getcolors(10_000)}


def test_plot_samplers_script(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    rows = [
        {
            "sampler": s,
            "steps": k,
            "nfe": k,
            "wall_s": 1.0,
            "tokens_per_s": 10.0,
            "gen_ppl": 100.0 / k + i,
            "entropy": 5.0 + i / 10,
        }
        for i, s in enumerate(["ddpm", "ddpm_cache"])
        for k in (8, 32, 128)
    ]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    with open(tmp_path / "rows.csv", "w") as f:
        f.write(",".join(rows[0]) + "\n")
        f.writelines(",".join(str(v) for v in r.values()) + "\n" for r in rows)
    for name in ("rows.json", "rows.csv"):
        png = tmp_path / f"{name}.png"
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "plot_samplers.py"),
                str(tmp_path / name),
                "-o",
                str(png),
            ],
            check=True,
        )
        from PIL import Image

        with Image.open(png) as image:
            assert image.size[0] > 400 and len(image.getcolors(1_000_000)) > 3


@pytest.mark.parametrize("name", ["ddpm", "confidence"])
def test_on_step_sees_every_state_while_sampling(name) -> None:
    """The live view's hook: called with the start canvas and each new x_t, in order, the
    same states `return_trajectory` keeps."""
    from samplers.confidence import ConfidenceSampler

    make = {"ddpm": lambda: DDPMSampler(steps=8), "confidence": lambda: ConfidenceSampler(steps=4)}
    seen: list[torch.Tensor] = []
    out = make[name]().sample(
        ExactDenoiser(), 2, L_TOY, generator=gen(0), return_trajectory=True, on_step=seen.append
    )
    assert len(seen) == len(out.trajectory) > 2
    assert all(torch.equal(a, b) for a, b in zip(seen, out.trajectory))
    assert (seen[0] == MASK).all() and torch.equal(seen[-1], out.tokens)


# ----------------------------------------------------------------------------- audit: analytic CFG


def test_analytic_cfg_keeps_the_ddpm_unmasking_rate_on_an_mdlm_model() -> None:
    """Issue 17: analytic + CFG on an MDLM model must guide p(x0) and then form the score, so
    P(stay masked) stays (1 - alpha_s) / (1 - alpha_t) (guiding the score gave 0.821 vs 0.833).
    Checked through the sampler's score route and through the score guidance itself (a score
    derived from p(x0 | x_t), as MDLM's relation gives it)."""
    from diffusion.denoiser import ModelDenoiser
    from diffusion.noise import LogLinear
    from diffusion.objectives.subs import SUBS
    from models.dit import DiT

    torch.manual_seed(0)
    backbone = DiT(vocab_size=7, hidden_size=32, n_blocks=2, n_heads=4, max_length=16)
    for p in backbone.parameters():
        torch.nn.init.normal_(p, std=0.3)
    denoiser = ModelDenoiser(backbone.eval(), SUBS(LogLinear(), mask_id=6, vocab_size=7))
    x = torch.full((2, 10), 6)
    x[:, :3] = torch.tensor([1, 4, 2])  # the prompt
    model = GuidedDenoiser(denoiser, x != 6, cfg_scale=2.0)
    t, s = torch.full((2,), 0.6), torch.full((2,), 0.5)
    alpha_t, alpha_s = model.alpha(t), model.alpha(s)
    expected = ((1 - alpha_s) / (1 - alpha_t))[:, None].expand(2, 7)  # ddpm's (MDLM eq. 7)
    via_p = log_score_from_log_p_x0(model.log_p_x0(x, t), alpha_t)  # guided p(x0), then score
    reference = analytic_posterior(via_p, x, alpha_t, alpha_s, 6)
    torch.testing.assert_close(reference[:, 3:, 6], expected, rtol=0, atol=1e-6)

    score = AnalyticSampler(steps=4, cfg_scale=2.0)._log_score(model, x, t, alpha_t)
    post = analytic_posterior(score, x, alpha_t, alpha_s, 6)
    torch.testing.assert_close(post[:, 3:], reference[:, 3:], rtol=0, atol=1e-5)

    class DerivedScore:  # MDLM's relation as a `log_score` method
        mask_id, vocab_size, time_conditioned = 6, 7, False
        capabilities = denoiser.capabilities | {"log_score"}
        alpha, log_p_x0 = denoiser.alpha, denoiser.log_p_x0

        def log_score(self, x_t: Tensor, t: Tensor) -> Tensor:
            return log_score_from_log_p_x0(self.log_p_x0(x_t, t), self.alpha(t)).float()

    guided = GuidedDenoiser(DerivedScore(), x != 6, cfg_scale=2.0)
    post = analytic_posterior(guided.log_p_x0(x, t, method="log_score"), x, alpha_t, alpha_s, 6)
    torch.testing.assert_close(post[:, 3:], reference[:, 3:], rtol=0, atol=1e-5)
