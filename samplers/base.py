"""The sampler seam: the denoiser protocols, capabilities, `SampleOutput`, and shared plumbing.

Owns the contract between a trained model and the samplers (MDLM's SUBS convention,
arXiv:2406.07524), float64 categorical draws, temperature / top-k / top-p
filtering, SMDM's unsupervised classifier-free guidance (arXiv:2410.18514), and
the canvas set-up for prompts and infilling. Samplers import nothing from `diffusion/`
or `models/`: they see the model only through the protocols below, built by the objective
(`objective.denoiser(backbone)`, implemented in `diffusion/denoiser.py`).

Capabilities are plain words. A model declares what it `capabilities` provides; a sampler
declares what it `requires`; `check_capabilities` is the one rule comparing them, called by
`Sampler.validate` at run time and by `diffusion.config.validate_config` before anything is
built. A new sampler declares its `requires` and needs no edit anywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

# what each capability means, worded as what gives it (for error messages)
CAPABILITIES: dict[str, str] = {
    "absorbing": "a masked-diffusion model, log p(x0 | x_t) with a mask state "
    "(parameterization=subs, d3pm or sedd)",
    "uniform": "a uniform-state diffusion model (uniform noise, no mask token)",
    "next_token": "parameterization=ar (an autoregressive next-token model on a causal backbone)",
    "log_score": "a model with a concrete score log s(x_t) (the analytic sampler)",
    "block_causal": "a block-causal model whose prefix KV cache is exact",
    "whole_canvas": "a model that denoises the whole sequence at once (parameterization=subs, "
    "d3pm or sedd; bd3lm only with parameterization.block_size >= model.length: with smaller "
    "blocks each block reads the blocks before it as clean, so use sampler=block)",
    "time_agnostic": "a time-agnostic denoiser (time_conditioning=false; a time-conditioned "
    "one changes its output with t even where x_t does not change)",
}


class CapabilityError(ValueError):
    """A sampler needs something the model does not provide."""


def model_capabilities(provides: Iterable[str], time_conditioned: bool) -> frozenset[str]:
    """What a model offers: its objective's `provides`, plus "time_agnostic" when t is unused."""
    return frozenset(provides) | (frozenset() if time_conditioned else {"time_agnostic"})


def check_capabilities(
    sampler: str,
    requires: Set[str],
    provides: Set[str],
    model: str = "this model",
    instead: Iterable[str] = (),
) -> None:
    """The one capability rule: raise CapabilityError naming what `sampler` misses.

    `model` names the model in the message (e.g. "parameterization=sedd"); `instead` lists
    the sampler options whose requirements the model meets.
    """
    missing = sorted(set(requires) - set(provides))
    if not missing:
        return
    needs = "; and ".join(CAPABILITIES.get(m, m) for m in missing)
    options = [f"sampler={name}" for name in instead]
    use = (
        (
            f"use {', '.join(options[:-1])} or {options[-1]}"
            if len(options) > 1
            else f"use {options[0]}"
        )
        if options
        else "use another sampler"
    )
    raise CapabilityError(
        f"sampler={sampler} needs {needs}: {model} cannot be sampled with sampler={sampler}; "
        f"{use}, not sampler={sampler}"
    )


@runtime_checkable
class MaskedDenoiser(Protocol):
    """A masked (absorbing) diffusion model as the samplers see it."""

    mask_id: int
    vocab_size: int  # including the mask token
    time_conditioned: bool  # False: log_p_x0 ignores t, which makes ddpm_cache exact
    capabilities: frozenset[str]  # e.g. {"absorbing", "log_score", "time_agnostic"}

    def alpha(self, t: Tensor) -> Tensor:
        """(B,) -> (B,): probability a token is still clean at t; alpha(0) = 1, decreasing."""
        ...

    def log_p_x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        """x_t (B, L) long, t (B,) -> (B, L, V) log p(x0 | x_t, t), SUBS: mask column -inf,
        rows of unmasked positions one-hot on x_t."""
        ...


@runtime_checkable
class ScoreDenoiser(MaskedDenoiser, Protocol):
    """A masked denoiser with a concrete score (capability "log_score")."""

    def log_score(self, x_t: Tensor, t: Tensor) -> Tensor:
        """(B, L), (B,) -> (B, L, V) log s(x_t)_v ~ log p_t(x_t with v at i) / p_t(x_t)."""
        ...


