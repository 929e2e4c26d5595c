"""Benchmark: training throughput and MFU, and the ddpm_cache speed-up over ddpm.

Everything is measured in one run on the machine it runs on, side by side:

  * the machine's matmul peak (a large matmul in the training dtype, best of several),
  * training tokens/s of the configured model (objective loss + backward + AdamW step),
    and its achieved FLOP/s as a fraction of that peak (MFU, 6N + 12 n_layer d L per token),
  * sampling wall time of `ddpm` and `ddpm_cache` at the same steps and seed, and the ratio.

    python scripts/benchmark.py                       # the embedded default (tiny) on CPU
    python scripts/benchmark.py model=small --vocab-size 50258 --batch-size 16 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config_utils import register_resolvers  # noqa: E402
from diffusion.denoiser import ModelDenoiser  # noqa: E402


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Best FLOP/s of an n x n matmul in `dtype` (the roofline MFU is measured against)."""
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


def flops_per_token(backbone: torch.nn.Module, n_layers: int, d: int, length: int) -> float:
    """Training FLOPs per token: 6 x (per-token matmul parameters) + attention 12 n_layer d L
    (PaLM). The sigma embedding and adaLN projections act once per sequence, not per token."""
    n_matmul = sum(
        m.weight.numel()
        for name, m in backbone.named_modules()
        if isinstance(m, torch.nn.Linear) and "adaLN" not in name and "sigma_embed" not in name
    )
    return 6 * n_matmul + 12 * n_layers * d * length


def build(cfg, vocab_size: int, device: torch.device):
    backbone = instantiate(cfg.backbone, vocab_size=vocab_size).to(device)
    objective = instantiate(
        cfg.parameterization,
        noise=instantiate(cfg.noise),
        mask_id=vocab_size - 1,
        vocab_size=vocab_size,
    )
    return backbone, objective


def bench_training(cfg, backbone, objective, device, batch_size, steps, autocast_dtype):
    length = cfg.model.length
    vocab = objective.vocab_size
    opt = torch.optim.AdamW(backbone.parameters(), lr=1e-4)
    x0 = torch.randint(0, vocab - 1, (batch_size, length), device=device)
    attn = torch.ones_like(x0)

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = objective.loss(backbone, x0, attn).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch_size * length * steps / (time.perf_counter() - start)


def bench_sampler(cfg, name, backbone, objective, device, steps, num_samples, batch_size, seed=0):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        scfg = compose("config", overrides=[f"sampler={name}", f"sampler.steps={steps}"]).sampler
    sampler = instantiate(scfg)
    denoiser = ModelDenoiser(backbone.eval(), objective)
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens, nfe = [], 0
    sync(device)
    start = time.perf_counter()
    for first in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - first)
        out = sampler.sample(denoiser, num_samples=n, length=cfg.model.length, generator=gen)
        tokens.append(out.tokens)
        nfe += out.nfe
    sync(device)
    return time.perf_counter() - start, torch.cat(tokens), nfe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=small")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--sample-steps", type=int, nargs="+", default=[1000])
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument(
        "--sample-batch-size",
        type=int,
        default=1,
        help="samples per sampler call (MDLM's timing table uses 1: the cache only helps while "
        "no sequence in the batch changes)",
    )
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    autocast = torch.bfloat16 if args.precision == "bf16" else None
    torch.manual_seed(0)

    backbone, objective = build(cfg, args.vocab_size, device)
    n_params = sum(p.numel() for p in backbone.parameters())
    peak = matmul_peak(device, dtype, 4096 if device.type == "cuda" else 1024)
    tok_s = bench_training(
        cfg, backbone, objective, device, args.batch_size, args.train_steps, autocast
    )
    fpt = flops_per_token(backbone, cfg.model.n_blocks, cfg.model.hidden_size, cfg.model.length)
    report = {
        "machine": machine_name(device),
        "model": cfg.model.name,
        "params": n_params,
        "length": cfg.model.length,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "train_tokens_per_s": tok_s,
        "matmul_peak_tflops": peak / 1e12,
        "achieved_tflops": tok_s * fpt / 1e12,
        "mfu": tok_s * fpt / peak,
        "sampling": [],
    }
    print(f"machine: {report['machine']}")
    print(
        f"train  {cfg.model.name} ({n_params / 1e6:.1f}M params, L={cfg.model.length}, "
        f"B={args.batch_size}, {args.precision}): {tok_s:,.0f} tokens/s, "
        f"{report['achieved_tflops']:.3f} TFLOP/s of a measured {report['matmul_peak_tflops']:.3f} "
        f"peak -> MFU {report['mfu']:.1%}"
    )
    for steps in args.sample_steps:
        runs = {}
        for name in ("ddpm", "ddpm_cache"):
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
        (t_plain, tok_plain, nfe_plain), (t_cache, tok_cache, nfe_cache) = runs.values()
        same = bool(torch.equal(tok_plain, tok_cache))
        row = {
            "steps": steps,
            "num_samples": args.num_samples,
            "sample_batch_size": args.sample_batch_size,
            "ddpm_s": t_plain,
            "ddpm_nfe": nfe_plain,
            "ddpm_cache_s": t_cache,
            "ddpm_cache_nfe": nfe_cache,
            "speedup": t_plain / t_cache,
            "same_samples": same,
        }
        report["sampling"].append(row)
        print(
            f"sample {args.num_samples} x {cfg.model.length} tokens (batch "
            f"{args.sample_batch_size}), {steps} steps: ddpm {t_plain:.2f}s ({nfe_plain} NFE), "
            f"ddpm_cache {t_cache:.2f}s ({nfe_cache} NFE) -> speed-up {row['speedup']:.2f}x, "
            f"identical samples: {same}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
