"""IsoFLOP sweeps and SMDM's scaling-law fits (Nie et al. 2024, "Scaling up Masked Diffusion
Models on Text"): train a set of sizes at each FLOPs budget, take the best size per budget,
fit loss and compute-optimal size against compute, compare two parameterizations.

    # sweep (local subprocesses of main.py), then fit and plot
    python scripts/scaling.py sweep --param subs ar --budgets 2e12 6e12 1.8e13 \\
        --sizes 2x64 3x96 4x128 4x192 5x256 --out outputs/scaling --plot docs/scaling.png
    # the same sweep as Hydra multiruns on slurm (hydra/launcher=slurm, one job per point)
    python scripts/scaling.py sweep --launcher slurm --param subs ar ... -- \\
        hydra.launcher.partition=gpu trainer.accelerator=gpu
    # fit again from the finished runs (no training), comparing subs against ar
    python scripts/scaling.py fit --out outputs/scaling --compare subs ar --plot docs/scaling.png

A size is `LxD[xH]` (n_blocks x hidden_size [x n_heads]; heads default to D/64, else D/32, >= 1;
cond_dim = D/2, the shape of model=tiny) or a model option name (`smdm_19`, `tiny`).
Every point is a plain `main.py` run with `training.flops_budget=<C>`, so its steps come from
diffusion/flops.py; its ppl_eval.json (validation NELBO, non-embedding parameters, FLOPs) is
what the fit reads. Arguments after `--` are Hydra overrides applied to every run.

The fits (SMDM's forms, Chinchilla's IsoFLOP approach):
  * per budget C: the vertex of the parabola in log N through the best sampled size and its two
    neighbours gives N_opt(C) and L_opt(C); a best size at the edge of the grid is used as it
    is (flagged "clamped"), and a budget whose least-squares parabola over all sizes is concave
    (the sweep brackets no minimum) is flagged "concave";
  * across budgets: L_opt = A C^alpha and N_opt = B C^b (least squares in log-log, C what the
    runs spent: the geometric mean of their train_flops, the budget where unrecorded) over the
    budgets with a bracketed optimum (clamped and concave ones are left out, and counted in
    the output; --include-clamped fits them too);
  * two parameterizations: the compute multiplier k with L_x(k C) = L_ref(C), from a joint fit
    with one shared exponent (SMDM: MDM ~16x AR), and from the separate fits at the middle
    budget.
Uncertainties come from a parametric bootstrap: the measured losses are redrawn around
themselves with the scatter left around the IsoFLOP parabolas and every fit (the same
estimator, exclusions included) is redone, so an interval is one of the reported number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# How each of our parameterizations is trained (the same keys the recipes set).
PARAMETERIZATIONS: dict[str, list[str]] = {
    "subs": [],
    "ar": [
        "parameterization=ar",
        "sampler=ar",
        "backbone.causal=true",
        "time_conditioning=false",
    ],
    "sedd": ["parameterization=sedd", "time_conditioning=true", "sampler=analytic"],
    "d3pm": ["parameterization=d3pm", "T=1000", "time_conditioning=true", "sampler=ddpm"],
}
# Every sweep point: no samples, a cosine schedule that ends at the derived max_steps, no
# in-training validation (the final ppl_eval is the measurement), fresh runs.
RUN_DEFAULTS = [
    "eval.samples_after_train=0",
    "lr_scheduler=cosine",
    "trainer.val_check_interval=1000000",
    "trainer.enable_progress_bar=false",
    "checkpointing.every_n_train_steps=1000000",
]
SIZE = re.compile(r"^(\d+)x(\d+)(?:x(\d+))?$")


# ---- sizes and points ---------------------------------------------------------------------------
def size_overrides(spec: str) -> list[str]:
    """`LxD[xH]` -> model.* overrides (shape of model=tiny); anything else -> model=<spec>."""
    m = SIZE.match(spec)
    if not m:
        return [f"model={spec}"]
    blocks, width = int(m.group(1)), int(m.group(2))
    heads = (
        int(m.group(3)) if m.group(3) else max(1, width // 64 if width % 64 == 0 else width // 32)
    )
    if heads < 1 or width % heads:
        raise SystemExit(f"--sizes {spec}: hidden size {width} is not divisible by {heads} heads")
    return [
        f"model.n_blocks={blocks}",
        f"model.hidden_size={width}",
        f"model.n_heads={heads}",
        f"model.cond_dim={max(width // 2, 1)}",
    ]


def budget_tag(budget: float) -> str:
    """The run folder's name for a budget: what hydra.sweep.subdir=C${training.flops_budget}
    renders too, so local runs and multiruns share one layout (and --reuse)."""
    return str(float(budget))


@dataclass
class Point:
    label: str  # parameterization name
    size: str
    budget: float
    run_dir: Path
    overrides: list[str]
    steps: int


def plan_steps(overrides: list[str], budget: float) -> int:
    """Steps `budget` buys for this config (the same derivation main.py runs)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from diffusion.config import register_resolvers
    from diffusion.flops import backbone_flops, plan_budget

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[o for o in overrides if not o.startswith("hydra.")])
    vocab = vocab_size(cfg)
    backbone = instantiate(cfg.backbone, vocab_size=vocab)
    count = backbone_flops(backbone, int(cfg.model.length))
    return plan_budget(budget, count, int(cfg.loader.global_batch_size)).steps


