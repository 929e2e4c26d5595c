"""Plot sample_eval's sampler sweep: gen_ppl and entropy against steps, one line per sampler.

Reads the rows `mode=sample_eval` writes (JSON list, JSON lines or CSV; one row per
(sampler, steps) with keys sampler, steps, nfe, wall_s, tokens_per_s, gen_ppl, entropy)
and draws two panels with matplotlib; steps on a log axis.

    python scripts/plot_samplers.py outputs/.../samplers.json -o samplers.png
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def read_rows(path: Path) -> list[dict]:
    text = path.read_text()
    if path.suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    stripped = text.strip()
    if stripped.startswith("["):
        return json.loads(stripped)
    return [json.loads(line) for line in stripped.splitlines() if line.strip()]


def series(rows: list[dict], key: str) -> dict[str, list[tuple[float, float]]]:
    """sampler -> [(steps, value)] sorted by steps; rows without a finite value are skipped."""
    out: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        try:
            steps, value = float(row["steps"]), float(row[key])
        except (TypeError, ValueError, KeyError):
            continue
        if steps > 0 and math.isfinite(value):
            out.setdefault(str(row["sampler"]), []).append((steps, value))
    return {name: sorted(points) for name, points in sorted(out.items())}


def plot(rows: list[dict], out: Path) -> None:
    """Two panels (gen_ppl, entropy) against steps; a line with markers per sampler."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, title in zip(axes, ("gen_ppl", "entropy"), ("gen ppl", "entropy (nats)")):
        data = series(rows, key)
        for name, points in data.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("steps")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if not data:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rows", type=Path, help="JSON / JSON lines / CSV rows from sample_eval")
    parser.add_argument("-o", "--out", type=Path, default=Path("samplers.png"))
    args = parser.parse_args()
    plot(read_rows(args.rows), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
