"""unmask entry point: compose the config, validate it, build the parts once, dispatch on mode.

    python main.py                                   # train the embedded default (CPU, minutes)
    python main.py mode=ppl_eval eval.checkpoint_path=outputs/.../checkpoints/last.ckpt
    python main.py mode=sample_eval eval.checkpoint_path=... sampler=ddpm sampler.steps=1000
    python main.py mode=generate eval.checkpoint_path=... generate.prompt="..."
    python main.py mode=ppl_eval eval.checkpoint_path=... eval.datasets=[ptb,wikitext2]   # zero-shot

Every mode writes into Hydra's run directory (`hydra.run.dir=...` moves it). The parts are
built by `diffusion/build.py`; the evaluation modes live in `diffusion/evaluation/`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffusion.build import (
    build_datamodule,
    build_module,
    build_trainer,
    command_line_baseline,
    eval_config,
    eval_splits,
    names_group,
)
from diffusion.checkpoint import init_weights
from diffusion.compat import translate_argv
from diffusion.config import check_appended, register_resolvers, validate_config
from diffusion.evaluation.likelihood import evaluate_ppl, ppl_eval
from diffusion.evaluation.output import run_dir, write_json
from diffusion.evaluation.prompted import answer_prompts
from diffusion.evaluation.sampling import sample_eval, samples_after_training
from diffusion.flops import run_summary
from diffusion.module import DiffusionModule
from diffusion.rundir import prepare_fit, run_guard

log = logging.getLogger("unmask")
register_resolvers()


def train(cfg: DictConfig, dm, module: DiffusionModule) -> None:
    """mode=train: fit (resuming where the run directory says), score the validation split
    (ppl_eval.json) and print a few samples."""
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
    stats.update(run_summary(cfg, module.backbone, trainer.global_step))  # N, FLOPs
    write_json("ppl_eval.json", stats)
    if cfg.eval.samples_after_train > 0:
        samples_after_training(cfg, dm, module)


MODES = {
    "train": train,
    "ppl_eval": ppl_eval,
    "sample_eval": sample_eval,
    "generate": answer_prompts,
}


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    task = HydraConfig.get().overrides.task
    check_appended(task)  # `+training.lernrate=3` is refused
    if cfg.mode != "train" and cfg.eval.get("checkpoint_path"):  # the model is the checkpoint's
        cfg = eval_config(cfg, command_line_baseline(), names_group(task, "sampler"))
    validate_config(cfg)
    with run_guard(run_dir(), cfg.checkpointing.save_dir):  # lock, orphans, exit codes
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        dm = build_datamodule(cfg, eval_splits(cfg))  # evaluation: only what it scores
        module = build_module(cfg, dm)
        MODES[cfg.mode](cfg, dm, module)


if __name__ == "__main__":
    sys.argv[1:] = translate_argv(sys.argv[1:])  # MDLM's command line, verbatim (compat.py)
    main()
