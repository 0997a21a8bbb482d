"""The run dir's lock: one treeffn process per run dir. No heavy imports here, so a command
refused at start does not pay for torch or Lightning."""

from __future__ import annotations

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
