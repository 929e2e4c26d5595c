"""Training compute: FLOPs per token, non-embedding parameters, and steps from a FLOPs budget.

One home for the count the benchmark's MFU and `training.flops_budget` share:

    FLOPs/token = 6 x (per-token matmul weights, output head included)
                + 12 x n_layer x d_model x L          (attention scores and values, PaLM)

The sigma embedding and the adaLN projections act once per sequence, not per token, so they
are left out (as in the benchmark). SMDM counts 6 N D with N the non-embedding parameters and
no attention term; at our small widths the head and attention are a real share, so we count
them. `non_embedding_params` is SMDM's size axis: every parameter except the token (and
position) embeddings and the output head.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from omegaconf import DictConfig
from torch import nn

from diffusion.config import ConfigError

log = logging.getLogger("unmask")

# module names whose matmuls run once per sequence
PER_SEQUENCE = ("adaLN", "sigma_embed", "sigma_map")


def _matmul_modules(backbone: nn.Module):
    """(name, module) of every per-token matmul: nn.Linear and Hugging Face's Conv1D (GPT-2)."""
    for name, m in backbone.named_modules():
        if any(part in name for part in PER_SEQUENCE):
            continue
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
            yield name, m


def matmul_params(backbone: nn.Module) -> int:
    """Weights of the matmuls applied to every token (attention, MLP, output head)."""
    return sum(m.weight.numel() for _, m in _matmul_modules(backbone))


def vocab_size_of(backbone: nn.Module) -> int:
    """The backbone's output vocabulary (the DiT's attribute, or the HF input embedding rows)."""
    size = getattr(backbone, "vocab_size", None)
    if size is None and hasattr(backbone, "hf_model"):
        size = backbone.hf_model.get_input_embeddings().weight.shape[0]
    if size is None:
        raise ConfigError(f"backbone {type(backbone).__name__} exposes no vocab_size")
    return int(size)


def non_embedding_params(backbone: nn.Module) -> int:
    """Parameters outside the token/position embeddings and the output head (SMDM's N).

    A parameter shared by an embedding and the head (tied weights) is dropped once."""
    vocab = vocab_size_of(backbone)
    excluded: set[int] = set()
    for m in backbone.modules():
        if isinstance(m, nn.Embedding):
            excluded.update(id(p) for p in m.parameters(recurse=False))
        elif isinstance(m, nn.Linear) and m.out_features == vocab:
            excluded.update(id(p) for p in m.parameters(recurse=False))
    # backbones whose token embedding is a bare parameter (MDLM's DiT) name it themselves
    excluded.update(id(p) for p in getattr(backbone, "embedding_parameters", lambda: ())())
    unique = {id(p): p for p in backbone.parameters()}
    return sum(p.numel() for key, p in unique.items() if key not in excluded)


def attention_shape(backbone: nn.Module) -> tuple[int, int]:
    """(n_layer, d_model) of the attention stack: the DiT's blocks or the HF config."""
    blocks = getattr(backbone, "blocks", None)
    embed = getattr(backbone, "embed", None)
    if blocks is not None and isinstance(embed, nn.Embedding):
        return len(blocks), embed.embedding_dim
    if blocks is not None and getattr(backbone, "hidden_size", None):  # MDLM's DiT
        return len(blocks), int(backbone.hidden_size)
    if hasattr(backbone, "hf_model"):
        config = backbone.hf_model.config
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
        width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        if layers and width:
            return int(layers), int(width)
    raise ConfigError(
        f"cannot read n_layer and d_model from backbone {type(backbone).__name__} "
        "for the FLOPs count"
    )


@dataclass(frozen=True)
class FlopsCount:
    """Training FLOPs per token and its two parts."""

    matmul_params: int  # per-token matmul weights (output head included)
    n_layers: int
    d_model: int
    length: int  # training sequence length L

    @property
    def matmul(self) -> float:
        return 6.0 * self.matmul_params  # forward 2, backward 4 per weight

    @property
    def attention(self) -> float:
        return 12.0 * self.n_layers * self.d_model * self.length

    @property
    def per_token(self) -> float:
        return self.matmul + self.attention


def count_flops(n_matmul: int, n_layers: int, d_model: int, length: int) -> FlopsCount:
    return FlopsCount(int(n_matmul), int(n_layers), int(d_model), int(length))


def backbone_flops(backbone: nn.Module, length: int) -> FlopsCount:
    """The FLOPs count of `backbone` trained on rows of `length` tokens."""
    n_layers, d_model = attention_shape(backbone)
    return count_flops(matmul_params(backbone), n_layers, d_model, length)


