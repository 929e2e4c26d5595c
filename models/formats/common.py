"""Shared parts of the format converters: strict tensor matching, safe reads, our .ckpt layout.

Every converter ends in `make_checkpoint`: a dict laid out as one of our own `.ckpt` files
(`state_dict` with `backbone.*`, the EMA copy `ema.module.*` and `ema.n_averaged`, and the
fully composed `unmask_config`), so `module_from_checkpoint` rebuilds the module from it
like any checkpoint of ours. `unmask_format` records what the converter learned.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusion.checkpoint import CheckpointError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class FormatError(CheckpointError):
    """A published checkpoint is unreadable, incomplete or does not fit its declared layout."""


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FormatError(f"{path} not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is not valid JSON (truncated?): {e}") from e


def read_release_config(folder: Path, model_type: str) -> tuple[dict[str, Any], Path]:
    """(config.json of a release folder, its path), refused unless its model_type is ours."""
    cfg_path = folder / "config.json"
    cfg = read_json(cfg_path)
    if cfg.get("model_type") != model_type:
        raise FormatError(
            f"{cfg_path}: model_type={cfg.get('model_type')!r}, expected {model_type!r}"
        )
    return cfg, cfg_path


def decoder_hf_config(
    cfg: Mapping[str, Any],
    sizes: Mapping[str, Any],
    *,
    max_positions: Any,
    rms_norm_eps: Any,
    rope_theta: Any,
    pad_default: int | None = None,
    **switches: Any,
) -> dict[str, Any]:
    """Keywords of a transformers Llama / Qwen2 config (SiLU MLP, RMS norm, default rope) for
    a release's config.json `cfg`: `sizes` the dimensions under transformers' names,
    `switches` the architecture's own flags; special ids as the release gives them (pad:
    `pad_default` when it is silent)."""
    return {
        **{name: int(value) for name, value in sizes.items()},
        "hidden_act": "silu",
        "max_position_embeddings": int(max_positions),
        "rms_norm_eps": float(rms_norm_eps),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(rope_theta)},
        **switches,
        "pad_token_id": cfg.get("pad_token_id", pad_default),
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
    }


def release_info(
    name: str, folder: Path, mask_id: int, eos_id: Any, pad_id: Any, shift: bool, length: int
) -> dict[str, Any]:
    """The `unmask_format` record of a released decoder's weights (its own tokenizer folder,
    no time conditioning, no EMA)."""
    return {
        "format": name,
        "source": str(folder),
        "mask_id": mask_id,
        "eos_id": eos_id,
        "pad_id": pad_id,
        "shift": shift,
        "time_conditioning": False,
        "tokenizer": str(folder),
        "length": length,
        "ema": "released weights",
    }


def require(config: Mapping[str, Any], keys: Sequence[str], source: Path | str) -> None:
    missing = [k for k in keys if k not in config]
    if missing:
        raise FormatError(f"{source}: config field(s) {missing} missing")


def read_safetensors(paths: Sequence[Path]) -> dict[str, tuple[Tensor, str]]:
    """{key: (tensor, file)} over one or more safetensors shards; a cut file is an error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, tuple[Tensor, str]] = {}
    for path in paths:
        if not path.is_file():
            raise FormatError(f"{path} not found")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise FormatError(f"cannot read {path} (truncated or corrupt safetensors): {e}") from e
        for key, t in tensors.items():
            if key in out:
                raise FormatError(f"{key} appears in both {out[key][1]} and {path}")
            out[key] = (t, str(path))
    return out


def safetensors_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards its index names."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not names:
            raise FormatError(f"{index} has an empty weight_map")
        return [folder / n for n in names]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise FormatError(f"{folder}: no model.safetensors (or index) found")
    return found


def strict_match(
    expected: Mapping[str, torch.Size | Sequence[int]],
    found: Mapping[str, tuple[Tensor, str]],
    source: str,
) -> dict[str, Tensor]:
    """{name: tensor} when `found` has exactly the `expected` names and shapes; else an error
    naming the missing, unexpected or wrongly shaped key and the file it came from."""
    missing = [k for k in expected if k not in found]
    if missing:
        raise FormatError(
            f"{source}: tensor {missing[0]!r} is missing"
            + (f" (and {len(missing) - 1} more: {missing[1:4]})" if len(missing) > 1 else "")
        )
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        file = found[unexpected[0]][1]
        raise FormatError(
            f"{file}: unexpected tensor {unexpected[0]!r}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + " - not part of this format's layout"
        )
    out = {}
    for key, shape in expected.items():
        tensor, file = found[key]
        if tuple(tensor.shape) != tuple(shape):
            raise FormatError(
                f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
            )
        out[key] = tensor
    return out


def compose_config(overrides: Sequence[str]) -> dict[str, Any]:
    """Our root config composed with `overrides` and resolved to plain containers (as a
    training run would save it), inside or outside a running Hydra app."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    try:
        from diffusion.config import register_resolvers
    except ImportError:  # before the config module moved
        from diffusion.config import register_resolvers
    register_resolvers()
    overrides = list(overrides)
    try:
        if GlobalHydra.instance().is_initialized():  # called from within main.py
            cfg = hydra.compose(config_name="config", overrides=overrides)
            return OmegaConf.to_container(cfg, resolve=True)
        with hydra.initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = hydra.compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except Exception as e:  # Hydra's composition errors
        raise FormatError(f"cannot compose the converted model's config {overrides}: {e}") from e
    previous = HydraConfig.instance().cfg
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = os.getcwd()
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        return OmegaConf.to_container(cfg, resolve=True)
    finally:
        HydraConfig.instance().cfg = previous


def make_checkpoint(
    config_overrides: Sequence[str],
    weights: Mapping[str, Tensor],
    info: dict[str, Any],
    raw: Mapping[str, Tensor] | None = None,
    ema_updates: int = 0,
    patch: Mapping[str, Any] | None = None,
    extra_state: Mapping[str, Tensor] | None = None,
) -> dict[str, Any]:
    """One of our .ckpt dicts: `weights` (the EMA or released weights) as the EMA copy the
    evaluation modes use, `raw` (default: the same) as the training weights. `patch` sets
    dotted keys after composition (values the override grammar cannot carry, e.g. a dict);
    `extra_state` adds module state outside the backbone (an objective's buffers)."""
    config = compose_config(config_overrides)
    for dotted, value in (patch or {}).items():
        node = config
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    raw = weights if raw is None else raw
    if float(config["training"]["ema"]) > 0:
        state: dict[str, Tensor] = {f"backbone.{k}": v for k, v in raw.items()}
        state.update({f"ema.module.{k}": v for k, v in weights.items()})
        state["ema.n_averaged"] = torch.tensor(int(ema_updates), dtype=torch.long)
    else:  # no EMA in the module: its only weights are the ones evaluation uses
        state = {f"backbone.{k}": v for k, v in weights.items()}
    state.update(extra_state or {})
    return {
        "state_dict": state,
        "unmask_config": config,
        "unmask_format": dict(info, overrides=list(config_overrides)),
    }
