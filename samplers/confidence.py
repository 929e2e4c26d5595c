"""Block-wise confidence decoding: LLaDA's low-confidence remasking (Nie et al. 2025,
arXiv:2502.09992), MaskGIT's confidence-ordered unmasking (Chang et al. 2022) and DiffuGPT's
decoding (Gong et al. 2024).

The generated span (after the prompt) is cut into blocks of `block_length` decoded left
to right. A block gets its share of `steps`; at each step every masked position of the
block draws x0 ~ p(x0 | x_t) (filtered), and each sample commits a fixed number of its
drawn tokens (LLaDA's even split of the block's masks over the block's steps), those with
the highest confidence *in that sample*: `low_confidence` p(drawn token), `margin`
top1 - top2, `entropy` minus the entropy, or `random`. With `eos_id` decoding stops after
the block in which every sample has produced EOS; what is left masked becomes EOS.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from samplers.base import GuidedDenoiser, Sampler, sample_categorical, uniform

STRATEGIES = ("low_confidence", "margin", "entropy", "random")


def num_transfer_tokens(num_masked: Tensor, steps: int) -> Tensor:
    """(B,) masks in a block -> (B, steps) tokens to commit per step, summing to num_masked."""
    base, rest = num_masked // steps, num_masked % steps  # (B,)
    extra = torch.arange(steps, device=num_masked.device)[None] < rest[:, None]  # (B, steps)
    return base[:, None] + extra.long()


def confidence(log_p_x0: Tensor, x0: Tensor, strategy: str, u: Tensor) -> Tensor:
    """(N, V) log-probs, (N,) drawn tokens, (N,) uniforms -> (N,) score, higher = commit first."""
    probs = torch.softmax(log_p_x0.to(torch.float64), dim=-1)  # (N, V)
    if strategy == "low_confidence":
        return probs.gather(-1, x0[:, None]).squeeze(-1)
    if strategy == "margin":
        top2 = probs.topk(2, dim=-1).values  # (N, 2)
        return top2[:, 0] - top2[:, 1]
    if strategy == "entropy":
        return (probs * log_p_x0.to(torch.float64).clamp_min(-1e30)).sum(-1)  # -H
    return u  # random


def select_per_sample(scores: Tensor, counts: Tensor) -> Tensor:
    """(B, L) scores (-inf: not a candidate), (B,) counts -> (B, L) bool: each row's top counts[b]."""
    order = scores.argsort(dim=1, descending=True, stable=True)  # (B, L)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    )
    return (rank < counts[:, None]) & torch.isfinite(scores)


class ConfidenceSampler(Sampler):
    """Blocks left to right, a fixed number of most-confident tokens committed per step."""

    name = "confidence"

    def __init__(
        self,
        steps: int = 64,
        block_length: int = 32,
        strategy: str = "low_confidence",
        eos_id: int | None = None,
        num_samples: int = 8,
        batch_size: int = 8,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float = 0.0,
    ) -> None:
        super().__init__(num_samples, batch_size, temperature, top_k, top_p, cfg_scale)
        if strategy not in STRATEGIES:
            raise ValueError(f"sampler.strategy={strategy!r}; choose one of {STRATEGIES}")
        if steps < 1 or block_length < 1:
            raise ValueError(f"sampler={self.name}: steps and block_length must be >= 1")
        self.steps = steps
        self.block_length = block_length
        self.strategy = strategy
        self.eos_id = eos_id

    def _generate(
        self,
        model: GuidedDenoiser,
        x: Tensor,
        generator: torch.Generator | None,
        record: Callable[[Tensor], None] | None,
    ) -> Tensor:
        batch, length = x.shape
        start = int(model.cond_mask.all(0).long().cumprod(0).sum())  # common prompt length
        free = (x == model.mask_id).sum(1).clamp_min(1)  # (B,) positions to generate
        num_blocks = -(-(length - start) // self.block_length)
        if self.steps < num_blocks:
            raise ValueError(f"sampler={self.name}: steps={self.steps} < {num_blocks} blocks")
        positions = torch.arange(length, device=x.device)
        for k in range(num_blocks):
            lo, hi = start + k * self.block_length, min(start + (k + 1) * self.block_length, length)
            in_block = (positions >= lo) & (positions < hi)  # (L,)
            block_steps = self.steps // num_blocks + int(k < self.steps % num_blocks)
            counts = num_transfer_tokens(((x == model.mask_id) & in_block).sum(1), block_steps)
            for j in range(block_steps):
                candidate = (x == model.mask_id) & in_block  # (B, L)
                if not bool(candidate.any()):
                    break
                t = (x == model.mask_id).sum(
                    1
                ).double() / free  # masked fraction, = t for linear alpha
                log_p_x0 = model.log_p_x0(x, t.float())  # (B, L, V)
                u = uniform((2, batch, length), generator, x.device)  # token, random score
                x0 = sample_categorical(self.filter(log_p_x0[candidate]), u[0][candidate])
                scores = torch.full(
                    (batch, length), -torch.inf, dtype=torch.float64, device=x.device
                )
                scores[candidate] = confidence(
                    log_p_x0[candidate], x0, self.strategy, u[1][candidate]
                )
                commit = select_per_sample(scores, counts[:, j])  # (B, L)
                drawn = x.clone()
                drawn[candidate] = x0
                x = torch.where(commit, drawn, x)
                if record is not None:
                    record(x.clone())
            if self.eos_id is not None and bool((x[:, start:hi] == self.eos_id).any(1).all()):
                x = x.masked_fill(x == model.mask_id, self.eos_id)  # every sample has ended
                if record is not None:
                    record(x.clone())
                break
        return x
