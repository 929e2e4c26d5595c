"""Bad data input gets a ConfigError naming the file and line or the key (issue 11, item 7),
and the cache notices an edit that keeps a file's size and mtime."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from dataloader import TextDataModule
from diffusion.data.base import ConfigError
from diffusion.data.layouts import Wrap
from diffusion.data.sft import ChatRecords, SFTRows
from diffusion.data.sources import HFDataset
from tests.test_configs import load

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

GOOD = "the first document, long enough to fill a row or two of tokens.\n"


def text_dm(tmp_path: Path, files: list[Path], path: str = "text", **source) -> TextDataModule:
    kwargs = {"sample_by": "line"} if path == "text" else {}
    src = HFDataset(
        path=path,
        data_files={"train": [str(f) for f in files]},
        splits={"train": "train"},
        load_kwargs=source.pop("load_kwargs", kwargs),
        **source,
    )
    return TextDataModule(
        name="probe",
        source=src,
        tokenizer="char",
        layout=Wrap(),
        length=8,
        batch_size=1,
        cache_dir=str(tmp_path / "cache"),
    )


def jsonl(path: Path, lines: list[str | dict]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def bad_bytes_txt(tmp_path: Path) -> TextDataModule:
    f = tmp_path / "corpus.txt"
    f.write_bytes(GOOD.encode() * 2 + b"caf\xe9 latin-1\n")
    return text_dm(tmp_path, [f])


def bad_bytes_jsonl(tmp_path: Path) -> TextDataModule:
    f = tmp_path / "corpus.jsonl"
    f.write_bytes(json.dumps({"text": GOOD}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    return text_dm(tmp_path, [f], path="json")


def malformed_jsonl(tmp_path: Path) -> TextDataModule:
    f = jsonl(tmp_path / "corpus.jsonl", [{"text": GOOD}, "", '{"text": "cut'])
    return text_dm(tmp_path, [f], path="json")


def missing_field(tmp_path: Path) -> TextDataModule:
    f = jsonl(tmp_path / "corpus.jsonl", [{"text": GOOD}, {"body": GOOD}])
    return text_dm(tmp_path, [f], path="json")


def wrong_text_key(tmp_path: Path) -> TextDataModule:
    f = jsonl(tmp_path / "corpus.jsonl", [{"text": GOOD}] * 3)
    return text_dm(tmp_path, [f], path="json", text_key="content")


def non_text_field(tmp_path: Path) -> TextDataModule:
    f = jsonl(tmp_path / "corpus.jsonl", [{"text": 7}] * 3)
    return text_dm(tmp_path, [f], path="json")


def unfit_load_kwargs(tmp_path: Path) -> TextDataModule:
    f = jsonl(tmp_path / "corpus.jsonl", [{"text": GOOD}] * 3)
    return text_dm(tmp_path, [f], path="json", load_kwargs={"sample_by": "paragraph"})


def bad_bytes_sft(tmp_path: Path) -> TextDataModule:
    f = tmp_path / "sft.jsonl"
    f.write_bytes(b'{"prompt": "a?", "response": "b."}\n{"prompt": "\xff", "response": "c"}\n')
    src = ChatRecords(path="json", data_files={"train": str(f)}, splits={"train": "train"})
    return TextDataModule(
        name="probe",
        source=src,
        tokenizer="char",
        layout=SFTRows(),
        length=16,
        batch_size=1,
        cache_dir=str(tmp_path / "cache"),
    )


PROBES = {  # probe -> (builder, the message must match this)
    "undecodable txt": (bad_bytes_txt, r"corpus\.txt line 3: byte 0xe9 .* not UTF-8"),
    "undecodable jsonl": (bad_bytes_jsonl, r"corpus\.jsonl line 2: byte 0xe9 .* not UTF-8"),
    "malformed jsonl line": (malformed_jsonl, r"corpus\.jsonl line 3: not valid JSON"),
    "missing text field": (
        missing_field,
        r"corpus\.jsonl line 2: no field 'text' \(data\.source\.text_key\).*\['body'\]",
    ),
    "text_key names no column": (
        wrong_text_key,
        r"data\.source\.text_key='content': .*corpus\.jsonl.*has no such column.*\['text'\]",
    ),
    "text field not text": (non_text_field, r"data\.source\.text_key='text'.*int64.*not text"),
    "load_kwargs the loader refuses": (
        unfit_load_kwargs,
        r"data\.source\.load_kwargs: \['sample_by'\] not accepted by the 'json' loader",
    ),
    "undecodable sft jsonl": (bad_bytes_sft, r"sft\.jsonl line 2: not UTF-8 text"),
}


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_bad_data_names_the_file_and_line_or_the_key(probe, tmp_path):
    build, message = PROBES[probe]
    with pytest.raises(ConfigError, match=message):
        build(tmp_path).setup()


def test_load_kwargs_kept_by_a_hydra_merge_are_named(tmp_path):
    """`data.load_kwargs={}` does not clear a dict under Hydra (it merges): the text builder's
    sample_by reaches the json loader, which must be reported by key, not as a TypeError."""
    f = jsonl(tmp_path / "corpus.jsonl", [{"text": GOOD}] * 3)
    cfg = load(
        [
            "data=local",
            "data.tokenizer=char",
            "data.source.path=json",
            "data.source.load_kwargs={}",
            f"data.source.data_files={{train: {f}, validation: {f}, test: {f}}}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
    )
    dm = instantiate(cfg.data, length=8, batch_size=1)
    with pytest.raises(
        ConfigError, match=r"load_kwargs: \['sample_by'\].*~data\.source\.load_kwargs"
    ):
        dm.setup()


def test_an_edit_that_keeps_size_and_mtime_is_not_served_from_the_cache(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("abcdefgh ijklmnop\n" * 4)
    first = text_dm(tmp_path, [f])
    first.setup()
    before = first.fingerprint()
    stat = os.stat(f)
    f.write_text("ponmlkji hgfedcba\n" * 4)  # same characters, same size
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime
    assert os.stat(f).st_size == stat.st_size and os.stat(f).st_mtime_ns == stat.st_mtime_ns
    again = text_dm(tmp_path, [f])
    again.setup()
    assert before["tokenizer"] == again.fingerprint()["tokenizer"]  # the same alphabet
    assert before["data"] != again.fingerprint()["data"]
    assert not torch.equal(first.dataset("train").input_ids, again.dataset("train").input_ids)
    assert again.decode(again.dataset("train").input_ids[:1])[0].startswith("[BOS]ponmlkj")
