"""A tiny character-level MDLM trained through main.py on one repeated sentence.

Shared by tests/test_lm_eval.py and tests/test_generate.py: the first caller trains it into
pytest's session temp folder (about 150 steps, under a minute on 2 cores), later callers reuse
the checkpoint. Every line of the corpus is one document, so rows read
[BOS]the cat sat on the mat.[EOS][BOS]the cat ... and the model learns where a sentence ends.
"""

from __future__ import annotations

from pathlib import Path

from tests.test_main_e2e import run_main

SENTENCE = "the cat sat on the mat."
STEPS = 150


def data_overrides(folder: Path) -> list[str]:
    """The data and model keys of the tiny model (pass them again to evaluate or generate)."""
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


def repeat_lm(tmp_path_factory) -> tuple[Path, list[str]]:
    """(checkpoint of the tiny model, the overrides it was trained with); trained once per session."""
    folder = tmp_path_factory.getbasetemp() / "repeat_lm"
    ckpt = folder / "run" / "checkpoints" / "last.ckpt"
    overrides = data_overrides(folder)
    if ckpt.is_file():
        return ckpt, overrides
    folder.mkdir(exist_ok=True)
    (folder / "train.txt").write_text(f"{SENTENCE}\n" * 400)
    (folder / "validation.txt").write_text(f"{SENTENCE}\n" * 20)
    run_main(
        folder / "run",
        *overrides,
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        f"checkpointing.every_n_train_steps={STEPS}",
        "optim.lr=3e-3",
        "loader.global_batch_size=16",
        "eval.samples_after_train=0",
        "logger=none",
    )
    return ckpt, overrides
