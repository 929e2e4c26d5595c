"""Audit of DUO, SEDD and D3PM against their papers: float64 slow references for what float32
rounds near t = 0 (the DUO NELBO, the uniform and analytic sampler steps), and the prior term
of DUO's curriculum (the KL at the Gaussian process's own alpha_1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

import samplers.analytic as analytic_mod
import samplers.uniform as uniform_mod
from diffusion.noise import Cosine, LogLinear
from diffusion.objectives.duo import DUO
from samplers.analytic import AnalyticSampler
from samplers.base import model_capabilities
from samplers.uniform import UniformSampler
from tests.test_duo import Recorder as Fixed  # fixed logits, recording what it saw
from tests.test_samplers import FixedDenoiser


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def usdm_slow(p: list[float], x: int, z: int, a: float, beta: float) -> float:
    """UDLM's NELBO integrand in float64: (beta / K) sum_{z' != z} [model rate - true rate +
    true rate log(true / model)], rates xbar(z') / xbar(z), xbar = K a onehot(x) + 1 - a."""
    K = len(p)
    xbar = [K * a * (j == x) + 1 - a for j in range(K)]
    xbar_theta = [K * a * p[j] + 1 - a for j in range(K)]
    total = 0.0
    for zp in range(K):
        if zp != z:
            true, model = xbar[zp] / xbar[z], xbar_theta[zp] / xbar_theta[z]
            total += model - true + true * math.log(true / model)
    return beta / K * total


# ---------------------------------------------------------------- DUO: the NELBO near t = 0


@pytest.mark.parametrize("t_value", [1e-3, 3e-3])
def test_duo_nelbo_keeps_its_precision_near_t0_with_cosine(t_value: float) -> None:
    """Cosine at t = 1e-3 has 1 - alpha = 1.2e-6: a float32 alpha_t rounds it by ~2%, and with
    it every term of a token that changed (x_t != x0). The slow reference uses float64 alpha."""
    V, mask_id, B, L = 9, 8, 2, 4
    noise = Cosine()
    duo = DUO(noise, mask_id, V, prior_loss=False)
    t = torch.full((B,), t_value)
    x0 = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    x_t = torch.tensor([[0, 5, 2, 7], [1, 5, 3, 7]])  # some tokens changed, some kept
    duo.sample_t = lambda n, device, generator=None, rows=None: t  # type: ignore[method-assign]
    duo.q_xt = lambda x0, alpha, generator=None, rows=None: x_t  # type: ignore[method-assign]
    logits = torch.randn(B, L, V, generator=gen(1)) * 2
    out = duo.loss(Fixed(logits), x0, torch.ones_like(x0))
    log_x = logits[..., :mask_id].double().log_softmax(-1)
    t64 = t.double()
    a, beta = noise.alpha(t64), noise.dsigma(t64)
    expect = torch.tensor(
        [
            [
                usdm_slow(log_x[b, i].exp().tolist(), int(x0[b, i]), int(x_t[b, i]), a[b], beta[b])
                for i in range(L)
            ]
            for b in range(B)
        ],
        dtype=torch.float64,
    )
    assert torch.allclose(out.nll.double(), expect, rtol=1e-5, atol=0), (out.nll, expect)


def test_duo_conditions_training_and_sampling_on_the_same_sigma() -> None:
    """The loss and the denoiser give the backbone the same sigma = -log alpha_t at one t."""
    V, mask_id, B, L = 9, 8, 2, 3
    duo = DUO(Cosine(), mask_id, V)
    t = torch.tensor([1e-3, 0.4])
    duo.sample_t = lambda n, device, generator=None, rows=None: t  # type: ignore[method-assign]
    fake = Fixed(torch.zeros(B, L, V))
    x0 = torch.zeros(B, L, dtype=torch.long)
    duo.loss(fake, x0, torch.ones_like(x0), gen(0))
    train_sigma = fake.sigma
    duo.denoiser(fake).log_p_x0(x0, t)
    assert fake.sigma.dtype == torch.float32
    assert torch.equal(fake.sigma, train_sigma)
    assert torch.allclose(train_sigma.double(), Cosine().sigma(t.double()), rtol=1e-6)


# ---------------------------------------------------------------- DUO: the curriculum's prior


def gaussian_alpha_slow(gamma: float, K: int) -> float:
    """T(gamma) by a fine midpoint rule on P(argmax(a onehot(x) + s eps) = x), float64."""
    r = math.exp(-gamma / 2)
    z = np.linspace(-12, 12, 400_001)
    dz = z[1] - z[0]
    zm = z[:-1] + dz / 2
    cdf = 0.5 * (1 + np.vectorize(math.erf)((zm + r) / math.sqrt(2)))
    p = float(np.sum(np.exp(-0.5 * zm**2) / math.sqrt(2 * math.pi) * cdf ** (K - 1)) * dz)
    return (K * p - 1) / (K - 1)


def test_curriculum_prior_term_is_the_kl_of_the_gaussian_process_at_t1() -> None:
    """During the curriculum x_t comes from the uniform process at alpha_t = T(gamma(t)); its
    prior term is KL(q_1(. | x) || uniform) at alpha_1 = T(gamma_max), not at the discrete
    schedule's alpha(1) (0.3 nats vs 0.003 at BERT's vocabulary; 2.1 vs 0.004 nats here)."""
    V, mask_id, B, L = 9, 8, 2, 3
    K = V - 1
    kwargs = dict(curriculum=True, curriculum_end=10, gamma_min=-4.0, gamma_max=-1.0)
    with_prior = DUO(LogLinear(), mask_id, V, prior_loss=True, **kwargs).train()
    without = DUO(LogLinear(), mask_id, V, prior_loss=False, **kwargs).train()
    x0 = torch.tensor([[0, 1, 2], [3, 4, 5]])
    logits = torch.randn(B, L, V, generator=gen(0))
    a = gaussian_alpha_slow(-1.0, K)
    q = np.array([a + (1 - a) / K] + [(1 - a) / K] * (K - 1))
    kl = float(np.sum(q * np.log(q * K)))
    diff = (
        with_prior.loss(Fixed(logits), x0, torch.ones_like(x0), gen(3)).nll
        - without.loss(Fixed(logits), x0, torch.ones_like(x0), gen(3)).nll
    )
    assert torch.allclose(diff.double(), torch.full((B, L), kl, dtype=torch.float64), rtol=1e-5)


# ---------------------------------------------------------------- the samplers near t = 0


class UniformFixed:
    """A uniform-state denoiser: a fixed x_theta over the K = V - 1 real tokens, cosine alphas."""

    time_conditioned = True
    capabilities = model_capabilities({"uniform"}, True)

    def __init__(self, x_theta: Tensor) -> None:
        self.x_theta = x_theta  # (L, K)
        self.vocab_size = x_theta.shape[-1] + 1
        self.mask_id = x_theta.shape[-1]
        self.noise = Cosine()

    def alpha(self, t: Tensor) -> Tensor:
        return self.noise.alpha(t)

    def log_p_x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        log_x = self.x_theta.log().expand(len(x_t), -1, -1)
        return torch.cat([log_x, torch.full_like(log_x[..., :1], -torch.inf)], -1)


def record_calls(monkeypatch, module, name: str) -> list[tuple]:
    """Wrap module.name so that every call's arguments and result are kept."""
    real, calls = getattr(module, name), []

    def wrapper(*args):
        out = real(*args)
        calls.append((*args, out))
        return out

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_uniform_sampler_steps_match_the_float64_posterior_near_t0(monkeypatch) -> None:
    """Every step is a distribution, and near t = 0 (cosine, 1000 steps: 1 - alpha_t|s ~ 4e-6)
    it equals DUO's posterior (alpha_t|s [j = x_t] + (1 - alpha_t|s) / K) (alpha_s x_theta(j) +
    (1 - alpha_s) / K), normalised, written out in float64 at the grid times."""
    steps, L, K = 1000, 2, 4
    x_theta = torch.rand(L, K, generator=gen(0)).softmax(-1).double()
    calls = record_calls(monkeypatch, uniform_mod, "uniform_posterior")
    UniformSampler(steps=steps).sample(UniformFixed(x_theta.float()), 1, L, generator=gen(1))
    assert len(calls) == steps
    for *_, post in calls:
        assert bool((post >= 0).all()) and torch.allclose(post.sum(-1), torch.ones(1, L).double())
    noise = Cosine()
    for i in (steps - 3, steps - 2):  # t = 3e-3 -> 2e-3, 2e-3 -> 1e-3
        x_t, post = calls[i][1], calls[i][-1]
        t, s = 1 - i / steps, 1 - (i + 1) / steps
        a_t = float(noise.alpha(torch.tensor(t, dtype=torch.float64)))
        a_s = float(noise.alpha(torch.tensor(s, dtype=torch.float64)))
        for pos in range(L):
            z = int(x_t[0, pos])
            w = [
                (a_t / a_s * (j == z) + (1 - a_t / a_s) / K)
                * (a_s * float(x_theta[pos, j]) + (1 - a_s) / K)
                for j in range(K)
            ]
            expect = torch.tensor([v / sum(w) for v in w] + [0.0], dtype=torch.float64)
            assert torch.allclose(post[0, pos], expect, rtol=1e-5, atol=1e-12), (i, pos)


class CosineScore(FixedDenoiser):
    """A SEDD-like denoiser on the cosine schedule with a fixed small score s_v (so masked
    tokens mostly stay masked down to t ~ 0, where the steps are checked)."""

    def __init__(self, log_score: Tensor) -> None:
        super().__init__(log_score.exp()[..., :-1])
        self.capabilities = model_capabilities({"absorbing", "log_score", "whole_canvas"}, False)
        self.fixed_log_score = log_score  # (1, L, V), the mask column last

    def alpha(self, t: Tensor) -> Tensor:
        return Cosine().alpha(t)

    def log_score(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.fixed_log_score.expand(len(x_t), -1, -1).clone()


def test_analytic_steps_match_the_float64_posterior_near_t0(monkeypatch) -> None:
    """SEDD's Tweedie step from a masked token: p(x_s = v) = s_v expm1(dsigma), p(x_s = mask)
    = 1 - expm1(dsigma) sum_v s_v, expm1(dsigma) = (alpha_s - alpha_t) / alpha_t, in float64 at
    the grid times (cosine, 1000 steps: alpha_s - alpha_t ~ 4e-6 near t = 0, which float32
    alphas round by ~2%)."""
    steps, L, V = 1000, 3, 6
    log_s = torch.rand(1, L, V, generator=gen(2)).double() - 8.0  # s_v ~ 3e-4
    log_s[..., -1] = 0.0  # x_t's own entry (the mask)
    calls = record_calls(monkeypatch, analytic_mod, "analytic_posterior")
    AnalyticSampler(steps=steps).sample(CosineScore(log_s.float()), 1, L, generator=gen(3))
    noise = Cosine()
    checked = 0
    for i, (_, x_t, _, _, mask_id, post) in enumerate(calls):
        assert bool((post >= 0).all()) and torch.allclose(post.sum(-1), torch.ones(1, L).double())
        t, s = 1 - i / steps, 1 - (i + 1) / steps
        if not 0 < s < 0.005:
            continue
        a_t = float(noise.alpha(torch.tensor(t, dtype=torch.float64)))
        a_s = float(noise.alpha(torch.tensor(s, dtype=torch.float64)))
        for pos in range(L):
            if int(x_t[0, pos]) != mask_id:
                continue
            clean = log_s[0, pos, :-1].float().double().exp() * (a_s - a_t) / a_t
            expect = torch.cat([clean, (1 - clean.sum()).reshape(1)])
            assert torch.allclose(post[0, pos], expect, rtol=1e-5, atol=0), (i, pos)
            checked += 1
    assert checked > 0


class CosineFixed(FixedDenoiser):
    """The absorbing FixedDenoiser on the cosine schedule."""

    def alpha(self, t: Tensor) -> Tensor:
        return Cosine().alpha(t)


@pytest.mark.parametrize("sampler", ["ddpm", "ddpm_cache"])
def test_ddpm_unmasking_probabilities_keep_their_precision_near_t0(monkeypatch, sampler) -> None:
    """MDLM eq. 7's (alpha_s - alpha_t) / (1 - alpha_t) at the grid times, in float64: on the
    cosine schedule near t = 0 both are differences of alphas near 1, which float32 alphas
    (the samplers' float32 times) rounded by ~1-5% in the last steps of a 1000-step run."""
    import samplers.ddpm as ddpm_mod
    from samplers.ddpm import DDPMSampler
    from samplers.ddpm_cache import DDPMCacheSampler

    steps, L = 1000, 4
    probs = torch.rand(1, L, 5, generator=gen(4)).softmax(-1)
    calls = record_calls(monkeypatch, ddpm_mod, "unmask_probability")
    cls = DDPMSampler if sampler == "ddpm" else DDPMCacheSampler
    cls(steps=steps).sample(CosineFixed(probs), 1, L, generator=gen(5))
    assert len(calls) == steps
    noise = Cosine()
    for i in range(steps - 6, steps - 1):  # t = 6e-3 -> 5e-3, ..., 2e-3 -> 1e-3
        t, s = 1 - i / steps, 1 - (i + 1) / steps
        a_t = float(noise.alpha(torch.tensor(t, dtype=torch.float64)))
        a_s = float(noise.alpha(torch.tensor(s, dtype=torch.float64)))
        got = float(calls[i][-1][0])
        assert got == pytest.approx((a_s - a_t) / (1 - a_t), rel=1e-5), i


@pytest.mark.parametrize("mask_id", [3, 8])  # inside the vocabulary, and its last id
def test_duo_leaves_a_mask_id_in_the_data_unscored(mask_id: int, caplog) -> None:
    """The uniform process has no state for the mask id: a literal mask token in the data was
    compacted onto its neighbour's index and scored as that token (or, as the last id, indexed
    past K). It is now left out of the score, with the absorbing objectives' warning, and the
    other positions' terms are those of the same batch with a real token in its place."""
    V, B, L = 9, 2, 4
    duo = DUO(LogLinear(), mask_id, V)
    logits = torch.randn(B, L, V, generator=gen(6))
    x0 = torch.tensor([[0, 1, mask_id, 2], [mask_id, 4, 5, 6]])
    with caplog.at_level("WARNING"):
        out = duo.loss(Fixed(logits), x0, torch.ones_like(x0), gen(7))
    assert "the data holds the mask id" in caplog.text
    assert out.mask.tolist() == [[1, 1, 0, 1], [0, 1, 1, 1]]
    assert torch.equal(out.targets, x0)
    clean = x0.masked_fill(x0 == mask_id, 0)
    ref = DUO(LogLinear(), mask_id, V).loss(Fixed(logits), clean, torch.ones_like(x0), gen(7))
    keep = out.mask.bool()
    assert torch.equal(out.nll[keep], ref.nll[keep]) and bool(torch.isfinite(out.nll).all())
