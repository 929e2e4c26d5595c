"""MDLM's detokenizers for zero-shot evaluation, chosen by name (`data.source.detokenizer`).

Zero-shot corpora ship pre-tokenized text ("do n't", " @-@ "); MDLM and GPT-2 evaluate on
text put back into ordinary spelling, so perplexities are comparable with theirs.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from diffusion.data.base import ConfigError


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


def get_detokenizer(name: str | None) -> Callable[[str], str] | None:
    """The detokenizer called `name` (None: none), or a ConfigError listing the known ones."""
    if name is None:
        return None
    if name not in DETOKENIZERS:
        raise ConfigError(f"data.source.detokenizer={name!r} unknown; one of {list(DETOKENIZERS)}")
    return DETOKENIZERS[name]
