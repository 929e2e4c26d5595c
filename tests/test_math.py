"""Golden tests for the math: schedule, SUBS, the 1/t-weighted loss, stratified times."""

import math

import pytest
import torch

from diffusion.noise import Cosine, LogLinear
from diffusion.objectives.subs import NEG_INF, SUBS, subs_log_p_x0


def test_loglinear_schedule_values():
    eps = 1e-3
    noise = LogLinear(eps)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    # alpha(t) = 1 - (1 - eps) t, by hand
    expected_alpha = torch.tensor(
        [1.0, 1 - 0.999 * 0.25, 1 - 0.999 * 0.5, 0.001], dtype=torch.float64
    )
    torch.testing.assert_close(noise.alpha(t), expected_alpha)
    torch.testing.assert_close(noise.move_chance(t), 1 - expected_alpha)
    # the weight dsigma/expm1(sigma) is exactly 1/t for loglinear
    t2 = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(noise.loss_weight(t2), 1 / t2)


@pytest.mark.parametrize("schedule", [LogLinear(1e-3), Cosine(1e-3)])
def test_dsigma_is_the_derivative_of_sigma(schedule):
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    h = 1e-6
    numeric = (schedule.sigma(t + h) - schedule.sigma(t - h)) / (2 * h)
    torch.testing.assert_close(schedule.dsigma(t), numeric, rtol=1e-5, atol=1e-7)
    assert schedule.alpha(torch.tensor(0.0, dtype=torch.float64)) == pytest.approx(1.0)


def test_cosine_keeps_its_float32_precision_at_both_ends():
    """alpha, the masking probability, sigma and the loss weight of the cosine schedule in
    float32 against the textbook formulas in float64 at the same t (float64's 1 - cos still has
    eight good digits at t = 1e-4): within a few float32 ulps from t = 1e-4 to 1. The textbook
    formulas in float32 lose 5% of 1 - alpha at t = 1e-3 and 4e-5 of alpha at t = 1 (caught)."""
    noise, eps = Cosine(1e-3), 1e-3
    t32 = torch.logspace(-4, 0, 400)
    t = t32.double()
    alpha = eps + (1 - eps) * torch.cos(t * math.pi / 2)
    truth = {
        "alpha": alpha,
        "move_chance": 1 - alpha,
        "sigma": -torch.log(alpha),
        "loss_weight": (1 - eps) * (math.pi / 2) * torch.sin(t * math.pi / 2) / (1 - alpha),
        "dsigma": (1 - eps) * (math.pi / 2) * torch.sin(t * math.pi / 2) / alpha,
    }

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b) / b.abs().clamp_min(1e-30)).abs().max().item()

    for name, value in truth.items():
        assert rel(getattr(noise, name)(t32), value) < 2e-6, name
    base = torch.cos(t32 * math.pi / 2)  # the textbook forms in float32
    assert rel(1 - (eps + (1 - eps) * base), truth["move_chance"]) > 1e-2
    assert rel(eps + (1 - eps) * base, truth["alpha"]) > 1e-5


def test_subs_never_predicts_mask_and_carries_over():
    mask_id = 3
    logits = torch.tensor([[[1.0, 2.0, 3.0, 9.0], [0.5, 0.1, -1.0, 5.0], [2.0, 0.0, 0.0, 0.0]]])
    x_t = torch.tensor([[3, 1, 3]])  # masked, visible token 1, masked
    log_p = subs_log_p_x0(logits, x_t, mask_id)
    # masked rows: softmax over the non-mask tokens only
    row0 = torch.tensor([1.0, 2.0, 3.0]).log_softmax(-1)
    torch.testing.assert_close(log_p[0, 0, :3], row0)
    assert log_p[0, 0, mask_id] < -1e5 and log_p[0, 2, mask_id] < -1e5
    # visible row: one-hot on the visible token, whatever the logits said
    assert log_p[0, 1, 1] == 0.0
    assert (log_p[0, 1, [0, 2, 3]] == NEG_INF).all()


class _Fixed(torch.nn.Module):
    """A fake backbone returning fixed logits, recording what it was called with."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x_t, sigma=None, attention_mask=None):
        self.seen = x_t
        return self.logits.clone()


def test_subs_loss_is_inverse_t_weighted_masked_cross_entropy():
    """A hand-made example: 2 sequences of 3 tokens, vocabulary {0,1,2} + mask 3."""
    torch.manual_seed(0)
    mask_id, V = 3, 4
    x0 = torch.tensor([[0, 1, 2], [2, 2, 0]])
    logits = torch.randn(2, 3, V)
    obj = SUBS(LogLinear(1e-3), mask_id=mask_id, vocab_size=V, T=0)
    backbone = _Fixed(logits)
    g = torch.Generator().manual_seed(5)
    out = obj.loss(backbone, x0, torch.ones_like(x0), generator=g)

    # replay the same draws by hand
    g = torch.Generator().manual_seed(5)
    u = torch.rand(2, generator=g)
    u = (u + torch.arange(2)) / 2
    t = 1e-3 + (1 - 1e-3) * u
    move = (1 - 1e-3) * t
    masked = torch.rand(2, 3, generator=g) < move[:, None]
    assert torch.equal(backbone.seen == mask_id, masked)
    expected = torch.zeros(2, 3)
    for b in range(2):
        for i in range(3):
            if masked[b, i]:
                p = torch.softmax(logits[b, i, :3], -1)[x0[b, i]]
                expected[b, i] = -math.log(p) / t[b]
    torch.testing.assert_close(out.nll, expected)
    assert out.mean() == pytest.approx(float(expected.sum() / 6), rel=1e-6)


def test_stratified_times_one_per_stratum():
    obj = SUBS(LogLinear(), mask_id=3, vocab_size=4, sampling_eps=0.0)
    t = obj.sample_t(8, torch.device("cpu"), torch.Generator().manual_seed(1))
    strata = torch.floor(t * 8).long().sort().values
    assert torch.equal(strata, torch.arange(8))
    obj_iid = SUBS(LogLinear(), mask_id=3, vocab_size=4, antithetic=False)
    t_iid = obj_iid.sample_t(1000, torch.device("cpu"), torch.Generator().manual_seed(1))
    assert t_iid.min() >= 1e-3 and t_iid.max() <= 1


def test_discrete_time_weight_tends_to_continuous():
    # cosine: T (alpha_s - alpha_t) / (1 - alpha_t) -> -alpha'(t) / (1 - alpha_t) as T grows
    noise = Cosine(1e-3)
    t = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    errors = []
    for T in (10, 100, 1000, 10000):
        tt = torch.ceil(t * T) / T  # on the grid
        disc = SUBS(noise, mask_id=3, vocab_size=4, T=T).weight(tt)
        errors.append(float((disc - noise.loss_weight(tt)).abs().max()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 500  # O(1/T)
    # loglinear: the discrete weight is exactly 1/t at every grid point, for any T
    t5 = torch.tensor([0.2, 0.4, 1.0], dtype=torch.float64)
    torch.testing.assert_close(
        SUBS(LogLinear(1e-3), mask_id=3, vocab_size=4, T=5).weight(t5), 1 / t5
    )
    # T-step times lie on the grid {1/T, ..., 1}
    ts = SUBS(noise, mask_id=3, vocab_size=4, T=10).sample_t(64, torch.device("cpu"))
    torch.testing.assert_close(ts * 10, torch.round(ts * 10))
