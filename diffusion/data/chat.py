"""Chat rendering for instruction tuning (SFT) and prompted generation (was chat.py).

A conversation is a list of `{"role": "user" | "assistant" | "system", "content": str}`
messages. Tokenizers that ship a chat template (Llama-3, Qwen, ...) keep theirs; those
without one (ModernBERT, GPT-2, our char/BPE tokenizers) get ours, LLaDA's layout with
role tokens of our own:

    [BOS]<|user|>\\nWhat is 2+2?[EOS]<|assistant|>\\n4[EOS]

Each turn ends with the tokenizer's EOS, so `tokenizer.eos_token_id` marks where an answer
stops (SFT pads answers with EOS; a generator cuts its output at the first one). The role
tokens are added as special tokens: whole tokens even for a character-level vocabulary, and
the vocabulary grows by their count (the data module reports the new `vocab_size`, the
backbone is built with it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import transformers

from diffusion.data.tokenizers import encode_text

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}

# Jinja, rendered by transformers' apply_chat_template; `bos_token`/`eos_token` are the
# tokenizer's own. A role outside ROLE_TOKENS is an error, not silently dropped text.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat role must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + '\\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' + '\\n' }}{% endif %}"
)


def ensure_chat_template(
    tokenizer: transformers.PreTrainedTokenizerBase,
) -> transformers.PreTrainedTokenizerBase:
    """Give `tokenizer` our chat template and role tokens unless it has a template already.

    Changes the tokenizer in place (idempotent) and returns it. Call it before the model is
    built: the added role tokens enlarge the vocabulary (`len(tokenizer)`).
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token to end turns")
    missing = [t for t in ROLE_TOKENS.values() if t not in tokenizer.get_vocab()]
    if missing:
        # special tokens are matched before pre-tokenization: one id each, never split
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def chat_text(
    tokenizer: transformers.PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
) -> str:
    """A conversation rendered as text by the tokenizer's chat template (not tokenized).

    `add_generation_prompt` appends the assistant header, so the model continues with the
    answer. The template writes BOS itself.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template: build it through an "
            "SFT data config (data=sft_local or data=alpaca), which calls "
            "diffusion.data.chat.ensure_chat_template before the model is built"
        )
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _marker(i: int) -> str:
    return f"\ue000{i}\ue001"  # private-use characters: never in a template


_MARKER = re.compile("\ue000(\\d+)\ue001")


def encode_chat(
    tokenizer: transformers.PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
) -> list[int]:
    """Token ids of a conversation: the template's text (BOS, role tokens, EOS) with special
    tokens parsed, each message's content with parsing off, so content can never inject one.

    The template is rendered with a marker in place of each content; the pieces between the
    markers are the template's own text.
    """
    marked = [dict(m) | {"content": _marker(i)} for i, m in enumerate(messages)]
    pieces = _MARKER.split(chat_text(tokenizer, marked, add_generation_prompt))
    if chat_text(tokenizer, messages, add_generation_prompt) != "".join(
        str(messages[int(p)]["content"]) if i % 2 else p for i, p in enumerate(pieces)
    ):
        raise ValueError(
            f"the chat template of {tokenizer.name_or_path!r} changes message contents; "
            "contents cannot be encoded apart from the template's special tokens"
        )
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i % 2:  # a message's content
            ids += encode_text(tokenizer, [str(messages[int(piece)]["content"])])[0]
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def render_chat(
    tokenizer: transformers.PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
) -> list[int]:
    """Token ids of a conversation under the tokenizer's chat template (`encode_chat`).

    No special tokens are added on top: the template already opens with BOS.
    """
    return encode_chat(tokenizer, messages, add_generation_prompt)


def prompt_ids(tokenizer: transformers.PreTrainedTokenizerBase, user_text: str) -> list[int]:
    """The clean prefix a prompted generator feeds the sampler: one user turn + assistant header."""
    return render_chat(tokenizer, [{"role": "user", "content": user_text}], True)
