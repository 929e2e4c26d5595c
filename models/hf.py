"""Pretrained Hugging Face backbones behind the unmask seam: `(x_t, sigma, attention_mask) -> logits`.

Two adapters, one file (they share loading, vocabulary resizing, LoRA and export):

- `HFMaskedLM` (`backbone=hf_mlm`): any `AutoModelForMaskedLM` (ModernBERT by default, BERT,
  RoBERTa) trained as a masked diffusion LM with a uniform masking ratio, as the ModernBERT
  diffusion-LM recipe does (after LLaDA). The model is already bidirectional and has its own mask
  token; it is not time-conditioned, so `sigma` is ignored.
- `HFCausalBidirectional` (`backbone=hf_causal_bidirectional`): an `AutoModelForCausalLM` (GPT-2 by
  default; LLaMA-family models the same way) made bidirectional, following DiffuGPT / DiffuLLaMA
  (Gong et al. 2024, "Scaling Diffusion Language Models via Adaptation from Autoregressive
  Models"): a mask token, attention-mask annealing from causal to full, and the shift that lets
  the pretrained next-token head transfer. `sigma` is ignored here too.

Bidirectionality uses the switch transformers 5.x gives decoder models: `config.is_causal = False`
makes `create_causal_mask` build a padding-only (bidirectional) mask (this alone suffices for the
eager and SDPA paths, tested), and `is_causal = False` on every attention module covers kernels
that read the module flag when no mask is passed (the flash-attn integration).
Annealing passes a prepared 4D mask, which transformers uses as is.

Weights load with `from_pretrained` (safetensors, never `trust_remote_code`), from a hub name or a
local folder alike; `save_pretrained` writes a folder that plain `AutoModelFor*.from_pretrained`
reloads. A reloaded causal model is causal again: bidirectionality lives in this adapter, which
restores it when the folder is passed back as `pretrained=`.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
import transformers
from torch import Tensor, nn

log = logging.getLogger(__name__)

COPY_LOGIT = 1e4  # the first position under the shift: a point mass on its own input token


def default_attn_implementation() -> str:
    """`flash_attention_2` on CUDA when flash-attn is installed, else torch SDPA."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def position_limit(config: transformers.PretrainedConfig) -> int | None:
    """The model's maximum sequence length (GPT-2's n_positions maps onto this name)."""
    return getattr(config, "max_position_embeddings", None)


def check_length(length: int, limit: int | None, extra: int = 0) -> None:
    """Raise a clear error when `length` tokens (+ `extra` added by the adapter) exceed `limit`."""
    if limit is not None and length + extra > limit:
        added = f" plus {extra} BOS token added by the adapter" if extra else ""
        raise ValueError(
            f"sequence length {length}{added} exceeds the pretrained model's limit "
            f"max_position_embeddings={limit}; set model.length <= {limit - extra}"
        )


@torch.no_grad()
def resize_vocab(model: transformers.PreTrainedModel, vocab_size: int) -> None:
    """Resize input (and output) embeddings to `vocab_size`; new rows start at the mean row.

    The mean embedding is a neutral start for an added [MASK] (DiffuGPT-m adds one to GPT-2);
    shrinking drops rows the tokenizer never emits (ModernBERT pads its matrix to 50368).
    """
    old = model.get_input_embeddings().weight.shape[0]
    if vocab_size == old:
        return
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    if vocab_size < old:
        return
    inp = model.get_input_embeddings().weight
    inp[old:] = inp[:old].mean(0)
    out = model.get_output_embeddings()
    if out is not None:
        if out.weight is not inp:  # untied head (LLaMA): its own mean
            out.weight[old:] = out.weight[:old].mean(0)
        bias = getattr(out, "bias", None)
        if bias is not None and bias.shape[0] == vocab_size:
            bias[old:] = bias[:old].mean()


