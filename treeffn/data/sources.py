"""Local input files: finding them, and refusing unusable ones before any work starts.

A file, a folder or a glob resolves to a sorted list of files of one kind; problems with the
inputs (missing, empty, binary, not UTF-8) are reported with one line before any tokenization.
Reading them is :mod:`treeffn.data.documents`' job; preparing them, :mod:`treeffn.data.prepare`'s.
"""

from __future__ import annotations

import codecs
import errno
import glob
import hashlib
import os
import stat
from pathlib import Path

from treeffn.config import ConfigError

SUFFIX_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ConfigError):
    """Input data that cannot be used; the message names the file and what is allowed."""


def expand_paths(spec: str, field: str) -> list[Path]:
    """A file, a folder (its supported files, recursively) or a glob -> sorted file list."""
    if spec in (None, "", "???"):
        raise DataError(f"{field} is missing; give a file, a folder or a glob of .txt/.json/.jsonl/.parquet files")
    p = Path(os.path.expanduser(str(spec)))
    _refuse_special(p, field, spec)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIX_BUILDERS)
        if not files:
            raise DataError(f"{field}={spec}: folder holds no .txt/.json/.jsonl/.parquet files")
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"{field}={spec}: no such file, folder or glob match")
    for f in files:
        check_text_file(f, field)
    builders = {SUFFIX_BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise DataError(f"{field}={spec}: mixes file kinds ({', '.join(sorted(builders))}); use one kind per path")
    return files


def _refuse_special(p: Path, field: str, spec) -> None:
    """A path that exists but is no regular file or folder (a FIFO, a device, a socket) or a
    symbolic-link loop: say what it is instead of "no such file"."""
    try:
        mode = os.stat(p).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(f"{field}={spec}: is a symbolic-link loop; give a file, a folder or a glob") from None
        if e.errno == errno.EACCES:
            raise DataError(f"{field}={spec}: cannot be read (permission denied)") from None
        return  # missing: maybe a glob, expand_paths decides
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device file"
        raise DataError(f"{field}={spec}: is {kind}, not a regular file; give a file, a folder or a glob")


# Files already found readable in this process, by (path, size, mtime): a run checks its inputs
# before the heavy imports and reads them again to tokenize, without scanning them twice.
_CHECKED: set[tuple[str, int, int]] = set()


def check_inputs(data: dict) -> None:
    """The data settings' files and folders, checked before anything heavy is imported."""
    if data.get("source") == "files":
        expand_paths(data.get("path"), "data.path")
        if data.get("val_path") not in (None, ""):
            expand_paths(data["val_path"], "data.val_path")
    spec = data.get("tokenizer", "embedded")
    if spec != "embedded":
        path = Path(str(spec)).expanduser()
        if path.is_dir() and not any(path.glob("tokenizer*.json")) and not any(path.glob("vocab*")):
            raise DataError(f"data.tokenizer={spec}: folder has no tokenizer files (tokenizer.json or vocab/merges)")


def check_text_file(path: Path, field: str) -> None:
    """Refuse unsupported, empty, binary or non-UTF-8 files with one line that says which."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _CHECKED:
        return
    _check_text_file(path, field)
    _CHECKED.add(key)


def _check_text_file(path: Path, field: str) -> None:
    suffix = path.suffix.lower()
    if suffix not in SUFFIX_BUILDERS:
        raise DataError(f"{field}: {path} has suffix {suffix or '(none)'!r}; allowed: {', '.join(SUFFIX_BUILDERS)}")
    if path.stat().st_size == 0:
        raise DataError(f"{field}: {path} is empty")
    if suffix == ".parquet":
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, seen_text = 0, False
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{field}: {path} cannot be read ({e.strerror or type(e).__name__})") from None
    with f:
        while chunk := f.read(1 << 20):
            if b"\x00" in chunk:
                raise DataError(f"{field}: {path} looks binary (NUL byte near offset {offset + chunk.index(0)}); "
                                f"treeffn reads UTF-8 text")
            try:
                seen_text |= bool(decoder.decode(chunk).strip())
            except UnicodeDecodeError as e:
                raise DataError(f"{field}: {path} is not UTF-8 text (invalid byte at offset {offset + e.start}); "
                                f"convert it to UTF-8") from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"{field}: {path} is not UTF-8 text (truncated character at its end)") from None
    if not seen_text:
        raise DataError(f"{field}: {path} holds only white space")


def files_fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
