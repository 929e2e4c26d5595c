"""Local data files: resolving globs, content hashes for cache keys, and errors that name the
file and line (undecodable bytes, malformed json lines, a missing text field).

`datasets` reports a bad local file as "An error occurred while generating the dataset" with
no file or line; `diagnose` reads the files itself to say which line is at fault.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from diffusion.data.base import ConfigError

_HASHES: dict[tuple[str, int, int, int, int], str] = {}  # (path, size, mtime, ctime, inode) -> hash
TEXT_FORMATS = ("text", "json", "csv")  # builders that read text files (parquet is binary)
DECODE_CHUNK = 1 << 20  # bytes per read when checking a file is UTF-8


def is_url(path: str) -> bool:
    return "://" in path


def resolve(key: str, patterns: str | Sequence[str]) -> list[str]:
    """The files of `data.source.data_files.<key>`: every pattern matches a non-empty file."""
    files: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        if is_url(pattern):  # datasets downloads it
            files.append(pattern)
            continue
        found = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not found:
            raise FileNotFoundError(f"data.source.data_files.{key}: no file matches {pattern!r}")
        for f in found:
            if os.path.getsize(f) == 0:
                raise ConfigError(f"data.source.data_files.{key}: data file {f} is empty")
        files += found
    return files


def content_hash(path: str) -> str:
    """blake2b of the file's bytes (memoized per process by path, size, mtime, ctime, inode:
    an edit that keeps size and mtime still changes ctime, so it is hashed again)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _HASHES:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def fingerprint(files: Sequence[str]) -> list[list[str]]:
    """[path, content hash] per local file, [url] per URL."""
    return [[f] if is_url(f) else [f, content_hash(f)] for f in files]


def _decode_error(path: str) -> str | None:
    """'path line N: ...' at the first undecodable byte of a UTF-8 file, else None.

    Read in chunks through an incremental decoder, which holds back a partial sequence at a
    chunk's end: an error's position is within that held-back tail plus the new chunk
    (`e.object`), so the offset counts from where that tail began, exact across boundaries.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0  # offset: bytes of the file before the current chunk
    with open(path, "rb") as f:
        while chunk := f.read(DECODE_CHUNK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                held = len(e.object) - len(chunk)  # bytes carried over from the last chunk
                at = offset - held + e.start
                with open(path, "rb") as g:
                    line += g.read(at).count(b"\n")
                byte = e.object[e.start]
                return f"{path} line {line}: byte {byte:#04x} at offset {at} is not UTF-8"
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"{path}: ends inside a UTF-8 character (truncated file?)"
    return None


def _jsonl_error(path: str, text_key: str) -> str | None:
    """'path line N: ...' at the first line that is not a JSON object with a text field."""
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                return f"{path} line {n}: not valid JSON ({e.msg})"
            if not isinstance(record, dict):
                return f"{path} line {n}: expected a JSON object, got {type(record).__name__}"
            if text_key not in record:
                return (
                    f"{path} line {n}: no field {text_key!r} (data.source.text_key); the line "
                    f"has fields {sorted(record)}"
                )
            if not isinstance(record[text_key], str):
                kind = type(record[text_key]).__name__
                return f"{path} line {n}: field {text_key!r} (data.source.text_key) is {kind}, not text"
    return None


def undecodable(files: Sequence[str], builder: str) -> str | None:
    """'path line N: ...' for the first local file of a text builder that is not UTF-8."""
    if builder not in TEXT_FORMATS:
        return None
    return next((p for f in files if not is_url(f) and (p := _decode_error(f))), None)


def diagnose(files: Sequence[str], builder: str, text_key: str) -> str | None:
    """The first problem found in local `files` read by `builder`, naming file and line."""
    for path in files:
        if is_url(path) or builder not in TEXT_FORMATS:
            continue
        problem = _decode_error(path)
        if problem is None and builder == "json" and not path.endswith(".json"):
            problem = _jsonl_error(path, text_key)
        if problem:
            return problem
    return None


def check_load_kwargs(builder: str, load_kwargs: dict[str, Any], error: TypeError) -> None:
    """Turn a builder's 'unexpected keyword argument' into a ConfigError naming the key."""
    message = str(error)
    bad = [k for k in load_kwargs if f"'{k}'" in message]
    if "unexpected keyword" in message or bad:
        raise ConfigError(
            f"data.source.load_kwargs: {bad or sorted(load_kwargs)} not accepted by the "
            f"{builder!r} loader ({message}); remove them, e.g. "
            f"'~data.source.load_kwargs.{(bad or list(load_kwargs) or ['key'])[0]}'"
        ) from None


def digest_files(files: Sequence[str]) -> str:
    """One short hash of local files' contents (names a content-keyed cache folder)."""
    h = hashlib.blake2b(digest_size=8)
    for f in files:
        h.update(content_hash(f).encode())
    return h.hexdigest()
