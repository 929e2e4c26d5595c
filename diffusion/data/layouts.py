"""Layouts: how a split's documents become fixed-length rows.

- `Wrap`: concatenate `[BOS] doc [EOS]` once over the split and cut it into rows (every token
  is data, rows start mid-document);
- `MDLMWrap` (MDLM's own `wrap`, which BD3-LM and DUO inherit): `doc [EOS]` concatenated in
  groups of 1000 documents, cut into pieces of `length - 2`, each row `[BOS] piece [EOS]`;
- `Pad`: one document per row, truncated (EOS kept), `attention_mask` 0 on padding;
- `SFTRows` (sft.py): chat-rendered prompt, answer, EOS padding, with a `loss_mask`.

Documents are encoded with special-token parsing off (tokenizers.encode_text).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch

from diffusion.data.base import ConfigError, Layout, Source, stack_rows
from diffusion.data.tokenizers import encode_text

log = logging.getLogger(__name__)


def wrap_documents(flat: np.ndarray, lengths: np.ndarray, bos: int, eos: int, length: int):
    """Concatenate `[BOS] doc [EOS]` over the whole split and cut it into rows of `length`.

    `flat` holds all documents' tokens back to back, `lengths` each document's count. When BOS
    and EOS are one token (GPT-2) documents are separated by a single one, as MDLM does. The
    tail shorter than `length` is dropped. Returns an (N, length) int32 array (N may be 0).
    """
    lengths = lengths.astype(np.int64)
    lead = 0 if bos == eos else 1  # separator tokens before each document
    head = 1 - lead  # a single leading BOS when BOS == EOS
    extent = lengths + lead + 1
    starts = head + np.cumsum(extent) - extent
    stream = np.empty(head + int(extent.sum()), dtype=np.int32)
    stream[starts if lead else 0] = bos
    stream[starts + lead + lengths] = eos
    doc = np.repeat(np.arange(len(lengths)), lengths)  # document of each token
    within = np.arange(len(flat)) - (np.cumsum(lengths) - lengths)[doc]
    stream[starts[doc] + lead + within] = flat
    rows = len(stream) // length
    return stream[: rows * length].reshape(rows, length)


def mdlm_wrap_documents(
    flat: np.ndarray,
    lengths: np.ndarray,
    bos: int,
    eos: int,
    length: int,
    group_size: int | None = 1000,
    shards: int = 1,
    special_tokens: bool = True,
    doc_eos: bool = True,
) -> np.ndarray:
    """MDLM's wrap (its `_group_texts`): every document followed by EOS, concatenated over each
    group of `group_size` documents (MDLM runs it as a batched `datasets.map`, 1000 documents a
    batch; None: the whole split as one group), cut into pieces of `length - 2` with each
    group's tail dropped, and every row `[BOS] piece [EOS]`. Returns (N, length) int32.

    `shards`: the map's `num_proc`. `datasets` then cuts the documents into that many
    contiguous shards (the first `n % shards` one document longer) and batches each from its
    own start, so groups never cross a shard boundary; more shards than documents are reduced
    to one per document, as `datasets` does. BD3-LM's switches: `special_tokens=False` (its
    `insert_*_special=False`) makes each row a bare piece of `length` tokens, `doc_eos=False`
    (`insert_*_eos=False`) leaves the EOS after each document out."""
    body = length - 2 if special_tokens else length
    sep = 1 if doc_eos else 0
    lengths = lengths.astype(np.int64)
    stream = np.empty(int(lengths.sum()) + sep * len(lengths), dtype=np.int32)
    ends = np.cumsum(lengths + sep)  # exclusive end of each `doc [EOS]` in the stream
    if doc_eos:
        stream[ends - 1] = eos
    doc = np.repeat(np.arange(len(lengths)), lengths)
    within = np.arange(len(flat)) - (np.cumsum(lengths) - lengths)[doc]
    stream[(ends - lengths - sep)[doc] + within] = flat
    size = max(len(lengths) if not group_size else int(group_size), 1)
    pieces = []
    for start, stop in shard_bounds(len(lengths), shards):
        for first in range(start, stop, size):
            lo = int(ends[first - 1]) if first else 0
            hi = int(ends[min(first + size, stop) - 1])
            n = (hi - lo) // body
            pieces.append(stream[lo : lo + n * body].reshape(n, body))
    rows = np.concatenate(pieces) if pieces else np.zeros((0, body), np.int32)
    if not special_tokens:
        return rows
    out = np.empty((len(rows), length), dtype=np.int32)
    out[:, 0], out[:, -1], out[:, 1:-1] = bos, eos, rows
    return out


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """[start, stop) of `datasets`' contiguous shards of n rows (`Dataset.shard(contiguous=True)`
    as `map(num_proc=shards)` cuts them: the first n % shards one longer)."""
    shards = max(1, min(int(shards), n))
    div, mod = divmod(n, shards)
    starts = [div * i + min(i, mod) for i in range(shards)]
    return [(a, a + div + (i < mod)) for i, a in enumerate(starts)]


def pad_documents(flat: np.ndarray, lengths: np.ndarray, bos: int, eos: int, pad: int, length: int):
    """One `[BOS] doc [EOS]` per row, truncated to `length` (EOS kept) and right-padded.

    Returns (input_ids, attention_mask), both (N, length), int32 and int8.
    """
    body = np.minimum(lengths.astype(np.int64), length - 2)
    offsets = np.cumsum(lengths.astype(np.int64)) - lengths
    col = np.arange(length - 2)[None, :]
    valid = col < body[:, None]
    idx = np.where(valid, offsets[:, None] + col, 0)
    ids = np.full((len(lengths), length), pad, dtype=np.int32)
    ids[:, 0] = bos
    ids[:, 1:-1] = np.where(valid, flat[idx] if len(flat) else 0, pad)
    ids[np.arange(len(lengths)), body + 1] = eos
    mask = (np.arange(length)[None, :] < (body + 2)[:, None]).astype(np.int8)
    return ids, mask


def report_truncation(split: str, lengths: np.ndarray, length: int) -> int:
    """Warn how many documents of `split` the pad layout cuts (longer than `length` - 2 tokens)
    and what share of their tokens is lost: truncation is by design, but never silent."""
    cut = lengths.astype(np.int64) > length - 2
    if cut.any():
        lost = int((lengths[cut].astype(np.int64) - (length - 2)).sum())
        log.warning(
            "pad layout: %d of %d %s documents are longer than model.length=%d and are "
            "truncated (%d of %d tokens, %.1f%%, dropped); the wrap layout keeps every token",
            int(cut.sum()), len(lengths), split, length, lost, int(lengths.sum()),
            100.0 * lost / max(int(lengths.sum()), 1),
        )  # fmt: skip
    return int(cut.sum())


def _pieces(text: str, size: int = 1 << 20) -> list[str]:
    """Cut a very long document (text8: 90M chars) before whitespace so tokenizing stays lean."""
    if len(text) <= size:
        return [text]
    out, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
            end = cut if cut > start else end
        out.append(text[start:end])
        start = end
    return out


def tokenize_documents(
    ds: Any, tokenizer: Any, num_proc: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """All documents' tokens back to back, and each document's length."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        ids = [
            list(itertools.chain.from_iterable(encode_text(tokenizer, _pieces(t))))
            for t in batch["text"]
        ]
        return {"ids": ids}

    ds = ds.map(encode, batched=True, num_proc=num_proc, remove_columns=["text"])
    if len(ds) == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    col = ds.with_format("arrow")[:].column("ids")
    flat = np.concatenate([c.flatten().to_numpy(zero_copy_only=False) for c in col.chunks])
    lengths = np.concatenate([np.diff(c.offsets.to_numpy()) for c in col.chunks])
    return flat.astype(np.int32), lengths


