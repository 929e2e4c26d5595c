"""scripts/real_words.py: the share of generated words that are words of the plays."""

from __future__ import annotations

from tests.tiny_lm import load_script


def test_counts_only_long_words_case_insensitively() -> None:
    rw = load_script("real_words")
    vocab = {"king", "crown", "o'er"}
    texts = ["KING:\nThe crown is heflesch", "O'er trugenace, a king!"]
    # >= 4 letters: king crown heflesch | trugenace king ("o'er" has 3) -> real: king crown king
    assert rw.real_fraction(texts, vocab, 4) == (3, 5)
    assert rw.real_fraction(texts, vocab, 3) == (4, 7)  # + "the", "o'er"; "the" is not in vocab
    assert rw.real_fraction(texts, vocab, 5) == (1, 3)  # crown / heflesch trugenace


def test_the_plays_vocabulary_has_their_words_and_not_invented_ones() -> None:
    rw = load_script("real_words")
    vocab = rw.vocabulary()
    assert {"macbeth", "crown", "wherefore"} <= vocab
    assert "heflesch" not in vocab and "trugenace" not in vocab


def test_real_text_scores_near_all_and_invented_text_near_none() -> None:
    """Windows of the validation plays, cut anywhere: nearly every longer word is real (only
    the words cut at a window's edge are not); shuffled letters of them are not."""
    import random

    rw = load_script("real_words")
    vocab = rw.vocabulary()
    windows = rw.validation_windows(64)
    assert len(windows) == 64 and all(len(w) == 128 for w in windows)
    real, total = rw.real_fraction(windows, vocab, 4)
    assert total > 500 and real / total > 0.95
    rng = random.Random(0)
    shuffled = ["".join(rng.sample(w, len(w))) for w in windows]
    real, total = rw.real_fraction(shuffled, vocab, 4)
    assert total > 0 and real / total < 0.3


def test_char_entropy_by_hand() -> None:
    import math

    rw = load_script("real_words")
    assert rw.char_entropy(["aaaa"]) == 0.0
    assert math.isclose(rw.char_entropy(["abab", "aaaa"]), math.log(2) / 2)
