"""The shared base of every objective: the absorbing forward process and the loss plumbing.

An objective owns (MDLM sec. 3): sampling times t (stratified, optionally on a
discrete grid of T steps), corrupting x0 into x_t, turning backbone logits into
`log p(x0 | x_t)`, and the per-token NELBO. Subclasses override the hooks that
differ (`log_p_x0`, `nll_per_token`); nothing here dispatches on names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from diffusion.noise import NoiseSchedule

log = logging.getLogger("unmask")

MIN_CLEAN = 1e-3  # caps the mask-fraction sigma at -log(1e-3), loglinear's sigma(1)
Rows = tuple[Tensor, int] | None  # (this batch's row indices (B,), global batch size)
LSE_CHUNK_ELEMENTS = 1 << 23  # logits per float32 chunk of the lean cross-entropy (32 MB)


class _ChunkedLogSumExp(torch.autograd.Function):
    """lse (N,) and picked entries (N, K) of (N, V) logits, in float32 one chunk at a time.

    Only the logits (in their own dtype) and the lse are kept for backward, which rebuilds the
    softmax chunk by chunk: no (N, V) float32 temporary is ever whole. `exclude` (a column or
    -1) is left out of the sum, as SUBS' zero masking probability does with a -inf logit.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, cols: Tensor, exclude: int, chunk: int):
        lse = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
        for a in range(0, logits.shape[0], chunk):
            z = logits[a : a + chunk].to(torch.float32, copy=exclude >= 0)  # (chunk, V)
            if exclude >= 0:
                z[:, exclude] = -torch.inf
            lse[a : a + chunk] = torch.logsumexp(z, dim=-1)
        picked = logits.gather(-1, cols).float()  # (N, K)
        ctx.save_for_backward(logits, cols, lse)
        ctx.exclude, ctx.chunk = exclude, chunk
        return lse, picked

    @staticmethod
    def backward(ctx, grad_lse: Tensor, grad_picked: Tensor):
        logits, cols, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for a in range(0, logits.shape[0], ctx.chunk):
            b = a + ctx.chunk
            p = (logits[a:b].float() - lse[a:b, None]).exp_()  # softmax of the chunk
            if ctx.exclude >= 0:
                p[:, ctx.exclude] = 0.0
            grad[a:b] = p.mul_(grad_lse[a:b, None])
        grad.scatter_add_(-1, cols, grad_picked.to(grad.dtype))
        return grad, None, None, None


