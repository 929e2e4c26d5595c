"""The shared base of every objective: the absorbing forward process and the loss plumbing.

An objective owns (MDLM sec. 3): sampling times t (stratified, optionally on a
discrete grid of T steps), corrupting x0 into x_t, turning backbone logits into
`log p(x0 | x_t)`, and the per-token NELBO. Subclasses override the hooks that
differ (`log_p_x0`, `nll_per_token`); nothing here dispatches on names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffusion.noise import NoiseSchedule


@dataclass
class LossOutput:
    """Per-token losses and the tokens that count.

    nll:  (B, L) float32, each token's contribution to the NELBO (already weighted)
    mask: (B, L) float32, 1 where the token is scored (real, not padding)
    """

    nll: Tensor
    mask: Tensor

    def mean(self) -> Tensor:
        """Loss normalised per token over the batch (MDLM's choice)."""
        return (self.nll * self.mask).sum() / self.mask.sum().clamp_min(1)


class Objective(nn.Module):
    """What every objective exposes to the LightningModule and the denoiser."""

    time_conditioned: bool = False
    exact_likelihood: bool = False  # True for AR: its perplexity is exact, not a bound

    def loss(
        self, backbone: nn.Module, x0: Tensor, attention_mask: Tensor, generator=None
    ) -> LossOutput:
        raise NotImplementedError


class AbsorbingDiffusion(Objective):
    """Absorbing-state (masking) diffusion: forward process and the NELBO estimator."""

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_id: int,
        vocab_size: int,
        time_conditioning: bool = False,
        T: int = 0,
        sampling_eps: float = 1e-3,
        antithetic: bool = True,
    ) -> None:
        super().__init__()
        if T < 0:
            raise ValueError(f"T={T}: use T=0 for continuous time or T>0 discrete steps")
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id={mask_id} is outside the vocabulary of size {vocab_size}")
        self.noise = noise
        self.mask_id = mask_id
        self.vocab_size = vocab_size
        self.time_conditioned = time_conditioning
        self.T = T
        self.sampling_eps = sampling_eps
        self.antithetic = antithetic

    # ---- time and forward process -------------------------------------------------
    def sample_t(self, n: int, device: torch.device, generator=None) -> Tensor:
        """n times in [eps, 1]: one uniform draw per stratum [i/n, (i+1)/n) (low discrepancy).

        With T > 0 the time is snapped up to the grid {1/T, ..., 1}.
        """
        u = torch.rand(n, device=device, generator=generator)
        if self.antithetic:
            u = (u + torch.arange(n, device=device)) / n  # stratum i holds exactly one time
        if self.T > 0:
            return (torch.floor(u * self.T) + 1) / self.T
        return self.sampling_eps + (1 - self.sampling_eps) * u

    def q_xt(self, x0: Tensor, move_chance: Tensor, generator=None) -> Tensor:
        """Mask each token independently with probability move_chance (B, 1)."""
        u = torch.rand(x0.shape, device=x0.device, generator=generator)
        return torch.where(u < move_chance, torch.full_like(x0, self.mask_id), x0)

    def backbone_sigma(self, t: Tensor) -> Tensor | None:
        """What the backbone is conditioned on: sigma(t), or nothing when time-agnostic."""
        return self.noise.sigma(t) if self.time_conditioned else None

    # ---- hooks ------------------------------------------------------------------------
    def log_p_x0(self, logits: Tensor, x_t: Tensor) -> Tensor:
        """(B, L, V) backbone logits -> (B, L, V) float32 log p(x0 | x_t)."""
        raise NotImplementedError

    def nll_per_token(self, model_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """(B, L) weighted per-token NELBO terms from the processed model output."""
        raise NotImplementedError

    # ---- the loss -----------------------------------------------------------------
    def loss(
        self, backbone: nn.Module, x0: Tensor, attention_mask: Tensor, generator=None
    ) -> LossOutput:
        t = self.sample_t(x0.shape[0], x0.device, generator)  # (B,)
        x_t = self.q_xt(x0, self.noise.move_chance(t)[:, None], generator)
        logits = backbone(x_t, self.backbone_sigma(t), attention_mask)
        nll = self.nll_per_token(self.log_p_x0(logits, x_t), x0, x_t, t)
        return LossOutput(nll=nll, mask=attention_mask.to(nll.dtype))
