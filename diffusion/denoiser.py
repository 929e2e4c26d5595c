"""The denoiser seam: what samplers call, `log p(x0 | x_t, t)` plus the schedule.

It wraps a backbone and an objective (in eval mode, no gradients) so samplers
never see the optimizer, the trainer or the data. `time_conditioned=False`
means the output does not depend on t, which is what makes `ddpm_cache` exact.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusion.objectives.base import AbsorbingDiffusion


class ModelDenoiser:
    """Implements `samplers.base.Denoiser` for a backbone trained with an absorbing objective."""

    def __init__(self, backbone: nn.Module, objective: AbsorbingDiffusion) -> None:
        self.backbone = backbone
        self.objective = objective
        self.mask_id = objective.mask_id
        self.vocab_size = objective.vocab_size
        self.time_conditioned = objective.time_conditioned

    def alpha(self, t: Tensor) -> Tensor:
        return self.objective.noise.alpha(t)

    @torch.no_grad()
    def log_p_x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        logits = self.backbone(x_t, self.objective.backbone_sigma(t), None)
        return self.objective.log_p_x0(logits, x_t)
