"""Block-wise confidence decoding: LLaDA's low-confidence remasking (Nie et al. 2025,
arXiv:2502.09992), MaskGIT's confidence-ordered unmasking (Chang et al. 2022), DiffuGPT's
decoding (Gong et al. 2024), Fast-dLLM's parallel decoding and KV caches (Wu et al. 2025,
arXiv:2505.22618) and the EB-sampler (Ben-Hamu et al. 2025, arXiv:2505.24857).

The generated span (after the prompt) is cut into blocks of `block_length` decoded left
to right. At each step every masked position of the current block draws x0 ~ p(x0 | x_t)
(filtered), and each sample commits some of its drawn tokens, the most confident first
(`low_confidence` p(drawn token), `margin` top1 - top2, `entropy` minus the entropy, or
`random`). How many:

- by default LLaDA's even split: the block gets its share of `steps`, each step commits
  the block's masks / the block's steps;
- `threshold` (Fast-dLLM): every position whose p(drawn token) >= threshold, at least one;
- `factor` (Fast-dLLM's factor rule): the n most confident, n the largest with
  c_(k) >= 1 - factor / (k + 1) for every k <= n (c_(k): the k-th highest confidence), >= 1;
- `strategy="eb"` (EB-sampler): in order of increasing entropy, the longest prefix whose
  entropies sum, minus their largest, to at most `eb_gamma`, at least one.

With threshold / factor / eb a block takes as many steps as it needs (at most one per
token) and `steps` is not used. `cache` (Fast-dLLM): `prefix` runs one full forward at the
start of each block (its keys/values cached) and then only the current block and what
follows it, attending to the cached keys of the finished blocks on the left; `dual` also
reuses the cached keys of the still-masked suffix and runs only the current block. Both
are exact for a block-causal model and approximations for a bidirectional one (the cached
keys are those of the block's first step). With `stop_at_eos` decoding stops after the block
in which every sample has produced EOS; what is left masked becomes EOS.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from samplers.base import (
    GuidedDenoiser,
    Sampler,
    check_capabilities,
    sample_categorical,
    uniform,
)

log = logging.getLogger(__name__)

STRATEGIES = ("low_confidence", "margin", "entropy", "random", "eb")
CACHES = ("none", "prefix", "dual")


def num_transfer_tokens(num_masked: Tensor, steps: int) -> Tensor:
    """(B,) masks in a block -> (B, steps) tokens to commit per step, summing to num_masked."""
    base, rest = num_masked // steps, num_masked % steps  # (B,)
    extra = torch.arange(steps, device=num_masked.device)[None] < rest[:, None]  # (B, steps)
    return base[:, None] + extra.long()


def entropy(log_p: Tensor) -> Tensor:
    """(N, V) log-probs -> (N,) float64 entropy (zero-probability entries add nothing)."""
    log_p = log_p.to(torch.float64)
    return -(log_p.exp() * log_p.clamp_min(-1e30)).sum(-1)


def confidence(log_p_x0: Tensor, x0: Tensor, strategy: str, u: Tensor) -> Tensor:
    """(N, V) log-probs, (N,) drawn tokens, (N,) uniforms -> (N,) score, higher = commit first."""
    probs = torch.softmax(log_p_x0.to(torch.float64), dim=-1)  # (N, V)
    if strategy == "low_confidence":
        return probs.gather(-1, x0[:, None]).squeeze(-1)
    if strategy == "margin":
        top2 = probs.topk(2, dim=-1).values  # (N, 2)
        return top2[:, 0] - top2[:, 1]
    if strategy in ("entropy", "eb"):
        return -entropy(log_p_x0)
    return u  # random


def select_per_sample(scores: Tensor, counts: Tensor) -> Tensor:
    """(B, L) scores (-inf: not a candidate), (B,) counts -> (B, L) bool: each row's top counts[b]."""
    order = scores.argsort(dim=1, descending=True, stable=True)  # (B, L)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    )
    return (rank < counts[:, None]) & torch.isfinite(scores)


