"""Block diffusion sampling with an exact KV cache (BD3-LM, Arriola et al., ICLR 2025).

A block-causal model (parameterization=bd3lm) factorises p(x) = prod_b p(x^b | x^{<b}); each
factor is a masked diffusion over the block's positions. The sampler draws block after block:
the block starts all-mask and takes `steps` ancestral steps (MDLM eq. 7, the ddpm_cache rule:
the network runs only when the block changed), each call seeing the block itself and the cached
keys/values of the finished blocks (`forward_span(..., context="prefix", write=False)`). A
finished block is run once more, clean, to write its keys/values (`write=True`): exactly what
the x_0 half computes in training, so the cache is exact, not an approximation.
`first_hitting=True` (BD3-LM's default) replaces the steps: one call per token, unmasking one
uniformly chosen masked position of the block, so a block of n masks takes n calls.

Generation stops when every row has produced `eos_id` (positions after a row's first generated
EOS are filled with EOS, fixed tokens excepted; the canvas keeps its width), or at `max_length`
tokens, which may exceed the training length: past the
backbone's context the window slides, keeping the last whole blocks of at most half the
context, re-encoded at positions from 0 (BD3-LM's arbitrary-length generation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from samplers.base import GuidedDenoiser, Sampler, sample_categorical, uniform
from samplers.ddpm import ddpm_step, time_grid
from samplers.first_hitting import masked_position


class BlockSampler(Sampler):
    """Block-by-block ancestral sampling of a block-causal model with the span KV cache."""

    name = "block"
    requires: ClassVar[frozenset[str]] = frozenset({"absorbing", "block_causal", "time_agnostic"})

    def __init__(
        self,
        steps: int = 16,
        block_size: int | None = None,
        max_length: int | None = None,
        stop_at_eos: bool = True,
        first_hitting: bool = False,
        **common: Any,
    ) -> None:
        """`steps`: ancestral steps per block; `block_size`: null = the model's own, else it
        must equal it (a check); `max_length`: tokens to generate (null = the model's length);
        `first_hitting`: one token per call instead of the steps (BD3-LM's default)."""
        super().__init__(**common)
        if steps < 1:
            raise ValueError(f"sampler=block: steps must be >= 1, got {steps}")
        if block_size is not None and block_size < 1:
            raise ValueError(f"sampler.block_size={block_size} must be >= 1 (or null)")
        if max_length is not None and max_length < 1:
            raise ValueError(f"sampler.max_length={max_length} must be >= 1 (or null)")
        self.steps = steps
        self.block_size = block_size
        self.max_length = max_length
        self.stop_at_eos = stop_at_eos
        self.first_hitting = bool(first_hitting)

    @classmethod
    def requirements(cls, settings: Mapping[str, Any]) -> frozenset[str]:
        return cls.requires

    def canvas_length(self, length: int) -> int:
        return int(self.max_length or length)

    def _model_block_size(self, model: GuidedDenoiser) -> int:
        """The model's block size (`BlockCausalDenoiser.block_size`); sampler.block_size, when
        set, must equal it (the cache is exact only for that one)."""
        own = model.block_size
        if self.block_size is not None and int(self.block_size) != own:
            raise ValueError(
                f"sampler.block_size={self.block_size} differs from the model's block_size="
                f"{own}: the cache is exact only for the block size the model was trained "
                "with (set sampler.block_size=null)"
            )
        return own

    # ---- the cache -----------------------------------------------------------------------------
    def _encode(self, model: GuidedDenoiser, window: Tensor, fixed: Tensor, block: int, t: Tensor):
        """A fresh cache holding the clean `window` (B, W), written block by block; `fixed`
        (B, W) is the window's conditioning (CFG's unconditional pass masks it)."""
        model.cond_mask = fixed
        cache = model.init_cache(window.shape[0])
        for a in range(0, window.shape[1], block):
            b = min(a + block, window.shape[1])
            model.log_p_x0_span(window, t, a, b, cache, context="prefix", write=True)
        return cache

    # ---- the loop ------------------------------------------------------------------------------
    def _generate(
        self,
        model: GuidedDenoiser,
        x: Tensor,
        generator: torch.Generator | None,
        record: Callable[[Tensor], None] | None,
    ) -> Tensor:
        block = self._model_block_size(model)
        batch, total = x.shape
        mask_id = model.mask_id
        one = torch.ones(batch, device=x.device)  # (B,) t for the clean passes (ignored)
        cache = model.init_cache(batch)
        capacity = self._capacity(cache)
        fixed = x != mask_id  # (B, total) prompt / fixed tokens, never counted as output
        offset = 0  # canvas index of model position 0 (moves when the window slides)
        done = torch.zeros(batch, dtype=torch.bool, device=x.device)  # (B,) row ended at EOS
        end = 0
        ts = time_grid(self.steps)
        for start in range(0, total, block):
            end = min(start + block, total)
            if end - offset > capacity:  # slide: keep the last whole blocks of <= capacity / 2
                keep = (capacity // 2 // block) * block
                offset = start - keep
                cache = self._encode(model, x[:, offset:start], fixed[:, offset:start], block, one)
            lo, hi = start - offset, end - offset  # the block in model positions
            window = x[:, offset:end]  # a view: steps below write into x
            model.cond_mask = fixed[:, offset:end]  # CFG masks the window's prompt / fixed tokens
            snap = None if record is None else (lambda canvas=x: record(canvas.clone()))
            if self.first_hitting:
                self._first_hitting_block(model, window, lo, hi, cache, one, generator, snap)
            else:
                self._ancestral_block(model, window, lo, hi, cache, ts, generator, snap)
            if self.stop_at_eos and self.eos_id is not None:
                hit = ((x[:, start:end] == self.eos_id) & ~fixed[:, start:end]).any(1)
                done |= hit
                if bool(done.all()):  # every row has ended: the rest of the canvas is EOS
                    x = x.masked_fill(x == mask_id, self.eos_id)
                    if record is not None:
                        record(x.clone())
                    break
            if end < total:  # the finished block joins the cache (clean, as x_0 in training)
                model.log_p_x0_span(window, one, lo, hi, cache, context="prefix", write=True)
        return self._finish(x, fixed)

    def _ancestral_block(
        self,
        model: GuidedDenoiser,
        window: Tensor,
        lo: int,
        hi: int,
        cache: Any,
        ts: Tensor,
        generator: torch.Generator | None,
        snap: Callable[[], None] | None,
    ) -> None:
        """`steps` ancestral steps on window[:, lo:hi] (in place), the ddpm_cache rule: the
        network runs only when the block changed."""
        batch, mask_id = window.shape[0], model.mask_id
        log_p, changed = None, True
        for i in range(self.steps):
            span = window[:, lo:hi]
            if not bool((span == mask_id).any()):
                break
            t = torch.full((batch,), float(ts[i]), device=window.device)
            alpha_t = model.alpha(t)
            last = i == self.steps - 1
            s = torch.full((batch,), float(ts[i + 1]), device=window.device)
            alpha_s = torch.ones_like(alpha_t) if last else model.alpha(s)
            if log_p is None or changed:  # ddpm_cache: the block's x_t changed
                log_p = self.filter(
                    model.log_p_x0_span(window, t, lo, hi, cache, context="prefix", write=False)
                )
            new = ddpm_step(log_p, span, alpha_t, alpha_s, generator, mask_id)
            changed = not torch.equal(new, span)
            window[:, lo:hi] = new
            if snap is not None:
                snap()

    def _first_hitting_block(
        self,
        model: GuidedDenoiser,
        window: Tensor,
        lo: int,
        hi: int,
        cache: Any,
        t: Tensor,
        generator: torch.Generator | None,
        snap: Callable[[], None] | None,
    ) -> None:
        """BD3-LM's default (`sampling.first_hitting`, Zheng et al.): one network call per
        token, which unmasks one masked position of the block chosen uniformly, its value drawn
        from p(x0 | x_t). Exact for a time-agnostic model (the event times then do not
        matter), whatever `steps`: a block of n masks takes n calls."""
        rows = torch.arange(window.shape[0], device=window.device)
        while True:
            span = window[:, lo:hi]
            is_mask = span == model.mask_id
            if not bool(is_mask.any()):
                return
            u = uniform((2, window.shape[0]), generator, window.device)  # which position, value
            pos, active = masked_position(is_mask, u[0])
            log_p = self.filter(
                model.log_p_x0_span(window, t, lo, hi, cache, context="prefix", write=False)
            )
            value = sample_categorical(log_p[rows, pos], u[1])
            new = span.clone()
            new[rows[active], pos[active]] = value[active]
            window[:, lo:hi] = new
            if snap is not None:
                snap()

    @staticmethod
    def _capacity(cache) -> int:
        """Positions the backbone's cache holds (the first of CFG's pair)."""
        first = cache[0] if isinstance(cache, tuple) else cache
        return int(getattr(first, "capacity", 1 << 62))

    def _finish(self, x: Tensor, fixed: Tensor) -> Tensor:
        """Rows that produced EOS are EOS from their first generated EOS on (fixed tokens
        stay: they are conditioning, never output)."""
        if not self.stop_at_eos or self.eos_id is None:
            return x
        is_eos = (x == self.eos_id) & ~fixed  # (B, L)
        after = is_eos.long().cumsum(1) > 0  # at or after the first generated EOS
        return x.masked_fill(after & ~fixed, self.eos_id)
