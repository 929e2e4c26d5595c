"""Config helpers: the pure OmegaConf resolvers and `validate_config`, the one home of
every rule that spans config groups. main.py calls both before building anything."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

MODES = ("train", "ppl_eval", "sample_eval", "generate")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the keys at fault."""


def div_up(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def mul(a: int, b: int) -> int:
    return int(a) * int(b)


def any_of(*flags: bool) -> bool:
    """`${any:a,b}`: true when any flag is (the DiT embeds sigma under time or mask conditioning)."""
    return any(bool(f) for f in flags)


def register_resolvers() -> None:
    """Register `${div_up:a,b}`, `${mul:a,b}` and `${any:a,b}` (pure functions, no eval)."""
    for name, fn in (("div_up", div_up), ("mul", mul), ("any", any_of)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def _target(node) -> str:
    return str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError with one clear message for any combination that cannot run."""
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r} is not one of {', '.join(MODES)}")
    if cfg.mode in ("ppl_eval", "sample_eval", "generate") and not cfg.eval.checkpoint_path:
        raise ConfigError(f"mode={cfg.mode} needs eval.checkpoint_path=/path/to/checkpoint.ckpt")
    if cfg.T < 0:
        raise ConfigError(f"T={cfg.T}: use T=0 (continuous time) or a positive number of steps")
    if cfg.model.length < 1:
        raise ConfigError(f"model.length={cfg.model.length} must be positive")
    validate_parameterization(cfg)
    sampler = _target(cfg.sampler)
    if sampler.endswith("DDPMCacheSampler") and cfg.time_conditioning:
        raise ConfigError(
            "sampler=ddpm_cache reuses the denoiser output between steps, which is exact only "
            "for a time-agnostic model; with time_conditioning=true use sampler=ddpm"
        )
    world = int(cfg.trainer.devices) * int(cfg.trainer.num_nodes)
    per_step = int(cfg.loader.batch_size) * world * int(cfg.trainer.accumulate_grad_batches)
    if per_step != int(cfg.loader.global_batch_size):
        raise ConfigError(
            f"loader.global_batch_size={cfg.loader.global_batch_size} is not "
            f"loader.batch_size ({cfg.loader.batch_size}) x devices x nodes ({world}) x "
            f"trainer.accumulate_grad_batches ({cfg.trainer.accumulate_grad_batches}); "
            "choose a global batch divisible by the per-device batch"
        )
    backbone = _target(cfg.backbone)
    if backbone.startswith("models.hf."):
        if str(cfg.data.get("tokenizer")) != str(cfg.backbone.pretrained):
            raise ConfigError(
                f"backbone.pretrained={cfg.backbone.pretrained} needs its own tokenizer: set "
                f"data.tokenizer={cfg.backbone.pretrained} (now {cfg.data.get('tokenizer')})"
            )
        for key in ("time_conditioning", "mask_conditioning"):
            if cfg.get(key):
                raise ConfigError(
                    f"backbone={backbone.rsplit('.', 1)[-1]} ignores sigma; set {key}=false"
                )
    if cfg.eval.mc_samples < 1:
        raise ConfigError(f"eval.mc_samples={cfg.eval.mc_samples} must be at least 1")


# samplers a score-entropy (SEDD) model cannot drive: ddpm_cache needs a time-agnostic
# denoiser, confidence samplers rank SUBS probabilities at a fixed t, ar needs a causal model
SEDD_REFUSED_SAMPLERS = ("samplers.ddpm_cache.", "samplers.confidence.", "samplers.ar.")


def validate_parameterization(cfg: DictConfig) -> None:
    """Rules tying `parameterization` to T, time_conditioning, backbone.causal and the sampler."""
    objective = _target(cfg.parameterization)
    sampler = _target(cfg.sampler)
    sampler_name = sampler.rsplit(".", 2)[-2] if sampler.count(".") >= 2 else sampler
    is_ar_sampler = sampler.startswith("samplers.ar.")
    if objective.endswith(".D3PM") and cfg.T <= 0:
        raise ConfigError(
            f"parameterization=d3pm is a discrete-time objective and needs T > 0 steps "
            f"(e.g. T=1000); T={cfg.T} (continuous time) exists only for subs and sedd"
        )
    if objective.endswith(".SEDD"):
        if not cfg.time_conditioning:
            raise ConfigError(
                "parameterization=sedd needs time_conditioning=true: its score depends on sigma"
            )
        if cfg.T != 0:
            raise ConfigError(f"parameterization=sedd is continuous-time: set T=0 (got T={cfg.T})")
        if sampler.startswith(SEDD_REFUSED_SAMPLERS):
            raise ConfigError(
                f"parameterization=sedd cannot be sampled with sampler={sampler_name}; "
                "use sampler=ddpm or sampler=analytic"
            )
    if objective.endswith(".AR"):
        if not cfg.backbone.get("causal", False):
            raise ConfigError(
                "parameterization=ar needs a causal backbone: set backbone.causal=true "
                "(the recipes experiment=ar_lm1b / ar_owt / ar_shakespeare do)"
            )
        for key in ("time_conditioning", "mask_conditioning"):
            if cfg.get(key):
                raise ConfigError(f"parameterization=ar has no noise level: set {key}=false")
        if not is_ar_sampler:
            raise ConfigError(
                f"parameterization=ar generates left to right: use sampler=ar, not "
                f"sampler={sampler_name}"
            )
    elif is_ar_sampler:
        raise ConfigError(
            f"sampler=ar needs parameterization=ar (a causal next-token model); "
            f"parameterization={objective.rsplit('.', 1)[-1].lower()} is a diffusion model"
        )
