"""Tokenizer specs: a byte-level BPE or a character vocabulary trained on the corpus (cached),
a Hugging Face tokenizer, or the tokenizer a checkpoint of ours was trained with.

`data.tokenizer` is a spec: `{_target_: diffusion.data.tokenizers.TrainedBPE, vocab_size: N}`
or a shorthand string (`from_spec`): `bpe`, `char`, a `.ckpt` path, else a Hugging Face name
or folder. Corpus text is always encoded with special-token parsing off (`encode_text`), so a
literal "[MASK]" in a document is five characters, never the mask id.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping, Sequence
from typing import Any

import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from diffusion.data.base import (
    BOS,
    CACHE_VERSION,
    EOS,
    MASK,
    PAD,
    UNK,
    ConfigError,
    Source,
    TokenizerSpec,
    atomic_write,
    build_part,
    digest,
)


def train_tokenizer(texts: Sequence[str], kind: str, vocab_size: int) -> Tokenizer:
    """Train a `tokenizers.Tokenizer` on `texts`: byte-level BPE (`bpe`) or characters (`char`).

    Special tokens come first: [PAD]=0, [BOS]=1, [EOS]=2, [MASK]=3 (and [UNK]=4 for `char`).
    Byte-level BPE never needs [UNK] and decodes spaces and newlines exactly.
    """
    specials = [PAD, BOS, EOS, MASK]
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return tok
    if kind == "char":
        chars = sorted(set().union(*map(set, texts)))
        vocab = {t: i for i, t in enumerate([*specials, UNK, *chars])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        return tok
    raise ConfigError(f"data.tokenizer: unknown kind {kind!r}; use 'bpe', 'char' or a HF name")


def wrap_tokenizer(tok: Tokenizer) -> transformers.PreTrainedTokenizerFast:
    """A trained `tokenizers.Tokenizer` as a transformers tokenizer with our special tokens."""
    unk = {"unk_token": UNK} if tok.token_to_id(UNK) is not None else {}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, mask_token=MASK, **unk
    )


def load_hf_tokenizer(name_or_path: str) -> transformers.PreTrainedTokenizerBase:
    """A hub/local tokenizer with BOS/EOS/PAD filled in as MDLM does (no remote code)."""
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer={name_or_path}: cannot load it ({e})") from e
    if tokenizer.bos_token is None:  # BERT: [CLS] opens, [SEP] closes
        if tokenizer.cls_token is None:
            raise ConfigError(f"data.tokenizer={name_or_path}: neither a bos_token nor a cls_token")
        tokenizer.bos_token = tokenizer.cls_token
    if tokenizer.eos_token is None:
        if tokenizer.sep_token is None:
            raise ConfigError(
                f"data.tokenizer={name_or_path}: neither an eos_token nor a sep_token"
            )
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:  # GPT-2: reuse EOS, so no id is added (mask stays 50257)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_text(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of raw texts with special-token parsing off: "[MASK]" in a text is characters.

    The one way corpus documents, answers and raw prompts are encoded.
    """
    out = tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)
    return [list(ids) for ids in out["input_ids"]]


def tokenizer_digest(tokenizer: Any) -> str:
    """A short stable hash of what decides the ids: the backend (vocab, merges, normalizer,
    added tokens) or the vocabulary, the special ids and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    ids += [tokenizer.mask_token_id, len(tokenizer)]
    return digest([body, ids, getattr(tokenizer, "chat_template", None)])


def decode_rows(tokenizer: Any, mask_id: int, ids: Any, marker: str) -> list[str]:
    """(B, L) ids -> strings; padding dropped, each [MASK] shown as `marker`."""
    out = []
    for row in ids.detach().cpu().tolist():
        if tokenizer.pad_token_id != tokenizer.eos_token_id:
            row = [t for t in row if t != tokenizer.pad_token_id]
        else:  # GPT-2: pad is EOS; only trailing ones are padding
            while row and row[-1] == tokenizer.pad_token_id:
                row.pop()
        segments: list[list[int]] = [[]]
        for t in row:
            if t == mask_id:
                segments.append([])
            else:
                segments[-1].append(t)
        parts = [tokenizer.decode(s, clean_up_tokenization_spaces=False) for s in segments]
        out.append(marker.join(parts))
    return out


class _Trained(TokenizerSpec):
    """A tokenizer trained on the source's train documents, cached as tokenizer-<key>.json."""

    kind_name: str

    @abc.abstractmethod
    def settings(self) -> list[Any]:
        """What decides the trained tokenizer besides the corpus (kind, size, alphabet)."""

    def training_texts(self, source: Source) -> list[str]:
        return [t for t in source.texts("train")["text"] if t]

    def cache_key(self, source: Source) -> str:
        """What names the cached file: the settings, the train split's fingerprint (unless a
        fixed alphabet decides it) and CACHE_VERSION, so a format bump retrains every kind
        (a fixed-alphabet char tokenizer has no source fingerprint to carry the version)."""
        fixed = self.fixed_texts()
        corpus = None if fixed is not None else source.fingerprint("train")
        return digest([self.settings(), corpus, {"v": CACHE_VERSION}])

    def build(self, source: Source, cache_dir: str, name: str) -> Any:
        fixed = self.fixed_texts()
        path = os.path.join(cache_dir, name, f"tokenizer-{self.cache_key(source)}.json")
        if not os.path.exists(path):
            texts = fixed if fixed is not None else self.training_texts(source)
            vocab_size = getattr(self, "vocab_size", 0)
            atomic_write(path, train_tokenizer(texts, self.kind_name, vocab_size).save)
        return wrap_tokenizer(Tokenizer.from_file(path))

    def fixed_texts(self) -> list[str] | None:
        return None