def flops_per_token(backbone: nn.Module, n_layers: int, d: int, length: int) -> float:
    """Training FLOPs per token of `backbone` (6N + 12 n_layer d L); the benchmark's MFU."""
    return count_flops(matmul_params(backbone), n_layers, d, length).per_token


def steps_for_budget(budget: float, flops_per_token: float, tokens_per_step: int) -> int:
    """Optimizer steps a FLOPs budget buys: floor(budget / (FLOPs/token x tokens/step))."""
    if not (math.isfinite(budget) and budget > 0):
        raise ConfigError(f"training.flops_budget={budget} must be a positive number of FLOPs")
    if flops_per_token <= 0 or tokens_per_step <= 0:
        raise ConfigError(
            f"FLOPs per token ({flops_per_token}) and tokens per step ({tokens_per_step}) "
            "must be positive"
        )
    steps = int(budget // (flops_per_token * tokens_per_step))
    if steps < 1:
        raise ConfigError(
            f"training.flops_budget={budget:.3g} buys no step: one step costs "
            f"{flops_per_token * tokens_per_step:.3g} FLOPs ({flops_per_token:.3g} FLOPs/token x "
            f"{tokens_per_step} tokens); raise the budget or shrink the model or batch"
        )
    return steps


@dataclass(frozen=True)
class BudgetPlan:
    """How a FLOPs budget became trainer.max_steps (printed at start, kept in the summary)."""

    flops_budget: float
    flops_per_token: float
    matmul_flops_per_token: float
    attention_flops_per_token: float
    global_batch_size: int
    length: int
    tokens_per_step: int
    steps: int
    train_flops: float  # steps x tokens/step x FLOPs/token (<= the budget)

    def describe(self) -> str:
        return (
            f"training.flops_budget={self.flops_budget:.3g} FLOPs / ("
            f"{self.flops_per_token:.4g} FLOPs/token [6N matmul {self.matmul_flops_per_token:.4g}"
            f" + attention {self.attention_flops_per_token:.4g}] x {self.tokens_per_step} "
            f"tokens/step [global batch {self.global_batch_size} x length {self.length}]) -> "
            f"trainer.max_steps={self.steps} ({self.train_flops:.3g} FLOPs spent)"
        )


def plan_budget(budget: float, count: FlopsCount, global_batch_size: int) -> BudgetPlan:
    """The pure derivation: budget, FLOPs count and global batch -> steps."""
    tokens = int(global_batch_size) * count.length
    steps = steps_for_budget(float(budget), count.per_token, tokens)
    return BudgetPlan(
        flops_budget=float(budget),
        flops_per_token=count.per_token,
        matmul_flops_per_token=count.matmul,
        attention_flops_per_token=count.attention,
        global_batch_size=int(global_batch_size),
        length=count.length,
        tokens_per_step=tokens,
        steps=steps,
        train_flops=steps * tokens * count.per_token,
    )


def apply_flops_budget(cfg: DictConfig, backbone: nn.Module) -> BudgetPlan | None:
    """Log model.non_embedding_params; with training.flops_budget set, derive
    trainer.max_steps from it (in place, before the schedule reads ${trainer.max_steps})."""
    log.info(
        "model.non_embedding_params=%d (%.3fM); FLOPs/token %.4g",
        non_embedding_params(backbone),
        non_embedding_params(backbone) / 1e6,
        backbone_flops(backbone, int(cfg.model.length)).per_token,
    )
    budget = (cfg.get("training") or {}).get("flops_budget")
    if budget is None:
        return None
    try:
        budget = float(budget)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"training.flops_budget={budget!r} is not a number of FLOPs") from err
    count = backbone_flops(backbone, int(cfg.model.length))
    plan = plan_budget(budget, count, int(cfg.loader.global_batch_size))
    cfg.trainer.max_steps = plan.steps
    log.info("%s", plan.describe())
    return plan


def run_summary(cfg: DictConfig, backbone: nn.Module, steps: int) -> dict[str, Any]:
    """The size and compute figures of a finished run (ppl_eval.json): SMDM's N, the FLOPs
    count and the FLOPs the `steps` taken spent."""
    count = backbone_flops(backbone, int(cfg.model.length))
    tokens = int(cfg.loader.global_batch_size) * count.length
    budget = (cfg.get("training") or {}).get("flops_budget")
    return {
        "non_embedding_params": non_embedding_params(backbone),
        "flops_per_token": count.per_token,
        "flops_parts": {"matmul": count.matmul, "attention": count.attention},
        "tokens_per_step": tokens,
        "train_flops": float(steps) * tokens * count.per_token,
        "flops_budget": None if budget is None else float(budget),
        "flops_count": asdict(count),
    }
