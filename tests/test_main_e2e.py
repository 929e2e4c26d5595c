"""Each mode end to end through main.py (subprocesses, tiny CPU config), and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_hf_backbones import gpt2_dir, mlm_dir  # noqa: F401  (fixtures)

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
    assert proc.returncode != 0 and "cannot read" in proc.stderr and "bad.ckpt" in proc.stderr


def test_a_model_key_contradicting_the_checkpoint_is_a_clear_error(trained, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    proc = run_main(
        tmp_path,
        "mode=ppl_eval",
        f"eval.checkpoint_path={ckpt}",
        "model.hidden_size=64",
        check=False,
    )
    assert proc.returncode != 0
    assert "model.hidden_size=64 (the checkpoint has model.hidden_size=32)" in proc.stderr


def run_plain(run_dir: Path, *overrides: str, env: dict | None = None, check: bool = True):
    """main.py with only `overrides` (no debug preset): what a user types."""
    cmd = [sys.executable, "main.py", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


EVAL_KEYS = ["eval.max_batches=2", "loader.eval_batch_size=4"]  # evaluation keys, not the model's


def test_evaluation_rebuilds_the_model_from_the_checkpoint(tmp_path):
    """Trained with model.hidden_size=128: ppl_eval with no model override gives the NELBO of
    the run with the training overrides repeated; model=small contradicts it, by name."""
    train = ["debug=tiny_cpu", "model.hidden_size=128", "trainer.max_steps=2"]
    run_plain(tmp_path / "train", *train, "eval.samples_after_train=0", "logger=none")
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    evaluate = ["mode=ppl_eval", f"eval.checkpoint_path={ckpt}", *EVAL_KEYS]
    run_plain(tmp_path / "bare", *evaluate)
    run_plain(tmp_path / "repeated", *evaluate, *train[:2])
    bare, repeated = (
        json.loads((tmp_path / d / "ppl_eval.json").read_text()) for d in ("bare", "repeated")
    )
    assert bare["nelbo"] == repeated["nelbo"] and bare["tokens"] == repeated["tokens"] > 0
    proc = run_plain(tmp_path / "small", *evaluate, "model=small", check=False)
    assert proc.returncode != 0
    assert "model.hidden_size=768 (the checkpoint has model.hidden_size=128)" in proc.stderr
    # sampling needs only the tokenizer: no split is built (nothing cached for it)
    run_plain(
        tmp_path / "sample",
        "mode=sample_eval",
        f"eval.checkpoint_path={ckpt}",
        "sampler.num_samples=2",
        "sampler.steps=4",
        "eval.compute_generative_perplexity=false",
    )
    assert len((tmp_path / "sample" / "samples.jsonl").read_text().splitlines()) == 2


ONE_SHOT = '''
import torch
from samplers.base import Sampler


class OneShotSampler(Sampler):
    """Unmask everything at once: the argmax of log p(x0 | x_t) at t = 1 (one network call)."""

    name = "one_shot"
    requires = frozenset({"absorbing"})

    def _generate(self, model, x, generator, record):
        log_p = model.log_p_x0(x, torch.ones(x.shape[0], device=x.device))
        return torch.where(x == model.mask_id, log_p.argmax(-1), x)
'''


def test_a_new_sampler_is_one_class_and_one_yaml(trained, tmp_path):
    """A sampler class and its yaml in a folder of their own, on Hydra's search path: main.py
    validates it by its declared capabilities and samples with it; no file of ours changes."""
    plugin = tmp_path / "plugin"
    (plugin / "sampler").mkdir(parents=True)
    (plugin / "one_shot_sampler.py").write_text(ONE_SHOT)
    (plugin / "sampler" / "one_shot.yaml").write_text(
        "_target_: one_shot_sampler.OneShotSampler\nnum_samples: 3\nbatch_size: 2\n"
    )
    env = {**ENV, "PYTHONPATH": f"{plugin}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    ckpt = trained / "checkpoints" / "last.ckpt"
    run_plain(
        tmp_path / "run",
        "mode=sample_eval",
        f"eval.checkpoint_path={ckpt}",
        f"hydra.searchpath=[file://{plugin}]",
        "sampler=one_shot",
        "eval.compute_generative_perplexity=false",
        env=env,
    )
    report = json.loads((tmp_path / "run" / "sample_eval.json").read_text())
    assert report["sampler"] == "OneShotSampler" and report["num_samples"] == 3
    assert report["nfe"] == 1  # one call per batch
    rows = [
        json.loads(r)["tokens"]
        for r in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 3 and all(len(r) == 32 for r in rows)


@pytest.mark.parametrize(
    ("backbone", "folder"), [("hf_mlm", "mlm_dir"), ("hf_causal_bidirectional", "gpt2_dir")]
)
def test_hf_backbones_train_with_the_root_defaults(backbone, folder, request, tmp_path):
    """No conditioning or tokenizer key to set: the objective's mask_conditioning is off for a
    backbone that ignores sigma, and the data takes the pretrained model's tokenizer."""
    path = request.getfixturevalue(folder)
    run_main(tmp_path, f"backbone={backbone}", f"backbone.pretrained={path}", "model.length=16")
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((tmp_path / "ppl_eval.json").read_text())["tokens"] > 0


def test_unknown_config_key_is_a_clear_error(tmp_path):
    proc = run_main(tmp_path, "trainer.max_stepz=3", check=False)
    assert proc.returncode != 0 and "max_stepz" in proc.stderr
