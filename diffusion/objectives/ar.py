"""The autoregressive baseline: next-token cross-entropy on the causal DiT (MDLM sec. 5's AR
Transformer, trained with the same data, sizes and optimiser as the diffusion models).

Position i of the input x0[:, :-1] predicts x0[:, i + 1] (the shift). The first token of a
row is the data's BOS (or, for wrapped rows, whatever token the cut started on) and is the
one token not scored; every other real token is. The likelihood is exact, so perplexity
exp(nll per token) is exact too, not a bound. There is no forward process and no masking.
"""

from __future__ import annotations

from torch import Tensor, nn

from diffusion.noise import NoiseSchedule
from diffusion.objectives.base import (
    LossOutput,
    Objective,
    Rows,
    logsumexp_and_pick,
    scatter_rows,
    score_logits,
)


class AR(Objective):
    """Next-token NLL; `log_p_next` is what the AR sampler draws from (via the denoiser)."""

    provides = frozenset({"next_token"})
    exact_likelihood = True
    requires_causal_backbone = True

    def denoiser(self, backbone: nn.Module):
        """A next-token model: log p(next | prefix), with the backbone's KV cache."""
        from diffusion.denoiser import NextTokenDenoiser

        return NextTokenDenoiser(backbone, self)

    def __init__(
        self,
        mask_id: int,
        vocab_size: int,
        noise: NoiseSchedule | None = None,
        lean_loss: bool = True,
    ) -> None:
        """`noise` is accepted (every objective is built by the same call) and kept unused;
        `lean_loss`: the head and a float32 chunked softmax only at scored positions."""
        super().__init__()
        self.lean_loss = lean_loss
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id={mask_id} is outside the vocabulary of size {vocab_size}")
        self.mask_id = mask_id
        self.vocab_size = vocab_size
        self.noise = noise

    def log_p_next(self, logits: Tensor) -> Tensor:
        """(B, L, V) logits -> float32 log p(x[i + 1] | x[: i + 1]) over the whole vocabulary."""
        return logits.float().log_softmax(dim=-1)

    def loss(
        self,
        backbone: nn.Module,
        x0: Tensor,
        attention_mask: Tensor,
        generator=None,
        loss_mask: Tensor | None = None,
        rows: Rows = None,
    ) -> LossOutput:
        """(B, L - 1) per-token NLL of x0[:, 1:] given its prefix (scored where `loss_mask`);
        nothing is random, so `generator` and `rows` are unused."""
        if getattr(backbone, "causal", True) is False:
            raise ValueError(
                "parameterization=ar needs a causal backbone (backbone.causal=true): a "
                "bidirectional one sees the token it is asked to predict"
            )
        scored = attention_mask if loss_mask is None else attention_mask * loss_mask
        inputs, targets = x0[:, :-1], x0[:, 1:]  # position i predicts x0[i + 1]
        if self.lean_loss:
            index = scored[:, 1:].bool().flatten().nonzero().squeeze(1)  # (N,)
            logits = score_logits(backbone, inputs, None, attention_mask[:, :-1], index)
            lse, picked = logsumexp_and_pick(logits, targets.flatten()[index, None])
            nll = scatter_rows(lse - picked[:, 0], index, targets.shape)
        else:
            logits = backbone(inputs, None, attention_mask[:, :-1])  # (B, L - 1, V)
            nll = -self.log_p_next(logits).gather(-1, targets[..., None]).squeeze(-1)
        return LossOutput(nll=nll, mask=scored[:, 1:].to(nll.dtype), targets=targets, offset=1)
