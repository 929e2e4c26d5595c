"""scripts/real_words.py: the share of generated words that are words of the plays."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "real_words.py"


def load_script():
    spec = importlib.util.spec_from_file_location("real_words", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_counts_only_long_words_case_insensitively() -> None:
    rw = load_script()
    vocab = {"king", "crown", "o'er"}
    texts = ["KING:\nThe crown is heflesch", "O'er trugenace, a king!"]
    # >= 4 letters: king crown heflesch | trugenace king ("o'er" has 3) -> real: king crown king
    assert rw.real_fraction(texts, vocab, 4) == (3, 5)
    assert rw.real_fraction(texts, vocab, 3) == (4, 7)  # + "the", "o'er"; "the" is not in vocab
    assert rw.real_fraction(texts, vocab, 5) == (1, 3)  # crown / heflesch trugenace


def test_the_plays_vocabulary_has_their_words_and_not_invented_ones() -> None:
    rw = load_script()
    vocab = rw.vocabulary()
    assert {"macbeth", "crown", "wherefore"} <= vocab
    assert "heflesch" not in vocab and "trugenace" not in vocab