def threshold_counts(scores: Tensor, threshold: float) -> Tensor:
    """(B, n) confidences (-inf: not a candidate) -> (B,) how many reach `threshold`, >= 1
    (Fast-dLLM: when none does, the most confident token is committed anyway)."""
    return (scores >= threshold).sum(1).clamp_min(1)


def factor_counts(scores: Tensor, factor: float) -> Tensor:
    """(B, n) confidences -> (B,) the largest n with c_(k) >= 1 - factor / (k + 1) for all
    k <= n, at least 1 (Fast-dLLM's factor rule). c_(k) falls and the bound rises with k, so
    the count of k meeting it is that n."""
    ranked = scores.sort(dim=1, descending=True).values  # (B, n)
    k = torch.arange(1, scores.shape[1] + 1, device=scores.device, dtype=ranked.dtype)
    return (ranked >= 1 - factor / (k + 1)).sum(1).clamp_min(1)


def eb_counts(entropies: Tensor, gamma: float) -> Tensor:
    """(B, n) entropies (+inf: not a candidate) -> (B,) EB-sampler counts: in increasing
    entropy, the longest prefix with sum - max <= gamma, at least 1."""
    ranked = entropies.sort(dim=1).values  # (B, n)
    finite = torch.isfinite(ranked)
    ranked = ranked.masked_fill(~finite, 0.0)
    spent = ranked.cumsum(1) - ranked.cummax(1).values  # (B, n)
    return ((spent <= gamma) & finite).sum(1).clamp_min(1)


