"""The builder: the one path from a composed config to the parts of a run.

main.py, the lm-eval model, the judges, the scripts and the tests all build through here
(nobody imports main.py): `build_datamodule` -> `build_module` -> `build_trainer`, and
`module_from_checkpoint` rebuilds a module from the config saved in one of our .ckpt files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, RichProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from diffusion.checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    LastCheckpoint,
    load_weights,
    read_checkpoint,
    safe_config,
)
from diffusion.config import ConfigError
from diffusion.flops import apply_flops_budget
from diffusion.module import DiffusionModule
from diffusion.objectives.base import Objective


def built(key: str, node: DictConfig, **kwargs: Any) -> Any:
    """`instantiate(node, **kwargs)` with a constructor's own complaint raised as a ConfigError
    naming the group (`trainer: Precision '16-mix' is invalid...`), not wrapped by Hydra."""
    from hydra.errors import InstantiationException
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause from err
        if isinstance(cause, ValueError | TypeError | MisconfigurationException):
            raise ConfigError(f"{key}: {cause}") from err
        raise


def build_datamodule(cfg: DictConfig, splits: Sequence[str] | None = None) -> L.LightningDataModule:
    """The configured data module, set up: every split (training), or only `splits` (an
    evaluation builds what it scores; `()`: the tokenizer alone)."""
    dm = built(
        "data",
        cfg.data,
        length=cfg.model.length,
        batch_size=cfg.loader.batch_size,
        eval_batch_size=cfg.loader.eval_batch_size,
        num_workers=cfg.loader.num_workers,
        seed=cfg.seed,
    )
    if splits is None:
        dm.setup()
    elif splits:
        dm.setup(only=list(splits))
    else:
        dm.setup_tokenizer()
    return dm


def eval_splits(cfg: DictConfig) -> list[str] | None:
    """The splits a mode scores: training builds all (None); ppl_eval its `eval.split` (none
    for the zero-shot table, whose corpora are built apart); sampling needs only the tokenizer."""
    if cfg.mode == "train":
        return None
    if cfg.mode == "ppl_eval" and not cfg.eval.get("datasets"):
        return [str(cfg.eval.split)]
    return []


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
        bos_id=getattr(getattr(dm, "tokenizer", None), "bos_token_id", None),  # ppl_excl_bos
    )


class ParamSummary(ModelSummary):
    """Lightning's table of the module's parts and parameters, without its FLOPs column and
    "Total FLOPs" line: Lightning counts FLOPs only by running an `example_input_array`, which
    a diffusion module has none of, so both read 0. The FLOPs per token that count are logged
    by diffusion/flops.py when the module is built."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import (
            get_formatted_model_size,
            get_human_readable_count,
        )
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style="bold magenta")
        for name, _ in columns:
            table.add_column(name or " ", justify="right" if name == "Params" else "left")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        frozen = total_parameters - trainable_parameters
        console.print(
            f"Trainable params: {get_human_readable_count(trainable_parameters)}  "
            f"Non-trainable params: {get_human_readable_count(frozen)}  "
            f"Total: {get_human_readable_count(total_parameters)} "
            f"({get_formatted_model_size(model_size)} MB)  "
            f"Modules in train / eval mode: {total_training_modes['train']} / "
            f"{total_training_modes['eval']}"
        )


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, reading "Epoch 3" where a step-limited run
    (max_epochs = -1) would print "Epoch 3/-2", and without Lightning's "v_num: 0.000" (the
    logger's version number shown as a float metric)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"


def build_trainer(cfg: DictConfig, for_eval: bool = False) -> L.Trainer:
    """The Lightning trainer: with checkpoints and logger for training; bare for evaluation."""
    strategy = built("strategy", cfg.strategy) if "_target_" in cfg.strategy else cfg.strategy.name
    if for_eval:
        limit = cfg.eval.max_batches if cfg.eval.max_batches else 1.0
        return built(
            "trainer",
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
        LastCheckpoint(save_dir, cfg.checkpointing.every_n_train_steps),
    ]
    if cfg.trainer.get("enable_model_summary", True) is not False:
        callbacks.append(ParamSummary())
    if cfg.trainer.get("enable_progress_bar", True) is not False:
        callbacks.append(StepProgressBar())
    logger = built("logger", cfg.logger) if cfg.logger and cfg.logger.get("_target_") else False
    return built(
        "trainer",
        cfg.trainer,
        strategy=strategy,
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )


def module_from_checkpoint(
    path: str | Path, key: str, fmt: str | None = None
) -> tuple[DictConfig, Any, DiffusionModule]:
    """(saved config, data module, module with the weights) rebuilt from a checkpoint by the
    config it records; `key` names the setting that gave the path, for errors. A published
    release (a folder, a hub name, MDLM's .ckpt; `fmt` names its format, else detected) is
    first converted once into a cached .ckpt of ours (models.formats.as_ckpt_file), so the
    judge and lm-eval take every format `eval.checkpoint_path` takes."""
    from models.formats import as_ckpt_file

    where = f"{key}={path}"
    file: str | Path = path
    if Path(str(path)).expanduser().exists() or not str(path).endswith(".ckpt"):
        try:  # a missing .ckpt keeps our reader's "checkpoint not found"
            file = as_ckpt_file(str(path), fmt)
        except CheckpointError as e:
            raise type(e)(f"{where}: {e}") from e
    saved = safe_config(read_checkpoint(file), where)  # allowed _target_s only
    dm = build_datamodule(saved, splits=())  # the judge and lm-eval need only its tokenizer
    module = build_module(saved, dm)
    load_weights(module, file, dm)
    return saved, dm, module


