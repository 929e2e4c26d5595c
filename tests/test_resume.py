"""A run stopped after a checkpoint and resumed reaches the same weights as an uninterrupted one.

The stop comes right after the step-3 checkpoint (what a kill after that checkpoint leaves);
resuming must restore optimizer, scheduler, EMA, step, data position and RNG state.
"""

import torch

from tests.test_main_e2e import run_main


def weights(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["global_step"], ckpt["state_dict"]


def test_resume_matches_uninterrupted_run(tmp_path):
    common = [
        "checkpointing.every_n_train_steps=3",
        "trainer.val_check_interval=3",
        "eval.samples_after_train=0",
        "model.dropout=0.0",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_main(straight, "trainer.max_steps=6", *common)
    run_main(resumed, "trainer.max_steps=3", *common)
    step, _ = weights(resumed)
    assert step == 3
    run_main(resumed, "trainer.max_steps=6", *common)  # same run dir: resumes from last.ckpt

    step_a, sd_a = weights(straight)
    step_b, sd_b = weights(resumed)
    assert step_a == step_b == 6
    assert sd_a.keys() == sd_b.keys()
    for key in sd_a:
        torch.testing.assert_close(sd_a[key], sd_b[key], rtol=0, atol=0, msg=key)


def test_resume_without_checkpoint_starts_fresh_and_explicit_missing_path_fails(tmp_path):
    proc = run_main(
        tmp_path, f"checkpointing.resume_ckpt_path={tmp_path / 'missing.ckpt'}", check=False
    )
    assert proc.returncode != 0 and "resume_ckpt_path" in proc.stderr


def test_checkpoint_with_other_conditioning_is_refused_by_name():
    """adaLN weights exist either way, so only the saved config can tell: the key is named."""
    import pytest

    from diffusion.checkpoint import CheckpointError, check_conditioning

    old = {"unmask_config": {"time_conditioning": False}}  # before mask_conditioning existed
    check_conditioning(old, {"time_conditioning": False, "mask_conditioning": False}, "a.ckpt")
    with pytest.raises(CheckpointError, match="mask_conditioning=false"):
        check_conditioning(old, {"time_conditioning": False, "mask_conditioning": True}, "a.ckpt")
    saved = {"unmask_config": {"time_conditioning": True, "mask_conditioning": True}}
    with pytest.raises(CheckpointError, match="trained with time_conditioning=true"):
        check_conditioning(saved, {"time_conditioning": False, "mask_conditioning": True}, "b")
