"""SMDM's released safetensors (e.g. mdm-170M-100e18.safetensors, nieshen/SMDM on the hub).

One unprefixed lit-gpt `TransEncoder` state dict (see models/smdm.py for the layout) and no
config: widths, depth and the MLP size are read from the tensors, the head count from SMDM's
named sizes (`Diff_LLaMA_<N>M` in its lit_gpt/config.py, all multi-head: query groups = heads),
matched by (layers, width, MLP size) or by the `mdm-<N>M` in the file name. Tokenizer:
TinyLlama's 32000 tokens, [MASK] = 32000 (the extra embedding row); no time conditioning.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from models.formats.common import FormatError, make_checkpoint, read_safetensors, strict_match

NAME = "smdm"
TOKENIZER = "TinyLlama/TinyLlama_v1.1"
MASK_ID = 32000
BLOCK_SIZE = 2048
# SMDM's scaling suite: size in M -> (n_layer, n_head, n_embd, intermediate_size)
SIZES: dict[int, tuple[int, int, int, int]] = {
    6: (6, 4, 256, 1024), 19: (8, 6, 384, 1536), 34: (8, 8, 512, 2048), 48: (9, 9, 576, 2304),
    66: (10, 10, 640, 2560), 85: (13, 10, 640, 2560), 75: (16, 8, 640, 1600),
    113: (12, 12, 768, 3072), 142: (15, 12, 768, 3072), 170: (18, 12, 768, 3072),
    180: (14, 14, 896, 3584), 206: (16, 14, 896, 3584), 231: (18, 14, 896, 3584),
    268: (16, 16, 1024, 4096), 302: (18, 16, 1024, 4096), 336: (20, 16, 1024, 4096),
    472: (18, 10, 1280, 5120), 551: (21, 10, 1280, 5120), 571: (18, 11, 1408, 5632),
    629: (24, 10, 1280, 5120), 666: (21, 11, 1408, 5632), 717: (19, 12, 1536, 6144),
    761: (24, 11, 1408, 5632), 831: (22, 12, 1536, 6144), 944: (25, 12, 1536, 6144),
    1028: (20, 14, 1792, 7168), 1233: (24, 14, 1792, 7168), 1476: (22, 16, 2048, 8192),
    1678: (25, 16, 2048, 8192), 2121: (28, 17, 2176, 8704),
}  # fmt: skip


def weights_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.safetensors"))
        return found[0] if len(found) == 1 else None
    return None


def detect(path: Path) -> bool:
    file = weights_file(path)
    if file is None:
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            keys = set(f.keys())
    except Exception:  # not a readable safetensors file: another format's business
        return False
    return "transformer.wte.weight" in keys and "lm_head.weight" in keys


def layout(vocab: int, C: int, N: int, H: int, hidden: int) -> dict[str, torch.Size]:
    from models.smdm import SMDMTransEncoder

    with torch.device("meta"):
        model = SMDMTransEncoder(vocab, C, N, H, hidden, BLOCK_SIZE)
    return {k: v.shape for k, v in model.state_dict().items()}


def heads(file: Path, n_layer: int, n_embd: int, hidden: int, overrides: tuple[str, ...]) -> int:
    """SMDM's head count for these sizes (the tensors cannot tell it: q, k, v are C wide)."""
    for o in overrides:
        if o.startswith("model.n_heads="):
            return int(o.split("=", 1)[1])
    named = re.search(r"(\d+)M", file.name)
    if named and int(named.group(1)) in SIZES:
        layers, h, width, mlp = SIZES[int(named.group(1))]
        if (layers, width, mlp) != (n_layer, n_embd, hidden):
            raise FormatError(
                f"{file}: named {named.group(1)}M but holds {n_layer} layers x {n_embd} "
                f"(MLP {hidden}); SMDM's {named.group(1)}M is {layers} x {width} (MLP {mlp})"
            )
        return h
    matches = {v[1] for v in SIZES.values() if (v[0], v[2], v[3]) == (n_layer, n_embd, hidden)}
    if len(matches) == 1:
        return matches.pop()
    raise FormatError(
        f"{file}: {n_layer} layers x {n_embd} (MLP {hidden}) is none of SMDM's named sizes; "
        "pass the head count with --override model.n_heads=H"
    )


def load(path: Path, use_ema: bool = True, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Our checkpoint dict from an SMDM safetensors file (`use_ema` is moot: one set of weights)."""
    file = weights_file(path)
    if file is None:
        raise FormatError(f"{path}: no single SMDM .safetensors file found")
    found = read_safetensors([file])
    wte = found.get("transformer.wte.weight")
    if wte is None:
        raise FormatError(f"{file}: tensor 'transformer.wte.weight' is missing")
    V, C = (int(s) for s in wte[0].shape)
    N = len({k.split(".")[2] for k in found if k.startswith("transformer.h.")})
    w1 = found.get("transformer.h.0.mlp.swiglu.w1.weight")
    if w1 is None:
        raise FormatError(f"{file}: tensor 'transformer.h.0.mlp.swiglu.w1.weight' is missing")
    hidden = int(w1[0].shape[0])
    H = heads(file, N, C, hidden, overrides)
    tensors = strict_match(layout(V, C, N, H, hidden), found, str(file))
    if V - 1 != MASK_ID:
        raise FormatError(
            f"{file}: transformer.wte.weight has {V} rows; SMDM's is 32001 (TinyLlama + [MASK])"
        )
    config_overrides = [
        "backbone=smdm",
        "parameterization=subs",
        "noise=loglinear",
        "T=0",
        "time_conditioning=false",
        "parameterization.mask_conditioning=false",
        "training.ema=0",
        "model=small",
        f"model.name=smdm-{C}x{N}",
        f"model.hidden_size={C}",
        f"model.n_blocks={N}",
        f"model.n_heads={H}",
        f"model.length={BLOCK_SIZE}",
        "model.dropout=0.0",
        f"backbone.intermediate_size={hidden}",
        "data=openwebtext",  # SMDM trained on SlimPajama; pass data=... to score another corpus
        f"data.tokenizer={TOKENIZER}",
        *(o for o in overrides if not o.startswith("model.n_heads=")),
    ]
    info = {
        "format": NAME,
        "source": str(file),
        "mask_id": MASK_ID,
        "shift": False,
        "time_conditioning": False,
        "tokenizer": TOKENIZER,
        "length": BLOCK_SIZE,
        "ema": "released weights",
    }
    return make_checkpoint(config_overrides, dict(tensors), info)
