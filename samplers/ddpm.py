"""Ancestral (DDPM) sampling of the absorbing process: D3PM's sampler with MDLM's SUBS posterior.

Follows MDLM (arXiv:2406.07524) eq. 7: from time t to s < t a masked token becomes
clean value v with probability p(x0 = v) (alpha_s - alpha_t) / (1 - alpha_t) and stays
masked with probability (1 - alpha_s) / (1 - alpha_t); a clean token never changes.
`ddpm_posterior` writes that distribution out (for tests and display); `ddpm_step` draws
from it in two exact stages (move or not, then which token) so that only moving tokens
need a float64 categorical over the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from samplers.base import GuidedDenoiser, Sampler, sample_categorical, uniform


def unmask_probability(alpha_t: Tensor, alpha_s: Tensor) -> Tensor:
    """(B,), (B,) -> (B,) float64: P(a token masked at t is clean at s) = (a_s - a_t) / (1 - a_t)."""
    alpha_t, alpha_s = alpha_t.to(torch.float64), alpha_s.to(torch.float64)
    move_chance_t = (1.0 - alpha_t).clamp_min(torch.finfo(torch.float64).tiny)
    return ((alpha_s - alpha_t) / move_chance_t).clamp(0.0, 1.0)  # MDLM eq. 7


def ddpm_posterior(
    log_p_x0: Tensor, x_t: Tensor, alpha_t: Tensor, alpha_s: Tensor, mask_id: int
) -> Tensor:
    """p(x_s | x_t) as (B, L, V) float64 probabilities (MDLM eq. 7)."""
    q = unmask_probability(alpha_t, alpha_s)[:, None, None]  # (B, 1, 1)
    probs = torch.softmax(log_p_x0.to(torch.float64), dim=-1) * q  # (B, L, V)
    probs[..., mask_id] = 1.0 - q[..., 0]  # (1 - a_s) / (1 - a_t)
    stay = torch.nn.functional.one_hot(x_t, log_p_x0.shape[-1]).to(torch.float64)
    return torch.where((x_t == mask_id)[..., None], probs, stay)


def ddpm_step(
    log_p_x0: Tensor,
    x_t: Tensor,
    alpha_t: Tensor,
    alpha_s: Tensor,
    generator: torch.Generator | None,
    mask_id: int,
) -> Tensor:
    """Draw x_s ~ p(x_s | x_t) (MDLM eq. 7): log_p_x0 (B, L, V), x_t (B, L), alphas (B,).

    Consumes exactly 2 B L float64 uniforms whatever the state, so two loops that visit
    the same x_t sequence (ddpm and ddpm_cache) draw the same samples.
    """
    u = uniform((2, *x_t.shape), generator, x_t.device)  # (2, B, L): move?, which token?
    is_mask = x_t == mask_id  # (B, L)
    moves = is_mask & (u[0] < unmask_probability(alpha_t, alpha_s).to(x_t.device)[:, None])
    x_s = x_t.clone()
    if bool(moves.any()):
        x_s[moves] = sample_categorical(log_p_x0[moves], u[1][moves])  # x0 ~ p(x0 | x_t)
    return x_s


def time_grid(steps: int, t_min: float = 0.0) -> Tensor:
    """t_0 = 1 > t_1 > ... > t_steps = 0, uniform (float64, never below zero). With
    t_min > 0, MDLM's and DUO's own grid: `steps` steps from 1 to t_min, then 0 (their
    noise-removal step at t_min): steps + 2 times, steps + 1 network calls."""
    if t_min <= 0:
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    ts = torch.linspace(1.0, t_min, steps + 1, dtype=torch.float64)
    return torch.cat([ts, ts.new_zeros(1)])


def check_t_min(t_min: float) -> float:
    """`sampler.t_min` as a float in [0, 1) (a clear error otherwise)."""
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"sampler.t_min={t_min} must lie in [0, 1)")
    return float(t_min)


class DDPMSampler(Sampler):
    """Ancestral sampling on a uniform grid of `steps` steps; one network call per step."""

    name = "ddpm"

    def __init__(
        self,
        steps: int = 128,
        noise_removal: bool = False,
        t_min: float = 0.0,
        **common: Any,
    ) -> None:
        """`common`: the settings every sampler shares (`Sampler.__init__`). `noise_removal`:
        the last step fills every token still masked with the argmax of p(x0 | x_t) instead
        of a draw from it. On our grid (t_min = 0) the last step unmasks about 1 / steps of
        the tokens; on MDLM's own (`t_min=1e-5`: `steps` steps to t_min, then one more) it is
        MDLM's `sampling.noise_removal`, which fills only the ~steps x 1e-5 still masked."""
        super().__init__(**common)
        if steps < 1:
            raise ValueError(f"sampler={self.name}: steps must be >= 1, got {steps}")
        self.steps = steps
        self.noise_removal = bool(noise_removal)
        self.t_min = check_t_min(t_min)

    def _rows_to_call(self, changed: Tensor, has_mask: Tensor) -> Tensor:
        """(B,) bool: the rows the network runs on this step; ddpm: every row, every step
        (the D3PM baseline). `changed`: x_t of the row changed at the last step."""
        return torch.ones_like(changed)

    def _generate(
        self,
        model: GuidedDenoiser,
        x: Tensor,
        generator: torch.Generator | None,
        record: Callable[[Tensor], None] | None,
    ) -> Tensor:
        batch = x.shape[0]
        ts = time_grid(self.steps, self.t_min)
        calls = len(ts) - 1
        log_p_x0 = None  # (B, L, V) the last output of every row
        changed = torch.ones(batch, dtype=torch.bool, device=x.device)  # (B,)
        for i in range(calls):
            t = torch.full((batch,), float(ts[i]), device=x.device)  # (B,)
            s = torch.full((batch,), float(ts[i + 1]), device=x.device)  # (B,)
            alpha_t = model.alpha(t)
            # the last step goes to alpha(0) = 1 exactly, so no mask survives it
            alpha_s = torch.ones_like(alpha_t) if i == calls - 1 else model.alpha(s)
            if log_p_x0 is None:
                log_p_x0 = self.filter(model.log_p_x0(x, t))  # (B, L, V)
            else:
                log_p_x0 = self._refresh(model, x, t, log_p_x0, changed)
            if self.noise_removal and i == calls - 1:  # the final greedy step
                x_s = torch.where(x == model.mask_id, log_p_x0.argmax(-1), x)
            else:
                x_s = ddpm_step(log_p_x0, x, alpha_t, alpha_s, generator, model.mask_id)
            changed = (x_s != x).any(1)  # (B,)
            x = x_s
            if record is not None:
                record(x.clone())
        return x

    def _refresh(
        self, model: GuidedDenoiser, x: Tensor, t: Tensor, log_p_x0: Tensor, changed: Tensor
    ) -> Tensor:
        """Re-evaluate the rows `_rows_to_call` names: the whole batch in one call, or the
        sub-batch gathered, evaluated and scattered back into `log_p_x0` (per-row caching)."""
        need = self._rows_to_call(changed, (x == model.mask_id).any(1))  # (B,)
        if bool(need.all()):
            return self.filter(model.log_p_x0(x, t))
        if bool(need.any()):
            rows = need.nonzero().squeeze(1)  # (B',)
            log_p_x0[rows] = self.filter(model.log_p_x0(x[rows], t[rows], rows=rows))
        return log_p_x0