def _documents(source: Source, split: str, tokenizer: Any, num_proc: int | None):
    flat, lengths = tokenize_documents(source.texts(split, num_proc=num_proc), tokenizer, num_proc)
    where = f"split {split!r} ({source.describe(split)})"
    if len(lengths) == 0:
        raise ConfigError(f"{where} has no documents")
    return flat, lengths, where


class Wrap(Layout):
    """Concatenate `[BOS] doc [EOS]` over the split and cut it into rows of `length`: every
    token is data (MDLM's own rows are `MDLMWrap`)."""

    name: ClassVar[str] = "wrap"
    supports_streaming: ClassVar[bool] = True
    min_length: ClassVar[int] = 2
    bookends: ClassVar[bool] = False  # MDLMWrap: every row [BOS] piece [EOS]

    def rows(self, source, split, tokenizer, length, num_proc) -> dict[str, torch.Tensor]:
        flat, lengths, where = _documents(source, split, tokenizer, num_proc)
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        ids = self.cut(flat, lengths, bos, eos, length)
        if len(ids) == 0:
            raise ConfigError(self.too_little(where, flat, lengths, bos, eos, length))
        return stack_rows(ids, np.ones_like(ids, dtype=np.int8))

    def cut(self, flat: np.ndarray, lengths: np.ndarray, bos: int, eos: int, length: int):
        """(N, length) rows of the split's documents (`flat`, split by `lengths`)."""
        return wrap_documents(flat, lengths, bos, eos, length)

    def too_little(self, where: str, flat, lengths, bos: int, eos: int, length: int) -> str:
        """Why `cut` gave no row: the tokens with each document's separators, counted."""
        total = len(flat) + len(lengths) * (1 if bos == eos else 2) + (bos == eos)
        return (
            f"{where} has {total} tokens with separators, fewer than "
            f"length={length}: use a shorter model.length or more data"
        )

    def stream(self, stream: Any, tokenizer: Any, length: int) -> Any:
        return StreamingRows(stream, tokenizer, length, wrap=True, bookends=self.bookends)


