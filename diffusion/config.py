"""Config rules: the pure OmegaConf resolvers, `ConfigError` and `validate_config`.

main.py (and every other entry point) calls `validate_config` before building anything.
Rules that span config groups are capabilities, not names: each part class declares what it
provides or requires (objectives: `provides`, `exact_likelihood`, `requires_causal_backbone`;
samplers: `requires` / `requirements(settings)`; backbones: `accepts_sigma`,
`supports_span_cache`, the instance flag `causal`, and optionally `tokenizer_key`, the config
key naming the pretrained tokenizer the data must use), and `check_capabilities` compares them,
resolving each class from its `_target_` with Hydra before anything is built. A new
sampler, objective or backbone is one class + one yaml; nothing here names one.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from samplers.base import CapabilityError, model_capabilities
from samplers.base import check_capabilities as check_sampler

MODES = ("train", "ppl_eval", "sample_eval", "generate")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the keys at fault."""


# ---- resolvers ---------------------------------------------------------------------------------
def div_up(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def mul(a: int, b: int) -> int:
    return int(a) * int(b)


def any_of(*flags: bool) -> bool:
    """`${any:a,b}`: true when any flag is."""
    return any(bool(f) for f in flags)


def accepts_sigma(target: str) -> bool:
    """`${accepts_sigma:${backbone._target_}}`: whether that backbone class embeds a
    conditioning vector (the default of the objectives' `mask_conditioning`)."""
    return bool(part_class(str(target), "backbone._target_").accepts_sigma)


def register_resolvers() -> None:
    """Register `${div_up:a,b}`, `${mul:a,b}`, `${any:a,b}` and `${accepts_sigma:target}`
    (pure functions, no eval)."""
    for name, fn in (
        ("div_up", div_up),
        ("mul", mul),
        ("any", any_of),
        ("accepts_sigma", accepts_sigma),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


# ---- validation --------------------------------------------------------------------------------
def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError with one clear message for any config that cannot run."""
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r} is not one of {', '.join(MODES)}")
    if cfg.mode in ("ppl_eval", "sample_eval", "generate") and not cfg.eval.checkpoint_path:
        raise ConfigError(f"mode={cfg.mode} needs eval.checkpoint_path=/path/to/checkpoint.ckpt")
    validate_settings(cfg)
    check_parts(cfg)


def validate_settings(cfg: DictConfig) -> None:
    """Per-setting rules (ranges, types, derived batch sizes): one key at a time."""
    check_values(cfg)  # types and ranges first: the derived sizes below divide by them
    if cfg.T < 0:
        raise ConfigError(f"T={cfg.T}: use T=0 (continuous time) or a positive number of steps")
    if cfg.model.length < 1:
        raise ConfigError(f"model.length={cfg.model.length} must be positive")
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
    width, heads = (_setting(cfg, f"backbone.{k}") for k in ("hidden_size", "n_heads"))
    if isinstance(width, int) and isinstance(heads, int) and width % heads:
        raise ConfigError(
            f"backbone.hidden_size={width} (model.hidden_size) must be divisible by "
            f"backbone.n_heads={heads} (model.n_heads)"
        )


# key: (minimum, None allowed); integers. Keys a config does not have are skipped.
INT_SETTINGS: dict[str, tuple[int | None, bool]] = {
    "seed": (None, False),
    "T": (0, False),
    "model.length": (1, False),
    "loader.global_batch_size": (1, False),
    "loader.eval_batch_size": (1, False),
    "loader.num_workers": (0, False),
    "trainer.devices": (1, False),
    "trainer.num_nodes": (1, False),
    "trainer.max_steps": (-1, False),
    "trainer.log_every_n_steps": (1, False),
    "checkpointing.every_n_train_steps": (0, False),
    "eval.mc_samples": (1, False),
    "eval.max_batches": (1, True),
    "eval.samples_after_train": (0, False),
    "eval.gen_ppl_batch_size": (1, False),
    "eval.sample_seed": (None, False),
    "eval.redraw_window": (1, False),
    "eval.max_redraws": (0, False),
    "generate.max_new_tokens": (1, True),
    "sampler.num_samples": (1, False),
    "sampler.batch_size": (1, True),
    "sampler.steps": (1, True),
    "sampler.top_k": (0, True),
    "sampler.block_size": (1, True),
    "sampler.block_length": (1, True),
    "sampler.stride_length": (1, True),
    "sampler.num_strides": (0, True),
    "sampler.max_length": (1, True),
    "model.hidden_size": (1, False),
    "model.n_blocks": (1, False),
    "model.n_heads": (1, False),
    "model.cond_dim": (1, False),
    "lr_scheduler.num_warmup_steps": (0, False),
    "data.source.max_docs": (1, True),
}
# key: (low, low inclusive, high, high inclusive, None allowed); real numbers. An excluded
# high end: EMA decay 1 never moves, noise.eps 1 masks nothing.
FLOAT_SETTINGS: dict[str, tuple[float, bool, float | None, bool, bool]] = {
    "sampler.temperature": (0.0, True, None, True, False),
    "sampler.top_p": (0.0, False, 1.0, True, True),
    "sampler.cfg_scale": (0.0, True, None, True, False),
    "trainer.gradient_clip_val": (0.0, True, None, True, True),
    "generate.live_delay": (0.0, True, None, True, False),
    "eval.redraw_entropy_below": (0.0, False, None, True, True),
    "trainer.limit_val_batches": (0.0, True, None, True, True),
    "training.random_length_fraction": (0.0, True, 1.0, True, False),
    "optim.lr": (0.0, True, None, True, False),  # 0: frozen weights (tests, probes), as torch
    "optim.weight_decay": (0.0, True, None, True, False),
    "training.ema": (0.0, True, 1.0, False, False),
    "training.sampling_eps": (0.0, True, 1.0, False, False),
    "noise.eps": (0.0, True, 1.0, False, False),
    "model.dropout": (0.0, True, 1.0, False, False),
}
# switches: true or false, never a string Python would read as true ("maybe", "no")
BOOL_SETTINGS = (
    "time_conditioning",
    "training.antithetic",
    "eval.disable_ema",
    "eval.compute_generative_perplexity",
    "eval.gen_ppl_until_eos",
    "eval.trajectory_gif",
    "generate.chat_template",
    "generate.live",
    "checkpointing.resume_from_ckpt",
    "data.streaming",
    "data.crop_train",
    "logger.offline",  # WandbLogger's hints cannot be read (check_part_types skips it)
)
_UNSET = object()


def _setting(cfg: DictConfig, key: str) -> Any:
    """The value of `key` (resolved), _UNSET when the config has no such key."""
    try:
        return OmegaConf.select(cfg, key, default=_UNSET)
    except Exception as err:  # an interpolation that cannot resolve
        raise ConfigError(f"{key} cannot be resolved: {err}") from None


def _is_number(value: Any) -> bool:
    """An int or float, never a bool (a bool is an int to isinstance)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _derived(cfg: DictConfig, key: str) -> bool:
    """`key` is an interpolation (derived from other keys)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node and OmegaConf.is_interpolation(node, leaf)


def check_values(cfg: DictConfig) -> None:
    """Every integer, switch and real setting has its type and range (INT_SETTINGS,
    BOOL_SETTINGS, FLOAT_SETTINGS), checked on the raw keys before anything derived from them
    (the per-device batch divides the global one) is read: `loader.global_batch_size=0`,
    `trainer.max_steps=abc`, `data.streaming=maybe` or `sampler.top_p=0` fail here, naming the
    key, in the first second of any mode."""
    ints = sorted(INT_SETTINGS.items(), key=lambda item: _derived(cfg, item[0]))
    for key, (low, nullable) in ints:  # the keys a user sets before those derived from them
        value = _setting(cfg, key)
        if value is _UNSET or (value is None and nullable):
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer" + (" or null" * nullable))
        if low is not None and value < low:
            raise ConfigError(f"{key}={value} must be at least {low}")
    for key in BOOL_SETTINGS:
        value = _setting(cfg, key)
        if value is not _UNSET and not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
    for key, (low, low_in, high, high_in, nullable) in FLOAT_SETTINGS.items():
        value = _setting(cfg, key)
        if value is _UNSET or (value is None and nullable):
            continue
        if not _is_number(value):
            raise ConfigError(f"{key}={value!r} must be a number" + (" or null" * nullable))
        below = value < low or (value == low and not low_in)
        above = high is not None and (value > high or (value == high and not high_in))
        if below or above:
            lower = f"{'>=' if low_in else '>'} {low}"
            upper = f" and {'<=' if high_in else '<'} {high}" if high is not None else ""
            raise ConfigError(f"{key}={value} must be {lower}{upper}")
    betas = _setting(cfg, "optim.betas")
    if betas is not _UNSET and not (
        OmegaConf.is_list(betas)
        and len(betas) == 2
        and all(_is_number(b) and 0 <= b < 1 for b in betas)
    ):
        raise ConfigError(f"optim.betas={betas} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    check_part_types(cfg)


def as_names(value: Any, key: str) -> list[str]:
    """A list-of-names setting (`eval.datasets`, `checkpointing.allow_changed`) as a list: a
    bare name (`eval.datasets=ptb`) or a quoted "a,b" counts as its names, never as letters."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if OmegaConf.is_list(value) or isinstance(value, list | tuple):
        return [str(v) for v in value]
    raise ConfigError(f"{key}={value!r} must be a list of names, e.g. {key}=[a,b]")


# ---- part arguments against the constructor's type hints ----------------------------------------
PART_GROUPS = (
    "parameterization",
    "sampler",
    "noise",
    "backbone",
    "optim",
    "lr_scheduler",
    "logger",
)
_KINDS = {bool: "true or false", int: "an integer", float: "a number"}


def _hint_kinds(hint: Any) -> tuple[set[type], bool] | None:
    """({bool} | {int} | {float, ...}, None allowed) for a hint made of bool/int/float (a
    tensor alternative ignored: a config cannot give one); None where any other type is
    allowed (str, mappings, ...), so the constructor's own checks apply."""
    args = (
        typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType)
        else (hint,)
    )
    kinds, nullable = set(), False
    for arg in args:
        if arg is type(None):
            nullable = True
        elif arg in _KINDS:
            kinds.add(arg)
        elif arg is not torch.Tensor:
            return None
    return (kinds, nullable) if kinds else None


def _hints(target: Any) -> dict[str, Any]:
    """The type hints of a class's constructor or a function ({} where they cannot be read)."""
    try:
        return typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    except Exception:  # forward references a library never resolves: no checks, no failure
        return {}


def check_part_types(cfg: DictConfig) -> None:
    """Every key of a part (`sampler.noise_removal`, `optim.lr`, `backbone.n_blocks`, ...)
    whose constructor hint is bool, int or float (optionally None) holds one: `sampler.cache=no`
    or `backbone.causal=maybe` would otherwise be read as true (`bool` of a string) or fail
    deep inside torch. A key set by interpolation names its source (`${model.n_blocks}`)."""
    for group in PART_GROUPS:
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        if node._target_ is None:  # logger=none
            continue
        try:
            target = get_object(str(node._target_))
        except Exception:  # an unimportable target is check_parts' error, with its own message
            continue
        for key, hint in _hints(target).items():
            spec = _hint_kinds(hint)
            if spec is None or key not in node:
                continue
            kinds, nullable = spec
            value = _setting(cfg, f"{group}.{key}")
            if value is _UNSET or (value is None and nullable):
                continue
            if bool in kinds:
                ok = isinstance(value, bool)
            elif float in kinds:
                ok = _is_number(value)
            else:
                ok = isinstance(value, int) and not isinstance(value, bool)
            if not ok:
                want = _KINDS[bool] if bool in kinds else _KINDS[float if float in kinds else int]
                raw = node._get_node(key)._value()
                source = f" (set by {raw})" if isinstance(raw, str) and "${" in raw else ""
                raise ConfigError(
                    f"{group}.{key}={value!r}{source} must be {want}" + " or null" * nullable
                )


def part_class(target: str, key: str) -> type:
    """The class a `_target_` names, or a ConfigError naming `key`."""
    try:
        return get_class(target)
    except Exception as err:  # ImportError, AttributeError, Hydra's wrappers
        raise ConfigError(f"{key}={target} cannot be imported ({err})") from err


def option(cfg: DictConfig, group: str, cls: type) -> str:
    """The option name of `group` for messages: Hydra's choice when its yaml builds `cls`
    (a checkpoint's saved part may differ from this job's choice), else the class name."""
    from hydra.core.hydra_config import HydraConfig

    choice = HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None
    path = CONFIGS / group / f"{choice}.yaml"
    if choice and path.is_file():
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        target = (node.get(group) if isinstance(node.get(group), dict) else node).get("_target_")
        if target == f"{cls.__module__}.{cls.__qualname__}":
            return str(choice)
    return cls.__name__.lower()


SPECIAL_IDS = ("bos_id", "eos_id")  # what build_sampler gives every sampler from the tokenizer


def check_parts(cfg: DictConfig) -> None:
    """Resolve the objective, sampler and backbone classes; let the cheap parts check their
    own settings (the objective and the sampler are built once with placeholder sizes, so
    their constructors' messages apply before any data or weights are touched); then
    compare capabilities."""
    objective_cls = part_class(cfg.parameterization._target_, "parameterization._target_")
    sampler_cls = part_class(cfg.sampler._target_, "sampler._target_")
    backbone_cls = part_class(cfg.backbone._target_, "backbone._target_")
    noise = _constructed("noise", lambda: instantiate(cfg.noise))
    _constructed(
        "parameterization",
        lambda: instantiate(cfg.parameterization, noise=noise, mask_id=1, vocab_size=2),
    )
    special = {k: 0 if cfg.sampler.get(k) is None else cfg.sampler[k] for k in SPECIAL_IDS}
    sampler = _constructed("sampler", lambda: instantiate(cfg.sampler, **special))  # ids: dummies
    _constructed("sampler", lambda: sampler.canvas_length(int(cfg.model.length)))  # semi_ar
    check_capabilities(objective_cls, sampler_cls, backbone_cls, cfg)


def _constructed(key: str, build: Callable[[], Any]) -> Any:
    """`build()`, a part's complaint raised as a ConfigError: its own ValueError message (which
    names its keys) as it is, a TypeError (an unknown or missing key) prefixed by `key`;
    Hydra's InstantiationException wrapping is taken off."""
    try:
        return build()
    except ValueError as err:
        raise ConfigError(str(err)) from err
    except Exception as err:  # Hydra wraps constructor errors in InstantiationException
        cause = err.__cause__
        if isinstance(cause, ValueError):
            raise ConfigError(str(cause)) from err
        if isinstance(cause, TypeError):
            raise ConfigError(f"{key}: {cause}") from err
        raise


def check_capabilities(
    objective_cls: type, sampler_cls: type, backbone_cls: type, cfg: DictConfig
) -> None:
    """The capability rule: does the backbone fit the objective, and the sampler the model?

    Reads only the parts' declared capabilities and their own config nodes.
    """
    objective = f"parameterization={option(cfg, 'parameterization', objective_cls)}"
    backbone = f"backbone={option(cfg, 'backbone', backbone_cls)}"
    params = cfg.parameterization
    time_conditioned = bool(params.get("time_conditioning", False))
    if cfg.get("time_conditioning") and "time_conditioning" not in params:
        raise ConfigError(f"{objective} has no noise level: set time_conditioning=false")
    causal = bool(cfg.backbone.get("causal", False))  # the instance flag, as configured
    if objective_cls.requires_causal_backbone and not causal:
        raise ConfigError(
            f"{objective} needs a causal backbone: set backbone.causal=true "
            "(the recipes experiment=ar_lm1b / ar_owt / ar_shakespeare do)"
        )
    if not backbone_cls.accepts_sigma:
        for key, on in (
            ("time_conditioning", time_conditioned),
            ("parameterization.mask_conditioning", bool(params.get("mask_conditioning", False))),
        ):
            if on:
                raise ConfigError(f"{backbone} ignores sigma; set {key}=false")
    key = getattr(backbone_cls, "tokenizer_key", None)  # optional: only pretrained models set it
    if key is not None and str(cfg.data.get("tokenizer")) != str(cfg.backbone.get(key)):
        raise ConfigError(
            f"backbone.{key}={cfg.backbone.get(key)} needs its own tokenizer: set "
            f"data.tokenizer={cfg.backbone.get(key)} (now {cfg.data.get('tokenizer')})"
        )
    provided = objective_cls.provided(params, cfg.model.get("length"))
    provides = model_capabilities(provided, time_conditioned)
    try:
        check_sampler(
            sampler_cls.name,  # every sampler names itself as its yaml file
            sampler_cls.requirements(cfg.sampler),
            provides,
            model=objective,
            instead=sampler_options(provides),
        )
    except CapabilityError as err:
        raise ConfigError(str(err)) from err


def sampler_options(provides: Iterable[str], folder: Path = CONFIGS / "sampler") -> list[str]:
    """The sampler options in `folder` whose requirements (with their yaml defaults) a model
    providing `provides` meets: what an error message suggests instead."""
    have = set(provides)
    names = []
    for path in sorted(folder.glob("*.yaml")):
        node: Any = OmegaConf.load(path)
        try:
            cls = get_class(str(node._target_))
        except Exception:  # an option that does not import is not a suggestion
            continue
        if cls.requirements(node) <= have:
            names.append(path.stem)
    return names


# ---- keys appended on the command line ------------------------------------------------------------
# Sections whose every key some yaml of configs/ sets: a key appended there with `+` / `++` that no
# yaml has is read by nothing (`+training.lernrate=3`), so it is refused instead of ignored. The
# part groups (sampler, backbone, ...) and the trainer reject unknown keys when they are built;
# data, hydra and the free-form subtrees below take keys of their own.
CLOSED_SECTIONS = ("loader", "training", "eval", "generate", "checkpointing", "model")
OPEN_SUBTREES = ("eval.dataset_overrides",)


def _dotted_keys(node: Any, prefix: str = "") -> set[str]:
    """Every dotted path of a plain (unresolved) yaml tree, inner nodes included."""
    keys: set[str] = set()
    if isinstance(node, dict):
        for name, value in node.items():
            path = f"{prefix}{name}"
            keys.add(path)
            keys |= _dotted_keys(value, f"{path}.")
    return keys


def known_keys(folder: Path = CONFIGS) -> set[str]:
    """The dotted keys the root config, a global yaml (experiment, debug) or a model yaml sets."""
    keys = _dotted_keys(OmegaConf.to_container(OmegaConf.load(folder / "config.yaml")))
    for path in sorted(folder.glob("*/*.yaml")):
        text = path.read_text()
        tree = OmegaConf.to_container(OmegaConf.load(path)) or {}
        if "@package _global_" in text:
            keys |= _dotted_keys(tree)
        elif path.parent.name == "model":
            keys |= _dotted_keys(tree, "model.")
    return keys


def check_appended(overrides: Iterable[str], folder: Path = CONFIGS) -> None:
    """Refuse `+section.key=value` in a CLOSED_SECTIONS section when no yaml has that key, with
    the section's keys (and the nearest one) named: a misspelt setting must not run silently."""
    known: set[str] | None = None
    for override in overrides:
        if not override.startswith("+"):
            continue
        key = override.lstrip("+").partition("=")[0]
        if key.split(".", 1)[0] not in CLOSED_SECTIONS or "." not in key:
            continue
        if any(key == o or key.startswith(f"{o}.") for o in OPEN_SUBTREES):
            continue
        known = known_keys(folder) if known is None else known
        if key in known:
            continue
        parent = key.rsplit(".", 1)[0]
        siblings = sorted(k[len(parent) + 1 :] for k in known if k.rpartition(".")[0] == parent)
        near = difflib.get_close_matches(key.rsplit(".", 1)[1], siblings, n=1)
        hint = f" (did you mean {parent}.{near[0]}?)" if near else ""
        has = f"{parent} has {', '.join(siblings)}" if siblings else f"{parent} is no section"
        raise ConfigError(
            f"{override.partition('=')[0]}: no part of unmask reads {key}{hint}; {has}"
        )
