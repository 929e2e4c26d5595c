"""LLaDA-8B-Base / -Instruct (GSAI-ML): OLMo-style `LLaDAModelLM` safetensors onto transformers' Llama.

config.json (`model_type: llada`, for trust_remote_code, which we never use): d_model, n_heads,
n_kv_heads, n_layers, mlp_hidden_size, embedding_size (126464), rope_theta, rms_norm_eps,
max_sequence_length, mask_token_id 126336, eos/pad ids; block_type llama, RMS norms, SiLU
gated MLP, no bias, untied head, rope. Keys (sharded safetensors + index) and their names on
`LlamaForCausalLM` (models/bidirectional_lm.py, bidirectional):

    model.transformer.wte.weight                 -> model.embed_tokens.weight
    model.transformer.blocks.N.q_proj/k_proj/v_proj  -> model.layers.N.self_attn.{q,k,v}_proj
    model.transformer.blocks.N.attn_out          -> model.layers.N.self_attn.o_proj
    model.transformer.blocks.N.ff_proj (gate, SiLU) -> model.layers.N.mlp.gate_proj
    model.transformer.blocks.N.up_proj           -> model.layers.N.mlp.up_proj
    model.transformer.blocks.N.ff_out            -> model.layers.N.mlp.down_proj
    model.transformer.blocks.N.attn_norm / ff_norm -> input_layernorm / post_attention_layernorm
    model.transformer.ln_f                       -> model.norm
    model.transformer.ff_out                     -> lm_head

LLaDA's rotary is the rotate-half one of Llama (no q/k permutation), logits are not shifted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from models.formats.common import (
    FormatError,
    decoder_hf_config,
    make_checkpoint,
    read_json,
    read_release_config,
    read_safetensors,
    release_info,
    require,
    safetensors_files,
    strict_match,
)
from models.formats.hf_decoder import decoder_layout, decoder_overrides

NAME = "llada"
FIELDS = ("d_model", "n_heads", "n_layers", "mlp_hidden_size", "vocab_size", "rope_theta")
# config values this mapping assumes: anything else is another architecture
ASSUMED = {
    "block_type": "llama",
    "layer_norm_type": "rms",
    "activation_type": "silu",
    "weight_tying": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "rope": True,
    "alibi": False,
    "input_emb_norm": False,
    "scale_logits": False,
    "block_group_size": 1,
}
RENAMES = [
    (r"^model\.transformer\.wte\.weight$", "model.embed_tokens.weight"),
    (r"^model\.transformer\.ln_f\.weight$", "model.norm.weight"),
    (r"^model\.transformer\.ff_out\.weight$", "lm_head.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.q_proj\.", r"model.layers.\1.self_attn.q_proj."),
    (r"^model\.transformer\.blocks\.(\d+)\.k_proj\.", r"model.layers.\1.self_attn.k_proj."),
    (r"^model\.transformer\.blocks\.(\d+)\.v_proj\.", r"model.layers.\1.self_attn.v_proj."),
    (r"^model\.transformer\.blocks\.(\d+)\.attn_out\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.", r"model.layers.\1.mlp.gate_proj."),
    (r"^model\.transformer\.blocks\.(\d+)\.up_proj\.", r"model.layers.\1.mlp.up_proj."),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_out\.", r"model.layers.\1.mlp.down_proj."),
    (r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (
        r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.",
        r"model.layers.\1.post_attention_layernorm.",
    ),
]


def detect(path: Path) -> bool:
    cfg = path / "config.json"
    return path.is_dir() and cfg.is_file() and read_json(cfg).get("model_type") == "llada"


def rename(key: str) -> str | None:
    for pattern, target in RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, target, key)
    return None


def hf_config(cfg: dict[str, Any], source: Path) -> dict[str, Any]:
    """LLaDA's config as transformers.LlamaConfig keywords."""
    require(cfg, FIELDS, source)
    for key, want in ASSUMED.items():
        if key in cfg and cfg[key] != want:
            raise FormatError(f"{source}: {key}={cfg[key]!r}; this converter maps {key}={want!r}")
    sizes = {
        "vocab_size": cfg.get("embedding_size") or cfg["vocab_size"],
        "hidden_size": cfg["d_model"],
        "intermediate_size": cfg["mlp_hidden_size"],
        "num_hidden_layers": cfg["n_layers"],
        "num_attention_heads": cfg["n_heads"],
        "num_key_value_heads": cfg.get("n_kv_heads") or cfg["n_heads"],
    }
    return decoder_hf_config(
        cfg,
        sizes,
        max_positions=cfg.get("max_sequence_length", 4096),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=cfg["rope_theta"],
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )


def load(folder: Path, use_ema: bool = True, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    cfg, cfg_path = read_release_config(folder, "llada")
    hf = hf_config(cfg, cfg_path)
    raw = read_safetensors(safetensors_files(folder))
    found = {}
    for key, value in raw.items():
        target = rename(key)
        if target is None:
            raise FormatError(f"{value[1]}: unexpected tensor {key!r} - not part of LLaDA's layout")
        found["model." + target] = value
    tensors = strict_match(decoder_layout("llama", hf), found, str(folder))
    mask_id = int(cfg.get("mask_token_id", 126336))
    length = min(int(hf["max_position_embeddings"]), 4096)
    pad = cfg.get("pad_token_id")
    config_overrides, patch = decoder_overrides(
        "llama", hf, str(folder), length, shift=False, mask_id=mask_id, pad_id=pad
    )
    info = release_info(NAME, folder, mask_id, cfg.get("eos_token_id"), pad, False, length)
    return make_checkpoint([*config_overrides, *overrides], dict(tensors), info, patch=patch)
