"""The DiT backbone: shapes, bidirectionality, the causal flag, padding, conditioning."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from models.dit import DiT, TanhGELU


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=11, hidden_size=32, n_blocks=2, n_heads=4, max_length=16, cond_dim=8)
    args.update(kw)
    model = DiT(**args)
    for p in model.parameters():  # break the zero init so outputs depend on inputs
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def test_shapes_and_bidirectional():
    model = tiny()
    x = torch.randint(0, 11, (2, 9))
    out = model(x)
    assert out.shape == (2, 9, 11)
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 11
    assert not torch.allclose(model(x2)[:, 0], out[:, 0])  # the last token reaches position 0


def test_causal_flag_hides_the_future():
    model = tiny(causal=True)
    x = torch.randint(0, 11, (2, 9))
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 11
    torch.testing.assert_close(model(x2)[:, :-1], model(x)[:, :-1])


def test_padding_mask_isolates_padded_keys():
    model = tiny()
    x = torch.randint(0, 11, (1, 8))
    attn = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    x2 = x.clone()
    x2[:, 6] = (x2[:, 6] + 3) % 11  # change a padded token
    torch.testing.assert_close(
        model(x, attention_mask=attn)[:, :5], model(x2, attention_mask=attn)[:, :5]
    )


def test_time_conditioning_uses_sigma():
    model = tiny(time_conditioning=True)
    x = torch.randint(0, 11, (2, 6))
    a = model(x, sigma=torch.tensor([0.1, 0.1]))
    b = model(x, sigma=torch.tensor([2.0, 2.0]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="needs sigma"):
        model(x)


def test_too_long_sequence_is_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match="max_length=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_angles_stay_float32_when_the_model_is_cast_to_half(dtype):
    """`model.to(bf16)` (Lightning's bf16-true) cast the rotary table: at p = 1000 a bf16
    position and inv_freq put the angles radians off. They stay float32 (float64 upcasts)."""
    model = tiny()
    want = model.rotary(1024, torch.device("cpu"))
    model.to(dtype)
    assert model.rotary.inv_freq.dtype == torch.float32
    assert model.embed.weight.dtype == dtype  # the rest of the model is cast
    got = model.rotary(1024, torch.device("cpu"))
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert model.double().rotary.inv_freq.dtype == torch.float64


def test_sigma_features_are_computed_in_float32_when_the_model_is_cast_to_bf16():
    """Under bf16-true the sinusoidal features of sigma were computed in bf16 (sigma * freq
    rounded to 3 digits before cos / sin); now in float32, then cast for the MLP."""
    model = tiny(time_conditioning=True).to(torch.bfloat16)
    seen = []
    model.sigma_embed.mlp[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    sigma = torch.tensor([0.3, 2.7, 6.9])
    model.sigma_embed(sigma.to(torch.bfloat16))
    half = model.sigma_embed.freq_dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float64) / half)
    args = sigma.to(torch.bfloat16).double()[:, None] * freqs
    want = torch.cat([args.cos(), args.sin()], -1)
    assert seen[0].dtype == torch.bfloat16
    err = (seen[0].double() - want).abs().max().item()
    assert err <= 2**-9  # bf16's rounding of a float32 value in [-1, 1]: half an ulp at most


# ---- the fused forward equals a slow reference (rotary, adaLN modulate, gated residuals) ----
def slow_forward(model: DiT, x: Tensor, sigma=None, attention_mask=None) -> Tensor:
    """The DiT written out op by op in the classic form: separate q / k rotations by
    x * cos + rotate_half(x) * sin with repeated-halves tables, x * (1 + scale) + shift,
    x + gate * y. Same SDPA calls as the model, so only the fused elementwise work differs."""
    B, L = x.shape
    h = model.embed(x)
    cond = model._condition(sigma, B)
    freqs = torch.outer(torch.arange(L, dtype=torch.float32), model.rotary.inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # (L, D)
    cos, sin = emb.cos(), emb.sin()
    pad = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    if pad is not None and model.causal:
        pad = pad & torch.ones(L, L, dtype=torch.bool).tril()

    def rot(t: Tensor) -> Tensor:  # (B, H, L, D)
        half = t.shape[-1] // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin

    for blk in model.blocks:
        s1, c1, g1, s2, c2, g2 = blk.adaLN(cond).chunk(6, dim=-1)
        H = blk.n_heads
        z = F.layer_norm(h, (h.shape[-1],)) * (1 + c1[:, None]) + s1[:, None]
        q, k, v = blk.qkv(z).view(B, L, 3, H, -1).permute(2, 0, 3, 1, 4)
        q, k = rot(q), rot(k)
        if pad is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=model.causal)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=pad)
        h = h + g1[:, None] * blk.proj(a.transpose(1, 2).reshape(B, L, -1))
        z = F.layer_norm(h, (h.shape[-1],)) * (1 + c2[:, None]) + s2[:, None]
        h = h + g2[:, None] * blk.mlp[2](F.gelu(blk.mlp[0](z), approximate="tanh"))  # ATen's
    s, c = model.final.adaLN(cond).chunk(2, dim=-1)
    z = F.layer_norm(h, (h.shape[-1],)) * (1 + c[:, None]) + s[:, None]
    return model.final.linear(z)


def assert_same(a: Tensor, b: Tensor, tol: float = 4e-6, what: str = "") -> None:
    """a equals b up to float32 rounding: max |a - b| <= tol * max |b|. The fused ops
    (addcmul) round a * b + c once where the classic form rounds twice, and a time-agnostic
    DiT's gates scale the weights before the matmul, not its output: some ulps apart."""
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= tol * scale, f"{what} max |diff| {err:.3g} > {tol:g} x scale {scale:.3g}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("timed", [True, False])
def test_fused_forward_and_grads_equal_the_slow_reference(causal, padded, timed):
    """Per-row modulations (time-conditioned) and the shared ones of a time-agnostic DiT
    (folded into the LayerNorms' affine and the gated layers' weights) alike."""
    model = tiny(causal=causal, time_conditioning=timed).train()
    x = torch.randint(0, 11, (3, 10))
    sigma = torch.tensor([0.3, 1.1, 2.0]) if timed else None
    attn = None
    if padded:
        attn = torch.ones(3, 10, dtype=torch.long)
        attn[1, 6:] = 0
    out = model(x, sigma=sigma, attention_mask=attn)
    ref = slow_forward(model, x, sigma=sigma, attention_mask=attn)
    assert_same(out, ref)
    weights = torch.randn_like(out)  # a loss touching every logit
    grads = torch.autograd.grad((out * weights).sum(), list(model.parameters()))
    ref_grads = torch.autograd.grad((ref * weights).sum(), list(model.parameters()))
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert_same(g, r, tol=3e-5, what=name)  # sums over rows compound the roundings


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("timed", [True, False])
def test_scored_rows_equal_the_slow_reference_and_skip_the_last_mlp(causal, timed):
    """positions_to_score (the lean loss): the logits and gradients of those rows equal the
    slow reference's, while the last block runs its projection and MLP on those rows only
    (the earlier blocks on every position: the last attention needs all keys)."""
    model = tiny(causal=causal, time_conditioning=timed).train()
    x = torch.randint(0, 11, (3, 10))
    sigma = torch.tensor([0.3, 1.1, 2.0]) if timed else None
    attn = torch.ones(3, 10, dtype=torch.long)
    attn[1, 6:] = 0
    index = torch.tensor([0, 4, 9, 12, 15, 23, 27])  # rows of samples 0, 1 and 2
    rows = {}

    def seen(n: int):
        def hook(module, inputs, output) -> None:
            rows[n] = inputs[0].shape

        return hook

    hooks = [blk.mlp[0].register_forward_hook(seen(n)) for n, blk in enumerate(model.blocks)]
    out = model(x, sigma=sigma, attention_mask=attn, positions_to_score=index)
    for h in hooks:
        h.remove()
    assert rows == {0: torch.Size([3, 10, 32]), 1: torch.Size([7, 32])}
    ref = slow_forward(model, x, sigma=sigma, attention_mask=attn).flatten(0, 1)[index]
    assert_same(out, ref)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), list(model.parameters()), allow_unused=True)
    ref_grads = torch.autograd.grad((ref * weights).sum(), list(model.parameters()))
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert_same(g, r, tol=3e-5, what=name)


