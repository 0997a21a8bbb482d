"""Where training text comes from: the embedded corpus, local files, or a hub dataset.

Each source resolves to a ``datasets.DatasetDict`` with ``train`` and ``validation`` splits of
one text column, plus a short description used as part of the cache key. Problems with the
inputs (missing, empty, binary, not UTF-8) are reported before any tokenization.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
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
    with open(path, "rb") as f:
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


def _load_files(files: list[Path], text_field: str, cache_dir: Path):
    from datasets import load_dataset

    builder = SUFFIX_BUILDERS[files[0].suffix.lower()]
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    ds = load_dataset(builder, data_files=[str(f) for f in files], split="train",
                      cache_dir=str(cache_dir / "hf-datasets"), **kwargs)
    if text_field not in ds.column_names:
        raise DataError(f"data.text_field={text_field!r} is not a column of {files[0]}; columns: {', '.join(ds.column_names)}")
    return ds.select_columns([text_field]).rename_column(text_field, "text") if text_field != "text" else ds.select_columns(["text"])


def load_source(data: dict, cache_dir: Path):
    """Returns (DatasetDict with train/validation text, description string for the cache key)."""
    from datasets import DatasetDict

    source = data["source"]
    if source == "embedded":
        from treeffn.data.corpus import materialize_split

        root = cache_dir / "embedded"
        files = {s: materialize_split(data["corpus"], s, root) for s in ("train", "validation")}
        ds = DatasetDict({s: _load_files([p], "text", cache_dir) for s, p in files.items()})
        return ds, f"embedded:{data['corpus']}:{files_fingerprint(list(files.values()))}"
    if source == "files":
        train_files = expand_paths(data["path"], "data.path")
        if data.get("val_path"):
            val_files = expand_paths(data["val_path"], "data.val_path")
            ds = DatasetDict({"train": _load_files(train_files, data["text_field"], cache_dir),
                              "validation": _load_files(val_files, data["text_field"], cache_dir)})
            return ds, f"files:{files_fingerprint(train_files)}:{files_fingerprint(val_files)}"
        full = _load_files(train_files, data["text_field"], cache_dir)
        n_val = max(1, int(len(full) * data["val_fraction"] + 0.5))
        if len(full) < 2:
            raise DataError(f"data.path={data['path']} holds one document only; give data.val_path for validation")
        ds = DatasetDict({"train": full.select(range(len(full) - n_val)),
                          "validation": full.select(range(len(full) - n_val, len(full)))})
        return ds, f"files:{files_fingerprint(train_files)}:split{data['val_fraction']}"
    if source == "hub":
        return _load_hub(data, cache_dir)
    raise DataError(f"data.source={source!r} is not allowed; choose one of: embedded, files, hub")


def _load_hub(data: dict, cache_dir: Path):
    from datasets import DatasetDict, load_dataset

    name, config = data["name"], data.get("config")
    if name in (None, "", "???"):
        raise DataError("data.name is missing; data=hub needs data.name=<hub dataset id>")
    try:
        splits = {
            "train": load_dataset(name, config, split=data["train_split"], cache_dir=str(cache_dir / "hf-datasets")),
            "validation": load_dataset(name, config, split=data["val_split"], cache_dir=str(cache_dir / "hf-datasets")),
        }
    except Exception as e:  # datasets raises many kinds here; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"could not load hub dataset data.name={name!r} (config {config!r}): {first} — hub datasets need the "
            f"network the first time; offline, use data=embedded or data=files"
        ) from None
    field = data["text_field"]
    for split, ds in splits.items():
        if field not in ds.column_names:
            raise DataError(f"data.text_field={field!r} is not a column of {name}/{split}; columns: {', '.join(ds.column_names)}")
        splits[split] = ds.select_columns([field]).rename_column(field, "text") if field != "text" else ds.select_columns(["text"])
    return DatasetDict(splits), f"hub:{name}:{config}:{data['train_split']}:{data['val_split']}"
