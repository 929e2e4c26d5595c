"""Every option of every config group composes and resolves; invalid combinations fail clearly.

The option lists are globbed from configs/, so a new yaml file is covered automatically.
"""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from config_utils import ConfigError, register_resolvers, validate_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONFIGS / g).glob("*.yaml"))]
# groups whose parts are cheap to build without data or downloads
BUILDABLE = {"noise", "optim", "lr_scheduler", "strategy", "sampler"}


def load(overrides: list[str]):
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # what main.py's task function receives
    OmegaConf.resolve(cfg)  # every interpolation must resolve
    return cfg


def test_groups_are_discovered():
    assert {"data", "model", "backbone", "parameterization", "noise", "sampler"} <= set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    overrides = [f"{group}={option}"]
    # options that only make sense together with another choice
    if (group, option) == ("parameterization", "sedd"):
        overrides += ["time_conditioning=true", "sampler=ddpm"]
    if (group, option) == ("parameterization", "d3pm"):
        overrides += ["T=1000", "sampler=ddpm"]
    if (group, option) == ("parameterization", "ar"):
        overrides += ["sampler=ar", "backbone.causal=true", "mask_conditioning=false"]
    if group == "backbone" and option.startswith("hf_"):
        overrides += ["data.tokenizer=${backbone.pretrained}", "mask_conditioning=false"]
    if (group, option) == ("sampler", "ar"):
        overrides += ["parameterization=ar", "backbone.causal=true", "mask_conditioning=false"]
    cfg = load(overrides)
    validate_config(cfg)
    if group in BUILDABLE and cfg[group].get("_target_"):
        part = instantiate(cfg[group])
        if group == "optim":
            import torch

            part(params=[torch.nn.Parameter(torch.zeros(1))])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mode=sample_eval"], "needs eval.checkpoint_path"),
        (["mode=fly"], "mode='fly' is not one of"),
        (["sampler=ddpm_cache", "time_conditioning=true"], "sampler=ddpm_cache"),
        (["T=-1"], "T=-1"),
        (["loader.global_batch_size=10", "loader.batch_size=4"], "global_batch_size=10"),
        (["eval.mc_samples=0"], "eval.mc_samples=0"),
        (["backbone=hf_mlm"], "data.tokenizer=answerdotai/ModernBERT-base"),
        (
            ["backbone=hf_mlm", "data.tokenizer=${backbone.pretrained}", "sampler=ddpm"],
            "ignores sigma; set mask_conditioning=false",
        ),
        (
            [
                "backbone=hf_mlm",
                "data.tokenizer=${backbone.pretrained}",
                "time_conditioning=true",
                "sampler=ddpm",
            ],
            "ignores sigma; set time_conditioning=false",
        ),
    ],
)
def test_invalid_combinations_fail_with_a_clear_message(overrides, message):
    cfg = load(overrides)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_unknown_option_names_the_group():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="sampler"):
        load(["sampler=no_such_sampler"])


def test_global_batch_derives_accumulation():
    cfg = load(["loader.global_batch_size=64", "loader.batch_size=16", "trainer.devices=2"])
    assert cfg.trainer.accumulate_grad_batches == 2
    validate_config(cfg)
