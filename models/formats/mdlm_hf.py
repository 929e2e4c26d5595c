"""MDLM's Hugging Face release (kuleshov-group/mdlm-owt): config.json + model.safetensors.

config.json (`model_type: mdlm`) carries vocab_size (50258: GPT-2 + [MASK] 50257),
model_length, hidden_dim, cond_dim, n_blocks, n_heads, dropout and time_conditioning; the
weights sit under `backbone.` in MDLM's DiT layout, which `models.mdlm_dit.MDLMDiT`
(`backbone=hf_dit`) holds name for name. The released weights are the EMA weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from models.formats.common import (
    FormatError,
    make_checkpoint,
    read_json,
    read_safetensors,
    require,
    safetensors_files,
    strict_match,
)

NAME = "mdlm_hf"
CONFIG_FIELDS = ("vocab_size", "model_length", "hidden_dim", "cond_dim", "n_blocks", "n_heads")
# tokenizer by vocabulary size: our data option, its [MASK] id
KNOWN_VOCABS = {50258: ("openwebtext", "gpt2", 50257), 30522: ("lm1b", "bert-base-uncased", 103)}


def detect(folder: Path) -> bool:
    cfg = folder / "config.json"
    return cfg.is_file() and read_json(cfg).get("model_type") in ("mdlm",)


def dit_layout(
    vocab_size: int, hidden: int, blocks: int, heads: int, cond_dim: int, length: int, causal: bool
) -> dict[str, torch.Size]:
    """{name: shape} of MDLM's DiT (or AR DDIT) at these sizes, without allocating it."""
    from models.mdlm_dit import MDLMDiT

    with torch.device("meta"):
        model = MDLMDiT(vocab_size, hidden, blocks, heads, cond_dim, length, causal=causal)
    return {k: v.shape for k, v in model.state_dict().items()}


def check_inv_freq(tensor: torch.Tensor, head_dim: int, where: str) -> None:
    """MDLM saves its rotary `inv_freq` buffer; it must be the standard base-10 000 table."""
    want = 1.0 / (10_000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    if tensor.shape != want.shape or not torch.allclose(tensor.float(), want, rtol=1e-5):
        raise FormatError(
            f"{where}: rotary_emb.inv_freq is not the base-10000 table of head_dim {head_dim}"
        )


def read_backbone(
    folder: Path,
    vocab_size: int,
    hidden: int,
    blocks: int,
    heads: int,
    cond_dim: int,
    length: int,
    extra: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(`backbone.*` weights without the prefix, the `extra` top-level tensors) of a Hugging
    Face release of MDLM's DiT (MDLM's, BD3-LM's), matched strictly against the layout at
    these sizes; a saved rotary `inv_freq` must be the standard table."""
    found = read_safetensors(safetensors_files(folder))
    inv = found.pop("backbone.rotary_emb.inv_freq", None)
    if inv is not None:
        check_inv_freq(inv[0], hidden // heads, inv[1])
    layout = dit_layout(vocab_size, hidden, blocks, heads, cond_dim, length, False)
    extra = dict(extra or {})
    expected = {f"backbone.{k}": s for k, s in layout.items()} | extra
    tensors = strict_match(expected, found, str(folder))
    extras = {k: tensors.pop(k) for k in extra}
    return {k.removeprefix("backbone."): v for k, v in tensors.items()}, extras


def data_overrides(vocab_size: int, source: str) -> tuple[list[str], str, int]:
    if vocab_size not in KNOWN_VOCABS:
        raise FormatError(
            f"{source}: vocab_size={vocab_size} matches no tokenizer MDLM released with "
            f"(known: {sorted(KNOWN_VOCABS)}); pass the data option explicitly"
        )
    data, tokenizer, mask_id = KNOWN_VOCABS[vocab_size]
    return [f"data={data}"], tokenizer, mask_id


def model_overrides(
    hidden: int,
    blocks: int,
    heads: int,
    cond_dim: int,
    length: int,
    dropout: float,
    family: str = "mdlm",
) -> list[str]:
    return [
        "model=small",
        f"model.name={family}-{hidden}x{blocks}",
        f"model.hidden_size={hidden}",
        f"model.n_blocks={blocks}",
        f"model.n_heads={heads}",
        f"model.cond_dim={cond_dim}",
        f"model.length={length}",
        f"model.dropout={dropout}",
    ]


def load(folder: Path, use_ema: bool = True, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Our checkpoint dict from a local copy of MDLM's HF release (`use_ema` is moot: the
    release holds one set of weights, the EMA)."""
    cfg_path = folder / "config.json"
    cfg = read_json(cfg_path)
    require(cfg, CONFIG_FIELDS, cfg_path)
    if cfg.get("model_type") != "mdlm":
        raise FormatError(f"{cfg_path}: model_type={cfg.get('model_type')!r}, expected 'mdlm'")
    V, C, N, H = (int(cfg[k]) for k in ("vocab_size", "hidden_dim", "n_blocks", "n_heads"))
    cond, length = int(cfg["cond_dim"]), int(cfg["model_length"])
    tc = bool(cfg.get("time_conditioning", False))
    weights, _ = read_backbone(folder, V, C, N, H, cond, length)
    data, tokenizer, mask_id = data_overrides(V, str(cfg_path))
    config_overrides = [
        "backbone=hf_dit",
        "parameterization=subs",
        "noise=loglinear",
        "T=0",
        f"time_conditioning={str(tc).lower()}",
        "parameterization.mask_conditioning=false",  # MDLM embeds sigma = 0, no mask statistic
        "training.ema=0.9999",
        *model_overrides(C, N, H, cond, length, float(cfg.get("dropout", 0.1))),
        *data,
        *overrides,
    ]
    info = {
        "format": NAME,
        "source": str(folder),
        "mask_id": mask_id,
        "shift": False,
        "time_conditioning": tc,
        "tokenizer": tokenizer,
        "length": length,
        "ema": "released weights (EMA)",
    }
    return make_checkpoint(config_overrides, weights, info)
