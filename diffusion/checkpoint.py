"""Checkpoint I/O and what a checkpoint is allowed to decide.

- Writes are atomic (`AtomicCheckpointIO`: tmp file + fsync + os.replace), so a run killed
  mid-write leaves the previous checkpoint intact; reads are `weights_only=True` and our
  errors never advise turning that off.
- Every checkpoint records the config it was trained with (`unmask_config`) and the
  fingerprint of its tokenizer and data (`unmask_fingerprint`, written by `RunRecord`).
- Resume (`find_resume`, `check_resume`): the newest checkpoint by recorded step; keys that
  define the run must match the checkpoint or the run stops naming each changed key; a
  deliberate change goes through `checkpointing.allow_changed=[key,...]` and then really
  applies (`RunRecord` writes it into the restored optimizer).
- Evaluation (`check_for_eval`, used by `load_weights`): the tokenizer and data fingerprints
  must match, and `model.length` may differ only where the backbone supports it.
- A stored config is rebuilt only through `safe_config`: every `_target_` in it must be one
  of configs/**.yaml's targets or a class of our own packages, so a checkpoint never runs code.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import logging
import os
import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from diffusion.config import ConfigError

log = logging.getLogger("unmask")
ROOT = Path(__file__).resolve().parents[1]


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


def is_final_step(trainer: L.Trainer) -> bool:
    """The run ends after this batch: `max_steps` reached, the last batch of the last epoch
    (`max_epochs`), or a stop requested (`max_time`, a signal)."""
    if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    epochs = trainer.max_epochs
    if epochs is not None and epochs > 0 and trainer.current_epoch + 1 >= epochs:
        if trainer.is_last_batch:
            return True
    return bool(trainer.should_stop)


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt`: every `every_n_train_steps` steps and at the run's final step, always inside
    the step, never after `fit` returns.

    Lightning's own end-of-fit save (`on_train_end`, taken when no `last.ckpt` was written in
    this process) would overwrite the in-step one with a loop state that says the epoch is over
    while the loader is mid-epoch: the next resume would skip the rest of the epoch. It runs
    only when no save at the final step happened (a stop this callback did not see in time).
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int) -> None:
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,  # last.ckpt, never last-v1.ckpt after a copy/move
        )
        self.path = Path(dirpath) / "last.ckpt"
        self.every = every_n_train_steps
        self.saved_step: int | None = None  # the step of this process's latest last.ckpt

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_batch_end(trainer, *args)
        step = trainer.global_step
        if self.every > 0 and step % self.every == 0 and step > 0:
            self.saved_step = step  # the periodic save above
        if is_final_step(trainer) and self.saved_step != step:
            trainer.save_checkpoint(self.path, weights_only=False)
            self.saved_step = step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.saved_step != trainer.global_step:
            super().on_train_end(trainer, pl_module)


def read_checkpoint(
    path: str | Path, map_location: Any = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """torch.load with weights_only=True, turning failures into messages that name the file.

    `mmap`: map the tensors instead of reading them (cheap peeks at step and config)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # a pickled object that is not plain data
        found = re.search(r"unsupported GLOBAL \S+|Unsupported global: \S+ \S+", str(e))
        raise CheckpointError(
            f"cannot read checkpoint {path}: it holds Python objects, not only tensors and "
            f"plain data ({found.group(0) if found else 'refused by the weights-only loader'}). "
            "unmask loads checkpoints with weights_only=True and never unpickles code; "
            "do not disable that. If the file is yours, re-save it from a trusted Python "
            "session as a dict of tensors and plain types; else do not use it."
        ) from None
    except Exception as e:  # truncated, corrupt, or not a torch file
        raise CheckpointError(
            f"cannot read checkpoint {path} (corrupt, truncated or not a checkpoint): {e}"
        ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not an unmask/Lightning checkpoint (no 'state_dict')")
    return ckpt


def describe_misfit(
    own: Mapping[str, Tensor], saved: Mapping[str, Tensor], limit: int = 3
) -> str | None:
    """A short account of how a state dict differs from a module's (None when it fits):
    counts and a few examples of missing, unexpected and differently shaped tensors."""
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [
        f"{k} {tuple(saved[k].shape)} in the checkpoint vs {tuple(own[k].shape)} in the model"
        for k in own
        if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{len(items)} {what}: {'; '.join(items[:limit])}{more}")
    return ", ".join(parts) or None


def _model_hint(saved: Mapping[str, Any]) -> dict[str, Any]:
    return {k: saved.get(k) for k in ("model", "backbone", "parameterization") if k in saved}


def load_weights(
    module: nn.Module, path: str | Path, dm: Any = None, *, data: bool = True
) -> dict[str, Any]:
    """Load a checkpoint's weights into `module` for evaluation, after `check_for_eval`.

    `dm`: the data module the evaluation uses; its tokenizer (and, with `data`, its data
    processing) must be the checkpoint's own. Returns the checkpoint, with `eval_record`
    added: facts an evaluation writes into its JSON (the evaluated and trained lengths)."""
    ckpt = read_checkpoint(path)
    saved = ckpt.get("unmask_config") or {}
    misfit = describe_misfit(module.state_dict(), ckpt["state_dict"])
    if misfit:
        raise CheckpointError(
            f"checkpoint {path} does not fit the configured model ({misfit}). "
            f"It was trained with {_model_hint(saved)}; pass the same "
            "model/backbone/parameterization overrides (and time_conditioning) as in training."
        )
    record = check_for_eval(ckpt, module, dm, path, data=data)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    ckpt["eval_record"] = record
    return ckpt


CONDITIONING_KEYS = {"time_conditioning": False, "mask_conditioning": False}  # key: default


def conditioning_flag(config: dict[str, Any], key: str, default: bool) -> bool:
    """The objective's own setting (`parameterization.<key>`), else the root key that older
    configs kept it in, else `default`."""
    node = config.get("parameterization") or {}
    return bool(node[key]) if key in node else bool(config.get(key, default))


def check_conditioning(ckpt: dict[str, Any], config: dict[str, Any], path: str | Path) -> None:
    """The DiT's adaLN weights exist with or without conditioning, so a checkpoint loads into
    a differently conditioned model without a shape error and then scores wrongly: refuse it,
    naming the key. (Checkpoints older than a key count as its default.)"""
    saved = ckpt.get("unmask_config") or {}
    if not saved or not config:
        return
    for key, default in CONDITIONING_KEYS.items():
        was, now = conditioning_flag(saved, key, default), conditioning_flag(config, key, default)
        if was != now:
            name = (
                f"parameterization.{key}" if key in (config.get("parameterization") or {}) else key
            )
            raise CheckpointError(
                f"checkpoint {path} was trained with {key}={str(was).lower()} but this run has "
                f"{name}={str(now).lower()}: pass {name}={str(was).lower()}"
            )


EMA_PREFIX, EMA_COUNTER = "ema.module.", "ema.n_averaged"  # our module's EMA copy


def _backbone_name(name: str) -> str:
    """The backbone name of a tensor (the EMA copy holds the backbone's own names)."""
    return "backbone." + name[len(EMA_PREFIX) :] if name.startswith(EMA_PREFIX) else name


def _start_from(name: str, saved: dict[str, Tensor]) -> str:
    """The checkpoint tensor a module tensor starts from: the EMA copy when saved."""
    name = _backbone_name(name)
    averaged = EMA_PREFIX + name.removeprefix("backbone.")
    return averaged if name.startswith("backbone.") and averaged in saved else name


def _check_same_names(
    own: dict[str, Tensor], saved: dict[str, Tensor], where: str, hint: dict[str, Any]
) -> None:
    """The module and the checkpoint hold the same tensors (EMA copies counted as backbone)."""
    own_names = {_backbone_name(n) for n in own if n != EMA_COUNTER}
    saved_names = {_backbone_name(n) for n in saved if n != EMA_COUNTER}
    missing, unexpected = sorted(own_names - saved_names), sorted(saved_names - own_names)
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not fit the configured model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}. It was trained with {hint}; pass the same "
            "model/backbone overrides as in pretraining."
        )


