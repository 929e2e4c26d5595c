"""Plot sample_eval's sampler sweep: gen_ppl and entropy against steps, one line per sampler.

Reads the rows `mode=sample_eval` writes (JSON list, JSON lines or CSV; one row per
(sampler, steps) with keys sampler, steps, nfe, wall_s, tokens_per_s, gen_ppl, entropy)
and draws two panels with pillow (no matplotlib dependency); steps on a log axis.

    python scripts/plot_samplers.py outputs/.../samplers.json -o samplers.png
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
]
PANEL_W, PANEL_H, PAD = 420, 300, 50


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


def draw_panel(
    draw: ImageDraw.ImageDraw, left: int, data: dict, title: str, colours: dict, font
) -> None:
    """One panel: axes, log-x ticks at the measured steps, linear-y ticks, a line per sampler."""
    points = [p for pts in data.values() for p in pts]
    x0, y0, x1, y1 = left + PAD, PAD, left + PANEL_W - 10, PANEL_H - PAD + 20
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    draw.text((x0, 15), title, fill=(0, 0, 0), font=font)
    if not points:
        draw.text((x0 + 10, y0 + 10), "no data", fill=(0, 0, 0), font=font)
        return
    lx = [math.log(p[0]) for p in points]
    ys = [p[1] for p in points]
    lx_lo, lx_hi = min(lx), max(lx) if max(lx) > min(lx) else min(lx) + 1
    y_lo, y_hi = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    y_pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - y_pad, y_hi + y_pad

    def to_px(steps: float, value: float) -> tuple[float, float]:
        fx = (math.log(steps) - lx_lo) / (lx_hi - lx_lo)
        fy = (value - y_lo) / (y_hi - y_lo)
        return x0 + 10 + fx * (x1 - x0 - 20), y1 - fy * (y1 - y0)

    for steps in sorted({p[0] for p in points}):
        px, _ = to_px(steps, y_lo)
        draw.line([px, y1, px, y1 + 4], fill=(0, 0, 0))
        draw.text((px - 8, y1 + 6), f"{steps:g}", fill=(0, 0, 0), font=font)
    for i in range(5):
        value = y_lo + i * (y_hi - y_lo) / 4
        _, py = to_px(math.exp(lx_lo), value)
        draw.line([x0 - 4, py, x0, py], fill=(0, 0, 0))
        draw.text((left + 2, py - 6), f"{value:.3g}", fill=(0, 0, 0), font=font)
    draw.text((x1 - 60, y1 + 20), "steps (log)", fill=(0, 0, 0), font=font)
    for name, pts in data.items():
        colour = colours[name]
        xy = [to_px(*p) for p in pts]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)


def plot(rows: list[dict], out: Path) -> None:
    font = ImageFont.load_default()
    ppl, entropy = series(rows, "gen_ppl"), series(rows, "entropy")
    names = sorted(set(ppl) | set(entropy))
    image = Image.new("RGB", (2 * PANEL_W, PANEL_H + 30 + 14 * len(names)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    colours = {name: COLOURS[k % len(COLOURS)] for k, name in enumerate(names)}
    draw_panel(draw, 0, ppl, "generative perplexity (lower is better)", colours, font)
    draw_panel(draw, PANEL_W, entropy, "mean sample entropy (low: degenerate text)", colours, font)
    for k, name in enumerate(names):  # legend
        y = PANEL_H + 25 + 14 * k
        draw.rectangle([PAD, y + 2, PAD + 10, y + 10], fill=colours[name])
        draw.text((PAD + 16, y), name, fill=(0, 0, 0), font=font)
    image.save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rows", type=Path, help="JSON / JSON lines / CSV rows from sample_eval")
    parser.add_argument("-o", "--out", type=Path, default=Path("samplers.png"))
    args = parser.parse_args()
    plot(read_rows(args.rows), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
