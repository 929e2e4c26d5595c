"""DUO's Psi-samplers (samplers/psi.py): the kappa of each mode and the time profiles against
values by hand from DUO's formulas, pure-posterior equal to the ancestral sampler draw for
draw, and a mixed schedule's samples against its exact chain distribution on the toy."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from samplers.psi import PsiSampler, psi_kappas
from samplers.uniform import UniformSampler, uniform_posterior
from tests.test_duo import K_TOY, UniformToyDenoiser, gen
from tests.test_samplers import L_TOY, empirical, tv, tv_bound

ALPHAS = torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64)  # pairs (0.1, 0.4), (0.4, 0.8)


@pytest.mark.parametrize(
    "mode,want",
    [
        ("pure-posterior", [1.0, 1.0, 1.0]),
        ("pure-pc", [0.0, 0.0, 0.0]),
        ("constant-0.7", [0.7, 0.7, 0.7]),
        # sigma = eta = 0.3: 1 - 0.3 / 0.6, 1 - 0.3 / 0.2 clipped, then 1
        ("constant-remdm-0.3", [0.5, 0.0, 1.0]),
        # sigma = min(0.05, (1 - a_s) / a_t) = 0.05 both: 1 - 0.05 / 0.6, 1 - 0.05 / 0.2
        ("max-capped-0.05", [1 - 0.05 / 0.6, 0.75, 1.0]),
        # sigma = min(0.5, 6) x 0.5 = 0.25, min(0.5, 0.5) x 0.5 = 0.25
        ("max-rescale-0.5", [1 - 0.25 / 0.6, 0.0, 1.0]),
    ],
)
def test_kappa_of_each_mode_by_hand(mode: str, want: list[float]) -> None:
    got = psi_kappas(mode, ALPHAS)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64))


def test_time_profiles_by_hand() -> None:
    linear = PsiSampler(steps=4, t_min=0.2).duo_grid()
    assert torch.allclose(linear, torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2], dtype=torch.float64))
    # DUO's loop script: c = alpha 0.9 -> t = 0.1; 10 points: 4 high (round(4.5) = 4), 5 held
    held = PsiSampler(
        steps=9, time_profile="linear-constant-linear-0.9-inv", high_frac=0.45, middle_frac=0.5
    )
    want = [1.0, 0.7, 0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    assert torch.allclose(held.duo_grid(), torch.tensor(want, dtype=torch.float64))
    assert float(held.times()[-1]) == 0.0 and len(held.times()) == 11  # + noise removal
    with pytest.raises(ValueError, match="sampler.middle_mode='sometimes'"):
        PsiSampler(middle_mode="sometimes")
    with pytest.raises(ValueError, match="sampler.time_profile='cosine'"):
        PsiSampler(time_profile="cosine")


def test_pure_posterior_is_the_ancestral_sampler_draw_for_draw() -> None:
    psi = PsiSampler(steps=6, t_min=1e-5).sample(UniformToyDenoiser(), 64, L_TOY, generator=gen(3))
    ours = UniformSampler(steps=6, t_min=1e-5).sample(
        UniformToyDenoiser(), 64, L_TOY, generator=gen(3)
    )
    assert torch.equal(psi.tokens, ours.tokens) and psi.nfe == ours.nfe == 7


def psi_chain(den: UniformToyDenoiser, grid: Tensor, kappas: Tensor) -> Tensor:
    """(81,) exact output distribution of the mixed chain: each step kappa q(x_s | x_t) +
    (1 - kappa) (alpha_s q(x_0 | x_t) + (1 - alpha_s) / K), per position, from the uniform
    prior (alpha = 1 - t for the toy)."""
    seqs = den.seqs
    S = len(seqs)
    dist = torch.full((S,), 1.0 / S, dtype=torch.float64)
    real = torch.tensor([True] * K_TOY + [False])
    for i in range(len(grid) - 1):
        t = torch.full((S,), float(grid[i]))
        a_t = 1 - t.double()
        a_s = torch.full((S,), 1 - float(grid[i + 1]), dtype=torch.float64)
        log_x = den.log_p_x0(seqs, t)
        post = uniform_posterior(log_x, seqs, a_t, a_s, real)
        q0 = uniform_posterior(log_x, seqs, a_t, torch.ones_like(a_t), real)
        k = float(kappas[i])
        noised = a_s[:, None, None] * q0 + (1 - a_s[:, None, None]) * real.double() / K_TOY
        step = k * post + (1 - k) * noised  # (S, L, V)
        picked = step[:, torch.arange(L_TOY)[None, :], seqs]  # (S_from, S_to, L)
        dist = dist @ picked.prod(-1)
    return dist


def test_a_mixed_schedule_draws_its_exact_chain() -> None:
    """constant-0.1 in the high and low phases, pure-pc in the middle: the samples follow the
    exact distribution of that chain, which differs from the ancestral one (the toy's x_theta
    is optimal, so both chains near the data: 300K samples tell them apart)."""
    n = 300_000
    sampler = PsiSampler(
        steps=4, t_min=0.05, high_mode="constant-0.1", middle_mode="pure-pc",
        low_mode="constant-0.1", high_frac=0.4, middle_frac=0.4,
    )  # fmt: skip
    den = UniformToyDenoiser()
    ts = sampler.times()
    from samplers.base import GuidedDenoiser

    kappas = sampler.kappas(ts, GuidedDenoiser(den, torch.zeros(1, L_TOY, dtype=torch.bool)))
    assert kappas.tolist() == pytest.approx([0.1, 0.1, 0.0, 0.0, 1.0])
    exact = psi_chain(UniformToyDenoiser(), ts, kappas)
    ancestral = psi_chain(UniformToyDenoiser(), ts, torch.ones_like(kappas))
    assert tv(exact, ancestral) > 2 * tv_bound(exact, n)
    out = sampler.sample(den, n, L_TOY, generator=gen(4))
    assert out.nfe == 5 and tv(empirical(out.tokens), exact) < tv_bound(exact, n)