@torch.no_grad()
def _copy_weights(
    own: dict[str, Tensor],
    saved: dict[str, Tensor],
    vocab_size: int,
    where: str,
    hint: dict[str, Any],
) -> list[str]:
    """Copy each saved tensor into its module tensor in place; a tensor whose first dimension
    grew to `vocab_size` gets the old rows only. Returns the names of those that grew."""
    grown = []
    for name in own:
        if name == EMA_COUNTER:
            continue
        target, src_name = own[name], _start_from(name, saved)
        src = saved[src_name]
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
                f"{where}: {src_name} has shape {tuple(src.shape)} in the checkpoint "
                f"but {name} is {tuple(target.shape)} in the model; only vocabulary rows "
                f"(vocab {vocab_size}) may be added. It was trained with {hint}."
            )
    if EMA_COUNTER in own:
        own[EMA_COUNTER].zero_()  # the first EMA update copies the weights
    return grown


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
    where = f"{key}={path}"
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from e
    check_conditioning(ckpt, getattr(module, "config", None) or {}, where)
    saved: dict[str, Tensor] = ckpt["state_dict"]
    own = module.state_dict()
    hint = {k: ckpt.get("unmask_config", {}).get(k) for k in ("model", "backbone")}
    _check_same_names(own, saved, where, hint)
    return _copy_weights(own, saved, vocab_size, where, hint)


