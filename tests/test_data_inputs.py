"""Data inputs read and keyed honestly: an adopted tokenizer prepared by the adopting layout,
trained tokenizers keyed by CACHE_VERSION, exact offsets of bad bytes, JSON-array SFT files,
and a warning for hub datasets whose revision is not pinned. All data is local (tmp_path)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dataloader import TextDataModule
from diffusion.data import base, files, sources, tokenizers
from diffusion.data.base import ConfigError
from diffusion.data.chat import ROLE_TOKENS
from diffusion.data.layouts import Wrap
from diffusion.data.sft import ChatRecords, SFTRows
from diffusion.data.sources import HFDataset
from diffusion.data.tokenizers import TrainedBPE, TrainedChar, tokenizer_digest

ALPHABET = "abcdefghijklmnopqrstuvwxyz ?.,!\n"
PAIRS = [{"instruction": f"say {c}?", "input": "", "output": f"{c}."} for c in "abcdefghij"]


def write_pairs(tmp_path: Path) -> str:
    """PAIRS as JSON lines; returns the file's name under tmp_path."""
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n")
    return "pairs.jsonl"


def sft_module(tmp_path: Path, file: str, tokenizer, length: int = 32, **splits) -> TextDataModule:
    """An SFT data module over one local json file (`file`: its name under tmp_path)."""
    source = ChatRecords(
        path="json",
        data_files={"train": str(tmp_path / file)},
        splits=splits or {"train": "train"},
    )
    return TextDataModule(
        name="sft_in",
        source=source,
        tokenizer=tokenizer,
        layout=SFTRows(),
        length=length,
        batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )


def local_text(tmp_path: Path, text: str) -> HFDataset:
    """A text source of one local file, its only split `train`."""
    (tmp_path / "train.txt").write_text(text)
    data_files = {"train": str(tmp_path / "train.txt")}
    return HFDataset(path="text", data_files=data_files, splits={"train": "train"})


def plain_module(tmp_path: Path, tokenizer) -> TextDataModule:
    """A wrap-layout module over a local text file, whose tokenizer is adopted."""
    source = local_text(tmp_path, ALPHABET * 4)
    return TextDataModule(
        name="plain",
        source=source,
        tokenizer=tokenizer,
        layout=Wrap(),
        length=16,
        batch_size=1,
        cache_dir=str(tmp_path / "cache"),
    )


# ---- 1. adopt_tokenizer runs the layout's prepare ----------------------------------------


def role_token_tokenizer(folder: Path) -> str:
    """A saved char tokenizer that has the role tokens but no chat template."""
    tok = tokenizers.wrap_tokenizer(tokenizers.train_tokenizer([ALPHABET], "char", 0))
    tok.add_special_tokens({"additional_special_tokens": list(ROLE_TOKENS.values())})
    tok.save_pretrained(folder)
    return str(folder)


def test_an_adopted_tokenizer_gets_the_sft_chat_template_on_a_copy(tmp_path):
    other = plain_module(tmp_path, role_token_tokenizer(tmp_path / "tok"))
    theirs = other.setup_tokenizer()
    their_hash = other.tokenizer_hash()
    assert not getattr(theirs, "chat_template", None)
    target = sft_module(tmp_path, write_pairs(tmp_path), tokenizer="char")
    target.adopt_tokenizer(other)
    target.setup()
    assert target.tokenizer.chat_template  # SFTRows.prepare ran
    assert (target.mask_id, target.vocab_size) == (other.mask_id, other.vocab_size)
    assert len(target.dataset("train")) == len(PAIRS)
    # the other module's tokenizer is untouched; the hash is of what tokenized this corpus
    assert other.tokenizer is theirs and not getattr(theirs, "chat_template", None)
    assert other.tokenizer_hash() == their_hash == tokenizer_digest(theirs)
    assert target.tokenizer_hash() == tokenizer_digest(target.tokenizer) != their_hash


def test_adopting_a_tokenizer_the_layout_must_grow_is_refused(tmp_path):
    other = plain_module(tmp_path, "char")
    size = len(other.setup_tokenizer())
    target = sft_module(tmp_path, write_pairs(tmp_path), tokenizer="char")
    with pytest.raises(ConfigError, match=r"data 'sft_in': its sft layout .* 'plain' .*<\|user\|>"):
        target.adopt_tokenizer(other)
    assert len(other.tokenizer) == size and not getattr(other.tokenizer, "chat_template", None)


