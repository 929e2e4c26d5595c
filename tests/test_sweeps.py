"""Hydra multirun through the submitit launcher (the optional extra): the slurm preset
composes with the run's own device counts, and a local submitit sweep runs end to end."""

import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from tests.tiny_lm import ENV, ROOT

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def test_slurm_launcher_preset_takes_the_trainer_shape():
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", "trainer.devices=8", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (8, 8, 2)
    assert launcher.max_num_timeout > 0


@pytest.mark.slow  # heavy end to end (CI's second tier): keeps the default tier under 10 min
def test_local_submitit_sweep_runs_each_point(tmp_path):
    cmd = [
        sys.executable,
        "main.py",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={tmp_path}",
        "debug=tiny_cpu",
        "eval.samples_after_train=0",
        "trainer.max_steps=2",
        "seed=1,2",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = [json.loads((tmp_path / job / "ppl_eval.json").read_text()) for job in ("0", "1")]
    assert [s["steps"] for s in stats] == [2, 2] and stats[0]["tokens"] == stats[1]["tokens"] > 0
    assert stats[0]["nelbo"] != stats[1]["nelbo"]  # each point ran with its own seed
    assert (tmp_path / ".submitit").is_dir()  # the jobs went through submitit