# ---- what a checkpoint was trained on: tokenizer and data fingerprints ---------------------
FINGERPRINT_KEY = "unmask_fingerprint"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fallback_fingerprint(dm: Any) -> dict[str, str]:
    """The fingerprint from what a data module exposes, for modules without `fingerprint()`:
    the tokenizer's full serialisation (vocabulary, merges, normaliser, special tokens, chat
    template) and the source and layout of every configured split."""
    tok = dm.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    body: Any = backend.to_str() if backend is not None else sorted(tok.get_vocab().items())
    tokenizer = [body, getattr(tok, "special_tokens_map", {}), getattr(tok, "chat_template", None)]
    tokenizer.append([len(tok), getattr(dm, "mask_id", None)])
    data: dict[str, Any] = {"name": getattr(dm, "name", None), "wrap": getattr(dm, "wrap", None)}
    source = getattr(dm, "_fingerprint", None)
    for split in ("train", "validation", "test"):
        try:
            data[split] = source(split) if callable(source) else None
        except (KeyError, ValueError, FileNotFoundError):  # a split this data does not have
            continue
    return {"tokenizer": _digest(tokenizer), "data": _digest(data), "scheme": "fallback-1"}


def data_fingerprint(dm: Any) -> dict[str, str]:
    """{"tokenizer", "data", "scheme"} of a set-up data module: `dm.fingerprint()` where the
    module has one (the data package's own), else `_fallback_fingerprint`. Fingerprints of
    different schemes are not compared."""
    own = getattr(dm, "fingerprint", None)
    if callable(own):
        fp = own()
        return {"tokenizer": str(fp["tokenizer"]), "data": str(fp["data"]), "scheme": "dm"}
    return _fallback_fingerprint(dm)


def fingerprint_changes(
    ckpt: Mapping[str, Any], dm: Any, parts: Sequence[str] = ("tokenizer", "data")
) -> dict[str, tuple[Any, Any]]:
    """{"fingerprint.<part>": (checkpoint's, now)} for each part that differs; nothing when
    the checkpoint records no fingerprint (older checkpoints) or one of another scheme."""
    saved = ckpt.get(FINGERPRINT_KEY)
    if not isinstance(saved, Mapping):
        log.warning("the checkpoint records no tokenizer/data fingerprint: they are not checked")
        return {}
    now = data_fingerprint(dm)
    if saved.get("scheme") != now["scheme"]:
        log.warning(
            "the checkpoint's fingerprint scheme %s is not this run's %s: tokenizer and data "
            "are not checked",
            saved.get("scheme"),
            now["scheme"],
        )
        return {}
    return {f"fingerprint.{p}": (saved.get(p), now[p]) for p in parts if saved.get(p) != now[p]}


