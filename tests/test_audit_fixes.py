"""Fixes of the independent audit (issue 17 item 5), each pinned by a test that failed before:
the EMA sees the weights of the last optimizer step, SEDD's loss stays finite where a clean
position has a huge log score, the float64 NLL meter survives `bf16-true`, and `ppl_excl_bos`
scores the tokens an AR model scores."""

import functools
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import HalfPrecision

from diffusion.module import DiffusionModule, NLLMeter
from diffusion.noise import LogLinear
from diffusion.objectives.ar import AR
from diffusion.objectives.base import LossOutput
from diffusion.objectives.sedd import SEDD
from diffusion.objectives.subs import SUBS
from models.dit import DiT

V = 12


def tiny_module(ema_decay: float, objective=None, causal: bool = False) -> DiffusionModule:
    torch.manual_seed(0)
    backbone = DiT(V, hidden_size=16, n_blocks=1, n_heads=2, max_length=8, causal=causal)
    return DiffusionModule(
        backbone,
        objective or SUBS(LogLinear(), mask_id=V - 1, vocab_size=V),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        ema_decay=ema_decay,
        bos_id=1,
    )


def loader(n_rows: int = 8, batch_size: int = 2):
    g = torch.Generator().manual_seed(1)
    rows = [
        {"input_ids": torch.randint(0, V - 1, (8,), generator=g), "attention_mask": torch.ones(8)}
        for _ in range(n_rows)
    ]
    return torch.utils.data.DataLoader(rows, batch_size=batch_size)


def trainer(steps: int, **kw) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ema_with_decay_zero_equals_the_final_weights(accumulate):
    """decay -> 0: the EMA is the weights of the last update (before the fix: one step behind)."""
    module = tiny_module(ema_decay=1e-12)
    trainer(3, accumulate_grad_batches=accumulate).fit(module, loader())
    assert module.ema.n_averaged.item() == 3  # one update per optimizer step, not per batch
    for (name, p), q in zip(module.backbone.named_parameters(), module.ema.module.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-9, msg=name)


def test_sedd_loss_is_finite_with_a_huge_logit_at_an_unmasked_position():
    obj = SEDD(LogLinear(), mask_id=V - 1, vocab_size=V)
    x0 = torch.tensor([[0, 1, 2, 3]])
    x_t = torch.tensor([[0, V - 1, 2, V - 1]])  # positions 0 and 2 clean
    logits = torch.zeros(1, 4, V, requires_grad=True)
    t = torch.tensor([0.01])
    bump = torch.zeros(1, 4, V)
    bump[0, 0, 5] = 95.0  # a clean position: its score is never used
    big = logits + bump
    nll = obj.nll_per_token(obj.model_output(big, x_t, t), x0, x_t, t)
    assert torch.isfinite(nll).all()
    assert nll[0, 0] == 0 and nll[0, 2] == 0
    reference = obj.nll_per_token(obj.model_output(logits, x_t, t), x0, x_t, t)
    torch.testing.assert_close(nll, reference)  # the clean position changes nothing
    nll.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # the lean path scores masked positions only and agrees
    lean = obj.nll_masked(big[0, [1, 3]], x0[0, [1, 3]], t.expand(2))
    torch.testing.assert_close(lean, nll[0, [1, 3]], rtol=1e-5, atol=1e-5)


def test_nll_meter_stays_float64_under_bf16_true():
    module = tiny_module(ema_decay=0.0)
    module = HalfPrecision("bf16-true").convert_module(module)
    assert module.backbone.embed.weight.dtype == torch.bfloat16  # the model was cast
    meter = module.val_meter
    for _ in range(500):  # 512,000 tokens: a bf16 count stops at 2^18 = 262,144
        meter.update(torch.full((1, 1024), 0.1), torch.ones(1, 1024))
    stats = meter.compute()
    assert stats["tokens"] == 512_000
    assert stats["nelbo"] == pytest.approx(0.1, rel=1e-7)  # 0.1 in float32, summed exactly
    assert meter.tokens.sum_value.dtype == torch.float64


