"""BD3-LM: block diffusion, interpolating AR and MDLM (Arriola et al., ICLR 2025).

The sequence is cut into blocks of `block_size` tokens. Each block is a masked-diffusion
model conditioned on the clean blocks before it, so the NELBO is the sum over blocks of
MDLM's SUBS loss with one time t per block:

    L = sum_b E_{t_b} [ w(t_b) sum_{i in b, masked} -log p(x0_i | x_t^b, x0^{<b}) ].

`block_size = 1` is autoregressive (with t = 1 every token is masked and sees only the clean
tokens before it: next-token cross-entropy), `block_size = L` is MDLM. All blocks train in one
pass over x_t concatenated with x_0 (2L tokens, both halves at rotary positions 0 .. L - 1)
under the block-causal mask: x_t block b sees x_t block b and x_0 blocks < b; x_0 block b sees
x_0 blocks <= b. The x_0 half is the KV cache the block sampler builds at generation time,
which is why that cache is exact ("block_causal").

Training may clip the masking rates to [beta, omega] (`noise=clipped`), and `var_min=true`
picks [beta, omega] from data as BD3-LM does: during validation the per-block loss variance is
measured for a grid of intervals and the next training step uses the lowest-variance one.
Evaluation always integrates over the full schedule, so perplexities stay upper bounds (exact
at block_size = 1, where the model is AR and t = 1 is used).

`resample=true` is BD3-LM's `training.resample`: with a clipping interval in training, a block
whose masked fraction (masked tokens / block_size) falls outside [beta, omega] has its mask
redrawn until it lies inside (a bound at the full schedule's edge, beta = sampling_eps or
omega = 1, is not enforced, as BD3-LM): rejection sampling, so each accepted block's masks
follow the rate's distribution conditioned on that count range.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from diffusion.denoiser import MaskedModelDenoiser
from diffusion.noise import Clipped, NoiseSchedule
from diffusion.objectives.base import AbsorbingDiffusion, LossOutput, Rows
from diffusion.objectives.subs import subs_log_p_x0
from diffusion.precision import no_downcast

try:  # FlexAttention: the sparse mask on CUDA (optional, guarded)
    from torch.nn.attention.flex_attention import create_block_mask
except ImportError:  # pragma: no cover - depends on the torch build
    create_block_mask = None


def block_ids(length: int, block_size: int, device=None) -> Tensor:
    """(length,) block index of each position (a last partial block is its own block)."""
    return torch.arange(length, device=device) // block_size


def block_diff_rule(q_idx: Tensor, kv_idx: Tensor, length: int, block_size: int) -> Tensor:
    """Whether query q_idx may attend to key kv_idx in the 2L layout (BD3-LM's mask): indices
    [0, L) are x_t, [L, 2L) are x_0. x_t block b sees x_t block b (M_BD) and x_0 blocks < b
    (M_OBC); x_0 block b sees x_0 blocks <= b (M_BC). Elementwise on broadcast indices."""
    q_x0, k_x0 = q_idx >= length, kv_idx >= length
    q_blk = torch.where(q_x0, q_idx - length, q_idx) // block_size
    k_blk = torch.where(k_x0, kv_idx - length, kv_idx) // block_size
    diagonal = (q_blk == k_blk) & (q_x0 == k_x0)
    offset_causal = (q_blk > k_blk) & k_x0 & ~q_x0
    causal = (q_blk >= k_blk) & k_x0 & q_x0
    return diagonal | offset_causal | causal


def block_diff_mask(length: int, block_size: int, device=None) -> Tensor:
    """(2L, 2L) bool, True where the query row may attend to the key column (dense, for SDPA)."""
    idx = torch.arange(2 * length, device=device)
    return block_diff_rule(idx[:, None], idx[None, :], length, block_size)


def flex_block_diff_mask(length: int, block_size: int, device):
    """The same pattern as a FlexAttention BlockMask (built on `device`, CUDA)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return block_diff_rule(q_idx, kv_idx, length, block_size)

    return create_block_mask(mask_mod, None, None, 2 * length, 2 * length, device=device)


def clip_search_grid(widths, delta: float, eps: float) -> list[tuple[float, float]]:
    """BD3-LM's candidate clipping intervals: the full [eps, 1] and, for every width w,
    [lo, lo + w] for lo = 0, delta, ..., 1 - w (bounds at least eps)."""
    grid = [(eps, 1.0)]
    for width in widths:
        steps = int(round((1.0 - float(width)) / delta))
        for i in range(steps + 1):
            lo = i * delta
            pair = (round(max(lo, eps), 6), round(min(max(lo + float(width), eps), 1.0), 6))
            if pair not in grid:
                grid.append(pair)
    return grid


class BD3LM(AbsorbingDiffusion):
    """Block diffusion NELBO with SUBS inside each block; needs a DiT (attn_mask, positions)."""

    provides: ClassVar[frozenset[str]] = frozenset({"absorbing", "block_causal"})
    exact_likelihood: ClassVar[bool] = False  # a bound; block_size = 1 sets it True per instance

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_id: int,
        vocab_size: int,
        block_size: int = 16,
        time_conditioning: bool = False,
        mask_conditioning: bool = False,
        T: int = 0,
        sampling_eps: float = 1e-3,
        antithetic: bool = True,
        var_min: bool = False,
        clip_search_widths: tuple[float, ...] | list[float] = (0.5, 0.6, 0.7, 0.8, 0.9),
        clip_search_delta: float = 0.05,
        clip_search_batches: int = 10,
        attn_backend: str = "auto",
        length: int | None = None,
        resample: bool = False,
    ) -> None:
        """`length`: the model's sequence length (model.length); with block_size >= length the
        model is MDLM and whole-canvas samplers are exact (`provided`)."""
        if block_size < 1:
            raise ValueError(f"parameterization.block_size={block_size} must be >= 1")
        if time_conditioning or mask_conditioning:
            key = "time_conditioning" if time_conditioning else "mask_conditioning"
            raise ValueError(
                f"parameterization=bd3lm conditions each block on its own noise level, which one "
                f"sigma per row cannot express: set {key}=false (BD3-LM is time-agnostic)"
            )
        if T != 0:
            raise ValueError(f"parameterization=bd3lm is continuous-time: set T=0 (got T={T})")
        if attn_backend not in ("auto", "sdpa", "flex"):
            raise ValueError(
                f"parameterization.attn_backend={attn_backend!r}: expected auto, sdpa or flex"
            )
        eval_noise = noise.full if isinstance(noise, Clipped) else noise
        super().__init__(
            noise=eval_noise,
            mask_id=mask_id,
            vocab_size=vocab_size,
            time_conditioning=False,
            T=0,
            sampling_eps=sampling_eps,
            antithetic=antithetic,
            mask_conditioning=False,
        )
        self.block_size = int(block_size)
        self.length = None if length is None else int(length)
        # per instance, as exact_likelihood: the base `capabilities` reads it
        self.provides = self.provided({"block_size": self.block_size}, self.length)
        self.exact_likelihood = self.block_size == 1  # t = 1: every token masked, next-token NLL
        self.attn_backend = attn_backend
        self.resample = bool(resample)
        self.var_min = var_min
        self.clip_search_batches = clip_search_batches
        self.clip_grid = clip_search_grid(clip_search_widths, clip_search_delta, sampling_eps)
        clipped = isinstance(noise, Clipped)
        # the training interval of masking rates ([0, 0] = unclipped: use the schedule itself)
        init = [noise.beta, noise.omega] if clipped else [0.0, 0.0]
        self.register_buffer("clip", torch.tensor(init, dtype=torch.float64))
        self._search: dict[tuple[float, float], list[Tensor]] = {}
        self._trained = False  # the search serves training: only after a training step
        self._masks: dict[tuple, object] = {}

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """Moves apply to the clip interval, casts do not: Lightning's bf16-true casts the
        whole module, and a bf16 interval is [0.3008, 0.8008] for [0.3, 0.8] (checkpoint too)."""
        return super()._apply(no_downcast(fn, torch.float64), recurse)

    @classmethod
    def provided(cls, settings: Mapping[str, Any], length: int | None) -> frozenset[str]:
        """Block-causal always; whole-canvas too when one block spans the sequence (MDLM).
        With smaller blocks a whole-canvas pass makes block b read the still-masked blocks
        before it as its clean context: off the training distribution, silently wrong."""
        block = int(settings.get("block_size", 16))
        whole = length is not None and block >= int(length)
        return cls.provides | ({"whole_canvas"} if whole else frozenset())

    def log_p_x0(self, logits: Tensor, x_t: Tensor) -> Tensor:
        """SUBS inside the block: (B, n, V) logits -> log p(x0 | x_t) (mask never predicted)."""
        return subs_log_p_x0(logits, x_t, self.mask_id)

    def denoiser(self, backbone: nn.Module):
        """The block denoiser: the span KV cache of the finished blocks, and `block_size`."""
        return BlockDenoiser(backbone, self)

    # ---- masks -----------------------------------------------------------------------------
    def attention_pattern(self, length: int, device: torch.device, padded: bool):
        """The (2L, 2L) block-causal pattern: a FlexAttention BlockMask on CUDA when available
        (and nothing is padded), else the dense bool mask for SDPA; cached per length."""
        use_flex = (
            self.attn_backend != "sdpa"
            and create_block_mask is not None
            and device.type == "cuda"
            and not padded
        )
        if self.attn_backend == "flex" and not use_flex and device.type == "cuda" and not padded:
            raise ValueError("parameterization.attn_backend=flex: FlexAttention is unavailable")
        key = (length, str(device), use_flex)
        if key not in self._masks:
            build = flex_block_diff_mask if use_flex else block_diff_mask
            self._masks[key] = build(length, self.block_size, device)
        return self._masks[key]

    def backbone_logits(
        self, backbone: nn.Module, x_t: Tensor, x0: Tensor, attention_mask: Tensor
    ) -> Tensor:
        """(B, L, V) logits of the x_t half from one pass over x_t + x_0 (block-causal)."""
        params = inspect.signature(backbone.forward).parameters
        if "attn_mask" not in params or "positions" not in params:
            raise ValueError(
                f"parameterization=bd3lm needs a backbone that takes attn_mask and positions "
                f"(backbone=dit or hf_dit); {type(backbone).__name__} does not"
            )
        B, L = x0.shape
        padded = not bool(attention_mask.all())
        pattern = self.attention_pattern(L, x0.device, padded)
        pos = torch.arange(L, device=x0.device).repeat(2)  # (2L,) both halves at 0 .. L - 1
        x_in = torch.cat([x_t, x0], dim=1)  # (B, 2L)
        pad = torch.cat([attention_mask, attention_mask], dim=1)  # (B, 2L)
        logits = backbone(x_in, None, pad, attn_mask=pattern, positions=pos)  # (B, 2L, V)
        return logits[:, :L]

    # ---- time: one per block -----------------------------------------------------------------
    def sample_block_t(
        self, n: int, num_blocks: int, device: torch.device, generator=None, rows: Rows = None
    ) -> Tensor:
        """(n, num_blocks) times in [eps, 1], stratified over all blocks of the global batch
        (BD3-LM's antithetic sampling along blocks and rows)."""
        total = n if rows is None else rows[1]
        u = torch.rand(total * num_blocks, device=device, generator=generator, dtype=torch.float32)
        if self.antithetic:
            u = (u + torch.arange(total * num_blocks, device=device)) / (total * num_blocks)
        u = u.view(total, num_blocks)
        if rows is not None:
            u = u[rows[0].to(u.device)]
        return self.sampling_eps + (1 - self.sampling_eps) * u

    def rate_and_weight(self, t: Tensor, clip: tuple[float, float] | None) -> tuple[Tensor, Tensor]:
        """Masking rate and NELBO weight at t: the schedule's own, or clipped to [lo, hi]
        (rate lo + (hi - lo) t, BD3-LM's weight 1 / rate: see `noise.Clipped`)."""
        if clip is None:
            return self.noise.move_chance(t), self.noise.loss_weight(t)
        lo, hi = clip
        rate = lo + (hi - lo) * t
        return rate, 1.0 / rate.clamp_min(1e-12)

    def training_clip(self) -> tuple[float, float] | None:
        """The interval training draws masking rates from (None: the full schedule)."""
        if self.var_min and self._search:
            self._apply_search()
        lo, hi = (float(v) for v in self.clip)
        return None if hi <= lo else (lo, hi)

    # ---- the loss ---------------------------------------------------------------------------
    def block_nelbo(
        self,
        backbone: nn.Module,
        x0: Tensor,
        attention_mask: Tensor,
        generator=None,
        loss_mask: Tensor | None = None,
        rows: Rows = None,
        clip: tuple[float, float] | None = None,
        all_masked: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """(B, L) per-token NELBO terms and the (B, L) scored mask. `clip`: masking rates in
        [lo, hi]; `all_masked`: t = 1 with weight 1 (the exact NLL at block_size = 1)."""
        B, L = x0.shape
        scored = self.scored_positions(x0, attention_mask, loss_mask)
        num_blocks = -(-L // self.block_size)
        blk = block_ids(L, self.block_size, x0.device)  # (L,)
        if all_masked:
            rate = torch.ones(B, num_blocks, device=x0.device, dtype=torch.float32)
            weight = torch.ones_like(rate)
        else:
            t = self.sample_block_t(B, num_blocks, x0.device, generator, rows)  # (B, nb)
            rate, weight = self.rate_and_weight(t, clip)
        noisable = scored if loss_mask is not None else None
        x_t = self.q_xt(x0, rate[:, blk], generator, noisable=noisable, rows=rows)  # (B, L)
        if self.resample and clip is not None and self.training:
            x_t = self.resample_blocks(x_t, x0, rate[:, blk], clip, generator, noisable, rows)
        logits = self.backbone_logits(backbone, x_t, x0, attention_mask)  # (B, L, V)
        log_p = subs_log_p_x0(logits, x_t, self.mask_id)
        log_p_true = log_p.gather(-1, x0[..., None]).squeeze(-1)  # (B, L); 0 where unmasked
        return -log_p_true * weight[:, blk].to(log_p_true.dtype), scored

    def resample_blocks(
        self,
        x_t: Tensor,
        x0: Tensor,
        rate: Tensor,
        clip: tuple[float, float],
        generator=None,
        noisable: Tensor | None = None,
        rows: Rows = None,
        max_rounds: int = 10_000,
    ) -> Tensor:
        """Redraw the masks of every block whose masked fraction lies outside `clip` until it
        lies inside (BD3-LM's training.resample; its edge rule: a bound at the full interval's
        edge is not checked). `rate` (B, L): each token's masking rate."""
        lo, hi = clip
        check_lo, check_hi = abs(lo - self.sampling_eps) > 1e-9, hi < 1.0
        if not (check_lo or check_hi):
            return x_t
        size = self.block_size
        counts = range(size + 1)
        if not any(
            (not check_lo or k / size >= lo) and (not check_hi or k / size <= hi) for k in counts
        ):
            raise ValueError(
                f"parameterization.resample=true: no masked fraction k / {size} of a block lies "
                f"in the clipping interval [{lo}, {hi}] (noise.beta / noise.omega): widen it"
            )
        B, L = x0.shape
        blk = block_ids(L, size, x0.device)
        for _ in range(max_rounds):
            masked = (x_t == self.mask_id) & (x0 != self.mask_id)
            frac = (
                torch.zeros(B, int(blk[-1]) + 1, device=x0.device, dtype=torch.float32).index_add_(
                    1, blk, masked.float()
                )
                / size
            )  # (B, nb)
            bad = torch.zeros_like(frac, dtype=torch.bool)
            if check_lo:
                bad |= frac < lo - 1e-9
            if check_hi:
                bad |= frac > hi + 1e-9
            if not bool(bad.any()):
                return x_t
            redraw = self.q_xt(x0, rate, generator, noisable=noisable, rows=rows)
            x_t = torch.where(bad[:, blk], redraw, x_t)
        raise RuntimeError(f"parameterization.resample: blocks still outside [{lo}, {hi}]")

    def loss(
        self,
        backbone: nn.Module,
        x0: Tensor,
        attention_mask: Tensor,
        generator=None,
        loss_mask: Tensor | None = None,
        rows: Rows = None,
    ) -> LossOutput:
        """Training: clipped (or full) rates; evaluation: the full schedule (block_size = 1:
        t = 1, the exact next-token NLL), plus the clip search statistics when `var_min`."""
        if self.training:
            self._trained = True
            clip = self.training_clip()
            nll, scored = self.block_nelbo(
                backbone, x0, attention_mask, generator, loss_mask, rows, clip=clip
            )
            return LossOutput(nll=nll, mask=scored.to(nll.dtype), targets=x0)
        nll, scored = self.block_nelbo(
            backbone,
            x0,
            attention_mask,
            generator,
            loss_mask,
            rows,
            all_masked=self.block_size == 1,
        )
        if self.var_min and self.block_size > 1 and self._trained:  # not in a bare ppl_eval
            self._collect_search(backbone, x0, attention_mask, generator, loss_mask)
        return LossOutput(nll=nll, mask=scored.to(nll.dtype), targets=x0)

    # ---- BD3-LM's data-driven clipping (var_min) ------------------------------------------------
    @torch.no_grad()
    def _collect_search(self, backbone, x0, attention_mask, generator, loss_mask) -> None:
        """Per-block mean losses of this validation batch under every candidate interval
        (only the first `clip_search_batches` batches of a validation pass).

        The search draws from a copy of the validation generator's state (or, without one,
        inside a fork of the global RNG), which it leaves where it was: the validation
        losses of later batches are the same with var_min on or off."""
        first = next(iter(self._search.values()), [])
        if len(first) >= self.clip_search_batches:
            return
        if generator is None:
            devices = [x0.device] if x0.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                self._search_batch(backbone, x0, attention_mask, None, loss_mask)
            return
        search = torch.Generator(device=generator.device)
        search.set_state(generator.get_state())  # the same draws as before, not advancing it
        self._search_batch(backbone, x0, attention_mask, search, loss_mask)

    def _search_batch(self, backbone, x0, attention_mask, generator, loss_mask) -> None:
        """Append this batch's (B, nb) per-block mean losses under every candidate interval."""
        L = x0.shape[1]
        for lo, hi in self.clip_grid:
            nll, scored = self.block_nelbo(
                backbone, x0, attention_mask, generator, loss_mask, clip=(lo, hi)
            )
            pad = (-L) % self.block_size
            per_block = torch.nn.functional.pad(nll * scored, (0, pad))
            per_block = per_block.view(x0.shape[0], -1, self.block_size).mean(-1)  # (B, nb)
            self._search.setdefault((lo, hi), []).append(per_block.double().cpu())

    def clip_variances(self) -> dict[tuple[float, float], float]:
        """Summed per-batch variance of the per-block losses, for each searched interval."""
        return {k: float(sum(v.var() for v in vs)) for k, vs in self._search.items() if vs}

    def _apply_search(self) -> None:
        """Train on the lowest-variance interval measured in the last validation (BD3-LM)."""
        variances = self.clip_variances()
        self._search = {}
        if not variances:
            return
        lo, hi = min(variances, key=variances.get)
        self.clip.copy_(torch.tensor([lo, hi], dtype=torch.float64))


class BlockDenoiser(MaskedModelDenoiser):
    """The denoiser of a block-causal model (`samplers.base.BlockCausalDenoiser`).

    `log_p_x0_span` (inherited) runs a block against the cached finished blocks; `log_p_x0` of a
    whole canvas is the training pass with x_0 := x_t, so block b sees canvas blocks < b as its
    clean context: exact when those are clean (block-by-block generation), and the full
    recomputation the cache is checked against.
    """

    def __init__(self, backbone: nn.Module, objective: BD3LM) -> None:
        super().__init__(backbone, objective)
        self.block_size = objective.block_size

    @torch.no_grad()
    def log_p_x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        ones = torch.ones_like(x_t)
        logits = self.objective.backbone_logits(self.backbone, x_t, x_t, ones)  # (B, L, V)
        return subs_log_p_x0(logits, x_t, self.mask_id)