class TrainedBPE(_Trained):
    """Byte-level BPE of `vocab_size` ids ([PAD] [BOS] [EOS] [MASK] = 0-3) trained on train."""

    kind_name = "bpe"

    def __init__(self, vocab_size: int = 2048) -> None:
        if int(vocab_size) < 260:
            raise ConfigError(f"data.tokenizer.vocab_size={vocab_size}: at least 256 bytes + 4")
        self.vocab_size = int(vocab_size)

    def settings(self) -> list[Any]:
        return ["bpe", self.vocab_size, None]

    def describe(self) -> str:
        return f"bpe (vocab_size {self.vocab_size})"


class TrainedChar(_Trained):
    """One id per character of the train split (or of a fixed `alphabet`), after the specials."""

    kind_name = "char"

    def __init__(self, alphabet: str | None = None) -> None:
        self.alphabet = alphabet

    def settings(self) -> list[Any]:
        return ["char", 2048, self.alphabet]

    def fixed_texts(self) -> list[str] | None:
        return [self.alphabet] if self.alphabet else None

    def describe(self) -> str:
        return "char" + (f" (alphabet {self.alphabet!r})" if self.alphabet else "")


MDLM_CHAR_SPECIALS = ("[CLS]", "[SEP]", BOS, EOS, MASK, PAD, "[RESERVED]", UNK)


class MDLMChar(TokenizerSpec):
    """MDLM's text8 tokenizer (its `Text8Tokenizer`): 8 specials [CLS] [SEP] [BOS] [EOS] [MASK]
    [PAD] [RESERVED] [UNK] = 0-7, then one id per `alphabet` character (text8's a-z and space:
    8-34), lowercased. MDLM's text8 checkpoints were trained on these ids ([MASK] = 4), so a
    converted one is evaluated with exactly this layout (`models/formats/mdlm_lightning.py`)."""

    def __init__(self, alphabet: str = "abcdefghijklmnopqrstuvwxyz ") -> None:
        if not alphabet or len(set(alphabet)) != len(alphabet):
            raise ConfigError(f"data.tokenizer.alphabet={alphabet!r}: distinct characters")
        self.alphabet = alphabet

    def build(self, source: Source | None, cache_dir: str, name: str) -> Any:
        vocab = {t: i for i, t in enumerate([*MDLM_CHAR_SPECIALS, *self.alphabet])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        return wrap_tokenizer(tok)

    def describe(self) -> str:
        return f"mdlm char ({len(MDLM_CHAR_SPECIALS) + len(self.alphabet)} ids, [MASK] = 4)"


class HFTokenizer(TokenizerSpec):
    """A Hugging Face tokenizer by hub name or local folder (never remote code)."""

    def __init__(self, name: str) -> None:
        self.name = str(name)

    def build(self, source: Source, cache_dir: str, name: str) -> Any:
        return load_hf_tokenizer(self.name)

    def describe(self) -> str:
        return self.name


class CheckpointTokenizer(TokenizerSpec):
    """The tokenizer a checkpoint of ours was trained with, rebuilt from its saved data config
    (our bpe/char tokenizers are trained on the corpus, so SFT must reuse exactly that one)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.expanduser(str(path))

    def build(self, source: Source, cache_dir: str, name: str) -> Any:
        from diffusion.data.from_checkpoint import tokenizer_from_checkpoint

        return tokenizer_from_checkpoint(self.path, cache_dir)

    def describe(self) -> str:
        return self.path


def from_spec(spec: Any) -> TokenizerSpec:
    """`data.tokenizer` as a TokenizerSpec: a built spec, a `_target_` mapping or a shorthand."""
    if isinstance(spec, TokenizerSpec):
        return spec
    if spec is None:
        raise ConfigError(
            "data.tokenizer is null: give bpe, char, a Hugging Face name, or the pretrained "
            ".ckpt whose tokenizer to reuse (recipes set it from training.init_from_ckpt)"
        )
    if isinstance(spec, Mapping):
        return build_part(spec, "tokenizer", "data.tokenizer")
    text = str(spec)
    if text == "bpe":
        return TrainedBPE()
    if text == "char":
        return TrainedChar()
    if text.endswith(".ckpt"):
        return CheckpointTokenizer(text)
    return HFTokenizer(text)
