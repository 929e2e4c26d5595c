"""Likelihood evaluation: the NELBO per token of a split and its perplexity (an upper bound
for diffusion objectives, exact for AR), `mode=ppl_eval`, and MDLM's zero-shot table.

Scores use the EMA weights and float64 sums (`DiffusionModule.val_meter`). Evaluation builds
only the split it scores (`eval.split`), tokenized as the checkpoint's model was.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from diffusion.build import build_trainer, built
from diffusion.checkpoint import load_weights
from diffusion.config import ConfigError, as_names
from diffusion.evaluation.output import run_dir, write_json
from diffusion.module import DiffusionModule

log = logging.getLogger("unmask")


def evaluate_ppl(
    cfg: DictConfig, dm: Any, module: DiffusionModule, split: str, unigram: bool = True
) -> dict[str, Any]:
    """NELBO per token and its perplexity on `split` (EMA weights, float64 sums);
    `unigram`: also the add-one unigram baseline from `dm`'s train counts (train built)."""
    trainer = build_trainer(cfg, for_eval=True)
    loader = dm.dataloader(split, batch_size=cfg.loader.eval_batch_size, for_eval=True)
    trainer.validate(module, dataloaders=loader, verbose=False)
    stats = module.val_meter.compute()
    stats.update(
        split=split,
        unigram_ppl=dm.unigram_ppl(split) if unigram else None,
        mc_samples=cfg.eval.mc_samples,
        parameterization=type(module.objective).__name__,
        T=cfg.T,
        bound=not module.objective.exact_likelihood,
    )
    kind = "upper bound" if stats["bound"] else "exact"
    base = stats["unigram_ppl"]  # None: not asked for, or train streamed (nothing counted)
    baseline = f"  unigram ppl {base:.2f}" if base is not None else ""
    log.info(
        "%s %s: nelbo/token %.4f  ppl %.2f (%s), bpd %.4f, ppl_excl_bos %.2f%s  (%d tokens)",
        dm.name,
        split,
        stats["nelbo"],
        stats["ppl"],
        kind,
        stats["bpd"],
        stats["ppl_excl_bos"],
        baseline,
        stats["tokens"],
    )
    return stats


def ppl_eval(cfg: DictConfig, dm: Any, module: DiffusionModule) -> None:
    """mode=ppl_eval: the checkpoint's NELBO on `eval.split` (ppl_eval.json), or with
    `eval.datasets` the zero-shot table over those corpora."""
    zero_shot_table = bool(cfg.eval.get("datasets"))  # other corpora: only the tokenizer is checked
    ckpt = load_weights(module, cfg.eval.checkpoint_path, dm, data=not zero_shot_table)
    if zero_shot_table:
        zero_shot(cfg, dm, module, record=ckpt["eval_record"])
        return
    stats = evaluate_ppl(cfg, dm, module, cfg.eval.split, unigram=False)
    stats["checkpoint"] = str(cfg.eval.checkpoint_path)
    stats.update(ckpt["eval_record"])  # evaluated and trained model.length
    write_json("ppl_eval.json", stats)


def check_dataset_overrides(overrides: Any, names: list[str]) -> None:
    """`eval.dataset_overrides` is {corpus in eval.datasets: data keys}: a misspelt or absent
    corpus would otherwise be ignored, and the table scored without the keys asked for."""
    if overrides is None:
        return
    if not OmegaConf.is_dict(overrides) and not isinstance(overrides, dict):
        raise ConfigError(
            f"eval.dataset_overrides={overrides!r} must map a corpus of eval.datasets to data "
            "keys, e.g. eval.dataset_overrides.ptb.cache_dir=..."
        )
    stray = sorted(str(k) for k in overrides if str(k) not in names)
    if stray:
        raise ConfigError(
            f"eval.dataset_overrides names {stray}, not in eval.datasets={names}: add them there "
            "or fix the name"
        )


def zero_shot_datamodule(cfg: DictConfig, dm: Any, name: str) -> Any:
    """The data option `name` (configs/data/<name>.yaml, plus `eval.dataset_overrides.<name>`)
    tokenized with the model's own tokenizer; only `eval.split` is built."""
    try:
        composed = hydra.compose(config_name="config", overrides=[f"data={name}"])
    except Exception as err:  # Hydra's MissingConfigException and friends
        raise ConfigError(f"eval.datasets: {name!r} is not a data option ({err})") from err
    data_cfg = composed.data
    extra = (cfg.eval.get("dataset_overrides") or {}).get(name)
    if extra:  # may add keys the corpus's yaml leaves out (a layout switch: doc_eos)
        OmegaConf.set_struct(data_cfg, False)
        data_cfg = OmegaConf.merge(data_cfg, extra)
    where = f"eval.dataset_overrides.{name}" if extra else f"eval.datasets: {name}"
    target = built(  # a misspelt override key: the constructor's complaint, naming `where`
        where,
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


def zero_shot(
    cfg: DictConfig, dm: Any, module: DiffusionModule, record: dict[str, Any] | None = None
) -> None:
    """MDLM's zero-shot table: the checkpoint's perplexity (bound) on every corpus in
    `eval.datasets`, each detokenized as its config says and tokenized as the model was;
    `record` (evaluated and trained model.length) goes into ppl_eval.json."""
    names = as_names(cfg.eval.datasets, "eval.datasets")
    check_dataset_overrides(cfg.eval.get("dataset_overrides"), names)
    rows = []
    for name in names:
        target = zero_shot_datamodule(cfg, dm, name)
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
        {
            "zero_shot": rows,
            "split": cfg.eval.split,
            "checkpoint": str(cfg.eval.checkpoint_path),
            **(record or {}),
        },
    )