# ---- evaluation: the checkpoint's own tokenizer, data processing and a supported length -----
def check_for_eval(
    ckpt: Mapping[str, Any], module: nn.Module, dm: Any, path: str | Path, *, data: bool = True
) -> dict[str, Any]:
    """The one check before a checkpoint is evaluated (ppl_eval, sample_eval, generate, the
    judges and the lm-eval model): conditioning flags, the tokenizer fingerprint (and with
    `data` the data-processing fingerprint; zero-shot corpora differ by design) and the
    length. Returns {"length", "trained_length"} for the output JSON."""
    config = getattr(module, "config", None) or {}
    check_conditioning(dict(ckpt), config, path)
    if dm is not None:
        changed = fingerprint_changes(ckpt, dm, ("tokenizer", "data") if data else ("tokenizer",))
        if changed:
            saved_data = (ckpt.get("unmask_config") or {}).get("data", {})
            now_data = config.get("data", {})
            lines = [
                f"{k}: {a} (checkpoint) vs {b} (this evaluation)" for k, (a, b) in changed.items()
            ]
            raise CheckpointError(
                f"checkpoint {path} is evaluated with a tokenizer or data processing other than "
                f"its own ({'; '.join(lines)}). It was trained with data.tokenizer="
                f"{saved_data.get('tokenizer')} on data {saved_data.get('name')} (this "
                f"evaluation: data.tokenizer={now_data.get('tokenizer')}, data "
                f"{now_data.get('name')}); evaluate with the checkpoint's data settings, or "
                "score another corpus with eval.datasets=[...] (the model's own tokenizer)"
            )
    return check_length(ckpt, config, getattr(module, "backbone", None), path)


def length_limit(saved: Mapping[str, Any], backbone: nn.Module | None) -> int | None:
    """The longest sequence a trained backbone supports, or None when it does not say: the
    DiT has no learned positions (rotary), so up to the `max_length` it was built with; an HF
    model up to its `max_position_embeddings`."""
    built = (saved.get("backbone") or {}).get("max_length")
    if built is not None:
        return int(built)
    hf_config = getattr(getattr(backbone, "model", None), "config", None)
    limit = getattr(hf_config, "max_position_embeddings", None)
    return int(limit) if limit else None


def check_length(
    ckpt: Mapping[str, Any], config: Mapping[str, Any], backbone: nn.Module | None, path: Any
) -> dict[str, Any]:
    """`model.length` of this evaluation against the trained one: equal, or different only
    where the backbone supports it (logged). Returns {"length", "trained_length"}."""
    saved = ckpt.get("unmask_config") or {}
    trained = (saved.get("model") or {}).get("length")
    now = (config.get("model") or {}).get("length")
    record = {"length": now, "trained_length": trained}
    if trained is None or now is None or int(trained) == int(now):
        return record
    limit = length_limit(saved, backbone)
    name = str((saved.get("backbone") or {}).get("_target_", "?")).rsplit(".", 1)[-1]
    if limit is None or int(now) > limit:
        supports = (
            f"supports at most {limit} positions" if limit else "does not declare a length limit"
        )
        raise CheckpointError(
            f"model.length={now}: checkpoint {path} was trained at model.length={trained} and "
            f"its backbone ({name}) {supports}; use model.length<={limit or trained}"
        )
    log.warning(
        "evaluating at model.length=%s; checkpoint %s was trained at %s (%s supports up to %s)",
        now,
        path,
        trained,
        name,
        limit,
    )
    return record