@runtime_checkable
class NextTokenModel(Protocol):
    """An autoregressive model (capability "next_token") as the AR sampler sees it."""

    mask_id: int
    vocab_size: int
    capabilities: frozenset[str]

    def init_cache(self, batch_size: int) -> Any:
        """An empty KV cache for `batch_size` sequences."""
        ...

    def log_p_next(self, x: Tensor, cache: Any = None) -> Tensor:
        """(B, n) tokens -> (B, n, V) log p(next token | tokens so far); with a cache, x
        continues the tokens already fed through it and the cache grows."""
        ...


Denoiser = MaskedDenoiser  # the name the samplers and older code use


@runtime_checkable
class SpanCacheDenoiser(Protocol):
    """A denoiser with a span KV cache (Fast-dLLM's prefix / dual caches, the block sampler).

    `log_p_x0_span` is log p(x0 | x_t) (SUBS view) at positions [start, end) only, with the
    backbone run on that span while attending to the keys/values cached outside it
    (`models.dit.DiT.forward_span`): `context="prefix"` sees the cached [0, start), `"all"`
    every cached position outside the span; `write` stores the span's keys/values. Exact
    only where the backbone's own attention sees the same keys (causal or block-causal).
    """

    supports_span_cache: bool

    def init_cache(self, batch_size: int) -> object:
        """An empty cache for `batch_size` rows."""
        ...

    def log_p_x0_span(
        self,
        x_t: Tensor,
        t: Tensor,
        start: int,
        end: int,
        cache: object,
        *,
        context: str = "prefix",
        write: bool = True,
    ) -> Tensor:
        """x_t (B, L) the whole canvas (the span is x_t[:, start:end]), t (B,) -> (B, n, V)."""
        ...


@runtime_checkable
class BlockCausalDenoiser(SpanCacheDenoiser, Protocol):
    """A block-causal denoiser (capability "block_causal", parameterization=bd3lm): its span
    cache is exact block by block for the block size it was trained with."""

    block_size: int  # tokens per block


@dataclass
class SampleOutput:
    """tokens (B, L) long without masks; nfe: network calls made; rows_evaluated: sequences
    pushed through the network in those calls (per-row caching evaluates sub-batches), so
    rows_evaluated / B is the work per sample; trajectory: every x_t."""

    tokens: Tensor
    nfe: int
    trajectory: list[Tensor] | None = None
    rows_evaluated: int = 0


# ----------------------------------------------------------------------------- draws


