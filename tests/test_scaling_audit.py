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
