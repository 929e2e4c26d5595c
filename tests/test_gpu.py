"""The gpu tier (`pytest -m gpu`; skipped cleanly without CUDA, see conftest.py): the CUDA
paths no CPU test reaches. flash-attn against SDPA, bf16-mixed against fp32, samplers with a
CUDA generator, FSDP on one device, and torch.compile of the DiT."""

import functools

import pytest
import torch

import models.dit as dit_module
from diffusion.denoiser import ModelDenoiser
from diffusion.module import DiffusionModule
from diffusion.noise import LogLinear
from diffusion.objectives.subs import SUBS
from models.dit import DiT
from samplers.ddpm import DDPMSampler
from samplers.ddpm_cache import DDPMCacheSampler

pytestmark = pytest.mark.gpu
V, L = 97, 64
MASK = V - 1


def cuda_dit(causal: bool = False, dtype=torch.float32) -> DiT:
    torch.manual_seed(0)
    dit = DiT(V, hidden_size=64, n_blocks=2, n_heads=4, max_length=L, causal=causal)
    for p in dit.parameters():  # the zero-initialised head and gates would hide differences
        torch.nn.init.normal_(p, std=0.05)
    return dit.to("cuda", dtype)


def rows(batch: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V - 1, (batch, L), generator=g).cuda()


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_equals_sdpa_on_padded_and_unpadded_batches(causal, monkeypatch):
    pytest.importorskip("flash_attn")
    assert dit_module.flash_attn_func is not None
    dit, x = cuda_dit(causal, torch.bfloat16), rows()
    attn = torch.ones_like(x)
    padded = attn.clone()
    padded[1, 40:] = 0
    padded[3, 10:] = 0
    with torch.no_grad():
        flash = {"unpadded": dit(x, None, attn), "padded": dit(x, None, padded)}
        alone = dit(x[3:4, :10], None, torch.ones_like(x[3:4, :10]))  # flash, no padding
        monkeypatch.setattr(dit_module, "flash_attn_func", None)
        sdpa = {"unpadded": dit(x, None, attn), "padded": dit(x, None, padded)}
    torch.testing.assert_close(flash["unpadded"], sdpa["unpadded"], rtol=2e-2, atol=2e-2)
    real = padded.bool()
    torch.testing.assert_close(flash["padded"][real], sdpa["padded"][real], rtol=2e-2, atol=2e-2)
    # a padded row's real tokens see only real tokens: as the row alone through flash-attn
    torch.testing.assert_close(flash["padded"][3, :10], alone[0], rtol=2e-2, atol=2e-2)


def test_bf16_mixed_step_is_finite_and_close_to_fp32():
    dit, x = cuda_dit(), rows(8)
    objective = SUBS(LogLinear(), MASK, V)
    losses = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = objective.loss(dit, x, torch.ones_like(x), torch.Generator("cuda").manual_seed(3))
        loss = out.reduce("token")
        dit.zero_grad(set_to_none=True)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in dit.parameters() if p.grad is not None)
        losses[name] = float(loss.detach())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)


def test_bf16_mixed_lightning_step_matches_fp32():
    import lightning as L_

    def one_step(precision: str) -> float:
        module = DiffusionModule(
            cuda_dit().cpu(),
            SUBS(LogLinear(), MASK, V),
            optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
            ema_decay=0.9999,
        )
        seen = []
        module.on_train_batch_end = lambda out, *a: seen.append(float(out["loss"]))
        data = [{"input_ids": r, "attention_mask": torch.ones(L)} for r in rows(8).cpu()]
        trainer = L_.Trainer(
            accelerator="gpu",
            devices=1,
            precision=precision,
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
        )
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
        return seen[0]

    fp32, bf16 = one_step("32-true"), one_step("bf16-mixed")
    assert torch.isfinite(torch.tensor(bf16))
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    # bf16-true: the weights themselves in bf16 (the EMA stays float32; CPU tests check that)
    assert one_step("bf16-true") == pytest.approx(fp32, rel=5e-2)


@pytest.mark.parametrize("sampler_cls", [DDPMSampler, DDPMCacheSampler])
def test_samplers_draw_identical_samples_with_a_cuda_generator(sampler_cls):
    denoiser = ModelDenoiser(cuda_dit().eval(), SUBS(LogLinear(), MASK, V))
    sampler = sampler_cls(steps=16)

    def draw():
        g = torch.Generator("cuda").manual_seed(5)
        return sampler.sample(denoiser, num_samples=3, length=L, generator=g).tokens

    first, second = draw(), draw()
    assert first.is_cuda and torch.equal(first, second)
    assert not (first == MASK).any()
    plain = DDPMSampler(steps=16).sample(
        denoiser, num_samples=3, length=L, generator=torch.Generator("cuda").manual_seed(5)
    )
    assert torch.equal(first, plain.tokens)  # the cache changes nothing but the speed


def test_fsdp_on_one_device_runs_a_step():
    import lightning as L_
    from lightning.pytorch.strategies import FSDPStrategy

    module = DiffusionModule(
        cuda_dit().cpu(),
        SUBS(LogLinear(), MASK, V),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        ema_decay=0.0,
    )
    before = [p.detach().clone() for p in module.backbone.parameters()]
    data = [{"input_ids": r, "attention_mask": torch.ones(L)} for r in rows(4).cpu()]
    trainer = L_.Trainer(
        accelerator="gpu",
        devices=1,
        strategy=FSDPStrategy(auto_wrap_policy={dit_module.Block}),
        precision="bf16-mixed",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    assert trainer.global_step == 2
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)
    after = list(module.backbone.parameters())
    assert any(not torch.equal(a.detach().cpu(), b) for a, b in zip(after, before) if a.numel())


def test_torch_compile_of_the_dit_gives_the_same_loss():
    dit, x = cuda_dit(), rows()
    objective = SUBS(LogLinear(), MASK, V)
    eager = objective.loss(dit, x, torch.ones_like(x), torch.Generator("cuda").manual_seed(2))
    compiled = torch.compile(dit, dynamic=True)
    for _ in range(2):  # a second masked count: the dynamic shape must not recompile wrongly
        out = objective.loss(
            compiled, x, torch.ones_like(x), torch.Generator("cuda").manual_seed(2)
        )
        torch.testing.assert_close(out.reduce("token"), eager.reduce("token"), rtol=1e-4, atol=1e-5)
    out.reduce("token").backward()
    assert all(torch.isfinite(p.grad).all() for p in dit.parameters() if p.grad is not None)
