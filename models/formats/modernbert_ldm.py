"""The ModernBERT language diffusion model (shared/reference/000): a bare `model.safetensors`.

Its training scripts (accelerate) save the state dict of `AutoModelForMaskedLM` built from
`--hf_model_name` (answerdotai/ModernBERT-large) and resized to its tokenizer, which gains the
chat-template tokens for SFT: keys `model.embeddings.*`, `model.layers.N.{attn_norm (not on
layer 0), attn.Wqkv, attn.Wo, mlp_norm, mlp.Wi, mlp.Wo}`, `model.final_norm`, `head.{dense,
norm}`, `decoder.{weight, bias}` (the decoder weight is tied to the token embedding, so a
deduplicating save may keep only one of the two). There is no config.json: the base model's
config comes from `backbone.pretrained=` (default ModernBERT-large) and the vocabulary size
from the embedding rows. The tokenizer: `data.tokenizer=` if given, else tokenizer files
beside the weights, else the LDM's own rebuilt from the base (its tokenizer.py appends <BOS>,
<EOS>, <START_ID>, <END_ID>, <EOT_ID>; pad = <EOS>; its chat template), which the row count
must fit; the data module checks the size again. Loads into `backbone=hf_mlm` (models/hf.py):
bidirectional, its own [MASK], no time conditioning, no shift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.formats.common import FormatError, make_checkpoint, read_safetensors, strict_match

NAME = "modernbert_ldm"
BASE = "answerdotai/ModernBERT-large"
EMB = "model.embeddings.tok_embeddings.weight"


def weights_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if (
        path.is_dir()
        and not (path / "config.json").exists()
        and (path / "model.safetensors").is_file()
    ):
        return path / "model.safetensors"
    return None


def detect(path: Path) -> bool:
    file = weights_file(path)
    if file is None:
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            keys = set(f.keys())
    except Exception:  # unreadable: not ours to claim
        return False
    return EMB in keys and "head.dense.weight" in keys


def option(overrides: tuple[str, ...], key: str, default: str) -> str:
    for o in overrides:
        if o.startswith(key + "="):
            return o.split("=", 1)[1]
    return default


def base_config(file: Path, base: str) -> Any:
    """The base model's transformers config (ModernBERT; the release has no config.json)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise FormatError(
            f"{file}: the base model config {base} is not reachable ({e}); pass "
            "backbone.pretrained=<local ModernBERT folder>"
        ) from e
    if config.model_type != "modernbert":
        raise FormatError(f"backbone.pretrained={base} is a {config.model_type}, not ModernBERT")
    return config


def mlm_weights(found: dict[str, Any], config: Any, file: Path) -> dict[str, torch.Tensor]:
    """The file's tensors matched strictly against ModernBertForMaskedLM(config), the decoder
    tied to the embedding, named as our HFMaskedLM holds them (under `.model`)."""
    import transformers

    with torch.device("meta"):
        model = transformers.ModernBertForMaskedLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if "decoder.weight" not in found:  # tied to the embedding; one name was kept
        expected.pop("decoder.weight")
    tensors = dict(strict_match(expected, found, str(file)))
    head = tensors.pop("decoder.weight", None)
    if head is not None and not torch.equal(head, tensors[EMB]):
        raise FormatError(f"{file}: decoder.weight differs from {EMB} (tied in ModernBERT)")
    tensors["decoder.weight"] = tensors[EMB]
    return {f"model.{k}": v for k, v in tensors.items()}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def ldm_tokenizer(file: Path, base: str, vocab: int) -> str | dict[str, Any]:
    """The release's tokenizer: tokenizer files saved beside the weights, else the LDM's own
    (its tokenizer.py: the base plus five chat tokens, diffusion.data.release_tokenizer.
    ChatTokensTokenizer) when the embedding has exactly that many more rows than the base
    tokenizer, else the base itself when the rows match it; anything else is an error."""
    from diffusion.data.release_tokenizer import LDM_CHAT_TOKENS
    from diffusion.data.tokenizers import load_hf_tokenizer

    if any((file.parent / name).is_file() for name in TOKENIZER_FILES):
        return str(file.parent)
    try:
        n = len(load_hf_tokenizer(base))
    except Exception as e:  # unreachable base tokenizer
        raise FormatError(f"{file}: the base tokenizer {base} is not reachable ({e})") from e
    if vocab == n + len(LDM_CHAT_TOKENS):
        spec = "diffusion.data.release_tokenizer.ChatTokensTokenizer"
        return {"_target_": spec, "name": base, "vocab_size": vocab}
    if vocab == n:
        return base
    raise FormatError(
        f"{file}: {EMB} has {vocab} rows; the base tokenizer {base} has {n} ids "
        f"({n + len(LDM_CHAT_TOKENS)} with the LDM's chat tokens) - pass data.tokenizer=<its folder>"
    )


def load(path: Path, use_ema: bool = True, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """The release as our checkpoint dict: backbone=hf_mlm on its base config, SUBS, no time
    conditioning; `backbone.pretrained=` and `data.tokenizer=` in overrides are honoured."""
    file = weights_file(path)
    if file is None:
        raise FormatError(f"{path}: no ModernBERT LDM model.safetensors found")
    found = read_safetensors([file])
    if EMB not in found:
        raise FormatError(f"{file}: tensor {EMB!r} is missing")
    vocab = int(found[EMB][0].shape[0])
    base = option(overrides, "backbone.pretrained", BASE)
    config = base_config(file, base)
    config.vocab_size = vocab
    weights = mlm_weights(found, config, file)
    given = option(overrides, "data.tokenizer", "")
    tokenizer = given or ldm_tokenizer(file, base, vocab)
    length = min(1024, int(config.max_position_embeddings))  # its SFT context: 1024
    config_overrides = [
        "backbone=hf_mlm",
        f"backbone.pretrained={base}",
        "parameterization=subs",
        "noise=loglinear",
        "T=0",
        "time_conditioning=false",
        "training.ema=0",
        "model=small",
        f"model.name=modernbert-ldm-{config.hidden_size}x{config.num_hidden_layers}",
        f"model.length={length}",
        "data=openwebtext",
        *([f"data.tokenizer={tokenizer}"] if isinstance(tokenizer, str) else []),
        *(o for o in overrides if not o.startswith(("backbone.pretrained=", "data.tokenizer="))),
    ]
    info = {
        "format": NAME,
        "source": str(file),
        "base": base,
        "vocab_size": vocab,
        "mask_id": "the tokenizer's own [MASK]",
        "shift": False,
        "time_conditioning": False,
        "tokenizer": tokenizer,
        "length": length,
        "ema": "released weights",
    }
    patch = {} if isinstance(tokenizer, str) else {"data.tokenizer": tokenizer}
    return make_checkpoint(config_overrides, weights, info, patch=patch)
