"""Benchmark: training throughput, MFU, peak memory, the lean loss, reference backbones,
torch.compile / bf16, and sampling throughput, each measured side by side in one run.

Sections (pick with --sections; default: train sample):

  train      tokens/s of the configured model (objective loss + backward + AdamW step), MFU
             against the measured matmul peak and the card's dense bf16 peak, peak memory
  loss       today's full loss (log-softmax and carry tensors at every position) against the
             lean loss (head and float32 chunked softmax only where the loss counts): peak
             memory, each variant in a fresh process, and step time, interleaved
  backbones  our DiT against a minimal bidirectional transformer and an MDLM-layout DiT
             (written here from MDLM's published description) of equal size, same loss
  modes      eager / torch.compile x fp32 / bf16 autocast on the configured model
  sample     wall time and tokens/s of ddpm, ddpm_cache and confidence at the same seed

    python scripts/benchmark.py                                    # embedded default, CPU
    python scripts/benchmark.py --sections loss backbones --vocab-size 50258 \
        model.length=1024 --batch-size 4                          # the lean-loss figures
    python scripts/benchmark.py model=small --vocab-size 50258 --batch-size 16 \
        --precision bf16 --compile                                # the GPU figures
    python scripts/benchmark.py --dry-run                          # every section, tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models.dit as dit_module  # noqa: E402
from diffusion.config import check_appended, register_resolvers  # noqa: E402
from diffusion.flops import flops_per_token  # noqa: E402  (6N + attention)
from models.dit import DiT, TimestepEmbedder  # noqa: E402

# dense bf16 tensor-core peaks (no sparsity) from the vendors' data sheets, FLOP/s
CARD_BF16_PEAK = {
    "H200": 989.4e12,
    "H100 SXM": 989.4e12,
    "H100 80GB HBM3": 989.4e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 756e12,
    "A100": 312e12,
    "L40S": 362.05e12,
    "L4": 121e12,
    "A10G": 70e12,
    "RTX 4090": 165.2e12,
}
DRY_RUN = [  # every section at toy sizes on CPU: proves the plumbing in seconds
    "model.length=32", "model.hidden_size=32", "model.n_blocks=2", "model.n_heads=2",
    "--sections", "train", "loss", "backbones", "modes", "sample",
    "--vocab-size", "64", "--batch-size", "2", "--train-steps", "2", "--warmup", "1",
    "--sample-steps", "4", "--num-samples", "2", "--sample-batch-size", "2",
]  # fmt: skip


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def card_peak(device: torch.device) -> float | None:
    """The card's dense bf16 peak (data sheet), or None for an unknown card or a CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in CARD_BF16_PEAK.items():  # most specific names first
        if key in name:
            return peak
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Best FLOP/s of an n x n matmul in `dtype` (the measured roofline MFU is also given
    against)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        reps = 10
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


# ---- memory ---------------------------------------------------------------------------------
def _proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(fn: Callable[[], None], device: torch.device) -> float:
    """Bytes `fn` needs above what is held before it: CUDA's allocator peak, or on CPU the
    resident high-water mark (reset through /proc/self/clear_refs) minus the resident size."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _proc_kb("VmRSS")
    fn()
    return float(_proc_kb("VmHWM") - base) * 1024


# ---- reference backbones (equal size, same call as the DiT) ---------------------------------
def _select(h: Tensor, positions_to_score: Tensor | None) -> Tensor:
    return h if positions_to_score is None else h.flatten(0, 1).index_select(0, positions_to_score)


class MinimalBlock(nn.Module):
    """Pre-LN block: fused qkv, SDPA, GELU MLP, residual dropout (the DiT's); nothing else."""

    def __init__(self, d: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU("tanh"), nn.Linear(4 * d, d))

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, L, C = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, -1)
        if rotary is not None:  # our DiT's fused rotary pass (models/dit.py rotate_qkv)
            q, k, v = dit_module.rotate_qkv(qkv, *rotary)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C)
        x = x + self.drop(self.out(a))
        return x + self.drop(self.mlp(self.ln2(x)))


