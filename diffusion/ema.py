"""Exponential moving average of the weights, used for validation and sampling (MDLM).

Built on `torch.optim.swa_utils.AveragedModel`: the average is a submodule, so it
is saved in and restored from checkpoints with the rest of the state dict.
The decay warms up as min(decay, (1 + n) / (10 + n)) so short runs are not
dominated by the random initialisation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_avg_fn(decay: float):
    """`multi_avg_fn` for AveragedModel: averaged <- lerp(averaged, current, 1 - d_n)."""

    @torch.no_grad()
    def update(averaged: list, current: list, num_averaged) -> None:
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(averaged, current, 1 - d)

    return update


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """A frozen EMA copy of `model` (parameters and buffers)."""
    ema = AveragedModel(model, multi_avg_fn=ema_avg_fn(decay), use_buffers=True)
    ema.requires_grad_(False)
    return ema
