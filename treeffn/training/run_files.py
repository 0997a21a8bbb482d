"""The run dir's own files, checked before a run starts and kept consistent while it runs:
whose folder it is (the marker), which experiment it holds (the identity), the lock (one
treeffn process per run dir), the checkpoint to resume from, whether the run is finished, and
the CSV log's parts. No Lightning import here, so a command refused at start does not pay for it.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

from treeffn.config import ConfigError
from treeffn.results.record import FAILURE_FILE

# treeffn writes into a folder only if it is new, empty, or holds this marker (written when
# treeffn first takes the folder): a folder of someone else's files is never overwritten.
MARKER = ".treeffn-run"
# What a continued run may change: how long and on what hardware it trains, how it logs and
# checkpoints, where its cache is. Everything else (model, tree, data, optim, seed and any
# +key) is the experiment: a run dir holds one, and a different one there is refused.
RUN_SETTINGS = ("trainer", "logger", "checkpoint", "guard", "resume", "runs_root", "eval_after_train", "eval",
                "data.cache_dir", "data.num_workers", "optim.global_batch_tokens")

_HELD_RUN_DIRS: dict = {}


# ------------------------------------------------------------------------------ ownership
def unusable_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as a regular file (missing, a symlink loop, a FIFO, a folder),
    or None when it can."""
    import errno
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop (the link points back at itself)"
        return "no such checkpoint file" if e.errno == errno.ENOENT else f"cannot be read ({e.strerror})"
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if not stat.S_ISREG(mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "not a regular file (a device or socket)"
        return f"{kind}, not a checkpoint file"
    return None



def check_run_dir_is_ours(run_dir: Path) -> None:
    """Refuse a run dir treeffn may not write: the folder the command runs in (or one holding
    it), a file, or a non-empty folder without treeffn's marker."""
    run_dir = Path(run_dir)
    here = Path.cwd().resolve()
    if here == run_dir.resolve() or run_dir.resolve() in here.parents:
        raise ConfigError(f"run dir {run_dir} is the current folder or holds it; treeffn writes its index beside "
                          f"the run dir and its files into it: give hydra.run.dir a new folder (e.g. runs/mine)")
    if not run_dir.exists() and not run_dir.is_symlink():
        return
    if not run_dir.exists():
        raise ConfigError(f"run dir {run_dir} is a symlink to nothing (or a symlink loop); give hydra.run.dir a "
                          f"new or empty folder")
    if not run_dir.is_dir():
        raise ConfigError(f"run dir {run_dir} is not a folder; give hydra.run.dir a new or empty folder")
    entries = sorted(os.listdir(run_dir))
    if not entries or MARKER in entries or written_by_earlier_treeffn(run_dir):
        return
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    raise ConfigError(f"run dir {run_dir} holds {shown}, which treeffn did not write (no {MARKER} marker); "
                      f"treeffn writes only into a new or empty folder or its own run dir: choose another "
                      f"hydra.run.dir")


def written_by_earlier_treeffn(run_dir: Path) -> bool:
    """Run dirs from before the marker existed: their environment.json names a treeffn version."""
    try:
        env = json.loads((run_dir / "environment.json").read_text())
        return bool(env["versions"]["treeffn"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def claim_run_dir(run_dir: Path) -> None:
    """Create the run dir, mark it as treeffn's and take its lock (until ``release_run_dir``);
    then clear temporaries a killed run left (safe: the lock means no other writer)."""
    from treeffn import __version__
    from treeffn.atomic import remove_temporaries

    run_dir.mkdir(parents=True, exist_ok=True)
    try:  # the first file in the folder, under its own name (other ranks may be looking already)
        with open(run_dir / MARKER, "x", encoding="utf-8") as f:
            f.write(json.dumps({"written_by": "treeffn", "treeffn": __version__}) + "\n")
    except FileExistsError:
        pass
    hold_run_dir(run_dir)
    for folder in (run_dir, run_dir / "checkpoints"):
        remove_temporaries(folder)


def check_written_by_older_treeffn(run_dir: Path) -> None:
    """A run dir from a newer treeffn may hold records this version misreads: refuse it."""
    from treeffn import __version__

    env = run_dir / "environment.json"
    if not env.exists():
        return
    try:
        theirs = json.loads(env.read_text())["versions"]["treeffn"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{env} is unreadable; this run dir was not written by a finished treeffn start") from None
    if theirs and _version_tuple(theirs) > _version_tuple(__version__):
        raise ConfigError(f"run dir {run_dir} was written by treeffn {theirs}, newer than this treeffn "
                          f"{__version__}; upgrade treeffn or choose another hydra.run.dir")


def _version_tuple(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("+")[0].split("."))


# ------------------------------------------------------------------------------ identity
def experiment_settings(cfg: dict) -> dict:
    """The resolved config as dotted keys, without the RUN_SETTINGS: what makes the experiment."""
    flat: dict = {}

    def walk(node, prefix):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if any(path == s or path.startswith(s + ".") for s in RUN_SETTINGS):
                continue
            if isinstance(value, dict) and value:
                walk(value, path + ".")
            else:
                flat[path] = value

    walk(cfg, "")
    return flat


def check_same_experiment(cfg: dict, run_dir: Path) -> None:
    """Refuse a run dir whose saved config is a different experiment (any setting outside
    RUN_SETTINGS differs, +keys included)."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return
    from omegaconf import OmegaConf

    saved = experiment_settings(OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True))
    ours = experiment_settings(cfg)
    missing = object()
    changed = sorted(k for k in saved.keys() | ours.keys() if saved.get(k, missing) != ours.get(k, missing))
    if changed:
        first = changed[0]
        there, here = (repr(d[first]) if first in d else "unset" for d in (saved, ours))
        raise ConfigError(f"run dir {run_dir} holds a run with different {', '.join(changed[:4])}"
                          f"{' ...' if len(changed) > 4 else ''} ({first}: {there} there, {here} here); continue "
                          f"it with its own config or choose another hydra.run.dir")


# ------------------------------------------------------------------------------ lock
def hold_run_dir(run_dir: Path) -> None:
    """Take the run dir's lock until ``release_run_dir``; refuse a run dir another process holds.

    Two processes on one run dir (a double-submitted job, a requeue racing the old job) would
    interleave checkpoints and logs. The lock is an flock, so a crashed holder releases it.
    """
    import fcntl

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


# ------------------------------------------------------------------------------ checkpoints
def checkpoint_is_readable(path: Path) -> bool:
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return True
    except Exception:
        return False


def checkpoint_step(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))


# A tree run's untrained weights (weights only, for treeffn analyze): never a point to resume from.
INITIAL_CHECKPOINT = "step0000000.ckpt"


def step_checkpoints(folder: Path) -> list[Path]:
    """Periodic checkpoints a run can resume from, newest first."""
    return sorted((p for p in folder.glob("step*.ckpt") if p.name != INITIAL_CHECKPOINT),
                  key=lambda p: p.stat().st_mtime_ns, reverse=True)


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


# ------------------------------------------------------------------------------ records
def finished_result(run_dir: Path, cfg: dict) -> dict | None:
    """The result record when this run dir already holds this command's finished run (trained to
    trainer.max_steps, and no failed attempt since), else None."""
    from treeffn.results.record import read_result

    try:
        result = read_result(run_dir)
    except (OSError, ValueError):
        return None
    if not result or result.get("status") != "finished" or (run_dir / FAILURE_FILE).exists():
        return None
    if int(result.get("steps") or 0) < cfg["trainer"]["max_steps"]:
        return None
    return result


def start_metrics_part(csv_dir: Path, resume_step: int) -> None:
    """Before a (re)start: Lightning's CSV logger would overwrite metrics.csv, so it becomes the
    next ``metrics-partNNN.csv``; and rows any part logged at steps the run now trains again
    (at or after ``resume_step``: logged after the checkpoint it continues from, then lost with
    the weights by a kill) move to ``superseded-partNNN.csv``. Read in order, the parts are one
    timeline: every step once."""
    from treeffn.atomic import write_text_atomic

    metrics = csv_dir / "metrics.csv"
    if metrics.exists():
        metrics.rename(csv_dir / f"metrics-part{len(list(csv_dir.glob('metrics-part*.csv'))):03d}.csv")
    for part in sorted(csv_dir.glob("metrics-part*.csv")):
        fields, rows = _read_csv(part)
        replayed = [(r.get("step") or "").isdigit() and int(r["step"]) >= resume_step for r in rows]
        if not any(replayed):
            continue
        target = csv_dir / part.name.replace("metrics-", "superseded-")
        old_fields, old_rows = _read_csv(target) if target.exists() else ([], [])
        superseded = old_rows + [r for r, gone in zip(rows, replayed) if gone]
        write_text_atomic(target, _csv_text(list(dict.fromkeys(old_fields + fields)), superseded))  # first: nothing lost
        write_text_atomic(part, _csv_text(fields, [r for r, gone in zip(rows, replayed) if not gone]))


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return list(reader.fieldnames or []), rows


def _csv_text(fields: list[str], rows: list[dict]) -> str:
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
