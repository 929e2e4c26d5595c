"""Running main.py from tests, and the one tiny model the end-to-end tests share.

`run_main` starts main.py in a subprocess: for what only a process boundary shows (exit
codes, signals, resume after a kill, DDP, the command a user types). `main_in_process` runs
the same `main()` in this process (Hydra's compose API, the run directory set as Hydra sets
it): no interpreter start-up, and a failure is the exception itself.

`train_tiny_lm` trains a character-level MDLM on one repeated sentence, once per test run
(the session fixture `tiny_lm` in conftest.py): every line of the corpus is one document, so
rows read [BOS]the cat sat on the mat.[EOS][BOS]the cat ... and the model learns the sentence
and where it ends. Tests that need "a trained checkpoint" evaluate, sample, generate, convert
and judge with it instead of training their own.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}

SENTENCE = "the cat sat on the mat."
STEPS = 400


def load_script(name: str) -> Any:
    """scripts/<name>.py as a module, loaded once per test run (registered in sys.modules
    first, so that its dataclasses can look themselves up)."""
    import importlib.util

    key = f"unmask_scripts_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def run_main(run_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """main.py debug=tiny_cpu in a subprocess, as a user runs it; `check`: fail on exit != 0."""
    cmd = [sys.executable, "main.py", "debug=tiny_cpu", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def main_in_process(run_dir: Path, *overrides: str) -> None:
    """main.py's `main()` in this process with exactly `overrides` (add debug=tiny_cpu
    yourself): composed from configs/ as Hydra's main composes it, Hydra's run directory
    `run_dir`, then main's own validate -> build -> dispatch. Errors propagate as raised."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import main

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.runtime.cwd = str(ROOT)
            cfg.hydra.job.config_name = "config"
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        main.main(cfg)  # hydra.main passes a given config straight to the task function


def data_overrides(folder: Path) -> list[str]:
    """The data and model keys of the tiny model (an evaluation may repeat them)."""
    return [
        "data=local",
        "data.tokenizer=char",
        "data.source.load_kwargs.sample_by=line",
        f"data.source.data_files.train={folder / 'train.txt'}",
        f"data.source.data_files.validation={folder / 'validation.txt'}",
        f"data.source.data_files.test={folder / 'validation.txt'}",
        f"data.cache_dir={folder / 'cache'}",
        "model.hidden_size=64",
        "model.n_blocks=2",
    ]


@dataclass
class TinyLM:
    """The shared tiny model: its training run folder, checkpoint and training overrides."""

    folder: Path  # train.txt, validation.txt, cache/, run/
    overrides: list[str]  # debug=tiny_cpu and the data and model keys it was trained with
    _built: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def run_dir(self) -> Path:
        return self.folder / "run"

    @property
    def ckpt(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    def load(self) -> tuple[DictConfig, Any, Any]:
        """(saved config, data module with its tokenizer, module with the trained weights),
        rebuilt from the checkpoint by the builder (once; do not train the module)."""
        if not self._built:
            from diffusion.build import module_from_checkpoint

            cfg, dm, module = module_from_checkpoint(self.ckpt, "tiny_lm")
            self._built.update(cfg=cfg, dm=dm, module=module.eval())
        return self._built["cfg"], self._built["dm"], self._built["module"]

    @property
    def cfg(self) -> DictConfig:
        return self.load()[0]

    @property
    def module(self) -> Any:
        return self.load()[2]

    @property
    def tokenizer(self) -> Any:
        return self.load()[1].tokenizer

    def evaluate(self, run_dir: Path, mode: str, *overrides: str) -> None:
        """`mode` on this checkpoint through main() in process, the training overrides
        repeated (they equal the checkpoint's, so they are no contradiction)."""
        ckpt = f"eval.checkpoint_path={self.ckpt}"
        main_in_process(run_dir, *self.overrides, f"mode={mode}", ckpt, *overrides)


def train_tiny_lm(folder: Path) -> TinyLM:
    """Train the tiny model into `folder` through main() in process (STEPS steps, about half a
    minute on 2 cores), keeping main's outputs: checkpoints, ppl_eval.json, samples.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text(f"{SENTENCE}\n" * 400)
    (folder / "validation.txt").write_text(f"{SENTENCE}\n" * 20)
    # the embedded default's width and depth (debug=tiny_cpu's 32 x 1 is too weak to learn the
    # sentence in STEPS steps); evaluation repeats these overrides, batch size included, so a
    # checkpoint's ppl_eval draws the same masks as the training-end score
    model = ["model.hidden_size=128", "model.cond_dim=128", "model.n_blocks=2", "model.n_heads=4"]
    tiny = TinyLM(
        folder, ["debug=tiny_cpu", *model, "loader.global_batch_size=16", *data_overrides(folder)]
    )
    main_in_process(
        tiny.run_dir,
        *tiny.overrides,
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        f"checkpointing.every_n_train_steps={STEPS}",
        "optim.lr=3e-3",
        "eval.samples_after_train=2",
        "logger=none",
    )
    return tiny


def unigram_entropy(train_ids: list[int], scored_ids: list[int]) -> float:
    """Cross-entropy (nats/token) of `scored_ids` under the maximum-likelihood unigram of
    `train_ids`: what a model that ignores context scores at best."""
    counts, n = Counter(train_ids), len(train_ids)
    return -sum(math.log(counts[i] / n) for i in scored_ids) / len(scored_ids)