def test_ema_stays_float32_and_keeps_moving_under_bf16_true():
    """bf16-true cast the EMA too: at decay 0.9999 each update is under half a bf16 step, and
    the average stood still (0.7% of its float32 move over 1,000 steps)."""
    precision = HalfPrecision("bf16-true")
    module = precision.convert_module(tiny_module(ema_decay=0.9999))
    assert module.backbone.embed.weight.dtype == torch.bfloat16
    assert module.ema.module.embed.weight.dtype == torch.float32
    module.ema.update_parameters(module.backbone)
    module.ema.n_averaged.fill_(10**6)  # late in training: the decay is 0.9999
    start = module.ema.module.embed.weight.clone()
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.add_(0.01)
    for _ in range(1000):
        module.ema.update_parameters(module.backbone)
    moved = (module.ema.module.embed.weight - start).mean().item()
    assert moved == pytest.approx(0.01 * (1 - 0.9999**1000), rel=0.02)
    with precision.forward_context():  # the evaluation forward: float32 weights, bf16 context
        x = torch.randint(0, V - 1, (2, 8))
        out = module.eval_backbone(x, torch.zeros(2))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["subs", "duo_curriculum", "bd3lm_resample", "subs_T"])
def test_the_losses_random_draws_are_float32_under_bf16_trues_default_dtype(name):
    """bf16-true runs the step with torch's default dtype set to bf16: the time, mask and
    Gumbel draws came out bf16 (t on a 1/256 grid near 1, masking rates off by up to 0.4%;
    BD3-LM's resample stopped on a dtype clash). On a float32 backbone the loss under that
    default now equals the loss outside it, draw for draw."""
    from diffusion.objectives.bd3lm import BD3LM
    from diffusion.objectives.duo import DUO

    objective = {
        "subs": lambda: SUBS(LogLinear(), mask_id=V - 1, vocab_size=V),
        "subs_T": lambda: SUBS(LogLinear(), mask_id=V - 1, vocab_size=V, T=10),
        "duo_curriculum": lambda: DUO(LogLinear(), V - 1, V, curriculum=True, curriculum_end=9),
        "bd3lm_resample": lambda: BD3LM(LogLinear(), V - 1, V, block_size=4, resample=True),
    }[name]()
    objective.train()
    torch.manual_seed(0)
    net = DiT(V, hidden_size=16, n_blocks=1, n_heads=2, max_length=8,
              time_conditioning=name.startswith("duo"))  # fmt: skip
    x0 = torch.randint(0, V - 1, (4, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x0)

    def loss() -> torch.Tensor:
        out = objective.loss(net, x0, mask, torch.Generator().manual_seed(7))
        return (out.nll * out.mask).sum()

    want = loss()
    with HalfPrecision("bf16-true").forward_context():
        assert torch.rand(1).dtype == torch.bfloat16  # the context this step runs in
        got = loss()
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)


def test_ppl_excl_bos_leaves_out_bos_and_the_first_position():
    meter = NLLMeter(bos_id=1)
    x0 = torch.tensor([[1, 5, 6, 2, 1, 7]])  # [BOS] a b [EOS] [BOS] c
    nll = torch.tensor([[8.0, 1.0, 2.0, 3.0, 0.5, 4.0]])
    meter.update(nll, torch.ones(1, 6), x0, offset=0)  # diffusion: column i is position i
    stats = meter.compute()
    assert stats["tokens"] == 6 and stats["nelbo"] == pytest.approx(18.5 / 6)
    assert stats["bpd"] == pytest.approx(math.log2(math.exp(18.5 / 6)))  # MDLM's bits/token
    assert stats["tokens_excl_bos"] == 4  # positions 1, 2, 3, 5
    assert stats["nelbo_excl_bos"] == pytest.approx(10.0 / 4)
    assert stats["ppl_excl_bos"] == pytest.approx(math.exp(10.0 / 4))
    # AR scores x0[:, 1:] (offset 1): the same four tokens once BOS is left out
    ar = NLLMeter(bos_id=1)
    ar.update(nll[:, 1:], torch.ones(1, 5), x0[:, 1:], offset=1)
    assert ar.compute()["tokens_excl_bos"] == 4


