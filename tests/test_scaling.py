"""Train by compute and the IsoFLOP fits: the FLOPs-budget arithmetic by hand, the fits on
points drawn from a known law, and a 2 budgets x 2 sizes sweep through scripts/scaling.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from diffusion.config import ConfigError, register_resolvers
from diffusion.flops import (
    apply_flops_budget,
    backbone_flops,
    count_flops,
    matmul_params,
    non_embedding_params,
    plan_budget,
    steps_for_budget,
)
from models.dit import DiT
from tests.tiny_lm import load_script

ROOT = Path(__file__).resolve().parents[1]


def load_scaling():
    """scripts/scaling.py as a module."""
    return load_script("scaling")


# ---- the arithmetic -----------------------------------------------------------------------------
def test_steps_from_budget_hand_example():
    # 1000 matmul weights, 2 layers of width 8, rows of 16 tokens, global batch 4:
    # FLOPs/token = 6*1000 + 12*2*8*16 = 6000 + 3072 = 9072; tokens/step = 4*16 = 64;
    # one step = 580,608 FLOPs; 1e7 FLOPs buy floor(17.22...) = 17 steps (9,870,336 FLOPs).
    count = count_flops(1000, n_layers=2, d_model=8, length=16)
    assert count.matmul == 6000 and count.attention == 3072 and count.per_token == 9072
    plan = plan_budget(1e7, count, global_batch_size=4)
    assert plan.tokens_per_step == 64
    assert plan.steps == 17
    assert plan.train_flops == 17 * 64 * 9072 == 9_870_336
    assert steps_for_budget(580_608, 9072, 64) == 1  # exactly one step
    with pytest.raises(ConfigError, match="buys no step"):
        steps_for_budget(580_607, 9072, 64)
    with pytest.raises(ConfigError, match="training.flops_budget"):
        steps_for_budget(-1.0, 9072, 64)


def test_dit_counts_by_hand():
    # vocab 10, width 8, 1 block, 2 heads, cond 4, MLP ratio 4:
    # per-token matmuls: qkv 8*24 + proj 8*8 + MLP 8*32 + 32*8 + head 8*10 = 848 weights
    # (adaLN and the sigma embedding act once per sequence: left out)
    dit = DiT(vocab_size=10, hidden_size=8, n_blocks=1, n_heads=2, cond_dim=4, max_length=16)
    assert matmul_params(dit) == 192 + 64 + 256 + 256 + 80
    # non-embedding: all but the token embedding (10*8) and the head (8*10 + 10):
    # qkv 192 + proj 64 + MLP (256+32) + (256+8) + block adaLN (4*48+48) + final adaLN
    # (4*16+16) + sigma embedding (256*4+4) + (4*4+4) = 2176
    assert non_embedding_params(dit) == 192 + 64 + 288 + 264 + 240 + 80 + 1028 + 20
    count = backbone_flops(dit, length=16)
    assert count.per_token == 6 * 848 + 12 * 1 * 8 * 16


def test_apply_flops_budget_sets_max_steps_before_the_schedule_reads_it():
    register_resolvers()
    cfg = OmegaConf.create(
        {
            "model": {"length": 16},
            "loader": {"global_batch_size": 4},
            "training": {"flops_budget": "1.3e6"},
            "trainer": {"max_steps": 1100},
            "lr_scheduler": {"num_training_steps": "${trainer.max_steps}"},
        }
    )
    dit = DiT(vocab_size=10, hidden_size=8, n_blocks=1, n_heads=2, cond_dim=4, max_length=16)
    plan = apply_flops_budget(cfg, dit)
    # one step: (6 * 848 + 12 * 8 * 16) x 64 tokens = 423,936 FLOPs; 1.3e6 / 423,936 = 3.07
    assert plan.steps == 3 and plan.train_flops == 3 * 423_936
    assert cfg.trainer.max_steps == 3 and cfg.lr_scheduler.num_training_steps == 3
    cfg.training.flops_budget = None  # no budget: max_steps untouched
    cfg.trainer.max_steps = 1100
    assert apply_flops_budget(cfg, dit) is None and cfg.trainer.max_steps == 1100
    cfg.training.flops_budget = "lots"
    with pytest.raises(ConfigError, match="training.flops_budget"):
        apply_flops_budget(cfg, dit)


# ---- the fits -----------------------------------------------------------------------------------
def synthetic_rows(label, a, alpha, b_pref, b_exp, budgets, curvature=0.08, noise=0.0, seed=0):
    """IsoFLOP points of a known law: L(N; C) = A C^alpha + k (ln N - ln N_opt(C))^2 with
    N_opt = B C^b, five sizes per budget spread around the optimum."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        n_opt = b_pref * c**b_exp
        for f in (0.25, 0.5, 1.3, 2.5, 5.0):
            n = n_opt * f
            loss = a * c**alpha + curvature * math.log(f) ** 2 + rng.normal(0, noise)
            rows.append({"label": label, "budget": c, "params": int(n), "loss": loss})
    return rows


