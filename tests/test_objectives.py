"""Golden tests for D3PM, SEDD and AR against slow reference implementations written here
(explicit transition matrices and loops), the continuous-time limit by exact enumeration,
and the config rules that tie each parameterization to T, time conditioning and samplers."""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from diffusion.config import ConfigError, register_resolvers, validate_config
from diffusion.module import DiffusionModule
from diffusion.noise import Cosine, LogLinear
from diffusion.objectives.ar import AR
from diffusion.objectives.d3pm import D3PM
from diffusion.objectives.sedd import SEDD
from diffusion.objectives.subs import NEG_INF, SUBS
from models.dit import DiT

MASK, V = 3, 4  # tokens {0, 1, 2} and the mask


class Fixed(torch.nn.Module):
    """A fake backbone returning fixed logits and recording its inputs."""

    def __init__(self, logits, causal=None):
        super().__init__()
        self.logits = logits
        if causal is not None:
            self.causal = causal

    def forward(self, x_t, sigma=None, attention_mask=None):
        self.seen, self.sigma, self.attn = x_t, sigma, attention_mask
        return self.logits.clone()


# ---- D3PM: a slow reference with explicit transition matrices ------------------------------
def q_cumulative(alpha: float) -> np.ndarray:
    """Q_t[i, j] = q(x_t = j | x0 = i) for the absorbing process."""
    Q = np.zeros((V, V))
    for i in range(V):
        if i == MASK:
            Q[i, MASK] = 1.0
        else:
            Q[i, i], Q[i, MASK] = alpha, 1 - alpha
    return Q


def q_step(alpha_t: float, alpha_s: float) -> np.ndarray:
    """Q_{t|s}[i, j] = q(x_t = j | x_s = i): keep with prob alpha_t / alpha_s."""
    return q_cumulative(alpha_t / alpha_s)


def d3pm_kl_slow(p_x0: np.ndarray, x0: int, xt: int, alpha_t: float, alpha_s: float) -> float:
    """KL(q(x_s | x_t, x0) || p(x_s | x_t)) with D3PM eq. 4, by enumeration over x_s and x0'."""
    Qs, Qt, Qts = q_cumulative(alpha_s), q_cumulative(alpha_t), q_step(alpha_t, alpha_s)
    q = np.array([Qts[j, xt] * Qs[x0, j] / Qt[x0, xt] for j in range(V)])
    p = np.array([sum(Qts[j, xt] * Qs[i, j] * p_x0[i] for i in range(V)) for j in range(V)])
    p = p / p.sum()
    return sum(q[j] * (math.log(q[j]) - math.log(p[j])) for j in range(V) if q[j] > 0)


def d3pm_reverse_slow(p_x0: np.ndarray, xt: int, alpha_t: float, alpha_s: float) -> np.ndarray:
    Qs, Qts = q_cumulative(alpha_s), q_step(alpha_t, alpha_s)
    p = np.array([sum(Qts[j, xt] * Qs[i, j] * p_x0[i] for i in range(V)) for j in range(V)])
    return p / p.sum()


@pytest.mark.parametrize("noise", [LogLinear(1e-3), Cosine(1e-3)], ids=["loglinear", "cosine"])
@pytest.mark.parametrize("subs_masking", [False, True])
def test_d3pm_terms_match_transition_matrices(noise, subs_masking):
    torch.manual_seed(0)
    T = 4
    obj = D3PM(noise, mask_id=MASK, vocab_size=V, T=T, subs_masking=subs_masking)
    x0 = torch.tensor([[0, 2, 1], [1, 1, 0], [2, 0, 0], [0, 1, 2]])
    x_t = torch.tensor([[MASK, 2, MASK], [MASK, MASK, MASK], [2, MASK, MASK], [MASK, 1, MASK]])
    x_t = torch.where(x_t == MASK, x_t, x0)  # clean positions hold x0
    t = torch.tensor([0.25, 0.5, 0.75, 1.0])  # every grid point, t = 1/T included
    logits = torch.randn(4, 3, V)
    log_p = obj.log_p_x0(logits, x_t)
    nll = obj.nll_per_token(log_p, x0, x_t, t)
    for b, i in itertools.product(range(4), range(3)):
        a_t, a_s = (
            float(noise.alpha(t[b : b + 1].double())),
            float(noise.alpha(t[b : b + 1].double() - 1 / T)),
        )
        p_x0 = log_p[b, i].double().exp().numpy()
        expected = T * d3pm_kl_slow(p_x0, int(x0[b, i]), int(x_t[b, i]), a_t, a_s)
        assert float(nll[b, i]) == pytest.approx(expected, rel=1e-4, abs=1e-5), (b, i)
    assert (nll[x_t != MASK] == 0).all()  # clean positions: q and p both keep x_t
    if subs_masking:
        assert (log_p[..., MASK] < -1e5).all()
    else:
        assert (log_p[..., MASK] > -20).all()  # the plain softmax may predict the mask