def test_the_cpu_gelu_kernel_equals_atens_tanh_gelu_and_its_derivative():
    """TanhGELU's CPU kernel (x * sigmoid(2u), the derivative written by the forward) against
    ATen's tanh-GELU: equal in float64 to rounding, in float32 as close to the float64 truth
    as ATen's own kernel is, and finite where the polynomial would overflow (derivative 1 far
    right, 0 far left). The exact-erf GELU, 1e-3 away, must fail the same check."""
    far = torch.tensor([-1e30, -1e13, -100.0, 100.0, 1e13, 1e30], dtype=torch.float64)
    x64 = torch.cat([torch.linspace(-12, 12, 20_001, dtype=torch.float64), far])
    for dtype in (torch.float64, torch.float32):
        x = x64.to(dtype).requires_grad_()
        truth_x = x.detach().double().requires_grad_()
        truth = F.gelu(truth_x, approximate="tanh")
        (truth_grad,) = torch.autograd.grad(truth.sum(), truth_x)
        y = TanhGELU()(x)
        (grad,) = torch.autograd.grad(y.sum(), x)
        assert y.dtype == dtype and torch.isfinite(grad).all()
        tol = 1e-12 if dtype == torch.float64 else 4e-6  # ATen's float32: 4e-7 / 1e-6 off
        assert (y.double() - truth.detach()).abs().max() <= tol * 10
        assert (grad.double() - truth_grad).abs().max() <= tol
        assert grad[-3:].tolist() == [1.0, 1.0, 1.0] and grad[-6:-4].tolist() == [0.0, 0.0]
    with torch.no_grad():  # inference: no derivative buffer, the same values
        assert torch.equal(TanhGELU()(x.detach()), y.detach())
    small = x64[:20_001].float().requires_grad_()
    erf_grad = torch.autograd.grad(F.gelu(small).sum(), small)[0]
    ours_grad = torch.autograd.grad(TanhGELU()(small).sum(), small)[0]
    assert (erf_grad - ours_grad).abs().max() > 100 * 4e-6  # 1e-3 apart: caught


