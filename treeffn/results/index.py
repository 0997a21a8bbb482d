"""A results index many jobs append to at once: one JSON line per record, never torn or lost.

Each append takes an exclusive ``flock`` on the index and writes the whole line with one
``write`` on a file opened with O_APPEND, so concurrent writers (Slurm array tasks, submitit
subprocesses) interleave whole records only. Readers skip a line that is not valid JSON (a
writer killed mid-write on a file system without locks) instead of failing.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

INDEX_FILE = "index.jsonl"


def append_record(index_path: Path, record: dict) -> None:
    index_path = Path(index_path)
    index_path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps({"time": time.time(), **record}, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(index_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a writer died mid-line: start on a fresh line, keep our record whole
        view = memoryview(line)
        while view:  # a regular file takes it in one write; loop only for the pathological case
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_index(index_path: Path) -> list[dict]:
    path = Path(index_path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def latest_by_run(records: list[dict]) -> dict[str, dict]:
    """The newest record of each run dir (a rerun's record supersedes a failed one)."""
    latest: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: r.get("time", 0)):
        latest[r.get("run_dir", "")] = r
    return latest
