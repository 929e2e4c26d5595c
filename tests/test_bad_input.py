"""Bad input gets a clear error naming the key or file, before any work (issue 11).

One test per probe: bad settings (validated with the config, so mode=train fails in its
first second), crafted checkpoints (a stored `_target_` that would write a file, a pickle
payload), a checkpoint evaluated with another tokenizer or at an unsupported length, a
resume into a model of another size, orphaned temporary files, a run directory in use, and
SIGTERM / SIGUSR1 during training (a checkpoint at the current step, exit 128 + signal).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from diffusion.checkpoint import (
    CheckpointError,
    check_fits,
    check_for_eval,
    check_resume,
    find_resume,
    read_checkpoint,
    safe_config,
)
from diffusion.config import (
    ConfigError,
    check_appended,
    known_keys,
    register_resolvers,
    validate_config,
)
from diffusion.rundir import (
    LOCK_NAME,
    GracefulStop,
    RunDirInUse,
    RunInterrupted,
    RunLock,
    remove_orphans,
)
from models.dit import DiT

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}


def compose_cfg(overrides: list[str]):
    """The config main.py's task function receives (unresolved, hydra node removed)."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["debug=tiny_cpu", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


# ---- settings: each probe fails in validate_config, naming its key ---------------------------
SETTINGS_PROBES = [
    (["loader.global_batch_size=0"], "loader.global_batch_size=0"),
    (["loader.global_batch_size=-4"], "loader.global_batch_size=-4"),
    (["trainer.max_steps=abc"], "trainer.max_steps='abc' must be an integer"),
    (["generate.max_new_tokens=abc"], "generate.max_new_tokens='abc' must be an integer"),
    (["sampler.num_samples=0"], "sampler.num_samples=0"),
    (["sampler.steps=0"], "sampler.steps=0"),
    (["sampler.temperature=-1"], "sampler.temperature=-1"),
    (["sampler.top_p=0"], "sampler.top_p=0"),
    (["sampler.top_p=1.5"], "sampler.top_p=1.5"),
    (["sampler.top_k=-1"], "sampler.top_k=-1"),
    (["sampler=confidence", "sampler.block_length=0"], "sampler.block_length=0"),
    (["sampler=semi_ar", "sampler.stride_length=0"], "sampler.stride_length=0"),
    (["sampler=block", "sampler.block_size=0"], "sampler.block_size=0"),
    (["trainer.devices=auto"], "trainer.devices='auto' must be an integer"),
    (["data.streaming=maybe"], "data.streaming='maybe' must be true or false"),  # bool("maybe")
    (["eval.disable_ema=no_thanks"], "eval.disable_ema='no_thanks' must be true or false"),
    (["data=text8_crop", "data.crop_train=1"], "data.crop_train=1 must be true or false"),
    # a part's keys against its constructor's hints: bool("no") is True, "abc" fails in torch
    (["sampler=ddpm", "sampler.noise_removal=no"], "sampler.noise_removal='no' must be true or"),
    (["sampler=remdm", "sampler.cache=off"], "sampler.cache='off' must be true or false"),
    (["backbone.causal=maybe"], "backbone.causal='maybe' must be true or false"),
    (["model.n_blocks=abc"], "model.n_blocks='abc' must be an integer"),
    (
        ["sampler=confidence", "sampler.threshold=abc"],
        "sampler.threshold='abc' must be a number or null",
    ),
    (["logger=wandb", "logger.offline=no"], "logger.offline='no' must be true or false"),
    (["training.ema=1.0"], "training.ema=1.0 must be >= 0.0 and < 1.0"),  # never moves
    (["noise.eps=1.0"], "noise.eps=1.0 must be >= 0.0 and < 1.0"),  # nothing masked
    (["optim.lr=-1"], "optim.lr=-1 must be >= 0.0"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9] must be two numbers in [0, 1)"),
    (["lr_scheduler.num_warmup_steps=-5"], "lr_scheduler.num_warmup_steps=-5 must be at least 0"),
    (["model.hidden_size=33"], "backbone.hidden_size=33 (model.hidden_size) must be divisible"),
    (["model.dropout=1.5"], "model.dropout=1.5 must be >= 0.0 and < 1.0"),
    (["sampler=semi_ar"], "stride_length=64 exceeds the window length=32"),  # was at sampling
]


