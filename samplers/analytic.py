"""SEDD's analytic sampler (Tweedie tau-leaping) for the absorbing process (Lou et al. 2024,
arXiv:2310.16834, its `AnalyticPredictor`), written from the concrete score.

From t to s the step multiplies the staggered score by the transposed transition over
dsigma = sigma(t) - sigma(s), sigma = -log alpha. For a masked position with score ratios
s_v (v != mask) this gives p(x_s = v) = s_v expm1(dsigma) and p(x_s = mask) =
1 - expm1(dsigma) sum_v s_v; clean tokens stay. The score comes from the denoiser's
`log_score(x_t, t)` when it has one (a SEDD model), else from MDLM's relation
s_v = alpha_t / (1 - alpha_t) p(x0 = v | x_t), under which the step equals ddpm's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from samplers.base import GuidedDenoiser, Sampler, sample_categorical, uniform
from samplers.ddpm import time_grid

TINY = 1e-30  # alpha_t floor: keeps log alpha_t finite at t = 1 for schedules with alpha(1) = 0


def log_score_from_log_p_x0(log_p_x0: Tensor, alpha_t: Tensor) -> Tensor:
    """(B, L, V), (B,) -> (B, L, V) float64 log s_v = log p(x0 = v) + log(alpha_t / (1 - alpha_t))
    (the absorbing-score relation of MDLM and SEDD); only masked rows are used."""
    alpha_t = alpha_t.to(torch.float64).clamp(TINY, 1.0)
    return log_p_x0.to(torch.float64) + (alpha_t.log() - (-alpha_t).log1p())[:, None, None]


def analytic_posterior(
    log_score: Tensor, x_t: Tensor, alpha_t: Tensor, alpha_s: Tensor, mask_id: int
) -> Tensor:
    """(B, L, V) float64 probabilities of x_s given x_t: staggered score x transposed transition.

    Negative mass from an inexact score is clipped to 0 and rows renormalised (as SEDD's
    Gumbel draw effectively does).
    """
    alpha_t = alpha_t.to(torch.float64).clamp(TINY, 1.0)
    alpha_s = alpha_s.to(torch.float64)
    log_expm1_dsigma = ((alpha_s - alpha_t).clamp_min(0).log() - alpha_t.log())[:, None, None]
    log_ratio = log_score.to(torch.float64).index_fill(
        -1, torch.tensor([mask_id], device=x_t.device), -torch.inf
    )
    log_probs = log_ratio + log_expm1_dsigma  # (B, L, V): s_v expm1(dsigma)
    probs = log_probs.exp()
    stay_masked = (1.0 - probs.sum(-1)).clamp_min(0.0)  # 1 - expm1(dsigma) sum_v s_v
    probs[..., mask_id] = torch.where(alpha_s[:, None] >= 1.0, 0.0, stay_masked)  # alpha(0) = 1
    probs = probs / probs.sum(-1, keepdim=True)
    stay = torch.nn.functional.one_hot(x_t, log_score.shape[-1]).to(torch.float64)
    return torch.where((x_t == mask_id)[..., None], probs, stay)


def analytic_step(
    log_score: Tensor,
    x_t: Tensor,
    alpha_t: Tensor,
    alpha_s: Tensor,
    generator: torch.Generator | None,
    mask_id: int,
) -> Tensor:
    """Draw x_s from `analytic_posterior`; one float64 uniform per position (B, L)."""
    u = uniform(tuple(x_t.shape), generator, x_t.device)  # (B, L)
    is_mask = x_t == mask_id
    x_s = x_t.clone()
    if bool(is_mask.any()):
        probs = analytic_posterior(log_score, x_t, alpha_t, alpha_s, mask_id)  # (B, L, V)
        x_s[is_mask] = sample_categorical(probs[is_mask].log(), u[is_mask])
    return x_s


class AnalyticSampler(Sampler):
    """Tweedie tau-leaping on a uniform grid of `steps` steps; one network call per step.

    Temperature / top-k / top-p act on p(x0 | x_t) and so are only available through the
    log_p_x0 route; a denoiser's own `log_score` is used unfiltered.
    """

    name = "analytic"

    def __init__(
        self,
        steps: int = 128,
        use_model_score: bool = True,
        **common: Any,
    ) -> None:
        """`common`: the settings every sampler shares (`Sampler.__init__`)."""
        super().__init__(**common)
        if steps < 1:
            raise ValueError(f"sampler={self.name}: steps must be >= 1, got {steps}")
        self.steps = steps
        self.use_model_score = use_model_score

    def _log_score(self, model: GuidedDenoiser, x: Tensor, t: Tensor, alpha_t: Tensor) -> Tensor:
        filtered = self.temperature != 1.0 or self.top_k is not None or self.top_p is not None
        if self.use_model_score and not filtered and "log_score" in model.capabilities:
            return model.log_score(x, t)
        return log_score_from_log_p_x0(self.filter(model.log_p_x0(x, t)), alpha_t)

    def _generate(
        self,
        model: GuidedDenoiser,
        x: Tensor,
        generator: torch.Generator | None,
        record: Callable[[Tensor], None] | None,
    ) -> Tensor:
        batch = x.shape[0]
        ts = time_grid(self.steps)
        for i in range(self.steps):
            t = torch.full((batch,), float(ts[i]), device=x.device)  # (B,)
            s = torch.full((batch,), float(ts[i + 1]), device=x.device)  # (B,)
            alpha_t = model.alpha(t)
            alpha_s = torch.ones_like(alpha_t) if i == self.steps - 1 else model.alpha(s)
            log_score = self._log_score(model, x, t, alpha_t)  # (B, L, V)
            x = analytic_step(log_score, x, alpha_t, alpha_s, generator, model.mask_id)
            if record is not None:
                record(x.clone())
        return x