class MinimalTransformer(nn.Module):
    """A minimal bidirectional transformer (BERT/GPT-2 layout, learned positions, no
    conditioning) with the DiT's width, depth, heads and head: the speed reference.

    `rotary=True` replaces the learned positions by our DiT's rotary pass (its `Rotary` tables
    and fused `rotate_qkv`): the same positions as the DiT, so the gap to it is what the DiT's
    conditioning (adaLN-zero, folded for a time-agnostic model) costs."""

    scores_positions = True

    def __init__(
        self,
        vocab_size: int,
        hidden: int,
        blocks: int,
        heads: int,
        length: int,
        rotary: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.pos = None if rotary else nn.Embedding(length, hidden)
        self.rotary = dit_module.Rotary(hidden // heads) if rotary else None
        self.blocks = nn.ModuleList(MinimalBlock(hidden, heads, dropout) for _ in range(blocks))
        self.norm, self.head = nn.LayerNorm(hidden), nn.Linear(hidden, vocab_size)

    def forward(self, x_t, sigma=None, attention_mask=None, positions_to_score=None) -> Tensor:
        x = self.embed(x_t)
        rotary = None
        if self.rotary is None:
            x = x + self.pos.weight[: x_t.shape[1]]
        else:
            rotary = self.rotary(x_t.shape[1], x.device)
        for block in self.blocks:
            x = block(x, rotary)
        return self.head(_select(self.norm(x), positions_to_score))


class Float32LayerNorm(nn.Module):
    """MDLM's LayerNorm: weight only, computed in float32 with autocast off."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), (x.shape[-1],)) * self.weight


def mdlm_rotary(length: int, head_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """MDLM's rotary tables: cos, sin (1, 1, L, D) of the angles with the halves repeated."""
    inv_freq = 1.0 / (10_000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    freqs = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # (L, D)
    return emb.cos()[None, None], emb.sin()[None, None]


def mdlm_rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """(B, H, L, D) -> x * cos + rotate_half(x) * sin, q and k each (MDLM's eager form)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class MDLMBlock(nn.Module):
    """MDLM's DDiT block as its paper and code describe it: float32 LayerNorm, adaLN
    shift/scale/gate (6 x d), rotary q/k, fused qkv and output without bias, gated residual
    with dropout, GELU-tanh MLP with bias."""

    def __init__(self, d: int, heads: int, cond_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = Float32LayerNorm(d), Float32LayerNorm(d)
        self.attn_qkv, self.attn_out = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU("tanh"), nn.Linear(4 * d, d))
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * d)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], c: Tensor) -> Tensor:
        B, L, C = x.shape
        mods = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)  # each (B, 1, C)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.attn_qkv(h).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = mdlm_rotate(q, *rotary), mdlm_rotate(k, *rotary)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C)
        x = x + gate1 * self.dropout(self.attn_out(a))  # bias_dropout_add_scale
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.dropout(self.mlp(h))


class MDLMDiT(nn.Module):
    """MDLM's DiT layout (DDiT blocks, adaLN final layer, sigma map) at our sizes, with the
    same dropout as the DiT it is compared with (`model.dropout`: 0 for tiny, 0.1 for small,
    as MDLM's configs): a dropout pass our DiT skips is not counted against the reference."""

    scores_positions = True

    def __init__(
        self, vocab_size: int, hidden: int, blocks: int, heads: int, cond_dim: int, dropout=0.1
    ):
        super().__init__()
        self.vocab_embed = nn.Parameter(torch.empty(vocab_size, hidden))
        nn.init.kaiming_uniform_(self.vocab_embed, a=math.sqrt(5))
        self.sigma_map = TimestepEmbedder(cond_dim)
        self.head_dim = hidden // heads
        self.blocks = nn.ModuleList(
            MDLMBlock(hidden, heads, cond_dim, dropout) for _ in range(blocks)
        )
        self.norm_final = Float32LayerNorm(hidden)
        self.final_modulation = nn.Linear(cond_dim, 2 * hidden)
        self.linear = nn.Linear(hidden, vocab_size)

    def forward(self, x_t, sigma=None, attention_mask=None, positions_to_score=None) -> Tensor:
        B, L = x_t.shape
        x = self.vocab_embed[x_t]
        sigma = torch.zeros(B, device=x.device) if sigma is None else sigma
        c = F.silu(self.sigma_map(sigma))
        rotary = mdlm_rotary(L, self.head_dim, x.device)
        for block in self.blocks:
            x = block(x, rotary, c)
        shift, scale = self.final_modulation(c)[:, None].chunk(2, dim=2)
        h = self.norm_final(x) * (1 + scale) + shift
        return self.linear(_select(h.to(x.dtype), positions_to_score))


# ---- building and timing ------------------------------------------------------------------
def build(cfg, vocab_size: int, device: torch.device, lean: bool = True):
    backbone = instantiate(cfg.backbone, vocab_size=vocab_size).to(device)
    objective = instantiate(
        cfg.parameterization,
        noise=instantiate(cfg.noise),
        mask_id=vocab_size - 1,
        vocab_size=vocab_size,
    )
    objective.lean_loss = lean
    return backbone, objective


def make_step(backbone, objective, x0: Tensor, autocast_dtype) -> Callable[[], None]:
    """One training step: loss, backward, AdamW, zero_grad (the optimizer state is made by the
    first call)."""
    opt = torch.optim.AdamW(backbone.parameters(), lr=1e-4)
    attn = torch.ones_like(x0)
    device = x0.device

    def step() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = objective.loss(backbone, x0, attn).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_interleaved(steps: dict[str, Callable[[], None]], rounds: int, warmup: int, device):
    """Median seconds per step of each variant, measured in alternation (load shifts hit all)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def random_batch(cfg, vocab: int, batch_size: int, device) -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab - 1, (batch_size, cfg.model.length), generator=g).to(device)


# ---- sections -----------------------------------------------------------------------------
def section_train(cfg, args, device, report) -> None:
    backbone, objective = build(cfg, args.vocab_size, device)
    if args.compile:
        backbone.compile(dynamic=True)
    x0 = random_batch(cfg, args.vocab_size, args.batch_size, device)
    step = make_step(backbone, objective, x0, args.autocast)
    sec = time_interleaved({"train": step}, args.train_steps, args.warmup, device)["train"]
    memory = peak_memory(step, device)
    tok_s = args.batch_size * cfg.model.length / sec
    fpt = flops_per_token(backbone, cfg.model.n_blocks, cfg.model.hidden_size, cfg.model.length)
    peak, card = report["matmul_peak_tflops"] * 1e12, card_peak(device)
    row = {
        "params": sum(p.numel() for p in backbone.parameters()),
        "batch_size": args.batch_size,
        "compile": args.compile,
        "train_tokens_per_s": tok_s,
        "achieved_tflops": tok_s * fpt / 1e12,
        "mfu_measured_peak": tok_s * fpt / peak,
        "mfu_card_peak": tok_s * fpt / card if card else None,
        "peak_memory_gb": memory / 1e9,
    }
    report["train"] = row
    card_txt = f", MFU {row['mfu_card_peak']:.1%} of the card's bf16 peak" if card else ""
    print(
        f"train  {cfg.model.name} ({row['params'] / 1e6:.1f}M params, L={cfg.model.length}, "
        f"B={args.batch_size}, {args.precision}{', compiled' if args.compile else ''}): "
        f"{tok_s:,.0f} tokens/s, {row['achieved_tflops']:.3f} TFLOP/s -> MFU "
        f"{row['mfu_measured_peak']:.1%} of the measured {report['matmul_peak_tflops']:.4g} "
        f"TFLOP/s matmul peak{card_txt}; peak memory {row['peak_memory_gb'] * 1e3:,.1f} MB "
        "above the model"
    )


def child_loss_memory(cfg, args, device, variant: str) -> None:
    """(in a fresh process) the peak memory of one training step of `variant`."""
    backbone, objective = build(cfg, args.vocab_size, device, lean=variant == "lean")
    x0 = random_batch(cfg, args.vocab_size, args.batch_size, device)
    step = make_step(backbone, objective, x0, args.autocast)
    step()  # the optimizer state and the allocator's first growth are not the loss's
    print(json.dumps({"variant": variant, "peak_bytes": peak_memory(step, device)}))


def section_loss(cfg, args, device, report) -> None:
    memory = {}
    for variant in ("full", "lean"):
        out = subprocess.run(
            [sys.executable, __file__, *args.argv, "--child-loss-memory", variant],
            capture_output=True,
            text=True,
            check=True,
        )
        memory[variant] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    steps = {}
    for variant in ("full", "lean"):
        backbone, objective = build(cfg, args.vocab_size, device, lean=variant == "lean")
        x0 = random_batch(cfg, args.vocab_size, args.batch_size, device)
        steps[variant] = make_step(backbone, objective, x0, args.autocast)
    sec = time_interleaved(steps, args.train_steps, args.warmup, device)
    row = {
        "vocab_size": args.vocab_size,
        "length": cfg.model.length,
        "batch_size": args.batch_size,
        "full_peak_gb": memory["full"] / 1e9,
        "lean_peak_gb": memory["lean"] / 1e9,
        "memory_ratio": memory["full"] / max(memory["lean"], 1.0),
        "full_step_s": sec["full"],
        "lean_step_s": sec["lean"],
        "speedup": sec["full"] / sec["lean"],
    }
    report["loss"] = row
    print(
        f"loss   V={args.vocab_size}, L={cfg.model.length}, B={args.batch_size}: peak memory "
        f"above the model full {row['full_peak_gb'] * 1e3:,.0f} MB, lean "
        f"{row['lean_peak_gb'] * 1e3:,.0f} MB "
        f"({row['memory_ratio']:.2f}x less); step full {sec['full'] * 1e3:.0f} ms, lean "
        f"{sec['lean'] * 1e3:.0f} ms ({row['speedup']:.2f}x faster)"
    )


def section_backbones(cfg, args, device, report) -> None:
    m, V = cfg.model, args.vocab_size
    x0 = random_batch(cfg, V, args.batch_size, device)
    objective = build(cfg, V, device)[1]
    full = build(cfg, V, device, lean=False)[1]
    size = (V, m.hidden_size, m.n_blocks, m.n_heads)

    def dit(prune: bool = True, stock_gelu: bool = False) -> DiT:
        model = DiT(*size, m.length, cond_dim=m.cond_dim, dropout=m.dropout)
        model.prune_last_block = prune
        if stock_gelu:  # ATen's tanh-GELU kernel in place of ours (the same function)
            for block in model.blocks:
                block.mlp[1] = nn.GELU(approximate="tanh")
        return model

    models = {
        "dit (lean loss)": (dit(), objective),
        "dit (lean loss, last block unpruned)": (dit(prune=False), objective),
        "dit (lean loss, stock GELU kernel)": (dit(stock_gelu=True), objective),
        "dit (full loss)": (dit(), full),
        "minimal transformer": (MinimalTransformer(*size, m.length, dropout=m.dropout), objective),
        "minimal + rotary": (
            MinimalTransformer(*size, m.length, rotary=True, dropout=m.dropout),
            objective,
        ),
        "mdlm dit": (MDLMDiT(*size, m.cond_dim, dropout=m.dropout), objective),
        "mdlm dit (full loss)": (MDLMDiT(*size, m.cond_dim, dropout=m.dropout), full),
    }
    steps, params = {}, {}
    for name, (backbone, obj) in models.items():
        backbone.to(device).train()
        params[name] = sum(p.numel() for p in backbone.parameters())
        steps[name] = make_step(backbone, obj, x0, args.autocast)
    sec = time_interleaved(steps, args.train_steps, args.warmup, device)
    base = sec["dit (lean loss)"]
    rows = [
        {"backbone": n, "params": params[n], "step_s": s, "dit_speedup": s / base}
        for n, s in sec.items()
    ]
    report["backbones"] = rows
    print(f"backbones (L={m.length}, B={args.batch_size}, V={V}): our DiT's speed-up over each")
    for r in rows:
        print(
            f"  {r['backbone']:<22}{r['params'] / 1e6:>8.2f}M  {r['step_s'] * 1e3:>8.1f} ms/step"
            f"  dit x{r['dit_speedup']:.2f}"
        )


def section_modes(cfg, args, device, report) -> None:
    """eager / compiled x fp32 / bf16 autocast, interleaved, on the configured model."""
    x0 = random_batch(cfg, args.vocab_size, args.batch_size, device)
    steps = {}
    for compiled in (False, True):
        for dtype in (None, torch.bfloat16):
            backbone, objective = build(cfg, args.vocab_size, device)
            if compiled:
                backbone.compile(dynamic=True)
            name = f"{'compiled' if compiled else 'eager'} {'bf16' if dtype else 'fp32'}"
            steps[name] = make_step(backbone, objective, x0, dtype)
    sec = time_interleaved(steps, args.train_steps, max(args.warmup, 2), device)
    base = sec["eager fp32"]
    report["modes"] = {name: {"step_s": s, "speedup": base / s} for name, s in sec.items()}
    print(f"modes  {cfg.model.name} L={cfg.model.length} B={args.batch_size}: vs eager fp32")
    for name, s in sec.items():
        print(f"  {name:<14}{s * 1e3:>9.1f} ms/step  x{base / s:.2f}")


def bench_sampler(cfg, name, backbone, objective, device, steps, num_samples, batch_size, seed=0):
    base, _, extra = name.partition(":")  # "block:first_hitting=true": a sampler's variant
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        overrides = [f"sampler={base}", f"sampler.steps={steps}"]
        overrides += [f"sampler.{kv}" for kv in extra.split(",") if kv]
        if base == "confidence":  # one block per `steps` slice of the canvas
            overrides.append(f"sampler.block_length={min(cfg.model.length, 32)}")
        scfg = compose("config", overrides=overrides).sampler
    sampler = instantiate(scfg)
    denoiser = objective.denoiser(backbone.eval())  # the objective's protocol
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens, nfe = [], 0
    sync(device)
    start = time.perf_counter()
    for first in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - first)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = sampler.sample(denoiser, num_samples=n, length=cfg.model.length, generator=gen)
        tokens.append(out.tokens)
        nfe += out.nfe
    sync(device)
    return time.perf_counter() - start, torch.cat(tokens), nfe


def section_sample(cfg, args, device, report) -> None:
    backbone, objective = build(cfg, args.vocab_size, device)
    report["sampling"] = []
    for steps in args.sample_steps:
        runs = {}
        for name in args.samplers:
            runs[name] = bench_sampler(
                cfg,
                name,
                backbone,
                objective,
                device,
                steps,
                args.num_samples,
                args.sample_batch_size,
            )
        tokens = args.num_samples * cfg.model.length
        row = {
            "steps": steps,
            "num_samples": args.num_samples,
            "sample_batch_size": args.sample_batch_size,
            **{f"{n}_s": r[0] for n, r in runs.items()},
            **{f"{n}_tokens_per_s": tokens / r[0] for n, r in runs.items()},
            **{f"{n}_nfe": r[2] for n, r in runs.items()},
        }
        if "ddpm" in runs and "ddpm_cache" in runs:
            row["cache_speedup"] = runs["ddpm"][0] / runs["ddpm_cache"][0]
            row["same_samples"] = bool(torch.equal(runs["ddpm"][1], runs["ddpm_cache"][1]))
        report["sampling"].append(row)
        parts = ", ".join(
            f"{n} {r[0]:.2f}s ({tokens / r[0]:,.0f} tok/s, {r[2]} NFE)" for n, r in runs.items()
        )
        extra = ""
        if "cache_speedup" in row:
            extra = f"; cache x{row['cache_speedup']:.2f}, identical: {row['same_samples']}"
        print(
            f"sample {args.num_samples} x {cfg.model.length} tokens (batch "
            f"{args.sample_batch_size}), {steps} steps: {parts}{extra}"
        )


SECTIONS = {
    "train": section_train,
    "loss": section_loss,
    "backbones": section_backbones,
    "modes": section_modes,
    "sample": section_sample,
}


def overrides_first(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` with its Hydra overrides (`key=value` tokens that are not an option's own value)
    moved ahead, in order: an nargs="+" option (`--sections`, `--samplers`) would otherwise
    take an override written right after it as one of its values."""
    single = {  # options whose next token is their value, whatever it looks like
        name
        for action in parser._actions
        if action.nargs is None and action.option_strings
        for name in action.option_strings
    }
    overrides, rest = [], []
    for i, token in enumerate(argv):
        is_value = i > 0 and argv[i - 1] in single
        key = token.split("=", 1)[0]  # a Hydra key has no ":" (a sampler variant's name has)
        is_override = "=" in token and ":" not in key and not token.startswith("-") and not is_value
        (overrides if is_override else rest).append(token)
    return [*overrides, *rest]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=small")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=["train", "sample"])
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sample-steps", type=int, nargs="+", default=[1000])
    p.add_argument(
        "--samplers",
        nargs="+",
        default=["ddpm", "ddpm_cache", "confidence"],
        help="sampler options; NAME:KEY=VALUE[,KEY=VALUE] a variant (block:first_hitting=true)",
    )
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument(
        "--sample-batch-size",
        type=int,
        default=1,
        help="samples per sampler call (MDLM's timing table uses 1: the cache only helps while "
        "no sequence in the batch changes)",
    )
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone (train)")
    p.add_argument(
        "--attention",
        choices=["auto", "sdpa"],
        default="auto",
        help="auto: flash-attn where installed (CUDA, bf16, no padding); sdpa: torch's only",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--dry-run", action="store_true", help="every section at toy sizes (CPU)")
    p.add_argument("--child-loss-memory", choices=["full", "lean"], help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_intermixed_args(overrides_first(p, argv))
    if args.dry_run:  # the toy sizes first, so that options given after them still win
        args = p.parse_intermixed_args(overrides_first(p, [*DRY_RUN, *argv]))
    args.argv = argv
    args.autocast = torch.bfloat16 if args.precision == "bf16" else None
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.attention == "sdpa":
        dit_module.flash_attn_func = None  # the DiT's attention() then always takes SDPA
    register_resolvers()
    check_appended(args.overrides)  # a misspelt `+` key is refused, as by main.py
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    torch.manual_seed(0)
    if args.child_loss_memory:
        child_loss_memory(cfg, args, device, args.child_loss_memory)
        return {}
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    report = {
        "machine": machine_name(device),
        "model": cfg.model.name,
        "length": cfg.model.length,
        "precision": args.precision,
        "flash_attn": dit_module.flash_attn_func is not None and device.type == "cuda",
        "matmul_peak_tflops": matmul_peak(device, dtype, 4096 if device.type == "cuda" else 512)
        / 1e12,
        "card_bf16_peak_tflops": (card_peak(device) or 0) / 1e12 or None,
    }
    print(
        f"machine: {report['machine']}  (matmul peak {report['matmul_peak_tflops']:.4g} TFLOP/s"
        f", flash-attn {'on' if report['flash_attn'] else 'off'})"
    )
    for name in args.sections:
        SECTIONS[name](cfg, args, device, report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
