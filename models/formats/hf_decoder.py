"""Shared by the LLaDA and Dream converters: the expected layout of our bidirectional
Llama/Qwen2 backbone (models/bidirectional_lm.py) and the config that rebuilds it offline."""

from __future__ import annotations

from typing import Any

import torch


def decoder_layout(arch: str, hf_config: dict[str, Any]) -> dict[str, torch.Size]:
    """{name: shape} of `BidirectionalLM(arch, hf_config)` (names as its state_dict has them:
    `model.model.layers.N...`, `model.lm_head.weight`), built on the meta device."""
    from models.bidirectional_lm import BidirectionalLM

    with torch.device("meta"):
        model = BidirectionalLM(int(hf_config["vocab_size"]), arch, hf_config)
    return {k: v.shape for k, v in model.state_dict().items()}


def decoder_overrides(
    arch: str,
    hf_config: dict[str, Any],
    tokenizer: str,
    length: int,
    shift: bool,
    mask_id: int | None = None,
    pad_id: int | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """(Hydra overrides, values set after composition) for a converted LLaDA/Dream checkpoint.
    The HF config dict goes in as a value (not through the override grammar)."""
    width = hf_config.get("hidden_size", hf_config.get("n_embd"))
    layers = hf_config.get("num_hidden_layers", hf_config.get("n_layer"))
    heads = hf_config.get("num_attention_heads", hf_config.get("n_head"))
    overrides = [
        "backbone=bidirectional_lm",
        "parameterization=subs",
        "noise=loglinear",
        "T=0",
        "time_conditioning=false",
        "parameterization.mask_conditioning=false",
        "training.ema=0",  # billions of parameters: no EMA copy (the release is one set)
        "model=small",
        f"model.name={arch}-{width}x{layers}",
        f"model.hidden_size={width}",
        f"model.n_blocks={layers}",
        f"model.n_heads={heads}",
        f"model.length={length}",
        "model.dropout=0.0",
        f"backbone.arch={arch}",
        f"backbone.shift={str(shift).lower()}",
        "data=openwebtext",  # a corpus for ppl_eval; lm-eval and generate read only the tokenizer
    ]
    if mask_id is not None and pad_id is not None and int(mask_id) == int(pad_id):
        from models.formats.common import FormatError

        raise FormatError(  # LLaDA's generate.py refuses it too: padding would read as masked
            f"{tokenizer}: pad_token_id equals mask_token_id ({mask_id}); padding would be "
            "taken for [MASK] - fix the config.json"
        )
    spec: Any = tokenizer
    if mask_id is not None:  # the release's own [MASK] (and pad) ids, whatever its files declare
        spec = {
            "_target_": "diffusion.data.release_tokenizer.ReleaseTokenizer",
            "name": tokenizer,
            "mask_token_id": int(mask_id),
            "pad_token_id": None if pad_id is None else int(pad_id),
        }
    patch = {"backbone.hf_config": dict(hf_config), "data.tokenizer": spec}
    return overrides, patch
