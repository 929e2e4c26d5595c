"""DUO: the uniform-state NELBO against a slow reference and its tightness, the argmax
operator T(gamma), the forward process and the curriculum's soft tokens, the uniform
ancestral sampler's exactness (its exact chain distribution, and samples from it), the
distillation's few-step gain, and main.py end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor

from diffusion.noise import LogLinear
from diffusion.objectives.duo import (
    DUO,
    DUODistill,
    argmax_alpha,
    uniform_prior_kl,
    usdm_nelbo,
)
from models.dit import DiT
from samplers.base import model_capabilities
from samplers.uniform import UniformSampler, uniform_posterior
from tests.test_main_e2e import ROOT, run_main
from tests.test_samplers import L_TOY, MASK, NUM_TOKENS, empirical, toy_distribution, tv, tv_bound


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- the NELBO


def usdm_slow(p: list[float], x: int, z: int, a: float, beta: float) -> float:
    """The CTMC NELBO integrand written out: sum over z' != z of the model rate minus the true
    rate plus true rate * log(true / model), rates (beta / K) xbar(z') / xbar(z)."""
    K = len(p)
    xbar = [K * a * (j == x) + 1 - a for j in range(K)]
    xbar_theta = [K * a * p[j] + 1 - a for j in range(K)]
    total = 0.0
    for zp in range(K):
        if zp == z:
            continue
        true, model = xbar[zp] / xbar[z], xbar_theta[zp] / xbar_theta[z]
        total += model - true + true * math.log(true / model)
    return beta / K * total


def test_usdm_nelbo_equals_the_slow_reference_on_a_hand_example() -> None:
    K = 5
    g = gen(0)
    log_x = torch.randn(2, 3, K, generator=g, dtype=torch.float64).log_softmax(-1)
    x0 = torch.tensor([[0, 1, 4], [2, 2, 3]])
    x_t = torch.tensor([[0, 3, 4], [1, 2, 0]])  # some equal to x0, some not
    alpha = torch.tensor([[0.3], [0.8]], dtype=torch.float64)
    beta = torch.tensor([[1.7], [0.4]], dtype=torch.float64)
    fast = usdm_nelbo(log_x, x0, x_t, alpha, beta)
    slow = torch.tensor(
        [
            [
                usdm_slow(
                    log_x[i, j].exp().tolist(),
                    int(x0[i, j]),
                    int(x_t[i, j]),
                    float(alpha[i, 0]),
                    float(beta[i, 0]),
                )
                for j in range(3)
            ]
            for i in range(2)
        ]
    )
    assert torch.allclose(fast, slow.float(), rtol=1e-5), (fast, slow)
    assert bool((fast > 0).all())
    perfect = torch.nn.functional.one_hot(x0, K).double().clamp_min(1e-300).log()
    assert float(usdm_nelbo(perfect, x0, x_t, alpha, beta).abs().max()) < 1e-6


def test_usdm_nelbo_is_tight_for_the_optimal_denoiser() -> None:
    """One token from p: the optimal x_theta is p itself (p(x | z) / q(z | x) is proportional
    to p), and the integrated NELBO plus the prior term is the entropy of p."""
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    K = 3
    t = torch.linspace(1e-6, 1 - 1e-6, 20001, dtype=torch.float64)
    a, beta = 1 - t, 1 / (1 - t)  # alpha = 1 - t
    x, z = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
    x, z = x.flatten(), z.flatten()  # all (x0, x_t) pairs
    weight = p[x][None] * (a[:, None] * (z == x)[None] + (1 - a[:, None]) / K)  # (T, 9)
    log_x = p.log().expand(len(t), len(x), K)
    terms = usdm_nelbo(log_x, x.expand(len(t), -1), z.expand(len(t), -1), a[:, None], beta[:, None])
    integral = float(np.trapezoid((weight * terms.double()).sum(1).numpy(), t.numpy()))
    prior = float(uniform_prior_kl(torch.tensor(0.0), K))
    entropy = float(-(p * p.log()).sum())
    assert prior == pytest.approx(0.0, abs=1e-12)
    assert integral == pytest.approx(entropy, rel=1e-3)


def test_prior_kl_by_hand() -> None:
    K, a = 4, 0.5
    hi, lo = K * a + 1 - a, 1 - a
    q = torch.tensor([hi, lo, lo, lo]) / K  # q_1(. | x) = xbar / K
    kl = float((q * (q * K).log()).sum())
    assert float(uniform_prior_kl(torch.tensor(a), K)) == pytest.approx(kl, rel=1e-6)


# ----------------------------------------------------------------------------- T(gamma)


@pytest.mark.parametrize("K", [8, 65])
def test_argmax_operator_matches_monte_carlo_and_its_derivative(K: int) -> None:
    g = gen(0)
    for gamma in (-3.5, 0.0, 2.0):
        a_g, s_g = math.sqrt(1 / (1 + math.exp(gamma))), math.sqrt(1 / (1 + math.exp(-gamma)))
        w = s_g * torch.randn(200_000, K, generator=g, dtype=torch.float64)
        w[:, 0] += a_g
        hit = float((w.argmax(-1) == 0).double().mean())
        alpha, _ = argmax_alpha(torch.tensor([gamma]), K)
        assert float(alpha) == pytest.approx((K * hit - 1) / (K - 1), abs=4e-3)
        h = 1e-4
        f64 = dict(dtype=torch.float64)
        up, _ = argmax_alpha(torch.tensor([gamma + h], **f64), K)
        down, _ = argmax_alpha(torch.tensor([gamma - h], **f64), K)
        _, slope = argmax_alpha(torch.tensor([gamma], **f64), K)
        assert float(slope) == pytest.approx(float((up - down) / (2 * h)), rel=1e-4, abs=1e-9)
    a, _ = argmax_alpha(torch.tensor([-8.0, 8.0]), K)
    assert float(a[0]) > 0.999 and float(a[1]) < 0.05  # clean at low gamma, uniform at high


# ----------------------------------------------------------------------------- the objective


class Recorder(torch.nn.Module):
    """A fake backbone: fixed logits, recording its inputs."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x_t, sigma=None, attention_mask=None):
        self.seen, self.sigma = x_t, sigma
        return self.logits.clone()


V, MASK_ID = 7, 2  # a mask id inside the vocabulary: uniform noise must skip it


def test_forward_process_never_draws_the_mask_and_keeps_alpha() -> None:
    duo = DUO(LogLinear(), MASK_ID, V)
    x0 = torch.full((4000, 16), 5)
    x_t = duo.q_xt(x0, torch.tensor(0.4), gen(0))
    assert not bool((x_t == MASK_ID).any())
    changed = float((x_t != x0).double().mean())
    assert changed == pytest.approx(0.6 * (1 - 1 / (V - 1)), abs=0.01)  # redrawn, not x0
    assert torch.equal(
        duo.expand(duo.compact(torch.arange(V)[torch.arange(V) != MASK_ID])),
        torch.arange(V)[torch.arange(V) != MASK_ID],
    )


def test_duo_loss_is_the_nelbo_of_what_the_backbone_saw() -> None:
    B, L = 3, 5
    logits = torch.randn(B, L, V, generator=gen(1))
    x0 = torch.tensor([[0, 1, 3, 4, 5]] * B)
    duo = DUO(LogLinear(), MASK_ID, V, prior_loss=True)
    fake = Recorder(logits)
    out = duo.loss(fake, x0, torch.ones_like(x0), gen(2))
    t = duo.sample_t(B, torch.device("cpu"), gen(2))  # the same first draw
    alpha = LogLinear().alpha(t)
    assert torch.allclose(fake.sigma, -torch.log(alpha))  # conditioned on -log alpha_t
    keep = [i for i in range(V) if i != MASK_ID]
    log_x = logits[..., keep].log_softmax(-1)
    compact = {v: i for i, v in enumerate(keep)}
    expect = torch.zeros(B, L)
    for b in range(B):
        a, beta = float(alpha[b]), float(LogLinear().dsigma(t)[b])
        for i in range(L):
            x, z = compact[int(x0[b, i])], compact[int(fake.seen[b, i])]
            expect[b, i] = usdm_slow(log_x[b, i].exp().tolist(), x, z, a, beta)
    prior = float(uniform_prior_kl(LogLinear().alpha(torch.ones(1)), V - 1))
    assert torch.allclose(out.nll, expect + prior, rtol=1e-4, atol=1e-6)


def test_states_vocab_draws_and_scores_the_mask_id_as_one_more_state() -> None:
    """states=vocab (DUO's own checkpoints): K = V, the noise draws the mask id like any
    other id, a mask id in the data is scored, and the loss is the slow NELBO over all V."""
    duo = DUO(LogLinear(), MASK_ID, V, states="vocab")
    assert duo.K == V
    x0 = torch.full((4000, 16), 5)
    x_t = duo.q_xt(x0, torch.tensor(0.4), gen(0))
    drawn = torch.bincount(x_t[x_t != x0], minlength=V).double()
    assert drawn[MASK_ID] > 0.5 * drawn.sum() / V  # a state as often as the others
    changed = float((x_t != x0).double().mean())
    assert changed == pytest.approx(0.6 * (1 - 1 / V), abs=0.01)
    B, L = 2, 5
    logits = torch.randn(B, L, V, generator=gen(4))
    x0 = torch.tensor([[0, 1, MASK_ID, 4, 6]] * B)
    fake = Recorder(logits)
    out = duo.loss(fake, x0, torch.ones_like(x0), gen(5))
    assert bool((out.mask == 1).all())  # the mask id is data like any other token here
    t = duo.sample_t(B, torch.device("cpu"), gen(5))
    alpha, beta = LogLinear().alpha(t), LogLinear().dsigma(t)
    p = logits.log_softmax(-1).exp()
    expect = torch.tensor(
        [
            [
                usdm_slow(p[b, i].tolist(), int(x0[b, i]), int(fake.seen[b, i]), alpha[b], beta[b])
                for i in range(L)
            ]
            for b in range(B)
        ]
    )
    prior = float(uniform_prior_kl(LogLinear().alpha(torch.ones(1)), V))
    assert torch.allclose(out.nll, expect + prior, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="parameterization.states='all'"):
        DUO(LogLinear(), MASK_ID, V, states="all")


def test_uniform_posterior_over_every_id_is_duos_formula() -> None:
    """With every id a state, the posterior equals DUO's closed form of q(x_s | x_t, x_theta)
    (its `_posterior_from_x0`, written out here): numerator a_t V x [j = x_t] + (a_t|s - a_t)
    [j = x_t] + (a_s - a_t) x + (1 - a_t|s)(1 - a_s) / V over a_t V x(x_t) + 1 - a_t."""
    Vd = 5
    g = gen(6)
    log_x = torch.randn(3, 4, Vd, generator=g, dtype=torch.float64).log_softmax(-1)
    x_t = torch.randint(0, Vd, (3, 4), generator=g)
    a_t, a_s = torch.tensor([0.1, 0.3, 0.6]).double(), torch.tensor([0.2, 0.5, 0.9]).double()
    post = uniform_posterior(log_x, x_t, a_t, a_s, torch.ones(Vd, dtype=torch.bool))
    x = log_x.exp()
    onehot = torch.nn.functional.one_hot(x_t, Vd).double()
    at, as_ = a_t[:, None, None], a_s[:, None, None]
    ats = at / as_
    num = at * Vd * x * onehot + (ats - at) * onehot + (as_ - at) * x + (1 - ats) * (1 - as_) / Vd
    den = at * Vd * x.gather(-1, x_t[..., None]) + (1 - at)
    assert torch.allclose(post, num / den, atol=1e-12)


def test_curriculum_feeds_soft_tokens_whose_argmax_is_x_t() -> None:
    B, L = 2, 6
    duo = DUO(
        LogLinear(), MASK_ID, V, curriculum=True, curriculum_end=10, gamma_min=-4, gamma_max=3
    )
    duo.train()
    duo.set_training_step(0)
    fake = Recorder(torch.zeros(B, L, V))
    x0 = torch.randint(0, V, (B, L), generator=gen(0)).clamp(min=MASK_ID + 1)
    duo.loss(fake, x0, torch.ones_like(x0), gen(3))
    soft = fake.seen
    assert soft.shape == (B, L, V) and soft.is_floating_point()
    assert torch.allclose(soft.sum(-1), torch.ones(B, L)) and bool((soft[..., MASK_ID] == 0).all())
    assert float(soft.max(-1).values.min()) > 0.99  # tau = 1e-3: practically one-hot
    duo.set_training_step(10)  # past the curriculum: discrete tokens again
    duo.loss(fake, x0, torch.ones_like(x0), gen(3))
    assert fake.seen.dtype == torch.long
    duo.set_training_step(0)
    duo.eval()  # evaluation is always the discrete NELBO
    duo.loss(fake, x0, torch.ones_like(x0), gen(3))
    assert fake.seen.dtype == torch.long


def test_dit_soft_one_hot_input_equals_the_token_input() -> None:
    torch.manual_seed(0)
    net = DiT(
        V, hidden_size=32, n_blocks=1, n_heads=2, max_length=8, cond_dim=16, time_conditioning=True
    )
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randint(0, V, (2, 8), generator=gen(0))
    sigma = torch.tensor([0.3, 1.2])
    hard = net(x, sigma)
    soft = net(torch.nn.functional.one_hot(x, V).float(), sigma)
    assert torch.allclose(hard, soft, atol=1e-5)


def test_duo_refuses_time_agnostic_and_conditioning() -> None:
    with pytest.raises(ValueError, match="time_conditioning=true"):
        DUO(LogLinear(), MASK_ID, V, time_conditioning=False)
    with pytest.raises(ValueError, match="mask_conditioning=false"):
        DUO(LogLinear(), MASK_ID, V, mask_conditioning=True)
    with pytest.raises(ValueError, match="T=0"):
        DUO(LogLinear(), MASK_ID, V, T=1000)


# ----------------------------------------------------------------------------- the sampler

K_TOY = NUM_TOKENS  # the toy's real tokens (mask id MASK = 3 is never used)


class UniformToyDenoiser:
    """The ELBO-optimal x_theta of the toy distribution under uniform noise with alpha = 1 - t:
    x_theta_i(x) proportional to p(x0_i = x | x_t) / q_t(x_t_i | x), from the exact posterior
    over all 81 sequences. `naive=True` returns p(x0_i | x_t) itself (a wrong mean)."""

    mask_id = MASK
    vocab_size = NUM_TOKENS + 1
    time_conditioned = True
    capabilities = model_capabilities({"uniform"}, True)

    def __init__(self, naive: bool = False) -> None:
        self.seqs, self.p = toy_distribution()
        self.naive = naive
        self.calls = 0

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def x_theta(self, x_t: Tensor, t: Tensor) -> Tensor:
        """(B, L), (B,) -> (B, L, 3) float64."""
        a = (1.0 - t.to(torch.float64))[:, None, None]  # (B, 1, 1)
        same = (x_t[:, None, :] == self.seqs[None]).to(torch.float64)  # (B, S, L)
        q = a * same + (1 - a) / K_TOY  # q_t(x_t_i | s_i)
        w = q.prod(-1) * self.p  # (B, S) posterior over sequences (unnormalised)
        onehot = torch.nn.functional.one_hot(self.seqs, K_TOY).to(torch.float64)  # (S, L, 3)
        post = torch.einsum("bs,slv->blv", w, onehot)
        post = post / post.sum(-1, keepdim=True)  # p(x0_i | x_t)
        if self.naive:
            return post
        q_self = a * torch.nn.functional.one_hot(x_t, K_TOY).to(torch.float64) + (1 - a) / K_TOY
        mean = post / q_self  # / q_t(x_t_i | x), as a function of x
        return mean / mean.sum(-1, keepdim=True)

    def log_p_x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        if bool((t == t[0]).all()):  # one t: tabulate the 81 states, then look them up
            table = self.x_theta(self.seqs, t[:1].expand(len(self.seqs)))  # (S, L, 3)
            index = (x_t * K_TOY ** torch.arange(L_TOY - 1, -1, -1)).sum(-1)  # (B,)
            log_x = table[index].log()
        else:
            log_x = self.x_theta(x_t, t).log()
        return torch.cat([log_x, torch.full_like(log_x[..., :1], -torch.inf)], -1)


def chain_distribution(
    denoiser: UniformToyDenoiser, steps: int, grid: Tensor | None = None
) -> Tensor:
    """(81,) the exact output distribution of `steps` ancestral steps (the 81 x 81 transition
    of each step is the product of the per-position posteriors), from the uniform prior;
    `grid`: the times visited (default steps + 1 uniform ones from 1 to 0)."""
    seqs = denoiser.seqs  # (S, L)
    S = len(seqs)
    dist = torch.full((S,), 1.0 / S, dtype=torch.float64)
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64) if grid is None else grid
    steps = len(ts) - 1
    real = torch.tensor([True] * K_TOY + [False])
    for i in range(steps):
        t = torch.full((S,), float(ts[i]))
        alpha_t, alpha_s = (
            1 - t.double(),
            torch.full((S,), 1 - float(ts[i + 1]), dtype=torch.float64),
        )
        post = uniform_posterior(
            denoiser.log_p_x0(seqs, t), seqs, alpha_t, alpha_s, real
        )  # (S, L, V)
        # P[from, to] = prod_i post[from, i, to_i]
        picked = post[:, torch.arange(L_TOY)[None, :], seqs]  # (S_from, S_to, L)
        dist = dist @ picked.prod(-1)
    return dist


def test_uniform_posterior_by_hand() -> None:
    """K = 2, alpha_t = 0.25, alpha_s = 0.5 (alpha_t|s = 0.5), x_t = 0, x_theta = (0.2, 0.8)."""
    log_x = torch.tensor([[[0.2, 0.8, 0.0]]]).log()
    real = torch.tensor([True, True, False])
    post = uniform_posterior(
        log_x, torch.tensor([[0]]), torch.tensor([0.25]), torch.tensor([0.5]), real
    )
    from_t = torch.tensor([0.5 + 0.25, 0.25])  # alpha_ts [j = 0] + (1 - alpha_ts) / 2
    from_x = torch.tensor([0.5 * 0.2 + 0.25, 0.5 * 0.8 + 0.25])
    expect = from_t * from_x / (from_t * from_x).sum()
    assert torch.allclose(post[0, 0, :2].float(), expect) and float(post[0, 0, 2]) == 0.0


def test_uniform_chain_converges_to_the_data_and_the_naive_mean_does_not() -> None:
    _, p = toy_distribution()
    right = {n: tv(chain_distribution(UniformToyDenoiser(), n), p) for n in (4, 16, 128)}
    assert right[128] < right[16] < right[4] and right[128] < 0.02
    naive = tv(chain_distribution(UniformToyDenoiser(naive=True), 128), p)
    assert naive > 5 * right[128]  # x_theta must be DUO's mean, not p(x0 | x_t)


def test_uniform_sampler_draws_its_exact_chain_distribution() -> None:
    steps, n = 64, 10_000
    _, p = toy_distribution()
    exact = chain_distribution(UniformToyDenoiser(), steps)
    den = UniformToyDenoiser()
    out = UniformSampler(steps=steps).sample(den, n, L_TOY, generator=gen(1))
    assert den.calls == steps and bool((out.tokens != MASK).all())
    assert tv(empirical(out.tokens), exact) < tv_bound(exact, n)
    assert tv(empirical(out.tokens), p) < tv_bound(p, n, bias=tv(exact, p))


def test_uniform_sampler_on_duos_grid_draws_its_chain() -> None:
    """t_min > 0: DUO's schedule, `steps` steps from 1 to t_min and one more from t_min to 0
    (steps + 1 calls). t_min = 0.5 makes it far from ours; the samples follow DUO's chain."""
    steps, n, t_min = 3, 40_000, 0.5
    duo_grid = torch.cat([torch.linspace(1.0, t_min, steps + 1), torch.zeros(1)]).double()
    theirs = chain_distribution(UniformToyDenoiser(), steps, duo_grid)
    ours = chain_distribution(UniformToyDenoiser(), steps)
    assert tv(theirs, ours) > 2 * tv_bound(theirs, n)  # the two schedules differ here
    den = UniformToyDenoiser()
    out = UniformSampler(steps=steps, t_min=t_min).sample(den, n, L_TOY, generator=gen(2))
    assert den.calls == steps + 1 and out.nfe == steps + 1
    assert tv(empirical(out.tokens), theirs) < tv_bound(theirs, n)
    with pytest.raises(ValueError, match=r"sampler.t_min=1.0 must lie in \[0, 1\)"):
        UniformSampler(t_min=1.0)


def test_uniform_sampler_greedy_tail_and_prompt() -> None:
    den = UniformToyDenoiser()
    out = UniformSampler(steps=8, greedy_tail=True).sample(den, 50, L_TOY, generator=gen(0))
    assert bool((out.tokens < K_TOY).all()) and den.calls == 8
    prefix = torch.tensor([2])
    held = UniformSampler(steps=8).sample(den, 20, L_TOY, prefix=prefix, generator=gen(0))
    assert bool((held.tokens[:, 0] == 2).all())
    with pytest.raises(ValueError, match="cfg_scale must be 0"):
        UniformSampler(cfg_scale=1.0)


def test_uniform_sampler_prior_covers_every_state() -> None:
    """With states=vocab the prior is uniform over all V ids, the mask id included; with
    states=real it never draws the mask id."""

    class Flat(torch.nn.Module):
        def forward(self, x_t, sigma=None, attention_mask=None):
            return torch.zeros(*x_t.shape, V)

    for states, share in (("vocab", 1 / V), ("real", 0.0)):
        duo = DUO(LogLinear(), MASK_ID, V, states=states)
        seen: list[Tensor] = []
        sampler = UniformSampler(steps=1)
        sampler.sample(duo.denoiser(Flat()), 2000, 8, generator=gen(7), on_step=seen.append)
        prior = seen[1]  # seen[0]: the starting canvas (all mask ids)
        assert float((prior == MASK_ID).double().mean()) == pytest.approx(share, abs=0.01)


def test_uniform_sampler_refuses_absorbing_models_and_absorbing_samplers_refuse_duo() -> None:
    from samplers.ddpm import DDPMSampler
    from tests.test_samplers import ExactDenoiser

    with pytest.raises(ValueError, match="uniform"):
        UniformSampler(steps=4).sample(ExactDenoiser(), 2, L_TOY)
    with pytest.raises(ValueError, match="absorbing|masked"):
        DDPMSampler(steps=4).sample(UniformToyDenoiser(), 2, L_TOY)


def test_uniform_yaml_builds() -> None:
    sampler = instantiate(OmegaConf.load(ROOT / "configs" / "sampler" / "uniform.yaml"))
    assert sampler.name == "uniform"
    out = sampler.sample(UniformToyDenoiser(), 2, L_TOY, generator=gen())
    assert out.tokens.shape == (2, L_TOY)


# ----------------------------------------------------------------------------- distillation


def markov_data(n: int, length: int, vocab: int, seed: int) -> Tensor:
    """Rows of a sticky Markov chain over `vocab` tokens (strong neighbour dependencies)."""
    g = gen(seed)
    x = torch.zeros(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for i in range(1, length):
        stay = torch.rand(n, generator=g) < 0.8
        step = (x[:, i - 1] + 1) % vocab
        x[:, i] = torch.where(stay, x[:, i - 1], step)
    return x


def markov_nll(x: Tensor, vocab: int) -> float:
    """Mean per-token NLL of rows under the chain (impossible transitions cost log(1e-6))."""
    first = math.log(vocab)
    prev, nxt = x[:, :-1], x[:, 1:]
    p = torch.where(nxt == prev, 0.8, torch.where(nxt == (prev + 1) % vocab, 0.2, 1e-6))
    return float((first + -p.log().sum(1)).mean() / x.shape[1])


@pytest.mark.slow
def test_distillation_improves_the_eight_step_sampler() -> None:
    torch.manual_seed(0)
    vocab, length, mask = 6, 16, 6  # tokens 0..5, mask id 6 unused by DUO
    data = markov_data(4096, length, vocab, seed=0)
    net = DiT(
        vocab + 1,
        hidden_size=64,
        n_blocks=2,
        n_heads=2,
        max_length=length,
        cond_dim=32,
        time_conditioning=True,
    )
    teacher_obj = DUO(LogLinear(), mask, vocab + 1)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    ones = torch.ones(64, length)
    for step in range(600):
        batch = data[torch.randint(0, len(data), (64,), generator=gen(step))]
        loss = teacher_obj.loss(net, batch, ones, gen(10_000 + step)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def eight_step_nll(model) -> float:
        den = teacher_obj.denoiser(model.eval())
        out = UniformSampler(steps=8).sample(den, 512, length, generator=gen(123))
        model.train()
        return markov_nll(out.tokens, vocab)

    before = eight_step_nll(net)
    distill = DUODistill(
        LogLinear(),
        mask,
        vocab + 1,
        gamma_min=-5.0,
        gamma_max=4.0,
        distill_T=64,
        update_teacher_every=60,
    )
    distill.train()
    opt = torch.optim.AdamW(net.parameters(), lr=5e-4)
    for step in range(240):  # 4 rounds: dt = 1/64, 2/64, 4/64, 8/64
        distill.set_training_step(step)
        batch = data[torch.randint(0, len(data), (64,), generator=gen(50_000 + step))]
        loss = distill.loss(net, batch, ones, gen(60_000 + step)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eight_step_nll(net)
    assert after < before, (before, after)


def test_distill_shares_duos_settings_and_refuses_the_curriculum() -> None:
    """DUODistill takes DUO's own settings through to DUO (one definition of each) and refuses
    the curriculum, which belongs to DUO's training."""
    d = DUODistill(LogLinear(), MASK_ID, V, sampling_eps=0.01, antithetic=False, prior_loss=False)
    assert (d.sampling_eps, d.antithetic, d.prior_loss, d.curriculum) == (0.01, False, False, False)
    assert (d.gamma_min, d.gamma_max, d.T, d.time_conditioned) == (-4.0, -1.0, 0, True)
    for bad in ({"curriculum": True}, {"curriculum_end": 5}, {"gumbel_tau_log10_start": -2.0}):
        with pytest.raises(ValueError, match="no curriculum settings"):
            DUODistill(LogLinear(), MASK_ID, V, **bad)
    with pytest.raises(ValueError, match="T=0"):
        DUODistill(LogLinear(), MASK_ID, V, T=10)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_duo_end_to_end_train_ppl_eval_sample_eval_and_distill(tmp_path) -> None:
    overrides = [
        "parameterization=duo",
        "sampler=uniform",
        "parameterization.curriculum=true",
        "parameterization.curriculum_end=2",
        "parameterization.gamma_min=-4",
        "parameterization.gamma_max=3",
    ]
    run_main(tmp_path / "train", *overrides)
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    run_main(tmp_path / "ppl", "mode=ppl_eval", f"eval.checkpoint_path={ckpt}", *overrides)
    stats = json.loads((tmp_path / "ppl" / "ppl_eval.json").read_text())
    assert stats["bound"] is True and stats["ppl"] > 1 and stats["parameterization"] == "DUO"
    run_main(tmp_path / "sample", "mode=sample_eval", f"eval.checkpoint_path={ckpt}", *overrides)
    report = json.loads((tmp_path / "sample" / "sample_eval.json").read_text())
    assert report["num_samples"] == 2 and report["entropy"] > 0
    distill = ["parameterization=duo_distill", "sampler=uniform", "sampler.steps=4"]
    run_main(
        tmp_path / "distill",
        *distill,
        f"training.init_from_ckpt={ckpt}",
        "parameterization.update_teacher_every=2",
        "parameterization.distill_T=8",
    )
    stats = json.loads((tmp_path / "distill" / "ppl_eval.json").read_text())
    assert stats["ppl"] > 1  # the student's DUO NELBO
    # the README's line: the checkpoint's sampler (uniform) with the steps named
    student = tmp_path / "distill" / "checkpoints" / "last.ckpt"
    run_main(
        tmp_path / "few", "mode=sample_eval", f"eval.checkpoint_path={student}", "sampler.steps=2"
    )
    report = json.loads((tmp_path / "few" / "sample_eval.json").read_text())
    assert (report["sampler"], report["steps"]) == ("UniformSampler", 2)
