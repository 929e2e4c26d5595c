"""The lean loss (head and float32 softmax only where the loss counts) equals today's full loss:
values and gradients, for SUBS, D3PM, SEDD and AR, with padding and a loss mask, through the
DiT's `positions_to_score` and through the full-logits fallback of other backbones."""

import pytest
import torch

from diffusion.noise import Cosine, LogLinear
from diffusion.objectives.ar import AR
from diffusion.objectives.base import logsumexp_and_pick
from diffusion.objectives.d3pm import D3PM
from diffusion.objectives.sedd import SEDD
from diffusion.objectives.subs import SUBS
from models.dit import DiT

V = 40
MASK = V - 1

OBJECTIVES = {
    "subs": lambda lean: SUBS(LogLinear(), MASK, V, lean_loss=lean),
    "subs_T": lambda lean: SUBS(Cosine(), MASK, V, T=10, lean_loss=lean),
    "subs_maskcond": lambda lean: SUBS(
        LogLinear(), MASK, V, mask_conditioning=True, lean_loss=lean
    ),
    "d3pm": lambda lean: D3PM(LogLinear(), MASK, V, T=20, lean_loss=lean),
    "d3pm_subs_masking": lambda lean: D3PM(
        LogLinear(), MASK, V, T=20, subs_masking=True, lean_loss=lean
    ),
    "sedd": lambda lean: SEDD(LogLinear(), MASK, V, lean_loss=lean),
    "ar": lambda lean: AR(MASK, V, lean_loss=lean),
}


def random_dit(name: str) -> DiT:
    torch.manual_seed(0)
    dit = DiT(
        V,
        hidden_size=32,
        n_blocks=2,
        n_heads=2,
        max_length=16,
        time_conditioning=name in ("sedd", "subs_maskcond"),
        causal=name == "ar",
    )
    for p in dit.parameters():  # the zero-initialised head and gates would hide differences
        torch.nn.init.normal_(p, std=0.1)
    return dit


def batch():
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, V - 1, (4, 12), generator=g)
    attn = torch.ones_like(x0)
    attn[1, 9:] = 0  # a padded row
    attn[3, 5:] = 0
    loss_mask = torch.ones_like(x0)
    loss_mask[0, :4] = 0  # an SFT prompt: never noised, never scored
    return x0, attn, loss_mask


def run(objective, backbone, x0, attn, loss_mask):
    out = objective.loss(backbone, x0, attn, torch.Generator().manual_seed(7), loss_mask=loss_mask)
    loss = out.reduce("token")
    backbone.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}
    return out, loss.detach(), grads


@pytest.mark.parametrize("name", list(OBJECTIVES))
@pytest.mark.parametrize("with_loss_mask", [False, True])
def test_lean_equals_full_on_the_dit(name, with_loss_mask):
    dit = random_dit(name)
    x0, attn, loss_mask = batch()
    loss_mask = loss_mask if with_loss_mask else None
    full, loss_full, grad_full = run(OBJECTIVES[name](False), dit, x0, attn, loss_mask)
    lean, loss_lean, grad_lean = run(OBJECTIVES[name](True), dit, x0, attn, loss_mask)
    assert torch.equal(full.mask, lean.mask)
    torch.testing.assert_close(lean.nll * lean.mask, full.nll * full.mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_lean, loss_full, rtol=1e-5, atol=1e-6)
    assert grad_full.keys() == grad_lean.keys()
    for key in grad_full:
        torch.testing.assert_close(grad_lean[key], grad_full[key], rtol=1e-4, atol=1e-6, msg=key)


class FullLogitsOnly(torch.nn.Module):
    """A backbone without `scores_positions` (an HF model): the lean loss cuts its logits."""

    def __init__(self, dit: DiT) -> None:
        super().__init__()
        self.dit = dit
        self.causal = dit.causal

    def forward(self, x_t, sigma=None, attention_mask=None):
        return self.dit(x_t, sigma, attention_mask)


@pytest.mark.parametrize("name", ["subs", "d3pm", "sedd", "ar"])
def test_lean_falls_back_to_full_logits_for_other_backbones(name):
    wrapped = FullLogitsOnly(random_dit(name))
    x0, attn, loss_mask = batch()
    full, loss_full, _ = run(OBJECTIVES[name](False), wrapped, x0, attn, loss_mask)
    lean, loss_lean, _ = run(OBJECTIVES[name](True), wrapped, x0, attn, loss_mask)
    torch.testing.assert_close(lean.nll * lean.mask, full.nll * full.mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_lean, loss_full, rtol=1e-5, atol=1e-6)