# ---- 2. trained tokenizers are keyed by CACHE_VERSION ------------------------------------


def bump_cache_version(monkeypatch) -> None:
    for module in (base, sources, tokenizers):
        monkeypatch.setattr(module, "CACHE_VERSION", base.CACHE_VERSION + 1, raising=False)


@pytest.mark.parametrize(
    "spec",
    [TrainedChar(alphabet="abc "), TrainedChar(), TrainedBPE(vocab_size=260)],
    ids=["char-alphabet", "char-corpus", "bpe"],
)
def test_a_cache_version_bump_retrains_cached_tokenizers(tmp_path, monkeypatch, spec):
    source = local_text(tmp_path, "abc cab bca\n" * 20)
    spec.build(source, str(tmp_path), "corpus")
    bump_cache_version(monkeypatch)
    spec.build(source, str(tmp_path), "corpus")
    assert len(list((tmp_path / "corpus").glob("tokenizer-*.json"))) == 2


# ---- 3. exact offset of a bad byte across the read boundary -------------------------------


@pytest.mark.parametrize("held", [1, 2, 3])
def test_a_bad_sequence_across_the_read_boundary_is_placed_exactly(tmp_path, held):
    """The first 1 MiB read (files.DECODE_CHUNK) ends inside a 4-byte sequence (`held` of its
    bytes); the next read's first byte breaks it."""
    boundary = 1 << 20
    good = b"ab\ncd\nef\n"  # three lines
    start = boundary - held
    data = good + b"x" * (start - len(good)) + "\U0001f600".encode()[:held] + b"Z\nmore\n"
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    assert files._decode_error(str(path)) == (
        f"{path} line 4: byte 0xf0 at offset {start} is not UTF-8"
    )
    assert files.DECODE_CHUNK == boundary  # the bad bytes sit across the real read boundary


# ---- 4. SFT records in one JSON array -----------------------------------------------------


def test_sft_records_in_a_json_array_file_and_its_slices(tmp_path):
    (tmp_path / "alpaca_data.json").write_text("\n  " + json.dumps(PAIRS, indent=2))
    for name in ("alpaca_data.json", write_pairs(tmp_path)):
        dm = sft_module(tmp_path, name, "char", train="train[:80%]", validation="train[80%:]")
        (where, first), *_ = dm.source.records("train")
        assert first == PAIRS[0]
        assert where.endswith("alpaca_data.json record 0" if name.endswith(".json") else "line 1")
        dm.setup()
        assert len(dm.dataset("train")) == 8 and len(dm.dataset("validation")) == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[{"instruction": "a?", "output": "b."},\n "oops"]', r"bad\.json record 1: expected a JSON object, got str"),
        ('[{"instruction": "a?", "output": "b."},\n {"instruction": ]', r"bad\.json line 2 column 18: not valid JSON"),
        ('[{"instruction": "a?", "output": "b."},\n {"output": "b."}]', r"bad\.json record 1: expected .*instruction"),
    ],
)  # fmt: skip
def test_a_bad_json_array_names_the_file_and_the_place(tmp_path, text, message):
    (tmp_path / "bad.json").write_text(text)
    dm = sft_module(tmp_path, "bad.json", "char")
    with pytest.raises(ConfigError, match=message):
        dm.setup()


# ---- 5. unpinned hub datasets ---------------------------------------------------------------


def test_an_unpinned_hub_dataset_warns_once_naming_the_revision_key(tmp_path, caplog):
    unpinned = HFDataset(path="someone/unpinned_corpus", splits={"train": "train"})
    pinned = HFDataset(path="someone/pinned_corpus", revision="0" * 40, splits={"train": "train"})
    local = local_text(tmp_path, "words\n")
    with caplog.at_level(logging.WARNING, logger="diffusion.data.sources"):
        for source in (unpinned, unpinned, pinned, local):
            source.fingerprint("train")
    warned = [r.getMessage() for r in caplog.records if "revision" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "'someone/unpinned_corpus'" in warned[0]
    assert "data.source.revision" in warned[0]
