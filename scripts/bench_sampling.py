"""One speed/quality benchmark of every sampler against AR + KV cache (issue 14).

For a trained diffusion checkpoint and an AR checkpoint (the judge, and the AR reference
row), runs every sampler at a few step counts and at batch sizes 1 and 16 in one process,
and prints per row: network calls (NFE, per batch), rows evaluated per sample, tokens/s,
gen-ppl under the AR judge and the mean sample entropy. The AR sampler with its KV cache
at the same length is the reference row. Writes rows.jsonl, table.md, and two matplotlib
plots (gen-ppl against tokens/s, gen-ppl against entropy). Ratios that the targets name
(ddpm_cache vs ddpm, threshold vs the confidence sampler at steps = L, prefix cache vs none)
are printed from rows measured side by side in this run.

`--prompt-length P` conditions every sample on the first P tokens of a validation row
(Fast-dLLM's setting: a prompt is the prefix its cache keeps, computed once); only the
L - P generated tokens are timed into tokens/s, judged and counted into the entropy.

    python scripts/bench_sampling.py --ckpt runs/mdlm/checkpoints/last.ckpt \
        --ar runs/ar/checkpoints/last.ckpt --out runs/bench --steps 64,128,1000
    python scripts/bench_sampling.py ... --length 512 --steps 512 --only confidence,ar

Timings on a shared machine move; compare ratios within one run and record the load.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion.build import build_sampler, module_from_checkpoint  # noqa: E402
from diffusion.evaluation.judges import ModelJudge, judge_texts, sample_entropy  # noqa: E402

log = logging.getLogger("bench_sampling")
BIG_STEPS = 256


def variants(length: int, steps: list[int]) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, sampler yaml, overrides): every diffusion sampler and the Fast-dLLM options.
    The confidence sampler runs at steps = `length` (the generated tokens: one per step),
    its reference. Step counts above `BIG_STEPS` run ddpm and ddpm_cache only (the per-row
    cache's target)."""
    rows: list[tuple[str, str, dict[str, Any]]] = []
    for k in steps:
        rows += [("ddpm", "ddpm", {"steps": k}), ("ddpm_cache", "ddpm_cache", {"steps": k})]
        if k <= BIG_STEPS:
            rows += [
                ("analytic", "analytic", {"steps": k}),
                ("remdm_cap", "remdm", {"steps": k, "schedule": "cap", "eta": 0.02}),
            ]
    block = min(32, length)
    conf = {"steps": length, "block_length": block}
    rows += [
        ("first_hitting", "first_hitting", {}),
        ("confidence", "confidence", dict(conf)),
        ("confidence_eb", "confidence", {**conf, "strategy": "eb", "eb_gamma": 0.1}),
        ("threshold_0.9", "confidence", {**conf, "threshold": 0.9}),
        ("factor_1.0", "confidence", {**conf, "factor": 1.0}),
        ("confidence_prefix", "confidence", {**conf, "cache": "prefix"}),
        ("confidence_dual", "confidence", {**conf, "cache": "dual"}),
        ("threshold_0.9_dual", "confidence", {**conf, "threshold": 0.9, "cache": "dual"}),
        # Fast-dLLM's own setting: greedy decoding, confidence = p(argmax)
        ("confidence_greedy", "confidence", {**conf, "temperature": 0.0}),
        ("threshold_0.9_greedy", "confidence", {**conf, "threshold": 0.9, "temperature": 0.0}),
    ]
    return rows