def logsumexp_and_pick(
    logits: Tensor, cols: Tensor, exclude: int | None = None, chunk: int | None = None
) -> tuple[Tensor, Tensor]:
    """(N, V) logits -> float32 lse (N,) over the vocabulary (less `exclude`) and the logits at
    `cols` (N, K). log p(v) = logits[v] - lse: the cross-entropy with no (N, V) float32 copy.
    `chunk`: rows per float32 chunk (default: about LSE_CHUNK_ELEMENTS logits)."""
    if chunk is None:
        chunk = max(1, LSE_CHUNK_ELEMENTS // max(logits.shape[-1], 1))
    return _ChunkedLogSumExp.apply(logits, cols, -1 if exclude is None else exclude, chunk)


def score_logits(
    backbone: nn.Module, x_t: Tensor, sigma: Tensor | None, attention_mask: Tensor, index: Tensor
) -> Tensor:
    """(N, V) logits at the flat positions `index` (N,) of (B, L): the backbone applies its head
    only there when it can (`scores_positions`, the DiT); otherwise its full logits are cut."""
    if getattr(backbone, "scores_positions", False):
        return backbone(x_t, sigma, attention_mask, positions_to_score=index)
    logits = backbone(x_t, sigma, attention_mask)  # (B, L, V)
    return logits.flatten(0, 1).index_select(0, index)


def scatter_rows(values: Tensor, index: Tensor, shape: torch.Size) -> Tensor:
    """(N,) values at flat positions `index` -> a (B, L) float32 tensor, zero elsewhere."""
    out = torch.zeros(shape.numel(), device=values.device, dtype=torch.float32)
    return out.index_put((index,), values.float()).view(shape)


@dataclass
class LossOutput:
    """Per-token losses and the tokens that count.

    nll:  (B, L) float32, each token's contribution to the NELBO (already weighted)
    mask: (B, L) float32, 1 where the token is scored (real, not padding)
    targets: (B, L) the token each column scores (x0, or x0[:, 1:] for AR), when known
    offset: the row position of column 0 (1 for AR's shifted targets), so that evaluation can
        leave out the first position and BOS tokens (`ppl_excl_bos`)
    """

    nll: Tensor
    mask: Tensor
    targets: Tensor | None = None
    offset: int = 0

    def mean(self) -> Tensor:
        """Loss normalised per token over the batch (MDLM's choice)."""
        return (self.nll * self.mask).sum() / self.mask.sum().clamp_min(1)

    def mean_per_sequence(self) -> Tensor:
        """Each row's loss divided by its scored tokens, averaged over rows (LLaDA's SFT
        normalisation by answer length). Rows with nothing scored count as zero."""
        per_row = (self.nll * self.mask).sum(-1) / self.mask.sum(-1).clamp_min(1)
        return per_row.mean()

    def reduce(self, norm: str) -> Tensor:
        """`norm`: "token" (per token over the batch) or "sequence" (per row, then mean)."""
        if norm == "token":
            return self.mean()
        if norm == "sequence":
            return self.mean_per_sequence()
        raise ValueError(f"training.loss_norm={norm!r}: expected 'token' or 'sequence'")


class Objective(nn.Module):
    """What every objective exposes to the LightningModule and the denoiser.

    Capabilities (class attributes, read by `diffusion.config.check_capabilities` before
    anything is built): `provides`, words of `samplers.base.CAPABILITIES` that its denoiser
    offers; `exact_likelihood`, its perplexity is exact (not a bound);
    `requires_causal_backbone`, it scores next tokens and needs a causal backbone.
    """

    provides: ClassVar[frozenset[str]] = frozenset()
    exact_likelihood: ClassVar[bool] = False
    requires_causal_backbone: ClassVar[bool] = False
    time_conditioned: bool = False  # the instance's setting: the backbone sees sigma(t)
    mask_conditioning: bool = False  # the instance's setting: the backbone sees a statistic of x_t

    @property
    def conditions_backbone(self) -> bool:
        """Whether this objective feeds the backbone a conditioning vector (`backbone_sigma`);
        the builder sets the backbone's flag from it."""
        return self.time_conditioned or self.mask_conditioning

    @classmethod
    def provided(cls, settings: Mapping[str, Any], length: int | None) -> frozenset[str]:
        """What an objective with these settings (its yaml node) offers on sequences of
        `length` tokens, before it is built; by default the class's `provides`."""
        return cls.provides

    @property
    def capabilities(self) -> frozenset[str]:
        """What this objective's denoiser offers the samplers (`provides` + time dependence)."""
        from samplers.base import model_capabilities

        return model_capabilities(self.provides, self.time_conditioned)

    def denoiser(self, backbone: nn.Module):
        """What samplers call for this objective on `backbone` (`diffusion/denoiser.py`)."""
        raise NotImplementedError

    def loss(
        self,
        backbone: nn.Module,
        x0: Tensor,
        attention_mask: Tensor,
        generator=None,
        loss_mask: Tensor | None = None,
        rows: Rows = None,
    ) -> LossOutput:
        """Per-token NELBO terms of x0. `loss_mask` (B, L): the tokens scored (and, for
        diffusion, the only ones noised); `rows=(index, total)`: the batch is those rows of
        a global batch, whose random draws are made whole and indexed."""
        raise NotImplementedError

    def scored_positions(
        self, x0: Tensor, attention_mask: Tensor, loss_mask: Tensor | None
    ) -> Tensor:
        """(B, L) 1 where a token is scored: real, in the loss mask, and not the mask id itself.

        A data token equal to the mask id (a literal "[MASK]" in BERT-tokenised text) is masked
        at every t and has probability 0 under SUBS: scored, it would add about 1e6 nats on the
        full path and a finite value on the lean one; the uniform process (DUO) has no state for
        it. It only conditions; a warning says so once. Needs `self.mask_id`.
        """
        scored = attention_mask if loss_mask is None else attention_mask * loss_mask
        is_mask = (x0 == self.mask_id) & scored.bool()
        if not getattr(self, "_warned_mask_in_data", False) and bool(is_mask.any()):
            self._warned_mask_in_data = True
            log.warning(
                "the data holds the mask id %d (%d tokens in this batch, e.g. a literal mask "
                "token in the text): those positions are not scored, and token counts leave "
                "them out",
                self.mask_id,
                int(is_mask.sum()),
            )
        return scored * (~is_mask).to(scored.dtype)


class AbsorbingDiffusion(Objective):
    """Absorbing-state (masking) diffusion: forward process and the NELBO estimator."""

    provides = frozenset({"absorbing", "whole_canvas"})

    def denoiser(self, backbone: nn.Module):
        """A masked denoiser: log p(x0 | x_t) in the SUBS view, and the schedule."""
        from diffusion.denoiser import MaskedModelDenoiser

        return MaskedModelDenoiser(backbone, self)

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_id: int,
        vocab_size: int,
        time_conditioning: bool = False,
        T: int = 0,
        sampling_eps: float = 1e-3,
        antithetic: bool = True,
        mask_conditioning: bool = False,
        lean_loss: bool = True,
    ) -> None:
        super().__init__()
        if T < 0:
            raise ValueError(f"T={T}: use T=0 for continuous time or T>0 discrete steps")
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id={mask_id} is outside the vocabulary of size {vocab_size}")
        if getattr(type(noise), "training_only", False):
            raise ValueError(
                f"noise={type(noise).__name__.lower()} restricts the masking rates, so a NELBO "
                f"evaluated with it is no bound; only parameterization=bd3lm (which evaluates "
                f"with the full schedule) accepts it: use noise=loglinear"
            )
        self.noise = noise
        self.mask_id = mask_id
        self.vocab_size = vocab_size
        self.time_conditioned = time_conditioning
        self.T = T
        self.sampling_eps = sampling_eps
        self.antithetic = antithetic
        self.mask_conditioning = mask_conditioning and not time_conditioning
        self.lean_loss = lean_loss  # score only masked positions (same values, less memory)

    # ---- time and forward process -------------------------------------------------
    def sample_t(self, n: int, device: torch.device, generator=None, rows: Rows = None) -> Tensor:
        """n times in [eps, 1]: one uniform draw per stratum [i/N, (i+1)/N) (low discrepancy).

        `rows=(index, total)`: these n rows are rows `index` (n,) of a global batch of `total`;
        the strata span the global batch and the draws are made for all `total` rows and
        indexed, so a row's time does not depend on how the global batch is split over
        devices and accumulation steps. With T > 0 the time is snapped up to {1/T, ..., 1}.
        """
        total = n if rows is None else rows[1]
        u = torch.rand(total, device=device, generator=generator, dtype=torch.float32)
        if self.antithetic:
            u = (u + torch.arange(total, device=device)) / total  # stratum i holds one time
        if rows is not None:
            u = u[rows[0].to(u.device)]
        if self.T > 0:
            return (torch.floor(u * self.T) + 1) / self.T
        return self.sampling_eps + (1 - self.sampling_eps) * u

    def q_xt(
        self,
        x0: Tensor,
        move_chance: Tensor,
        generator=None,
        noisable: Tensor | None = None,
        rows: Rows = None,
    ) -> Tensor:
        """Mask each token independently with probability move_chance (B, 1).

        Tokens where `noisable` (B, L) is False (an SFT prompt) are never masked; `rows` as in
        `sample_t` (the uniforms are drawn for the whole global batch and indexed).
        """
        total = x0.shape[0] if rows is None else rows[1]
        u = torch.rand(
            (total, x0.shape[1]), device=x0.device, generator=generator, dtype=torch.float32
        )
        if rows is not None:
            u = u[rows[0].to(u.device)]
        masked = u < move_chance
        if noisable is not None:
            masked &= noisable.bool()
        return torch.where(masked, torch.full_like(x0, self.mask_id), x0)

    def backbone_sigma(self, t: Tensor, x_t: Tensor | None = None) -> Tensor | None:
        """What the backbone is conditioned on: sigma(t) when time-conditioned; else, with
        `mask_conditioning`, -log(fraction of x_t unmasked), a statistic of x_t itself (the
        denoiser stays a function of x_t alone, so ddpm_cache stays exact); else nothing."""
        if self.time_conditioned:
            return self.noise.sigma(t)
        if self.mask_conditioning and x_t is not None:
            masked = (x_t == self.mask_id).float().mean(-1)  # (B,)
            return -torch.log1p(-masked.clamp(max=1 - MIN_CLEAN))
        return None

    # ---- hooks ------------------------------------------------------------------------
    def log_p_x0(self, logits: Tensor, x_t: Tensor) -> Tensor:
        """(B, L, V) backbone logits -> (B, L, V) float32 log p(x0 | x_t)."""
        raise NotImplementedError

    def model_output(self, logits: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """What `nll_per_token` scores: log p(x0 | x_t) here; SEDD's log score needs t."""
        return self.log_p_x0(logits, x_t)

    def nll_per_token(self, model_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """(B, L) weighted per-token NELBO terms from the processed model output."""
        raise NotImplementedError

    def nll_masked(self, logits: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """(N,) the same terms at N masked positions from their (N, V) logits, x0 (N,) and the
        time of their row (N,); the lean loss (unmasked positions contribute exactly 0)."""
        raise NotImplementedError

    # ---- the loss -----------------------------------------------------------------
    def loss(
        self,
        backbone: nn.Module,
        x0: Tensor,
        attention_mask: Tensor,
        generator=None,
        loss_mask: Tensor | None = None,
        rows: Rows = None,
    ) -> LossOutput:
        """One-sample NELBO estimate per token (t and the mask drawn once per row).

        loss_mask (B, L): 1 where a token may be noised and is scored (SFT: the answer and its
        EOS padding); elsewhere tokens stay clean and only condition. None: every real token.
        """
        scored = self.scored_positions(x0, attention_mask, loss_mask)
        t = self.sample_t(x0.shape[0], x0.device, generator, rows)  # (B,)
        move = self.noise.move_chance(t)[:, None]
        x_t = self.q_xt(
            x0, move, generator, noisable=scored if loss_mask is not None else None, rows=rows
        )
        sigma = self.backbone_sigma(t, x_t)
        if self.lean_loss:  # only masked, scored positions reach the head and the softmax
            index = ((x_t == self.mask_id) & scored.bool()).flatten().nonzero().squeeze(1)  # (N,)
            logits = score_logits(backbone, x_t, sigma, attention_mask, index)  # (N, V)
            row = torch.div(index, x0.shape[1], rounding_mode="floor")
            nll_n = self.nll_masked(logits, x0.flatten()[index], t[row])
            nll = scatter_rows(nll_n, index, x0.shape)
        else:
            logits = backbone(x_t, sigma, attention_mask)
            nll = self.nll_per_token(self.model_output(logits, x_t, t), x0, x_t, t)
        return LossOutput(nll=nll, mask=scored.to(nll.dtype), targets=x0)