@pytest.mark.parametrize(
    ("overrides", "message"), SETTINGS_PROBES, ids=[" ".join(o) for o, _ in SETTINGS_PROBES]
)
def test_bad_setting_is_refused_by_name(overrides, message):
    if (
        any(o == "sampler=block" for o in overrides)
        and not (ROOT / "configs/sampler/block.yaml").is_file()
    ):
        pytest.skip("no block sampler in this checkout")
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert message in str(err.value)


def test_valid_sampler_edges_pass():
    """The range ends that are valid: greedy (temperature 0), top_p 1, top_k 0 (off)."""
    validate_config(compose_cfg(["sampler.temperature=0", "sampler.top_p=1", "sampler.top_k=0"]))
    validate_config(compose_cfg(["data.streaming=True", "eval.disable_ema=false"]))
    validate_config(compose_cfg(["sampler=confidence", "sampler.stop_at_eos=true"]))  # eos at build
    validate_config(compose_cfg(["sampler=confidence", "sampler.cache=prefix", "training.ema=0"]))


def test_names_settings_take_a_bare_name_and_constructor_errors_name_their_group():
    from diffusion.build import build_trainer
    from diffusion.config import as_names

    assert as_names("ptb", "eval.datasets") == ["ptb"]  # not ['p', 't', 'b']
    assert as_names("optim.lr, T", "checkpointing.allow_changed") == ["optim.lr", "T"]
    assert as_names(compose_cfg(["eval.datasets=[ptb,lambada]"]).eval.datasets, "k") == [
        "ptb",
        "lambada",
    ]
    with pytest.raises(ConfigError, match=r"eval.datasets=3 must be a list of names"):
        as_names(3, "eval.datasets")
    cfg = compose_cfg(["trainer.precision=16-mixd"])
    with pytest.raises(ConfigError, match=r"^trainer: .*16-mixd"):
        build_trainer(cfg, for_eval=True)


def test_bad_setting_fails_train_before_any_work(tmp_path):
    """mode=train with sampler.steps=0 stops in validation: no checkpoint, no data built."""
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "main.py",
            "debug=tiny_cpu",
            f"hydra.run.dir={tmp_path}",
            "sampler.steps=0",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "sampler.steps=0" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
    assert "Traceback" not in proc.stderr.split("sampler.steps=0")[-1]
    print(f"failed after {time.perf_counter() - start:.1f}s (imports included)")


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "+training.lernrate=3",
            r"^\+training\.lernrate: no part of unmask reads .* training has ",
        ),
        ("++eval.sampel_seed=3", r"\(did you mean eval\.sample_seed\?\)"),
        (
            "+loader.bsz=4",
            r"loader has batch_size, eval_batch_size, global_batch_size, num_workers",
        ),
        ("+model.foo.bar=1", r"model\.foo is no section"),
        ("+checkpointing.every_n_steps=5", r"did you mean checkpointing\.every_n_train_steps"),
    ],
)
def test_appended_key_nothing_reads_is_refused_by_name(override, message):
    """`+section.key` in a section whose keys the yamls set is a misspelling, not a new setting."""
    with pytest.raises(ConfigError, match=message):
        check_appended(["debug=tiny_cpu", override])


def test_appended_keys_some_yaml_or_part_reads_pass():
    """A key some yaml sets (an experiment's, a model's), a free-form subtree, the data / trainer /
    part groups (their constructors reject unknown keys) and group appends are left alone."""
    keys = known_keys()
    assert {"training.ema", "eval.dataset_overrides", "model.length", "model.cond_dim"} <= keys
    check_appended(
        [
            "++training.ema=0.5",
            "+model.dropout=0.1",
            "+eval.dataset_overrides.ptb.source.path=json",
            "+data.insert_valid_eos=false",
            "+trainer.max_epochs=1",
            "++logger.offline=true",
            "+experiment=mdlm_owt",
            "eval.sampel_seed=3",  # without +: Hydra's own struct error names it
        ]
    )


