"""unmask entry point: compose the config, validate it, build the parts once, dispatch on mode.

    python main.py                                   # train the embedded default (CPU, minutes)
    python main.py mode=ppl_eval eval.checkpoint_path=outputs/.../checkpoints/last.ckpt
    python main.py mode=sample_eval eval.checkpoint_path=... sampler=ddpm sampler.steps=1000
    python main.py mode=generate eval.checkpoint_path=... generate.prompt="..."
    python main.py mode=ppl_eval eval.checkpoint_path=... eval.datasets=[ptb,wikitext2]   # zero-shot

Every mode writes into Hydra's run directory (`hydra.run.dir=...` moves it).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import generation
from config_utils import ConfigError, register_resolvers, validate_config
from diffusion.build import build_datamodule, build_module, build_trainer, module_from_checkpoint
from diffusion.checkpoint import init_weights, load_weights
from diffusion.evaluation import GenPPLJudge, ModelJudge, sample_entropy
from diffusion.module import DiffusionModule
from diffusion.rundir import prepare_fit, run_guard
from samplers.render import render_gif

log = logging.getLogger("unmask")
register_resolvers()


def run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def write_json(name: str, payload: dict[str, Any]) -> Path:
    path = run_dir() / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    log.info("wrote %s", path)
    return path


# ---- the modes ----------------------------------------------------------------------------------
def evaluate_ppl(
    cfg: DictConfig, dm, module: DiffusionModule, split: str, unigram: bool = True
) -> dict[str, Any]:
    """NELBO per token and its perplexity bound on `split` (EMA weights, float64 sums);
    `unigram`: also the add-one unigram baseline from `dm`'s train counts."""
    trainer = build_trainer(cfg, for_eval=True)
    loader = dm.dataloader(split, batch_size=cfg.loader.eval_batch_size)
    trainer.validate(module, dataloaders=loader, verbose=False)
    stats = module.val_meter.compute()
    stats.update(
        split=split,
        unigram_ppl=dm.unigram_ppl(split) if unigram else None,
        mc_samples=cfg.eval.mc_samples,
        parameterization=cfg.parameterization._target_.rsplit(".", 1)[-1],
        T=cfg.T,
        bound=not module.objective.exact_likelihood,
    )
    kind = "upper bound" if stats["bound"] else "exact"
    baseline = f"  unigram ppl {stats['unigram_ppl']:.2f}" if unigram else ""
    log.info(
        "%s %s: nelbo/token %.4f  ppl %.2f (%s)%s  (%d tokens)",
        getattr(dm, "name", ""),
        split,
        stats["nelbo"],
        stats["ppl"],
        kind,
        baseline,
        stats["tokens"],
    )
    return stats


def generate(
    cfg: DictConfig, dm, module: DiffusionModule, num_samples: int, with_trajectory: bool = False
) -> dict[str, Any]:
    """Draw `num_samples` with the configured sampler; returns tokens, texts and timings."""
    device = torch.device(
        "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu"
    )
    module.to(device)
    denoiser = module.denoiser()
    sampler = instantiate(cfg.sampler)
    if getattr(sampler, "bos_id", 0) is None:  # AR: start from the tokenizer's BOS
        sampler.bos_id = dm.tokenizer.bos_token_id
    sampler.validate(denoiser)
    generator = torch.Generator(device=device).manual_seed(int(cfg.eval.sample_seed))
    batch_size = int(getattr(sampler, "batch_size", num_samples) or num_samples)
    tokens, nfe, n_batches, trajectory = [], 0, 0, None
    start = time.perf_counter()
    for first in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - first)
        out = sampler.sample(
            denoiser,
            num_samples=n,
            length=cfg.model.length,
            generator=generator,
            return_trajectory=with_trajectory and first == 0,
        )
        tokens.append(out.tokens.cpu())
        trajectory = trajectory or out.trajectory
        nfe += out.nfe
        n_batches += 1
    wall = time.perf_counter() - start
    tokens_t = torch.cat(tokens)
    return {
        "tokens": tokens_t,
        "texts": dm.decode(tokens_t),
        "nfe": nfe / max(n_batches, 1),
        "wall_s": wall,
        "tokens_per_s": tokens_t.numel() / wall,
        "sampler": cfg.sampler._target_.rsplit(".", 1)[-1],
        "steps": cfg.sampler.get("steps"),
        "trajectory": trajectory,
    }


def print_samples(texts: list[str], limit: int = 4) -> None:
    from rich.console import Console
    from rich.panel import Panel

    console = Console()
    for i, text in enumerate(texts[:limit]):
        console.print(Panel(text, title=f"sample {i}", expand=False))