def apply_lora(
    model: transformers.PreTrainedModel,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: str | list[str],
    train_embeddings: bool,
) -> nn.Module:
    """Wrap `model` with peft LoRA: only the adapters (and optionally the embeddings) train.

    `train_embeddings` is DiffuLLaMA's `additional_target: embed_tokens`: the input embeddings
    (and an output head tied to them) stay trainable, so an added [MASK] row can learn.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # optional extra
        raise ImportError(
            "backbone.lora_rank > 0 needs peft: pip install -r requirements-extras.txt"
        ) from e
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    peft_model = get_peft_model(model, config)  # freezes every base parameter
    if train_embeddings:
        peft_model.get_input_embeddings().weight.requires_grad_(True)
    return peft_model


class HFAdapter(nn.Module):
    """Shared part of the two adapters: load, resize, LoRA, length check, save."""

    auto_class: type = transformers.AutoModelForMaskedLM
    kind: str = "hf_mlm"
    # capabilities (diffusion.config.check_capabilities): sigma is ignored, no span KV cache,
    # never causal, and the data must use the pretrained model's own tokenizer
    accepts_sigma: ClassVar[bool] = False
    # no span KV cache (sampler.cache=prefix|dual is refused): the masked-LM encoders take no
    # past_key_values at all; for the causal adapter a DynamicCache could hold a prefix, but the
    # dual cache must replace keys inside it and the shift moves every logit by one position:
    # not implemented
    supports_span_cache: ClassVar[bool] = False
    tokenizer_key: ClassVar[str | None] = "pretrained"
    causal: ClassVar[bool] = False

    def __init__(
        self,
        vocab_size: int | None,
        pretrained: str,
        max_length: int | None = None,
        attn_implementation: str | None = None,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: str | list[str] = "all-linear",
        train_embeddings: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.pretrained = str(pretrained)
        config = transformers.AutoConfig.from_pretrained(self.pretrained)
        self.max_positions = position_limit(config)
        self.max_length = max_length
        if max_length is not None:
            check_length(max_length, self.max_positions, self.extra_tokens())
        self.attn_implementation = attn_implementation or self.choose_attn(config)
        model = self.auto_class.from_pretrained(
            self.pretrained, attn_implementation=self.attn_implementation, use_safetensors=True
        )
        model.train()  # from_pretrained returns eval mode; a new backbone starts in train mode
        self.lora_rank = 0
        self.model: nn.Module = model
        self.base_vocab_size = model.get_input_embeddings().weight.shape[0]
        self.set_vocab_size(vocab_size)
        self.adapt(model)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.lora_rank = lora_rank
        if lora_rank > 0:
            self.model = apply_lora(
                model, lora_rank, lora_alpha, lora_dropout, lora_target_modules, train_embeddings
            )

    # ---- hooks for the subclasses ----------------------------------------------------------
    def choose_attn(self, config: transformers.PretrainedConfig) -> str:
        return default_attn_implementation()

    def extra_tokens(self) -> int:
        """Tokens the adapter adds to every sequence (a BOS under `shift_first=bos`)."""
        return 0

    def adapt(self, model: transformers.PreTrainedModel) -> None:
        """Change the loaded model in place (the causal adapter removes causality)."""

    def adapter_metadata(self) -> dict[str, Any]:
        """What to write into the exported config so a reader knows how it was trained."""
        return {"adapter": self.kind, "trained_from": self.pretrained}

    # ---- shared ------------------------------------------------------------------------------
    @property
    def hf_model(self) -> transformers.PreTrainedModel:
        """The transformers model (under the peft wrapper when LoRA is on)."""
        return self.model.get_base_model() if self.lora_rank > 0 else self.model

    def set_vocab_size(self, vocab_size: int | None) -> None:
        """Resize the embeddings to `vocab_size` (None keeps the pretrained vocabulary)."""
        if vocab_size is not None:
            resize_vocab(self.hf_model, vocab_size)
        self.vocab_size = self.hf_model.get_input_embeddings().weight.shape[0]

    def check_input(self, x_t: Tensor) -> None:
        check_length(x_t.shape[1], self.max_positions, self.extra_tokens())

    @staticmethod
    def padding_or_none(attention_mask: Tensor | None) -> Tensor | None:
        """The (B, L) padding mask, or None when nothing is padded (lets SDPA/flash skip masks)."""
        if attention_mask is None or bool(attention_mask.all()):
            return None
        return attention_mask.long()

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write a plain Hugging Face folder (safetensors + config); LoRA merged into the weights."""
        model = self.hf_model
        if self.lora_rank > 0:
            model = copy.deepcopy(self.model).merge_and_unload()
        config = model.config
        had_flag = "is_causal" in config.__dict__
        flag = config.__dict__.pop("is_causal", None)  # a plain reload must stay a plain model
        config.unmask_adapter = self.adapter_metadata()
        try:
            model.save_pretrained(out_dir, safe_serialization=True)
        finally:
            del config.unmask_adapter
            if had_flag:
                config.is_causal = flag


