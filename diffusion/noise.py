"""Noise schedules for the absorbing process (MDLM sec. 3).

A schedule gives `alpha(t)`, the probability that a token is still clean at time
`t in [0, 1]`, with `alpha(0) = 1`; `sigma(t) = -log alpha(t)` is the total noise
the time-conditioned models see, and `dsigma(t)` its derivative, which sets the
continuous-time loss weight `dsigma / expm1(sigma) = -alpha'(t) / (1 - alpha(t))`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class NoiseSchedule:
    """Base: subclasses define `sigma` and `dsigma`; `alpha` and the weight follow."""

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def dsigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-self.sigma(t))

    def move_chance(self, t: Tensor) -> Tensor:
        """Probability that a token is masked at time t: 1 - alpha(t)."""
        return -torch.expm1(-self.sigma(t))

    def loss_weight(self, t: Tensor) -> Tensor:
        """Continuous-time NELBO weight dsigma / expm1(sigma) (MDLM eq. 10)."""
        return self.dsigma(t) / torch.expm1(self.sigma(t))


class LogLinear(NoiseSchedule):
    """alpha(t) = 1 - (1 - eps) t: masking probability linear in t (MDLM's default).

    Its weight dsigma / expm1(sigma) is exactly 1 / t; `eps` keeps alpha(1) > 0 so
    sigma(1) is finite.
    """

    def __init__(self, eps: float = 1e-3) -> None:
        self.eps = eps

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.log1p(-(1 - self.eps) * t)

    def dsigma(self, t: Tensor) -> Tensor:
        return (1 - self.eps) / (1 - (1 - self.eps) * t)

    def move_chance(self, t: Tensor) -> Tensor:
        return (1 - self.eps) * t


class Cosine(NoiseSchedule):
    """alpha(t) = eps + (1 - eps) cos(pi t / 2): fewer masks early (MDLM appendix).

    Each quantity is written where float32 keeps its relative precision over all of [0, 1]:
    1 - alpha = 2 (1 - eps) sin^2(pi t / 4) (no 1 - cos cancellation near t = 0, where float32
    lost 5% of it at t = 1e-3, and so of the largest loss weights), alpha with
    sin(pi (1 - t) / 2) (exact 1 - t; no rounded pi t / 2 near the zero of cos at t = 1), and
    the weight -alpha' / (1 - alpha) from those two.
    """

    def __init__(self, eps: float = 1e-3) -> None:
        self.eps = eps

    def alpha(self, t: Tensor) -> Tensor:
        return self.eps + (1 - self.eps) * torch.sin((1 - t) * (math.pi / 2))

    def move_chance(self, t: Tensor) -> Tensor:
        return 2 * (1 - self.eps) * torch.sin(t * (math.pi / 4)) ** 2

    def sigma(self, t: Tensor) -> Tensor:
        move = self.move_chance(t)  # -log(alpha), by whichever of the two is the larger
        return torch.where(move < 0.5, -torch.log1p(-move), -torch.log(self.alpha(t)))

    def _neg_dalpha(self, t: Tensor) -> Tensor:
        return (1 - self.eps) * (math.pi / 2) * torch.sin(t * (math.pi / 2))

    def dsigma(self, t: Tensor) -> Tensor:
        return self._neg_dalpha(t) / self.alpha(t)

    def loss_weight(self, t: Tensor) -> Tensor:
        """-alpha' / (1 - alpha), equal to dsigma / expm1(sigma)."""
        return self._neg_dalpha(t) / self.move_chance(t)


class Clipped(NoiseSchedule):
    """BD3-LM's clipped schedule: the masking rate 1 - alpha(t) = beta + (omega - beta) t runs
    over [beta, omega] only (Arriola et al. 2025, sec. 5). A training device: mask rates near
    0 and 1 carry little signal and most of the NELBO estimator's variance, so training sees
    rates in [beta, omega] with BD3-LM's weight 1 / rate: the NELBO integrand's mean over those
    rates, (omega - beta)^-1 times the integral restricted to them, whatever the width (the
    variance search compares intervals of several widths, as the paper's code does). Evaluation and sampling use `full`, the loglinear
    schedule over all of [0, 1], so reported perplexities stay bounds.
    """

    training_only = True  # objectives other than bd3lm refuse it (their eval would use it)

    def __init__(self, beta: float = 0.3, omega: float = 0.8, eps: float = 1e-3) -> None:
        if not 0.0 <= beta < omega <= 1.0:
            raise ValueError(
                f"noise=clipped needs 0 <= noise.beta < noise.omega <= 1 (got beta={beta}, "
                f"omega={omega})"
            )
        self.beta, self.omega, self.eps = float(beta), float(omega), eps
        self.full = LogLinear(eps)

    def move_chance(self, t: Tensor) -> Tensor:
        return self.beta + (self.omega - self.beta) * t

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.log1p(-self.move_chance(t).clamp(max=1 - self.eps))

    def dsigma(self, t: Tensor) -> Tensor:
        return (self.omega - self.beta) / (1 - self.move_chance(t)).clamp_min(self.eps)

    def loss_weight(self, t: Tensor) -> Tensor:
        return 1.0 / self.move_chance(t).clamp_min(1e-12)
