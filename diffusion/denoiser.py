"""The denoiser seam: what samplers call, `log p(x0 | x_t, t)` plus the schedule.

It wraps a backbone and an objective (in eval mode, no gradients) so samplers
never see the optimizer, the trainer or the data. `time_conditioned=False`
means the output does not depend on t, which is what makes `ddpm_cache` exact.

Samplers always see the SUBS view of `log p(x0 | x_t)` (mask column -inf, unmasked rows
one-hot on x_t): the identity for SUBS and SEDD, and for D3PM (whose softmax may predict
the mask) the same network with the mask dropped and renormalised. `log_score` serves the
analytic sampler (SEDD's own score; for the others MDLM's map from log p(x0 | x_t)).
An autoregressive objective instead exposes `log_p_next`, with a KV cache when the
backbone has one (`init_cache`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusion.objectives.base import Objective
from diffusion.objectives.subs import NEG_INF, subs_log_p_x0


class ModelDenoiser:
    """Implements `samplers.base.Denoiser` for a backbone trained with an absorbing objective."""

    def __init__(self, backbone: nn.Module, objective: Objective) -> None:
        self.backbone = backbone
        self.objective = objective
        self.mask_id = objective.mask_id
        self.vocab_size = objective.vocab_size
        self.time_conditioned = objective.time_conditioned
        self.autoregressive = bool(getattr(objective, "autoregressive", False))

    def alpha(self, t: Tensor) -> Tensor:
        return self.objective.noise.alpha(t)

    @torch.no_grad()
    def log_p_x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        logits = self.backbone(x_t, self.objective.backbone_sigma(t, x_t), None)
        log_p = self.objective.log_p_x0(logits, x_t)
        return subs_log_p_x0(log_p, x_t, self.mask_id)  # the SUBS view (identity for SUBS)

    @torch.no_grad()
    def log_score(self, x_t: Tensor, t: Tensor) -> Tensor:
        """(B, L, V) log s(x_t)_v ≈ log p_t(x_t with v at i) / p_t(x_t), for the analytic sampler.

        SEDD returns its network's score. Otherwise MDLM's relation for the absorbing
        process: masked rows log p(x0 = v | x_t) - log expm1(sigma) (mask entry 0), unmasked
        rows 0 on x_t, log expm1(sigma) on the mask, -inf-like elsewhere.
        """
        sigma = self.objective.noise.sigma(t).float()  # (B,)
        logits = self.backbone(x_t, self.objective.backbone_sigma(t, x_t), None)
        own = getattr(self.objective, "log_score", None)
        if own is not None:
            return own(logits, x_t, sigma)
        log_p = subs_log_p_x0(self.objective.log_p_x0(logits, x_t), x_t, self.mask_id)
        log_expm1 = torch.log(torch.expm1(sigma))[:, None, None]  # (B, 1, 1)
        masked_rows = log_p - log_expm1
        masked_rows[..., self.mask_id] = 0.0
        clean_rows = torch.full_like(log_p, NEG_INF).scatter(-1, x_t[..., None], 0.0)
        clean_rows[..., self.mask_id] = log_expm1[..., 0]
        return torch.where((x_t == self.mask_id)[..., None], masked_rows, clean_rows)

    # ---- autoregressive objectives ---------------------------------------------------------
    def init_cache(self, batch_size: int):
        """An empty KV cache for `batch_size` sequences (backbones with `init_cache` only)."""
        init = getattr(self.backbone, "init_cache", None)
        if init is None:
            raise TypeError(
                f"{type(self.backbone).__name__} has no KV cache; use sampler.use_cache=false"
            )
        return init(batch_size)

    @torch.no_grad()
    def log_p_next(self, x: Tensor, cache=None) -> Tensor:
        """(B, n) tokens -> (B, n, V) float32 log p(next token | tokens up to each position).

        With a cache, x continues the tokens already fed through it, and the cache grows.
        """
        if cache is None:
            logits = self.backbone(x, None, None)
        else:
            logits = self.backbone.forward_cached(x, cache)
        return self.objective.log_p_next(logits)