class MDLMWrap(Wrap):
    """MDLM's wrapped rows, `[BOS] 1022 tokens [EOS]` at L = 1024 (`mdlm_wrap_documents`): what
    MDLM, BD3-LM and DUO train and report perplexity on, and what their checkpoints expect at
    position 0. Its two bookend tokens per row are scored, as MDLM scores them."""

    name: ClassVar[str] = "mdlm_wrap"

    def __init__(
        self,
        group_size: int | None = 1000,
        shards: int = 1,
        special_tokens: bool = True,
        doc_eos: bool = True,
    ) -> None:
        """`group_size`: documents concatenated before cutting (MDLM: its map batch, 1000;
        null: the whole split). `shards`: the processes MDLM's map ran with (its `num_proc`,
        the CPU count of the machine that cached the rows): each contiguous shard of the
        documents is grouped from its own start, so MDLM's rows cut on N CPUs are
        `shards: N` (1: one process). `special_tokens=false`: rows without the [BOS] / [EOS]
        bookends, `doc_eos=false`: no EOS after each document (BD3-LM's
        `data.insert_*_special` / `data.insert_*_eos`; its OWT models train and validate
        without bookends)."""
        if group_size is not None and int(group_size) < 1:
            raise ConfigError(f"data.layout.group_size={group_size} must be >= 1 (or null)")
        if isinstance(shards, bool) or not str(shards).isdigit() or int(shards) < 1:
            raise ConfigError(f"data.layout.shards={shards!r} must be a whole number >= 1")
        for key, value in (("special_tokens", special_tokens), ("doc_eos", doc_eos)):
            if not isinstance(value, bool):
                raise ConfigError(f"data.layout.{key}={value!r} must be true or false")
        self.group_size = None if group_size is None else int(group_size)
        self.shards = int(shards)
        self.bookends = special_tokens  # the instance's: every row [BOS] piece [EOS]
        self.doc_eos = doc_eos
        self.min_length = 3 if special_tokens else 1
        self.supports_streaming = special_tokens and doc_eos  # the streamed cut is MDLM's only

    def cut(self, flat: np.ndarray, lengths: np.ndarray, bos: int, eos: int, length: int):
        return mdlm_wrap_documents(
            flat, lengths, bos, eos, length, self.group_size, self.shards,
            special_tokens=self.bookends, doc_eos=self.doc_eos,
        )  # fmt: skip

    def too_little(self, where: str, flat, lengths, bos: int, eos: int, length: int) -> str:
        body = length - 2 if self.bookends else length
        return (
            f"{where} has no group of {self.group_size or 'all'} documents with "
            f"{body} tokens{' (EOS after each included)' * self.doc_eos}: use a shorter "
            "model.length, more data or data.layout.group_size=null"
        )

    def fingerprint(self) -> dict[str, Any]:
        fp = {"layout": self.name, "group_size": self.group_size}  # old keys unchanged:
        fp |= {"shards": self.shards} if self.shards != 1 else {}  # each setting enters only
        fp |= {} if self.bookends else {"special_tokens": False}  # when it is not the default
        return fp | ({} if self.doc_eos else {"doc_eos": False})


