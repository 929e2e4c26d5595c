"""The sampler seam: the `Denoiser` protocol, `SampleOutput`, and the plumbing every sampler shares.

Owns the contract between a trained model and the samplers (MDLM's SUBS convention,
arXiv:2406.07524), float64 categorical draws, temperature / top-k / top-p
filtering, SMDM's unsupervised classifier-free guidance (arXiv:2410.18514), and
the canvas set-up for prompts and infilling. Samplers import nothing from `diffusion/`
or `models/`: they see the model only through `Denoiser`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Denoiser(Protocol):
    """What a sampler may ask of a model (implemented by `diffusion.denoiser.ModelDenoiser`)."""

    mask_id: int
    vocab_size: int  # including the mask token
    time_conditioned: bool  # False: log_p_x0 ignores t, which makes ddpm_cache exact

    def alpha(self, t: Tensor) -> Tensor:
        """(B,) -> (B,): probability a token is still clean at t; alpha(0) = 1, decreasing."""
        ...

    def log_p_x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        """x_t (B, L) long, t (B,) -> (B, L, V) log p(x0 | x_t, t), SUBS: mask column -inf,
        rows of unmasked positions one-hot on x_t."""
        ...


@dataclass
class SampleOutput:
    """tokens (B, L) long without masks; nfe: network evaluations made; trajectory: every x_t."""

    tokens: Tensor
    nfe: int
    trajectory: list[Tensor] | None = None


# ----------------------------------------------------------------------------- draws


def uniform(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """float64 uniforms in [0, 1) from `generator` (on its own device), moved to `device`."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device=gen_device)
    return u.to(device)


