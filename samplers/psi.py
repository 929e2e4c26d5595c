"""DUO's Psi-samplers for uniform-state diffusion (Deschenaux, Gulcehre & Sahoo, ICLR 2026,
"The Diffusion Duality, Chapter II").

Each step from t to s mixes the ancestral posterior with a predictor-corrector move:

    p(x_s | x_t) = kappa q(x_s | x_t, x_theta) + (1 - kappa) [alpha_s q_0 + (1 - alpha_s) / K]

where q_0 = q(x_0 | x_t, x_theta) is the posterior aimed at t = 0, noised forward to s.
kappa = 1 is the ancestral sampler (sampler=uniform), kappa = 0 pure predictor-corrector.
The schedule is DUO's: three phases (high, middle, low noise) of `high_frac` / `middle_frac`
of the grid, each with a mode for kappa, and a time profile that may hold t constant in the
middle phase (corrector steps at one noise level):

- modes: `pure-posterior` (1), `pure-pc` (0), `constant-<eta>` (eta), and ReMDM's remasking
  rates sigma turned into kappa = clip(1 - sigma / (1 - alpha_s), 0, 1) over each phase's
  consecutive times, its last step 1: `constant-remdm-<eta>` (sigma = eta),
  `max-capped-<eta>` (min(eta, (1 - alpha_s) / alpha_t)), `max-rescale-<eta>`
  (min(eta, (1 - alpha_s) / alpha_t) x eta, as DUO's code computes it);
- time profiles: `linear` (steps + 1 times from 1 to t_min) or
  `linear-constant-linear-<c>[-inv]` (1 -> c over the high phase, c held over the middle one,
  c -> t_min over the rest; `-inv`: c is an alpha, t = 1 - c, DUO's log-linear inverse).

Then one noise-removal step from t_min to 0 (ancestral, or its argmax with `greedy_tail`), as
DUO: steps + 1 network calls.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from samplers.base import GuidedDenoiser
from samplers.uniform import UniformSampler

MODE = re.compile(
    r"^(pure-posterior|pure-pc|(constant|constant-remdm|max-capped|max-rescale)-(.+))$"
)
PROFILE = re.compile(r"^(linear|linear-constant-linear-([0-9.eE+-]+?)(-inv)?)$")


def psi_kappas(mode: str, alphas: Tensor) -> Tensor:
    """(n,) kappa of one phase from its n times' alphas (float64), DUO's `_mode_to_psi_kappas`
    formulas: a ReMDM mode over the n - 1 consecutive pairs, then 1 (a one-point phase: 1,
    where DUO's code stops on an assertion)."""
    n = len(alphas)
    if mode == "pure-posterior":
        return torch.ones(n, dtype=torch.float64)
    if mode == "pure-pc":
        return torch.zeros(n, dtype=torch.float64)
    kind, eta = mode.rsplit("-", 1)
    eta = float(eta)
    if kind == "constant":
        return torch.full((n,), eta, dtype=torch.float64)
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    a_t, a_s = alphas[:-1], alphas[1:]
    cap = torch.minimum(torch.full_like(a_t, eta), (1 - a_s) / a_t)
    if kind == "max-capped":
        sigma = torch.where(a_t == 0, torch.full_like(a_t, eta), cap)
    elif kind == "max-rescale":
        sigma = torch.where(a_t > 0, cap, torch.ones_like(a_t)) * eta
    else:  # constant-remdm
        sigma = torch.full_like(a_t, eta)
    kappa = (1 - sigma / (1 - a_s)).clamp(0.0, 1.0)
    return torch.cat([kappa, torch.ones(1, dtype=torch.float64)])


class PsiSampler(UniformSampler):
    """DUO's Psi-samplers: ancestral steps mixed with predictor-corrector moves (module doc)."""

    name = "psi"

    def __init__(
        self,
        steps: int = 128,
        time_profile: str = "linear",
        high_mode: str = "pure-posterior",
        middle_mode: str = "pure-posterior",
        low_mode: str = "pure-posterior",
        high_frac: float = 0.2,
        middle_frac: float = 0.6,
        t_min: float = 1e-5,
        greedy_tail: bool = False,
        **common: Any,
    ) -> None:
        """DUO's `sampling.psi.*` settings (its defaults); `t_min`: DUO's eps; `greedy_tail`:
        the noise-removal step takes the argmax (DUO's sampling.noise_removal=greedy)."""
        if t_min <= 0:
            raise ValueError("sampler=psi: t_min must be > 0 (DUO's grid ends at eps, 1e-5)")
        super().__init__(steps, greedy_tail=greedy_tail, t_min=t_min, **common)
        for key, mode in (("high_mode", high_mode), ("middle_mode", middle_mode),
                          ("low_mode", low_mode)):  # fmt: skip
            if not MODE.match(mode):
                raise ValueError(
                    f"sampler.{key}={mode!r}: expected pure-posterior, pure-pc, constant-<eta>, "
                    "constant-remdm-<eta>, max-capped-<eta> or max-rescale-<eta>"
                )
        if not PROFILE.match(time_profile):
            raise ValueError(
                f"sampler.time_profile={time_profile!r}: expected linear or "
                "linear-constant-linear-<c>[-inv]"
            )
        if not (0 <= high_frac and 0 <= middle_frac and high_frac + middle_frac <= 1):
            raise ValueError(
                f"sampler.high_frac={high_frac}, middle_frac={middle_frac}: fractions of the "
                "grid in [0, 1] summing to at most 1"
            )
        self.time_profile = time_profile
        self.modes = (high_mode, middle_mode, low_mode)
        self.high_frac, self.middle_frac = float(high_frac), float(middle_frac)

    def phases(self, n: int) -> tuple[int, int]:
        """(points in the high phase, in the middle one) of DUO's n-point grid."""
        return round(self.high_frac * n), round(self.middle_frac * n)

    def duo_grid(self) -> Tensor:
        """DUO's steps + 1 times from 1 to t_min (`_get_sampling_time_profile`)."""
        n = self.steps + 1
        match = PROFILE.match(self.time_profile)
        if match.group(2) is None:
            return torch.linspace(1.0, self.t_min, n, dtype=torch.float64)
        c = float(match.group(2))
        if match.group(3):
            c = 1.0 - c  # an alpha: DUO's log-linear inverse
        n_hi, n_mid = self.phases(n)
        return torch.cat([
            torch.linspace(1.0, c, n_hi, dtype=torch.float64),
            torch.full((n_mid,), c, dtype=torch.float64),
            torch.linspace(c, self.t_min, n - n_hi - n_mid, dtype=torch.float64),
        ])  # fmt: skip

    def times(self) -> Tensor:
        """DUO's grid, then 0: its noise-removal step."""
        return torch.cat([self.duo_grid(), torch.zeros(1, dtype=torch.float64)])

    def kappas(self, ts: Tensor, model: GuidedDenoiser) -> Tensor:
        """DUO's kappa of each of the `steps` steps (`_get_kappas` over its grid), then 1 for
        the noise-removal step."""
        grid = ts[:-1]
        alphas = model.alpha(grid).to(torch.float64).cpu()
        n_hi, n_mid = self.phases(len(grid))
        bounds = [(0, n_hi), (n_hi, n_hi + n_mid), (n_hi + n_mid, len(grid))]
        kappas = torch.cat(
            [psi_kappas(mode, alphas[a:b]) for mode, (a, b) in zip(self.modes, bounds)]
        )
        return torch.cat([kappas[: self.steps], torch.ones(1, dtype=torch.float64)])
