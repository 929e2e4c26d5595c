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
