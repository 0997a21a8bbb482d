"""Writes that leave either the old file (or folder) or the whole new one, never half of one.

New content goes to a temporary name in the destination's own folder, so that the last step is
a rename within one filesystem (a copy across filesystems would truncate the destination
first). The data is fsynced before the rename and the folder after it, so a crash or power loss
cannot leave a renamed but empty file. A failed write (disk full, a kill) removes its temporary
and leaves the destination as it was. Temporaries are named ``.<name>.tmp<pid>``;
``remove_temporaries`` clears the ones a killed process left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

# Errors that mean "this storage cannot take the write": the user must free space or pick
# another place; the run itself did nothing wrong.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def temporary_path(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}{os.getpid()}")


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a folder; the rename is still atomic there
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """``open`` for writing whose file appears at ``path`` only once it is complete and on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        full = storage_error(e)
        if full is not None and full.filename is None:
            full.filename = str(path)  # a failed write() does not say which file; the user needs to know
        raise
    fsync_folder(path.parent)


def link_atomic(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make ``path`` a second name of the file ``source`` (a hard link: no data written, and
    deleting ``source`` later leaves ``path`` whole), replacing what was at ``path`` in one
    rename. Where the filesystem has no hard links, ``path`` becomes a copy, written atomically."""
    source, path = Path(source), Path(path)
    tmp = temporary_path(path)  # a leftover of a killed process is removed like any other
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError:
        with open(source, "rb") as src, atomic_open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        return
    os.replace(tmp, path)
    fsync_folder(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike):
    """Yields an empty temporary folder beside ``path``; when the block ends without an error the
    folder, fsynced, replaces ``path`` whole. On an error ``path`` is left as it was.

    The swap is two renames (old out of the way, new in place); a process killed between them
    leaves ``.<name>.old<pid>``, which ``remove_temporaries`` puts back."""
    path = Path(path)
    tmp, old = temporary_path(path), temporary_path(path, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        fsync_folder(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_temporaries(folder: Path) -> list[Path]:
    """Clear what killed writers left in ``folder`` (one level): temporaries are deleted, and a
    folder moved aside by an unfinished ``atomic_folder`` swap goes back to its name. Call this
    only while no other process writes there (treeffn holds the run dir's lock). Returns what
    was removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if not name.startswith("."):
            continue
        stem, dot, kind = name[1:].rpartition(".")
        if not dot or not (kind.startswith("tmp") or kind.startswith("old")) or not kind[3:].isdigit():
            continue
        original = folder / stem
        if kind.startswith("old") and not original.exists():
            os.replace(entry, original)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def storage_error(error: BaseException) -> OSError | None:
    """The OSError behind ``error`` when a write failed for lack of space or permission.

    Libraries wrap it (torch.save raises a RuntimeError whose context is the ENOSPC), so the
    chain of causes is searched too."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None
