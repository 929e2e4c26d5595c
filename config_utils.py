"""Config helpers: the pure OmegaConf resolvers and `validate_config`, the one home of
every rule that spans config groups. main.py calls both before building anything."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

MODES = ("train", "ppl_eval", "sample_eval")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the keys at fault."""


def div_up(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def mul(a: int, b: int) -> int:
    return int(a) * int(b)


def register_resolvers() -> None:
    """Register `${div_up:a,b}` and `${mul:a,b}` (pure arithmetic, no eval)."""
    for name, fn in (("div_up", div_up), ("mul", mul)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def _target(node) -> str:
    return str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError with one clear message for any combination that cannot run."""
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r} is not one of {', '.join(MODES)}")
    if cfg.mode in ("ppl_eval", "sample_eval") and not cfg.eval.checkpoint_path:
        raise ConfigError(f"mode={cfg.mode} needs eval.checkpoint_path=/path/to/checkpoint.ckpt")
    if cfg.T < 0:
        raise ConfigError(f"T={cfg.T}: use T=0 (continuous time) or a positive number of steps")
    if cfg.model.length < 1:
        raise ConfigError(f"model.length={cfg.model.length} must be positive")
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
    if cfg.eval.mc_samples < 1:
        raise ConfigError(f"eval.mc_samples={cfg.eval.mc_samples} must be at least 1")
