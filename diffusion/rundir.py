"""The run directory is the run: one process at a time, no orphaned files, signals that stop
a run with a checkpoint at the current step and an exit code that says it did not finish.

- `RunLock`: `<run dir>/.unmask.lock` holds the owner's pid, host, start time and command; a
  second process refuses to start in the directory, naming the owner. A lock whose pid is
  gone (same host), or left by an earlier incarnation of this SLURM job (a requeue), is stale
  and taken over.
- `remove_orphans`: the `.<name>.tmp<pid>` files an atomic write leaves when killed.
- `GracefulStop`: SIGTERM (how slurm and most job runners stop a job) and SIGUSR1 finish the
  current optimizer step, save last.ckpt at it and exit 128 + signal (143, 138), logging the
  step. Under SLURM, Lightning's SIGUSR1 handler still writes its requeue checkpoint and
  requeues the job first. A second identical signal stops at once.
- `run_guard`: the context main.py runs a mode in (lock, orphans, exit codes);
  `prepare_fit`: what `train` calls before `trainer.fit` (resume choice and checks, callbacks).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffusion.checkpoint import (
    RunRecord,
    check_fits,
    check_resume,
    find_resume,
    read_checkpoint,
)
from diffusion.config import as_names

log = logging.getLogger("unmask")
LOCK_NAME = ".unmask.lock"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class RunDirInUse(RuntimeError):
    """Another live process owns this run directory."""


class RunInterrupted(SystemExit):
    """A run stopped by a signal before it finished: exits with 128 + the signal number."""

    def __init__(self, signum: int, step: int | None = None, path: Path | None = None) -> None:
        super().__init__(128 + int(signum))
        self.signum, self.step, self.path = int(signum), step, path


# ---- ranks ------------------------------------------------------------------------------------
def global_rank() -> int:
    """This process's rank from the launcher's environment (0 when launched alone); a rank
    on a node other than the first counts as non-zero even before RANK is set."""
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return int(os.environ.get("NODE_RANK", 0) or 0) + int(os.environ.get("LOCAL_RANK", 0) or 0)


# ---- the lock ---------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _owner() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv)[:500],
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
    }


def stale_reason(owner: Mapping[str, Any]) -> str | None:
    """Why a lock's owner no longer runs, or None when it may still run."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and owner.get("slurm_job") == job:
        if str(owner.get("slurm_restart")) != os.environ.get("SLURM_RESTART_COUNT", "0"):
            return f"it was an earlier run of SLURM job {job} (requeued)"
    if owner.get("host") == socket.gethostname():
        pid = owner.get("pid")
        if not isinstance(pid, int) or not pid_alive(pid):
            return f"process {pid} is gone"
    return None


