"""Tensors whose precision survives a cast of the module around them.

Lightning's `bf16-true` (and `model.half()`) casts every floating parameter and buffer of the
LightningModule. Some must not follow: float64 token counts (a bf16 count stops at 2^18), the
EMA average (at decay 0.9999 a bf16 average stands still), rotary angles at positions in the
thousands, BD3-LM's clip interval. Their modules wrap `_apply`'s function with `no_downcast`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def no_downcast(
    fn: Callable[[Tensor], Tensor], floor: torch.dtype = torch.float32
) -> Callable[[Tensor], Tensor]:
    """`fn` (a `Module._apply` function) for moves and upcasts; a floating tensor that `fn`
    would bring below `floor` (or below its own dtype, if that is lower) keeps its dtype and
    only moves to `fn`'s device."""

    def apply(t: Tensor) -> Tensor:
        moved = fn(t)
        keep = min(t.dtype.itemsize, floor.itemsize) if t.is_floating_point() else 0
        if moved.is_floating_point() and moved.dtype.itemsize < keep:
            return t.to(device=moved.device)  # a move, never a cast down
        return moved

    return apply
