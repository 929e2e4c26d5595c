"""SEDD's score entropy for the absorbing process (Lou, Meng & Ermon 2024, eq. 8 and the
absorbing "scale_by_sigma" parameterization of their code; MDLM's SEDD baseline).

The network outputs log-ratios log s_theta(x_t)_v ≈ log p_t(x_t with v at i) / p_t(x_t) for
every position i and value v. At a masked position the true ratio towards the clean x0 is
r = alpha_t / (1 - alpha_t) = 1 / expm1(sigma) and 0 towards any other value, so the
denoising score entropy, weighted by dsigma (SEDD eq. 8, its NELBO), is

    dsigma * [ sum_{v != m} s_v - r log s_{x0} + r (log r - 1) ]

which is >= 0 and equals 0 exactly at the true (x0-conditional) score. Continuous time only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffusion.noise import NoiseSchedule
from diffusion.objectives.base import AbsorbingDiffusion, logsumexp_and_pick
from diffusion.objectives.subs import subs_log_p_x0


class SEDD(AbsorbingDiffusion):
    """Score entropy discrete diffusion (absorbing): time-conditioned, continuous time."""

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_id: int,
        vocab_size: int,
        time_conditioning: bool = True,
        T: int = 0,
        sampling_eps: float = 1e-3,
        antithetic: bool = True,
        lean_loss: bool = True,
    ) -> None:
        super().__init__(
            noise,
            mask_id,
            vocab_size,
            time_conditioning,
            T,
            sampling_eps,
            antithetic,
            lean_loss=lean_loss,
        )
        if not time_conditioning:
            raise ValueError(
                "parameterization=sedd needs time_conditioning=true: it predicts a score that "
                "depends on sigma"
            )
        if T != 0:
            raise ValueError(f"parameterization=sedd is continuous-time: set T=0 (got T={T})")

    provides = frozenset({"absorbing", "log_score", "whole_canvas"})

    def denoiser(self, backbone: nn.Module):
        """A masked denoiser that also gives the network's own score (the analytic sampler)."""
        from diffusion.denoiser import ScoreModelDenoiser

        return ScoreModelDenoiser(backbone, self)

    def log_score(self, logits: Tensor, x_t: Tensor, sigma: Tensor) -> Tensor:
        """(B, L, V) logits, sigma (B,) -> (B, L, V) float32 log s_theta(x_t).

        SEDD's absorbing parameterization: logits - log(expm1(sigma)) - log(V - 1), so a zero
        network starts at the uniform score summing to 1 / expm1(sigma); the entry of x_t
        itself is log 1 = 0 (at an unmasked position the score carries x_t over).
        """
        shift = torch.log(torch.expm1(sigma.float()))[:, None, None] + math.log(
            logits.shape[-1] - 1
        )
        log_score = logits.float() - shift
        return log_score.scatter(-1, x_t[..., None], 0.0)

    def log_p_x0(self, logits: Tensor, x_t: Tensor) -> Tensor:
        """p(x0 = v | x_t) ∝ exp(log_score_v) over v != mask at masked positions, one-hot on
        x_t elsewhere. The score is the logits minus one constant per row, so normalising it
        is the SUBS map of the logits, whatever sigma was."""
        return subs_log_p_x0(logits, x_t, self.mask_id)

    def score_entropy(self, log_score: Tensor, x0: Tensor, x_t: Tensor, sigma: Tensor) -> Tensor:
        """(B, L) denoising score entropy at masked positions (SEDD eq. 5), 0 elsewhere."""
        ratio = 1.0 / torch.expm1(sigma.float())[:, None]  # (B, 1) r = alpha_t / (1 - alpha_t)
        masked = x_t == self.mask_id  # (B, L)
        # exp only where masked: a large log score at a clean position (logit 95 at t = 0.01)
        # overflows to inf, and inf * 0 would be NaN in the loss and its gradient
        keep = log_score.masked_fill(~masked[..., None], -torch.inf)
        keep = keep.index_fill(-1, torch.tensor([self.mask_id], device=keep.device), -torch.inf)
        positive = keep.exp().sum(-1)  # sum_{v != m} s_v, 0 where unmasked
        negative = ratio * log_score.gather(-1, x0[..., None]).squeeze(-1)  # r log s_{x0}
        constant = ratio * (torch.log(ratio) - 1)  # K(r): makes the minimum exactly 0
        return torch.where(masked, positive - negative + constant, 0.0)

    def model_output(self, logits: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The log score (it needs sigma) in place of log p(x0 | x_t)."""
        return self.log_score(logits, x_t, self.noise.sigma(t))

    def nll_per_token(self, model_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """(B, L) dsigma-weighted score entropy; `model_out` is the log score."""
        sigma, dsigma = self.noise.sigma(t), self.noise.dsigma(t)
        return dsigma.float()[:, None] * self.score_entropy(model_out, x0, x_t, sigma)

    def nll_masked(self, logits: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """(N,) dsigma-weighted score entropy at masked positions from their (N, V) logits: the
        sum of scores is exp(logsumexp over v != m of the logits - shift) (lean loss)."""
        V = logits.shape[-1]
        sigma, dsigma = self.noise.sigma(t).float(), self.noise.dsigma(t).float()  # (N,)
        shift = torch.log(torch.expm1(sigma)) + math.log(V - 1)
        lse, picked = logsumexp_and_pick(logits, x0[:, None], exclude=self.mask_id)
        positive = torch.exp(lse - shift)
        log_s_x0 = torch.where(x0 == self.mask_id, 0.0, picked[:, 0] - shift)  # x_t's own entry
        ratio = 1.0 / torch.expm1(sigma)
        return dsigma * (positive - ratio * log_s_x0 + ratio * (torch.log(ratio) - 1))