def train(cfg: DictConfig, dm, module: DiffusionModule) -> None:
    init = cfg.training.get("init_from_ckpt")
    if init:  # fine-tuning (SFT): pretrained weights, fresh optimizer and step; resume wins
        grown = init_weights(module, init, vocab_size=dm.vocab_size)
        log.info("initialised from %s (new vocabulary rows in %s)", init, grown or "none")
    trainer = build_trainer(cfg)
    ckpt_path = prepare_fit(cfg, trainer, dm, module, run_dir())  # checked resume, signals
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    stats = evaluate_ppl(cfg, dm, module, "validation")  # every rank scores its shard
    if trainer.global_rank != 0:
        return
    stats.update(steps=trainer.global_step, checkpoint=str(Path(cfg.checkpointing.save_dir)))
    write_json("ppl_eval.json", stats)
    if cfg.eval.samples_after_train > 0:
        result = generate(cfg, dm, module, cfg.eval.samples_after_train)
        write_samples(result)
        print_samples(result["texts"])


def write_samples(result: dict[str, Any]) -> None:
    with open(run_dir() / "samples.jsonl", "w") as f:
        for text, row in zip(result["texts"], result["tokens"].tolist()):
            f.write(json.dumps({"text": text, "tokens": row}) + "\n")


def ppl_eval(cfg: DictConfig, dm, module: DiffusionModule) -> None:
    zero_shot_table = bool(cfg.eval.get("datasets"))  # other corpora: only the tokenizer is checked
    ckpt = load_weights(module, cfg.eval.checkpoint_path, dm, data=not zero_shot_table)
    if zero_shot_table:
        zero_shot(cfg, dm, module)
        return
    stats = evaluate_ppl(cfg, dm, module, cfg.eval.split)
    stats["checkpoint"] = str(cfg.eval.checkpoint_path)
    stats.update(ckpt["eval_record"])  # evaluated and trained model.length
    write_json("ppl_eval.json", stats)


def zero_shot_datamodule(cfg: DictConfig, dm, name: str):
    """The data option `name` (configs/data/<name>.yaml, plus `eval.dataset_overrides.<name>`)
    tokenized with the model's own tokenizer; only `eval.split` is built."""
    try:
        composed = hydra.compose(config_name="config", overrides=[f"data={name}"])
    except Exception as err:  # Hydra's MissingConfigException and friends
        raise ConfigError(f"eval.datasets: {name!r} is not a data option ({err})") from err
    data_cfg = composed.data
    extra = (cfg.eval.get("dataset_overrides") or {}).get(name)
    if extra:
        data_cfg = OmegaConf.merge(data_cfg, extra)
    target = instantiate(
        data_cfg,
        length=cfg.model.length,
        batch_size=cfg.loader.eval_batch_size,
        eval_batch_size=cfg.loader.eval_batch_size,
        num_workers=cfg.loader.num_workers,
        seed=cfg.seed,
    )
    target.adopt_tokenizer(dm)
    target.setup(only=[cfg.eval.split])
    return target


def zero_shot(cfg: DictConfig, dm, module: DiffusionModule) -> None:
    """MDLM's zero-shot table: the checkpoint's perplexity (bound) on every corpus in
    `eval.datasets`, each detokenized as its config says and tokenized as the model was."""
    rows = []
    for name in cfg.eval.datasets:
        target = zero_shot_datamodule(cfg, dm, str(name))
        stats = evaluate_ppl(cfg, target, module, cfg.eval.split, unigram=False)
        stats["dataset"] = str(name)
        rows.append(stats)
    kind = "exact" if module.objective.exact_likelihood else "upper bound"
    lines = [f"| dataset | ppl ({kind}) | nelbo/token | tokens |", "|---|---|---|---|"]
    lines += [
        f"| {r['dataset']} | {r['ppl']:.2f} | {r['nelbo']:.4f} | {r['tokens']} |" for r in rows
    ]
    table = "\n".join(lines)
    print(table)
    (run_dir() / "zero_shot.md").write_text(table + "\n")
    write_json(
        "ppl_eval.json",
        {"zero_shot": rows, "split": cfg.eval.split, "checkpoint": str(cfg.eval.checkpoint_path)},
    )


