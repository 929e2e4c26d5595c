"""Audit of scripts/scaling.py's IsoFLOP fits: repeated sizes at the best point of an IsoFLOP
curve, and the compute multiplier on a near-flat loss frontier (the bootstrap must not crash).
Golden values come from exact parabolas and hand arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.tiny_lm import load_script


def load_scaling():
    """scripts/scaling.py as a module."""
    return load_script("scaling")


def test_isoflop_vertex_with_a_repeated_size():
    # L = 2 + 0.1 (ln N - ln 3e4)^2 at four sizes, 2e4 run twice (two seeds, +-0.01): the
    # average of the pair lies on the parabola, so the vertex is exactly ln 3e4 and L_opt = 2.
    scaling = load_scaling()
    sizes = [1e4, 2e4, 2e4, 4e4, 8e4]
    log_n = np.log(sizes)
    loss = 2.0 + 0.1 * (log_n - math.log(3e4)) ** 2
    loss[1] += 0.01
    loss[2] -= 0.01
    x, l_opt, clamped, coef = scaling.isoflop_optimum(log_n, loss)
    assert not clamped
    assert x == pytest.approx(math.log(3e4), abs=1e-9)
    assert l_opt == pytest.approx(2.0, abs=1e-12)
    assert coef[0] == pytest.approx(0.1, rel=1e-2)  # the least-squares parabola over all rows


def test_frontier_with_repeated_sizes_recovers_n_opt():
    # the same IsoFLOP curve per budget with every size run twice gives the same optimum
    scaling = load_scaling()
    rows = []
    for c, n_opt in ((1e15, 2e4), (1e16, 6e4)):
        for f in (0.25, 0.5, 1.3, 2.5, 5.0):
            for d in (-0.002, 0.002):
                loss = 3.0 + 0.08 * math.log(f) ** 2 + d
                rows.append({"label": "ar", "budget": c, "params": int(n_opt * f), "loss": loss})
    fit = scaling.frontier(rows)
    for o, n_opt in zip(fit["optima"], (2e4, 6e4)):
        assert not o["clamped"]
        assert o["n_opt"] == pytest.approx(n_opt, rel=1e-4)  # sizes rounded to integers
        assert o["loss_opt"] == pytest.approx(3.0, abs=1e-8)


def test_multiplier_on_a_flat_frontier_is_inf_not_an_error():
    # shared exponent 1e-5 and a constant gap ln(3.3/3.0): ln k = -0.0953 / -1e-5 = 9531,
    # past the float range: no compute within reach closes the gap.
    scaling = load_scaling()
    budgets = [1e15, 1e16]

    def fit(level):
        optima = [{"budget": c, "loss_opt": level * c**-1e-5} for c in budgets]
        return {"optima": optima, "loss_law": (math.log(level), -1e-5)}

    out = scaling.multiplier(fit(3.3), fit(3.0), 1e15**0.5 * 1e16**0.5)
    assert out["shared_exponent"] == pytest.approx(-1e-5, rel=1e-6)
    assert out["shared"] == math.inf and out["at_c_ref"] == math.inf
    # a reachable gap stays finite and exact: alpha = -0.05, gap 4^0.05 -> k = 4
    out = scaling.multiplier(
        {
            "optima": [{"budget": c, "loss_opt": 3.0 * 4**0.05 * c**-0.05} for c in budgets],
            "loss_law": (math.log(3.0 * 4**0.05), -0.05),
        },
        {
            "optima": [{"budget": c, "loss_opt": 3.0 * c**-0.05} for c in budgets],
            "loss_law": (math.log(3.0), -0.05),
        },
        1e15,
    )
    assert out["shared"] == pytest.approx(4.0, rel=1e-9)
    assert out["at_c_ref"] == pytest.approx(4.0, rel=1e-9)


def test_bootstrap_survives_a_flat_frontier():
    # compute buys nothing (alpha = 0) and subs sits 0.3 nats above ar: the bootstrap's shared
    # exponent straddles 0, some draws' multipliers pass the float range; every draw still
    # gives its loss and size laws.
    scaling = load_scaling()
    rng = np.random.default_rng(0)
    rows = []
    for label, level in (("ar", 3.0), ("subs", 3.3)):
        for c in (1e15, 3e15, 1e16):
            for f in (0.25, 0.5, 1.3, 2.5, 5.0):
                loss = level + 0.08 * math.log(f) ** 2 + rng.normal(0, 0.01)
                rows.append({"label": label, "budget": c, "params": int(1e5 * f), "loss": loss})
    n = 300
    boot = scaling.bootstrap(rows, ["subs", "ar"], n=n, seed=0)
    assert boot["draws"]["ar.loss_alpha"].size == n
    assert boot["draws"]["multiplier.shared"].size == n
    assert np.isinf(boot["draws"]["multiplier.shared"]).any()
    lo, _, hi = scaling.interval(boot["draws"]["ar.loss_alpha"])
    assert -0.02 < lo < hi < 0.02  # near the truth, alpha = 0


# ---- honest intervals: the bootstrap centres on the reported estimator; unbracketed optima ----
def law_rows(budgets, a=20.0, alpha=-0.05, b_pref=0.1, b_exp=0.5, noise=0.0, seed=0, fs=None):
    """IsoFLOP points of L(N; C) = a C^alpha + 0.08 (ln N - ln N_opt)^2, N_opt = b_pref C^b_exp,
    at N = N_opt * f (five sizes around the optimum unless `fs`), plus N(0, noise^2)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        for f in fs or (0.25, 0.5, 1.3, 2.5, 5.0):
            loss = a * c**alpha + 0.08 * math.log(f) ** 2 + rng.normal(0, noise)
            rows.append({"label": "ar", "budget": c, "params": int(b_pref * c**b_exp * f)})
            rows[-1]["loss"] = loss
    return rows


