"""MDLM's wrapped rows (`data.layout=mdlm_wrap`, the default of the hub corpora): `[BOS] piece
[EOS]` rows cut from `doc [EOS]` streams per group of 1000 documents, checked by hand and
against a slow reference written here from MDLM's description (tokenize each document, append
EOS, concatenate one map batch, cut pieces of L - 2, drop the batch's tail, add the bookends)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from dataloader import TextDataModule  # noqa: E402
from diffusion.data import layouts  # noqa: E402
from diffusion.data.base import ConfigError  # noqa: E402
from diffusion.data.layouts import MDLMWrap, Wrap  # noqa: E402
from tests.test_data_audit import local_text_dm  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")


def slow_mdlm_rows(docs: list[list[int]], bos: int, eos: int, length: int, group: int | None):
    """MDLM's `_group_texts` over each map batch of `group` documents, in plain lists."""
    rows, size = [], group or len(docs)
    for first in range(0, len(docs), size):
        stream = [tok for doc in docs[first : first + size] for tok in [*doc, eos]]
        body = length - 2
        for i in range(0, len(stream) // body * body, body):
            rows.append([bos, *stream[i : i + body], eos])
    return rows


def flatten(docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    flat = np.array([t for d in docs for t in d], np.int32)
    return flat, np.array([len(d) for d in docs], np.int64)


def test_mdlm_rows_by_hand():
    """Documents [10 11 12], [20], [30 31] at L = 5: stream 10 11 12 E 20 E 30 31 E, pieces of 3
    (the tail-free 9 tokens make exactly 3 rows), each row B piece E. BOS == EOS (GPT-2) too."""
    flat, lengths = flatten([[10, 11, 12], [20], [30, 31]])
    rows = layouts.mdlm_wrap_documents(flat, lengths, bos=1, eos=2, length=5)
    assert rows.tolist() == [[1, 10, 11, 12, 2], [1, 2, 20, 2, 2], [1, 30, 31, 2, 2]]
    gpt2 = layouts.mdlm_wrap_documents(flat, lengths, bos=0, eos=0, length=6)
    assert gpt2.tolist() == [[0, 10, 11, 12, 0, 0], [0, 20, 0, 30, 31, 0]]
    # groups of 2 documents: [10 11 12 E 20 E] -> 2 rows, [30 31 E] -> 1 row
    two = layouts.mdlm_wrap_documents(flat, lengths, bos=1, eos=2, length=5, group_size=2)
    assert two.tolist() == [[1, 10, 11, 12, 2], [1, 2, 20, 2, 2], [1, 30, 31, 2, 2]]
    one = layouts.mdlm_wrap_documents(flat, lengths, bos=1, eos=2, length=6, group_size=2)
    assert one.tolist() == [[1, 10, 11, 12, 2, 2]]  # 6 // 4 = 1 row, then [30 31 E] < 4: dropped


@pytest.mark.parametrize("group", [None, 1, 7, 1000])
@pytest.mark.parametrize("length", [3, 8, 33])
def test_mdlm_rows_equal_the_slow_reference(group, length):
    rng = np.random.default_rng(length * 31 + (group or 0))
    docs = [list(rng.integers(5, 50, rng.integers(0, 40))) for _ in range(60)]
    flat, lengths = flatten(docs)
    got = layouts.mdlm_wrap_documents(flat, lengths, bos=1, eos=2, length=length, group_size=group)
    assert got.tolist() == slow_mdlm_rows(docs, 1, 2, length, group)
    plain = layouts.wrap_documents(flat, lengths, bos=1, eos=2, length=length)
    assert got.shape[1] == plain.shape[1] and got.tolist() != plain.tolist()  # not our wrap


def local_dm(tmp_path, layout, length: int, streaming: bool = False) -> TextDataModule:
    text = "\n\n".join(f"paragraph {i} " + "abcdefgh"[: i % 8] for i in range(40))
    return local_text_dm(tmp_path, text, length, layout=layout, streaming=streaming)


def test_the_layout_in_a_data_module_streamed_and_cached(tmp_path):
    """`data.layout=mdlm_wrap`: every row is [BOS] ... [EOS], its cache file is its own (the
    plain wrap's rows differ), and streaming cuts the same pieces (one group: no tails)."""
    dm = local_dm(tmp_path, "mdlm_wrap", length=12)
    dm.setup()
    rows = dm.dataset("train").input_ids
    tok = dm.tokenizer
    assert bool((rows[:, 0] == tok.bos_token_id).all()) and bool(
        (rows[:, -1] == tok.eos_token_id).all()
    )
    texts = dm.decode(rows)
    assert texts[0].startswith("[BOS]paragraph") and texts[0].endswith("[EOS]")
    plain = local_dm(tmp_path, "wrap", length=12)
    plain.setup()
    assert plain.dataset("train").input_ids.shape != rows.shape  # a separate cache entry
    whole = local_dm(tmp_path, MDLMWrap(group_size=None), length=12)
    whole.setup()
    streamed = local_dm(tmp_path, MDLMWrap(group_size=None), length=12, streaming=True)
    streamed.setup()
    got = torch.cat([b["input_ids"] for b in streamed.train_dataloader()])
    full = whole.dataset("train").input_ids.long()
    assert got.shape == full.shape and bool((got[:, 0] == tok.bos_token_id).all())
    assert torch.equal(torch.bincount(got.flatten()), torch.bincount(full.flatten()))  # same tokens
    with pytest.raises(ConfigError, match="too short for the mdlm_wrap layout"):
        local_dm(tmp_path, "mdlm_wrap", length=2)
    with pytest.raises(ConfigError, match="group_size=0"):
        MDLMWrap(group_size=0)


def test_the_hub_corpora_take_mdlms_rows_and_the_others_keep_theirs():
    """MDLM's corpora (OWT, the zero-shot sets, lm1b-wrap, text8) default to its rows; local
    files keep the plain wrap, lm1b its padding, SFT its rows (no key of the base leaks)."""
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):

        def layout(name: str) -> str:
            return compose(config_name="config", overrides=[f"data={name}"]).data.layout._target_

        for name in (
            "openwebtext",
            "wikitext103",
            "ptb",
            "lambada",
            "lm1b_wrap",
            "ag_news",
            "text8",
        ):
            assert layout(name).endswith("layouts.MDLMWrap"), name
        assert layout("local").endswith("layouts.Wrap")
        assert layout("lm1b").endswith("layouts.Pad")
        sft = compose(config_name="config", overrides=["data=sft_local"]).data.layout
        assert sft._target_.endswith("SFTRows") and "group_size" not in sft
    assert issubclass(MDLMWrap, Wrap)


def datasets_map_rows(docs: list[list[int]], bos: int, eos: int, length: int, group: int,
                      num_proc: int) -> list[list[int]]:  # fmt: skip
    """MDLM's grouping as MDLM runs it: `datasets.map(batched=True, num_proc=...)` of a
    `_group_texts` written here (EOS appended per document, pieces of L - 2, bookends)."""
    import datasets

    def group_texts(batch: dict[str, list]) -> dict[str, list]:
        stream = [t for ids in batch["input_ids"] for t in ids]
        body = length - 2
        cut = len(stream) // body * body
        return {"rows": [[bos, *stream[i : i + body], eos] for i in range(0, cut, body)]}

    data = datasets.Dataset.from_dict({"input_ids": [[*d, eos] for d in docs]})
    out = data.map(group_texts, batched=True, batch_size=group, num_proc=num_proc,
                   remove_columns=["input_ids"], keep_in_memory=True)  # fmt: skip
    return out["rows"]


@pytest.mark.parametrize("num_proc", [2, 3])
def test_shards_equal_datasets_map_with_num_proc(num_proc):
    """`data.layout.shards=N` gives the rows MDLM caches on an N-CPU machine: `datasets` cuts
    the documents into N contiguous shards and batches each from its own start."""
    rng = np.random.default_rng(num_proc)
    docs = [rng.integers(5, 50, int(rng.integers(1, 9))).tolist() for _ in range(47)]
    flat, lengths = flatten(docs)
    want = datasets_map_rows(docs, 1, 2, 6, 5, num_proc)
    got = layouts.mdlm_wrap_documents(flat, lengths, 1, 2, 6, group_size=5, shards=num_proc)
    assert got.tolist() == want
    one = layouts.mdlm_wrap_documents(flat, lengths, 1, 2, 6, group_size=5)
    assert one.tolist() != want  # the negative twin: one process groups across the shards
    assert one.tolist() == datasets_map_rows(docs, 1, 2, 6, 5, 1)


def test_shard_bounds_and_the_layout_key():
    assert layouts.shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert layouts.shard_bounds(2, 5) == [(0, 1), (1, 2)]  # datasets: num_proc <= rows
    assert MDLMWrap().fingerprint() == {"layout": "mdlm_wrap", "group_size": 1000}
    assert MDLMWrap(shards=8).fingerprint()["shards"] == 8
    with pytest.raises(ConfigError, match=r"data.layout.shards=0"):
        MDLMWrap(shards=0)


def slow_bd3lm_rows(docs, bos, eos, length, group, special: bool, doc_eos: bool):
    """BD3-LM's `_group_texts` with its switches, in plain lists: EOS after each document only
    with `insert_eos`, pieces of L - 2 with bookends or of L bare (`insert_special_tokens`)."""
    rows, size = [], group or len(docs)
    body = length - 2 if special else length
    for first in range(0, len(docs), size):
        stream = [t for doc in docs[first : first + size] for t in [*doc, *[eos] * doc_eos]]
        for i in range(0, len(stream) // body * body, body):
            piece = stream[i : i + body]
            rows.append([bos, *piece, eos] if special else piece)
    return rows


@pytest.mark.parametrize("special", [True, False])
@pytest.mark.parametrize("doc_eos", [True, False])
def test_bd3lms_switches_equal_its_group_texts(special, doc_eos):
    """data.layout.special_tokens / doc_eos are BD3-LM's insert_*_special / insert_*_eos."""
    rng = np.random.default_rng(int(special) * 2 + int(doc_eos))
    docs = [rng.integers(5, 50, int(rng.integers(0, 12))).tolist() for _ in range(53)]
    flat, lengths = flatten(docs)
    got = layouts.mdlm_wrap_documents(
        flat, lengths, 1, 2, 8, group_size=7, special_tokens=special, doc_eos=doc_eos
    )
    assert got.tolist() == slow_bd3lm_rows(docs, 1, 2, 8, 7, special, doc_eos)
    if not (special and doc_eos):  # a switch changes the rows (the negative twin)
        assert got.tolist() != slow_bd3lm_rows(docs, 1, 2, 8, 7, True, True)


def test_bd3lms_switches_by_hand_and_their_keys():
    flat, lengths = flatten([[10, 11, 12], [20], [30, 31]])
    bare = layouts.mdlm_wrap_documents(flat, lengths, 1, 2, 3, special_tokens=False)
    assert bare.tolist() == [[10, 11, 12], [2, 20, 2], [30, 31, 2]]
    no_eos = layouts.mdlm_wrap_documents(flat, lengths, 1, 2, 3, special_tokens=False,
                                         doc_eos=False)  # fmt: skip
    assert no_eos.tolist() == [[10, 11, 12], [20, 30, 31]]
    assert MDLMWrap(special_tokens=False, doc_eos=False).fingerprint() == {
        "layout": "mdlm_wrap", "group_size": 1000, "special_tokens": False, "doc_eos": False,
    }  # fmt: skip
    bare_layout = MDLMWrap(special_tokens=False)
    assert not bare_layout.bookends and bare_layout.min_length == 1
    assert not bare_layout.supports_streaming and MDLMWrap().supports_streaming
    with pytest.raises(ConfigError, match=r"data.layout.doc_eos='no' must be true or false"):
        MDLMWrap(doc_eos="no")