@pytest.mark.parametrize("subs_masking", [False, True])
def test_d3pm_reconstruction_term_is_the_first_step(subs_masking):
    """At t = 1/T (s = 0, alpha(0) = 1) the term is -log p_theta(x0 | x_{1/T}), nothing else."""
    torch.manual_seed(1)
    T = 10
    noise = LogLinear(1e-3)
    assert float(noise.alpha(torch.tensor(0.0))) == 1.0  # x at t = 0 is x0 itself
    obj = D3PM(noise, mask_id=MASK, vocab_size=V, T=T, subs_masking=subs_masking)
    x0 = torch.tensor([[2, 0, 1]])
    x_t = torch.tensor([[MASK, 0, MASK]])
    log_p = obj.log_p_x0(torch.randn(1, 3, V), x_t)
    nll = obj.nll_per_token(log_p, x0, x_t, torch.tensor([1.0 / T]))
    a_t = float(noise.alpha(torch.tensor(1.0 / T, dtype=torch.float64)))
    for i in (0, 2):
        p_xs = d3pm_reverse_slow(log_p[0, i].double().exp().numpy(), MASK, a_t, 1.0)
        assert float(nll[0, i]) / T == pytest.approx(-math.log(p_xs[int(x0[0, i])]), rel=1e-5)
        if subs_masking:  # no mask mass: the reconstruction is the masked-LM cross-entropy
            assert float(nll[0, i]) / T == pytest.approx(-float(log_p[0, i, x0[0, i]]), rel=1e-5)
    assert nll[0, 1] == 0


def test_d3pm_loss_replays_the_draws_and_needs_T():
    torch.manual_seed(2)
    T = 8
    obj = D3PM(LogLinear(1e-3), mask_id=MASK, vocab_size=V, T=T, time_conditioning=True)
    x0 = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]])
    logits = torch.randn(2, 4, V)
    backbone = Fixed(logits)
    out = obj.loss(backbone, x0, torch.ones_like(x0), generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    u = (torch.rand(2, generator=g) + torch.arange(2)) / 2
    t = (torch.floor(u * T) + 1) / T
    masked = torch.rand(2, 4, generator=g) < ((1 - 1e-3) * t)[:, None]
    assert torch.equal(backbone.seen == MASK, masked)
    torch.testing.assert_close(backbone.sigma, LogLinear(1e-3).sigma(t))  # time-conditioned
    log_p = logits.log_softmax(-1)
    for b, i in itertools.product(range(2), range(4)):
        expected = 0.0
        if masked[b, i]:
            a_t, a_s = 1 - (1 - 1e-3) * float(t[b]), 1 - (1 - 1e-3) * (float(t[b]) - 1 / T)
            expected = T * d3pm_kl_slow(
                log_p[b, i].double().exp().numpy(), int(x0[b, i]), MASK, a_t, a_s
            )
        assert float(out.nll[b, i]) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="parameterization=d3pm.*T > 0"):
        D3PM(LogLinear(), mask_id=MASK, vocab_size=V, T=0)


