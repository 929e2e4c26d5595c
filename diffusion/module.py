"""The LightningModule: backbone + objective + EMA, trained and validated (MDLM's recipe).

It wires parts together and holds no sampler logic and no `if parameterization ==`.
Validation and `ppl_eval` use the EMA weights and report the NELBO per token,
accumulated in float64, and `ppl = exp(nelbo)` (an upper bound for diffusion
objectives, exact for AR), with `ppl_excl_bos` beside it (BOS tokens and each row's first
position left out: the tokens an AR model scores). The EMA is updated after each optimizer
step. Checkpoints carry the EMA, the config and the RNG state so a killed run resumes where
it stopped.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import SumMetric

from diffusion.denoiser import ModelDenoiser
from diffusion.ema import make_ema
from diffusion.objectives.base import LossOutput, Objective
from diffusion.precision import no_downcast


class Float64Sum(SumMetric):
    """A float64 sum that stays float64 when the module around it is cast (Lightning's
    `bf16-true` converts the whole LightningModule; a bf16 counter stops at 2^18 tokens).
    Moves between devices as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.set_dtype(torch.float64)

    def _apply(self, fn, exclude_state=""):  # type: ignore[override]
        this = super()._apply(no_downcast(fn, torch.float64), exclude_state)
        this._dtype = torch.float64
        return this


class NLLMeter(nn.Module):
    """Sums of NELBO and token counts in float64 (synced across processes), twice: over every
    scored token (`ppl`, MDLM's convention) and without each row's first position and BOS
    tokens (`ppl_excl_bos`: the tokens an AR model scores, so AR and diffusion rows compare
    on the same tokens)."""

    def __init__(self, bos_id: int | None = None) -> None:
        super().__init__()
        self.bos_id = bos_id
        self.nll, self.tokens = Float64Sum(), Float64Sum()
        self.nll_excl, self.tokens_excl = Float64Sum(), Float64Sum()

    def update(
        self, nll: Tensor, mask: Tensor, targets: Tensor | None = None, offset: int = 0
    ) -> None:
        """nll, mask (B, L'); `targets` (B, L') the ids scored, column 0 at row position
        `offset` (a LossOutput's fields)."""
        nll, mask = nll.double(), mask.double()
        self.nll.update((nll * mask).sum())
        self.tokens.update(mask.sum())
        keep = mask.clone()
        if offset == 0:
            keep[:, 0] = 0.0  # the first position: no prefix to predict it from
        if targets is not None and self.bos_id is not None:
            keep = keep * (targets != self.bos_id)
        self.nll_excl.update((nll * keep).sum())
        self.tokens_excl.update(keep.sum())

    def compute(self) -> dict[str, float]:
        nll_sum, tokens = float(self.nll.compute()), float(self.tokens.compute())
        excl_sum, excl_tokens = float(self.nll_excl.compute()), float(self.tokens_excl.compute())
        nelbo = nll_sum / max(tokens, 1.0)
        nelbo_excl = excl_sum / max(excl_tokens, 1.0)
        return {
            "nelbo": nelbo,
            "ppl": float(np.exp(nelbo)),
            "bpd": nelbo / math.log(2),  # MDLM's bpd: bits per token (per character on text8)
            "tokens": round(tokens),  # a sum of 1/k weights (eval_mc_samples): round, not floor
            "nelbo_excl_bos": nelbo_excl,
            "ppl_excl_bos": float(np.exp(nelbo_excl)),
            "tokens_excl_bos": round(excl_tokens),
        }

    def reset(self) -> None:
        for metric in (self.nll, self.tokens, self.nll_excl, self.tokens_excl):
            metric.reset()


