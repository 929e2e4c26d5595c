"""MDLM's SUBS parameterization and its NELBO (Sahoo et al. 2024, sec. 3.2-3.3).

SUBS: the mask token is never predicted (zero masking probability) and an
unmasked token is carried over unchanged (carry-over unmasking). The loss is then
a weighted masked-LM cross-entropy: continuous time weight dsigma/expm1(sigma)
(= 1/t for loglinear), or with T steps the discrete-time weight
T (alpha_s - alpha_t) / (1 - alpha_t), s = t - 1/T, which tends to it as T grows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion.objectives.base import AbsorbingDiffusion, logsumexp_and_pick

NEG_INF = -1e6  # finite "minus infinity": keeps logsumexp and gradients NaN-free


def subs_log_p_x0(logits: Tensor, x_t: Tensor, mask_id: int) -> Tensor:
    """The six lines of SUBS: (B, L, V) logits -> log p(x0 | x_t) in float32.

    The caller's `logits` are never written: the mask column is set in place only on the
    float32 copy `.float()` makes of other dtypes, and on a fresh masked copy of float32 ones.
    """
    masked = logits.float()
    if masked is logits:  # already float32: `.float()` returned the caller's tensor
        masked = masked.index_fill(-1, torch.tensor([mask_id], device=logits.device), NEG_INF)
    else:
        masked[..., mask_id] = NEG_INF  # zero masking probability
    log_p = masked.log_softmax(dim=-1)
    del masked  # peak memory as before: the masked logits go before `carry` is made
    unmasked = x_t != mask_id
    carry = torch.full_like(log_p, NEG_INF)
    carry.scatter_(-1, x_t[..., None], 0.0)  # one-hot on the visible token
    return torch.where(unmasked[..., None], carry, log_p)  # carry-over unmasking


class SUBS(AbsorbingDiffusion):
    """MDLM: SUBS parameterization, continuous-time (T=0) or discrete-time NELBO."""

    def log_p_x0(self, logits: Tensor, x_t: Tensor) -> Tensor:
        return subs_log_p_x0(logits, x_t, self.mask_id)

    def weight(self, t: Tensor) -> Tensor:
        """(B,) loss weight; continuous: dsigma/expm1(sigma) (MDLM eq. 10)."""
        if self.T == 0:
            return self.noise.loss_weight(t)
        s = t - 1.0 / self.T
        move_t, move_s = self.noise.move_chance(t), self.noise.move_chance(s)
        return self.T * (move_t - move_s) / move_t  # T (alpha_s - alpha_t) / (1 - alpha_t)

    def nll_per_token(self, model_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        log_p_true = model_out.gather(-1, x0[..., None]).squeeze(-1)  # (B, L); 0 where unmasked
        return -log_p_true * self.weight(t)[:, None]

    def nll_masked(self, logits: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """(N,) -log p(x0) * weight at masked positions, the mask logit left out of the softmax."""
        lse, picked = logsumexp_and_pick(logits, x0[:, None], exclude=self.mask_id)
        return (lse - picked[:, 0]) * self.weight(t)