def sampler_cfg(name: str, overrides: dict[str, Any]) -> Any:
    cfg = OmegaConf.load(ROOT / "configs" / "sampler" / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def validation_prompts(dm: Any, num_samples: int, prompt_length: int, length: int) -> Tensor:
    """(num_samples, P): the first P tokens of the first validation rows of the checkpoint's
    data (rows cycle when the split has fewer)."""
    if not 0 < prompt_length < length:
        raise SystemExit(f"--prompt-length {prompt_length} must lie in [1, --length {length})")
    dm.setup(only=["validation"])
    rows = dm.dataset("validation").input_ids
    if rows.shape[1] < prompt_length:
        raise SystemExit(f"--prompt-length {prompt_length} > the data's rows ({rows.shape[1]})")
    index = torch.arange(num_samples) % rows.shape[0]
    return rows[index, :prompt_length].long()


def block_top2(log_p: Tensor, x_t: Tensor, mask_id: int, block: int, start: int) -> Tensor:
    """(B, L, V) log p(x0 | x_t), (B, L) canvas -> (R, 2): the two highest p(argmax) among the
    masked positions of each row's current block (blocks of `block` from `start`, the one
    holding the row's first mask), for the R rows with at least two masked there: what a
    threshold rule could commit in that step, at most (p(drawn) <= p(argmax))."""
    masked = x_t == mask_id  # (B, L)
    pos = torch.arange(x_t.shape[1], device=x_t.device)
    first = torch.where(masked, pos, x_t.shape[1]).min(1).values  # (B,)
    lo = start + (first - start).clamp_min(0) // block * block
    window = masked & (pos >= lo[:, None]) & (pos < lo[:, None] + block)
    keep = window.sum(1) >= 2
    conf = log_p.float().exp().amax(-1).masked_fill(~window, -1.0)  # (B, L)
    return conf[keep].topk(2, dim=1).values


class ConfidenceProbe:
    """A masked denoiser that records `block_top2` at every full call of the one it wraps."""

    def __init__(self, inner: Any, block: int, start: int) -> None:
        self.inner, self.block, self.start = inner, block, start
        self.top2: list[Tensor] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def log_p_x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        out = self.inner.log_p_x0(x_t, t)
        self.top2.append(block_top2(out, x_t, self.inner.mask_id, self.block, self.start))
        return out

    def profile(self, threshold: float = 0.9) -> dict[str, float]:
        """Over every recorded row-step: the median top p(argmax) and how often the top and
        the second reach `threshold` (the second is what parallel commits need)."""
        top = torch.cat(self.top2) if self.top2 else torch.zeros(0, 2)
        if not len(top):  # no call, or none with two masked positions in the block
            return {}
        return {
            "probe_row_steps": len(top),
            "top1_median": float(top[:, 0].median()),
            "top1_ge_threshold": float((top[:, 0] >= threshold).float().mean()),
            "top2_ge_threshold": float((top[:, 1] >= threshold).float().mean()),
            "top2_ge_0.5": float((top[:, 1] >= 0.5).float().mean()),
        }


PROBED = ("confidence", "confidence_greedy")  # rows whose denoiser calls are profiled


def run_sampler(
    sampler: Any,
    denoiser: Any,
    length: int,
    num_samples: int,
    batch: int,
    seed: int,
    prompts: Tensor | None = None,
) -> dict[str, Any]:
    """Draw `num_samples` in batches of `batch` (continuing `prompts` (N, P) when given);
    wall time, calls, rows evaluated, and the generated tokens (the prompt cut off)."""
    generator = torch.Generator().manual_seed(seed)
    tokens, nfe, rows = [], 0, 0
    start = time.perf_counter()
    for first in range(0, num_samples, batch):
        n = min(batch, num_samples - first)
        prefix = None if prompts is None else prompts[first : first + n]
        out = sampler.sample(denoiser, n, length, prefix=prefix, generator=generator)
        tokens.append(out.tokens)
        nfe += out.nfe
        rows += out.rows_evaluated
    wall = time.perf_counter() - start
    tokens_t = torch.cat(tokens)
    if prompts is not None:
        if not torch.equal(tokens_t[:, : prompts.shape[1]], prompts[:num_samples]):
            raise AssertionError(f"{type(sampler).__name__} changed its prompt")
        tokens_t = tokens_t[:, prompts.shape[1] :]
    n_batches = -(-num_samples // batch)
    return {
        "tokens": tokens_t,
        "wall_s": wall,
        "nfe": nfe / n_batches,
        "rows_per_sample": rows / num_samples,
        "tokens_per_s": tokens_t.numel() / wall,
    }


def score(result: dict[str, Any], tokenizer: Any, judge: ModelJudge) -> dict[str, float]:
    texts, ended = judge_texts(result["tokens"], tokenizer, until_eos=True)
    scores = judge.score(texts, ended)
    return {"gen_ppl": scores["gen_ppl"], "entropy": sample_entropy(result["tokens"])}


def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    saved, dm, module = module_from_checkpoint(args.ckpt, "--ckpt")
    saved_ar, ar_dm, ar_module = module_from_checkpoint(args.ar, "--ar")
    if args.length is None:  # the diffusion checkpoint's own model.length
        args.length = int(saved.model.length)
    if args.length > int(saved_ar.model.length):  # its KV cache holds model.length positions
        raise SystemExit(
            f"--length {args.length} exceeds the AR checkpoint's model.length="
            f"{saved_ar.model.length} ({args.ar}): pass --length <= {saved_ar.model.length}"
        )
    judge = ModelJudge(
        ar_module.eval_backbone, ar_module.objective, ar_dm.tokenizer, int(saved_ar.model.length)
    )
    denoiser, ar_denoiser = module.denoiser(), ar_module.denoiser()
    prompts = None
    if args.prompt_length:
        n_max = max(args.num_samples, args.num_samples_b1)
        prompts = validation_prompts(dm, n_max, args.prompt_length, args.length)
    only = set(args.only.split(",")) if args.only else None
    generated = args.length - args.prompt_length  # the confidence sampler: one token per step
    jobs = [("ar_kv_cache", "ar", {"use_cache": True})] + variants(generated, args.steps)
    rows, kept = [], {}
    for batch in args.batch_sizes:
        n = args.num_samples if batch > 1 else args.num_samples_b1
        for label, name, overrides in jobs:
            if only is not None and label.split("_")[0] not in only and label not in only:
                continue
            sampler = build_sampler(sampler_cfg(name, overrides), dm.tokenizer, batch_size=batch)
            model = ar_denoiser if name == "ar" else denoiser
            if label in PROBED:  # the block-confidence profile of this row's calls
                model = ConfidenceProbe(denoiser, overrides["block_length"], args.prompt_length)
            result = run_sampler(sampler, model, args.length, n, batch, args.seed, prompts)
            row = {
                "sampler": label,
                "steps": overrides.get("steps", "-"),
                "batch": batch,
                "num_samples": n,
                "length": args.length,
                "prompt_length": args.prompt_length,
                **{k: v for k, v in result.items() if k != "tokens"},
                **score(result, dm.tokenizer, judge),
            }
            if isinstance(model, ConfidenceProbe):
                row["confidence_profile"] = model.profile()
            if label == "ddpm_cache":  # identical samples to ddpm at the same seed and batch
                ref = kept.get(("ddpm", overrides["steps"], batch))
                row["same_as_ddpm"] = (
                    None if ref is None else bool(torch.equal(ref, result["tokens"]))
                )
            kept[(label, overrides.get("steps"), batch)] = result["tokens"]
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(row: dict[str, Any]) -> str:
    return (
        f"{row['sampler']:>20} steps={row['steps']!s:>5} batch={row['batch']:>2} "
        f"nfe={row['nfe']:8.1f} rows/sample={row['rows_per_sample']:8.1f} "
        f"tok/s={row['tokens_per_s']:9.1f} gen_ppl={row['gen_ppl']:8.2f} "
        f"entropy={row['entropy']:.3f} wall={row['wall_s']:.1f}s"
    )


def find(rows: list[dict], sampler: str, batch: int, steps: Any = None) -> dict | None:
    for row in rows:
        if row["sampler"] == sampler and row["batch"] == batch:
            if steps is None or row["steps"] == steps:
                return row
    return None


def ratios(rows: list[dict], length: int, prompt_length: int = 0) -> list[str]:
    """The targets of issue 14, from rows measured in this run."""
    lines = []
    if prompt_length:
        lines.append(f"every sample continues a {prompt_length}-token validation prompt")
    for batch in sorted({r["batch"] for r in rows}):
        for steps in sorted({r["steps"] for r in rows if r["sampler"] == "ddpm"}):
            plain, cache = find(rows, "ddpm", batch, steps), find(rows, "ddpm_cache", batch, steps)
            if plain and cache:
                lines.append(
                    f"ddpm_cache vs ddpm, T={steps}, batch {batch}: "
                    f"{plain['rows_per_sample'] / cache['rows_per_sample']:.1f}x fewer rows, "
                    f"{plain['wall_s'] / cache['wall_s']:.2f}x wall speed-up, "
                    f"identical samples: {cache.get('same_as_ddpm')}"
                )
        base = find(rows, "confidence", batch)
        pairs = [(label, base) for label in ("threshold_0.9", "factor_1.0", "confidence_eb")]
        pairs.append(("threshold_0.9_greedy", find(rows, "confidence_greedy", batch)))
        for label, ref in pairs:
            fast = find(rows, label, batch)
            if ref and fast:
                lines.append(
                    f"{label} vs {ref['sampler']} at steps=L={length}, batch {batch}: "
                    f"{ref['nfe'] / fast['nfe']:.2f}x fewer NFE, gen-ppl "
                    f"{ref['gen_ppl']:.2f} -> {fast['gen_ppl']:.2f} "
                    f"({100 * (fast['gen_ppl'] / ref['gen_ppl'] - 1):+.1f}%)"
                )
        for label in PROBED:
            prof = (find(rows, label, batch) or {}).get("confidence_profile")
            if prof:
                lines.append(
                    f"{label}, batch {batch}, {prof['probe_row_steps']} row-steps with >= 2 "
                    f"masked in the block: top p(argmax) median {prof['top1_median']:.3f}, "
                    f">= 0.9 in {100 * prof['top1_ge_threshold']:.1f}%; the second >= 0.9 in "
                    f"{100 * prof['top2_ge_threshold']:.2f}%, >= 0.5 in "
                    f"{100 * prof['top2_ge_0.5']:.2f}% (parallel commits need the second)"
                )
        for label in ("confidence_prefix", "confidence_dual"):
            fast = find(rows, label, batch)
            if base and fast:
                lines.append(
                    f"{label} vs no cache at L={length}, batch {batch}: "
                    f"{fast['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s, gen-ppl "
                    f"{base['gen_ppl']:.2f} -> {fast['gen_ppl']:.2f} "
                    f"({100 * (fast['gen_ppl'] / base['gen_ppl'] - 1):+.1f}%)"
                )
        ar = find(rows, "ar_kv_cache", batch)
        if ar:
            fastest = max(
                (r for r in rows if r["batch"] == batch and r["sampler"] != "ar_kv_cache"),
                key=lambda r: r["tokens_per_s"],
                default=None,
            )
            if fastest:
                lines.append(
                    f"AR + KV cache, batch {batch}: {ar['tokens_per_s']:.1f} tok/s, gen-ppl "
                    f"{ar['gen_ppl']:.2f}; fastest diffusion row {fastest['sampler']} "
                    f"(steps {fastest['steps']}): {fastest['tokens_per_s']:.1f} tok/s "
                    f"({fastest['tokens_per_s'] / ar['tokens_per_s']:.2f}x AR), gen-ppl "
                    f"{fastest['gen_ppl']:.2f}"
                )
    return lines


def write_table(rows: list[dict], path: Path) -> None:
    head = "| sampler | steps | batch | NFE | rows/sample | tokens/s | gen-ppl | entropy |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['sampler']} | {r['steps']} | {r['batch']} | {r['nfe']:.1f} | "
            f"{r['rows_per_sample']:.1f} | {r['tokens_per_s']:.1f} | {r['gen_ppl']:.2f} | "
            f"{r['entropy']:.3f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], out: Path) -> None:
    """gen-ppl against tokens/s (log x) and against entropy; one marker per row, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    names = sorted({r["sampler"] for r in rows})
    colours = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    for ax, key, xlabel in zip(axes, ("tokens_per_s", "entropy"), ("tokens / s", "entropy")):
        for r in rows:
            if not (math.isfinite(r["gen_ppl"]) and math.isfinite(r[key])):
                continue
            marker = "o" if r["batch"] > 1 else "^"
            ax.scatter(r[key], r["gen_ppl"], color=colours[r["sampler"]], marker=marker)
            ax.annotate(f"{r['steps']}", (r[key], r["gen_ppl"]), fontsize=6)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("gen-ppl (AR judge)")
        ax.grid(True, alpha=0.3)
    axes[0].set_xscale("log")
    for n in names:
        axes[1].scatter([], [], color=colours[n], label=n)
    axes[1].legend(fontsize=7, title="o batch 16, ^ batch 1", title_fontsize=7)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="diffusion checkpoint (.ckpt of ours)")
    parser.add_argument("--ar", required=True, help="AR checkpoint: judge and reference row")
    parser.add_argument("--out", type=Path, default=Path("bench_sampling"))
    parser.add_argument(
        "--length", type=int, default=None, help="sample length (default: --ckpt's model.length)"
    )
    parser.add_argument(
        "--steps", type=lambda s: [int(v) for v in s.split(",")], default=[64, 1000]
    )
    parser.add_argument(
        "--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[16, 1]
    )
    parser.add_argument("--num-samples", type=int, default=16, help="samples at batch > 1")
    parser.add_argument("--num-samples-b1", type=int, default=4, help="samples at batch 1")
    parser.add_argument("--only", default=None, help="comma list of sampler labels / prefixes")
    parser.add_argument(
        "--prompt-length", type=int, default=0, help="condition on P validation tokens (0: none)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    with torch.no_grad():
        rows = bench(args)
    summary = ratios(rows, args.length, args.prompt_length)
    with open(args.out / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    write_table(rows, args.out / "table.md")
    plot(rows, args.out / "bench.png")
    end_load = os.getloadavg()
    summary.append(f"load average at start {load[0]:.1f}, at end {end_load[0]:.1f}")
    (args.out / "summary.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    print(f"wrote {args.out}/rows.jsonl, table.md, bench.png, summary.txt")


if __name__ == "__main__":
    main()
