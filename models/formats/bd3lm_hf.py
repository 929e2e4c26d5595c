"""BD3-LM's Hugging Face releases (kuleshov-group/bd3lm-owt-block_size4 / 8 / 16 and the
MDLM-style `-block_size1024-pretrain`): config.json + model.safetensors.

config.json (`model_type: bd3lm`) carries block_size, vocab_size (50258: GPT-2 + [MASK]),
model_length, hidden_dim, cond_dim, n_blocks, n_heads, dropout, time_conditioning and the
switches of its DiT (`adaln`, `cross_attn`, `causal`, `attn_backend`); with `var_min` the
weights file also holds the learned clipping of the training mask rates as two scalars,
`sampling_eps_min` / `sampling_eps_max`. The weights sit under `backbone.` in MDLM's DiT
layout (BD3-LM's DiT is MDLM's, trained on x_t + x_0 under the block-causal mask), which
`models.mdlm_dit.MDLMDiT` (`backbone=hf_dit`) holds name for name. The released weights are
the EMA weights (BD3-LM's push_to_hf.py copies the EMA shadow into the model before pushing).

The release is rebuilt as `parameterization=bd3lm` at its block size on `backbone=hf_dit`:
ppl_eval scores its NELBO over the full schedule (as BD3-LM's validation does), sampler=block
decodes it with the exact KV cache. `attn_backend` is a run setting (flex on CUDA, else
SDPA), not a property of the weights; `parameterization.attn_backend` chooses ours. The data
rows are BD3-LM's for OpenWebText: its train_owt_bd3lm.sh and ppl_owt_bd3lm.sh cut them with
`data.insert_*_special=False`, i.e. without MDLM's [BOS]/[EOS] bookends
(`data.layout.special_tokens=false`), EOS still after each document.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.formats.common import (
    FormatError,
    make_checkpoint,
    read_json,
    read_release_config,
    require,
)
from models.formats.mdlm_hf import data_overrides, model_overrides, read_backbone

NAME = "bd3lm_hf"
CONFIG_FIELDS = (
    "block_size",
    "vocab_size",
    "model_length",
    "hidden_dim",
    "cond_dim",
    "n_blocks",
    "n_heads",
)
CLIP_KEYS = ("sampling_eps_min", "sampling_eps_max")
UNCLIPPED = (1e-3, 1.0)  # BD3-LM's full interval: its NELBO, no clipping
# switch: the value every BD3-LM release has (another one is a different architecture)
RELEASE_SWITCHES = {"adaln": True, "cross_attn": True, "causal": False, "time_conditioning": False}


def objective_overrides(block: int, var_min: bool) -> list[str]:
    """BD3-LM at `block` on our side: the objective, its sampler, continuous time, no
    conditioning (what every BD3-LM checkpoint is)."""
    return [
        "parameterization=bd3lm",
        f"parameterization.block_size={block}",
        f"parameterization.var_min={str(var_min).lower()}",
        "sampler=block",
        "T=0",
        "time_conditioning=false",
    ]


def clip_setup(clip: tuple[float, float], source: str) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(noise overrides, module state) for BD3-LM's learned interval of training mask rates:
    `noise=clipped` at [min, max] and the objective's `clip` buffer as ours saves it, or the
    loglinear schedule and [0, 0] (unclipped) for BD3-LM's full interval (1e-3, 1)."""
    if not 0.0 <= clip[0] < clip[1] <= 1.0:
        raise FormatError(
            f"{source}: sampling_eps_min={clip[0]}, sampling_eps_max={clip[1]} are not an "
            "interval of mask rates in [0, 1]"
        )
    clipped = abs(clip[0] - UNCLIPPED[0]) > 1e-9 or abs(clip[1] - UNCLIPPED[1]) > 1e-9
    noise = ["noise=clipped", f"noise.beta={clip[0]}", f"noise.omega={clip[1]}"]
    buffer = torch.tensor(clip if clipped else (0.0, 0.0), dtype=torch.float64)
    return (noise if clipped else ["noise=loglinear"]), {"objective.clip": buffer}


def detect(folder: Path) -> bool:
    cfg = folder / "config.json"
    return cfg.is_file() and read_json(cfg).get("model_type") == "bd3lm"


def load(folder: Path, use_ema: bool = True, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Our checkpoint dict from a local copy of a BD3-LM HF release (`use_ema` is moot: the
    release holds one set of weights, the EMA)."""
    cfg, cfg_path = read_release_config(folder, "bd3lm")
    require(cfg, CONFIG_FIELDS, cfg_path)
    for key, want in RELEASE_SWITCHES.items():
        if bool(cfg.get(key, want)) != want:
            raise FormatError(
                f"{cfg_path}: {key}={cfg[key]!r}; every BD3-LM release has {key}={want} and "
                "unmask rebuilds only that architecture"
            )
    V, C, N, H = (int(cfg[k]) for k in ("vocab_size", "hidden_dim", "n_blocks", "n_heads"))
    cond, length, block = int(cfg["cond_dim"]), int(cfg["model_length"]), int(cfg["block_size"])
    if block < 1 or length % block:
        raise FormatError(
            f"{cfg_path}: block_size={block} must be >= 1 and divide model_length={length}"
        )
    var_min = bool(cfg.get("var_min", True))
    extra = {key: () for key in CLIP_KEYS} if var_min else {}
    weights, scalars = read_backbone(folder, V, C, N, H, cond, length, extra)
    clip = tuple(float(scalars[k]) for k in CLIP_KEYS) if var_min else UNCLIPPED
    noise, state = clip_setup(clip, str(folder))
    data, tokenizer, mask_id = data_overrides(V, str(cfg_path))
    config_overrides = [
        "backbone=hf_dit",
        *objective_overrides(block, var_min),
        *noise,
        "training.ema=0.9999",
        *model_overrides(C, N, H, cond, length, float(cfg.get("dropout", 0.1)), f"bd3lm{block}"),
        *data,
        "++data.layout.special_tokens=false",  # BD3-LM's OWT rows: no [BOS]/[EOS] bookends
        *overrides,
    ]
    info = {
        "format": NAME,
        "source": str(folder),
        "mask_id": mask_id,
        "shift": False,
        "time_conditioning": False,
        "tokenizer": tokenizer,
        "length": length,
        "block_size": block,
        "clip": list(clip),
        "ema": "released weights (EMA)",
    }
    return make_checkpoint(config_overrides, weights, info, extra_state=state)