@pytest.mark.parametrize("seed", [3, 6, 8, 9])
def test_bootstrap_interval_contains_its_own_point_estimate(seed):
    # noise 0.01 nats on four budgets: the three-point vertices scatter around the truth. The
    # old bootstrap redrew the losses around the all-sizes least-squares parabolas, so its
    # intervals were of *their* vertices: at these seeds alpha and/or b fell outside their
    # own 68% interval (seed 3: b = 0.557, interval [0.460, 0.518]). Redrawn around the
    # measured curve, the undisturbed draw is the reported fit, and the point sits inside.
    scaling = load_scaling()
    rows = law_rows([1e15, 3e15, 1e16, 3e16], noise=0.01, seed=seed)
    result = scaling.fit_all(rows, None)
    (_, alpha), (_, b) = result["fits"]["ar"]["loss_law"], result["fits"]["ar"]["size_law"]
    boot = scaling.bootstrap(rows, None, n=200, seed=0)
    lo, _, hi = scaling.interval(boot["draws"]["ar.loss_alpha"])
    assert lo <= alpha <= hi
    lo, _, hi = scaling.interval(boot["draws"]["ar.size_b"])
    assert lo <= b <= hi
    # by construction: the estimator on the bootstrap's centre is the reported fit
    centre = scaling.fit_all(scaling.bootstrap_centre(rows), None)["fits"]["ar"]
    assert centre["loss_law"] == pytest.approx(result["fits"]["ar"]["loss_law"], abs=1e-12)
    assert centre["size_law"] == pytest.approx(result["fits"]["ar"]["size_law"], abs=1e-12)


def test_concave_isoflop_curve_is_flagged_and_left_out():
    # budgets 1e15 and 1e16 follow the law exactly; at 1e17 the curve is W-shaped (a dip at
    # f = 1.3 between two high neighbours, low ends): its best size is interior, so the old
    # code took the three-point vertex unflagged and fed it to the power laws, but the
    # least-squares parabola over all five sizes curves down -- no bracketed minimum.
    scaling = load_scaling()
    a, alpha, b_pref, b_exp = 20.0, -0.05, 0.1, 0.5
    rows = law_rows([1e15, 1e16])
    n_opt, l_opt = b_pref * 1e17**b_exp, a * 1e17**alpha
    for f, d in zip((0.25, 0.5, 1.3, 2.5, 5.0), (0.0, 0.10, -0.05, 0.10, 0.0)):
        rows.append({"label": "ar", "budget": 1e17, "params": int(n_opt * f), "loss": l_opt + d})
    fit = scaling.frontier(rows)
    # the power laws come from the two bracketed budgets alone: the exact law
    assert fit["loss_law"][1] == pytest.approx(alpha, abs=1e-9)
    assert fit["size_law"][1] == pytest.approx(b_exp, abs=1e-4)  # sizes rounded to integers
    mid = fit["optima"][2]
    assert mid["parabola"][0] < 0 and not mid["clamped"]
    assert mid["concave"] and not mid["in_fit"] and fit["excluded"] == 1
    text = scaling.report([], {"fits": {"ar": fit}}, None)
    assert "C=1e+17" in text and "(concave: the sweep brackets no minimum; left out" in text
    assert "ar: 1 of 3 budgets left out of the power laws" in text
    # kept on request, still flagged
    kept = scaling.frontier(rows, include_clamped=True)
    assert kept["optima"][2]["in_fit"] and kept["optima"][2]["concave"]
    assert kept["loss_law"][1] != pytest.approx(alpha, abs=1e-4)