def test_misspelt_appended_key_fails_the_run_before_any_work(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "main.py",
            "debug=tiny_cpu",
            f"hydra.run.dir={tmp_path}",
            "+training.sampling_epsilon=0.01",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "did you mean training.sampling_eps?" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


# ---- checkpoints never run code ----------------------------------------------------------------
def crafted_checkpoint(path: Path, **config) -> Path:
    base = {"parameterization": {"_target_": "diffusion.objectives.subs.SUBS"}, "model": {}}
    torch.save({"state_dict": {}, "unmask_config": {**base, **config}}, path)
    return path


CRAFTED = {
    "library function": {"backbone": {"_target_": "builtins.open", "file": "{out}", "mode": "w"}},
    "nested in a list": {"data": {"parts": [{"_target_": "pathlib.Path.write_text"}]}},
    "our module, not a class": {"noise": {"_target_": "diffusion.checkpoint.read_checkpoint"}},
    "attribute of our class": {"noise": {"_target_": "models.dit.DiT.forward"}},
    "not a string": {"noise": {"_target_": {"a": 1}}},
}


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_crafted_target_in_a_checkpoint_is_refused_and_runs_nothing(tmp_path, kind):
    out = tmp_path / "pwned"
    config = fill(CRAFTED[kind], out)
    ckpt = crafted_checkpoint(tmp_path / "judge.ckpt", **config)
    from diffusion.build import module_from_checkpoint

    with pytest.raises(
        CheckpointError, match=r"eval\.gen_ppl_eval_model_name_or_path=.*judge\.ckpt"
    ):
        module_from_checkpoint(ckpt, "eval.gen_ppl_eval_model_name_or_path")
    assert not out.exists()


def fill(node, out: Path):
    """CRAFTED with the output path filled in (plain substitution, no eval)."""
    if isinstance(node, dict):
        return {k: fill(v, out) for k, v in node.items()}
    if isinstance(node, list):
        return [fill(v, out) for v in node]
    return str(out) if node == "{out}" else node


def test_stored_config_allows_our_classes_and_configs_targets_and_keeps_text_literal(tmp_path):
    config = {
        "backbone": {"_target_": "models.dit.DiT", "hidden_size": 8},
        "optim": {"_target_": "torch.optim.AdamW", "_partial_": True},
        "generate": {"prompt": "${oc.env:HOME} stays text"},
    }
    cfg = safe_config({"unmask_config": {**config, "parameterization": {}}}, "x.ckpt")
    assert cfg.generate.prompt == "${oc.env:HOME} stays text"
    assert cfg.backbone._target_ == "models.dit.DiT"


def test_pickle_payload_is_refused_without_unsafe_advice(tmp_path):
    out = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {out}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload()}, path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "weights_only=True" in message
    assert "set to `False`" not in message and "weights_only=False" not in message
    assert not out.exists()


# ---- evaluation refuses mismatches -------------------------------------------------------------
class FakeData:
    """A data module that only has a fingerprint."""

    def __init__(self, tokenizer: str, data: str = "d0") -> None:
        self.fp = {"tokenizer": tokenizer, "data": data}

    def fingerprint(self) -> dict[str, str]:
        return self.fp