class HFMaskedLM(HFAdapter):
    """A pretrained masked LM (ModernBERT, BERT, RoBERTa) as a masked-diffusion backbone.

    Not time-conditioned: `sigma` is accepted and ignored (the mask pattern tells the model how
    noisy x_t is), which also makes the denoiser time-agnostic (ddpm_cache is exact).
    """

    auto_class = transformers.AutoModelForMaskedLM
    kind = "hf_mlm"

    def __init__(
        self, vocab_size: int | None, pretrained: str = "answerdotai/ModernBERT-base", **kwargs: Any
    ) -> None:
        super().__init__(vocab_size, pretrained, **kwargs)

    def forward(
        self, x_t: Tensor, sigma: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        self.check_input(x_t)
        out = self.model(input_ids=x_t, attention_mask=self.padding_or_none(attention_mask))
        return out.logits  # (B, L, V)


def anneal_ratio(step: int, anneal_steps: int) -> float:
    """Fraction of the upper triangle opened at `step` (DiffuGPT's linear schedule).

    DiffuGPT uses (step + 1) / anneal_steps; we use step / anneal_steps so that step 0 is exactly
    the pretrained causal model. `anneal_steps <= 0` means fully bidirectional from the start.
    """
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, step / anneal_steps)


def annealed_mask(
    length: int,
    ratio: float,
    key_padding: Tensor | None,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B|1, 1, L, L) bool, True = may attend: causal OR Bernoulli(ratio) (DiffuGPT's anneal).

    One random pattern per call, shared by the batch and the heads, as DiffuGPT draws it; padded
    keys are hidden and every query keeps itself so no row is empty.
    """
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    extra = torch.rand(length, length, device=device, generator=generator) < ratio
    allowed = (causal | extra)[None]  # (1, L, L)
    if key_padding is not None:
        eye = torch.eye(length, dtype=torch.bool, device=device)
        allowed = (allowed & key_padding.bool()[:, None, :]) | eye  # (B, L, L)
    return allowed[:, None]  # (B|1, 1, L, L)


class HFCausalBidirectional(HFAdapter):
    """A pretrained causal LM (GPT-2, LLaMA) made bidirectional for masked diffusion (DiffuGPT).

    - mask token: `mask_token_id=None` adds rows up to `vocab_size` (the data module's [MASK] is
      `len(tokenizer)` for GPT-2) initialised to the mean embedding, as DiffuGPT-m adds one;
      an integer reuses an existing token (DiffuGPT-s reuses GPT-2 id 10541), and the data config
      must name the same id.
    - annealing: for `anneal_steps` training steps the attention is causal plus a random share of
      the upper triangle that grows linearly (`set_training_step`); in eval mode it is always full.
    - shift: position i's output is the pretrained head's prediction from position i-1, so the
      next-token head transfers. The first position has no left neighbour: with
      `shift_first=copy` (DiffuGPT) it predicts its own input token (a clean or prompt token is
      kept, SUBS would carry it over anyway; a masked one gets a uniform distribution over the
      vocabulary, so its loss is the constant log(V - 1) with no gradient); with
      `shift_first=bos` the tokenizer's BOS is prepended inside the adapter and predicts it, as
      GPT-2 predicts a document's first token after <|endoftext|>.
    """

    auto_class = transformers.AutoModelForCausalLM
    kind = "hf_causal_bidirectional"

    def __init__(
        self,
        vocab_size: int | None,
        pretrained: str = "gpt2",
        mask_token_id: int | None = None,
        anneal_steps: int = 0,
        shift: bool = True,
        shift_first: str = "copy",
        **kwargs: Any,
    ) -> None:
        if shift_first not in ("copy", "bos"):
            raise ValueError(f"backbone.shift_first={shift_first!r}: use 'copy' or 'bos'")
        self.shift, self.shift_first = shift, shift_first
        self.anneal_steps = int(anneal_steps)
        super().__init__(vocab_size, pretrained, **kwargs)
        self.step = 0
        if mask_token_id is not None and not 0 <= mask_token_id < self.vocab_size:
            raise ValueError(
                f"backbone.mask_token_id={mask_token_id} is outside the vocabulary "
                f"(0..{self.vocab_size - 1})"
            )
        self.mask_token_id = mask_token_id
        self.bos_id = self.hf_model.config.bos_token_id
        if shift and shift_first == "bos" and self.bos_id is None:
            raise ValueError(f"{pretrained} has no bos_token_id; use backbone.shift_first=copy")
        self.warn_on_changed_recipe()

    def choose_attn(self, config: transformers.PretrainedConfig) -> str:
        impl = default_attn_implementation()
        if impl == "flash_attention_2" and self.anneal_steps > 0:
            log.info(
                "attention annealing passes 4D masks, which flash-attn cannot take: using sdpa"
            )
            return "sdpa"
        return impl

    def extra_tokens(self) -> int:
        return 1 if self.shift and self.shift_first == "bos" else 0

    def adapt(self, model: transformers.PreTrainedModel) -> None:
        """Remove the causal mask: the config flag for mask creation, the module flags for kernels."""
        model.config.is_causal = False
        for module in model.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = False

    def adapter_metadata(self) -> dict[str, Any]:
        return {
            **super().adapter_metadata(),
            "bidirectional": True,
            "shift": self.shift,
            "shift_first": self.shift_first,
            "mask_token_id": self.mask_token_id,
        }

    def warn_on_changed_recipe(self) -> None:
        """An exported folder records how it was trained; warn when the adapter now differs."""
        saved = getattr(self.hf_model.config, "unmask_adapter", None)
        if not saved:
            return
        for key in ("shift", "shift_first"):
            if key in saved and saved[key] != getattr(self, key):
                log.warning(
                    "%s was trained with %s=%s but backbone.%s=%s now",
                    self.pretrained,
                    key,
                    saved[key],
                    key,
                    getattr(self, key),
                )

    def set_training_step(self, step: int) -> None:
        """Called by the LightningModule before each training step: drives the annealing."""
        self.step = int(step)

    def attention(self, attention_mask: Tensor | None, length: int, dtype: torch.dtype, device):
        """The mask passed to the model: 2D padding (or None) when fully bidirectional, else 4D."""
        ratio = anneal_ratio(self.step, self.anneal_steps)
        padding = self.padding_or_none(attention_mask)
        if not self.training or ratio >= 1.0:
            return padding
        allowed = annealed_mask(length, ratio, padding, device)
        if self.hf_model.config._attn_implementation == "eager":  # eager adds the mask
            return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        return allowed

    def forward(
        self, x_t: Tensor, sigma: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        self.check_input(x_t)
        B, L = x_t.shape
        ids = x_t
        bos = self.shift and self.shift_first == "bos"
        if bos:  # BOS predicts the first token, as in GPT-2 pretraining
            ids = torch.cat([x_t.new_full((B, 1), self.bos_id), x_t], dim=1)  # (B, L+1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_ones(B, 1), attention_mask], 1)
        dtype = self.hf_model.get_input_embeddings().weight.dtype
        mask = self.attention(attention_mask, ids.shape[1], dtype, x_t.device)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        if not self.shift:
            return logits  # (B, L, V)
        if bos:
            return logits[:, :-1]  # (B, L, V): output i read at i+1's input
        first = torch.zeros_like(logits[:, :1])  # DiffuGPT: position 0 keeps its input token
        first.scatter_(-1, x_t[:, :1, None], COPY_LOGIT)
        return torch.cat([first, logits[:, :-1]], dim=1)  # (B, L, V)