def test_fused_rotary_equals_slow_reference_at_every_length_and_dtype():
    """The cached tables serve shorter and longer calls alike (grown on demand), and the
    soft-token path (x_t as float weights) and bf16 autocast agree with the reference."""
    model = tiny()
    with torch.no_grad():
        for L in (16, 4, 9):  # largest first: later calls slice the cached table
            x = torch.randint(0, 11, (2, L))
            assert_same(model(x), slow_forward(model, x))
        x = torch.randint(0, 11, (2, 7))
        soft = F.one_hot(x, 11).float()
        assert_same(model(soft), slow_forward(model, x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast, slow = model(x), slow_forward(model, x)
        torch.testing.assert_close(fast.float(), slow.float(), atol=0.05, rtol=0.05)
    with torch.inference_mode():  # tables built in inference mode stay out of training
        model(x)
    model.train()(x).sum().backward()  # would raise on an inference-mode table


def test_span_cache_equals_the_slow_reference():
    """forward_span on a causal DiT, chunk by chunk, gives the reference's full logits."""
    model = tiny(causal=True)
    x = torch.randint(0, 11, (2, 12))
    with torch.no_grad():
        ref = slow_forward(model, x)
        cache = model.init_cache(2)
        parts = [model.forward_span(x[:, a:b], a, cache) for a, b in ((0, 5), (5, 6), (6, 12))]
    assert_same(torch.cat(parts, 1), ref)