class Model(torch.nn.Module):
    def __init__(self, config: dict, backbone: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.config, self.backbone = config, backbone


def eval_ckpt(length: int = 32, max_length: int = 32) -> dict:
    config = {
        "model": {"length": length},
        "backbone": {"_target_": "models.dit.DiT", "max_length": max_length},
        "data": {"tokenizer": "char", "name": "shakespeare_char"},
    }
    fp = {"tokenizer": "aaaa1111", "data": "d0", "scheme": "dm"}
    return {"state_dict": {}, "unmask_config": config, "unmask_fingerprint": fp}


def test_other_tokenizer_of_the_same_size_is_refused_naming_both_fingerprints():
    model = Model({"model": {"length": 32}, "data": {"tokenizer": "bpe"}})
    with pytest.raises(CheckpointError) as err:
        check_for_eval(eval_ckpt(), model, FakeData("bbbb2222"), "m.ckpt")
    assert "aaaa1111" in str(err.value) and "bbbb2222" in str(err.value)
    assert "m.ckpt" in str(err.value)


def test_other_data_processing_is_refused_but_zero_shot_checks_only_the_tokenizer():
    model = Model({"model": {"length": 32}})
    with pytest.raises(CheckpointError, match="fingerprint.data: d0 .* vs d1"):
        check_for_eval(eval_ckpt(), model, FakeData("aaaa1111", "d1"), "m.ckpt")
    check_for_eval(eval_ckpt(), model, FakeData("aaaa1111", "d1"), "m.ckpt", data=False)


def test_eval_length_beyond_the_backbone_is_refused_and_a_supported_one_recorded(caplog):
    with pytest.raises(CheckpointError, match=r"model.length=512: .* trained at model.length=32"):
        check_for_eval(eval_ckpt(), Model({"model": {"length": 512}}), None, "m.ckpt")
    with caplog.at_level(logging.WARNING, logger="unmask"):
        record = check_for_eval(eval_ckpt(), Model({"model": {"length": 16}}), None, "m.ckpt")
    assert record == {"length": 16, "trained_length": 32}
    assert "model.length=16" in caplog.text


# ---- resume --------------------------------------------------------------------------------------
def test_resume_into_a_model_of_another_size_is_a_short_message(tmp_path):
    small = DiT(vocab_size=11, hidden_size=16, n_blocks=2, n_heads=2, cond_dim=8)
    big = DiT(vocab_size=11, hidden_size=32, n_blocks=2, n_heads=2, cond_dim=8)
    saved = {"state_dict": small.state_dict()}
    with pytest.raises(CheckpointError) as err:
        check_fits(big, saved, "last.ckpt", {"model.hidden_size": (16, 32)})
    message = str(err.value)
    assert "model.hidden_size" in message and "last.ckpt" in message
    assert message.count("\n") == 0 and len(message) < 900 and "more" in message


def test_changed_run_defining_keys_are_listed_with_both_values():
    saved = {"optim": {"lr": 3e-3}, "mask_conditioning": True, "trainer": {"max_steps": 3}}
    now = {"optim": {"lr": 1e-3}, "mask_conditioning": False, "trainer": {"max_steps": 6}}
    legacy = {"parameterization": {"mask_conditioning": True}, "trainer": {"max_steps": 3}}
    with pytest.raises(ConfigError, match="parameterization.mask_conditioning: true .* false"):
        check_resume(
            {"unmask_config": {"mask_conditioning": True}},  # the root key of older configs
            {"parameterization": {"mask_conditioning": False}},
            "old.ckpt",
        )
    check_resume({"unmask_config": legacy}, legacy, "same.ckpt")
    with pytest.raises(ConfigError) as err:
        check_resume({"unmask_config": saved}, now, "last.ckpt")
    message = str(err.value)
    assert "optim.lr: 0.003 (checkpoint) -> 0.001 (now)" in message
    assert "mask_conditioning: true (checkpoint) -> false (now)" in message
    assert "trainer.max_steps" not in message  # may change
    assert "checkpointing.allow_changed=[mask_conditioning,optim.lr]" in message
    applied = check_resume(
        {"unmask_config": saved}, now, "last.ckpt", ["optim.lr", "mask_conditioning"]
    )
    assert applied["optim.lr"] == (3e-3, 1e-3) and applied["trainer.max_steps"] == (3, 6)
    with pytest.raises(ConfigError, match=r"allow_changed names \['optim.lrr'\]"):
        check_resume({"unmask_config": saved}, now, "last.ckpt", ["optim.lrr"])
    with pytest.raises(ConfigError, match="optim._target_"):
        check_resume(
            {"unmask_config": {**saved, "optim": {"_target_": "torch.optim.AdamW"}}},
            {**now, "optim": {"_target_": "torch.optim.SGD"}},
            "last.ckpt",
            ["optim"],
        )


def test_resume_picks_the_newest_checkpoint_by_recorded_step_not_file_time(tmp_path):
    save_dir = tmp_path / "checkpoints"
    save_dir.mkdir()
    for name, step in (("last-v1.ckpt", 6), ("last.ckpt", 3)):  # last.ckpt written last
        torch.save({"state_dict": {}, "global_step": step}, save_dir / name)
        time.sleep(0.01)
    torch.save({"state_dict": {}, "global_step": 6}, tmp_path / "hpc_ckpt_1.ckpt")
    checkpointing = {
        "resume_from_ckpt": True,
        "save_dir": str(save_dir),
        "resume_ckpt_path": str(save_dir / "last.ckpt"),
    }
    assert find_resume(checkpointing, tmp_path) == save_dir / "last-v1.ckpt"
    torch.save({"state_dict": {}, "global_step": 6}, save_dir / "last.ckpt")  # a tie: last wins
    assert find_resume(checkpointing, tmp_path) == save_dir / "last.ckpt"
    explicit = {**checkpointing, "resume_ckpt_path": str(tmp_path / "missing.ckpt")}
    with pytest.raises(ConfigError, match="resume_ckpt_path=.*missing.ckpt"):
        find_resume(explicit, tmp_path)


# ---- the run directory ---------------------------------------------------------------------------
def test_orphaned_temporary_checkpoints_are_removed(tmp_path):
    orphan = tmp_path / ".last.ckpt.tmp4242"
    orphan.write_bytes(b"half a checkpoint")
    keep = tmp_path / "last.ckpt"
    keep.write_bytes(b"x")
    assert remove_orphans(tmp_path) == [orphan]
    assert not orphan.exists() and keep.exists()


def test_a_run_directory_in_use_is_refused_naming_the_owner_and_a_stale_lock_is_taken(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import json
        import socket

        lock = tmp_path / LOCK_NAME
        lock.write_text(
            json.dumps({"pid": owner.pid, "host": socket.gethostname(), "started": "t0"})
        )
        with pytest.raises(RunDirInUse, match=rf"in use by process {owner.pid} on"):
            RunLock(tmp_path).acquire()
    finally:
        owner.kill()
        owner.wait()
    with RunLock(tmp_path) as taken:  # the owner is gone: stale
        assert json.loads(lock.read_text())["pid"] == os.getpid() and taken.held
    assert not lock.exists()


# ---- signals: a checkpoint at the current step, a non-zero exit ---------------------------------
class Tiny(L.LightningModule):
    """Sends itself `signum` during training step `at`."""

    def __init__(self, signum: int, at: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.signum, self.at, self.sent = signum, at, False

    def training_step(self, batch, batch_idx):
        if self.global_step == self.at and not self.sent:  # once (mid-accumulation)
            self.sent = True
            os.kill(os.getpid(), self.signum)
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        x = torch.randn(64, 4)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_the_current_step_and_exits_non_zero(tmp_path, signum, caplog):
    last = tmp_path / "last.ckpt"
    trainer = L.Trainer(
        max_steps=50,
        accumulate_grad_batches=2,  # the stop waits for the optimizer step to complete
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[GracefulStop(last)],
        default_root_dir=tmp_path,
    )
    before = signal.getsignal(signum)
    with caplog.at_level(logging.WARNING, logger="unmask"), pytest.raises(RunInterrupted) as err:
        trainer.fit(Tiny(signum, at=3))
    assert err.value.code == 128 + signum and err.value.step == 4
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert f"at step 4: saved {last}" in caplog.text
    assert signal.getsignal(signum) == before  # Lightning's teardown restored the handler


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+sampler.noise_reomval=1", "sampler: .*unexpected keyword argument 'noise_reomval'"),
        ("+parameterization.fooo=1", "parameterization: .*unexpected keyword argument 'fooo'"),
    ],
)
def test_a_key_no_part_takes_is_a_config_error_naming_the_part(override, message):
    """An appended key the sampler or objective does not take came back as Hydra's
    InstantiationException around a TypeError; now a ConfigError naming the part."""
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_cfg([override]))
