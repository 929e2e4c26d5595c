"""Every option of every config group composes, validates and builds; invalid combinations
fail clearly, with the same capability rule at config time and at run time.

The option lists are globbed from configs/, and the companions an option needs (a sampler
for an objective, an objective for a sampler) are found from the classes' declared
capabilities, so a new yaml file is covered without an edit here. Backbones are built with
tiny sizes (the Hugging Face ones from tiny local folders); data options only compose
(their sources download corpora; tests/test_dataloader.py builds the local ones).
"""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf, open_dict

from diffusion.build import build_backbone, build_sampler, build_trainer
from diffusion.config import ConfigError, register_resolvers, sampler_options, validate_config
from samplers.base import CapabilityError, model_capabilities
from tests.test_hf_backbones import gpt2_dir, mlm_dir  # noqa: F401  (fixtures)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [
    (g, f.stem) for g in GROUPS for f in sorted((CONFIGS / g).glob("*.yaml")) if f.stem[0] != "_"
]
# an objective's own settings that its constructor insists on (it names them when missing)
OBJECTIVE_SETTINGS = {"sedd": ["time_conditioning=true"], "d3pm": ["T=1000"]}
HF_FOLDERS = {"hf_mlm": "mlm_dir", "hf_causal_bidirectional": "gpt2_dir"}
# backbones whose default size comes from a config written by a converter: a tiny one
TINY = {
    "bidirectional_lm": [
        "++backbone.hf_config={vocab_size:64,hidden_size:16,intermediate_size:32,"
        "num_hidden_layers:1,num_attention_heads:2,num_key_value_heads:2}"
    ]
}
VOCAB = 64


def load(overrides: list[str], run_dir: Path | None = None):
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    if run_dir is not None:  # what @hydra.main sets (loggers and checkpoints write there)
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # what main.py's task function receives
    OmegaConf.resolve(cfg)  # every interpolation must resolve
    return cfg


def literal_true(path: Path, key: str) -> bool:
    """Whether the yaml file sets `key` to true itself (not through an interpolation)."""
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False).get(key) is True


def objective_companions(name: str) -> list[str]:
    """What parameterization=`name` needs to validate: its own settings, a causal backbone if
    it says so, and the first sampler option it can drive (found by capabilities)."""
    node = OmegaConf.load(CONFIGS / "parameterization" / f"{name}.yaml")
    node = node.get("parameterization", node)  # some options are global packages
    cls = get_class(node._target_)
    extra = list(OBJECTIVE_SETTINGS.get(name, []))
    if cls.requires_causal_backbone:
        extra.append("backbone.causal=true")
    path = CONFIGS / "parameterization" / f"{name}.yaml"
    timed = "time_conditioning=true" in extra or literal_true(path, "time_conditioning")
    samplers = sampler_options(model_capabilities(cls.provides, timed))
    assert samplers, f"no sampler option can drive parameterization={name}"
    return [*extra, f"sampler={samplers[0]}"]


def noise_class(name: str) -> type:
    return get_class(OmegaConf.load(CONFIGS / "noise" / f"{name}.yaml")._target_)


def sampler_companions(name: str) -> list[str]:
    """A parameterization option whose capabilities meet sampler=`name`'s requirements."""
    node = OmegaConf.load(CONFIGS / "sampler" / f"{name}.yaml")
    needs = get_class(node._target_).requirements(node)
    paths = sorted((CONFIGS / "parameterization").glob("*.yaml"), key=lambda p: p.stem != "subs")
    for path in paths:  # the root default first
        extra = objective_companions(path.stem)
        obj = OmegaConf.load(path)
        cls = get_class(obj.get("parameterization", obj)._target_)
        timed = "time_conditioning=true" in extra or literal_true(path, "time_conditioning")
        if needs <= model_capabilities(cls.provides, timed):
            return [f"parameterization={path.stem}", *extra[:-1]]
    raise AssertionError(f"no parameterization option provides what sampler={name} needs")


def test_groups_are_discovered():
    assert {"data", "model", "backbone", "parameterization", "noise", "sampler"} <= set(GROUPS)


