"""``data=tokens``: train on token streams that were tokenized once, ahead of time.

A token file is a flat stream of token ids with the end-of-text token between documents, as
``treeffn.data.build_corpus`` writes it: raw little-endian uint16 (``.u16``/``.bin``), the same
xz-compressed (``.u16.xz``/``.bin.xz``), or a 1-D ``.npy`` of any integer type. The stream is cut
into blocks exactly as the text pipeline cuts its tokenized stream (remainder dropped) and saved
in the same packed cache format, so ``TextDataModule.setup`` and everything after it (sampler,
validation, ``treeffn analyze``) are unchanged. No ``datasets`` and no tokenization at run time.

The cache key hashes the files' contents (not their paths), the tokenizer and the block size, so
a copy of the same files on another machine reuses nothing stale and needs no re-check of names.

Wiring: ``TextDataModule.prepare`` hands ``source == "tokens"`` to :func:`prepare_pretokenized`.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
from pathlib import Path

import numpy as np

TOKEN_SUFFIXES = (".u16", ".bin", ".u16.xz", ".bin.xz", ".npy")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in sorted(TOKEN_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return ""


def read_tokens(path: str | Path, field: str = "data.path") -> np.ndarray:
    """One token file -> 1-D int64 array. Refuses missing, empty or odd-sized files with one line."""
    from treeffn.data.sources import DataError

    p = Path(os.path.expanduser(str(path)))
    if str(path) in ("", "???", "None"):
        raise DataError(f"{field} is missing; data=tokens needs {field}=<token file ({', '.join(TOKEN_SUFFIXES)})>")
    if not p.is_file():
        raise DataError(f"{field}={path}: no such file")
    suffix = _suffix(p)
    if not suffix:
        raise DataError(f"{field}={path}: suffix not allowed; allowed: {', '.join(TOKEN_SUFFIXES)}")
    if suffix == ".npy":
        arr = np.load(p, mmap_mode="r")
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"{field}={path}: a .npy token file must be a 1-D integer array, got {arr.dtype} {arr.shape}")
        return np.asarray(arr, dtype=np.int64)
    raw = lzma.decompress(p.read_bytes()) if suffix.endswith(".xz") else p.read_bytes()
    if len(raw) == 0 or len(raw) % 2:
        raise DataError(f"{field}={path}: {len(raw)} bytes is not a whole number of uint16 tokens")
    return np.frombuffer(raw, dtype="<u2").astype(np.int64)


def content_hash(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        h.update(b"|")
    return h.hexdigest()[:16]


def prepare_pretokenized(data_cfg: dict, cache_dir: Path, tokenizer, block_size: int) -> Path:
    """Build (or find) the packed cache of a ``data=tokens`` source; returns its folder."""
    from treeffn.data.datamodule import PACK_FORMAT, pack_blocks, unigram_perplexity
    from treeffn.data.sources import DataError
    from treeffn.data.tokenizer import tokenizer_fingerprint

    if not data_cfg.get("val_path"):
        raise DataError("data.val_path is missing; data=tokens needs a validation token file "
                        "(different documents than data.path)")
    paths = {"train": Path(os.path.expanduser(str(data_cfg["path"]))),
             "validation": Path(os.path.expanduser(str(data_cfg["val_path"])))}
    for split, field in (("train", "data.path"), ("validation", "data.val_path")):
        if not paths[split].is_file():
            raise DataError(f"{field}={data_cfg[field.split('.')[1]]}: no such file")
    description = f"tokens:{content_hash([paths['train'], paths['validation']])}"
    key_src = f"{PACK_FORMAT}|{description}|{tokenizer_fingerprint(tokenizer)}|{block_size}"
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    out = Path(cache_dir) / "packed" / key
    if (out / "stats.json").exists():
        return out
    vocab = len(tokenizer)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    stats = {"key_source": key_src, "block_size": block_size, "source_files": {k: str(v) for k, v in paths.items()}}
    counts = None
    for split, field in (("train", "data.path"), ("validation", "data.val_path")):
        flat = read_tokens(paths[split], field)
        top = int(flat.max()) if flat.size else -1
        if top >= vocab:
            raise DataError(f"{field}={paths[split]}: token id {top} is outside the tokenizer's {vocab} entries; "
                            f"data.tokenizer must be the tokenizer the file was made with")
        if split == "train":
            counts = np.bincount(flat, minlength=vocab)
        else:
            stats["unigram_ppl"] = unigram_perplexity(counts, flat)
        blocks = pack_blocks(flat, block_size)
        if len(blocks) == 0:
            raise DataError(f"{field}={paths[split]} has {flat.size} tokens, fewer than one block of "
                            f"data.block_size={block_size}")
        tmp.mkdir(parents=True, exist_ok=True)
        np.save(tmp / f"{split}.npy", blocks.astype(np.int32))
        stats[f"{split}_tokens"] = int(flat.size)
        stats[f"{split}_blocks"] = int(blocks.shape[0])
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    try:
        tmp.rename(out)
    except OSError:  # a concurrent job won the race: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return out
