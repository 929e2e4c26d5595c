"""The training log's module table: parameters as Lightning counts them, no FLOPs column or
"Total FLOPs: 0" line (Lightning counts FLOPs only through an example_input_array); the
progress bar of a step-limited run without Lightning's "Epoch 0/-2"."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary, RichProgressBar
from omegaconf import OmegaConf
from torch import nn

from diffusion import build

ROOT = Path(__file__).resolve().parents[1]


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(7, 5)  # 40 parameters
        self.head = nn.Linear(5, 3, bias=False).requires_grad_(False)  # 15, frozen


def summary_text(callback: ModelSummary, capsys) -> str:
    trainer = SimpleNamespace(strategy=object(), is_global_zero=True)
    callback.on_fit_start(trainer, Tiny())
    return capsys.readouterr().out


def test_the_summary_counts_parameters_and_prints_no_flops(capsys):
    text = summary_text(build.ParamSummary(), capsys)
    assert "backbone" in text and "Linear" in text and "40" in text
    assert "Trainable params: 40" in text and "Non-trainable params: 15" in text
    assert "Total: 55" in text
    assert "FLOPs" not in text
    # the negative twin: Lightning's own table prints the zero this one leaves out
    assert "Total FLOPs: 0" in " ".join(summary_text(RichModelSummary(), capsys).split())


def test_the_trainer_takes_it_unless_summaries_are_off(tmp_path):
    base = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "trainer" / "default.yaml"))
    base |= {"default_root_dir": str(tmp_path), "accumulate_grad_batches": 1}
    for enabled in (True, False):
        flags = {"enable_model_summary": enabled, "enable_progress_bar": enabled}
        cfg = OmegaConf.create(
            {
                "trainer": {**base, **flags},
                "strategy": {"name": "auto"},
                "checkpointing": {"save_dir": str(tmp_path), "every_n_train_steps": None},
                "logger": None,
            }
        )
        trainer = build.build_trainer(cfg)
        mine = [cb for cb in trainer.callbacks if isinstance(cb, build.ParamSummary)]
        others = [cb for cb in trainer.callbacks if isinstance(cb, ModelSummary)]
        assert len(mine) == int(enabled) and len(others) == len(mine)
        bars = [cb for cb in trainer.callbacks if isinstance(cb, build.StepProgressBar)]
        assert len(bars) == int(enabled) and trainer.progress_bar_callback is (bars or [None])[0]


def test_a_step_limited_run_reads_epoch_n_not_n_over_minus_two():
    trainer = SimpleNamespace(max_epochs=-1)
    ours, theirs = build.StepProgressBar(), RichProgressBar()
    for bar in (ours, theirs):
        bar._trainer = trainer
    assert ours._get_train_description(3).strip() == "Epoch 3"
    assert theirs._get_train_description(3).strip() == "Epoch 3/-2"  # Lightning's own
    trainer.max_epochs = 4
    assert ours._get_train_description(3).strip() == "Epoch 3/3"


def test_the_bar_shows_the_logged_metrics_without_v_num():
    logger = SimpleNamespace(version=0)
    trainer = SimpleNamespace(progress_bar_metrics={"train/loss": 7.5}, loggers=[logger])
    ours = build.StepProgressBar().get_metrics(trainer, None)
    theirs = RichProgressBar().get_metrics(trainer, None)
    assert ours == {"train/loss": 7.5} and theirs == {"train/loss": 7.5, "v_num": 0}