def build_part(group: str, cfg, request) -> None:
    """Instantiate the part `group` chose, as the builder does (tiny sizes)."""
    if group == "backbone":
        objective = instantiate(
            cfg.parameterization, noise=instantiate(cfg.noise), mask_id=VOCAB - 1, vocab_size=VOCAB
        )
        net = build_backbone(cfg, VOCAB, objective)
        x = torch.randint(0, VOCAB - 1, (1, 8))
        assert net(x, objective.backbone_sigma(torch.ones(1), x), None).shape[-1] >= VOCAB
    elif group == "parameterization":
        instantiate(cfg.parameterization, noise=instantiate(cfg.noise), mask_id=1, vocab_size=2)
    elif group == "sampler":

        class Specials:  # a tokenizer's special ids, as build_sampler reads them
            bos_token_id, eos_token_id = 1, 2

        assert build_sampler(cfg.sampler, Specials()).bos_id == 1
    elif group == "optim":
        instantiate(cfg.optim)(params=[torch.nn.Parameter(torch.zeros(1))])
    elif group == "lr_scheduler":
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        instantiate(cfg.lr_scheduler)(optimizer=opt)
    elif group == "trainer":
        build_trainer(cfg, for_eval=True)
    elif group == "data":
        assert get_class(cfg.data._target_)  # data modules are built in tests/test_dataloader.py
    elif cfg[group].get("_target_"):  # noise, strategy, logger
        instantiate(cfg[group])


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_validates_and_builds(group, option, request, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "parameterization":
        overrides += objective_companions(option)
    if group == "sampler":
        overrides += sampler_companions(option)
    if group == "noise" and getattr(noise_class(option), "training_only", False):
        # a training-only schedule (noise=clipped): only bd3lm accepts it
        overrides += ["parameterization=bd3lm", *objective_companions("bd3lm")]
    if group == "backbone" and option in HF_FOLDERS:
        overrides.append(f"backbone.pretrained={request.getfixturevalue(HF_FOLDERS[option])}")
    if group in ("backbone", "model"):
        overrides += ["model.length=16", *TINY.get(option, [])]  # tiny HF models: few positions
    cfg = load(overrides, tmp_path)
    validate_config(cfg)
    if group not in ("model", "experiment", "debug"):  # those only set keys of other groups
        build_part(group, cfg, request)


@pytest.mark.parametrize("backbone", ["dit", "hf_mlm", "hf_causal_bidirectional", "hf_dit"])
def test_every_backbone_validates_with_the_root_defaults(backbone):
    """No conditioning key to flip: mask_conditioning follows the backbone's accepts_sigma and
    a pretrained model's data uses its own tokenizer."""
    cfg = load([f"backbone={backbone}"])
    validate_config(cfg)
    accepts = get_class(cfg.backbone._target_).accepts_sigma
    assert cfg.parameterization.mask_conditioning is accepts
    if get_class(cfg.backbone._target_).tokenizer_key:
        assert cfg.data.tokenizer == cfg.backbone.pretrained


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mode=sample_eval"], "needs eval.checkpoint_path"),
        (["mode=fly"], "mode='fly' is not one of"),
        (
            ["sampler=ddpm_cache", "time_conditioning=true"],
            "sampler=ddpm_cache needs a time-agnostic denoiser.*use sampler=analytic, "
            "sampler=confidence, sampler=ddpm.*, not sampler=ddpm_cache",
        ),
        (["sampler=semi_ar", "time_conditioning=true"], "sampler=semi_ar needs a time-agnostic"),
        (["T=-1"], "T=-1"),
        (["loader.global_batch_size=10", "loader.batch_size=4"], "global_batch_size=10"),
        (["eval.mc_samples=0"], "eval.mc_samples=0"),
        (
            ["backbone=hf_mlm", "data.tokenizer=char"],
            "backbone.pretrained=answerdotai/ModernBERT-base needs its own tokenizer",
        ),
        (
            ["backbone=hf_mlm", "parameterization.mask_conditioning=true", "sampler=ddpm"],
            "backbone=hf_mlm ignores sigma; set parameterization.mask_conditioning=false",
        ),
        (
            ["backbone=hf_mlm", "time_conditioning=true", "sampler=ddpm"],
            "backbone=hf_mlm ignores sigma; set time_conditioning=false",
        ),
        (["sampler.steps=0"], "sampler.steps=0"),
        (["sampler.num_samples=0"], "sampler.num_samples=0"),
        (["sampler=block"], "sampler=block needs a block-causal model"),
        (["parameterization._target_=no.such.Objective"], "parameterization._target_=no.such"),
    ],
)
def test_invalid_combinations_fail_with_a_clear_message(overrides, message):
    cfg = load(overrides)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_the_capability_rule_is_the_same_before_building_and_at_run_time():
    """ddpm_cache on a time-conditioned SUBS model: validate_config refuses the config, and
    the sampler refuses the built denoiser, with the same rule and the same need named."""
    from diffusion.noise import LogLinear
    from diffusion.objectives.sedd import SEDD
    from diffusion.objectives.subs import SUBS
    from models.dit import DiT
    from samplers.ddpm_cache import DDPMCacheSampler

    cfg = load(["sampler=ddpm_cache", "time_conditioning=true"])
    with pytest.raises(ConfigError) as at_config:
        validate_config(cfg)
    objective = SUBS(LogLinear(), mask_id=5, vocab_size=6, time_conditioning=True)
    net = DiT(6, 16, 1, 2, max_length=8, time_conditioning=True, cond_dim=8)
    with pytest.raises(CapabilityError) as at_run:
        DDPMCacheSampler(steps=2).sample(objective.denoiser(net), 1, 4)
    need = "sampler=ddpm_cache needs a time-agnostic denoiser"
    assert need in str(at_config.value) and need in str(at_run.value)
    sedd = SEDD(LogLinear(), mask_id=5, vocab_size=6)
    assert objective.denoiser(net).capabilities == {"absorbing", "whole_canvas"}
    assert sedd.denoiser(net).capabilities == {"absorbing", "log_score", "whole_canvas"}


def test_global_batch_derives_accumulation():
    cfg = load(["loader.global_batch_size=64", "loader.batch_size=16", "trainer.devices=2"])
    assert cfg.trainer.accumulate_grad_batches == 2
    validate_config(cfg)


def test_unknown_option_names_the_group():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="sampler"):
        load(["sampler=no_such_sampler"])
