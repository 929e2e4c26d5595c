"""The three part protocols of the data pipeline and the helpers they share.

A data config names one part of each kind by `_target_` (configs/data/*.yaml):

- a `Source` gives the clean documents of a split (`texts(split)`, a `datasets.Dataset` with a
  `text` column: detokenized, empty documents dropped, at most `max_docs`) and a `fingerprint`
  of everything that decides them (for cache keys and checkpoints);
- a `TokenizerSpec` builds the transformers tokenizer (trained on the source, or loaded);
- a `Layout` turns a split into fixed-length token rows (wrap, pad, SFT rows with a loss mask).

`build_part` rebuilds a part from a plain mapping (a checkpoint's saved config) without
Hydra: only classes of this package, and only of the expected kind, are ever constructed.
"""

from __future__ import annotations

import abc
import hashlib
import importlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from diffusion.config import ConfigError

SPLITS = ("train", "validation", "test")
CACHE_VERSION = 2  # bump when the cached token format or the text processing changes
PAD, BOS, EOS, MASK, UNK = "[PAD]", "[BOS]", "[EOS]", "[MASK]", "[UNK]"
PART_PACKAGE = "diffusion.data."  # the only modules `build_part` imports from


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object (keys sorted)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plain(x: Any) -> Any:
    """Hydra hands nested dicts/lists over as OmegaConf containers; use plain Python."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig | ListConfig) else x


def atomic_write(path: str, write: Callable[[str], None]) -> None:
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


class Source(abc.ABC):
    """Where documents come from. Subclasses set `detokenizer`/`max_docs` through `__init__`."""

    kind: ClassVar[str] = "source"

    @abc.abstractmethod
    def split_names(self) -> list[str]:
        """The splits this source can give, in SPLITS order."""

    @abc.abstractmethod
    def texts(self, split: str, streaming: bool = False, num_proc: int | None = None) -> Any:
        """A split's clean documents: a `datasets.Dataset` (or IterableDataset) of `text`."""

    @abc.abstractmethod
    def fingerprint(self, split: str) -> dict[str, Any]:
        """Everything that decides the split's documents (local files by content hash)."""

    @abc.abstractmethod
    def describe(self, split: str) -> str:
        """Where the split comes from, for messages."""

    def check(self, split: str) -> None:
        """Fail early on a split that cannot be read (default: describing it checks it)."""
        self.describe(split)


class TokenizerSpec(abc.ABC):
    """How to get the tokenizer: `build(source, cache_dir, name)` -> a transformers tokenizer."""

    kind: ClassVar[str] = "tokenizer"

    @abc.abstractmethod
    def build(self, source: Source, cache_dir: str, name: str) -> Any:
        """The tokenizer; trained ones are cached under `cache_dir/name` (the corpus folder)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """What `data.tokenizer` asks for, for messages."""


class Layout(abc.ABC):
    """How a split becomes (N, length) rows: `rows` returns the tensors to cache."""

    kind: ClassVar[str] = "layout"
    name: ClassVar[str]  # in cache file names
    supports_streaming: ClassVar[bool] = False
    min_length: ClassVar[int] = 1  # the shortest model.length its rows can have

    def prepare(self, tokenizer: Any) -> Any:
        """Adjust the tokenizer before any id is handed out (SFT adds its chat tokens)."""
        return tokenizer

    def check(self, source: Source, length: int) -> None:
        """Refuse a source or length this layout cannot use (default: a length under
        `min_length`)."""
        if length < self.min_length:
            raise ConfigError(f"model.length={length} is too short for the {self.name} layout")

    @abc.abstractmethod
    def rows(
        self, source: Source, split: str, tokenizer: Any, length: int, num_proc: int | None
    ) -> dict[str, torch.Tensor]:
        """{"input_ids": (N, length) int32, "attention_mask": (N, length) int8, ...}."""

    def stream(self, stream: Any, tokenizer: Any, length: int) -> Any:
        """An IterableDataset of rows cut on the fly (only where `supports_streaming`)."""
        raise ConfigError(f"data.streaming=true is not supported by the {self.name} layout")

    def fingerprint(self) -> dict[str, Any]:
        return {"layout": self.name}


PART_KINDS: dict[str, type] = {"source": Source, "tokenizer": TokenizerSpec, "layout": Layout}


def build_part(spec: Mapping[str, Any], kind: str, key: str) -> Any:
    """A part of `kind` from `{_target_: diffusion.data..., **kwargs}`, refusing any other target.

    For configs read back from checkpoints: the target must live in this package and be a
    subclass of the kind's protocol, so a crafted config cannot import or run anything else.
    """
    target = str(spec.get("_target_", ""))
    module_name, _, attr = target.rpartition(".")
    if not target.startswith(PART_PACKAGE) or not module_name or not attr.isidentifier():
        raise ConfigError(f"{key}._target_={target!r}: not a data part of {PART_PACKAGE}*")
    try:
        cls = getattr(importlib.import_module(module_name), attr, None)
    except ImportError:
        cls = None
    base = PART_KINDS[kind]
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{key}._target_={target!r} is not a {base.__name__}")
    kwargs = {k: v for k, v in spec.items() if not str(k).startswith("_")}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{key}: {e}") from None


def stack_rows(ids: np.ndarray, mask: np.ndarray, **extra: np.ndarray) -> dict[str, torch.Tensor]:
    """Numpy rows -> the tensors a layout caches."""
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    return out | {k: torch.from_numpy(v) for k, v in extra.items()}