# ---- resume: the newest state, the same run -----------------------------------------------
# Keys that may change on resume (prefixes); every other key defines the run and must match
# the checkpoint unless named in checkpointing.allow_changed.
RESUMABLE_KEYS = (
    "mode",
    "trainer.max_steps",
    # ${trainer.max_steps} in the cosine schedule: extending a run re-stretches the remaining decay
    "lr_scheduler.num_training_steps",
    "trainer.max_epochs",
    "trainer.max_time",
    "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch",
    "trainer.limit_val_batches",
    "trainer.num_sanity_val_steps",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.default_root_dir",
    "trainer.profiler",
    "logger",
    "loader.num_workers",
    "loader.eval_batch_size",
    "eval",
    "generate",
    "sampler",
    "checkpointing",
    "training.init_from_ckpt",
    "data.cache_dir",
    "data.num_proc",
)
# keys no switch can change on resume: the optimizer state in the checkpoint belongs to them
FIXED_ON_RESUME = ("optim._target_", "optim._partial_")
ABSENT = "<absent>"


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of nested mappings (lists are leaves)."""
    if not isinstance(node, Mapping) or (prefix and not node):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def matches(key: str, prefixes: Iterable[str]) -> bool:
    """`key` is one of `prefixes` or lies under one (`optim` covers `optim.lr`)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (checkpoint's value, this run's)} for every leaf that differs; a key missing on
    one side has the value ABSENT. The conditioning flags are compared by their effective
    values (`conditioning_flag`: older configs kept them at the root, with defaults)."""
    a, b = flatten(saved), flatten(now)
    changes = {
        k: (a.get(k, ABSENT), b.get(k, ABSENT))
        for k in sorted(a.keys() | b.keys())
        if a.get(k, ABSENT) != b.get(k, ABSENT)
    }
    for key, default in CONDITIONING_KEYS.items():
        was, is_now = (
            conditioning_flag(dict(saved), key, default),
            conditioning_flag(dict(now), key, default),
        )
        if was != is_now:
            name = f"parameterization.{key}" if key in (now.get("parameterization") or {}) else key
            changes[name] = (was, is_now)
    return changes


def _show(value: Any) -> str:
    return json.dumps(value, default=str) if value is not ABSENT else ABSENT


def check_resume(
    ckpt: Mapping[str, Any],
    config: Mapping[str, Any],
    path: str | Path,
    allow_changed: Sequence[str] = (),
    dm: Any = None,
) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume `path` under a config that changes what defines the run.

    Raises ConfigError listing each changed run-defining key with both values (and the
    tokenizer/data fingerprints when `dm` is given). Keys in RESUMABLE_KEYS, keys this config
    adds or drops, and keys named in `allow_changed` apply; they are logged and returned as
    {key: (old, new)}."""
    saved = ckpt.get("unmask_config")
    if not isinstance(saved, Mapping) or not saved:
        log.warning("%s records no config: resuming without checking what changed", path)
        return {}
    known = flatten(config).keys() | flatten(saved).keys()
    unknown = [a for a in allow_changed if not matches_any(a, known)]
    if unknown:
        raise ConfigError(
            f"checkpointing.allow_changed names {unknown}, which are not config keys "
            "(write them as dotted keys, e.g. checkpointing.allow_changed=[optim.lr])"
        )
    changes = config_changes(saved, config)
    if dm is not None:
        changes.update(fingerprint_changes(ckpt, dm))
    defining = {
        k: v for k, v in changes.items() if not matches(k, RESUMABLE_KEYS) and ABSENT not in v
    }
    fixed = {k: v for k, v in defining.items() if matches(k, FIXED_ON_RESUME)}
    if fixed:
        raise ConfigError(
            f"cannot resume from {path} with "
            + ", ".join(
                f"{k}: {_show(a)} (checkpoint) -> {_show(b)} (now)" for k, (a, b) in fixed.items()
            )
            + ": the optimizer state in the checkpoint belongs to the old optimizer. Start a "
            "new run from its weights with training.init_from_ckpt=" + str(path)
        )
    refused = {k: v for k, v in defining.items() if not matches(k, allow_changed)}
    if refused:
        lines = "\n".join(
            f"  {k}: {_show(a)} (checkpoint) -> {_show(b)} (now)" for k, (a, b) in refused.items()
        )
        raise ConfigError(
            f"cannot resume from {path}: these keys define the run and differ from the "
            f"checkpoint's:\n{lines}\nResume with the checkpoint's values, start a new run "
            "directory (hydra.run.dir=...), or change them on purpose with "
            f"checkpointing.allow_changed=[{','.join(refused)}]"
        )
    applied = {k: v for k, v in changes.items() if k not in refused}
    for key, (old, new) in applied.items():
        how = "allowed by checkpointing.allow_changed" if key in defining else "may change"
        log.info("resume: %s %s -> %s (%s)", key, _show(old), _show(new), how)
    return applied


