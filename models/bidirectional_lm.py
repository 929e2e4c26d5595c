"""transformers' own Llama / Qwen2 classes, built from a config and made bidirectional (LLaDA, Dream).

LLaDA-8B and Dream-7B ship their modeling code for `trust_remote_code`; we never run it. Their
architectures are a Llama (LLaDA: RMSNorm, rotary, SwiGLU, no bias, untied head) and a Qwen2
(Dream: the same plus q/k/v biases) without the causal mask, so the weights are renamed onto
`LlamaForCausalLM` / `Qwen2ForCausalLM` (models/formats/llada.py, dream.py) and the mask is
removed the way models/hf.py removes it (`config.is_causal = False` for mask creation and on
every attention module). The model is built from the config dict saved in the checkpoint
(`from_config`, no download), so a converted checkpoint rebuilds offline.

`shift=True`: the logits at position i are the model's output at position i - 1, so the
pretrained next-token head transfers. Position 0 has no left neighbour: Dream keeps its own
output there (`shift_first=own`); DiffuGPT / DiffuLLaMA keep the input token
(`shift_first=copy`, a point mass on it, as their sampler copies x[:, 0]).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import transformers
from torch import Tensor, nn

ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
}
COPY_LOGIT = 1e4  # DiffuGPT's first position under the shift: a point mass on its input token
SHIFT_FIRST = ("own", "copy")


class BidirectionalLM(nn.Module):
    """A Llama/Qwen2 decoder without its causal mask: (x_t, sigma, attention_mask) -> logits."""

    accepts_sigma: ClassVar[bool] = False  # time-agnostic: sigma is ignored
    supports_span_cache: ClassVar[bool] = False
    causal: ClassVar[bool] = False

    def __init__(
        self,
        vocab_size: int,
        arch: str,
        hf_config: dict[str, Any],
        shift: bool = False,
        shift_first: str = "own",
        max_length: int | None = None,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        if shift_first not in SHIFT_FIRST:
            raise ValueError(f"backbone.shift_first={shift_first!r}: use one of {SHIFT_FIRST}")
        if arch not in ARCHS:
            raise ValueError(f"backbone.arch={arch!r}: use one of {sorted(ARCHS)}")
        config_cls, model_cls = ARCHS[arch]
        if not isinstance(hf_config, dict):  # a DictConfig from Hydra: plain containers
            from omegaconf import OmegaConf

            hf_config = OmegaConf.to_container(hf_config, resolve=True)
        config = config_cls(**hf_config)
        if config.vocab_size != vocab_size:
            raise ValueError(
                f"backbone.hf_config.vocab_size={config.vocab_size} but the data gives "
                f"vocab_size={vocab_size}: the tokenizer does not match the checkpoint"
            )
        limit = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        if max_length is not None and limit is not None and max_length > limit:
            raise ValueError(f"model.length={max_length} exceeds max_position_embeddings={limit}")
        config._attn_implementation = attn_implementation
        self.model = model_cls(config)
        self.model.config.is_causal = False  # padding-only masks (transformers' switch)
        for module in self.model.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = False
        self.arch, self.shift, self.shift_first = arch, bool(shift), shift_first
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.hidden_size = int(config.hidden_size)

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder layers (the FLOPs count reads len(blocks) and hidden_size)."""
        return self.model.transformer.h if self.arch == "gpt2" else self.model.model.layers

    def embedding_parameters(self) -> tuple[nn.Parameter, ...]:
        params = [self.model.get_input_embeddings().weight, self.model.lm_head.weight]
        if self.arch == "gpt2":
            params.append(self.model.transformer.wpe.weight)
        return tuple(params)

    @property
    def time_conditioned(self) -> bool:
        return False

    def forward(
        self, x_t: Tensor, sigma: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.long()
        logits = self.model(input_ids=x_t, attention_mask=mask, use_cache=False).logits
        if not self.shift:
            return logits  # (B, L, V)
        if self.shift_first == "own":  # Dream
            first = logits[:, :1]
        else:  # DiffuGPT: position 0 keeps its input token
            first = torch.zeros_like(logits[:, :1]).scatter_(-1, x_t[:, :1, None], COPY_LOGIT)
        return torch.cat([first, logits[:, :-1]], dim=1)  # (B, L, V): i reads the output at i - 1
