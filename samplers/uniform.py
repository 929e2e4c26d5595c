"""Ancestral sampling of uniform-state diffusion (DUO / UDLM, parameterization=duo).

The canvas starts as uniform noise over the K real tokens (never the mask). From t to s < t
every token is redrawn from DUO's posterior with the model's x_theta in place of x:

    p(x_s = j | x_t) ∝ (alpha_{t|s} [j = x_t] + (1 - alpha_{t|s}) / K) (alpha_s x_theta(j) + (1 - alpha_s) / K)

with alpha_{t|s} = alpha_t / alpha_s. With the ELBO-optimal x_theta (proportional to
p(x0 | x_t) / q_t(x_t | x0)) this is the exact one-token reverse marginal, so the sampler is
exact as the steps shrink. `greedy_tail` replaces the last step by the argmax of x_theta
(DUO's greedy noise removal). The model sees t (uniform noise does not reveal it), so there
is no ddpm_cache-style reuse: one network call per step.

`t_min > 0` is DUO's own schedule: `steps` steps on the grid 1 -> t_min, then one more
noise-removal step at t_min (to t = 0, or its argmax with `greedy_tail`): steps + 1 calls, as
DUO's `sampling.steps` (its t_min, 1e-5, is `eps` of its generate_samples).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from samplers.base import GuidedDenoiser, Sampler, sample_categorical, uniform
from samplers.ddpm import check_t_min, time_grid


def uniform_posterior(
    log_x_theta: Tensor, x_t: Tensor, alpha_t: Tensor, alpha_s: Tensor, real: Tensor
) -> Tensor:
    """(B, L, V) float64 p(x_s | x_t): log_x_theta (B, L, V), x_t (B, L), alphas (B,), `real`
    (V,) bool, the K tokens the noise ranges over (zero probability elsewhere)."""
    K = int(real.sum())
    a_t = alpha_t.to(torch.float64)[:, None, None]
    a_s = alpha_s.to(torch.float64)[:, None, None]
    a_ts = a_t / a_s
    x_theta = torch.softmax(log_x_theta.to(torch.float64), -1)  # (B, L, V)
    stay = torch.nn.functional.one_hot(x_t, log_x_theta.shape[-1]).to(torch.float64)
    real = real.to(torch.float64)
    from_t = a_ts * stay + (1 - a_ts) / K * real  # q(x_t | x_s = j) as a function of j
    from_x = a_s * x_theta + (1 - a_s) / K * real  # q(x_s = j | x_theta)
    post = from_t * from_x
    return post / post.sum(-1, keepdim=True)


def forward_noised(q0: Tensor, alpha: Tensor, real: Tensor) -> Tensor:
    """(B, L, V) a distribution over clean tokens noised forward to level alpha (B,):
    alpha q0 + (1 - alpha) / K on the K states."""
    a = alpha.to(torch.float64)[:, None, None]
    return a * q0 + (1 - a) * real.to(torch.float64) / int(real.sum())


def states(model: GuidedDenoiser, device: torch.device) -> Tensor:
    """(V,) bool: the ids a uniform-state denoiser's noise ranges over: every id but the mask
    id, or every id where the denoiser declares `mask_is_state` (DUO's own checkpoints)."""
    real = torch.ones(model.vocab_size, dtype=torch.bool, device=device)
    if not getattr(model.denoiser, "mask_is_state", False):
        real[model.mask_id] = False
    return real


class UniformSampler(Sampler):
    """DUO's ancestral sampler on a uniform grid of `steps` steps (optionally a greedy tail)."""

    name = "uniform"
    requires: ClassVar[frozenset[str]] = frozenset({"uniform"})

    def __init__(
        self,
        steps: int = 128,
        greedy_tail: bool = False,
        t_min: float = 0.0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if steps < 1:
            raise ValueError(f"sampler=uniform: steps must be >= 1, got {steps}")
        if self.cfg_scale != 0.0:
            raise ValueError(
                "sampler=uniform: cfg_scale must be 0 (SMDM's CFG masks the prompt, and a "
                "uniform-state model has no mask)"
            )
        self.steps = steps
        self.greedy_tail = greedy_tail
        self.t_min = check_t_min(t_min)

    def times(self) -> Tensor:
        """The times visited, 1 -> 0 (float64): our grid, or DUO's with t_min > 0."""
        return time_grid(self.steps, self.t_min)

    def kappas(self, ts: Tensor, model: GuidedDenoiser) -> Tensor:
        """(len(ts) - 1,) the weight of the posterior in each step: 1, plain ancestral
        sampling (the Psi-samplers of samplers/psi.py mix in a corrector)."""
        return torch.ones(len(ts) - 1, dtype=torch.float64)

    def _generate(
        self,
        model: GuidedDenoiser,
        x: Tensor,
        generator: torch.Generator | None,
        record: Callable[[Tensor], None] | None,
    ) -> Tensor:
        mask_id = model.mask_id
        batch, length = x.shape
        real = states(model, x.device)  # (V,) the ids the noise ranges over
        ids = real.nonzero().squeeze(-1)
        free = x == mask_id  # (B, L) positions to generate (the rest is prompt / fixed)
        # the prior: uniform over the K states (one float64 uniform per position)
        u = uniform((batch, length), generator, x.device)
        prior = ids[(u * len(ids)).long().clamp_(max=len(ids) - 1)]
        x = torch.where(free, prior, x)
        if record is not None:
            record(x.clone())
        ts = self.times()  # (calls + 1,) float64
        calls = len(ts) - 1
        kappas = self.kappas(ts, model)  # (calls,) posterior weight of each step (1: ancestral)
        for i in range(calls):
            t = torch.full((batch,), float(ts[i]), device=x.device)
            log_x = self.filter(model.log_p_x0(x, t))  # (B, L, V)
            last = i == calls - 1
            if last and self.greedy_tail:
                new = log_x.argmax(-1)
            else:
                s = torch.full((batch,), float(ts[i + 1]), device=x.device)
                alpha_t = model.alpha(t).clamp_min(torch.finfo(torch.float64).tiny)
                alpha_s = torch.ones_like(alpha_t) if last else model.alpha(s)
                kappa = float(kappas[i])
                post = 0.0  # (B, L, V) the step's distribution, built from its two parts
                if kappa > 0.0:  # the ancestral posterior q(x_s | x_t, x_theta)
                    post = kappa * uniform_posterior(log_x, x, alpha_t, alpha_s, real)
                if kappa < 1.0:  # predictor-corrector: q_0 (aimed at t = 0) noised forward to s
                    q0 = uniform_posterior(log_x, x, alpha_t, torch.ones_like(alpha_t), real)
                    post = post + (1 - kappa) * forward_noised(q0, alpha_s, real)
                draw = uniform((batch * length,), generator, x.device)
                new = sample_categorical(post.clamp_min(0).log().flatten(0, 1), draw)
                new = new.view(batch, length)
            x = torch.where(free, new, x)
            if record is not None:
                record(x.clone())
        return x