class ConfidenceSampler(Sampler):
    """Blocks left to right, the most confident masked tokens of the block committed per step."""

    name = "confidence"
    # not "whole_canvas": a block-causal model (bd3lm) is exact here when the blocks align
    # (`_check_blocks`), since only the current block's predictions are read
    requires: ClassVar[frozenset[str]] = frozenset({"absorbing"})

    def __init__(
        self,
        steps: int = 64,
        block_length: int = 32,
        strategy: str = "low_confidence",
        stop_at_eos: bool = False,
        threshold: float | None = None,
        factor: float | None = None,
        eb_gamma: float = 0.1,
        cache: str = "none",
        **common: Any,
    ) -> None:
        """`stop_at_eos`: stop once every sample has produced the tokenizer's EOS (`eos_id`,
        given at build time; mode=generate turns it on). threshold / factor / eb_gamma /
        cache: see the module docstring. `common`: `Sampler.__init__`'s."""
        super().__init__(**common)
        if strategy not in STRATEGIES:
            raise ValueError(f"sampler.strategy={strategy!r}; choose one of {STRATEGIES}")
        if steps < 1 or block_length < 1:
            raise ValueError(f"sampler={self.name}: steps and block_length must be >= 1")
        if cache not in CACHES:
            raise ValueError(f"sampler.cache={cache!r}; choose one of {CACHES}")
        if threshold is not None and factor is not None:
            raise ValueError("sampler.threshold and sampler.factor exclude each other; set one")
        if (threshold is not None or factor is not None) and strategy != "low_confidence":
            raise ValueError(
                "sampler.threshold / sampler.factor compare p(drawn token) (Fast-dLLM) and need "
                f"strategy=low_confidence, got strategy={strategy}"
            )
        if threshold is not None and not 0 < threshold <= 1:
            raise ValueError(f"sampler.threshold={threshold} must lie in (0, 1]")
        if factor is not None and factor <= 0:
            raise ValueError(f"sampler.factor={factor} must be > 0")
        if eb_gamma < 0:
            raise ValueError(f"sampler.eb_gamma={eb_gamma} must be >= 0")
        self.steps = steps
        self.block_length = block_length
        self.strategy = strategy
        self.threshold = threshold
        self.factor = factor
        self.eb_gamma = eb_gamma
        self.cache = cache
        if stop_at_eos and self.eos_id is None:
            raise ValueError(f"sampler={self.name}: stop_at_eos=true needs the tokenizer's eos_id")
        self.stop_id = self.eos_id if stop_at_eos else None

    @property
    def adaptive(self) -> bool:
        """Whether each step decides its own count (threshold, factor, eb) instead of the split."""
        return self.threshold is not None or self.factor is not None or self.strategy == "eb"

    def _generate(
        self,
        model: GuidedDenoiser,
        x: Tensor,
        generator: torch.Generator | None,
        record: Callable[[Tensor], None] | None,
    ) -> Tensor:
        length = x.shape[1]
        start = int(model.cond_mask.all(0).long().cumprod(0).sum())  # common prompt length
        free = (x == model.mask_id).sum(1).clamp_min(1)  # (B,) positions to generate
        num_blocks = -(-(length - start) // self.block_length)
        self._check_blocks(model, start, length)
        if not self.adaptive and self.steps < num_blocks:
            raise ValueError(f"sampler={self.name}: steps={self.steps} < {num_blocks} blocks")
        cache = self._init_cache(model, x.shape[0])
        for k in range(num_blocks):
            lo, hi = start + k * self.block_length, min(start + (k + 1) * self.block_length, length)
            block_steps = self.steps // num_blocks + int(k < self.steps % num_blocks)
            x = self._decode_block(model, x, lo, hi, block_steps, free, cache, generator, record)
            if self.stop_id is not None and bool(self._ended(model, x, start, hi).all()):
                x = x.masked_fill(x == model.mask_id, self.stop_id)  # every sample has ended
                if record is not None:
                    record(x.clone())
                break
        return x

    def _ended(self, model: GuidedDenoiser, x: Tensor, start: int, hi: int) -> Tensor:
        """(B,) rows that have generated the stop token in [start, hi) (a fixed, infilled
        EOS is conditioning: it does not end a row)."""
        stop = (x[:, start:hi] == self.stop_id) & ~model.cond_mask[:, start:hi]
        return stop.any(1)

    def _check_blocks(self, model: GuidedDenoiser, start: int, length: int) -> None:
        """On a model without whole-canvas denoising (bd3lm with block_size < length), each
        model block must start a block of ours: then the blocks before the one being decoded
        are clean, as the model was trained to see them."""
        if "whole_canvas" in model.capabilities:
            return
        if "block_causal" not in model.capabilities:
            check_capabilities(self.name, {"whole_canvas"}, model.capabilities)
        size = model.block_size
        edges = range(size * (start // size + 1), length, size)  # model blocks after the prompt
        off = [e for e in edges if (e - start) % self.block_length]
        if off:
            raise ValueError(
                f"sampler=confidence with sampler.block_length={self.block_length} on a "
                f"block-causal model (parameterization.block_size={size}) after a prompt of "
                f"{start} tokens: the model block starting at position {off[0]} would be "
                "decoded while the block before it is still masked. Set sampler.block_length "
                f"so that every model block starts one of ours (a divisor of {size}, the prompt a "
                "multiple of it), or use sampler=block"
            )
        if self.cache != "none":  # its span passes would see the masked blocks to the right
            raise ValueError(
                f"sampler.cache={self.cache} on a block-causal model (parameterization.block_size="
                f"{size}): the cached span passes attend to the masked blocks after the current "
                "one, which this model never sees; use sampler.cache=none, or sampler=block "
                "(its KV cache is exact)"
            )

    def _init_cache(self, model: GuidedDenoiser, batch: int) -> tuple[object, object | None] | None:
        if self.cache == "none":
            return None
        if not self._cache_is_exact(model):
            log.warning(
                "sampler.cache=%s on a bidirectional model is an approximation (Fast-dLLM): "
                "the cached keys/values are refreshed once per block, so within a block the "
                "model does not see the tokens committed since. Exact only for block-causal "
                "models whose blocks tile ours (sampler.block_length a multiple of their "
                "block_size).",
                self.cache,
            )
        return model.init_cache(batch)

    def _cache_is_exact(self, model: GuidedDenoiser) -> bool:
        """A block-causal model whose blocks tile ours: a span pass then sees exactly the
        blocks the full pass sees. bd3lm with one block over the canvas (block_size >= length,
        MDLM) is block-causal in name only: within its one bidirectional block the cache is
        Fast-dLLM's approximation."""
        if "block_causal" not in model.capabilities:
            return False
        return self.block_length % model.block_size == 0

    def _decode_block(
        self,
        model: GuidedDenoiser,
        x: Tensor,
        lo: int,
        hi: int,
        block_steps: int,
        free: Tensor,
        cache: tuple[object, object | None] | None,
        generator: torch.Generator | None,
        record: Callable[[Tensor], None] | None,
    ) -> Tensor:
        """Unmask the block [lo, hi) of x (B, L): a fixed split over `block_steps` steps, or
        (adaptive) as many steps as the rule needs."""
        counts = num_transfer_tokens((x[:, lo:hi] == model.mask_id).sum(1), block_steps)
        j = 0
        while j < block_steps or self.adaptive:
            candidate = x[:, lo:hi] == model.mask_id  # (B, n)
            if not bool(candidate.any()):
                break
            t = ((x == model.mask_id).sum(1).double() / free).float()  # masked share = t (linear)
            log_p = self._block_log_p(model, x, t, lo, hi, cache, first=j == 0)  # (B, n, V)
            u = uniform((2, *x.shape), generator, x.device)[:, :, lo:hi]  # token, random score
            x0 = sample_categorical(self.filter(log_p[candidate]), u[0][candidate])
            scores = torch.full(candidate.shape, -torch.inf, dtype=torch.float64, device=x.device)
            scores[candidate] = confidence(log_p[candidate], x0, self.strategy, u[1][candidate])
            commit = select_per_sample(scores, self._counts(log_p, candidate, scores, counts, j))
            drawn = x[:, lo:hi].clone()
            drawn[candidate] = x0
            x = x.clone()
            x[:, lo:hi] = torch.where(commit, drawn, x[:, lo:hi])
            j += 1
            if record is not None:
                record(x.clone())
        return x

    def _counts(
        self, log_p: Tensor, candidate: Tensor, scores: Tensor, counts: Tensor, j: int
    ) -> Tensor:
        """(B,) tokens to commit this step (rows without candidates commit nothing anyway)."""
        if self.threshold is not None:
            return threshold_counts(scores, self.threshold)
        if self.factor is not None:
            return factor_counts(scores, self.factor)
        if self.strategy == "eb":
            ent = torch.full(candidate.shape, torch.inf, dtype=torch.float64, device=log_p.device)
            ent[candidate] = entropy(log_p[candidate])
            return eb_counts(ent, self.eb_gamma)
        return counts[:, j]

    def _block_log_p(
        self,
        model: GuidedDenoiser,
        x: Tensor,
        t: Tensor,
        lo: int,
        hi: int,
        cache: tuple[object, object | None] | None,
        first: bool,
    ) -> Tensor:
        """(B, hi - lo, V) log p(x0 | x_t) of the block. No cache: the full forward, on the rows
        that still have masks in the block (per-row skipping). prefix / dual: a full forward
        that refreshes the cache at the block's first step, then the span [lo, L) over the
        cached prefix (prefix) or the span [lo, hi) over every cached key outside it (dual)."""
        if cache is None:
            live = (x[:, lo:hi] == model.mask_id).any(1)  # (B,)
            if bool(live.all()):
                return model.log_p_x0(x, t)[:, lo:hi]
            rows = live.nonzero().squeeze(1)
            out = torch.zeros(*x[:, lo:hi].shape, model.vocab_size, device=x.device)
            out[rows] = model.log_p_x0(x[rows], t[rows], rows=rows)[:, lo:hi].to(out.dtype)
            return out
        length = x.shape[1]
        if first:
            return model.log_p_x0_span(x, t, 0, length, cache, context="prefix")[:, lo:hi]
        if self.cache == "prefix":
            span = model.log_p_x0_span(x, t, lo, length, cache, context="prefix", write=False)
            return span[:, : hi - lo]
        return model.log_p_x0_span(x, t, lo, hi, cache, context="all", write=True)
