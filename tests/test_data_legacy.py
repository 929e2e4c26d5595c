"""Flat (legacy) data configs saved in old checkpoints upgrade to the nested parts by the data
module they name (diffusion/data/from_checkpoint.py), looked up exactly, never by suffix."""

from __future__ import annotations

import pytest

from diffusion.data.base import ConfigError
from diffusion.data.from_checkpoint import upgrade

FLAT = {"hf_path": "json", "data_files": {"train": "t.jsonl"}, "tokenizer": "bpe", "length": 32}


def test_a_flat_sft_config_becomes_chat_records_in_sft_rows() -> None:
    data = upgrade(FLAT | {"_target_": "dataloader.SFTDataModule", "row_format": "auto"})
    assert data["_target_"] == "dataloader.TextDataModule"
    assert data["source"]["_target_"] == "diffusion.data.sft.ChatRecords"
    assert data["source"]["row_format"] == "auto"
    assert data["layout"] == {"_target_": "diffusion.data.sft.SFTRows"}


@pytest.mark.parametrize("target", [None, "dataloader.TextDataModule"])
def test_a_flat_text_config_becomes_a_dataset_in_wrapped_rows(target) -> None:
    flat = FLAT | ({"_target_": target} if target else {}) | {"row_format": "auto"}
    data = upgrade(flat)
    assert data["source"]["_target_"] == "diffusion.data.sources.HFDataset"
    assert "row_format" not in data["source"] and data["source"]["path"] == "json"
    assert data["layout"] == {"_target_": "diffusion.data.layouts.Wrap"}
    assert data["tokenizer"] == {
        "_target_": "diffusion.data.tokenizers.TrainedBPE",
        "vocab_size": 2048,
    }


def test_a_module_named_only_by_its_suffix_is_refused() -> None:
    """`mypkg.SFTDataModule` is not ours: the upgrade names the key instead of guessing."""
    with pytest.raises(ConfigError, match="data._target_='mypkg.SFTDataModule'"):
        upgrade(FLAT | {"_target_": "mypkg.SFTDataModule"})


def test_a_nested_config_is_returned_unchanged() -> None:
    nested = {"_target_": "anything.X", "layout": {"_target_": "diffusion.data.layouts.Pad"}}
    assert upgrade(nested) == nested
