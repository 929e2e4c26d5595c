"""First-hitting sampler (Zheng et al. 2024, "Masked diffusion models are secretly time-agnostic
masked models and exploit inaccurate categorical sampling", arXiv:2409.02908).

Under the absorbing process the n masked tokens of x_t unmask at independent times, so
the next (backward) event time s solves ((1 - alpha_s) / (1 - alpha_t))^n = u with u
uniform, the token that unmasks is uniform among the masked ones, and its value is drawn
from p(x0 | x_t, s). Exactly one token per event, no step count, one network call per
token; the event time only matters for a time-conditioned denoiser (found by bisection
on the decreasing alpha).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from samplers.base import GuidedDenoiser, Sampler, sample_categorical, uniform


def alpha_inverse(model: GuidedDenoiser, target: Tensor, t_hi: Tensor, iters: int = 50) -> Tensor:
    """(B,) t in [0, t_hi] with alpha(t) = target, by bisection (alpha is decreasing)."""
    lo, hi = torch.zeros_like(t_hi), t_hi.clone()
    for _ in range(iters):
        mid = (lo + hi) / 2
        later = model.alpha(mid.float()) > target  # still too clean: the event is later in t
        lo, hi = torch.where(later, mid, lo), torch.where(later, hi, mid)
    return hi


def masked_position(is_mask: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) one masked position per row, uniform among its masked ones (u (B,) uniforms), and
    (B,) whether the row has any (a row without masks gets position 0, inactive)."""
    n = is_mask.sum(1)  # (B,)
    rank = (u * n).long().clamp_max(n - 1)  # the (rank + 1)-th masked position, rank in [0, n)
    pos = ((is_mask.cumsum(1) == (rank + 1)[:, None]) & is_mask).long().argmax(1)  # (B,)
    return pos, n > 0


class FirstHittingSampler(Sampler):
    """Unmask one token per event at the exact next event time."""

    name = "first_hitting"

    def __init__(
        self,
        steps: int | None = None,
        **common: Any,
    ) -> None:
        """`steps` is unused (the number of events is the number of masked tokens); accepted so
        that configs setting `sampler.steps` for every sampler compose. `common`: the settings
        every sampler shares (`Sampler.__init__`)."""
        super().__init__(**common)
        self.steps = steps

    def _generate(
        self,
        model: GuidedDenoiser,
        x: Tensor,
        generator: torch.Generator | None,
        record: Callable[[Tensor], None] | None,
    ) -> Tensor:
        batch = x.shape[0]
        rows = torch.arange(batch, device=x.device)
        t = torch.ones(batch, dtype=torch.float64, device=x.device)  # (B,)
        alpha_t = model.alpha(t.float())
        while bool((x == model.mask_id).any()):
            is_mask = x == model.mask_id  # (B, L)
            n = is_mask.sum(1)  # (B,) masked tokens
            u = uniform((3, batch), generator, x.device)  # event time, which token, which value
            # P(no unmasking in (s, t]) = ((1 - alpha_s) / (1 - alpha_t))^n  (Zheng et al.)
            alpha_s = 1.0 - (1.0 - alpha_t) * u[0] ** (1.0 / n.clamp_min(1))
            alpha_s = torch.where(n > 0, alpha_s, alpha_t)
            s = alpha_inverse(model, alpha_s, t) if model.time_conditioned else t
            pos, active = masked_position(is_mask, u[1])
            # per-row skipping: finished rows (no mask left) are not evaluated
            live = rows if bool(active.all()) else rows[active]  # (B',)
            sub = None if live is rows else live
            log_p_x0 = self.filter(model.log_p_x0(x[live], s[live].float(), rows=sub))
            value = sample_categorical(log_p_x0[torch.arange(len(live)), pos[live]], u[2][live])
            x = x.clone()
            x[live, pos[live]] = value  # x0 ~ p(x0 | x_t, s)
            t, alpha_t = torch.where(active, s, t), torch.where(active, alpha_s, alpha_t)
            if record is not None:
                record(x.clone())
        return x