def test_d3pm_with_subs_masking_is_subs_in_discrete_time():
    torch.manual_seed(3)
    T = 50
    x0 = torch.randint(0, 3, (3, 6))
    x_t = torch.where(torch.rand(3, 6) < 0.5, MASK, x0)
    t = torch.tensor([1.0 / T, 0.5, 1.0])
    logits = torch.randn(3, 6, V)
    for noise in (LogLinear(1e-3), Cosine(1e-3)):
        d3pm = D3PM(noise, mask_id=MASK, vocab_size=V, T=T, subs_masking=True)
        subs = SUBS(noise, mask_id=MASK, vocab_size=V, T=T)
        torch.testing.assert_close(
            d3pm.nll_per_token(d3pm.log_p_x0(logits, x_t), x0, x_t, t),
            subs.nll_per_token(subs.log_p_x0(logits, x_t), x0, x_t, t),
            rtol=1e-4,
            atol=1e-4,
        )


# ---- the continuous-time limit, by exact enumeration of the masks ---------------------------
L = 3
X0 = torch.tensor([2, 0, 1])
PATTERNS = torch.tensor(list(itertools.product([0, 1], repeat=L)), dtype=torch.bool)  # (8, L)
_g = torch.Generator().manual_seed(7)
TABLE_A, TABLE_B = torch.randn(L, V, generator=_g), torch.randn(V, V, generator=_g)


def fake_logits(x_t):
    """A deterministic 'network': position i looks at itself and its right neighbour."""
    return TABLE_A[None] + TABLE_B[x_t.roll(-1, dims=1)] + 0.5 * TABLE_B[x_t]


def expected_nelbo(obj, t, noise):
    """E over all 2^L masks at each time in t (n,) -> (n,) expected summed NELBO terms."""
    n = len(t)
    x_t = torch.where(PATTERNS, MASK, X0)  # (8, L)
    x_t_all = x_t.repeat(n, 1)  # (n * 8, L)
    t_all = t.repeat_interleave(len(PATTERNS))
    nll = (
        obj.nll_per_token(
            obj.log_p_x0(fake_logits(x_t_all), x_t_all), X0.expand(len(x_t_all), -1), x_t_all, t_all
        )
        .double()
        .sum(-1)
        .view(n, -1)
    )
    move = noise.move_chance(t.double())[:, None]  # (n, 1)
    k = PATTERNS.sum(-1).double()[None]  # masks per pattern
    prob = move**k * (1 - move) ** (L - k)  # (n, 8)
    return (prob * nll).sum(-1)


@pytest.mark.parametrize("noise", [LogLinear(1e-3), Cosine(1e-3)], ids=["loglinear", "cosine"])
def test_discrete_nelbo_tends_to_the_continuous_one(noise):
    nodes, weights = np.polynomial.legendre.leggauss(200)
    t_cont = torch.tensor((nodes + 1) / 2, dtype=torch.float64)
    cont = SUBS(noise, mask_id=MASK, vocab_size=V, T=0)
    continuous = float((expected_nelbo(cont, t_cont, noise) * torch.tensor(weights / 2)).sum())
    assert continuous > 0
    for make in (
        lambda T: SUBS(noise, mask_id=MASK, vocab_size=V, T=T),
        lambda T: D3PM(noise, mask_id=MASK, vocab_size=V, T=T, subs_masking=True),
    ):
        gaps = []
        for T in (4, 32, 256, 2048):
            grid = torch.arange(1, T + 1, dtype=torch.float64) / T
            discrete = float(expected_nelbo(make(T), grid, noise).mean())  # uniform over the grid
            gaps.append(abs(discrete - continuous))
        assert gaps == sorted(gaps, reverse=True), gaps
        assert gaps[-1] < 2e-3 * continuous and gaps[-1] < gaps[0] / 50, gaps


