"""data=text8 lays out MDLM's own text8 rows: the split's characters cut into pieces of
`chunk_chars` (MDLM/D3PM: model.length, a short last piece dropped), each piece followed by
EOS, concatenated per group of 1000 pieces, cut into L - 2 and written `[BOS] piece [EOS]`.

The reference below is written from that description, with Python lists and the alphabet's
ids looked up one character at a time, independent of layouts.mdlm_wrap_documents."""

from __future__ import annotations

import logging
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from diffusion.data.base import ConfigError  # noqa: E402
from diffusion.data.sources import HFDataset  # noqa: E402
from tests.test_dataloader import RUNTIME, compose_data  # noqa: E402

ALPHABET = "abcdefghijklmnopqrstuvwxyz "


def mdlm_text8_rows(text: str, ids: dict[str, int], bos: int, eos: int, chunk: int, length: int,
                    group: int) -> list[list[int]]:  # fmt: skip
    pieces = [text[i : i + chunk] for i in range(0, len(text), chunk)]
    if pieces and len(pieces[-1]) < chunk:
        pieces = pieces[:-1]  # MDLM's drop_last
    docs = [[ids[c] for c in p] + [eos] for p in pieces]
    rows = []
    for g in range(0, len(docs), group):
        stream = [t for d in docs[g : g + group] for t in d]
        n = length - 2
        for i in range(0, len(stream) // n * n, n):
            rows.append([bos] + stream[i : i + n] + [eos])
    return rows


def text8_dm(tmp_path, text: str, chunk: int, length: int, group: int = 1000, layout=None):
    """configs/data/text8.yaml pointed at a local file of `text` (train = validation = test)."""
    path = tmp_path / "text8.txt"
    path.write_text(text)
    cfg = compose_data("text8")
    cfg.cache_dir = str(tmp_path / "cache")
    OmegaConf.update(cfg, "source.data_files", {"train": str(path)}, merge=False)
    n = len(text)
    ranges = {"train": [0, n], "validation": [0, n], "test": [0, None]}
    OmegaConf.update(cfg, "source.char_ranges", ranges, merge=False)
    OmegaConf.update(cfg, "source.chunk_chars", chunk)
    OmegaConf.update(cfg, "layout.group_size", group)
    if layout is not None:
        OmegaConf.update(cfg, "layout", layout, merge=False)
    dm = instantiate(cfg, length=length, **RUNTIME)
    dm.setup()
    return dm


def test_the_text8_config_takes_mdlms_rows():
    cfg = compose_data("text8")
    assert cfg.layout._target_.endswith("layouts.MDLMWrap") and cfg.layout.group_size == 1000
    assert cfg.source.chunk_chars == 256  # MDLM's text8 model.length
    assert cfg.source.char_ranges.validation == [90000000, 95000000]


@pytest.mark.parametrize("chunk,length,group", [(12, 12, 1000), (12, 9, 1000), (7, 12, 3)])
def test_text8_rows_equal_mdlms(tmp_path, chunk, length, group):
    rng = random.Random(chunk * 100 + length + group)
    text = "".join(rng.choice(ALPHABET) for _ in range(12 * 23 + 5))  # a short last piece
    dm = text8_dm(tmp_path, text, chunk, length, group)
    tok = dm.setup_tokenizer()
    ids = {c: tok.convert_tokens_to_ids(c) for c in ALPHABET}
    assert len(set(ids.values())) == 27 and tok.unk_token_id not in ids.values()
    want = mdlm_text8_rows(text, ids, tok.bos_token_id, tok.eos_token_id, chunk, length, group)
    for split in ("train", "test"):
        got = dm.dataset(split).input_ids.tolist()
        assert got == want, split
    assert int(dm.dataset("train").attention_mask.min()) == 1


def test_plain_wrap_rows_are_not_mdlms(tmp_path):
    """The negative twin: text8 under the plain wrap (its layout until now) is another row set."""
    text = "".join(random.Random(0).choice(ALPHABET) for _ in range(300))
    dm = text8_dm(tmp_path, text, 12, 12, layout={"_target_": "diffusion.data.layouts.Wrap"})
    tok = dm.setup_tokenizer()
    ids = {c: tok.convert_tokens_to_ids(c) for c in ALPHABET}
    want = mdlm_text8_rows(text, ids, tok.bos_token_id, tok.eos_token_id, 12, 12, 1000)
    assert dm.dataset("train").input_ids.tolist() != want


def test_chunk_chars_other_than_the_length_warns_and_bad_values_are_named(tmp_path, caplog):
    text = "".join(random.Random(1).choice(ALPHABET) for _ in range(300))
    with caplog.at_level(logging.WARNING):
        text8_dm(tmp_path, text, 16, 12)
    assert (
        "chunk_chars differs from MDLM's pieces for model.length=12: train 16 (MDLM: 12)"
        in caplog.text
    )
    with pytest.raises(ConfigError, match=r"data.source.chunk_chars=0"):
        HFDataset(path="text", chunk_chars=0)


def test_chunk_chars_is_in_the_cache_key(tmp_path):
    text = "".join(random.Random(2).choice(ALPHABET) for _ in range(300))
    a = text8_dm(tmp_path, text, 12, 12)
    b = text8_dm(tmp_path, text, 10, 12)
    assert a._cache_path("train") != b._cache_path("train")
    assert a.dataset("train").input_ids.tolist() != b.dataset("train").input_ids.tolist()
