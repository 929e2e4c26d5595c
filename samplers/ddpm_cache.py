"""MDLM's cached ancestral sampler (`ddpm_cache`, arXiv:2406.07524).

For a time-agnostic denoiser log p(x0 | x_t) depends on x_t only, so while a step leaves
x_t unchanged the previous output is still exact and the network is not called again.
The step and the random draws are those of `ddpm`, so for the same seed the samples are
identical; the network is called at most once per change of x_t (<= tokens + 1 times).
"""

from __future__ import annotations

from samplers.ddpm import DDPMSampler


class DDPMCacheSampler(DDPMSampler):
    """`ddpm` that reuses log p(x0 | x_t) until x_t changes; refuses time-conditioned models."""

    name = "ddpm_cache"
    requires_time_agnostic = True

    def _needs_call(self, x_changed: bool, any_mask: bool) -> bool:
        """Call only when x_t changed and something is still masked (else the step is identity)."""
        return x_changed and any_mask
