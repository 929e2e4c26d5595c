"""Dream-v0-Base/Instruct-7B (Dream-org): a Qwen2 decoder made bidirectional, logits shifted.

config.json (`model_type: Dream`, for trust_remote_code, which we never use) carries Qwen2's
fields (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
num_key_value_heads, vocab_size 152064, rope_theta, rms_norm_eps, max_position_embeddings,
tie_word_embeddings) and mask_token_id 151666, pad/bos/eos ids. The sharded safetensors use
Qwen2's own names (model.embed_tokens, model.layers.N.self_attn.{q,k,v}_proj with biases,
o_proj, mlp.{gate,up,down}_proj, input/post_attention_layernorm, model.norm, lm_head), so they
load onto `Qwen2ForCausalLM` unrenamed. Dream reads the logits shifted by one position
(`logits[:, i]` is the output at i - 1, position 0 its own): `backbone.shift=true`.
"""

from __future__ import annotations

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

NAME = "dream"
MASK, PAD = 151666, 151643  # DreamConfig's mask_token_id / pad_token_id (pad = <|endoftext|>)
FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size",
)  # fmt: skip


def detect(path: Path) -> bool:
    cfg = path / "config.json"
    return path.is_dir() and cfg.is_file() and read_json(cfg).get("model_type") == "Dream"


def hf_config(cfg: dict[str, Any], source: Path) -> dict[str, Any]:
    """Dream's config as transformers.Qwen2Config keywords."""
    require(cfg, FIELDS, source)
    if cfg.get("hidden_act", "silu") != "silu":
        raise FormatError(f"{source}: hidden_act={cfg['hidden_act']!r}; Qwen2 uses silu")
    if cfg.get("use_sliding_window"):
        raise FormatError(f"{source}: use_sliding_window=true is not mapped (Dream: false)")
    # DreamConfig's defaults where config.json is silent: rope_theta 10000, pad 151643
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e4)
    sizes = {name: cfg[name] for name in FIELDS}  # the same names in transformers
    return decoder_hf_config(
        cfg,
        sizes,
        max_positions=cfg.get("max_position_embeddings", 32768),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        pad_default=PAD,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        use_sliding_window=False,
    )


def load(folder: Path, use_ema: bool = True, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    cfg, cfg_path = read_release_config(folder, "Dream")
    hf = hf_config(cfg, cfg_path)
    raw = read_safetensors(safetensors_files(folder))
    expected = decoder_layout("qwen2", hf)
    if hf["tie_word_embeddings"] and "lm_head.weight" not in raw:  # tied: the head is the embedding
        expected.pop("model.lm_head.weight", None)
    found = {"model." + k: v for k, v in raw.items()}
    tensors = dict(strict_match(expected, found, str(folder)))
    if hf["tie_word_embeddings"] and "model.lm_head.weight" not in tensors:
        tensors["model.lm_head.weight"] = tensors["model.model.embed_tokens.weight"]
    length = min(int(hf["max_position_embeddings"]), 2048)
    mask_id, pad = int(cfg.get("mask_token_id", MASK)), cfg.get("pad_token_id", PAD)
    config_overrides, patch = decoder_overrides(
        "qwen2", hf, str(folder), length, shift=True, mask_id=mask_id, pad_id=pad
    )
    info = release_info(NAME, folder, mask_id, cfg.get("eos_token_id"), pad, True, length)
    return make_checkpoint([*config_overrides, *overrides], tensors, info, patch=patch)