def matches_any(prefix: str, keys: Iterable[str]) -> bool:
    """Some key in `keys` is `prefix` or lies under it (fingerprint.* counts as a key)."""
    return prefix in ("fingerprint", "fingerprint.tokenizer", "fingerprint.data") or any(
        matches(k, [prefix]) for k in keys
    )


def find_resume(checkpointing: Mapping[str, Any], run_dir: str | Path) -> Path | None:
    """The checkpoint a training run resumes from, or None to start fresh.

    An explicit `checkpointing.resume_ckpt_path` is used as given (missing: ConfigError).
    Otherwise the newest state in the run directory by its recorded `global_step` (not file
    time): last.ckpt, a versioned last-v*.ckpt an older Lightning left after a copy, or a
    SLURM requeue checkpoint hpc_ckpt_*.ckpt; at equal steps last.ckpt, then last-v*.ckpt,
    win (written at a step boundary; the requeue one is written inside the signal handler)."""
    if not checkpointing.get("resume_from_ckpt"):
        return None
    save_dir = Path(checkpointing["save_dir"])
    path = Path(checkpointing["resume_ckpt_path"])
    if path != save_dir / "last.ckpt":
        if not path.is_file():
            raise ConfigError(f"checkpointing.resume_ckpt_path={path} does not exist")
        return path
    candidates = sorted({*save_dir.glob("last*.ckpt"), *Path(run_dir).glob("hpc_ckpt_*.ckpt")})
    if not candidates:
        return None
    steps = {p: int(read_checkpoint(p, mmap=True).get("global_step", -1)) for p in candidates}

    def rank(p: Path) -> tuple:
        return steps[p], p.name == "last.ckpt", p.name.startswith("last"), p.stat().st_mtime

    newest = max(candidates, key=rank)
    others = ", ".join(f"{p.name} step {steps[p]}" for p in candidates if p != newest)
    log.info(
        "resuming from %s (step %d%s)", newest, steps[newest], f"; also {others}" if others else ""
    )
    return newest


def check_fits(module: nn.Module, ckpt: Mapping[str, Any], path: str | Path, changes: Any) -> None:
    """Before Lightning loads a resume checkpoint: refuse one whose tensors do not fit the
    model with a short message (not one line per tensor), naming the changed model keys."""
    misfit = describe_misfit(module.state_dict(), ckpt["state_dict"])
    if misfit:
        keys = [k for k in changes if matches(k, ("model", "backbone", "parameterization"))]
        raise CheckpointError(
            f"cannot resume from {path}: its weights do not fit this model ({misfit}); "
            f"changed model keys: {keys or 'none'}. A resumed run keeps the model's shape: "
            "resume with the checkpoint's model settings, or start a new run from its weights "
            f"(training.init_from_ckpt={path}, only vocabulary rows may be added)"
        )


