"""The sbatch scripts parse, and a dry run prints the srun/main.py command they would launch."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts" / "slurm").glob("*.sbatch"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_sbatch_script_parses_and_dry_runs(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=SIGUSR1@" in text
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_JOB_ID": "123",
    }
    out = subprocess.run(
        ["bash", str(script), "experiment=mdlm_owt"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert out.startswith("srun ") and "main.py" in out
    assert "trainer.num_nodes=2" in out and "trainer.devices=4" in out
    assert "hydra.run.dir=" in out and "-123" in out and "experiment=mdlm_owt" in out


# ---- issue 11: under SLURM, SIGUSR1 still requeues (Lightning) and the run stops with a
# checkpoint at the current step; the requeued job takes over the lock and resumes the newest.
def test_sigusr1_under_slurm_requeues_saves_the_step_and_the_requeued_job_takes_the_lock(
    tmp_path, monkeypatch
):
    import signal

    import lightning as L
    import torch

    from diffusion.checkpoint import find_resume
    from diffusion.rundir import GracefulStop, RunInterrupted, RunLock
    from tests.test_bad_input import Tiny

    slurm = {
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "unmask-train",
        "SLURM_JOB_ID": "123",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_RESTART_COUNT": "0",
        "PATH": str(tmp_path),  # no scontrol: Lightning's requeue call fails and only warns
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    lock = RunLock(tmp_path)
    lock.acquire()  # the first incarnation of job 123 (it is preempted and never releases)
    last = tmp_path / "checkpoints" / "last.ckpt"
    trainer = L.Trainer(
        max_steps=50,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[GracefulStop(last)],
        default_root_dir=tmp_path,
    )
    with pytest.raises(RunInterrupted) as err:
        trainer.fit(Tiny(signal.SIGUSR1, at=3))
    assert err.value.code == 128 + signal.SIGUSR1
    assert list(tmp_path.glob("hpc_ckpt_*.ckpt"))  # Lightning's requeue handler ran
    assert torch.load(last, weights_only=True)["global_step"] == err.value.step
    checkpointing = {
        "resume_from_ckpt": True,
        "save_dir": str(last.parent),
        "resume_ckpt_path": str(last),
    }
    assert find_resume(checkpointing, tmp_path) == last  # newest step; last.ckpt wins a tie

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued job, maybe on another node
    monkeypatch.setattr("socket.gethostname", lambda: "another-node")
    with RunLock(tmp_path) as taken:
        assert taken.held
