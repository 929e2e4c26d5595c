"""The training log's module table: parameters as Lightning counts them, no FLOPs column or
"Total FLOPs: 0" line (Lightning counts FLOPs only through an example_input_array)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
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
        cfg = OmegaConf.create(
            {
                "trainer": {**base, "enable_model_summary": enabled},
                "strategy": {"name": "auto"},
                "checkpointing": {"save_dir": str(tmp_path), "every_n_train_steps": None},
                "logger": None,
            }
        )
        trainer = build.build_trainer(cfg)
        mine = [cb for cb in trainer.callbacks if isinstance(cb, build.ParamSummary)]
        others = [cb for cb in trainer.callbacks if isinstance(cb, ModelSummary)]
        assert len(mine) == int(enabled) and len(others) == len(mine)