class RunLock:
    """Exclusive ownership of a run directory for this process (see the module docstring)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is removed and the create retried
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_owner()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_owner(), f)
            self.held = True
            return
        raise RunDirInUse(f"could not take the run directory lock {self.path}")

    def _check_owner(self) -> None:
        """Raise RunDirInUse naming the owner, or remove the lock when it is stale."""
        try:
            owner = json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return  # released meanwhile
        except (json.JSONDecodeError, UnicodeDecodeError):
            owner = {}
        if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            raise RunDirInUse(f"{self.path} is already held by this process")
        reason = stale_reason(owner) if owner else "the lock file is unreadable"
        if reason is None:
            raise RunDirInUse(
                f"run directory {self.path.parent} is in use by process {owner.get('pid')} on "
                f"{owner.get('host')} (started {owner.get('started')}: {owner.get('command')}). "
                "Use another hydra.run.dir, or wait for that run to end; if it is gone "
                f"(another host, no pid to check), delete {self.path}"
            )
        log.warning("taking over the stale lock %s: %s", self.path, reason)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ---- orphans of interrupted atomic writes ------------------------------------------------------
def remove_orphans(*folders: str | Path) -> list[Path]:
    """Delete `.<name>.tmp<pid>` files (AtomicCheckpointIO's temporaries) in `folders`; call
    it holding the lock, so no live writer owns them. Returns what was removed."""
    removed = []
    for folder in folders:
        for tmp in Path(folder).glob(".*.tmp[0-9]*"):
            if tmp.is_file():
                tmp.unlink()
                removed.append(tmp)
                log.warning("removed %s, left by an interrupted checkpoint write", tmp)
    return removed


# ---- signals ---------------------------------------------------------------------------------
class GracefulStop(L.Callback):
    """Stop on SIGTERM / SIGUSR1 at the next optimizer-step boundary with last.ckpt saved.

    The handlers go in at `on_train_start`, after Lightning's own (which they call first:
    child ranks and the SLURM requeue), and Lightning's teardown restores the previous ones.
    Lightning's SIGTERM flag is cleared so its loops do not exit with code 0 mid-step; the
    checkpoint is saved inside the step (as ModelCheckpoint does), so a resume from it
    equals the uninterrupted run. All ranks agree on stopping before anyone saves."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.signum: int | None = None
        self._trainer: L.Trainer | None = None
        self._step_at_start = -1

    def _handler(self, previous: Any) -> Any:
        def handle(signum: int, frame: FrameType | None) -> None:
            if self.signum == signum:  # the same signal again: stop now
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            self.signum = self.signum or signum
            log.warning("received %s: stopping after the current step", signal.Signals(signum).name)
            if callable(previous):
                previous(signum, frame)
            connector = getattr(self._trainer, "_signal_connector", None)
            if connector is not None:  # we stop at a step boundary, not Lightning mid-step
                connector.received_sigterm = False

        return handle

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handler(signal.getsignal(signum)))

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self._step_at_start:
            return  # inside a gradient accumulation: not a step boundary
        stop = self.signum is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        signum = self.signum or signal.SIGTERM
        trainer.save_checkpoint(self.path, weights_only=False)
        step = trainer.global_step
        log.warning(
            "stopped by %s at step %d: saved %s; exiting with code %d (resume by starting "
            "the same command in this run directory)",
            signal.Signals(signum).name,
            step,
            self.path,
            128 + signum,
        )
        raise RunInterrupted(signum, step, self.path)


# ---- the call sites ----------------------------------------------------------------------------
@contextlib.contextmanager
def run_guard(run_dir: str | Path, save_dir: str | Path | None = None) -> Iterator[None]:
    """Run a mode owning `run_dir` (rank 0 takes the lock and removes orphans), and make
    every way a run can stop early exit non-zero: Lightning's SIGTERMException (a SystemExit
    with code 0, raised outside training) becomes exit code 143."""
    lock = RunLock(run_dir) if global_rank() == 0 else None
    if lock is not None:
        lock.acquire()
        remove_orphans(*(p for p in (run_dir, save_dir) if p))
    try:
        yield
    except SIGTERMException:
        log.warning("stopped by SIGTERM before the run finished; exiting with code 143")
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        if lock is not None:
            lock.release()


def prepare_fit(cfg: Any, trainer: L.Trainer, dm: Any, module: Any, run_dir: str | Path) -> Any:
    """Before `trainer.fit`: choose the checkpoint to resume (newest by recorded step),
    refuse one whose run-defining keys, fingerprints or tensor shapes differ (unless
    `checkpointing.allow_changed`), and attach RunRecord and GracefulStop. Returns the
    `ckpt_path` for fit (None: a fresh run)."""
    checkpointing = cfg.checkpointing
    allow = as_names(checkpointing.get("allow_changed"), "checkpointing.allow_changed")
    path = find_resume(checkpointing, run_dir)
    changes: dict[str, Any] = {}
    history: list[Any] = []
    if path is not None:
        ckpt = read_checkpoint(path, mmap=True)
        changes = check_resume(ckpt, module.config, path, allow, dm=dm)
        check_fits(module, ckpt, path, changes)
        history = list(ckpt.get("unmask_resumes") or [])
    elif allow:
        log.warning("checkpointing.allow_changed=%s: no checkpoint to resume, a fresh run", allow)
    trainer.callbacks.append(RunRecord(dm, changes, history))
    trainer.callbacks.append(GracefulStop(Path(checkpointing.save_dir) / "last.ckpt"))
    return str(path) if path is not None else None
