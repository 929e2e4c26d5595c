"""Benchmark: training steps/s and tokens/s of the DiT vs the two Hugging Face backbones.

All three are measured in one run on the same machine, at about the same parameter count
(a ModernBERT and a GPT-2 built from configs with the DiT's width, depth and heads, saved to a
temporary folder and loaded by path through the adapters, exactly as a hub name would be), with
the same MDLM SUBS loss, batch, length, vocabulary and AdamW step. Ratios are HF / DiT.

    python scripts/bench_backbones.py                               # tiny, CPU
    python scripts/bench_backbones.py --hidden 768 --layers 12 --heads 12 --length 1024 \
        --batch 8 --vocab 50258 --precision bf16                    # GPT-2-small scale, GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.noise import LogLinear  # noqa: E402
from diffusion.objectives.subs import SUBS  # noqa: E402
from models.dit import DiT  # noqa: E402
from models.hf import HFCausalBidirectional, HFMaskedLM  # noqa: E402


def save_tiny_hf(folder: Path, hidden: int, layers: int, heads: int, length: int, vocab: int):
    """A ModernBERT and a GPT-2 of the DiT's shape, saved as HF folders; returns their paths."""
    from transformers import GPT2Config, GPT2LMHeadModel, ModernBertConfig, ModernBertForMaskedLM

    mlm = ModernBertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=int(hidden * 8 / 3),  # GLU: ~4x MLP params
        max_position_embeddings=max(length, 512),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
        mask_token_id=vocab - 1,
    )
    gpt = GPT2Config(
        vocab_size=vocab - 1,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=max(length, 1024),
        bos_token_id=0,
        eos_token_id=0,
    )
    ModernBertForMaskedLM(mlm).save_pretrained(folder / "modernbert")
    GPT2LMHeadModel(gpt).save_pretrained(folder / "gpt2")
    return str(folder / "modernbert"), str(folder / "gpt2")


def time_training(
    model,
    objective,
    batch: int,
    length: int,
    vocab: int,
    steps: int,
    warmup: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> dict:
    """Steps/s and tokens/s of loss + backward + AdamW, after `warmup` untimed steps."""
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x0 = torch.randint(0, vocab - 1, (batch, length), device=device)
    attn = torch.ones_like(x0)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = objective.loss(model, x0, attn).nll.mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "steps_s": steps / wall, "tokens_s": steps * batch * length / wall}


def bench_backbones(
    hidden: int = 64,
    layers: int = 2,
    heads: int = 2,
    length: int = 64,
    batch: int = 4,
    vocab: int = 512,
    steps: int = 10,
    warmup: int = 2,
    device: str = "auto",
    precision: str = "fp32",
) -> list[dict]:
    """Time the DiT, hf_mlm (ModernBERT) and hf_causal_bidirectional (GPT-2) side by side."""
    dev = torch.device(
        "cuda"
        if device == "auto" and torch.cuda.is_available()
        else ("cpu" if device == "auto" else device)
    )
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    objective = SUBS(noise=LogLinear(), mask_id=vocab - 1, vocab_size=vocab)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mlm_dir, gpt_dir = save_tiny_hf(Path(tmp), hidden, layers, heads, length, vocab)
        builders = {
            "dit": lambda: DiT(vocab, hidden, layers, heads, max_length=length),
            "hf_mlm": lambda: HFMaskedLM(vocab, mlm_dir, max_length=length),
            "hf_causal_bidirectional": lambda: HFCausalBidirectional(
                vocab, gpt_dir, max_length=length
            ),
        }
        for name, build in builders.items():
            torch.manual_seed(0)
            stats = time_training(
                build(), objective, batch, length, vocab, steps, warmup, dev, dtype
            )
            rows.append({"backbone": name, **stats})
    base = rows[0]
    print(
        f"device: {dev} ({torch.get_num_threads()} threads), precision {precision}, "
        f"batch {batch} x length {length}, vocab {vocab}, {steps} timed steps"
    )
    print(f"{'backbone':<25}{'params':>10}{'steps/s':>10}{'tokens/s':>12}{'vs DiT':>9}")
    for r in rows:
        ratio = r["tokens_s"] / base["tokens_s"]
        print(
            f"{r['backbone']:<25}{r['params']:>10,}{r['steps_s']:>10.2f}"
            f"{r['tokens_s']:>12,.0f}{ratio:>8.2f}x"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for key, default in (
        ("hidden", 64),
        ("layers", 2),
        ("heads", 2),
        ("length", 64),
        ("batch", 4),
        ("vocab", 512),
        ("steps", 10),
        ("warmup", 2),
    ):
        p.add_argument(f"--{key}", type=int, default=default)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    bench_backbones(**vars(p.parse_args(argv)))


if __name__ == "__main__":
    main()