_VOCAB: dict[str, int] = {}


def vocab_size(cfg) -> int:
    """The data's vocabulary (tokenizer trained or loaded once, cached per data config)."""
    from omegaconf import OmegaConf

    key = json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True)
    if key not in _VOCAB:
        from diffusion.build import build_datamodule

        _VOCAB[key] = int(build_datamodule(cfg).vocab_size)
    return _VOCAB[key]


def make_points(args: argparse.Namespace) -> tuple[list[Point], list[str]]:
    """Every (parameterization, size, budget) point, minus those outside the step range."""
    points, skipped = [], []
    for label in args.param:
        for size in args.sizes:
            for budget in args.budgets:
                over = [
                    *RUN_DEFAULTS,
                    *PARAMETERIZATIONS[label],
                    *size_overrides(size),
                    f"training.flops_budget={budget:g}",
                    *args.overrides,
                ]
                steps = plan_steps(over, budget)
                if not args.min_steps <= steps <= args.max_steps:
                    skipped.append(f"{label} {size} C={budget:.3g}: {steps} steps")
                    continue
                warmup = max(1, min(args.warmup, steps // 10))
                over.append(f"lr_scheduler.num_warmup_steps={warmup}")
                run_dir = args.out / label / size / f"C{budget_tag(budget)}"
                points.append(Point(label, size, budget, run_dir, over, steps))
    return points, skipped


# ---- running ------------------------------------------------------------------------------------
def run_local(point: Point, threads: int, reuse: bool) -> float:
    """One point as a main.py subprocess; returns its wall seconds (0 when reused)."""
    if reuse and (point.run_dir / "ppl_eval.json").exists():
        return 0.0
    point.run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "main.py",
        f"hydra.run.dir={point.run_dir}",
        "checkpointing.resume_from_ckpt=false",
        *point.overrides,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with open(point.run_dir / "stdout.log", "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (point.run_dir / "stdout.log").read_text()[-3000:]
        raise SystemExit(f"$ {' '.join(cmd)}\nfailed ({proc.returncode}):\n{tail}")
    wall = time.perf_counter() - start
    print(f"  {point.label} {point.size} C={point.budget:.3g}: {wall:.0f}s", flush=True)
    return wall


def multirun_commands(points: list[Point], out: Path, slurm: bool) -> list[tuple[list[str], Path]]:
    """One Hydra multirun per (parameterization, size) over its budgets: in one process with
    Hydra's basic launcher (imports paid once per size), or one slurm job per budget through
    hydra/launcher=slurm (a multirun waits for its jobs, so the groups are started side by
    side). The group's warm-up is its shortest run's."""
    groups: dict[tuple[str, str], list[Point]] = defaultdict(list)
    for p in points:
        groups[(p.label, p.size)].append(p)
    cmds = []
    for (label, size), group in groups.items():
        drop = ("training.flops_budget=", "lr_scheduler.num_warmup_steps=")
        fixed = [o for o in group[0].overrides if not o.startswith(drop)]
        warmup = min(int(p.overrides[-1].split("=")[1]) for p in group)
        sweep_dir = out / label / size
        cmds.append(
            (
                [
                    sys.executable,
                    "main.py",
                    "-m",
                    *(["hydra/launcher=slurm"] if slurm else []),
                    f"hydra.sweep.dir={sweep_dir}",
                    "hydra.sweep.subdir=C${training.flops_budget}",
                    "checkpointing.resume_from_ckpt=false",
                    *fixed,
                    f"lr_scheduler.num_warmup_steps={warmup}",
                    "training.flops_budget=" + ",".join(f"{p.budget:g}" for p in group),
                ],
                sweep_dir,
            )
        )
    return cmds


def run_group(cmd: list[str], threads: int, log: Path) -> float:
    """One multirun command (output to `log`); returns its wall seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(
            f"$ {' '.join(cmd)}\nfailed ({proc.returncode}):\n{log.read_text()[-3000:]}"
        )
    wall = time.perf_counter() - start
    print(f"  {log.parent}: {wall:.0f}s", flush=True)
    return wall


def sweep(args: argparse.Namespace) -> None:
    points, skipped = make_points(args)
    for line in skipped:
        print(f"skipped (outside --min-steps/--max-steps): {line}")
    print(f"{len(points)} runs under {args.out}")
    if args.dry_run:
        for p in points:
            print(f"  [{p.steps} steps] python main.py hydra.run.dir={p.run_dir}", *p.overrides)
        return
    start = time.perf_counter()
    if args.launcher in ("multirun", "slurm"):
        if args.reuse:
            points = [p for p in points if not (p.run_dir / "ppl_eval.json").exists()]
        cmds = multirun_commands(points, args.out, slurm=args.launcher == "slurm")
        jobs = len(cmds) if args.launcher == "slurm" else args.jobs
        with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
            list(pool.map(lambda c: run_group(c[0], args.threads, c[1] / "multirun.log"), cmds))
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda p: run_local(p, args.threads, args.reuse), points))
    wall = time.perf_counter() - start
    print(f"sweep wall time {wall / 60:.1f} min")
    (args.out / "sweep.json").write_text(
        json.dumps({"wall_s": wall, "load": os.getloadavg(), "argv": sys.argv[1:]}, indent=2)
    )
    if not args.no_fit:
        fit(args)


# ---- collecting ---------------------------------------------------------------------------------
def collect(out: Path) -> list[dict[str, Any]]:
    """Every finished run under `out` (its ppl_eval.json), labelled by its first folder."""
    rows = []
    for path in sorted(out.glob("**/ppl_eval.json")):
        stats = json.loads(path.read_text())
        if stats.get("flops_budget") is None or "non_embedding_params" not in stats:
            continue  # not a flops-budget run
        rows.append(
            {
                "label": path.relative_to(out).parts[0],
                "size": path.parent.parent.name,
                "budget": float(stats["flops_budget"]),
                "train_flops": float(stats["train_flops"]),
                "params": int(stats["non_embedding_params"]),
                "loss": float(stats["nelbo"]),
                "steps": int(stats["steps"]),
                "unigram_ppl": stats.get("unigram_ppl"),
                "run": str(path.parent),
            }
        )
    return rows


# ---- fitting ------------------------------------------------------------------------------------
def isoflop_optimum(log_n: np.ndarray, loss: np.ndarray) -> tuple[float, float, bool, np.ndarray]:
    """(log N_opt, L_opt, clamped, parabola coefficients) of one IsoFLOP curve.

    The vertex of the parabola (in log N) through the best sampled size and its two neighbours
    (robust to the asymmetric curves small budgets give); a best size at the edge of the grid
    is used as it is (clamped=True). The returned coefficients are the least-squares parabola
    over all sizes: the smooth curve drawn, the residuals the bootstrap's scatter comes from,
    and the concavity check (coef[0] <= 0: the sweep brackets no minimum)."""
    coef = np.polyfit(log_n, loss, 2)
    # repeated sizes (seeds, or shapes with equal N) are averaged: the three-point parabola
    # needs three distinct log N
    xs, inverse = np.unique(log_n, return_inverse=True)
    ys = np.bincount(inverse, weights=loss) / np.bincount(inverse)
    i = int(np.argmin(ys))
    if 0 < i < len(xs) - 1:  # an interior best size: the parabola through it and its neighbours
        local = np.polyfit(xs[i - 1 : i + 2], ys[i - 1 : i + 2], 2)
        x = -local[1] / (2 * local[0])
        return float(x), float(np.polyval(local, x)), False, coef
    return float(xs[i]), float(ys[i]), True, coef


def power_law(log_c: np.ndarray, log_y: np.ndarray) -> tuple[float, float]:
    """(log prefactor, exponent) of y = A C^e by least squares in log-log."""
    e, log_a = np.polyfit(log_c, log_y, 1)
    return float(log_a), float(e)


def shared_exponent(groups: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[float, dict]:
    """Joint fit log y = e log C + log A_g with one exponent e and one prefactor per group."""
    names = list(groups)
    rows, ys = [], []
    for j, name in enumerate(names):
        log_c, log_y = groups[name]
        for c, y in zip(log_c, log_y):
            rows.append([c] + [1.0 if k == j else 0.0 for k in range(len(names))])
            ys.append(y)
    sol, *_ = np.linalg.lstsq(np.asarray(rows), np.asarray(ys), rcond=None)
    return float(sol[0]), {name: float(sol[1 + j]) for j, name in enumerate(names)}


def frontier(rows: list[dict[str, Any]], include_clamped: bool = False) -> dict[str, Any]:
    """IsoFLOP optima per budget and the two power laws, for one parameterization's rows.

    An optimum that is not a bracketed minimum -- clamped (the best size at the grid's edge,
    or fewer than three sizes) or concave (the least-squares parabola over all sizes curves
    down: the sweep brackets no minimum) -- is only a bound on N_opt and L_opt, so it is left
    out of the power laws (in_fit=False, counted in "excluded") unless include_clamped."""
    by_budget: dict[float, list[dict]] = defaultdict(list)
    for r in rows:
        by_budget[r["budget"]].append(r)
    optima = []
    for budget in sorted(by_budget):
        pts = by_budget[budget]
        log_n = np.log([p["params"] for p in pts])
        loss = np.asarray([p["loss"] for p in pts])
        if len(set(log_n.tolist())) >= 3:
            x, l_opt, clamped, coef = isoflop_optimum(log_n, loss)
            parabola, residuals = coef.tolist(), (loss - np.polyval(coef, log_n)).tolist()
            concave = bool(coef[0] <= 0)
        else:  # a parabola needs three sizes: the best sampled one stands in, flagged
            i = int(np.argmin(loss))
            x, l_opt, clamped, parabola, residuals = float(log_n[i]), float(loss[i]), True, None, []
            concave = False
        spent = [p.get("train_flops") for p in pts]
        flops = (  # what the runs spent (each <= the budget by under one step), when recorded
            math.exp(float(np.mean(np.log(spent)))) if all(f and f > 0 for f in spent) else budget
        )
        optima.append(
            {
                "budget": budget,
                "flops": flops,
                "n_opt": math.exp(x),
                "loss_opt": l_opt,
                "clamped": clamped,
                "concave": concave,
                "in_fit": include_clamped or not (clamped or concave),
                "parabola": parabola,
                "residuals": residuals,
            }
        )
    used = [o for o in optima if o["in_fit"]]
    out: dict[str, Any] = {"optima": optima, "excluded": len(optima) - len(used)}
    if len(used) >= 2:
        log_c = np.log([o.get("flops", o["budget"]) for o in used])
        out["loss_law"] = power_law(log_c, np.log([o["loss_opt"] for o in used]))
        out["size_law"] = power_law(log_c, np.log([o["n_opt"] for o in used]))
    return out


def _exp(x: float) -> float:
    """exp(x), inf past the float range (a multiplier on a near-flat frontier: no crossing
    within reach) instead of OverflowError."""
    return math.inf if x > 709.0 else math.exp(x)  # NaN stays NaN


def multiplier(fa: dict, fb: dict, c_ref: float) -> dict[str, float]:
    """Compute multiplier of `a` over reference `b`: k with L_a(k C) = L_b(C).

    shared: from one exponent fitted to both frontiers (constant in C);
    at_c_ref: from the separate fits, at the reference budget c_ref. Both use only the optima
    the power laws use (in_fit)."""
    oa = [o for o in fa["optima"] if o.get("in_fit", True)]
    ob = [o for o in fb["optima"] if o.get("in_fit", True)]
    ga = (np.log([o.get("flops", o["budget"]) for o in oa]), np.log([o["loss_opt"] for o in oa]))
    gb = (np.log([o.get("flops", o["budget"]) for o in ob]), np.log([o["loss_opt"] for o in ob]))
    e, pref = shared_exponent({"a": ga, "b": gb})
    shared = _exp((pref["b"] - pref["a"]) / e)
    (la, ea), (lb, eb) = fa["loss_law"], fb["loss_law"]
    log_l_target = lb + eb * math.log(c_ref)  # the reference's frontier loss at c_ref
    c_a = _exp((log_l_target - la) / ea)
    return {"shared": shared, "shared_exponent": e, "at_c_ref": c_a / c_ref}


def fit_all(
    rows: list[dict], compare: list[str] | None, include_clamped: bool = False
) -> dict[str, Any]:
    labels = sorted({r["label"] for r in rows})
    fits = {
        lab: frontier([r for r in rows if r["label"] == lab], include_clamped) for lab in labels
    }
    result: dict[str, Any] = {"fits": fits}
    if compare and all("loss_law" in fits[lab] for lab in compare):
        a, b = compare
        budgets = sorted({o["flops"] for o in fits[b]["optima"] if o["in_fit"]})
        c_ref = math.exp(float(np.mean(np.log(budgets))))
        result["compare"] = {"a": a, "b": b, "c_ref": c_ref, **multiplier(fits[a], fits[b], c_ref)}
    return result


def bootstrap_centre(rows: list[dict]) -> list[dict]:
    """The rows the bootstrap redraws around: each loss replaced by the mean of the runs of its
    (parameterization, budget, size) -- exactly what isoflop_optimum reads (it averages
    repeated sizes), so fit_all(bootstrap_centre(rows)) gives the reported fit itself."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["label"], r["budget"], r["params"])].append(r["loss"])
    means = {k: float(np.mean(v)) for k, v in groups.items()}
    return [{**r, "loss": means[(r["label"], r["budget"], r["params"])]} for r in rows]


def bootstrap(
    rows: list[dict],
    compare: list[str] | None,
    n: int,
    seed: int,
    include_clamped: bool = False,
) -> dict[str, Any]:
    """Parametric bootstrap of the reported fits. Returns per-quantity draws.

    Every loss (budgets with fewer than three sizes too) is redrawn as centre + N(0, sigma^2)
    and fit_all -- the reported estimator, with its three-point vertices and its exclusions
    of clamped/concave budgets -- is redone.
    The centre is the measured curve itself (per-size means, bootstrap_centre), not a smooth
    fit to it: the reported optimum is the three-point vertex, which on a noisy or asymmetric
    curve differs from the vertex of the least-squares parabola over all sizes, and redrawing
    around that parabola gave the sampling spread of *its* vertex, centred away from the
    reported number (the point could fall outside its own interval). Around the measured curve
    the undisturbed draw is the reported fit, so the intervals are intervals of the reported
    numbers. The three-point vertex is kept as the estimator (rather than switching the point
    to the all-sizes parabola) because measured IsoFLOP curves over wide size ranges are not
    parabolas in log N (docs/scaling.png: steep on one side), and a parabola through the
    whole grid then puts its vertex off the minimum; the local fit only assumes a parabola
    near it. sigma (per parameterization) is the pooled scatter left around the all-sizes
    parabolas: any misfit of those parabolas counts as noise, so it errs wide, not narrow.
    A draw where a parameterization keeps fewer than two bracketed budgets has no power laws:
    its quantities are missing from that draw (the counts are in "n" and the draws' sizes)."""
    rng = np.random.default_rng(seed)
    base = fit_all(rows, compare, include_clamped)
    sigma = {}
    for lab, f in base["fits"].items():
        res = [x for o in f["optima"] for x in o["residuals"]]
        dof = len(res) - 3 * sum(o["parabola"] is not None for o in f["optima"])
        sigma[lab] = math.sqrt(sum(x * x for x in res) / dof) if dof > 0 else float("nan")
    centre = bootstrap_centre(rows)
    draws: dict[str, list[float]] = defaultdict(list)
    for _ in range(n):
        fake = []
        for r in centre:
            if not math.isfinite(sigma[r["label"]]):
                fake.append(r)  # no scatter to draw from (no parabola anywhere): as measured
                continue
            fake.append({**r, "loss": r["loss"] + rng.normal(0.0, sigma[r["label"]])})
        try:
            f = fit_all(fake, compare, include_clamped)
        except (KeyError, np.linalg.LinAlgError, ValueError, ZeroDivisionError):
            continue
        for lab, fl in f["fits"].items():
            if "loss_law" in fl:
                draws[f"{lab}.loss_A"].append(math.exp(fl["loss_law"][0]))
                draws[f"{lab}.loss_alpha"].append(fl["loss_law"][1])
                draws[f"{lab}.size_B"].append(math.exp(fl["size_law"][0]))
                draws[f"{lab}.size_b"].append(fl["size_law"][1])
        if "compare" in f:
            draws["multiplier.shared"].append(f["compare"]["shared"])
            draws["multiplier.at_c_ref"].append(f["compare"]["at_c_ref"])
    return {"sigma": sigma, "n": n, "draws": {k: np.asarray(v) for k, v in draws.items()}}


def interval(x: np.ndarray, log: bool = False) -> tuple[float, float, float]:
    """(16th, 50th, 84th percentile): a 68% interval, robust to a skewed bootstrap."""
    x = x[np.isfinite(x)]
    if x.size == 0:
        return (float("nan"),) * 3
    q = np.percentile(np.log(x) if log else x, [16, 50, 84])
    return tuple(float(np.exp(v)) if log else float(v) for v in q)


# ---- reporting ----------------------------------------------------------------------------------
def report(rows: list[dict], result: dict, boot: dict | None) -> str:
    lines = [
        "| param | budget C | spent | size | N (non-emb.) | steps | val NELBO |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["label"], r["budget"], r["params"])):
        spent = f"{r['train_flops']:.3g}" if r.get("train_flops") else "-"
        lines.append(
            f"| {r['label']} | {r['budget']:.3g} | {spent} | {r['size']} | {r['params']:,} | "
            f"{r['steps']} | {r['loss']:.4f} |"
        )
    lines.append("")
    draws = boot["draws"] if boot else {}

    def pm(key: str, value: float, log: bool = False) -> str:
        if key not in draws or draws[key].size < 10:
            return f"{value:.4g}"
        lo, _, hi = interval(draws[key], log)
        return f"{value:.4g} [{lo:.4g}, {hi:.4g}]"

    for lab, f in result["fits"].items():
        for o in f["optima"]:
            flags = ["clamped to a sampled size"] if o["clamped"] else []
            if o.get("concave"):
                flags.append("concave: the sweep brackets no minimum")
            if not o.get("in_fit", True):
                flags.append("left out of the power laws")
            flag = f" ({'; '.join(flags)})" if flags else ""
            spent = o.get("flops", o["budget"])  # what the laws are fitted at
            at = (
                f" (spent {spent:.3g})"
                if not math.isclose(spent, o["budget"], rel_tol=1e-3)
                else ""
            )
            lines.append(
                f"{lab}: C={o['budget']:.3g}{at}  N_opt={o['n_opt']:,.0f}  "
                f"L_opt={o['loss_opt']:.4f}{flag}"
            )
        flagged = sum(o["clamped"] or o.get("concave", False) for o in f["optima"])
        if f.get("excluded"):
            lines.append(
                f"{lab}: {f['excluded']} of {len(f['optima'])} budgets left out of the power laws "
                "(clamped or concave optima; --include-clamped fits them too)"
            )
        elif flagged:
            lines.append(
                f"{lab}: the power laws include {flagged} clamped or concave optima "
                "(--include-clamped): bounds on the optimum, not minima"
            )
        if "loss_law" not in f and len(f["optima"]) >= 2:
            lines.append(f"{lab}: no power laws: fewer than two budgets with a bracketed optimum")
        if "loss_law" in f:
            (la, alpha), (lb, b) = f["loss_law"], f["size_law"]
            lines.append(
                f"{lab}: L_opt = A C^alpha, A = {pm(f'{lab}.loss_A', math.exp(la), True)}, "
                f"alpha = {pm(f'{lab}.loss_alpha', alpha)}"
            )
            lines.append(
                f"{lab}: N_opt = B C^b, B = {pm(f'{lab}.size_B', math.exp(lb), True)}, "
                f"b = {pm(f'{lab}.size_b', b)}"
            )
    if "compare" in result:
        c = result["compare"]
        lines.append(
            f"compute multiplier {c['a']} vs {c['b']} (k: L_{c['a']}(k C) = L_{c['b']}(C)): "
            f"shared exponent {c['shared_exponent']:.4f}: k = "
            f"{pm('multiplier.shared', c['shared'], True)}; separate fits at C={c['c_ref']:.3g}: "
            f"k = {pm('multiplier.at_c_ref', c['at_c_ref'], True)}"
        )
    if boot:
        lines.append(
            "[68% intervals: parametric bootstrap around the measured losses, "
            + ", ".join(f"sigma_{k}={v:.4f}" for k, v in boot["sigma"].items())
            + " nats]"
        )
        total = boot.get("n", 0)
        short = {k: v.size for k, v in draws.items() if v.size < total}
        if short:
            lines.append(
                f"[of {total} draws, only some gave these fits (the others kept fewer than two "
                "bracketed budgets, or failed): "
                + ", ".join(f"{k} {m}" for k, m in short.items())
                + "]"
            )
    return "\n".join(lines)


def plot(rows: list[dict], result: dict, path: Path) -> None:
    """IsoFLOP curves (loss against N per budget), the loss frontier and N_opt against C."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r["label"] for r in rows})
    budgets = sorted({r["budget"] for r in rows})
    cmap = plt.get_cmap("viridis")
    color = {b: cmap(i / max(len(budgets) - 1, 1)) for i, b in enumerate(budgets)}
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for j, lab in enumerate(labels):
        style, marker = styles[j % 4], markers[j % 4]
        f = result["fits"][lab]
        for b in budgets:
            pts = sorted(
                (r for r in rows if r["label"] == lab and r["budget"] == b),
                key=lambda r: r["params"],
            )
            if not pts:
                continue
            n = np.asarray([p["params"] for p in pts], dtype=float)
            axes[0].plot(n, [p["loss"] for p in pts], marker, color=color[b])
            opt = next((o for o in f["optima"] if o["budget"] == b), None)
            if opt is not None and opt["parabola"] is not None:
                grid = np.linspace(np.log(n.min()), np.log(n.max()), 50)
                axes[0].plot(
                    np.exp(grid),
                    np.polyval(opt["parabola"], grid),
                    style,
                    color=color[b],
                    label=f"{lab} C={b:.2g}",
                )
                axes[0].plot(opt["n_opt"], opt["loss_opt"], "*", color=color[b], ms=12, mec="k")
        for o in f["optima"]:  # optima left out of the power laws: hollow
            fill = {} if o.get("in_fit", True) else {"mfc": "none"}
            axes[1].plot(o.get("flops", o["budget"]), o["loss_opt"], marker, color=f"C{j}", **fill)
            axes[2].plot(o.get("flops", o["budget"]), o["n_opt"], marker, color=f"C{j}", **fill)
        if "loss_law" in f:
            c = np.asarray([o.get("flops", o["budget"]) for o in f["optima"]])
            grid = np.geomspace(c.min() / 2, c.max() * 4, 50)
            (la, alpha), (lb, bexp) = f["loss_law"], f["size_law"]
            axes[1].plot(
                grid,
                np.exp(la) * grid**alpha,
                style,
                color=f"C{j}",
                label=f"{lab}: L = {np.exp(la):.3g} C^{alpha:.3f}",
            )
            axes[2].plot(
                grid,
                np.exp(lb) * grid**bexp,
                style,
                color=f"C{j}",
                label=f"{lab}: N = {np.exp(lb):.3g} C^{bexp:.3f}",
            )
    if "compare" in result:
        c = result["compare"]
        axes[1].set_title(f"frontier: {c['a']} needs {c['shared']:.1f}x the compute of {c['b']}")
    else:
        axes[1].set_title("compute-optimal loss")
    axes[0].set(
        xscale="log",
        xlabel="non-embedding parameters N",
        ylabel="validation NELBO (nats/token)",
        title="IsoFLOP curves",
    )
    axes[1].set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="L_opt")
    axes[2].set(
        xscale="log",
        yscale="log",
        xlabel="training FLOPs C",
        ylabel="N_opt",
        title="compute-optimal size",
    )
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # no fitted law: nothing to label
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def fit(args: argparse.Namespace) -> dict[str, Any]:
    rows = collect(args.out)
    if not rows:
        raise SystemExit(f"no finished flops-budget runs (ppl_eval.json) under {args.out}")
    labels = sorted({r["label"] for r in rows})
    compare = args.compare
    if compare is None and len(labels) == 2:  # the other against ar (or the first name)
        ref = "ar" if "ar" in labels else labels[0]
        compare = [next(lab for lab in labels if lab != ref), ref]
    if compare and not set(compare) <= set(labels):
        raise SystemExit(f"--compare {compare}: the runs hold {labels}")
    result = fit_all(rows, compare, args.include_clamped)
    boot = (
        bootstrap(rows, compare, args.bootstrap, args.seed, args.include_clamped)
        if args.bootstrap
        else None
    )
    text = report(rows, result, boot)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fit.md").write_text(text + "\n")
    summary = {"rows": rows, **result}
    if boot:
        summary["bootstrap"] = {
            "sigma": boot["sigma"],
            "n": boot["n"],
            "draws_used": {k: int(v.size) for k, v in boot["draws"].items()},
            "intervals_68": {
                k: interval(v, log=not k.endswith(("alpha", "_b")))
                for k, v in boot["draws"].items()
            },
        }
    (args.out / "fit.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.plot:
        plot(rows, result, args.plot)
    return summary


def main() -> None:
    argv = sys.argv[1:]
    overrides: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("sweep", "fit"):
        s = sub.add_parser(name)
        s.add_argument("--out", type=Path, default=ROOT / "outputs" / "scaling")
        s.add_argument("--plot", type=Path, help="write the IsoFLOP / frontier figure here")
        s.add_argument(
            "--compare",
            nargs=2,
            metavar=("X", "REF"),
            help="compute multiplier of X over REF (default with two: the other over ar/the second)",
        )
        s.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws (0: none)")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument(
            "--include-clamped",
            action="store_true",
            help="fit the power laws through clamped and concave optima too (flagged either way; "
            "default: left out, and counted)",
        )
    s = sub.choices["sweep"]
    s.add_argument("--param", nargs="+", default=["subs"], choices=sorted(PARAMETERIZATIONS))
    s.add_argument("--budgets", nargs="+", type=float, required=True, help="training FLOPs")
    s.add_argument("--sizes", nargs="+", required=True, help="LxD[xH] or model option names")
    s.add_argument(
        "--launcher",
        choices=["local", "multirun", "slurm"],
        default="local",
        help="local: one main.py per point; multirun: one in-process Hydra multirun per size; "
        "slurm: the same multiruns on hydra/launcher=slurm",
    )
    s.add_argument("--jobs", type=int, default=1, help="local runs side by side")
    s.add_argument("--threads", type=int, default=0, help="torch threads per run (0: default)")
    s.add_argument("--min-steps", type=int, default=50, help="skip points with fewer steps")
    s.add_argument("--max-steps", type=int, default=100000, help="skip points with more steps")
    s.add_argument("--warmup", type=int, default=50, help="warm-up steps (at most steps/10)")
    s.add_argument("--reuse", action="store_true", help="keep runs that finished already")
    s.add_argument("--dry-run", action="store_true", help="print the runs, train nothing")
    s.add_argument("--no-fit", action="store_true")
    args = p.parse_args(argv)
    args.overrides = overrides
    if args.command == "sweep":
        sweep(args)
    else:
        fit(args)


if __name__ == "__main__":
    main()