class DiffusionModule(L.LightningModule):
    """Trains `objective` on `backbone`; validates with the EMA weights."""

    def __init__(
        self,
        backbone: nn.Module,
        objective: Objective,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        ema_decay: float = 0.9999,
        eval_mc_samples: int = 1,
        eval_seed: int = 0,
        config: dict | None = None,
        loss_norm: str = "token",
        random_length_fraction: float = 0.0,
        seed: int = 0,
        bos_id: int | None = None,
    ) -> None:
        """`bos_id`: the tokenizer's BOS, left out of `ppl_excl_bos` (None: only each row's
        first position is left out)."""
        super().__init__()
        self.backbone = backbone
        self.objective = objective
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.ema = make_ema(backbone, ema_decay) if ema_decay > 0 else None
        self.eval_mc_samples = eval_mc_samples
        self.eval_seed = eval_seed
        self.config = config or {}
        LossOutput(torch.zeros(1, 1), torch.ones(1, 1)).reduce(loss_norm)  # fail early on a typo
        if not 0.0 <= random_length_fraction <= 1.0:
            raise ValueError(
                f"training.random_length_fraction={random_length_fraction}: expected a fraction"
            )
        self.loss_norm = loss_norm
        self.random_length_fraction = random_length_fraction
        self.seed = seed
        self.val_meter = NLLMeter(bos_id)
        self._rng_to_restore: dict | None = None
        self._last_step_time: float | None = None

    # ---- the weights used for evaluation and sampling ----------------------------------
    @property
    def eval_backbone(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.backbone

    def denoiser(self) -> ModelDenoiser:
        """The denoiser samplers call (EMA weights, eval mode)."""
        self.eval_backbone.eval()
        return self.objective.denoiser(self.eval_backbone)  # the objective's choice of denoiser

    # ---- training -----------------------------------------------------------------------
    def step_generator(self) -> torch.Generator:
        """The training noise of this optimizer step, seeded by (seed, step) on every rank.

        Every rank and micro-batch draws the whole global batch's noise from it and keeps its
        own rows, so training noise is the same for 1 or N devices at one global batch, times
        are stratified over the global batch, and a resumed run needs no RNG state for it.
        """
        seed = np.random.SeedSequence([self.seed, self.global_step]).generate_state(1)[0]
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def global_rows(self, batch_size: int, batch_idx: int) -> tuple[Tensor, int]:
        """(indices of this micro-batch's rows in the global batch, global batch size).

        The loader shards rows `rank::world` of one shuffled order, so local row i of
        accumulation step a on rank r is global row r + world * (a * B + i).
        """
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        accum = trainer.accumulate_grad_batches if trainer is not None else 1
        a = batch_idx % accum
        local = torch.arange(batch_size, device=self.device)
        return self.global_rank + world * (a * batch_size + local), batch_size * world * accum

    def crop_length(self, length: int, generator: torch.Generator) -> int:
        """SMDM/LLaDA stochastic length: a `random_length_fraction` of steps train on a
        random prefix length in [2, length] (the same on every rank), the rest on all of it."""
        if self.random_length_fraction <= 0:
            return length
        draws = torch.rand(2, generator=generator, device=generator.device, dtype=torch.float32)
        coin, u = draws.tolist()  # float32 also under bf16-true's default dtype
        if coin >= self.random_length_fraction:
            return length
        return 2 + int(u * (length - 1))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x0, attn = batch["input_ids"], batch["attention_mask"]
        loss_mask = batch.get("loss_mask")
        set_step = getattr(self.backbone, "set_training_step", None)
        if set_step is not None:  # backbones with a schedule of their own (attention annealing)
            set_step(self.global_step)
        set_objective_step = getattr(self.objective, "set_training_step", None)
        if set_objective_step is not None:  # DUO's curriculum, distillation's teacher rounds
            set_objective_step(self.global_step)
        generator = self.step_generator()
        keep = self.crop_length(x0.shape[1], generator)
        if keep < x0.shape[1]:
            x0, attn = x0[:, :keep], attn[:, :keep]
            loss_mask = loss_mask[:, :keep] if loss_mask is not None else None
        out = self.objective.loss(
            self.backbone,
            x0,
            attn,
            generator,
            loss_mask=loss_mask,
            rows=self.global_rows(x0.shape[0], batch_idx),
        )
        loss = out.reduce(self.loss_norm)
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=x0.shape[0])
        now = time.perf_counter()
        if self._last_step_time is not None:
            # tokens per second of this process (each step is one micro-batch)
            tok_s = attn.sum().item() / (now - self._last_step_time)
            self.log("train/tok_s", tok_s, prog_bar=True, on_step=True, batch_size=x0.shape[0])
        self._last_step_time = now
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA of the weights it produced. (`on_before_zero_grad`
        runs inside Lightning's closure, before backward and the step, so an EMA updated there
        lags one step and never sees the final weights.) Checkpoints are written after this."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update_parameters(self.backbone)

    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.backbone.parameters() if p.requires_grad]  # LoRA: adapters
        optimizer = self.optimizer_factory(params=trainable)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ---- evaluation -----------------------------------------------------------------------
    def _eval_generator(self) -> torch.Generator:
        # a private, seeded generator: every validation sees the same t and masks,
        # and the training RNG stream is left untouched
        g = torch.Generator(device=self.device)
        g.manual_seed(self.eval_seed + 1000 * self.global_rank)
        return g

    def on_validation_epoch_start(self) -> None:
        self.val_meter.reset()
        self._gen = self._eval_generator()

    @torch.no_grad()
    def eval_nll(self, batch: dict[str, Tensor], generator: torch.Generator | None = None):
        """Per-token NELBO of a batch under the EMA weights, `eval_mc_samples` times per row."""
        x0, attn = batch["input_ids"], batch["attention_mask"]
        loss_mask = batch.get("loss_mask")
        k = self.eval_mc_samples
        if k > 1:  # each row seen k times, each time with its own t and mask
            # tiled, not interleaved: copy j of row i is row j * B + i, so with antithetic
            # (stratified) times its k draws fall in k strata spread over [eps, 1]; side by side
            # they all fell in one 1/B slice of time and the estimate depended on the row's place
            x0, attn = x0.repeat(k, 1), attn.repeat(k, 1)
            loss_mask = loss_mask.repeat(k, 1) if loss_mask is not None else None
        out = self.objective.loss(self.eval_backbone, x0, attn, generator, loss_mask=loss_mask)
        out.mask = out.mask / k
        return out

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out = self.eval_nll(batch, self._gen)
        self.val_meter.update(out.nll, out.mask, out.targets, out.offset)

    def on_validation_epoch_end(self) -> None:
        stats = self.val_meter.compute()
        self.log("val/nll", stats["nelbo"], prog_bar=True, sync_dist=False)
        self.log("val/ppl", stats["ppl"], prog_bar=True, sync_dist=False)
        self.log("val/ppl_excl_bos", stats["ppl_excl_bos"], sync_dist=False)
        self.log("val/bpd", stats["bpd"], sync_dist=False)
        self._last_step_time = None  # do not count validation time as training time

    def on_train_start(self) -> None:
        self._last_step_time = None
        if self._rng_to_restore is not None:
            restore_rng(self._rng_to_restore)
            self._rng_to_restore = None

    # ---- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["unmask_config"] = self.config
        checkpoint["rng"] = capture_rng()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("rng")


def capture_rng() -> dict[str, Any]:
    """Global RNG states as plain types (loadable with torch.load(weights_only=True))."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
    }
    np_state = np.random.get_state()
    state["numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    state["numpy_pos"] = int(np_state[2])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0)
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