def test_subs_checkpoint_scores_with_T0_and_T1000():
    """ppl_eval builds the objective from the config; one set of weights scores under both."""
    cfg0, cfg1 = load(["debug=tiny_cpu"]), load(["debug=tiny_cpu", "T=1000"])
    validate_config(cfg1)
    torch.manual_seed(0)
    backbone = instantiate(cfg0.backbone, vocab_size=16)
    for p in backbone.parameters():
        torch.nn.init.normal_(p, std=0.1)
    batch = {"input_ids": torch.randint(0, 15, (4, 32)), "attention_mask": torch.ones(4, 32)}
    results = {}
    for cfg in (cfg0, cfg1):
        obj = instantiate(
            cfg.parameterization, noise=instantiate(cfg.noise), mask_id=15, vocab_size=16
        )
        assert obj.T == cfg.T
        module = DiffusionModule(backbone, obj, optimizer=None, ema_decay=0, eval_mc_samples=64)
        out = module.eval_nll(batch, torch.Generator().manual_seed(0))
        results[cfg.T] = float(out.mean())
    assert all(math.isfinite(v) and v > 0 for v in results.values())
    assert results[1000] == pytest.approx(results[0], rel=0.1)  # the same bound, two estimators


def test_mc_samples_spread_each_rows_draws_over_all_of_time():
    """eval_mc_samples = k copies of each row share one stratified draw of k * B times; a
    row's k copies must take k different strata of [eps, 1]. Side by side (interleaved) they
    all fell in one 1/B slice, and the bound of a row depended on its place in the batch."""
    B, k = 4, 8
    obj = SUBS(LogLinear(), MASK, V)
    seen = {}
    sample_t, loss = obj.sample_t, obj.loss

    def spy_t(n, device, generator=None, rows=None):
        seen["t"] = sample_t(n, device, generator, rows)
        return seen["t"]

    def spy_loss(backbone, x0, *args, **kwargs):
        seen["x0"] = x0
        return loss(backbone, x0, *args, **kwargs)

    obj.sample_t, obj.loss = spy_t, spy_loss

    class Zeros(torch.nn.Module):
        def forward(self, x_t, sigma=None, attention_mask=None):
            return torch.zeros(*x_t.shape, V)

    module = DiffusionModule(Zeros(), obj, optimizer=None, ema_decay=0, eval_mc_samples=k)
    x0 = torch.tensor([[0, 0, 0], [1, 1, 1], [2, 2, 2], [0, 1, 2]])
    module.eval_nll({"input_ids": x0, "attention_mask": torch.ones_like(x0)}, None)
    assert seen["x0"].shape == (B * k, 3)
    for row in x0:
        copies = (seen["x0"] == row).all(1)
        strata = torch.floor(seen["t"][copies] * k).clamp(max=k - 1)
        assert copies.sum() == k and len(set(strata.tolist())) == k, strata


# ---- SEDD -----------------------------------------------------------------------------------
def sedd_score_entropy_slow(logits, x_t, x0, sigma):
    """Loops: log s = logits - log(e^sigma - 1) - log(V - 1), s_{x_t} = 1; at a masked i,
    sum_{y != x_t} [s_y - r_y log s_y + r_y (log r_y - 1)], r_{x0} = 1/(e^sigma - 1), else 0."""
    B, Lq, _ = logits.shape
    out = torch.zeros(B, Lq, dtype=torch.float64)
    for b, i in itertools.product(range(B), range(Lq)):
        if x_t[b, i] != MASK:
            continue
        sig = float(sigma[b])
        r = 1 / (math.exp(sig) - 1)
        total = 0.0
        for y in range(V):
            if y == MASK:
                continue
            log_s = float(logits[b, i, y]) - math.log(math.exp(sig) - 1) - math.log(V - 1)
            r_y = r if y == int(x0[b, i]) else 0.0
            total += math.exp(log_s) - r_y * log_s + (r_y * (math.log(r_y) - 1) if r_y else 0.0)
        out[b, i] = total
    return out


