"""What every mode writes into Hydra's run directory: JSON reports, samples, sweep rows."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

log = logging.getLogger("unmask")
SWEEP_KEYS = ("sampler", "steps", "nfe", "wall_s", "tokens_per_s", "gen_ppl", "entropy")


def run_dir() -> Path:
    """Hydra's run directory of this job (`hydra.run.dir=...` moves it)."""
    return Path(HydraConfig.get().runtime.output_dir)


def write_json(name: str, payload: dict[str, Any]) -> Path:
    path = run_dir() / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    log.info("wrote %s", path)
    return path


def write_samples(texts: list[str], tokens: list[list[int]]) -> Path:
    """samples.jsonl: one {"text", "tokens"} per sample."""
    path = run_dir() / "samples.jsonl"
    with open(path, "w") as f:
        for text, row in zip(texts, tokens):
            f.write(json.dumps({"text": text, "tokens": row}) + "\n")
    return path


def print_samples(texts: list[str], limit: int = 4) -> None:
    from rich.console import Console
    from rich.panel import Panel

    console = Console()
    for i, text in enumerate(texts[:limit]):
        console.print(Panel(text, title=f"sample {i}", expand=False))


def append_sweep_row(report: dict[str, Any]) -> None:
    """Under Hydra multirun, one row per (sampler, steps) run in the sweep's rows file."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    row = {k: report.get(k) for k in (*SWEEP_KEYS, "num_samples")}
    with open(Path(hc.sweep.dir) / "sample_eval_rows.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