class Pad(Layout):
    """One `[BOS] doc [EOS]` per row, truncated to `length` and right-padded (MDLM's lm1b)."""

    name: ClassVar[str] = "pad"
    supports_streaming: ClassVar[bool] = True
    min_length: ClassVar[int] = 3

    def rows(self, source, split, tokenizer, length, num_proc) -> dict[str, torch.Tensor]:
        flat, lengths, _ = _documents(source, split, tokenizer, num_proc)
        report_truncation(split, lengths, length)
        tok = tokenizer
        ids, mask = pad_documents(
            flat, lengths, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, length
        )
        return stack_rows(ids, mask)

    def stream(self, stream: Any, tokenizer: Any, length: int) -> Any:
        return StreamingRows(stream, tokenizer, length, wrap=False)


def cut_pieces(buf: list[int], size: int) -> tuple[list[list[int]], list[int]]:
    """The whole pieces of `size` tokens off the front of a streaming buffer, and the rest
    (kept for the next document): the cut both streamed wrap layouts share."""
    whole = len(buf) // size * size
    return [buf[i : i + size] for i in range(0, whole, size)], buf[whole:]


class StreamingRows(torch.utils.data.IterableDataset):
    """Rows of `length` tokens cut on the fly from a streamed `datasets.IterableDataset`.

    For corpora that do not fit on disk. Wrap keeps a token buffer across documents; pad emits
    one document per row. Not resumable mid-epoch (Lightning warns): the stream restarts.
    """

    def __init__(
        self, stream: Any, tokenizer: Any, length: int, wrap: bool, bookends: bool = False
    ) -> None:
        """`bookends` (MDLM's wrap): `doc [EOS]` into the buffer, rows `[BOS] piece [EOS]` (the
        stream is one group: MDLM's per-1000-document tails are not dropped)."""
        self.stream, self.tokenizer, self.length, self.wrap = stream, tokenizer, length, wrap
        self.bookends = bookends
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.stream.set_epoch(epoch)  # reshuffles the stream's buffer and shard order

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        tok, n = self.tokenizer, self.length
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        buf: list[int] = [bos] if bos == eos and not self.bookends else []
        for example in self.stream:
            (ids,) = encode_text(tok, [example["text"]])
            if not self.wrap:
                row, mask = pad_documents(
                    np.asarray(ids, np.int32), np.array([len(ids)]), bos, eos, pad, n
                )
                yield {
                    "input_ids": torch.from_numpy(row[0]).long(),
                    "attention_mask": torch.from_numpy(mask[0]).long(),
                }
                continue
            if self.bookends:  # pieces of n - 2, each row [BOS] piece [EOS]
                buf += [*ids, eos]
                pieces, buf = cut_pieces(buf, n - 2)
                rows = ([bos, *piece, eos] for piece in pieces)
            else:
                buf += ([] if bos == eos else [bos]) + ids + [eos]
                rows, buf = cut_pieces(buf, n)
            for row in rows:
                yield {
                    "input_ids": torch.tensor(row),
                    "attention_mask": torch.ones(n, dtype=torch.long),
                }
