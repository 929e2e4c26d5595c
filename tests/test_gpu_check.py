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


def test_benchmark_references_apply_the_dropout_they_are_given():
    """A reference that skips the DiT's dropout (model=small: 0.1) would be timed unfairly
    fast; each must be stochastic in training at p > 0 and deterministic at p = 0."""
    import torch

    from tests.tiny_lm import load_script

    bench = load_script("benchmark")
    x = torch.randint(0, 30, (2, 16))
    makers = {
        "minimal": lambda p: bench.MinimalTransformer(31, 32, 2, 4, 16, dropout=p),
        "minimal + rotary": lambda p: bench.MinimalTransformer(31, 32, 2, 4, 16, True, p),
        "mdlm dit": lambda p: bench.MDLMDiT(31, 32, 2, 4, 16, dropout=p),
    }
    for name, make in makers.items():
        for p in (0.0, 0.5):
            torch.manual_seed(0)
            model = make(p).train()
            for param in model.parameters():  # MDLM zero-inits its gates and head
                torch.nn.init.normal_(param, std=0.2)
            sigma = torch.zeros(2)
            a, b = model(x, sigma), model(x, sigma)
            assert torch.equal(a, b) == (p == 0.0), (name, p)


def test_benchmark_overrides_go_anywhere_and_misspelt_appends_are_refused():
    """Hydra overrides after the options (and after --dry-run's toy sizes, which they
    override) reach the config; a `+` key nothing reads stops the run by name."""
    from tests.tiny_lm import load_script

    bench = load_script("benchmark")
    args = bench.parse(["--dry-run", "model.hidden_size=64", "--sections", "loss"])
    assert args.overrides[-1] == "model.hidden_size=64" and args.sections == ["loss"]
    assert "model.length=32" in args.overrides  # the toy sizes still come first
    args = bench.parse(
        ["--sections", "loss", "--threads", "2", "model.length=1024", "--warmup", "1"]
    )
    assert args.overrides == ["model.length=1024"] and (args.threads, args.warmup) == (2, 1)
    # an override right after an nargs="+" option is not taken as one of its values
    args = bench.parse(["--samplers", "ddpm", "model.length=64", "--sample-steps", "8", "seed=3"])
    assert args.overrides == ["model.length=64", "seed=3"]
    assert (args.samplers, args.sample_steps) == (["ddpm"], [8])
    args = bench.parse(["--samplers", "block", "block:first_hitting=true", "seed=2"])
    assert args.samplers == ["block", "block:first_hitting=true"] and args.overrides == ["seed=2"]
    args = bench.parse(["--json", "out=1.json", "--sections", "loss", "seed=1"])
    assert str(args.json) == "out=1.json" and args.overrides == ["seed=1"]  # an option's value
    with pytest.raises(ValueError, match="training.lernrate"):
        bench.main(["--dry-run", "+training.lernrate=3", "--sections", "loss"])