def test_clamped_optimum_is_left_out_of_the_power_laws_by_default():
    # at 3e16 every swept size is below N_opt (f = 0.1 .. 0.6): the loss still falls at the
    # largest size, whose value is only a bound on N_opt and L_opt. The old code fed it to the
    # power laws (flagged, but fitted): b came out 0.37 instead of 0.5.
    scaling = load_scaling()
    rows = law_rows([1e15, 3e15, 1e16]) + law_rows([3e16], fs=(0.1, 0.2, 0.35, 0.6))
    fit = scaling.frontier(rows)
    assert fit["size_law"][1] == pytest.approx(0.5, abs=1e-4)
    assert fit["loss_law"][1] == pytest.approx(-0.05, abs=1e-9)
    assert [o["clamped"] for o in fit["optima"]] == [False, False, False, True]
    assert [o["in_fit"] for o in fit["optima"]] == [True, True, True, False]
    assert fit["excluded"] == 1
    text = scaling.report([], {"fits": {"ar": fit}}, None)
    assert "(clamped to a sampled size; left out of the power laws)" in text
    assert "ar: 1 of 4 budgets left out of the power laws" in text
    # --include-clamped: the old behaviour, said so in the output
    kept = scaling.frontier(rows, include_clamped=True)
    assert all(o["in_fit"] for o in kept["optima"]) and kept["excluded"] == 0
    assert kept["size_law"][1] < 0.45
    text = scaling.report([], {"fits": {"ar": kept}}, None)
    assert "the power laws include 1 clamped or concave optima" in text
    # the bootstrap redoes the same exclusion in every draw: its b stays near 0.5, around the
    # reported point
    noisy = law_rows([1e15, 3e15, 1e16], noise=0.003, seed=1)
    noisy += law_rows([3e16], fs=(0.1, 0.2, 0.35, 0.6), noise=0.003, seed=2)
    b = scaling.frontier(noisy)["size_law"][1]
    boot = scaling.bootstrap(noisy, None, n=200, seed=0)
    lo, _, hi = scaling.interval(boot["draws"]["ar.size_b"])
    assert 0.4 < lo <= b <= hi < 0.6


def test_the_power_laws_use_the_flops_the_runs_spent():
    """Each run spends floor(budget / per-step) steps, up to one step under its budget: the laws
    are fitted at the recorded train_flops (geometric mean per budget), the budget without it."""
    scaling = load_scaling()
    rows = law_rows([1e15, 3e15, 1e16])
    nominal = scaling.frontier(rows)
    for r in rows:
        r["train_flops"] = r["budget"] * 0.5
    spent = scaling.frontier(rows)
    assert [o["flops"] for o in spent["optima"]] == pytest.approx([5e14, 1.5e15, 5e15])
    (la0, alpha0), (la, alpha) = nominal["loss_law"], spent["loss_law"]
    assert alpha == pytest.approx(alpha0, abs=1e-12)  # a constant factor moves only A
    assert la == pytest.approx(la0 - alpha0 * math.log(0.5), abs=1e-9)
    rows[0]["train_flops"] = None  # one run of the first budget unrecorded: its budget stands in
    assert scaling.frontier(rows)["optima"][0]["flops"] == 1e15
    for r in rows:  # the table's other columns
        r.update(size=r.get("size", "s"), steps=r.get("steps", 1), params=int(r["params"]))
    text = scaling.report(rows, scaling.fit_all(rows, None), None)  # names C and the spend
    assert "C=3e+15 (spent 1.5e+15)" in text and "| ar | 3e+15 | 1.5e+15 |" in text