def uniform(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """float64 uniforms in [0, 1) from `generator` (on its own device), moved to `device`."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device=gen_device)
    return u.to(device)


# exp(-750) == 0.0 in float64: an entry this far below its row's top is never drawn
ZERO_PROBABILITY_GAP = -750.0


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
    A temperature above 1 never revives an entry of probability 0: one more than
    ZERO_PROBABILITY_GAP below its row's top (SUBS' finite -1e6 mask column, the off-token
    entries of a one-hot row) becomes -inf; dividing alone would make -1e6 / T drawable
    once T > ~1300 (and the sampler could "unmask" to [MASK]).
    """
    if temperature == 0:
        return torch.full_like(log_p, -torch.inf).scatter_(-1, log_p.argmax(-1, keepdim=True), 0.0)
    if temperature > 1.0:
        dead = log_p - log_p.amax(-1, keepdim=True) < ZERO_PROBABILITY_GAP
        log_p = (log_p / temperature).masked_fill(dead, -torch.inf)
    elif temperature != 1.0:  # below 1 the gaps only widen: zeros stay zero
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


def guided_log_score(
    cond: Tensor, uncond: Tensor, cfg_scale: float, x_t: Tensor, mask_id: int
) -> Tensor:
    """CFG of a concrete score (B, L, V) that keeps the conditional score's total mass.

    The ratio is guided as `guided_log_probs` does, then each masked row is shifted so that
    sum_{v != mask} s_v equals the conditional one: that sum sets the unmasking rate
    (analytic step: P(stay masked) = 1 - expm1(dsigma) sum_v s_v), and guidance should
    change which token appears, not how fast. For a score derived from p(x0 | x_t)
    (s_v = alpha / (1 - alpha) p(x0 = v), MDLM / D3PM) this is exactly "guide p(x0), then
    form the score", so the rate stays ddpm's.
    """
    guided = guided_log_probs(cond, uncond, cfg_scale, normalize=False)
    real = torch.ones(cond.shape[-1], dtype=torch.bool, device=cond.device)
    real[mask_id] = False
    mass_c = torch.logsumexp(cond[..., real], dim=-1, keepdim=True)  # (B, L, 1)
    mass_g = torch.logsumexp(guided[..., real], dim=-1, keepdim=True)
    shifted = torch.where(real, guided + (mass_c - mass_g), guided)
    return torch.where((x_t == mask_id)[..., None], shifted, guided)


class GuidedDenoiser:
    """A denoiser seen through one `sample()` call: counts calls (nfe) and applies CFG.

    With `cfg_scale > 0` the unconditional pass is the same x_t with the conditioning
    positions (`cond_mask`, prompt and fixed tokens) masked: SMDM's unsupervised CFG.
    Each pass counts as one network evaluation.
    """

    def __init__(
        self, denoiser: MaskedDenoiser | NextTokenModel, cond_mask: Tensor, cfg_scale: float = 0.0
    ) -> None:
        self.denoiser = denoiser
        self.mask_id = denoiser.mask_id
        self.vocab_size = denoiser.vocab_size
        self.capabilities = denoiser.capabilities
        self.time_conditioned = "time_agnostic" not in denoiser.capabilities
        self.cond_mask = cond_mask  # (B, L) bool; semi_ar swaps it per window
        self.cfg_scale = cfg_scale
        self.nfe = 0
        self.rows_evaluated = 0

    def alpha(self, t: Tensor) -> Tensor:
        """alpha_t in float64 from float64 times: every step needs differences of alphas near 1
        as t -> 0 (1 - alpha_t, alpha_s - alpha_t), which float32 alphas round (cosine at
        t = 1e-3: 1 - alpha = 1.2e-6, 2-5% off)."""
        return self.denoiser.alpha(t.to(torch.float64)).to(torch.float64)

    def _call(self, x_t: Tensor, t: Tensor, method: str) -> Tensor:
        self.nfe += 1
        self.rows_evaluated += x_t.shape[0]
        fn = self.denoiser.log_score if method == "log_score" else self.denoiser.log_p_x0
        return fn(x_t, t)

    def _guided(self, rows: Tensor | None) -> Tensor | None:
        """The conditioning mask of these rows when CFG applies to them, else None."""
        cond_mask = self.cond_mask if rows is None else self.cond_mask[rows]
        if self.cfg_scale == 0 or not bool(cond_mask.any()):
            return None
        return cond_mask

    def log_p_x0(
        self, x_t: Tensor, t: Tensor, method: str = "log_p_x0", rows: Tensor | None = None
    ) -> Tensor:
        """(B', L), (B',) -> (B', L, V); `method="log_score"` guides a SEDD score the same way.

        `rows` (B',) long: x_t is that sub-batch of the canvas (per-row caching), so the CFG
        pass masks those rows' conditioning positions."""
        cond = self._call(x_t, t, method)
        cond_mask = self._guided(rows)
        if cond_mask is None:
            return cond
        uncond = self._call(x_t.masked_fill(cond_mask, self.mask_id), t, method)
        if method == "log_score":
            return guided_log_score(cond, uncond, self.cfg_scale, x_t, self.mask_id)
        return guided_log_probs(cond, uncond, self.cfg_scale)

    def log_score(self, x_t: Tensor, t: Tensor, rows: Tensor | None = None) -> Tensor:
        """(B', L), (B',) -> (B', L, V) the model's log score, guided like `log_p_x0`
        (unnormalised: a score is a ratio, not a distribution)."""
        return self.log_p_x0(x_t, t, method="log_score", rows=rows)

    # ---- next-token models (the AR sampler) ------------------------------------------------
    def log_p_next(self, x: Tensor, cache: tuple[object, object | None] | None = None) -> Tensor:
        """(B, n) -> (B, n, V) next-token log-probs; one network call. `cache` is what
        `init_cache` returned (AR is never guided, so only its first entry is used)."""
        self.nfe += 1
        self.rows_evaluated += x.shape[0]
        return self.denoiser.log_p_next(x, None if cache is None else cache[0])

    # ---- the span KV cache (confidence sampler's cache=prefix|dual) ------------------------
    @property
    def block_size(self) -> int:
        """The block size of a block-causal denoiser (`BlockCausalDenoiser`)."""
        if "block_causal" not in self.capabilities or not isinstance(
            self.denoiser, BlockCausalDenoiser
        ):
            raise ValueError(
                f"{type(self.denoiser).__name__} is not block-causal: it has no block_size "
                "(train with parameterization=bd3lm)"
            )
        return int(self.denoiser.block_size)

    @property
    def supports_span_cache(self) -> bool:
        return isinstance(self.denoiser, SpanCacheDenoiser) and bool(
            self.denoiser.supports_span_cache
        )

    def init_cache(self, batch_size: int) -> tuple[object, object | None]:
        """One cache for the conditional pass, and one for CFG's unconditional pass (whose
        keys differ: its prompt is masked) when guidance applies. A next-token model gets
        its own KV cache (and no second one: AR is never guided)."""
        if "next_token" in self.capabilities:
            return self.denoiser.init_cache(batch_size), None
        if not self.supports_span_cache:
            raise ValueError(
                f"{type(self.denoiser).__name__} has no span KV cache (supports_span_cache is "
                "false for this backbone); use sampler.cache=none"
            )
        second = self.denoiser.init_cache(batch_size) if self._guided(None) is not None else None
        return self.denoiser.init_cache(batch_size), second

    def log_p_x0_span(
        self,
        x_t: Tensor,
        t: Tensor,
        start: int,
        end: int,
        cache: tuple[object, object | None],
        *,
        context: str = "prefix",
        write: bool = True,
    ) -> Tensor:
        """(B, L), (B,) -> (B, end - start, V), guided like `log_p_x0`; counts as a call."""
        kw = dict(context=context, write=write)
        self.nfe += 1
        self.rows_evaluated += x_t.shape[0]
        cond = self.denoiser.log_p_x0_span(x_t, t, start, end, cache[0], **kw)
        cond_mask = self._guided(None)
        if cond_mask is None or cache[1] is None:
            return cond
        self.nfe += 1
        self.rows_evaluated += x_t.shape[0]
        x_u = x_t.masked_fill(cond_mask, self.mask_id)
        uncond = self.denoiser.log_p_x0_span(x_u, t, start, end, cache[1], **kw)
        return guided_log_probs(cond, uncond, self.cfg_scale)


# ----------------------------------------------------------------------------- base


class Sampler:
    """Loop plumbing shared by every sampler: validation, the canvas, guidance, trajectories.

    Subclasses set `name` (the yaml file name) and implement `_generate`, which turns a
    canvas x (B, L) with masks into tokens. Conditioning positions start unmasked and every
    sampler writes masked positions only, so prompts and fixed tokens cannot change.
    """

    name: ClassVar[str] = "base"
    requires: ClassVar[frozenset[str]] = frozenset({"absorbing", "whole_canvas"})  # CAPABILITIES

    def __init__(
        self,
        num_samples: int = 8,
        batch_size: int = 8,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float = 0.0,
        bos_id: int | None = None,
        eos_id: int | None = None,
    ) -> None:
        """`bos_id` / `eos_id`: the tokenizer's special tokens, given at build time
        (`diffusion.build.build_sampler`); a sampler uses them where it says so."""
        if num_samples < 1 or batch_size < 1:
            raise ValueError(
                f"sampler={self.name}: num_samples ({num_samples}) and batch_size ({batch_size}) "
                "must be >= 1"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.cfg_scale = cfg_scale
        self.bos_id = bos_id
        self.eos_id = eos_id

    @classmethod
    def requirements(cls, settings: Mapping[str, Any]) -> frozenset[str]:
        """The capabilities this sampler needs with these settings (its yaml node before it
        is built, or its own attributes at run time); by default the class's `requires`."""
        return cls.requires

    def validate(self, denoiser: MaskedDenoiser | NextTokenModel) -> None:
        """Raise CapabilityError (a ValueError) when this sampler cannot be exact with `denoiser`."""
        if not isinstance(denoiser, (MaskedDenoiser, NextTokenModel)):
            raise TypeError(
                f"sampler={self.name} needs a MaskedDenoiser or NextTokenModel "
                f"(samplers/base.py); got {type(denoiser).__name__}"
            )
        check_capabilities(self.name, self.requirements(vars(self)), denoiser.capabilities)

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
        length = self.canvas_length(length)
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
        return SampleOutput(
            tokens=tokens,
            nfe=model.nfe,
            trajectory=trajectory,
            rows_evaluated=model.rows_evaluated,
        )

    def canvas_length(self, length: int) -> int:
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
