"""A published model's tokenizer with the special ids its release uses (models/formats).

DiffuGPT-s reuses GPT-2 token 10541 as [MASK], DiffuLLaMA LLaMA's 811 (pad 30399), LLaDA its
126336: ids the saved tokenizers do not declare as their mask token, so the data module
(whose [MASK] is the tokenizer's own mask token, else len(tokenizer)) would pick another one.
This spec loads the tokenizer (no remote code) and names those ids as its mask/pad tokens,
so `dm.mask_id` is the checkpoint's. Written into converted checkpoints as
`data.tokenizer: {_target_: diffusion.data.release_tokenizer.ReleaseTokenizer, ...}`.
"""

from __future__ import annotations

from typing import Any

from diffusion.data.base import Source, TokenizerSpec
from diffusion.data.tokenizers import load_hf_tokenizer

try:
    from diffusion.config import ConfigError
except ImportError:  # before the config module moved
    from config_utils import ConfigError


class ReleaseTokenizer(TokenizerSpec):
    """`name`'s tokenizer with `mask_token_id` (and `pad_token_id`) as its mask (pad) token."""

    def __init__(self, name: str, mask_token_id: int, pad_token_id: int | None = None) -> None:
        self.name = str(name)
        self.mask_token_id = int(mask_token_id)
        self.pad_token_id = None if pad_token_id is None else int(pad_token_id)

    def build(self, source: Source, cache_dir: str, name: str) -> Any:
        tok = load_hf_tokenizer(self.name)
        for role, wanted in (("mask", self.mask_token_id), ("pad", self.pad_token_id)):
            if wanted is None or getattr(tok, f"{role}_token_id") == wanted:
                continue
            if wanted == len(tok) and role == "mask":
                continue  # the data module's own rule: [MASK] = len(tokenizer)
            if not 0 <= wanted < len(tok):
                raise ConfigError(
                    f"data.tokenizer.{role}_token_id={wanted} is outside {self.name}'s "
                    f"vocabulary of {len(tok)}"
                )
            setattr(tok, f"{role}_token", tok.convert_ids_to_tokens(wanted))
            if getattr(tok, f"{role}_token_id") != wanted:
                raise ConfigError(
                    f"data.tokenizer: cannot make id {wanted} the {role} token of {self.name}"
                )
        return tok

    def describe(self) -> str:
        return f"{self.name} (mask {self.mask_token_id}, pad {self.pad_token_id})"


# the ModernBERT LDM's tokenizer.py (shared/reference/000): ModernBERT has no BOS/EOS or chat
# template, so it adds these five special tokens, in this order, after the base vocabulary
LDM_BOS, LDM_EOS = "<BOS>", "<EOS>"
LDM_ROLE_START, LDM_ROLE_END, LDM_TURN_END = "<START_ID>", "<END_ID>", "<EOT_ID>"
LDM_CHAT_TOKENS = (LDM_BOS, LDM_EOS, LDM_ROLE_START, LDM_ROLE_END, LDM_TURN_END)
# <BOS><START_ID>user<END_ID>\n{question}<EOT_ID><START_ID>assistant<END_ID>\n{answer}<EOS>
LDM_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '" + LDM_ROLE_START + "' + m['role'] + '" + LDM_ROLE_END + "' }}\n{{ m['content'] }}"
    "{% if m['role'] == 'user' %}{{ '" + LDM_TURN_END + "' }}{% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '" + LDM_ROLE_START + "assistant" + LDM_ROLE_END + "' }}{% endif %}"
)


class ChatTokensTokenizer(TokenizerSpec):
    """`name`'s (ModernBERT's) tokenizer with the ModernBERT LDM's added tokens: <BOS>, <EOS>
    and the chat markers appended after the base vocabulary (ids len(base) .. len(base)+4),
    pad = <EOS>, cls = <BOS>, [MASK] the base's own, and the LDM's chat template. Its release
    is a bare model.safetensors resized to these ids, so the converter (models/formats/
    modernbert_ldm.py) writes this spec with the embedding's row count as `vocab_size`."""

    def __init__(self, name: str, vocab_size: int | None = None) -> None:
        self.name = str(name)
        self.vocab_size = None if vocab_size is None else int(vocab_size)

    def build(self, source: Source, cache_dir: str, name: str) -> Any:
        tok = load_hf_tokenizer(self.name)
        present = [t for t in LDM_CHAT_TOKENS if t in tok.get_vocab()]
        if present:
            raise ConfigError(f"data.tokenizer={self.name} already has {present}: not a base")
        tok.add_special_tokens(
            {
                "bos_token": LDM_BOS,
                "eos_token": LDM_EOS,
                "additional_special_tokens": [LDM_ROLE_START, LDM_ROLE_END, LDM_TURN_END],
            }
        )
        tok.pad_token, tok.cls_token = LDM_EOS, LDM_BOS
        tok.chat_template = LDM_CHAT_TEMPLATE
        if self.vocab_size is not None and len(tok) != self.vocab_size:
            raise ConfigError(
                f"data.tokenizer: {self.name} plus the LDM's {len(LDM_CHAT_TOKENS)} chat tokens "
                f"has {len(tok)} ids, the checkpoint's embedding {self.vocab_size} rows"
            )
        return tok

    def describe(self) -> str:
        return f"{self.name} + the ModernBERT LDM's chat tokens"
