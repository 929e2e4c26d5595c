"""The builder: the one path from a composed config to the parts of a run.

main.py, the lm-eval model, the judges, the scripts and the tests all build through here
(nobody imports main.py): `build_datamodule` -> `build_module` -> `build_trainer`, and
`module_from_checkpoint` rebuilds a module from the config saved in one of our .ckpt files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch import nn

from diffusion.checkpoint import (
    AtomicCheckpointIO,
    FinalCheckpoint,
    load_weights,
    read_checkpoint,
    safe_config,
)
from diffusion.flops import apply_flops_budget
from diffusion.module import DiffusionModule
from diffusion.objectives.base import Objective


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The configured data module, set up (tokenizer loaded, splits built)."""
    dm = instantiate(
        cfg.data,
        length=cfg.model.length,
        batch_size=cfg.loader.batch_size,
        eval_batch_size=cfg.loader.eval_batch_size,
        num_workers=cfg.loader.num_workers,
        seed=cfg.seed,
    )
    dm.setup()
    return dm


def build_backbone(cfg: DictConfig, vocab_size: int, objective: Objective) -> nn.Module:
    """The backbone sized to the vocabulary. One whose class `accepts_sigma` embeds a
    conditioning vector exactly when the objective feeds it one (the objective decides what:
    sigma(t) or the mask-fraction statistic), so the two can never disagree."""
    kwargs: dict[str, Any] = {"vocab_size": vocab_size}
    if get_class(cfg.backbone._target_).accepts_sigma:
        kwargs["time_conditioning"] = objective.conditions_backbone
    return instantiate(cfg.backbone, **kwargs)


def build_sampler(
    cfg_sampler: DictConfig, tokenizer: Any, stop_at_eos: bool = False, **settings: Any
):
    """The sampler with the tokenizer's special tokens given at build time (a yaml value that
    is set wins); `stop_at_eos` turns on early stopping where the sampler has it (prompted
    answers end at EOS); `settings` override yaml keys (e.g. num_samples)."""
    special = {"bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id}
    for key in special:
        if cfg_sampler.get(key) is not None:
            special[key] = cfg_sampler[key]
    if stop_at_eos and "stop_at_eos" in cfg_sampler:
        settings["stop_at_eos"] = True
    return instantiate(cfg_sampler, **special, **settings)


def build_module(cfg: DictConfig, dm: L.LightningDataModule) -> DiffusionModule:
    """Backbone + objective (+ noise, optimizer, schedule, EMA) sized by `dm`'s vocabulary."""
    objective = instantiate(
        cfg.parameterization,
        noise=instantiate(cfg.noise),
        mask_id=dm.mask_id,
        vocab_size=dm.vocab_size,
    )
    backbone = build_backbone(cfg, dm.vocab_size, objective)
    apply_flops_budget(cfg, backbone)  # training.flops_budget -> trainer.max_steps
    scheduler = instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None
    return DiffusionModule(
        backbone,
        objective,
        optimizer=instantiate(cfg.optim),
        lr_scheduler=scheduler,
        ema_decay=cfg.training.ema,
        eval_mc_samples=cfg.eval.mc_samples,
        eval_seed=cfg.seed,
        config=OmegaConf.to_container(cfg, resolve=True),
        loss_norm=cfg.training.get("loss_norm", "token"),
        random_length_fraction=cfg.training.get("random_length_fraction", 0.0),
        seed=cfg.seed,
    )


def build_trainer(cfg: DictConfig, for_eval: bool = False) -> L.Trainer:
    """The Lightning trainer: with checkpoints and logger for training; bare for evaluation."""
    strategy = instantiate(cfg.strategy) if "_target_" in cfg.strategy else cfg.strategy.name
    if for_eval:
        limit = cfg.eval.max_batches if cfg.eval.max_batches else 1.0
        return instantiate(
            cfg.trainer,
            strategy=strategy,
            logger=False,
            callbacks=[],
            limit_val_batches=limit,
            enable_checkpointing=False,
            plugins=[AtomicCheckpointIO()],
        )
    save_dir = cfg.checkpointing.save_dir
    callbacks = [
        ModelCheckpoint(
            dirpath=save_dir,
            filename="best",
            monitor="val/nll",
            mode="min",
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
        ModelCheckpoint(
            dirpath=save_dir,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=cfg.checkpointing.every_n_train_steps,
            enable_version_counter=False,  # last.ckpt, never last-v1.ckpt after a copy/move
        ),
        FinalCheckpoint(Path(save_dir) / "last.ckpt", cfg.checkpointing.every_n_train_steps),
    ]
    logger = instantiate(cfg.logger) if cfg.logger and cfg.logger.get("_target_") else False
    return instantiate(
        cfg.trainer,
        strategy=strategy,
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )


def module_from_checkpoint(path: str | Path, key: str) -> tuple[DictConfig, Any, DiffusionModule]:
    """(saved config, data module, module with the weights) rebuilt from a .ckpt of ours by
    the config saved in it; `key` names the setting that gave the path, for errors."""
    saved = safe_config(read_checkpoint(path), f"{key}={path}")  # allowed _target_s only
    dm = build_datamodule(saved)
    module = build_module(saved, dm)
    load_weights(module, path, dm)
    return saved, dm, module