def test_validation_reports_both_conventions_on_the_same_tokens_for_ar_and_diffusion():
    """4 rows of 8 with a BOS at position 3: AR scores 4 x 7 tokens, diffusion 4 x 8; leaving
    out BOS and each row's first position both score the same 4 x 6."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(4):
        ids = torch.randint(2, V - 1, (8,), generator=g)
        ids[3] = 1
        rows.append({"input_ids": ids, "attention_mask": torch.ones(8)})
    counts = {}
    for objective, causal in ((SUBS(LogLinear(), V - 1, V), False), (AR(V - 1, V), True)):
        module = tiny_module(0.0, objective, causal=causal)
        data = torch.utils.data.DataLoader(rows, batch_size=2)
        trainer(1).validate(module, data, verbose=False)
        stats = module.val_meter.compute()
        counts[causal] = stats["tokens"], stats["tokens_excl_bos"]
        assert math.isfinite(stats["ppl_excl_bos"]) and stats["ppl_excl_bos"] > 1
    assert counts == {False: (32, 24), True: (28, 24)}


def test_loss_output_carries_the_scored_ids():
    x0 = torch.randint(0, V - 1, (2, 8))
    out = AR(V - 1, V).loss(tiny_module(0.0, causal=True).backbone, x0, torch.ones_like(x0))
    assert torch.equal(out.targets, x0[:, 1:]) and out.offset == 1
    sub = SUBS(LogLinear(), V - 1, V).loss(tiny_module(0.0).backbone, x0, torch.ones_like(x0))
    assert torch.equal(sub.targets, x0) and sub.offset == 0
    assert isinstance(sub, LossOutput)


def test_every_objective_hands_the_meter_its_scored_ids():
    """BD3-LM and DUO left `targets` unset, so `ppl_excl_bos` kept mid-row BOS tokens for them
    alone: 4 rows of 16 with BOS at columns 0 and 7 leave 64 - 4 - 4 = 56 tokens for each."""
    from diffusion.objectives.bd3lm import BD3LM
    from diffusion.objectives.duo import DUO

    class Zeros(torch.nn.Module):
        def forward(self, x, sigma=None, attention_mask=None, attn_mask=None, positions=None):
            return torch.zeros(*x.shape[:2], V)

    x0 = torch.randint(2, V - 1, (4, 16), generator=torch.Generator().manual_seed(0))
    x0[:, 0] = x0[:, 7] = 1
    objectives = {
        "subs": SUBS(LogLinear(), V - 1, V),
        "bd3lm": BD3LM(LogLinear(), V - 1, V, block_size=4, length=16),
        "duo": DUO(LogLinear(), V - 1, V),
    }
    for name, objective in objectives.items():
        objective.eval()
        out = objective.loss(Zeros(), x0, torch.ones_like(x0), torch.Generator().manual_seed(1))
        meter = NLLMeter(bos_id=1)
        meter.update(out.nll, out.mask, out.targets, out.offset)
        assert meter.compute()["tokens_excl_bos"] == 56, name


def test_token_counts_survive_mc_sample_weights():
    """eval_mc_samples = k weighs each copy 1/k; float32(1/25) < 1/25, and a floor of the sum
    reported 5,119 of 5,120 tokens."""
    meter = NLLMeter()
    for _ in range(5):
        meter.update(torch.ones(8 * 25, 128), torch.ones(8 * 25, 128) / 25)
    assert meter.compute()["tokens"] == 5 * 8 * 128


def test_ema_copies_integer_buffers_and_averages_the_rest():
    """BERT carries int64 position_ids: lerping them raised at the second update. Floats follow
    the warmed-up decay d_n = min(decay, (1 + n) / (10 + n)) (n updates so far), by hand."""
    from diffusion.ema import make_ema

    model = torch.nn.Linear(2, 1, bias=False)
    model.register_buffer("index", torch.arange(3))
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = make_ema(model, decay=0.9)
    ema.update_parameters(model)  # n = 0: a copy
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.index += 5
    ema.update_parameters(model)  # n = 1: d = min(0.9, 2 / 11)
    d = 2 / 11
    expected = d * 1.0 + (1 - d) * 3.0
    torch.testing.assert_close(ema.module.weight, torch.full((1, 2), expected))
    assert torch.equal(ema.module.index, torch.arange(3) + 5)


def test_bf16_true_trains_and_evaluates_end_to_end(tmp_path):
    """main.py with trainer.precision=bf16-true: the weights are bf16 in the checkpoint, the
    EMA float32 (and moved off the initial weights), the bound finite."""
    import json

    from diffusion.checkpoint import read_checkpoint
    from tests.tiny_lm import main_in_process

    main_in_process(tmp_path, "debug=tiny_cpu", "trainer.precision=bf16-true")
    state = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    assert state["backbone.embed.weight"].dtype == torch.bfloat16
    ema = state["ema.module.embed.weight"]
    assert ema.dtype == torch.float32
    assert not torch.equal(ema.to(torch.bfloat16), state["backbone.embed.weight"])  # averaged
    stats = json.loads((tmp_path / "ppl_eval.json").read_text())
    assert math.isfinite(stats["nelbo"]) and stats["tokens"] > 0
