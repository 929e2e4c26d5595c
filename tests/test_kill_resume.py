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
