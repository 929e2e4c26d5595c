"""ReMDM: remasking discrete diffusion (Wang et al. 2025, "Remasking Discrete Diffusion Models
with Inference-Time Scaling", arXiv:2503.00307).

MDLM's ancestral step never changes a token once it is unmasked. ReMDM's posterior lets a
clean token go back to the mask with probability sigma_t, and rebalances the unmasking so
that the marginal x_s stays that of the forward process:

    masked x_t:  P(x_s = v)    = (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t) p(x0 = v)
                 P(x_s = mask) = (1 - alpha_s - sigma_t alpha_t) / (1 - alpha_t)
    clean x_t:   P(x_s = mask) = sigma_t,  else unchanged

valid for 0 <= sigma_t <= sigma_max = min(1, (1 - alpha_s) / alpha_t). Schedules of sigma:
`cap` min(eta, sigma_max); `rescale` eta * sigma_max; `loop` MDLM down to t_on, then
alpha held at alpha(t_on) while tokens are remasked with min(eta, sigma_max) until t_off,
then MDLM again with the rest of alpha (the paper's ReMDM-loop). Prompt and fixed tokens
are never remasked. Each step draws the same 2 B L uniforms as `ddpm_step` (clean positions
reuse the "move?" uniform for the remask decision), so with eta = 0 the samples are the
ancestral sampler's: `ddpm` on the same alpha grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from samplers.base import GuidedDenoiser, sample_categorical, uniform
from samplers.ddpm import DDPMSampler, time_grid

SCHEDULES = ("cap", "rescale", "loop")


def sigma_max(alpha_t: Tensor, alpha_s: Tensor) -> Tensor:
    """(B,) float64 largest remasking probability that keeps the posterior valid."""
    alpha_t = alpha_t.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny)
    return ((1.0 - alpha_s.to(torch.float64)) / alpha_t).clamp(0.0, 1.0)


def remdm_step(
    log_p_x0: Tensor,
    x_t: Tensor,
    alpha_t: Tensor,
    alpha_s: Tensor,
    sigma: Tensor,
    protected: Tensor,
    generator: torch.Generator | None,
    mask_id: int,
) -> Tensor:
    """Draw x_s from ReMDM's posterior: log_p_x0 (B, L, V), x_t (B, L), alphas and sigma (B,),
    protected (B, L) bool (never remasked). Consumes 2 B L float64 uniforms, as ddpm_step."""
    u = uniform((2, *x_t.shape), generator, x_t.device)  # (2, B, L): move / remask?, token
    alpha_t, alpha_s = alpha_t.to(torch.float64), alpha_s.to(torch.float64)
    sigma = sigma.to(torch.float64)
    denom = (1.0 - alpha_t).clamp_min(torch.finfo(torch.float64).tiny)
    unmask = ((alpha_s - (1.0 - sigma) * alpha_t) / denom).clamp(0.0, 1.0).to(x_t.device)
    is_mask = x_t == mask_id  # (B, L)
    moves = is_mask & (u[0] < unmask[:, None])
    remask = ~is_mask & ~protected & (u[0] < sigma.to(x_t.device)[:, None])
    x_s = x_t.clone()
    if bool(moves.any()):
        x_s[moves] = sample_categorical(log_p_x0[moves], u[1][moves])
    x_s[remask] = mask_id
    return x_s


class ReMDMSampler(DDPMSampler):
    """Ancestral sampling with remasking (ReMDM); eta = 0 is `ddpm` on the same alpha grid."""

    name = "remdm"

    def __init__(
        self,
        steps: int = 128,
        schedule: str = "cap",
        eta: float = 0.02,
        t_on: float = 0.55,
        t_off: float = 0.05,
        cache: bool = False,
        **common: Any,
    ) -> None:
        """schedule / eta: the remasking probability (module docstring); t_on > t_off: the
        loop phase of schedule=loop; cache: per-row reuse as ddpm_cache (time-agnostic only)."""
        super().__init__(steps, **common)
        if self.t_min:
            raise ValueError("sampler=remdm: t_min is not supported (its schedule ends at t = 0)")
        if schedule not in SCHEDULES:
            raise ValueError(f"sampler.schedule={schedule!r}; choose one of {SCHEDULES}")
        if eta < 0 or (schedule == "rescale" and eta > 1):
            raise ValueError(f"sampler.eta={eta} must be >= 0 (and <= 1 for schedule=rescale)")
        if not 0 < t_off < t_on < 1:
            raise ValueError(f"sampler.t_on={t_on}, t_off={t_off}: need 0 < t_off < t_on < 1")
        self.schedule = schedule
        self.eta = eta
        self.t_on = t_on
        self.t_off = t_off
        self.cache = cache

    @classmethod
    def requirements(cls, settings: Mapping[str, Any]) -> frozenset[str]:
        """With `cache` outputs are reused per row, exact only when t is unused."""
        return cls.requires | ({"time_agnostic"} if settings.get("cache", False) else set())

    def _rows_to_call(self, changed: Tensor, has_mask: Tensor) -> Tensor:
        return (changed & has_mask) if self.cache else torch.ones_like(changed)

    def model_times(self) -> Tensor:
        """(steps + 1,) float64 times whose alpha the grid uses: the uniform grid, or for
        `loop` t held at t_on over [t_off, t_on] and [0, t_off] stretched onto [0, t_on]."""
        ts = time_grid(self.steps)
        if self.schedule != "loop":
            return ts
        held = torch.where(ts >= self.t_off, torch.full_like(ts, self.t_on), ts)
        below = ts * self.t_on / self.t_off
        return torch.where(ts >= self.t_on, ts, torch.where(ts >= self.t_off, held, below))

    def sigma(self, i: int, alpha_t: Tensor, alpha_s: Tensor) -> Tensor:
        """(B,) remasking probability of step i (from times()[i] to times()[i + 1])."""
        top = sigma_max(alpha_t, alpha_s)
        if self.schedule == "rescale":
            return self.eta * top
        if self.schedule == "loop":
            ts = time_grid(self.steps)
            in_loop = self.t_off <= float(ts[i + 1]) and float(ts[i]) <= self.t_on
            return top.clamp(max=self.eta) if in_loop else torch.zeros_like(top)
        return top.clamp(max=self.eta)

    def _generate(
        self,
        model: GuidedDenoiser,
        x: Tensor,
        generator: torch.Generator | None,
        record: Callable[[Tensor], None] | None,
    ) -> Tensor:
        batch = x.shape[0]
        ts = self.model_times()
        protected = model.cond_mask.clone()  # prompt and fixed tokens: never remasked
        log_p_x0 = None
        changed = torch.ones(batch, dtype=torch.bool, device=x.device)  # (B,)
        for i in range(self.steps):
            t = torch.full((batch,), float(ts[i]), device=x.device)  # (B,)
            alpha_t = model.alpha(t)
            last = i == self.steps - 1
            s = torch.full((batch,), float(ts[i + 1]), device=x.device)
            alpha_s = torch.ones_like(alpha_t) if last else model.alpha(s)
            if log_p_x0 is None:
                log_p_x0 = self.filter(model.log_p_x0(x, t))  # (B, L, V)
            else:
                log_p_x0 = self._refresh(model, x, t, log_p_x0, changed)
            sigma = self.sigma(i, alpha_t, alpha_s)
            x_s = remdm_step(
                log_p_x0, x, alpha_t, alpha_s, sigma, protected, generator, model.mask_id
            )
            changed = (x_s != x).any(1)
            x = x_s
            if record is not None:
                record(x.clone())
        return x