def test_sedd_score_entropy_matches_loops():
    torch.manual_seed(4)
    obj = SEDD(LogLinear(1e-3), mask_id=MASK, vocab_size=V)
    x0 = torch.tensor([[0, 2, 1], [1, 0, 2]])
    x_t = torch.tensor([[MASK, 2, MASK], [MASK, MASK, 2]])
    sigma = torch.tensor([0.3, 2.0])
    logits = torch.randn(2, 3, V)
    got = obj.score_entropy(obj.log_score(logits, x_t, sigma), x0, x_t, sigma)
    torch.testing.assert_close(
        got.double(), sedd_score_entropy_slow(logits, x_t, x0, sigma), rtol=1e-5, atol=1e-6
    )
    t = torch.tensor([0.4, 0.9])
    weighted = obj.nll_per_token(obj.log_score(logits, x_t, obj.noise.sigma(t)), x0, x_t, t)
    expected = (
        sedd_score_entropy_slow(logits, x_t, x0, obj.noise.sigma(t))
        * obj.noise.dsigma(t).double()[:, None]
    )
    torch.testing.assert_close(weighted.double(), expected, rtol=1e-5, atol=1e-6)


def test_sedd_score_entropy_is_zero_at_the_true_score_and_positive_elsewhere():
    torch.manual_seed(5)
    obj = SEDD(LogLinear(1e-3), mask_id=MASK, vocab_size=V)
    x0 = torch.tensor([[0, 2, 1, 1]])
    x_t = torch.full_like(x0, MASK)
    sigma = torch.tensor([0.7])
    log_r = -math.log(math.expm1(0.7))
    true_score = torch.full((1, 4, V), NEG_INF).scatter(-1, x0[..., None], log_r)
    # logits that the parameterization maps onto the true score
    logits = true_score + math.log(math.expm1(0.7)) + math.log(V - 1)
    zero = obj.score_entropy(obj.log_score(logits, x_t, sigma), x0, x_t, sigma)
    torch.testing.assert_close(zero, torch.zeros(1, 4), atol=1e-5, rtol=0)
    for scale in (0.2, 1.0, 3.0):
        noisy = logits + scale * torch.randn_like(logits)
        assert (obj.score_entropy(obj.log_score(noisy, x_t, sigma), x0, x_t, sigma) > 0).all()
    shifted = logits.clone()
    shifted[..., :MASK] += 0.05  # scaling the true score up or down costs something
    assert (obj.score_entropy(obj.log_score(shifted, x_t, sigma), x0, x_t, sigma) > 0).all()


def test_sedd_log_p_x0_normalises_the_score_and_carries_over():
    torch.manual_seed(6)
    obj = SEDD(LogLinear(1e-3), mask_id=MASK, vocab_size=V)
    logits = torch.randn(2, 3, V)
    x_t = torch.tensor([[MASK, 1, MASK], [0, MASK, MASK]])
    log_p = obj.log_p_x0(logits, x_t)
    for sigma in (torch.tensor([0.1, 0.1]), torch.tensor([3.0, 0.5])):
        score = obj.log_score(logits, x_t, sigma)
        assert (score.gather(-1, x_t[..., None]) == 0).all()  # s_{x_t} = 1: carry-over
        for b, i in itertools.product(range(2), range(3)):
            if x_t[b, i] == MASK:
                s = score[b, i, :MASK].exp()
                torch.testing.assert_close(log_p[b, i, :MASK].exp(), s / s.sum())
            else:
                assert log_p[b, i, x_t[b, i]] == 0
    assert (log_p[..., MASK] < -1e5).all()


