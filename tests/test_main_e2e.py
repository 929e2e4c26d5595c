"""Each mode end to end through main.py (subprocesses, tiny CPU config), and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}


def run_main(run_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "main.py", "debug=tiny_cpu", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("train")
    run_main(run)
    return run


def test_train_writes_checkpoints_ppl_and_samples(trained):
    assert (trained / "checkpoints" / "last.ckpt").is_file()
    assert (trained / "checkpoints" / "best.ckpt").is_file()
    stats = json.loads((trained / "ppl_eval.json").read_text())
    assert stats["split"] == "validation" and stats["bound"] is True
    assert stats["ppl"] > 1 and stats["unigram_ppl"] > 1 and stats["tokens"] > 0
    assert stats["steps"] == 4
    samples = (trained / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 and "text" in json.loads(samples[0])


def test_ppl_eval_from_checkpoint(trained, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    run_main(tmp_path, "mode=ppl_eval", f"eval.checkpoint_path={ckpt}", "eval.mc_samples=2")
    stats = json.loads((tmp_path / "ppl_eval.json").read_text())
    assert stats["mc_samples"] == 2 and stats["ppl"] > 1
    assert abs(stats["nelbo"] - torch.log(torch.tensor(stats["ppl"])).item()) < 1e-4


def test_sample_eval_with_a_local_judge(trained, tmp_path, tiny_judge):
    ckpt = trained / "checkpoints" / "last.ckpt"
    run_main(
        tmp_path,
        "mode=sample_eval",
        f"eval.checkpoint_path={ckpt}",
        "sampler=ddpm",
        "sampler.steps=16",
        "sampler.num_samples=3",
        "sampler.batch_size=2",
        "eval.compute_generative_perplexity=true",
        f"eval.gen_ppl_eval_model_name_or_path={tiny_judge}",
    )
    report = json.loads((tmp_path / "sample_eval.json").read_text())
    assert report["num_samples"] == 3 and report["sampler"] == "DDPMSampler"
    assert report["gen_ppl"] > 1 and report["entropy"] > 0 and 1 <= report["nfe"] <= 16
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 3


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = run_main(
        tmp_path, "mode=ppl_eval", f"eval.checkpoint_path={tmp_path / 'nope.ckpt'}", check=False
    )
    assert proc.returncode != 0 and "checkpoint not found" in proc.stderr


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    proc = run_main(tmp_path, "mode=sample_eval", f"eval.checkpoint_path={bad}", check=False)
    assert proc.returncode != 0 and "cannot read checkpoint" in proc.stderr


def test_checkpoint_of_another_model_is_a_clear_error(trained, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    proc = run_main(
        tmp_path,
        "mode=ppl_eval",
        f"eval.checkpoint_path={ckpt}",
        "model.hidden_size=64",
        check=False,
    )
    assert proc.returncode != 0 and "does not fit the configured model" in proc.stderr


def test_unknown_config_key_is_a_clear_error(tmp_path):
    proc = run_main(tmp_path, "trainer.max_stepz=3", check=False)
    assert proc.returncode != 0 and "max_stepz" in proc.stderr
