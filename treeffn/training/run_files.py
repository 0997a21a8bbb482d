"""Run-dir files checked before a run starts: the lock (one treeffn process per run dir) and
the checkpoint to resume from. No Lightning import here, so a command refused at start does
not pay for it."""

from __future__ import annotations

import warnings
from pathlib import Path

from treeffn.config import ConfigError

_HELD_RUN_DIRS: dict = {}


def hold_run_dir(run_dir: Path) -> None:
    """Take the run dir's lock until ``release_run_dir``; refuse a run dir another process holds.

    Two processes on one run dir (a double-submitted job, a requeue racing the old job) would
    interleave checkpoints and logs. The lock is an flock, so a crashed holder releases it.
    """
    import fcntl
    import os

    handle = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(f"run dir {run_dir} is in use by another treeffn process (pid {holder}); wait for it "
                          f"to end or choose another hydra.run.dir") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    _HELD_RUN_DIRS[str(run_dir)] = handle


def release_run_dir(run_dir: Path) -> None:
    handle = _HELD_RUN_DIRS.pop(str(run_dir), None)
    if handle is not None:
        handle.close()  # closing the file releases the flock


def checkpoint_is_readable(path: Path) -> bool:
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return True
    except Exception:
        return False


def step_checkpoints(folder: Path) -> list[Path]:
    """Periodic checkpoints, newest first."""
    return sorted(folder.glob("step*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)


def pick_resume_checkpoint(folder: Path) -> Path | None:
    """``last.ckpt``, or, when it cannot be read, the newest readable step checkpoint (with a warning)."""
    candidates = [folder / "last.ckpt", *step_checkpoints(folder)]
    candidates = [p for p in candidates if p.exists()]
    for i, path in enumerate(candidates):
        if checkpoint_is_readable(path):
            if i:
                warnings.warn(f"{candidates[0]} could not be read (corrupted or truncated); resuming from {path}")
            return path
    if candidates:
        raise ConfigError(f"no checkpoint in {folder} can be read (all corrupted or truncated); "
                          f"pass resume=never with a new hydra.run.dir to start over")
    return None
