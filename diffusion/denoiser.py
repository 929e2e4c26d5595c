"""The denoiser seam: what samplers call, built by the objective from the backbone.

Each class implements one protocol of `samplers/base.py` over a backbone and an objective
(in eval mode, no gradients), so samplers never see the optimizer, the trainer or the data:

- `MaskedModelDenoiser` (`MaskedDenoiser`): log p(x0 | x_t, t) and the schedule. Samplers
  always see the SUBS view (mask column -inf, unmasked rows one-hot on x_t): the identity
  for SUBS and SEDD, and for D3PM (whose softmax may predict the mask) the same network with
  the mask dropped and renormalised. `time_conditioned=False` means the output does not depend
  on t, which is what makes `ddpm_cache` exact. With a backbone that `supports_span_cache`,
  also `log_p_x0_span` (`SpanCacheDenoiser`).
- `ScoreModelDenoiser` (`ScoreDenoiser`): adds the network's own concrete score (SEDD).
- `NextTokenDenoiser` (`NextTokenModel`): an autoregressive objective's next-token
  log-probabilities, with the backbone's KV cache.

Which one a model gets is the objective's choice (`objective.denoiser(backbone)`); its
`capabilities` are the objective's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffusion.objectives.base import Objective
from diffusion.objectives.subs import subs_log_p_x0


class MaskedModelDenoiser:
    """Implements `samplers.base.MaskedDenoiser` for a backbone and an absorbing objective."""

    def __init__(self, backbone: nn.Module, objective: Objective) -> None:
        self.backbone = backbone
        self.objective = objective
        self.mask_id = objective.mask_id
        self.vocab_size = objective.vocab_size
        self.time_conditioned = objective.time_conditioned
        self.capabilities = objective.capabilities
        # the span KV cache of samplers.base.SpanCacheDenoiser (DiT: forward_span)
        self.supports_span_cache = bool(backbone.supports_span_cache)

    def alpha(self, t: Tensor) -> Tensor:
        return self.objective.noise.alpha(t)

    @torch.no_grad()
    def log_p_x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        logits = self.backbone(x_t, self.objective.backbone_sigma(t, x_t), None)
        log_p = self.objective.log_p_x0(logits, x_t)
        return subs_log_p_x0(log_p, x_t, self.mask_id)  # the SUBS view (identity for SUBS)

    @torch.no_grad()
    def log_p_x0_span(
        self,
        x_t: Tensor,
        t: Tensor,
        start: int,
        end: int,
        cache,
        *,
        context: str = "prefix",
        write: bool = True,
    ) -> Tensor:
        """(B, L), (B,) -> (B, end - start, V): log p(x0 | x_t) on x_t[:, start:end] with the
        backbone's span KV cache (`forward_span`); the conditioning is that of the whole x_t."""
        span = x_t[:, start:end]
        sigma = self.objective.backbone_sigma(t, x_t)
        logits = self.backbone.forward_span(span, start, cache, sigma, context=context, write=write)
        return subs_log_p_x0(self.objective.log_p_x0(logits, span), span, self.mask_id)

    def init_cache(self, batch_size: int) -> Any:
        """An empty span KV cache for `batch_size` sequences (`supports_span_cache` only)."""
        return self.backbone.init_cache(batch_size)


ModelDenoiser = MaskedModelDenoiser  # the name older code and tests use


class ScoreModelDenoiser(MaskedModelDenoiser):
    """Implements `samplers.base.ScoreDenoiser`: the objective's own score (SEDD)."""

    @torch.no_grad()
    def log_score(self, x_t: Tensor, t: Tensor) -> Tensor:
        """(B, L, V) log s(x_t)_v ~ log p_t(x_t with v at i) / p_t(x_t), for the analytic sampler."""
        sigma = self.objective.noise.sigma(t).float()  # (B,)
        logits = self.backbone(x_t, self.objective.backbone_sigma(t, x_t), None)
        return self.objective.log_score(logits, x_t, sigma)


class NextTokenDenoiser:
    """Implements `samplers.base.NextTokenModel` for a causal backbone and the AR objective."""

    def __init__(self, backbone: nn.Module, objective: Objective) -> None:
        self.backbone = backbone
        self.objective = objective
        self.mask_id = objective.mask_id
        self.vocab_size = objective.vocab_size
        self.capabilities = objective.capabilities

    def init_cache(self, batch_size: int) -> Any:
        """An empty KV cache for `batch_size` sequences (the causal backbone's `init_cache`,
        used by its `forward_cached`)."""
        return self.backbone.init_cache(batch_size)

    @torch.no_grad()
    def log_p_next(self, x: Tensor, cache: Any = None) -> Tensor:
        """(B, n) tokens -> (B, n, V) float32 log p(next token | tokens up to each position).

        With a cache, x continues the tokens already fed through it, and the cache grows.
        """
        if cache is None:
            logits = self.backbone(x, None, None)
        else:
            logits = self.backbone.forward_cached(x, cache)
        return self.objective.log_p_next(logits)
