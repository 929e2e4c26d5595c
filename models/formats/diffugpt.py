"""DiffuGPT (diffusionfamily/diffugpt-s, -m) and DiffuLLaMA: `DiscreteDiffusionModel` safetensors.

HKUNLP/DiffuLLaMA wraps a causal LM as `embed_tokens` (the input embedding), `denoise_model`
(the transformer body with its own embedding deleted: GPT-2's `transformer.*` less `wte`,
LLaMA's `model.*` less `embed_tokens`) and `lm_head`; GPT-2's head is tied to the embedding, so
safetensors' `save_model` keeps one of the two names. config.json is the base model's own
(`model_type: gpt2` / `llama`). Conventions from their code: shift on (position i predicts
token i from position i - 1; position 0 keeps its input token), mask id 10541 for DiffuGPT-s
(an existing GPT-2 token), len(tokenizer) = 50257 for DiffuGPT-m (its vocabulary resized to
50258), 811 for DiffuLLaMA with pad 30399. Weights load onto transformers' GPT2LMHeadModel /
LlamaForCausalLM made bidirectional (models/bidirectional_lm.py).

DiffuLLaMA's own release (diffusionfamily/diffullama) is not wrapped: DiffuLLaMA-training
saves its patched LlamaForCausalLM with `save_pretrained` and inf_diffullama.py loads it with
`LlamaForCausalLM.from_pretrained` (keys `model.embed_tokens`, `model.layers.N.*`,
`model.norm`, `lm_head`; sharded with an index). That layout is also read here; as an
autoregressive Llama's files look the same, it is detected only when the path names
diffullama (a local folder so named, or the hub cache's models--diffusionfamily--diffullama),
else named with eval.checkpoint_format=diffugpt.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from models.formats.common import (
    FormatError,
    make_checkpoint,
    read_json,
    read_safetensors,
    require,
    safetensors_files,
    strict_match,
)
from models.formats.hf_decoder import decoder_layout, decoder_overrides

NAME = "diffugpt"
GPT2_MASK_S, LLAMA_MASK, LLAMA_PAD = 10541, 811, 30399
# buffers older transformers saved: masks and rotary tables, not weights
BUFFERS = re.compile(
    r"^(denoise_model|transformer|model)\.(h\.\d+\.attn\.(bias|masked_bias)|.*rotary_emb\.inv_freq)$"
)
WRAPPED_EMB = "embed_tokens.weight"  # DiscreteDiffusionModel's input embedding
PLAIN_EMB = {"gpt2": "transformer.wte.weight", "llama": "model.embed_tokens.weight"}


def _keys(folder: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for file in safetensors_files(folder):
        with safe_open(str(file), "pt") as f:
            keys |= set(f.keys())
    return keys


def detect(path: Path) -> bool:
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return False
    arch = read_json(cfg).get("model_type")
    if arch not in ("gpt2", "llama"):
        return False
    if arch == "llama" and names_diffullama(path):  # its release: load() names what is wrong
        return True
    try:
        keys = _keys(path)
    except Exception:  # no weights or unreadable: not ours to claim
        return False
    return WRAPPED_EMB in keys and any(k.startswith("denoise_model.") for k in keys)


def names_diffullama(path: Path) -> bool:
    """The folder is named for DiffuLLaMA, or is a snapshot in the hub cache of such a repo."""
    path = path.resolve()
    hub_repo = path.parent.parent.name if path.parent.name == "snapshots" else ""
    return any("diffullama" in name.lower() for name in (path.name, hub_repo))


def gpt2_config(cfg: dict[str, Any], vocab: int, source: Path) -> dict[str, Any]:
    require(cfg, ("n_embd", "n_layer", "n_head", "n_positions"), source)
    return {
        "vocab_size": vocab,
        "n_positions": int(cfg["n_positions"]),
        "n_embd": int(cfg["n_embd"]),
        "n_layer": int(cfg["n_layer"]),
        "n_head": int(cfg["n_head"]),
        "n_inner": cfg.get("n_inner"),
        "activation_function": cfg.get("activation_function", "gelu_new"),
        "layer_norm_epsilon": float(cfg.get("layer_norm_epsilon", 1e-5)),
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": True,
        "bos_token_id": cfg.get("bos_token_id", 50256),
        "eos_token_id": cfg.get("eos_token_id", 50256),
        # scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn: GPT-2's defaults (off)
        "scale_attn_by_inverse_layer_idx": bool(cfg.get("scale_attn_by_inverse_layer_idx", False)),
    }


def llama_config(cfg: dict[str, Any], vocab: int, source: Path) -> dict[str, Any]:
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    require(cfg, fields, source)
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e4)
    return {
        "vocab_size": vocab,
        "hidden_size": int(cfg["hidden_size"]),
        "intermediate_size": int(cfg["intermediate_size"]),
        "num_hidden_layers": int(cfg["num_hidden_layers"]),
        "num_attention_heads": int(cfg["num_attention_heads"]),
        "num_key_value_heads": int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        "hidden_act": cfg.get("hidden_act", "silu"),
        "max_position_embeddings": int(cfg.get("max_position_embeddings", 4096)),
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-5)),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(theta)},
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "attention_bias": bool(cfg.get("attention_bias", False)),
        "mlp_bias": bool(cfg.get("mlp_bias", False)),
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
    }


def rename(key: str, arch: str) -> str:
    """DiffuGPT/DiffuLLaMA name (DiscreteDiffusionModel's, or the plain causal LM's) -> our
    BidirectionalLM state_dict name."""
    body = "transformer" if arch == "gpt2" else "model"
    if key.startswith(body + "."):  # the plain layout: the causal LM's own names
        return "model." + key
    if key == "embed_tokens.weight":
        return f"model.{body}.{'wte' if arch == 'gpt2' else 'embed_tokens'}.weight"
    if key == "lm_head.weight":
        return "model.lm_head.weight"
    if key.startswith("denoise_model."):
        return f"model.{body}." + key.removeprefix("denoise_model.")
    return "unexpected:" + key


def load(folder: Path, use_ema: bool = True, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    cfg_path = folder / "config.json"
    cfg = read_json(cfg_path)
    arch = cfg.get("model_type")
    if arch not in ("gpt2", "llama"):
        raise FormatError(f"{cfg_path}: model_type={arch!r}; DiffuGPT is gpt2, DiffuLLaMA llama")
    raw = read_safetensors(safetensors_files(folder))
    raw = {k: v for k, v in raw.items() if not BUFFERS.match(k)}
    wrapped = any(k.startswith("denoise_model.") for k in raw)
    emb_key = WRAPPED_EMB if wrapped else PLAIN_EMB[arch]
    emb = raw.get(emb_key)
    if emb is None:
        raise FormatError(f"{folder}: tensor {emb_key!r} is missing")
    vocab = int(emb[0].shape[0])
    hf = gpt2_config(cfg, vocab, cfg_path) if arch == "gpt2" else llama_config(cfg, vocab, cfg_path)
    found: dict[str, Any] = {}
    for key, value in raw.items():
        target = rename(key, arch)
        if target in found:  # both layouts at once: two names for one tensor
            raise FormatError(f"{value[1]}: tensor {key!r} duplicates another name for {target}")
        found[target] = value
    expected = decoder_layout(arch, hf)
    tied = hf["tie_word_embeddings"]
    emb_name = rename(emb_key, arch)
    if tied and "model.lm_head.weight" not in found:  # save_model kept one name of the pair
        expected.pop("model.lm_head.weight")
    tensors = dict(strict_match(expected, found, str(folder)))
    if tied:
        head = tensors.pop("model.lm_head.weight", None)
        if head is not None and not bool((head == tensors[emb_name]).all()):
            raise FormatError(f"{folder}: lm_head.weight differs from {emb_key} (tied)")
        tensors["model.lm_head.weight"] = tensors[emb_name]
    if arch == "gpt2":
        mask_id, pad_id = (GPT2_MASK_S if vocab == 50257 else vocab - 1), None
        variant = "diffugpt-s" if vocab == 50257 else "diffugpt-m"
        length = int(hf["n_positions"])
    else:
        mask_id, pad_id, variant = LLAMA_MASK, LLAMA_PAD, "diffullama"
        length = min(int(hf["max_position_embeddings"]), 2048)
    config_overrides, patch = decoder_overrides(
        arch, hf, str(folder), length, shift=True, mask_id=mask_id, pad_id=pad_id
    )
    config_overrides.append("backbone.shift_first=copy")
    info = {
        "format": NAME,
        "variant": variant,
        "layout": "DiscreteDiffusionModel" if wrapped else "plain causal LM",
        "source": str(folder),
        "mask_id": mask_id,
        "pad_id": pad_id,
        "shift": True,
        "time_conditioning": False,
        "tokenizer": str(folder),
        "length": length,
        "ema": "released weights",
    }
    return make_checkpoint([*config_overrides, *overrides], tensors, info, patch=patch)
