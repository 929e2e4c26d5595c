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
from diffusion.objectives.base import LossOutput, Objective, Rows


class AR(Objective):
    """Next-token NLL; `log_p_next` is what the AR sampler draws from (via the denoiser)."""

    exact_likelihood = True
    autoregressive = True  # the denoiser exposes next-token log-probs instead of log p(x0 | x_t)
    time_conditioned = False

    def __init__(self, mask_id: int, vocab_size: int, noise: NoiseSchedule | None = None) -> None:
        """`noise` is accepted (every objective is built by the same call) and kept unused."""
        super().__init__()
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
        logits = backbone(x0[:, :-1], None, attention_mask[:, :-1])  # (B, L - 1, V)
        log_p = self.log_p_next(logits)
        nll = -log_p.gather(-1, x0[:, 1:, None]).squeeze(-1)  # position i predicts x0[i + 1]
        scored = attention_mask if loss_mask is None else attention_mask * loss_mask
        return LossOutput(nll=nll, mask=scored[:, 1:].to(nll.dtype))
