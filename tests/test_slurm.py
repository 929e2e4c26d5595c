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