def test_fit_recovers_a_known_law_and_multiplier():
    scaling = load_scaling()
    budgets = [1e15, 3e15, 1e16, 3e16]
    a, alpha, b_pref, b_exp, k = 30.0, -0.06, 0.05, 0.5, 16.0
    ref = synthetic_rows("ar", a, alpha, b_pref, b_exp, budgets)
    # the other needs k times the compute for the same loss: L_x(C) = L_ref(C / k)
    other = synthetic_rows("subs", a * k ** (-alpha), alpha, b_pref / 2, b_exp, budgets)
    result = scaling.fit_all(ref + other, ["subs", "ar"])
    la, ea = result["fits"]["ar"]["loss_law"]
    lb, eb = result["fits"]["ar"]["size_law"]
    # sizes are rounded to integers: a few 1e-6 relative in N
    assert math.exp(la) == pytest.approx(a, rel=1e-4) and ea == pytest.approx(alpha, abs=1e-5)
    assert math.exp(lb) == pytest.approx(b_pref, rel=1e-3) and eb == pytest.approx(b_exp, abs=1e-4)
    n_opt = result["fits"]["subs"]["optima"][0]["n_opt"]
    assert n_opt == pytest.approx(b_pref / 2 * 1e15**b_exp, rel=1e-3)
    assert result["compare"]["shared"] == pytest.approx(k, rel=1e-3)
    assert result["compare"]["at_c_ref"] == pytest.approx(k, rel=1e-3)


def test_bootstrap_interval_covers_the_truth_under_noise():
    scaling = load_scaling()
    budgets = [1e15, 3e15, 1e16, 3e16]
    k, alpha = 4.0, -0.08
    rows = synthetic_rows("ar", 20.0, alpha, 0.1, 0.5, budgets, noise=0.003, seed=1)
    rows += synthetic_rows("subs", 20.0 * k ** (-alpha), alpha, 0.1, 0.5, budgets, noise=0.003)
    boot = scaling.bootstrap(rows, ["subs", "ar"], n=300, seed=0)
    assert 0.001 < boot["sigma"]["ar"] < 0.01  # the scatter left around the parabolas
    lo, mid, hi = scaling.interval(boot["draws"]["multiplier.shared"], log=True)
    assert lo < hi and lo / 2 < k < hi * 2  # a 68% interval, wide enough to sit near k
    lo_a, _, hi_a = scaling.interval(boot["draws"]["ar.loss_alpha"])
    assert lo_a - 0.02 < alpha < hi_a + 0.02


def test_isoflop_vertex_outside_the_sizes_is_clamped():
    scaling = load_scaling()
    log_n = np.log([1e4, 2e4, 4e4, 8e4])
    loss = np.asarray([3.0, 2.9, 2.8, 2.7])  # still falling: the optimum is beyond the grid
    x, l_opt, clamped, _ = scaling.isoflop_optimum(log_n, loss)
    assert clamped and x == pytest.approx(math.log(8e4)) and l_opt == pytest.approx(2.7)


def test_size_specs():
    scaling = load_scaling()
    assert scaling.size_overrides("4x256") == [
        "model.n_blocks=4",
        "model.hidden_size=256",
        "model.n_heads=4",
        "model.cond_dim=128",
    ]  # the shape of model=tiny
    assert scaling.size_overrides("2x96")[2] == "model.n_heads=3"
    assert scaling.size_overrides("smdm_19") == ["model=smdm_19"]
    with pytest.raises(SystemExit, match="divisible"):
        scaling.size_overrides("2x30x4")


# ---- end to end ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_budgets_two_sizes_sweep_end_to_end(tmp_path):
    out, plot = tmp_path / "runs", tmp_path / "scaling.png"
    cmd = [
        sys.executable,
        "scripts/scaling.py",
        "sweep",
        "--launcher",
        "multirun",
        "--min-steps",
        "2",
        "--param",
        "subs",
        "--budgets",
        "1e8",
        "2e8",
        "--sizes",
        "1x16x1",
        "1x32x1",
        "--out",
        str(out),
        "--plot",
        str(plot),
        "--bootstrap",
        "20",
        "--",
        "data=shakespeare_char",  # the budgets buy >= 2 steps of each size at 79 types
        "model.length=32",
        "loader.global_batch_size=4",
        "eval.max_batches=2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert plot.is_file() and plot.stat().st_size > 10_000
    fit = json.loads((out / "fit.json").read_text())
    assert len(fit["rows"]) == 4
    assert {r["budget"] for r in fit["rows"]} == {1e8, 2e8}
    for row in fit["rows"]:  # every run took the steps its budget buys, no more
        stats = json.loads((Path(row["run"]) / "ppl_eval.json").read_text())
        per_step = stats["flops_per_token"] * stats["tokens_per_step"]
        assert stats["steps"] == int(row["budget"] // per_step)
        assert stats["train_flops"] <= row["budget"] < stats["train_flops"] + per_step
        assert math.isfinite(stats["nelbo"]) and stats["non_embedding_params"] > 0
    # two sizes per budget bracket no minimum: both optima are clamped, left out, no laws ...
    assert "2 of 2 budgets left out of the power laws" in proc.stdout
    assert "L_opt = A C^alpha" not in proc.stdout
    # ... unless asked for: a refit (no training) through them
    refit = [sys.executable, "scripts/scaling.py", "fit", "--out", str(out), "--bootstrap", "20"]
    refit.append("--include-clamped")
    proc = subprocess.run(refit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "L_opt = A C^alpha" in proc.stdout and "include 2 clamped or concave" in proc.stdout