class RunRecord(L.Callback):
    """Records in every checkpoint the tokenizer/data fingerprint and the history of
    resumes with their changed keys; on a resume, applies the allowed optimizer changes to
    the optimizer Lightning restored (the new lr is in the param groups, the scheduler's
    base lrs and every later checkpoint)."""

    def __init__(
        self,
        dm: Any = None,
        changes: Mapping[str, tuple[Any, Any]] | None = None,
        history: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.dm = dm
        self.changes = dict(changes or {})
        self.history = list(history)
        self._fingerprint: dict[str, str] | None = None
        self._resumed_at: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.changes:
            return
        self._resumed_at = trainer.global_step
        optim = {k: v for k, v in self.changes.items() if k.startswith("optim.")}
        for key, (old, new) in optim.items():
            apply_optimizer_change(trainer, key, old, new)
            log.info("resume: %s is now %s in the optimizer", key, _show(new))

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        dm = self.dm if self.dm is not None else getattr(trainer, "datamodule", None)
        if self._fingerprint is None and dm is not None:
            self._fingerprint = data_fingerprint(dm)
        if self._fingerprint is not None:
            checkpoint[FINGERPRINT_KEY] = dict(self._fingerprint)
        history = list(self.history)
        if self.changes:
            changed = {k: [_plain(a), _plain(b)] for k, (a, b) in self.changes.items()}
            history.append({"step": self._resumed_at, "changed": changed})
        checkpoint["unmask_resumes"] = history


def _plain(value: Any) -> Any:
    """A value as weights_only-loadable plain data (ABSENT stays its marker string)."""
    return json.loads(json.dumps(value, default=str))


def apply_optimizer_change(trainer: L.Trainer, key: str, old: Any, new: Any) -> None:
    """Write an allowed `optim.<name>` change into the restored optimizers (and, for the lr,
    the schedulers' base lrs, keeping the schedule's current factor)."""
    name = key.split(".", 1)[1]
    value = tuple(new) if isinstance(new, list) else new
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            if name == "lr":
                base = group.get("initial_lr", old)
                factor = group["lr"] / base if base else 1.0
                group["initial_lr"], group["lr"] = float(new), float(new) * factor
            elif name in group:
                group[name] = value
            else:
                raise ConfigError(
                    f"checkpointing.allow_changed: {key} cannot be applied, "
                    f"{type(optimizer).__name__} has no {name!r} setting"
                )
    if name == "lr":
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            scheduler.base_lrs = [float(new)] * len(scheduler.optimizer.param_groups)
            scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


# ---- stored configs never choose code ------------------------------------------------------
OUR_PACKAGES = ("diffusion", "models", "samplers", "dataloader")


@functools.cache
def config_targets() -> frozenset[str]:
    """Every `_target_` written in configs/**.yaml: the documented library targets."""
    found = set()
    for path in (ROOT / "configs").rglob("*.yaml"):
        found.update(re.findall(r"^\s*_target_:\s*([\w.]+)\s*(?:#.*)?$", path.read_text(), re.M))
    found.discard("null")
    return frozenset(found)


def is_our_class(target: str) -> bool:
    """`target` names a class defined in one of our packages (importing our own modules
    runs nothing a checkpoint chose)."""
    module_name, _, attr = target.rpartition(".")
    parts = target.split(".")
    if not module_name or parts[0] not in OUR_PACKAGES or not all(p.isidentifier() for p in parts):
        return False
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    obj = getattr(module, attr, None)
    return inspect.isclass(obj) and obj.__module__.split(".")[0] in OUR_PACKAGES


def check_targets(node: Any, where: str, key: str = "") -> None:
    """Raise CheckpointError unless every `_target_` under `node` is allowed."""
    if isinstance(node, Mapping):
        for k, value in node.items():
            sub = f"{key}.{k}" if key else str(k)
            if k == "_target_":
                if value is None:
                    continue
                if not isinstance(value, str) or not (
                    value in config_targets() or is_our_class(value)
                ):
                    raise CheckpointError(
                        f"{where}: its stored config sets {sub}={value!r}, which is neither a "
                        "target of configs/ nor a class of unmask's packages; refusing to "
                        "build it (a checkpoint never chooses the code that runs)"
                    )
            else:
                check_targets(value, where, sub)
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            check_targets(value, where, f"{key}[{i}]")


def _literal(node: Any) -> Any:
    """Strings escaped so OmegaConf reads `${...}` in them as text, not interpolation (a
    stored config is already resolved)."""
    if isinstance(node, Mapping):
        return {k: _literal(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_literal(v) for v in node]
    if isinstance(node, str):
        # n backslashes before "${" are 2n escaped ones, then the escaped "${"
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", node)
    return node


def safe_config(ckpt: Mapping[str, Any], where: str) -> Any:
    """The config stored in a checkpoint as a DictConfig that is safe to build from: every
    `_target_` is allowed (`check_targets`) and no value is interpolated. `where` names the
    setting and file for errors (e.g. "eval.gen_ppl_eval_model_name_or_path=judge.ckpt")."""
    from omegaconf import OmegaConf

    saved = ckpt.get("unmask_config")
    if not isinstance(saved, Mapping) or "parameterization" not in saved:
        raise ConfigError(f"{where} has no unmask config (not trained by main.py?)")
    check_targets(saved, where)
    return OmegaConf.create(_literal(saved))