def build_judge(cfg: DictConfig, device: torch.device):
    """The generative-perplexity judge: a Hugging Face causal LM, or an AR checkpoint of ours."""
    name = str(cfg.eval.gen_ppl_eval_model_name_or_path)
    if not name.endswith(".ckpt"):
        return GenPPLJudge(name, device=device, batch_size=cfg.eval.gen_ppl_batch_size)
    saved, judge_dm, judge = module_from_checkpoint(name, "eval.gen_ppl_eval_model_name_or_path")
    if not judge.objective.exact_likelihood:
        raise ConfigError(
            f"eval.gen_ppl_eval_model_name_or_path={name} is not an AR checkpoint: a judge must "
            "give exact likelihoods (train one with experiment=ar_shakespeare)"
        )
    return ModelJudge(
        judge.eval_backbone.to(device),
        judge.objective,
        judge_dm.tokenizer,
        length=int(saved.model.length),
        batch_size=cfg.eval.gen_ppl_batch_size,
    )


def append_sweep_row(report: dict[str, Any]) -> None:
    """Under Hydra multirun, one row per (sampler, steps) run in the sweep's rows file."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    row = {
        k: report.get(k)
        for k in (
            "sampler",
            "steps",
            "nfe",
            "wall_s",
            "tokens_per_s",
            "gen_ppl",
            "entropy",
            "num_samples",
        )
    }
    with open(Path(hc.sweep.dir) / "sample_eval_rows.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def sample_eval(cfg: DictConfig, dm, module: DiffusionModule) -> None:
    ckpt = load_weights(module, cfg.eval.checkpoint_path, dm)
    result = generate(
        cfg, dm, module, int(cfg.sampler.num_samples), with_trajectory=cfg.eval.trajectory_gif
    )
    write_samples(result)
    print_samples(result["texts"])
    if result["trajectory"] is not None:
        gif = render_gif(
            result["trajectory"],
            lambda i: dm.tokenizer.decode([i]),
            run_dir() / "trajectory.gif",
            mask_id=dm.mask_id,
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
        judge = build_judge(cfg, next(module.parameters()).device)
        report.update(judge.score(result["texts"]))
        report["judge"] = str(cfg.eval.gen_ppl_eval_model_name_or_path)
    log.info(
        "%s steps=%s: nfe %.0f, %.1f tokens/s, entropy %.3f, gen_ppl %s",
        report["sampler"],
        report["steps"],
        report["nfe"],
        report["tokens_per_s"],
        report["entropy"],
        f"{report['gen_ppl']:.2f}" if "gen_ppl" in report else "n/a",
    )
    if not math.isfinite(report.get("gen_ppl", 0.0)):
        log.warning("generative perplexity is not finite (no judged tokens?)")
    write_json("sample_eval.json", report)
    append_sweep_row(report)


def answer_prompts(cfg: DictConfig, dm, module: DiffusionModule) -> None:
    """mode=generate: answer `generate.prompt` or each line of `generate.prompts_file` with the
    prompt tokens held fixed; answers stop at the first EOS. Writes generations.jsonl."""
    from rich.console import Console
    from rich.markup import escape
    from rich.panel import Panel

    gen, tokenizer, length = cfg.generate, dm.tokenizer, int(cfg.model.length)
    prompts = generation.read_prompts(gen)
    prefixes = [generation.encode_prompt(tokenizer, p, gen.chat_template) for p in prompts]
    new = [
        generation.answer_length(len(ids), length, gen.max_new_tokens, i)
        for i, ids in enumerate(prefixes)
    ]
    load_weights(module, cfg.eval.checkpoint_path, dm)
    device = torch.device(
        "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu"
    )
    denoiser = module.to(device).denoiser()
    sampler = instantiate(generation.sampler_config(cfg))
    if getattr(sampler, "eos_id", 0) is None:  # confidence: stop once the answer has ended
        sampler.eos_id = tokenizer.eos_token_id
    sampler.validate(denoiser)
    generator = torch.Generator(device=device).manual_seed(int(cfg.eval.sample_seed))
    console = Console()
    with open(run_dir() / "generations.jsonl", "w") as f:
        for prompt, ids, n in zip(prompts, prefixes, new):
            record = generation.answer_prompt(
                sampler, denoiser, tokenizer, ids, n, generator, gen.live, gen.live_delay, console
            )
            console.print(Panel(escape(record["answer"]), title=escape(prompt[:80]), expand=False))
            f.write(json.dumps({"prompt": prompt, **record}) + "\n")
    log.info("wrote %s", run_dir() / "generations.jsonl")


MODES = {
    "train": train,
    "ppl_eval": ppl_eval,
    "sample_eval": sample_eval,
    "generate": answer_prompts,
}


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    validate_config(cfg)
    with run_guard(run_dir(), cfg.checkpointing.save_dir):  # lock, orphans, exit codes
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        dm = build_datamodule(cfg)
        module = build_module(cfg, dm)
        MODES[cfg.mode](cfg, dm, module)


if __name__ == "__main__":
    main()
