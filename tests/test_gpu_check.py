"""scripts/gpu_check.sh --dry-run: the GPU check's steps at toy sizes on CPU, end to end (the
sections and figures the GPU run prints), so the one-command check cannot rot between GPU runs."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_dry(tmp_path: Path, sections: str) -> dict:
    env = dict(os.environ, OUT=str(tmp_path), DRY_SECTIONS=sections, DRY_PYTEST="0")
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dry run done" in proc.stdout
    return json.loads((tmp_path / "dry_run.json").read_text())


def test_gpu_check_dry_run_measures_training_loss_and_sampling(tmp_path):
    report = run_dry(tmp_path, "train loss sample")
    assert report["length"] == 32 and report["matmul_peak_tflops"] > 0
    assert report["train"]["train_tokens_per_s"] > 0
    assert 0 < report["train"]["mfu_measured_peak"] < 1.5
    loss = report["loss"]
    assert loss["full_step_s"] > 0 and loss["lean_step_s"] > 0
    assert loss["full_peak_gb"] >= 0 and loss["lean_peak_gb"] >= 0
    (row,) = report["sampling"]
    for name in ("ddpm", "ddpm_cache", "confidence"):
        assert row[f"{name}_tokens_per_s"] > 0
    assert row["same_samples"]  # ddpm_cache is exact


@pytest.mark.slow
def test_gpu_check_dry_run_every_section(tmp_path):
    report = run_dry(tmp_path, "train loss backbones modes sample")
    names = {r["backbone"] for r in report["backbones"]}
    assert {"dit (lean loss)", "minimal transformer", "mdlm dit"} <= names
    assert set(report["modes"]) == {"eager fp32", "eager bf16", "compiled fp32", "compiled bf16"}
