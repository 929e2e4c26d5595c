"""Autoregressive sampling for the AR baseline (MDLM sec. 5's AR Transformer): left to right,
one token per network call, with a KV cache so that L tokens cost O(L) work, not O(L^2).

Each step draws x[i] ~ p(x[i] | x[:i]) in float64 after temperature, top-k and nucleus
(top-p) filtering (Holtzman et al. 2020). The mask token is never drawn (it is not text).
The first token is the prompt, or `bos_id` when there is none (the AR loss never scores
the first token, so the model needs one to condition on).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from samplers.base import (
    GuidedDenoiser,
    NextTokenModel,
    SampleOutput,
    Sampler,
    sample_categorical,
    uniform,
)


class ARSampler(Sampler):
    """Next-token sampling with an optional KV cache; same tokens with and without it."""

    name = "ar"
    requires = frozenset({"next_token"})

    def __init__(
        self,
        use_cache: bool = True,
        steps: int | None = None,
        **common: Any,
    ) -> None:
        """`steps` is unused (AR makes exactly one network call per new token); it is accepted
        so that configs setting `sampler.steps` for every sampler (debug=tiny_cpu) compose.
        `common`: `Sampler.__init__`'s (`bos_id`, the first token without a prompt, comes
        from the tokenizer at build time); AR is never guided (cfg_scale must stay 0)."""
        super().__init__(**common)
        if self.cfg_scale != 0:
            raise ValueError(f"sampler={self.name} has no guidance: set sampler.cfg_scale=0")
        self.steps = steps
        self.use_cache = use_cache

    def sample(
        self,
        denoiser: NextTokenModel,
        num_samples: int,
        length: int,
        prefix: Tensor | None = None,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        fixed_mask: Tensor | None = None,
        fixed_values: Tensor | None = None,
        device: torch.device | str | None = None,
        on_step: Callable[[Tensor], None] | None = None,
    ) -> SampleOutput:
        """`length` tokens continuing `prefix` ((P,) or (B, P)), or `[bos_id]` without one."""
        if fixed_mask is not None:
            raise ValueError(
                "sampler=ar writes left to right and cannot hold tokens fixed after the prompt "
                "(infilling); use a diffusion sampler"
            )
        if prefix is None:
            if self.bos_id is None:
                raise ValueError(
                    "sampler=ar needs a first token: pass a prefix or set sampler.bos_id to the "
                    "tokenizer's BOS id (the AR loss never scores the first token)"
                )
            prefix = torch.tensor([self.bos_id])
        if prefix.shape[-1] < 1 or prefix.shape[-1] > length:
            raise ValueError(f"prefix of {prefix.shape[-1]} tokens for length={length}")
        return super().sample(
            denoiser,
            num_samples,
            length,
            prefix,
            generator,
            return_trajectory,
            device=device,
            on_step=on_step,
        )

    def _generate(
        self,
        model: GuidedDenoiser,
        x: Tensor,
        generator: torch.Generator | None,
        record: Callable[[Tensor], None] | None,
    ) -> Tensor:
        batch, length = x.shape
        start = int(model.cond_mask[0].sum())  # prompt length P: positions [0, P) are given
        cache = model.init_cache(batch) if self.use_cache else None
        fed = 0  # tokens already inside the cache
        for i in range(start, length):
            if cache is None:
                log_p = model.log_p_next(x[:, :i])[:, -1]  # (B, V), the whole prefix again
            else:
                log_p = model.log_p_next(x[:, fed:i], cache)[:, -1]  # only the new tokens
                fed = i
            log_p = log_p.masked_fill(
                torch.arange(log_p.shape[-1], device=x.device) == model.mask_id, -torch.inf
            )
            u = uniform((batch,), generator, x.device)  # float64, one per sequence
            x[:, i] = sample_categorical(self.filter(log_p), u)
            if record is not None:
                record(x.clone())
        return x
