"""A run stopped after a checkpoint and resumed reaches the same weights as an uninterrupted one.

The stop comes right after the step-3 checkpoint (what a kill after that checkpoint leaves);
resuming must restore optimizer, scheduler, EMA, step, data position and RNG state.
"""

import shutil

import pytest
import torch

from tests.test_main_e2e import run_main


def weights(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["global_step"], ckpt["state_dict"]


@pytest.mark.slow  # heavy end to end (CI's second tier): keeps the default tier under 10 min
def test_resume_matches_uninterrupted_run(tmp_path):
    common = [
        "checkpointing.every_n_train_steps=3",
        "trainer.val_check_interval=3",
        "eval.samples_after_train=0",
        "model.dropout=0.0",
        # the stop at step 3 stands in for a kill, so the schedule must not depend on max_steps
        # (cosine follows it: a real kill resumes with the same max_steps, test_kill_resume.py)
        "lr_scheduler=constant_warmup",
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


# ---- issue 11: resume knows what it resumes; the run directory is the run --------------------
COMMON = [
    "checkpointing.every_n_train_steps=3",
    "trainer.val_check_interval=3",
    "eval.samples_after_train=0",
    "lr_scheduler=constant_warmup",  # the lr after a change is the new lr (cosine would decay it)
]


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    run = tmp_path_factory.mktemp("three_steps")
    run_main(run, "trainer.max_steps=3", *COMMON)
    return run


def last_ckpt(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def test_resume_with_changed_run_defining_keys_is_refused_by_name(three_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(three_steps, run)
    proc = run_main(
        run,
        "trainer.max_steps=6",
        *COMMON,
        "optim.lr=1e-3",
        "parameterization.mask_conditioning=false",
        "model.hidden_size=64",
        check=False,
    )
    assert proc.returncode != 0
    for line in (
        "optim.lr: 0.005 (checkpoint) -> 0.001 (now)",
        "parameterization.mask_conditioning: true (checkpoint) -> false (now)",
        "model.hidden_size: 32 (checkpoint) -> 64 (now)",
        "checkpointing.allow_changed=[",
    ):
        assert line in proc.stderr, line
    assert "size mismatch" not in proc.stderr and "trainer.max_steps:" not in proc.stderr
    assert last_ckpt(run)["global_step"] == 3  # nothing trained


def test_allowed_change_takes_effect_and_a_moved_run_directory_continues(three_steps, tmp_path):
    """optim.lr via checkpointing.allow_changed reaches the restored optimizer; in a copied
    directory last.ckpt (never last-v1.ckpt) keeps the newest step, and the next resume
    continues from it."""
    moved = tmp_path / "moved"
    shutil.copytree(three_steps, moved)
    run_main(
        moved,
        "trainer.max_steps=6",
        *COMMON,
        "optim.lr=1e-3",
        "checkpointing.allow_changed=[optim.lr]",
    )
    ckpt = last_ckpt(moved)
    assert ckpt["global_step"] == 6
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == pytest.approx(1e-3) and group["initial_lr"] == pytest.approx(1e-3)
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [pytest.approx(1e-3)]
    assert ckpt["unmask_config"]["optim"]["lr"] == pytest.approx(1e-3)
    assert ckpt["unmask_resumes"][-1]["changed"]["optim.lr"] == [0.005, 0.001]
    assert ckpt["unmask_fingerprint"] == last_ckpt(three_steps)["unmask_fingerprint"]
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]

    run_main(moved, "trainer.max_steps=7", *COMMON, "optim.lr=1e-3")  # matches the checkpoint now
    assert last_ckpt(moved)["global_step"] == 7
    assert not list((moved / "checkpoints").glob("last-v*.ckpt"))


SHORT_EPOCH = [  # 33 training rows of 128 tokens, batch 4: 8 steps per epoch
    "data.source.max_docs=2",
    "model.length=128",
    "trainer.val_check_interval=100",
    "trainer.limit_val_batches=1",
    "eval.samples_after_train=0",
    "eval.max_batches=1",
    "model.dropout=0.0",
    "lr_scheduler=constant_warmup",
]


def test_a_segment_without_a_periodic_save_resumes_mid_epoch_exactly(tmp_path):
    """Stopped at step 5 with the cadence at 10, last.ckpt must be the in-step one (epoch 0
    in progress, as the loader says), not Lightning's end-of-fit rewrite that marks the epoch
    done: resumed to 12 it equals the uninterrupted run to the bit."""
    from tests.tiny_lm import main_in_process

    common = ["debug=tiny_cpu", "checkpointing.every_n_train_steps=10", *SHORT_EPOCH]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main_in_process(straight, "trainer.max_steps=12", *common)
    main_in_process(resumed, "trainer.max_steps=5", *common)
    ckpt = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    progress = ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert ckpt["global_step"] == 5 and ckpt["epoch"] == 0 and progress["completed"] == 0
    main_in_process(resumed, "trainer.max_steps=12", *common)
    step_a, sd_a = weights(straight)
    step_b, sd_b = weights(resumed)
    assert step_a == step_b == 12
    for key in sd_a:
        torch.testing.assert_close(sd_a[key], sd_b[key], rtol=0, atol=0, msg=key)


def test_an_epoch_bound_run_checkpoints_its_last_step(tmp_path):
    """trainer.max_epochs ends the run (max_steps=-1): the final step is saved even when it is
    off the cadence (8 steps, every 3)."""
    from tests.tiny_lm import main_in_process

    main_in_process(
        tmp_path,
        "debug=tiny_cpu",
        "trainer.max_steps=-1",
        "+trainer.max_epochs=1",
        "checkpointing.every_n_train_steps=3",
        *SHORT_EPOCH,
    )
    step, _ = weights(tmp_path)
    assert step == 8
