"""MDLM's cached ancestral sampler (`ddpm_cache`, arXiv:2406.07524), cached per row.

For a time-agnostic denoiser log p(x0 | x_t) depends on x_t only, so while a step leaves a
row's x_t unchanged its previous output is still exact. MDLM skips a call only when no row
of the batch changed, which at batch 16 and T = 1000 saves almost nothing; here the network
runs on the sub-batch of rows that changed (and still hold a mask), gathered and scattered
back, so each row costs at most its number of distinct states (<= tokens + 1) whatever the
batch size. The step and the random draws are those of `ddpm`, so for the same seed the
samples are identical.
"""

from __future__ import annotations

from torch import Tensor

from samplers.ddpm import DDPMSampler


class DDPMCacheSampler(DDPMSampler):
    """`ddpm` that reuses each row's log p(x0 | x_t) until that row changes."""

    name = "ddpm_cache"
    requires = frozenset({"absorbing", "time_agnostic", "whole_canvas"})

    def _rows_to_call(self, changed: Tensor, has_mask: Tensor) -> Tensor:
        """Rows whose x_t changed and still hold a mask (for the others the step is exact
        with the stored output, or the identity)."""
        return changed & has_mask
