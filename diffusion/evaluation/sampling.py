"""The sampling loop and `mode=sample_eval`: draw samples with the configured sampler, time
them, and judge them (generative perplexity with its entropy).

The sampler is built once with everything it needs (`diffusion.build.build_sampler`: the
tokenizer's special ids, the number of samples and the batch size); the loop draws
`sampler.num_samples` in batches of `sampler.batch_size`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from diffusion.build import build_sampler
from diffusion.checkpoint import load_weights
from diffusion.evaluation.judges import (
    build_judge,
    judge_texts,
    low_entropy_rows,
    sample_entropy,
)
from diffusion.evaluation.output import (
    append_sweep_row,
    print_samples,
    run_dir,
    write_json,
    write_samples,
)
from diffusion.module import DiffusionModule
from samplers.render import render_gif

log = logging.getLogger("unmask")


def eval_device(cfg: DictConfig) -> torch.device:
    """CUDA when there is one and the trainer is not pinned to the CPU."""
    gpu = torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"
    return torch.device("cuda" if gpu else "cpu")


def generate(
    cfg: DictConfig, dm: Any, module: DiffusionModule, sampler: Any, with_trajectory: bool = False
) -> dict[str, Any]:
    """Draw `sampler.num_samples` sequences of `model.length`; tokens, texts and timings."""
    device = eval_device(cfg)
    denoiser = module.to(device).denoiser()
    sampler.validate(denoiser)
    generator = torch.Generator(device=device).manual_seed(int(cfg.eval.sample_seed))
    tokens, nfe, rows, n_batches, trajectory = [], 0, 0, 0, None
    redraw = Redraw.from_config(cfg, module)
    draw = functools.partial(sampler.sample, denoiser, length=cfg.model.length, generator=generator)
    start = time.perf_counter()
    for first in range(0, sampler.num_samples, sampler.batch_size):
        out = draw(
            num_samples=min(sampler.batch_size, sampler.num_samples - first),
            return_trajectory=with_trajectory and first == 0,
        )
        trajectory = trajectory or out.trajectory
        batch, calls, seqs = redraw(out.tokens, draw) if redraw is not None else (out.tokens, 0, 0)
        tokens.append(batch.cpu())
        nfe += out.nfe + calls
        rows += out.rows_evaluated + seqs
        n_batches += 1
    wall = time.perf_counter() - start
    tokens_t = torch.cat(tokens)
    return {
        **(redraw.report() if redraw is not None else {}),
        "tokens": tokens_t,
        "texts": dm.decode(tokens_t),
        "nfe": nfe / max(n_batches, 1),  # network calls per batch
        "rows_evaluated": rows / max(len(tokens_t), 1),  # sequences through the network, per sample
        "wall_s": wall,
        "tokens_per_s": tokens_t.numel() / wall,
        "sampler": type(sampler).__name__,
        "steps": cfg.sampler.get("steps"),
        "trajectory": trajectory,
    }


@dataclass
class Redraw:
    """BD3-LM's rejection of degenerate samples (`eval.redraw_entropy_below`, its 4.0 nats):
    a sample whose last `window` tokens have a lower token-histogram entropy at a check
    (`judges.low_entropy_rows`) is drawn again, up to `max_redraws` times; what is still low
    then is kept and counted. Off (None) by default: every sample counts, as in MDLM."""

    below: float
    window: int
    max_redraws: int
    block: int | None
    redrawn: int = 0
    kept_low: int = 0

    @classmethod
    def from_config(cls, cfg: DictConfig, module: DiffusionModule) -> Redraw | None:
        below = cfg.eval.get("redraw_entropy_below")
        if below is None:
            return None
        block = getattr(module.objective, "block_size", None)  # block-wise: checked per block
        if "next_token" in module.objective.provides:  # AR: after every token, as BD3-LM's
            block = 1
        window, tries = int(cfg.eval.redraw_window), int(cfg.eval.max_redraws)
        return cls(float(below), window, tries, int(block) if block else None)

    def __call__(self, batch: Tensor, draw: Any) -> tuple[Tensor, int, int]:
        """The batch with its low rows redrawn; the network calls and rows the redraws cost."""
        batch, calls, seqs = batch.clone(), 0, 0
        low = low_entropy_rows(batch, self.below, self.window, self.block)
        for _ in range(self.max_redraws):
            if not bool(low.any()):
                break
            again = draw(num_samples=int(low.sum()))  # the same length: samplers pad with EOS
            batch[low.to(batch.device)] = again.tokens.to(batch.device)
            calls, seqs = calls + again.nfe, seqs + again.rows_evaluated
            self.redrawn += int(low.sum())
            low = low_entropy_rows(batch, self.below, self.window, self.block)
        self.kept_low += int(low.sum())
        return batch, calls, seqs

    def report(self) -> dict[str, Any]:
        if self.kept_low:
            log.warning(
                "eval.redraw_entropy_below=%s: %d samples still below it after "
                "eval.max_redraws=%d redraws are kept",
                self.below, self.kept_low, self.max_redraws,
            )  # fmt: skip
        return {
            "redraw_entropy_below": self.below,
            "redrawn": self.redrawn,
            "kept_below_entropy": self.kept_low,
        }


def samples_after_training(cfg: DictConfig, dm: Any, module: DiffusionModule) -> None:
    """mode=train's closing samples: `eval.samples_after_train` of them, printed and saved."""
    n = int(cfg.eval.samples_after_train)
    sampler = build_sampler(cfg.sampler, dm.tokenizer, num_samples=n, batch_size=n)
    result = generate(cfg, dm, module, sampler)
    write_samples(result["texts"], result["tokens"].tolist())
    print_samples(result["texts"])


