"""``data=tokens``: train on token streams that were tokenized ahead of time, memory-mapped.

``data.path`` is either

* a prepared folder (``treeffn prepare`` or the first step of ``treeffn train`` writes one:
  ``meta.json`` + shards; no ``data.val_path`` needed), or
* one token file per split (``data.path`` and ``data.val_path``): raw little-endian uint16
  (``.u16``/``.bin``, as ``treeffn.data.build_corpus`` writes), the same xz-compressed
  (``.u16.xz``/``.bin.xz``, decompressed once into the cache), or a 1-D integer ``.npy``.

Files are mapped, never read whole: a 1.5 GB ``.u16`` costs no 1.5 GB of memory. A one-time
scan (plain reads, in chunks) checks that every id fits the tokenizer and computes the unigram
baseline; its result is cached by the files' path, size and modification time.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
from pathlib import Path

import numpy as np

from treeffn.data.shards import META_FILE, TokenStream, read_meta
from treeffn.data.sources import DataError, files_fingerprint

TOKEN_SUFFIXES = (".u16", ".bin", ".u16.xz", ".bin.xz", ".npy")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in sorted(TOKEN_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return ""


def _decompressed(path: Path, cache_dir: Path) -> Path:
    """An ``.xz`` token file decompressed once into the cache (streamed, bounded memory)."""
    from treeffn.data.prepare import exclusive

    out = Path(cache_dir) / "tokens" / f"{path.name[:-3]}-{files_fingerprint([path])}"
    if out.is_file():
        return out
    with exclusive(out.with_name(out.name + ".lock"), str(path)):
        if not out.is_file():
            tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
            try:
                with lzma.open(path, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
            except lzma.LZMAError as e:
                tmp.unlink(missing_ok=True)
                raise DataError(f"{path}: not a readable .xz file ({e})") from None
            os.replace(tmp, out)
    return out


def token_file_stream(path, field: str, cache_dir: Path) -> TokenStream:
    """One token file as a mapped stream. Refuses missing, empty or odd-sized files with one line."""
    if str(path) in ("", "???", "None"):
        raise DataError(f"{field} is missing; data=tokens needs {field}=<prepared folder or token file "
                        f"({', '.join(TOKEN_SUFFIXES)})>")
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise DataError(f"{field}={path}: no such file")
    suffix = _suffix(p)
    if not suffix:
        raise DataError(f"{field}={path}: suffix not allowed; allowed: {', '.join(TOKEN_SUFFIXES)} "
                        f"or a prepared folder (with {META_FILE})")
    if suffix == ".npy":
        with open(p, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
            except ValueError as e:
                raise DataError(f"{field}={path}: not a readable .npy file ({e})") from None
            offset = f.tell()
        if len(shape) != 1 or not np.issubdtype(dtype, np.integer):
            raise DataError(f"{field}={path}: a .npy token file must be a 1-D integer array, got {dtype} {shape}")
        stream = TokenStream([p], [shape[0]], dtype, [offset], exact=True)
    else:
        if suffix.endswith(".xz"):
            p = _decompressed(p, cache_dir)
        size = p.stat().st_size
        if size == 0 or size % 2:
            raise DataError(f"{field}={path}: {size} bytes is not a whole number of uint16 tokens")
        stream = TokenStream([p], [size // 2], np.dtype("<u2"), exact=True)
    stream.check_files()
    return stream


def scan(train: TokenStream, val: TokenStream, vocab: int, fields: tuple[str, str]) -> dict:
    """Largest id of each stream (must fit the tokenizer) and the unigram baseline."""
    counts = np.zeros(vocab, dtype=np.int64)
    for stream, field in zip((train, val), fields):
        for chunk in stream.chunks():
            top = int(chunk.max()) if chunk.size else -1
            if top >= vocab or (chunk.size and int(chunk.min()) < 0):
                raise DataError(f"{field}={stream.files[0]}: token id {top} is outside the tokenizer's {vocab} "
                                f"entries; data.tokenizer must be the tokenizer the file was made with")
            if stream is train:
                counts += np.bincount(chunk.astype(np.int64), minlength=vocab)
    from treeffn.data.prepare import unigram_perplexity_of

    return {"unigram_ppl": unigram_perplexity_of(counts, val)}


def open_token_streams(data_cfg: dict, cache_dir: Path, tokenizer) -> tuple[TokenStream, TokenStream, dict]:
    """(train stream, validation stream, stats) of a ``data=tokens`` source."""
    from treeffn.data.prepare import check_matches_tokenizer, open_split
    from treeffn.data.tokenizer import tokenizer_fingerprint

    path = Path(os.path.expanduser(str(data_cfg.get("path"))))
    if path.is_dir():
        if not (path / META_FILE).is_file():
            raise DataError(f"data.path={data_cfg['path']}: folder has no {META_FILE}; give a prepared folder "
                            f"(treeffn prepare) or a token file ({', '.join(TOKEN_SUFFIXES)})")
        meta = read_meta(path)
        check_matches_tokenizer(path, meta, tokenizer)
        train, val = open_split(path, meta, "train"), open_split(path, meta, "validation")
        stats = {"unigram_ppl": meta.get("unigram_ppl"), "prepared": str(path)}
    else:
        if not data_cfg.get("val_path"):
            raise DataError("data.val_path is missing; data=tokens with a token file needs a validation token file "
                            "(different documents than data.path)")
        train = token_file_stream(data_cfg["path"], "data.path", cache_dir)
        val = token_file_stream(data_cfg["val_path"], "data.val_path", cache_dir)
        vocab = len(tokenizer)
        key = f"{files_fingerprint(train.files + val.files)}-{tokenizer_fingerprint(tokenizer)}"
        record = Path(cache_dir) / "tokens" / f"scan-{key}.json"
        if record.is_file():
            stats = json.loads(record.read_text(encoding="utf-8"))
        else:
            stats = scan(train, val, vocab, ("data.path", "data.val_path"))
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.with_name(f".{record.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(stats), encoding="utf-8")
            os.replace(tmp, record)
    return train, val, stats
