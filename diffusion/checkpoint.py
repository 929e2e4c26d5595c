"""Checkpoint I/O: atomic writes, safe reads (`weights_only=True`), clear errors.

Lightning writes through `AtomicCheckpointIO` (tmp file + fsync + os.replace), so a
run killed mid-write leaves the previous checkpoint intact. Evaluation modes
load weights with `load_weights`, which names the file and the mismatch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that never leaves a half-written file and never unpickles code."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return read_checkpoint(path, map_location=map_location or "cpu")


class FinalCheckpoint(L.Callback):
    """Writes `last.ckpt` at the run's final step when the periodic cadence misses it.

    It saves inside the step (like ModelCheckpoint), not after `fit` returns: by then the
    loader has prefetched a batch, and the saved data position would skip it on resume.
    """

    def __init__(self, path: str | Path, every_n_train_steps: int) -> None:
        self.path = Path(path)
        self.every = every_n_train_steps

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        final = trainer.max_steps > 0 and step >= trainer.max_steps
        if final and (self.every <= 0 or step % self.every != 0):
            trainer.save_checkpoint(self.path, weights_only=False)


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load with weights_only=True, turning failures into messages that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a torch file
        raise CheckpointError(
            f"cannot read checkpoint {path} (corrupt, truncated or not a checkpoint): {e}"
        ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not an unmask/Lightning checkpoint (no 'state_dict')")
    return ckpt


def load_weights(module: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's weights into `module`; explain a mismatch by the config keys."""
    ckpt = read_checkpoint(path)
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:  # missing/unexpected keys or shape mismatches
        saved = ckpt.get("unmask_config", {})
        hint = {k: saved.get(k) for k in ("model", "backbone", "parameterization") if k in saved}
        detail = " ".join(str(e).split())[:600]
        raise CheckpointError(
            f"checkpoint {path} does not fit the configured model ({detail}). "
            f"It was trained with {hint}; pass the same model/backbone/parameterization "
            "overrides (and time_conditioning) as in training."
        ) from e
    return ckpt
