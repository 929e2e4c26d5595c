"""D3PM's absorbing-state objective in discrete time (Austin et al. 2021, eq. 1 and 4;
MDLM, Sahoo et al. 2024, sec. 4 and its D3PM baseline).

Forward: q(x_t | x0) keeps x0 with probability alpha_t, else jumps to the mask (absorbing).
With T steps on the grid t in {1/T, ..., 1}, s = t - 1/T, the NELBO is

    sum_t E_q KL(q(x_s | x_t, x0) || p_theta(x_s | x_t))          (D3PM eq. 1)

estimated with one uniform grid time per sequence and the weight T. The reverse model is
D3PM's x0-parameterization (eq. 4): p_theta(x_s | x_t) ∝ sum_x0' q(x_t | x_s) q(x_s | x0')
p_theta(x0' | x_t), where p_theta(x0' | x_t) is a plain log-softmax that may put mass p_m on
the mask (`subs_masking=True` removes it, and the loss then equals SUBS in discrete time).

The reconstruction term -log p_theta(x0 | x_{1/T}) is the t = 1/T member of that sum: there
s = 0 and alpha(0) = 1, so q(x_s | x_t, x0) is a point mass on x0 and the KL is exactly
-log p_theta(x_s = x0 | x_{1/T}). Nothing is left for a separate t = 0 term (x at t = 0 is x0
itself), so none is added; MDLM's extra -log p_theta(x0 | x0) term is not part of this bound.
The prior term KL(q(x_1 | x0) || p(x_1)) is left out as in MDLM and SUBS here (it vanishes
only when alpha(1) = 0). Unmasked positions add nothing: in the absorbing chain a clean x_t
forces x_s = x_t under both q and p_theta.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion.noise import NoiseSchedule
from diffusion.objectives.base import AbsorbingDiffusion, logsumexp_and_pick
from diffusion.objectives.subs import NEG_INF

TINY = 1e-30  # keeps log/xlogy gradients finite where a probability is exactly zero


class D3PM(AbsorbingDiffusion):
    """Absorbing-state D3PM: discrete-time NELBO over T steps, plain softmax parameterization."""

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_id: int,
        vocab_size: int,
        time_conditioning: bool = False,
        T: int = 1000,
        sampling_eps: float = 1e-3,
        antithetic: bool = True,
        subs_masking: bool = False,
        mask_conditioning: bool = False,
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
            mask_conditioning,
            lean_loss,
        )
        if T < 1:
            raise ValueError(
                f"parameterization=d3pm is a discrete-time objective and needs T > 0 steps "
                f"(e.g. T=1000), got T={T}"
            )
        self.subs_masking = subs_masking

    def log_p_x0(self, logits: Tensor, x_t: Tensor) -> Tensor:
        """(B, L, V) log p_theta(x0 | x_t): log-softmax over the whole vocabulary, no carry-over.

        The mask may be predicted (D3PM) unless `subs_masking` (SUBS' zero masking probability).
        """
        logits = logits.float()
        if self.subs_masking:
            logits = logits.index_fill(
                -1, torch.tensor([self.mask_id], device=logits.device), NEG_INF
            )
        return logits.log_softmax(dim=-1)

    def kl_masked(self, log_p_x0: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """(B, L) KL at every position from the (B, L, V) log p(x0 | x_t); see `kl_terms`."""
        log_p_true = log_p_x0.gather(-1, x0[..., None]).squeeze(-1)  # (B, L)
        p_mask = log_p_x0[..., self.mask_id].exp()  # (B, L)
        return self.kl_terms(log_p_true, p_mask, t[:, None])

    def kl_terms(self, log_p_true: Tensor, p_mask: Tensor, t: Tensor) -> Tensor:
        """(B, L) KL(q(x_s | x_t = m, x0) || p_theta(x_s | x_t = m)) in closed form, s = t - 1/T.

        With q_clean = (alpha_s - alpha_t) / (1 - alpha_t), q_mask = (1 - alpha_s) / (1 - alpha_t)
        and p_m = p_theta(x0 = m | x_t), D3PM eq. 4 gives p(x_s = v) = (alpha_s - alpha_t) p_v / Z,
        p(x_s = m) = ((1 - alpha_s)(1 - p_m) + p_m) / Z, Z = (1 - alpha_t)(1 - p_m) + p_m, so
        KL = log1p(p_m alpha_t / (1 - alpha_t)) - q_clean log p_x0
             - q_mask log1p(p_m alpha_s / (1 - alpha_s)).
        """
        s = t - 1.0 / self.T  # t broadcasts against log_p_true: (B, 1) or (N,)
        alpha_t, alpha_s = self.noise.alpha(t), self.noise.alpha(s)
        move_t, move_s = self.noise.move_chance(t), self.noise.move_chance(s)
        q_clean = (move_t - move_s) / move_t
        stay_term = torch.log1p(p_mask * alpha_t / move_t)
        # q_mask log1p(p_m a_s / (1 - a_s)) written so that s = 0 (q_mask = 0) gives exactly 0
        mask_term = (
            torch.xlogy(move_s, (move_s + p_mask * alpha_s).clamp_min(TINY))
            - torch.xlogy(move_s, move_s)
        ) / move_t
        return stay_term - q_clean * log_p_true - mask_term

    def nll_per_token(self, model_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """(B, L) T * KL at masked positions (the T-step sum, MC over t); zero where unmasked."""
        masked = (x_t == self.mask_id).to(model_out.dtype)
        return self.T * self.kl_masked(model_out, x0, t) * masked

    def nll_masked(self, logits: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """(N,) T * KL at masked positions from their (N, V) logits (lean loss)."""
        mask_col = torch.full_like(x0, self.mask_id)
        exclude = self.mask_id if self.subs_masking else None
        lse, picked = logsumexp_and_pick(logits, torch.stack([x0, mask_col], -1), exclude)
        log_p_true = picked[:, 0] - lse
        p_mask = torch.zeros_like(lse) if self.subs_masking else torch.exp(picked[:, 1] - lse)
        return self.T * self.kl_terms(log_p_true, p_mask, t)
