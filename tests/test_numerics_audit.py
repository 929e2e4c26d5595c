"""Numerics audit: DUO's NELBO at alpha = 1, SUBS leaving the caller's logits alone, the mask
column at any sampling temperature, BD3-LM's clip search off the validation generator, and
the CPU tanh-GELU's autograd contract. Golden values by hand or by the original formulas."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion.denoiser import MaskedModelDenoiser
from diffusion.noise import LogLinear
from diffusion.objectives.bd3lm import BD3LM
from diffusion.objectives.duo import usdm_nelbo
from diffusion.objectives.subs import NEG_INF, SUBS, subs_log_p_x0
from models.dit import DiT, TanhGELU, _TanhGELUCPU
from samplers.base import filter_log_probs, sample_categorical
from samplers.ddpm import DDPMSampler


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- 1. DUO at alpha = 1


def usdm_unguarded(log_x_theta: Tensor, x0: Tensor, x_t: Tensor, alpha: Tensor, beta: Tensor):
    """`usdm_nelbo` as it was before the alpha = 1 guard (0 * log 0 there): the reference."""
    K = log_x_theta.shape[-1]
    a = alpha.to(torch.float64)
    x_theta = log_x_theta.to(torch.float64).exp()
    xbar_theta = K * a[..., None] * x_theta + (1 - a[..., None])
    log_xbar_theta = xbar_theta.log()
    z = x_t[..., None]
    xbar_theta_z = xbar_theta.gather(-1, z).squeeze(-1)
    log_xbar_theta_z = log_xbar_theta.gather(-1, z).squeeze(-1)
    log_xbar_theta_x = log_xbar_theta.gather(-1, x0[..., None]).squeeze(-1)
    same = (x0 == x_t).to(torch.float64)
    hi, lo = K * a + 1 - a, 1 - a
    xbar_z = same * hi + (1 - same) * lo
    log_hi, log_lo = torch.log(hi), torch.log(lo)
    log_xbar_z = same * log_hi + (1 - same) * log_lo
    all_true = (K - 1) * lo * log_lo + hi * log_hi
    all_theta = lo * log_xbar_theta.sum(-1) + K * a * log_xbar_theta_x
    rest_true = all_true - xbar_z * log_xbar_z
    rest_theta = all_theta - xbar_z * log_xbar_theta_z
    bracket = (
        K / xbar_theta_z
        - K / xbar_z
        + (rest_true - rest_theta) / xbar_z
        + (K - xbar_z) / xbar_z * (log_xbar_theta_z - log_xbar_z)
    )
    return (beta.to(torch.float64) / K * bracket).float()


def test_usdm_nelbo_at_alpha_one_is_the_limit_with_finite_gradients() -> None:
    """alpha = 1, x_t = x0 = z: xbar = K at z and 0 elsewhere, xbar_theta = K x_theta, so the
    sum over z' != z is sum x_theta(z') / x_theta(z) - 0 + 0 log 0 = 1 / x_theta(z) - 1."""
    K = 5
    logits = torch.randn(2, 3, K, generator=gen(0), dtype=torch.float64)
    log_x = logits.log_softmax(-1).requires_grad_(True)
    x0 = torch.tensor([[0, 1, 4], [2, 2, 3]])
    alpha = torch.ones(2, 1, dtype=torch.float64)
    beta = torch.tensor([[1.7], [0.4]], dtype=torch.float64)
    value = usdm_nelbo(log_x, x0, x0, alpha, beta)
    p_z = log_x.detach().exp().gather(-1, x0[..., None]).squeeze(-1)
    by_hand = (beta / K * (1 / p_z - 1)).float()
    assert bool(torch.isfinite(value).all()), value
    torch.testing.assert_close(value, by_hand, rtol=1e-6, atol=0.0)
    assert bool(torch.isnan(usdm_unguarded(log_x.detach(), x0, x0, alpha, beta)).all())
    value.sum().backward()
    assert bool(torch.isfinite(log_x.grad).all())
    # the perfect denoiser scores 0 at alpha = 1
    perfect = torch.nn.functional.one_hot(x0, K).double().clamp_min(1e-300).log()
    assert float(usdm_nelbo(perfect, x0, x0, alpha, beta).abs().max()) == 0.0
    # continuous: just below alpha = 1 the unguarded formula tends to the same value
    near = usdm_unguarded(log_x.detach(), x0, x0, alpha - 1e-9, beta)
    torch.testing.assert_close(near, by_hand, rtol=1e-5, atol=0.0)


def test_usdm_nelbo_guard_is_bit_identical_below_alpha_one() -> None:
    K = 7
    g = gen(1)
    log_x = torch.randn(4, 9, K, generator=g, dtype=torch.float64).log_softmax(-1)
    x0 = torch.randint(0, K, (4, 9), generator=g)
    x_t = torch.where(
        torch.rand(4, 9, generator=g) < 0.5, x0, torch.randint(0, K, (4, 9), generator=g)
    )
    alpha = torch.tensor([[1e-6], [0.3], [0.9], [1 - 1e-7]], dtype=torch.float64)
    beta = torch.tensor([[2.0], [0.5], [1.1], [3.0]], dtype=torch.float64)
    assert torch.equal(
        usdm_nelbo(log_x, x0, x_t, alpha, beta), usdm_unguarded(log_x, x0, x_t, alpha, beta)
    )


# ----------------------------------------------------------------------------- 2. SUBS in place


def subs_reference(logits: Tensor, x_t: Tensor, mask_id: int) -> Tensor:
    """The original six lines, on a private copy."""
    logits = logits.float().clone()
    logits[..., mask_id] = NEG_INF
    log_p = logits.log_softmax(dim=-1)
    carry = torch.full_like(log_p, NEG_INF)
    carry.scatter_(-1, x_t[..., None], 0.0)
    return torch.where((x_t != mask_id)[..., None], carry, log_p)


def test_subs_log_p_x0_leaves_the_callers_logits_unchanged() -> None:
    mask_id, V = 5, 6
    logits = torch.randn(2, 4, V, generator=gen(2))
    logits[..., mask_id] = 7.0  # the network's mask logit, which SUBS ignores
    before = logits.clone()
    x_t = torch.tensor([[5, 1, 5, 3], [0, 5, 5, 5]])
    out = subs_log_p_x0(logits, x_t, mask_id)
    assert torch.equal(logits, before)  # float32: `.float()` is the caller's tensor
    assert torch.equal(out, subs_reference(before, x_t, mask_id))
    half = before.bfloat16()
    assert torch.equal(subs_log_p_x0(half, x_t, mask_id), subs_reference(half, x_t, mask_id))
    # a leaf that requires grad (an in-place write would raise); the mask column gets no grad
    leaf = before.clone().requires_grad_(True)
    subs_log_p_x0(leaf, x_t, mask_id).gather(-1, torch.zeros_like(x_t)[..., None]).sum().backward()
    assert bool((leaf.grad[..., mask_id] == 0).all()) and torch.equal(leaf.detach(), before)


# ----------------------------------------------------------------------------- 3. temperature


class FixedBackbone(torch.nn.Module):
    """Fixed (L, V) float32 logits for every row; returns views of one tensor (no copy)."""

    supports_span_cache = False

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x_t, sigma=None, attention_mask=None):
        return self.logits.expand(x_t.shape[0], -1, -1)[:, : x_t.shape[1]]


def test_high_temperature_never_gives_the_mask_column_probability() -> None:
    mask_id, V = 7, 8
    logits = torch.randn(1, 3, V, generator=gen(3))
    log_p = subs_log_p_x0(logits, torch.tensor([[mask_id, 2, mask_id]]), mask_id)
    for temperature in (2000.0, 1e4, 1e6, 1e30):
        probs = filter_log_probs(log_p, temperature).double().softmax(-1)
        assert float(probs[..., mask_id].max()) == 0.0, temperature
        assert float(probs[0, 1, 2]) == 1.0  # the one-hot row of a visible token stays one-hot
        assert bool((probs[0, [0, 2], :mask_id] > 0.1).all())  # real tokens: almost uniform
    # below 1 (and at 1) the filter is the plain formula, bit for bit
    for temperature in (1.0, 0.7, 0.05):
        assert torch.equal(
            filter_log_probs(log_p, temperature), (log_p / temperature).log_softmax(-1)
        )
    # above 1 the live entries are the plain formula's; only probability-0 ones become -inf
    plain = (log_p / 2.0).log_softmax(-1)
    hot = filter_log_probs(log_p, 2.0)
    live = log_p > -1e5
    assert torch.equal(hot[live], plain[live]) and bool((hot[~live] == -torch.inf).all())
    draws = sample_categorical(filter_log_probs(log_p[0], 1e6), torch.rand(3, generator=gen(4)))
    assert draws[1] == 2


def test_ddpm_at_a_huge_temperature_never_unmasks_to_mask() -> None:
    mask_id, V, L = 7, 8, 64
    subs = SUBS(LogLinear(1e-3), mask_id=mask_id, vocab_size=V, T=0)
    denoiser = MaskedModelDenoiser(FixedBackbone(torch.randn(1, L, V, generator=gen(5))), subs)
    out = DDPMSampler(steps=1, temperature=1e6).sample(denoiser, 8, L, generator=gen(6))
    assert not bool((out.tokens == mask_id).any())


# ----------------------------------------------------------------------------- 4. BD3-LM var_min

BD3_V = 12


def tiny_dit(length: int) -> DiT:
    torch.manual_seed(0)
    net = DiT(BD3_V, hidden_size=32, n_blocks=2, n_heads=2, max_length=length, cond_dim=16)
    net = net.double().eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return net


def validation_losses(var_min: bool, seeded: bool = True) -> tuple[list[Tensor], BD3LM]:
    """Two consecutive validation batches under one seeded generator (or the global RNG),
    after a training step."""
    L = 16
    net = tiny_dit(L)
    bd3 = BD3LM(
        LogLinear(),
        BD3_V - 1,
        BD3_V,
        block_size=4,
        var_min=var_min,
        clip_search_widths=[0.5],
        clip_search_delta=0.25,
    )
    bd3.train()
    x_warm = torch.randint(0, BD3_V - 1, (2, L), generator=gen(5))
    bd3.loss(net, x_warm, torch.ones_like(x_warm), gen(5))
    bd3.eval()
    torch.manual_seed(1)
    g = gen(1) if seeded else None
    out = []
    with torch.no_grad():
        for seed in (0, 1):
            x0 = torch.randint(0, BD3_V - 1, (4, L), generator=gen(seed))
            out.append(bd3.loss(net, x0, torch.ones_like(x0), g).nll)
    return out, bd3


def test_bd3lm_clip_search_does_not_change_the_validation_losses() -> None:
    on, searched = validation_losses(True)
    off, _ = validation_losses(False)
    assert len(searched.clip_variances()) == len(searched.clip_grid)  # the search did run
    for a, b in zip(on, off, strict=True):
        assert torch.equal(a, b)
    on, _ = validation_losses(True, seeded=False)
    off, _ = validation_losses(False, seeded=False)
    for a, b in zip(on, off, strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- 5. CPU tanh-GELU


def test_tanh_gelu_cpu_gradcheck_and_input_untouched() -> None:
    x = (torch.randn(3, 17, generator=gen(7), dtype=torch.float64) * 3).requires_grad_(True)
    assert torch.autograd.gradcheck(_TanhGELUCPU.apply, (x,), eps=1e-6, atol=1e-8)
    for dtype in (torch.float32, torch.float64):
        leaf = torch.randn(4, 9, generator=gen(8), dtype=dtype).mul_(4).requires_grad_(True)
        before = leaf.detach().clone()
        y = TanhGELU()(leaf)
        assert y.data_ptr() != leaf.data_ptr()
        (y * torch.arange(9, dtype=dtype)).sum().backward()
        assert torch.equal(leaf.detach(), before)
        ref = before.clone().requires_grad_(True)
        y_ref = torch.nn.functional.gelu(ref, approximate="tanh")
        (y_ref * torch.arange(9, dtype=dtype)).sum().backward()
        # float32: the stock tanh saturates (grad 0) where the sigmoid form keeps ~1e-7
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y.detach(), y_ref.detach(), **tol)
        torch.testing.assert_close(leaf.grad, ref.grad, **tol)
    huge = _TanhGELUCPU.apply(torch.tensor([1e30, -1e30], requires_grad=True))
    assert math.isfinite(float(huge.detach().sum()))