# ---- evaluation builds from the checkpoint -------------------------------------------------------
# what a checkpoint defines: an evaluation takes these from it, and the command line may not
# contradict them (except the keys below, which an evaluation may change)
RUN_DEFINING = ("model", "backbone", "parameterization", "noise", "data", "T", "time_conditioning")
EVAL_MAY_CHANGE = (
    "model.length",
    "data.cache_dir",
    "data.num_proc",
    "data.streaming",
    "parameterization.attn_backend",  # how BD3-LM's mask is computed (flex / sdpa): same values
)
# labels of the run, not properties of its weights: a command's own name is no contradiction
# (MDLM's and DUO's eval commands say model=small of a release converted as mdlm-768x12)
RUN_LABELS = ("model.name",)
# where this machine keeps its caches and how many processes it tokenizes with: always the
# evaluating machine's own (the checkpoint's name a folder on the machine it was trained on)
MACHINE_LOCAL = ("data.cache_dir", "data.num_proc")


def read_any_checkpoint(path: str | Path, fmt: str | None = None) -> dict[str, Any]:
    """A checkpoint of any supported format as a dict laid out like our .ckpt
    ({"state_dict": ..., "unmask_config": ...}); `fmt` None: detected from the files."""
    from models.formats import load_checkpoint

    if fmt is None and str(path).endswith(".ckpt") and not Path(path).exists():
        return read_checkpoint(path)  # our reader's "checkpoint not found: <path>"
    return load_checkpoint(str(path), fmt)


def command_line_baseline() -> DictConfig:
    """The config of this job composed without its command line (inside Hydra's main), so
    `eval_config` can tell what the user set from what the defaults set."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    return compose(HydraConfig.get().job.config_name, overrides=[])


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a resolved config node (a scalar is its own leaf)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def names_group(overrides: Sequence[str], group: str) -> bool:
    """Whether Hydra overrides choose an option of config group `group` (`sampler=ddpm`, also
    when it restates the default, which a comparison with the defaults cannot see)."""
    return any(o.split("=", 1)[0].lstrip("+~") == group for o in overrides)


def eval_config(cfg: DictConfig, baseline: DictConfig, sampler_named: bool = False) -> DictConfig:
    """The config an evaluation of `eval.checkpoint_path` runs with: the run-defining keys from
    the checkpoint (its saved config, or a published format's metadata), everything else
    (mode, eval, sampler, loader, trainer, ...) from `cfg`. `baseline` is the config composed
    without the command line: a run-defining key where `cfg` differs from it was set by the user,
    and must then equal the checkpoint's (or be one of EVAL_MAY_CHANGE); unless the user chose
    a sampler (`sampler=<option>`: `sampler_named`, or a sampler other than the default's), the
    sampler is the checkpoint's with the `sampler.*` keys the user set."""
    path = cfg.eval.checkpoint_path
    where = f"eval.checkpoint_path={path}"
    fmt, raw = cfg.eval.get("checkpoint_format"), bool(cfg.eval.get("disable_ema", False))
    given_path = Path(str(path)).expanduser()
    if given_path.exists() or not str(path).endswith(".ckpt"):  # a missing .ckpt: our error
        from models.formats import as_ckpt_file  # a release: converted once into a .ckpt (H3)

        converted = as_ckpt_file(str(path), fmt, use_ema=not raw)
        if converted != given_path:
            path, fmt = str(converted), None
    saved = safe_config(read_any_checkpoint(path, fmt), where)
    ours = leaves(OmegaConf.to_container(cfg, resolve=True))
    base = leaves(OmegaConf.to_container(baseline, resolve=True))
    theirs = leaves(OmegaConf.to_container(saved, resolve=True))
    given = {k for k in ours if ours[k] != base.get(k)}  # what the command line changed
    run_keys = [k for k in given if k.split(".")[0] in RUN_DEFINING and k.split(".")[0] in saved]
    clashes = [
        f"{k}={ours[k]} (the checkpoint has {k}={theirs.get(k)})"
        for k in sorted(run_keys, key=lambda k: (RUN_DEFINING.index(k.split(".")[0]), k))
        if k not in EVAL_MAY_CHANGE and k not in RUN_LABELS and ours[k] != theirs.get(k)
    ]
    if clashes:
        more = f"; and {len(clashes) - 6} more" if len(clashes) > 6 else ""
        raise ConfigError(
            f"{where} defines the model; the command line contradicts it: "
            f"{'; '.join(clashes[:6])}{more}. Drop these overrides (evaluation rebuilds the "
            "model from the checkpoint)"
        )
    out = cfg.copy()
    with open_dict(out):
        out.eval.checkpoint_path = str(path)  # the .ckpt the evaluation modes load from
        for key in RUN_DEFINING:
            if key in saved:
                out[key] = saved[key]
        if "sampler" in saved and not (sampler_named or "sampler._target_" in given):
            out.sampler = saved.sampler  # the sampler it was trained to be sampled with,
            for key in sorted(k for k in given if k.startswith("sampler.")):  # + sampler.steps=
                OmegaConf.update(out, key, OmegaConf.select(cfg, key), force_add=True)
        for key in EVAL_MAY_CHANGE:
            if key in given or (key in MACHINE_LOCAL and key in ours):
                OmegaConf.update(out, key, OmegaConf.select(cfg, key), force_add=True)
        if "model.length" in given and out.backbone.get("max_length") == saved.model.length:
            out.backbone.max_length = out.model.length  # the yaml's ${model.length}
    return out