def sample_categorical(log_p: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw in float64: log_p (N, V) (unnormalised is fine), u (N,) -> (N,) long.

    Zero-probability entries can never be drawn (they add nothing to the CDF).
    """
    probs = torch.softmax(log_p.to(torch.float64), dim=-1)  # (N, V)
    cdf = probs.cumsum(dim=-1)  # (N, V)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True)  # (N, 1)
    return idx.squeeze(-1).clamp_(max=log_p.shape[-1] - 1)


def filter_log_probs(
    log_p: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering of (..., V) log-probs; renormalised.

    temperature == 0 means greedy (one-hot on the argmax). Rows stay valid distributions.
    """
    if temperature == 0:
        return torch.full_like(log_p, -torch.inf).scatter_(-1, log_p.argmax(-1, keepdim=True), 0.0)
    if temperature != 1.0:
        log_p = log_p / temperature
    if top_k is not None and 0 < top_k < log_p.shape[-1]:
        kth = log_p.topk(top_k, dim=-1).values[..., -1:]  # (..., 1)
        log_p = log_p.masked_fill(log_p < kth, -torch.inf)
    if top_p is not None and top_p < 1.0:
        sorted_lp, order = log_p.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_lp.to(torch.float64), dim=-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix with mass >= p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        log_p = log_p.masked_fill(drop, -torch.inf)
    return torch.log_softmax(log_p, dim=-1)


def guided_log_probs(
    cond: Tensor, uncond: Tensor, cfg_scale: float, normalize: bool = True
) -> Tensor:
    """Classifier-free guidance in log space, SMDM: uncond + (1 + w) (cond - uncond).

    Entries that are -inf in either pass (the SUBS mask column, one-hot rows) keep `cond`,
    so no -inf - -inf NaN appears. Renormalised over the vocabulary unless `normalize` is
    False (a SEDD log-score is a ratio, not a distribution).
    """
    finite = torch.isfinite(cond) & torch.isfinite(uncond)
    guided = torch.where(finite, uncond + (1.0 + cfg_scale) * (cond - uncond), cond)
    return torch.log_softmax(guided, dim=-1) if normalize else guided


class GuidedDenoiser:
    """A denoiser seen through one `sample()` call: counts calls (nfe) and applies CFG.

    With `cfg_scale > 0` the unconditional pass is the same x_t with the conditioning
    positions (`cond_mask`, prompt and fixed tokens) masked: SMDM's unsupervised CFG.
    Each pass counts as one network evaluation.
    """

    def __init__(self, denoiser: Denoiser, cond_mask: Tensor, cfg_scale: float = 0.0) -> None:
        self.denoiser = denoiser
        self.mask_id = denoiser.mask_id
        self.time_conditioned = denoiser.time_conditioned
        self.cond_mask = cond_mask  # (B, L) bool; semi_ar swaps it per window
        self.cfg_scale = cfg_scale
        self.nfe = 0

    def alpha(self, t: Tensor) -> Tensor:
        return self.denoiser.alpha(t).to(torch.float64)

    def _call(self, x_t: Tensor, t: Tensor, method: str) -> Tensor:
        self.nfe += 1
        return getattr(self.denoiser, method)(x_t, t)

    def log_p_x0(self, x_t: Tensor, t: Tensor, method: str = "log_p_x0") -> Tensor:
        """(B, L), (B,) -> (B, L, V); `method="log_score"` guides a SEDD score the same way."""
        cond = self._call(x_t, t, method)
        if self.cfg_scale == 0 or not bool(self.cond_mask.any()):
            return cond
        uncond = self._call(x_t.masked_fill(self.cond_mask, self.mask_id), t, method)
        return guided_log_probs(cond, uncond, self.cfg_scale, normalize=method == "log_p_x0")


# ----------------------------------------------------------------------------- base


class Sampler:
    """Loop plumbing shared by every sampler: validation, the canvas, guidance, trajectories.

    Subclasses set `name` (the yaml file name) and implement `_generate`, which turns a
    canvas x (B, L) with masks into tokens. Conditioning positions start unmasked and every
    sampler writes masked positions only, so prompts and fixed tokens cannot change.
    """

    name: ClassVar[str] = "base"
    requires_time_agnostic: ClassVar[bool] = False  # refuse time-conditioned denoisers

    def __init__(
        self,
        num_samples: int = 8,
        batch_size: int = 8,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float = 0.0,
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.cfg_scale = cfg_scale

    def validate(self, denoiser: Denoiser) -> None:
        """Raise ValueError when this sampler cannot be exact with `denoiser`."""
        if not isinstance(denoiser, Denoiser):
            raise TypeError(
                f"sampler={self.name} needs a Denoiser (mask_id, vocab_size, "
                f"time_conditioned, alpha, log_p_x0); got {type(denoiser).__name__}"
            )
        if self.requires_time_agnostic and denoiser.time_conditioned:
            raise ValueError(
                f"sampler={self.name} reuses the denoiser output while x_t is unchanged, which is "
                "exact only for a time-agnostic denoiser, but this one is time-conditioned "
                "(time_conditioning=true). Use sampler=ddpm, or a model trained with "
                "time_conditioning=false."
            )

    def filter(self, log_p: Tensor) -> Tensor:
        """This sampler's temperature / top-k / top-p applied to (..., V) log-probs."""
        return filter_log_probs(log_p, self.temperature, self.top_k, self.top_p)

    def sample(
        self,
        denoiser: Denoiser,
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
        """Draw `num_samples` sequences of `length` tokens in one batch.

        prefix (P,) or (B, P): a prompt at positions [0, P). fixed_mask / fixed_values
        ((L,) or (B, L)): infilling, tokens held fixed anywhere. Both never change.
        device defaults to the generator's device (else CPU). on_step: called with the
        starting canvas and then every new x_t (B, L) as it is drawn (a live view).
        """
        self.validate(denoiser)
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        length = self._canvas_length(length)
        x, cond_mask = self._canvas(
            denoiser.mask_id,
            num_samples,
            length,
            prefix,
            fixed_mask,
            fixed_values,
            torch.device(device),
        )
        model = GuidedDenoiser(denoiser, cond_mask, self.cfg_scale)
        trajectory: list[Tensor] | None = [] if return_trajectory else None

        def record(x_t: Tensor) -> None:
            if trajectory is not None:
                trajectory.append(x_t)
            if on_step is not None:
                on_step(x_t)

        watched = trajectory is not None or on_step is not None
        if watched:
            record(x.clone())
        tokens = self._generate(model, x, generator, record if watched else None)
        return SampleOutput(tokens=tokens, nfe=model.nfe, trajectory=trajectory)

    def _canvas_length(self, length: int) -> int:
        """Length of the sequences produced from a model window of `length` (semi_ar: longer)."""
        return length

    def _canvas(
        self,
        mask_id: int,
        num_samples: int,
        length: int,
        prefix: Tensor | None,
        fixed_mask: Tensor | None,
        fixed_values: Tensor | None,
        device: torch.device,
    ) -> tuple[Tensor, Tensor]:
        """All-mask x (B, L) with the prompt and fixed tokens written in; their mask (B, L)."""
        x = torch.full((num_samples, length), mask_id, dtype=torch.long, device=device)
        cond_mask = torch.zeros_like(x, dtype=torch.bool)
        if prefix is not None:
            prefix = prefix.to(device).long().expand(num_samples, -1)  # (B, P)
            x[:, : prefix.shape[1]] = prefix
            cond_mask[:, : prefix.shape[1]] = True
        if fixed_mask is not None:
            if fixed_values is None:
                raise ValueError("fixed_mask needs fixed_values (the tokens to hold fixed)")
            fixed_mask = fixed_mask.to(device).bool().expand(num_samples, -1)
            fixed_values = fixed_values.to(device).long().expand(num_samples, -1)
            x = torch.where(fixed_mask, fixed_values, x)
            cond_mask |= fixed_mask
        if bool((x[cond_mask] == mask_id).any()):
            raise ValueError("prefix / fixed_values contain mask_id; conditioning must be tokens")
        return x, cond_mask

    def _generate(
        self,
        model: GuidedDenoiser,
        x: Tensor,
        generator: torch.Generator | None,
        record: Callable[[Tensor], None] | None,
    ) -> Tensor:
        """x (B, L) with masks -> (B, L) tokens; call `record(x)` after every change of x."""
        raise NotImplementedError
