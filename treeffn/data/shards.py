"""Prepared token shards on disk, and the memory-mapped views training reads them through.

A prepared corpus is a folder::

    meta.json                  written last: its presence means the folder is complete
    train/000000.bin ...       raw little-endian token ids (uint16, or uint32 for large vocabularies)
    validation/000000.bin ...

Each split is one token stream (every document followed by the end-of-text token) cut into
shard files of ``shard_tokens`` tokens (the last one shorter). ``meta.json`` lists every shard
with its token count, so a file cut short on disk is caught before training reads it.

Training never copies a split into memory: :class:`TokenStream` maps the shard files
(``numpy.memmap``) and :class:`TokenBlocks` serves block ``i`` = tokens ``[i*B, (i+1)*B)`` of
the stream, the same blocks the earlier in-memory packing made. Only the pages of the blocks a
batch touches are read. (docs/data.md compares this with litdata and an Arrow dataset.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from treeffn.data.sources import DataError

META_FILE = "meta.json"
SHARD_FORMAT = 1
SPLITS = ("train", "validation")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def read_meta(folder: Path) -> dict:
    meta_path = Path(folder) / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path}: not a readable prepared-corpus record ({e}); prepare the data again") from None
    if meta.get("format") != SHARD_FORMAT:
        raise DataError(f"{meta_path}: prepared-corpus format {meta.get('format')!r}, this treeffn reads "
                        f"{SHARD_FORMAT}; prepare the data again")
    return meta


class TokenStream:
    """One split's token stream over its shard files, memory-mapped on first use.

    Picklable without its maps (DataLoader workers and spawned ranks reopen them), and checked
    on open: every shard must exist with exactly the size ``meta.json`` records.
    """

    def __init__(self, files: list[Path], counts: list[int], dtype: np.dtype, offsets: list[int] | None = None,
                 exact: bool = True):
        self.exact = exact  # prepared shards must have exactly the recorded size; a user's file may be longer
        self.files, self.counts, self.dtype = [Path(f) for f in files], [int(c) for c in counts], np.dtype(dtype)
        self.offsets = [int(o) for o in offsets] if offsets else [0] * len(self.files)  # header bytes (.npy)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._maps: list[np.ndarray] | None = None

    @classmethod
    def from_meta(cls, folder: Path, meta: dict, split: str) -> TokenStream:
        info = meta["splits"][split]
        return cls([Path(folder) / split / s["file"] for s in info["shards"]],
                   [s["tokens"] for s in info["shards"]], np.dtype(meta["dtype"]))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def head(self, tokens: int) -> TokenStream:
        """The first ``tokens`` tokens only (a budget applied to an existing stream)."""
        keep, counts = tokens, []
        for c in self.counts:
            counts.append(min(c, keep))
            keep -= counts[-1]
        n = sum(1 for c in counts if c) or 1
        return TokenStream(self.files[:n], counts[:n], self.dtype, self.offsets[:n], exact=False)

    def check_files(self) -> None:
        for path, count, offset in zip(self.files, self.counts, self.offsets):
            want = offset + count * self.dtype.itemsize
            try:
                have = path.stat().st_size
            except OSError:
                raise DataError(f"{path}: token shard is missing; prepare the data again") from None
            if have < want or (self.exact and have != want):
                raise DataError(f"{path}: token shard has {have} bytes, its record says {want} "
                                f"(truncated or replaced); prepare the data again")

    def _open(self) -> list[np.ndarray]:
        if self._maps is None:
            self.check_files()
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r", offset=o, shape=(c,)) if c
                          else np.empty(0, self.dtype) for p, c, o in zip(self.files, self.counts, self.offsets)]
        return self._maps

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream as int64 (a copy; a span may cross shards)."""
        maps = self._open()
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts, pos, k = [], start, first
        while pos < stop:
            local = pos - int(self.starts[k])
            take = min(stop, int(self.starts[k + 1])) - pos
            parts.append(maps[k][local:local + take])
            pos += take
            k += 1
        out = np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])
        return out.astype(np.int64)

    def chunks(self, size: int = 1 << 24):
        """The whole stream in order, ``size`` tokens at a time (plain reads, not the map: a
        scan must not leave the file's pages counted in this process's resident memory)."""
        for path, count, offset in zip(self.files, self.counts, self.offsets):
            with open(path, "rb") as f:
                f.seek(offset)
                left = count
                while left:
                    n = min(size, left)
                    yield np.frombuffer(f.read(n * self.dtype.itemsize), dtype=self.dtype)
                    left -= n

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}


class TokenBlocks(torch.utils.data.Dataset):
    """Blocks of ``block_size`` tokens of a stream: block i is tokens [i*B, (i+1)*B); the
    remainder that cannot fill a block is dropped. ``blocks[i]`` is a 1-D int64 tensor,
    ``blocks[a:b]`` and ``blocks[[i, j, ...]]`` are 2-D."""

    def __init__(self, stream: TokenStream, block_size: int):
        self.stream, self.block_size = stream, int(block_size)
        self.num_blocks = len(stream) // self.block_size

    def __len__(self) -> int:
        return self.num_blocks

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_blocks, self.block_size)

    def _block(self, i: int) -> np.ndarray:
        if not -self.num_blocks <= i < self.num_blocks:
            raise IndexError(f"block {i} of {self.num_blocks}")
        i %= self.num_blocks
        return self.stream.read(i * self.block_size, (i + 1) * self.block_size)

    def __getitem__(self, index):
        if isinstance(index, slice):
            index = range(*index.indices(self.num_blocks))
        if isinstance(index, (range, list, tuple, np.ndarray, torch.Tensor)):
            rows = [self._block(int(i)) for i in index]
            return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, self.block_size, dtype=torch.long)
        return torch.from_numpy(self._block(int(index)))

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        # DataLoader hands a whole batch here (no per-item collate): one (batch, block) tensor.
        return self[list(indices)]


def collate_blocks(batch):
    """The DataLoader's collate for :meth:`TokenBlocks.__getitems__`: already one tensor."""
    return batch if isinstance(batch, torch.Tensor) else torch.stack(batch)


class ShardWriter:
    """Appends token arrays to one split's shard files, ``shard_tokens`` tokens a file."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int):
        self.folder, self.dtype, self.shard_tokens = Path(folder), np.dtype(dtype), int(shard_tokens)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self._file = None
        self._in_file = 0
        self.tokens = 0

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids).astype(self.dtype, copy=False)
        while ids.size:
            if self._file is None or self._in_file == self.shard_tokens:
                self._next_file()
            take = min(ids.size, self.shard_tokens - self._in_file)
            self._file.write(ids[:take].tobytes())
            self._in_file += take
            self.tokens += take
            self.shards[-1]["tokens"] = self._in_file
            ids = ids[take:]

    def _next_file(self) -> None:
        self._close_file()
        name = f"{len(self.shards):06d}.bin"
        self._file = open(self.folder / name, "wb")
        self._in_file = 0
        self.shards.append({"file": name, "tokens": 0})

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> list[dict]:
        self._close_file()
        return self.shards
