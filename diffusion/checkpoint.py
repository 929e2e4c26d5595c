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
from torch import Tensor, nn


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
    check_conditioning(ckpt, getattr(module, "config", None) or {}, path)
    return ckpt


CONDITIONING_KEYS = {"time_conditioning": False, "mask_conditioning": False}  # key: default


def check_conditioning(ckpt: dict[str, Any], config: dict[str, Any], path: str | Path) -> None:
    """The DiT's adaLN weights exist with or without conditioning, so a checkpoint loads into
    a differently conditioned model without a shape error and then scores wrongly: refuse it,
    naming the key. (Checkpoints older than a key count as its default.)"""
    saved = ckpt.get("unmask_config") or {}
    if not saved or not config:
        return
    for key, default in CONDITIONING_KEYS.items():
        was, now = bool(saved.get(key, default)), bool(config.get(key, default))
        if was != now:
            raise CheckpointError(
                f"checkpoint {path} was trained with {key}={str(was).lower()} but this run has "
                f"{key}={str(now).lower()}: pass {key}={str(was).lower()}"
            )


def init_weights(
    module: nn.Module, path: str | Path, vocab_size: int, key: str = "training.init_from_ckpt"
) -> list[str]:
    """Start `module` from a checkpoint's weights only (no optimizer, step or data position).

    The backbone starts from the checkpoint's EMA weights when it has them (the weights its
    evaluation and samples used), else its raw ones; the module's EMA starts from the same
    weights and restarts its warm-up, so it follows the fine-tuning run rather than lagging at
    the pretrained weights. Vocabulary-sized tensors may have gained rows (the chat tokens SFT
    adds): the old rows are copied and the new ones keep their fresh initialisation. Any other
    difference is an error naming `key`. Returns the names of the tensors that grew.
    """
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"{key}={path}: {e}") from e
    check_conditioning(ckpt, getattr(module, "config", None) or {}, f"{key}={path}")
    saved: dict[str, Tensor] = ckpt["state_dict"]
    own = module.state_dict()
    ema, counter = "ema.module.", "ema.n_averaged"

    def plain(name: str) -> str:
        """The backbone name of a tensor (the EMA copy holds the backbone's own names)."""
        return "backbone." + name[len(ema) :] if name.startswith(ema) else name

    def source(name: str) -> str:
        """The checkpoint tensor a module tensor starts from: the EMA copy when saved."""
        name = plain(name)
        averaged = ema + name.removeprefix("backbone.")
        return averaged if name.startswith("backbone.") and averaged in saved else name

    hint = {k: ckpt.get("unmask_config", {}).get(k) for k in ("model", "backbone")}
    own_names = {plain(n) for n in own if n != counter}
    saved_names = {plain(n) for n in saved if n != counter}
    missing, unexpected = sorted(own_names - saved_names), sorted(saved_names - own_names)
    if missing or unexpected:
        raise CheckpointError(
            f"{key}={path} does not fit the configured model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}. It was trained with {hint}; pass the same "
            "model/backbone overrides as in pretraining."
        )
    wanted = {name: source(name) for name in own if name != counter}
    grown = []
    with torch.no_grad():
        for name, src_name in wanted.items():
            target, src = own[name], saved[src_name]
            if src.shape == target.shape:
                target.copy_(src)
            elif (
                src.dim() == target.dim()
                and src.shape[1:] == target.shape[1:]
                and src.shape[0] < target.shape[0] == vocab_size
            ):
                target[: src.shape[0]].copy_(src)  # new vocabulary rows keep their fresh init
                grown.append(name)
            else:
                raise CheckpointError(
                    f"{key}={path}: {src_name} has shape {tuple(src.shape)} in the checkpoint "
                    f"but {name} is {tuple(target.shape)} in the model; only vocabulary rows "
                    f"(vocab {vocab_size}) may be added. It was trained with {hint}."
                )
        if counter in own:
            own[counter].zero_()  # the first EMA update copies the weights
    return grown