def test_sedd_loss_uses_sigma_and_dsigma():
    torch.manual_seed(7)
    noise = LogLinear(1e-3)
    obj = SEDD(noise, mask_id=MASK, vocab_size=V)
    x0 = torch.tensor([[0, 1, 2], [2, 2, 0]])
    logits = torch.randn(2, 3, V)
    backbone = Fixed(logits)
    out = obj.loss(backbone, x0, torch.ones_like(x0), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    u = (torch.rand(2, generator=g) + torch.arange(2)) / 2
    t = 1e-3 + (1 - 1e-3) * u
    masked = torch.rand(2, 3, generator=g) < noise.move_chance(t)[:, None]
    torch.testing.assert_close(backbone.sigma, noise.sigma(t))
    x_t = torch.where(masked, MASK, x0)
    expected = (
        sedd_score_entropy_slow(logits, x_t, x0, noise.sigma(t)) * noise.dsigma(t).double()[:, None]
    )
    torch.testing.assert_close(out.nll.double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="time_conditioning=true"):
        SEDD(noise, mask_id=MASK, vocab_size=V, time_conditioning=False)


# ---- AR -------------------------------------------------------------------------------------
def test_ar_shift_by_hand():
    """x0 = [BOS, 3, 0, 2] (vocabulary 5, mask 4): position i predicts x0[i + 1]."""
    probs = torch.tensor(
        [
            [0.1, 0.2, 0.3, 0.4, 0.0],  # after BOS: p(3) = 0.4
            [0.5, 0.1, 0.1, 0.3, 0.0],  # after BOS 3: p(0) = 0.5
            [0.2, 0.2, 0.25, 0.35, 0.0],  # after BOS 3 0: p(2) = 0.25
        ]
    )
    logits = torch.log(probs.clamp_min(1e-30))[None]  # (1, 3, 5)
    x0 = torch.tensor([[1, 3, 0, 2]])
    obj = AR(mask_id=4, vocab_size=5)
    backbone = Fixed(logits, causal=True)
    out = obj.loss(backbone, x0, torch.ones_like(x0))
    assert torch.equal(backbone.seen, x0[:, :-1])  # the last token is never an input
    torch.testing.assert_close(
        out.nll, torch.tensor([[-math.log(0.4), -math.log(0.5), -math.log(0.25)]])
    )
    assert out.mean() == pytest.approx(
        -(math.log(0.4) + math.log(0.5) + math.log(0.25)) / 3, rel=1e-6
    )
    # a padded last token is not scored; the first token never is
    out = obj.loss(backbone, x0, torch.tensor([[1, 1, 1, 0]]))
    assert torch.equal(out.mask, torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.equal(backbone.attn, torch.tensor([[1, 1, 1]]))
    assert obj.exact_likelihood and not obj.time_conditioned


def test_ar_on_the_causal_dit_is_the_chain_rule_and_refuses_bidirectional():
    torch.manual_seed(8)
    dit = DiT(vocab_size=6, hidden_size=16, n_blocks=1, n_heads=2, max_length=8, causal=True)
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.3)
    obj = AR(mask_id=5, vocab_size=6)
    x0 = torch.randint(0, 5, (2, 6))
    out = obj.loss(dit, x0, torch.ones_like(x0))
    for i in range(1, 6):  # the loss of token i only sees x0[:i]
        logits = dit(x0[:, :i])[:, -1].log_softmax(-1)
        torch.testing.assert_close(out.nll[:, i - 1], -logits.gather(-1, x0[:, i : i + 1])[:, 0])
    dit.causal = False
    with pytest.raises(ValueError, match="backbone.causal=true"):
        obj.loss(dit, x0, torch.ones_like(x0))


# ---- config rules ---------------------------------------------------------------------------
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load(overrides):
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parameterization=d3pm", "T=0"], r"parameterization=d3pm .*T > 0"),
        (
            ["parameterization=sedd", "sampler=ddpm"],
            r"parameterization=sedd needs time_conditioning=true",
        ),
        (
            ["parameterization=sedd", "time_conditioning=true", "sampler=ddpm_cache"],
            r"parameterization=sedd cannot be sampled with sampler=ddpm_cache",
        ),
        (["parameterization=sedd", "time_conditioning=true", "sampler=ar"], r"sampler=ar"),
        (
            ["parameterization=sedd", "time_conditioning=true", "sampler=ddpm", "T=1000"],
            r"parameterization=sedd is continuous-time: set T=0",
        ),
        (
            ["parameterization=ar", "sampler=ar"],
            r"parameterization=ar needs a causal backbone: set backbone.causal=true",
        ),
        (
            ["parameterization=ar", "sampler=ar", "backbone.causal=true", "time_conditioning=true"],
            r"time_conditioning=false",
        ),
        (
            ["parameterization=ar", "backbone.causal=true"],
            r"use sampler=ar, not sampler=ddpm_cache",
        ),
        (["sampler=ar"], r"sampler=ar needs parameterization=ar"),
    ],
)
def test_config_errors_name_the_keys(overrides, message):
    cfg = load(overrides)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ("sedd_owt", dict(T=0, time_conditioning=True, length=1024, target="SEDD")),
        ("d3pm_lm1b", dict(T=1000, time_conditioning=True, length=128, target="D3PM")),
        ("ar_lm1b", dict(time_conditioning=False, causal=True, length=128, target="AR")),
        ("ar_owt", dict(time_conditioning=False, causal=True, length=1024, target="AR")),
        ("ar_shakespeare", dict(time_conditioning=False, causal=True, target="AR")),
    ],
)
def test_recipes_validate_and_build_their_objective(recipe, expected):
    cfg = load([f"experiment={recipe}"])
    validate_config(cfg)
    assert cfg.parameterization._target_.endswith("." + expected["target"])
    assert cfg.time_conditioning == expected["time_conditioning"]
    if "T" in expected:
        assert cfg.T == expected["T"]
    if "length" in expected:
        assert cfg.model.length == expected["length"]
    if expected.get("causal"):
        assert cfg.backbone.causal is True  # sampler.bos_id: given from the tokenizer at build
    if recipe != "ar_shakespeare":
        assert cfg.loader.global_batch_size == 512 and cfg.optim.lr == 3e-4
    obj = instantiate(cfg.parameterization, noise=instantiate(cfg.noise), mask_id=5, vocab_size=6)
    assert obj.exact_likelihood == (expected["target"] == "AR")