def judge(cfg: DictConfig, dm: Any, tokens: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Generative perplexity of the samples under the configured judge: special tokens never
    reach it, and with `eval.gen_ppl_until_eos` (MDLM) each sample ends at its first EOS."""
    texts, ended = judge_texts(tokens, dm.tokenizer, bool(cfg.eval.get("gen_ppl_until_eos", True)))
    scores = build_judge(cfg, device).score(texts, ended)
    return {**scores, "judge": str(cfg.eval.gen_ppl_eval_model_name_or_path)}


def sample_eval(cfg: DictConfig, dm: Any, module: DiffusionModule) -> None:
    """mode=sample_eval: samples.jsonl, sample_eval.json (nfe, speed, entropy, gen ppl), and
    with `eval.trajectory_gif` the first sample's unmasking as trajectory.gif."""
    ckpt = load_weights(module, cfg.eval.checkpoint_path, dm)
    sampler = build_sampler(cfg.sampler, dm.tokenizer)
    result = generate(cfg, dm, module, sampler, with_trajectory=cfg.eval.trajectory_gif)
    write_samples(result["texts"], result["tokens"].tolist())
    print_samples(result["texts"])
    if result["trajectory"] is not None:
        decode = lambda i: dm.tokenizer.decode([i])  # noqa: E731
        gif = render_gif(
            result["trajectory"], decode, run_dir() / "trajectory.gif", mask_id=dm.mask_id
        )
        log.info("wrote %s", gif)
    report = {k: v for k, v in result.items() if k not in ("tokens", "texts", "trajectory")}
    report.update(
        num_samples=len(result["texts"]),
        length=result["tokens"].shape[1],
        entropy=sample_entropy(result["tokens"]),
        checkpoint=str(cfg.eval.checkpoint_path),
        trained_length=ckpt["eval_record"]["trained_length"],
    )
    if cfg.eval.compute_generative_perplexity:
        report.update(judge(cfg, dm, result["tokens"], next(module.parameters()).device))
    gen_ppl = f"{report['gen_ppl']:.2f}" if "gen_ppl" in report else "n/a"
    log.info(
        "%s steps=%s: nfe %.0f, %.1f tokens/s, entropy %.3f, gen_ppl %s",
        *(report[k] for k in ("sampler", "steps", "nfe", "tokens_per_s", "entropy")),
        gen_ppl,
    )
    if not math.isfinite(report.get("gen_ppl", 0.0)):
        log.warning("generative perplexity is not finite (no judged tokens?)")
    write_json("sample_eval.json", report)
    append_sweep_row(report)
