"""A training run killed with SIGKILL mid-way and started again ends with the weights of an
uninterrupted run (slow tier: real processes, a real kill)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.test_main_e2e import ENV, ROOT, run_main

COMMON = [
    "model.hidden_size=128",
    "model.n_blocks=2",
    "trainer.max_steps=200",
    "checkpointing.every_n_train_steps=20",
    "trainer.val_check_interval=100",
    "eval.samples_after_train=0",
    "lr_scheduler.num_warmup_steps=10",
]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_main(straight, *COMMON)

    cmd = [sys.executable, "main.py", "debug=tiny_cpu", f"hydra.run.dir={killed}", *COMMON]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # let it get past the checkpoint, into later steps
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    step_at_kill = torch.load(last, weights_only=True)["global_step"]
    assert 0 < step_at_kill < 200

    run_main(killed, *COMMON)  # same run directory: resumes from last.ckpt
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 200
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0)


# ---- issue 11: SIGTERM saves the current step and exits non-zero; one run per directory ------
TINY = [
    "checkpointing.every_n_train_steps=50",
    "trainer.val_check_interval=100",
    "eval.samples_after_train=0",
    "lr_scheduler.num_warmup_steps=10",
]


def start(run_dir, log, *overrides):
    cmd = [sys.executable, "main.py", "debug=tiny_cpu", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=log)


def wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert path.exists(), f"{path} did not appear (process ended: {proc.poll()})"


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_143_and_resume_matches(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_main(straight, "trainer.max_steps=300", *TINY)
    log_path = tmp_path / "stopped.log"
    with open(log_path, "w") as log:
        proc = start(stopped, log, "trainer.max_steps=300", *TINY)
        wait_for(stopped / "checkpoints" / "last.ckpt", proc)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    text = log_path.read_text() + (stopped / "main.log").read_text()  # unmask logs: main.log
    step = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 50 <= step < 300
    assert f"stopped by SIGTERM at step {step}: saved" in text
    assert not (stopped / "ppl_eval.json").exists()  # the run did not finish
    assert not (stopped / ".unmask.lock").exists()

    run_main(stopped, "trainer.max_steps=300", *TINY)  # resumes at the saved step
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 300
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0)


@pytest.mark.slow
def test_second_run_in_a_directory_in_use_is_refused_naming_the_first(tmp_path):
    run = tmp_path / "run"
    with open(tmp_path / "first.log", "w") as log:
        first = start(run, log, "trainer.max_steps=100000", *TINY)
        try:
            wait_for(run / ".unmask.lock", first)
            second = run_main(run, "trainer.max_steps=100000", *TINY, check=False)
            assert second.returncode != 0
            assert f"in use by process {first.pid} on" in second.stderr
            assert first.poll() is None  # the first run goes on
        finally:
            first.send_signal(signal.SIGTERM)
            code = first.wait(timeout=300)
    assert code == 128 + signal.SIGTERM  # a run that did not finish never exits 0