def test_the_head_only_sees_masked_scored_positions():
    dit = random_dit("subs")
    x0, attn, loss_mask = batch()
    seen = []
    hook = dit.final.linear.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    obj = OBJECTIVES["subs"](True)
    g = torch.Generator().manual_seed(7)
    obj.loss(dit, x0, attn, g, loss_mask=loss_mask)
    hook.remove()
    g = torch.Generator().manual_seed(7)  # replay the draws
    t = obj.sample_t(4, x0.device, g)
    x_t = obj.q_xt(x0, obj.noise.move_chance(t)[:, None], g, noisable=attn * loss_mask)
    n_masked = int(((x_t == MASK) & (attn * loss_mask).bool()).sum())
    assert seen == [torch.Size([n_masked, 32])]
    assert 0 < n_masked < x0.numel()


def test_positions_to_score_are_rows_of_the_full_logits():
    dit = random_dit("subs")
    x0, attn, _ = batch()
    index = torch.tensor([0, 5, 13, 47, 30])
    full = dit(x0, None, attn)  # (B, L, V)
    torch.testing.assert_close(
        dit(x0, None, attn, positions_to_score=index), full.flatten(0, 1)[index]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logsumexp_matches_autograd_in_every_chunking(dtype):
    torch.manual_seed(1)
    logits = (3 * torch.randn(37, 11)).to(dtype).requires_grad_()
    cols = torch.randint(0, 11, (37, 2))
    g_lse, g_pick = torch.randn(37), torch.randn(37, 2)
    z = logits.detach().float().requires_grad_()
    for exclude in (None, 4):
        masked = z if exclude is None else z.index_fill(-1, torch.tensor([exclude]), -torch.inf)
        ref_lse = torch.logsumexp(masked, -1)
        ref_pick = z.gather(-1, cols)
        (ref_grad,) = torch.autograd.grad((ref_lse * g_lse).sum() + (ref_pick * g_pick).sum(), z)
        for chunk in (1, 5, 37, 4096):
            lse, pick = logsumexp_and_pick(logits, cols, exclude, chunk=chunk)
            assert lse.dtype == torch.float32 and pick.dtype == torch.float32
            (grad,) = torch.autograd.grad((lse * g_lse).sum() + (pick * g_pick).sum(), logits)
            assert grad.dtype == dtype
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(lse, ref_lse, rtol=tol, atol=tol)
            torch.testing.assert_close(pick, ref_pick)
            torch.testing.assert_close(grad.float(), ref_grad, rtol=tol, atol=tol)


def test_lean_equals_full_under_bf16_autocast():
    dit = random_dit("subs")
    x0, attn, loss_mask = batch()
    losses = []
    for lean in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = OBJECTIVES["subs"](lean).loss(
                dit, x0, attn, torch.Generator().manual_seed(7), loss_mask=loss_mask
            )
        assert out.nll.dtype == torch.float32
        losses.append(out.reduce("token"))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-3)


def test_no_masked_token_gives_a_zero_loss_with_gradients():
    dit = random_dit("subs")
    x0 = torch.randint(0, V - 1, (2, 8))
    obj = OBJECTIVES["subs"](True)
    out = obj.loss(dit, x0, torch.ones_like(x0), loss_mask=torch.zeros_like(x0))
    loss = out.reduce("token")
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(torch.isfinite(p.grad).all() for p in dit.parameters() if p.grad is not None)


def test_dit_forward_compiles_without_a_graph_break():
    """The padding check `bool(attention_mask.all())` read a value back to Python (an .item()
    graph break); under torch.compile the mask is kept instead."""
    dit = random_dit("subs")
    x0, attn, _ = batch()
    for kwargs in ({}, {"positions_to_score": torch.tensor([1, 5, 9])}):
        explained = torch._dynamo.explain(dit)(x0, None, torch.ones_like(attn), **kwargs)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


@pytest.mark.parametrize("name", ["subs", "d3pm", "d3pm_subs_masking", "sedd"])
def test_a_mask_id_in_the_data_is_not_scored_on_either_path(name, caplog):
    """A literal mask token in the text (x0 == mask id) has probability 0 under SUBS: scored,
    the full path added ~1e6 nats there and the lean path a finite logit. Neither scores it;
    both agree, and a warning names the id."""
    dit = random_dit(name)
    x0, attn, _ = batch()
    x0[0, 2] = x0[2, 7] = MASK
    with caplog.at_level("WARNING", logger="unmask"):
        full, loss_full, grad_full = run(OBJECTIVES[name](False), dit, x0, attn, None)
    assert f"mask id {MASK}" in caplog.text
    lean, loss_lean, grad_lean = run(OBJECTIVES[name](True), dit, x0, attn, None)
    assert full.mask[0, 2] == 0 and full.mask[2, 7] == 0 and torch.equal(full.mask, lean.mask)
    assert float(full.mask.sum()) == float(attn.sum()) - 2
    assert 0 < float(loss_full) < 100
    torch.testing.assert_close(loss_lean, loss_full, rtol=1e-5, atol=1e-6)
    for key in grad_full:
        torch.testing.assert_close(grad_lean[key], grad_full[key], rtol=1e-4, atol=1e-6, msg=key)