def test_mask_conditioning_is_a_function_of_x_t_and_keeps_ddpm_cache_exact():
    """mask_conditioning feeds -log(unmasked fraction of x_t) to the backbone: not t, so the
    denoiser is time-agnostic and ddpm_cache draws ddpm's samples with fewer calls."""
    from diffusion.denoiser import ModelDenoiser
    from diffusion.noise import LogLinear
    from diffusion.objectives.subs import SUBS
    from models.dit import DiT
    from samplers.ddpm import DDPMSampler
    from samplers.ddpm_cache import DDPMCacheSampler

    obj = SUBS(LogLinear(), mask_id=5, vocab_size=6, mask_conditioning=True)
    x_t = torch.tensor([[5, 5, 1, 2], [5, 5, 5, 5]])
    sigma = obj.backbone_sigma(torch.tensor([0.1, 0.9]), x_t)
    assert torch.allclose(sigma, torch.tensor([-math.log(0.5), -math.log(1e-3)]))
    assert SUBS(LogLinear(), mask_id=5, vocab_size=6).backbone_sigma(torch.ones(2), x_t) is None

    torch.manual_seed(0)
    net = DiT(6, 16, 1, 2, max_length=8, time_conditioning=True, cond_dim=8)  # as dit.yaml
    for p in net.parameters():  # adaLN-zero starts at zero: make sigma matter
        torch.nn.init.normal_(p, std=0.5)
    net.eval()
    calls = {"n": 0}
    net.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    den = ModelDenoiser(net, obj)
    assert not den.time_conditioned
    full = torch.full((1, 4), 5)
    with torch.no_grad():  # the statistic reaches the network through adaLN
        half_sigma = obj.backbone_sigma(None, torch.tensor([[5, 5, 1, 2]]))
        assert not torch.allclose(net(full, obj.backbone_sigma(None, full)), net(full, half_sigma))
    calls["n"] = 0
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = DDPMSampler(steps=64).sample(den, 2, 8, generator=g())
    n_plain, calls["n"] = calls["n"], 0
    b = DDPMCacheSampler(steps=64).sample(den, 2, 8, generator=g())
    assert torch.equal(a.tokens, b.tokens) and calls["n"] < n_plain
