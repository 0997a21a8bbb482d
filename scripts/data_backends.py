"""Which storage for prepared tokens? numpy shards (treeffn's path) against litdata and an Arrow dataset.

    python scripts/data_backends.py                          # 300 MB corpus, 2 repeats: 30 min on 2 busy cores
    python scripts/data_backends.py --mb 20 --repeats 1      # a quick look (numbers not comparable)
    python scripts/data_backends.py --table results/data_backends/backends.json   # the docs/data.md table

One JSONL corpus (the embedded Shakespeare and King James texts, repeated with a distinct first
line per copy so no two documents are equal) is prepared by each backend in its own subprocess,
run under ``/usr/bin/time -v``:

* **numpy**: treeffn's own ``prepare_corpus`` with the ``data=files`` config (``conf/data/files.yaml``),
  read back through treeffn's ``TokenStream``/``TokenBlocks``: raw uint16 shards, ``np.memmap``.
* **litdata**: ``litdata.optimize`` with a ``TokensLoader`` (one uint16 array per document, litgpt
  style), read back with ``StreamingDataset(item_loader=TokensLoader(block_size))[i]``.
* **arrow**: Hugging Face ``datasets``: ``load_dataset("json")``, a batched ``map`` with ``num_proc``
  that tokenizes into a ``uint16`` list column, ``save_to_disk``; read back with ``load_from_disk``
  (memory-mapped Arrow files) through zero-copy views of the list column's flat values.

All three tokenize with the same call (the embedded tokenizer's Rust ``encode_batch_fast``, about
4 M characters a call, end-of-text token after each document), so the measurement is the storage
library's cost, not the tokenizer's. Per backend and repeat it records:

* prepare: wall seconds of the prepare call and tokens/s; ``/usr/bin/time``'s "Maximum resident set
  size" (the largest *single* process: GNU time reports the biggest of the children it waited for,
  not their sum), and, sampled every 0.2 s from ``/proc/<pid>/smaps_rollup`` over the whole process
  tree, the peak of the summed RSS, PSS and anonymous memory (what parallel workers really hold);
* train-read: 300 optimizer steps of ``ResumableBatchSampler`` (16 blocks x 512 tokens, seed 0),
  each batch read by block index as training does, first with the backend's files evicted from the
  page cache (``posix_fadvise(DONTNEED)``: cold), then the same 300 again (warm): blocks/s, peak
  RSS (mapped file pages count in RSS; anonymous memory is reported beside it);
* exact resume: whether step s's blocks come from (seed, s) alone: a fresh reader asked for the
  last step's blocks must return what the loop read; for litdata also what its own
  ``StreamingDataLoader.state_dict()`` resume does (same worker count, and another one).

Then it checks that the three token streams are identical (token count, document count, SHA-256
of the whole stream and of its first and last million tokens), counts each backend's code lines
(ast: non-blank, non-comment, non-docstring lines of the functions named in ``CODE_UNITS``) and
writes everything to ``results/data_backends/backends.json``. The order of the backends alternates
between repeats. The machine is shared: the 1-minute load average is recorded before every
measurement; throughput numbers move with it.

litdata is not a treeffn dependency: install it into the venv for this script only
(``.venv/bin/pip install -c constraints/cpu.txt litdata``); a backend whose library is missing is
skipped with a note in the record.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("numpy", "litdata", "arrow")
LIBRARY = {"numpy": "numpy", "litdata": "litdata", "arrow": "datasets"}
BLOCK, BATCH, SEED = 512, 16, 0
BATCH_CHARS = 4 << 20              # characters per tokenizer call, as treeffn.data.prepare.BATCH_CHARS
LITDATA_CHUNK_TOKENS = 1 << 25     # 64 MB uint16 chunks (litgpt scripts use ~8-64M-token chunks)
ARROW_MAP_BATCH = 32               # documents per map call (~4 M characters of these long documents)
WORKERS = 2                        # litdata workers / datasets num_proc (the machine has 2 cores)


# ================================================================== the corpus
def build_corpus(path: Path, target_bytes: int) -> dict:
    """JSONL of the embedded texts, copy k of each document starting with its own line; stops at
    the first document boundary at or past ``target_bytes``."""
    sys.path.insert(0, str(ROOT))
    from treeffn.data.corpus import read_documents

    docs = read_documents("shakespeare") + read_documents("kjv")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    size = n = copy = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while size < target_bytes:
            for d in docs:
                line = json.dumps({"title": f"{copy}/{d['title']}",
                                   "text": f"Copy {copy} of {d['title']}.\n\n{d['text']}"}) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
                n += 1
                if size >= target_bytes:
                    break
            copy += 1
    os.replace(tmp, path)
    return {"path": str(path), "bytes": size, "mb": round(size / 1e6, 1), "documents": n, "copies": copy,
            "target_bytes": target_bytes}


def iter_texts(path: str, start: int = 0, end: int | None = None):
    """The "text" of each JSONL line whose first byte lies in [start, end)."""
    with open(path, "rb") as f:
        f.seek(start)
        while end is None or f.tell() < end:
            line = f.readline()
            if not line:
                break
            if line.strip():
                yield json.loads(line)["text"]


# ================================================================== backend: numpy (treeffn's path)
def numpy_prepare(corpus: str, out: Path) -> dict:
    from omegaconf import OmegaConf

    from treeffn.data.prepare import prepare_corpus
    from treeffn.data.tokenizer import load_tokenizer

    cfg = OmegaConf.load(ROOT / "conf" / "data" / "files.yaml")   # the real data=files defaults
    cfg.path = corpus
    data = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items()
            if not (isinstance(v, str) and v.startswith("${"))}
    folder, _ = prepare_corpus(data, load_tokenizer("embedded"), out)
    (out / "folder.txt").write_text(str(folder))
    return {"folder": str(folder)}


def numpy_open(out: Path):
    from treeffn.data.shards import TokenBlocks, TokenStream, read_meta

    folder = data_dir("numpy", out)
    return TokenBlocks(TokenStream.from_meta(folder, read_meta(folder), "train"), BLOCK)


# ================================================================== backend: litdata
def line_ranges(path: str, pieces: int) -> list[tuple[str, int, int]]:
    """``pieces`` byte ranges of a JSONL file, each starting at a line start."""
    size, cuts = os.path.getsize(path), [0]
    with open(path, "rb") as f:
        for k in range(1, pieces):
            f.seek(max(size * k // pieces, cuts[-1]))
            f.readline()
            cuts.append(min(f.tell(), size))
    cuts.append(size)
    return [(path, a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


_TOKENIZER = None


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        sys.path.insert(0, str(ROOT))
        from treeffn.data.tokenizer import load_tokenizer

        _TOKENIZER = load_tokenizer("embedded")
    return _TOKENIZER


def _litdata_tokenize(item):
    """litdata's fn: one uint16 array (the document's ids + end-of-text) per document."""
    import numpy as np

    tok = _tokenizer()
    encode, eos = tok.backend_tokenizer.encode_batch_fast, tok.eos_token_id
    batch, chars = [], 0
    for text in iter_texts(*item):
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS:
            for enc in encode(batch, add_special_tokens=False):
                yield np.array([*enc.ids, eos], dtype=np.uint16)
            batch, chars = [], 0
    for enc in encode(batch, add_special_tokens=False) if batch else ():
        yield np.array([*enc.ids, eos], dtype=np.uint16)


def litdata_prepare(corpus: str, out: Path) -> dict:
    from litdata import TokensLoader, optimize

    optimize(fn=_litdata_tokenize, inputs=line_ranges(corpus, 16 * WORKERS), output_dir=str(out / "data"),
             chunk_size=LITDATA_CHUNK_TOKENS, item_loader=TokensLoader(), num_workers=WORKERS,
             keep_data_ordered=True, reorder_files=False)  # ordered: worker 0 takes the first half, ...
    return {}


def litdata_open(out: Path):
    from litdata import StreamingDataset, TokensLoader

    return StreamingDataset(str(out / "data"), item_loader=TokensLoader(block_size=BLOCK), shuffle=False)


# ================================================================== backend: Arrow (Hugging Face datasets)
def _arrow_tokenize(batch):
    import numpy as np

    tok = _tokenizer()
    encodings = tok.backend_tokenizer.encode_batch_fast(batch["text"], add_special_tokens=False)
    return {"input_ids": [np.array([*e.ids, tok.eos_token_id], dtype=np.uint16) for e in encodings]}


def arrow_prepare(corpus: str, out: Path) -> dict:
    from datasets import Features, List, Value, load_dataset

    ds = load_dataset("json", data_files=corpus, split="train", cache_dir=str(out / "hf_cache"))
    ds = ds.map(_arrow_tokenize, batched=True, batch_size=ARROW_MAP_BATCH, num_proc=WORKERS,
                remove_columns=ds.column_names, features=Features({"input_ids": List(Value("uint16"))}))
    ds.save_to_disk(str(out / "data"))
    return {"hf_cache_mb": round(dir_bytes(out / "hf_cache") / 1e6, 1)}


class ArrowBlocks:
    """Block i = tokens [i*B, (i+1)*B) of the concatenated list column, read through zero-copy
    numpy views of the memory-mapped Arrow buffers (the datasets API itself serves rows)."""

    def __init__(self, path: Path):
        import numpy as np
        from datasets import load_from_disk

        column = load_from_disk(str(path)).data.table.column("input_ids")
        self.parts = [chunk.flatten().to_numpy(zero_copy_only=True) for chunk in column.chunks]
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])])
        self.num_blocks = int(self.starts[-1]) // BLOCK

    def __len__(self):
        return self.num_blocks

    def __getitem__(self, i):
        import numpy as np

        start, stop = i * BLOCK, (i + 1) * BLOCK
        k, out = int(np.searchsorted(self.starts, start, side="right")) - 1, []
        while start < stop:
            take = min(stop, int(self.starts[k + 1])) - start
            out.append(self.parts[k][start - self.starts[k]:][:take])
            start, k = start + take, k + 1
        return np.concatenate(out)


def arrow_open(out: Path):
    return ArrowBlocks(out / "data")


# ================================================================== reading the whole stream back (checks)
def stream_chunks(backend: str, out: Path):
    """The backend's whole token stream, in order, as uint16/uint32 numpy arrays."""
    import numpy as np

    if backend == "numpy":
        from treeffn.data.shards import TokenStream, read_meta

        folder = data_dir(backend, out)
        meta = read_meta(folder)
        for split in ("train", "validation"):  # validation = the last documents of the file
            yield from TokenStream.from_meta(folder, meta, split).chunks()
    elif backend == "litdata":
        index = json.loads((out / "data" / "index.json").read_text())
        assert index["config"]["data_format"][0].startswith("no_header_numpy"), index["config"]["data_format"]
        for chunk in index["chunks"]:
            header = (1 + chunk["chunk_size"] + 1) * 4   # item count + offsets (litdata's chunk layout)
            yield np.fromfile(out / "data" / chunk["filename"], dtype=np.uint16, offset=header, count=chunk["dim"])
    else:
        yield from ArrowBlocks(out / "data").parts


def data_dir(backend: str, out: Path) -> Path:
    """The folder a backend's prepared data lives in."""
    return Path((out / "folder.txt").read_text()) if backend == "numpy" else out / "data"


def stream_tokens(backend: str, out: Path) -> int:
    """The number of tokens prepared, from the backend's own metadata (no data pages read)."""
    if backend == "numpy":
        meta = json.loads((data_dir(backend, out) / "meta.json").read_text())
        return sum(meta["splits"][s]["tokens"] for s in ("train", "validation"))
    if backend == "litdata":
        return sum(c["dim"] for c in json.loads((out / "data" / "index.json").read_text())["chunks"])
    return int(ArrowBlocks(out / "data").starts[-1])


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).exists() else 0


def evict(path: Path) -> None:
    """Drop a folder's files from the page cache (clean pages; no root needed)."""
    for f in Path(path).rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def proc_status(pid="self") -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) // 1024   # MB (MiB)
    return out


# ================================================================== workers (run in subprocesses)
PREPARE = {"numpy": numpy_prepare, "litdata": litdata_prepare, "arrow": arrow_prepare}
OPEN = {"numpy": numpy_open, "litdata": litdata_open, "arrow": arrow_open}


def worker_prepare(backend: str, corpus: str, out: Path) -> dict:
    t = time.perf_counter()
    extra = PREPARE[backend](corpus, out)
    seconds = time.perf_counter() - t
    tokens = stream_tokens(backend, out)
    return {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds),
            "disk_mb": round(dir_bytes(data_dir(backend, out)) / 1e6, 1), **extra}


def read_steps(blocks, steps: range):
    """Each step's batch as the sampler picks it, read by block index: (seconds, per-step digests)."""
    import numpy as np
    import torch

    from treeffn.data.sampler import ResumableBatchSampler

    sampler = ResumableBatchSampler(len(blocks), BATCH, SEED)
    digests, t = [], time.perf_counter()
    for step in steps:
        rows = [np.asarray(blocks[i]) for i in sampler.micro_batch(step, 0)]
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))     # what the model gets
        digests.append(hashlib.sha256(batch.numpy().tobytes()).hexdigest()[:16])
    return time.perf_counter() - t, digests


def worker_read(backend: str, out: Path, steps: int) -> dict:
    import numpy  # noqa: F401  what every backend's reader loads anyway: torch and the sampler
    import torch  # noqa: F401

    from treeffn.data.sampler import ResumableBatchSampler  # noqa: F401

    __import__({"numpy": "treeffn.data.shards", "litdata": "litdata", "arrow": "datasets"}[backend])
    imported = proc_status()
    evict(data_dir(backend, out))
    t = time.perf_counter()
    blocks = OPEN[backend](out)
    open_s = time.perf_counter() - t
    opened = proc_status()
    cold_s, digests = read_steps(blocks, range(steps))
    warm_s, again = read_steps(blocks, range(steps))
    # Exact resume: a fresh reader, asked for the last step alone (no replay of steps 0..n-2).
    fresh = OPEN[backend](out)
    t = time.perf_counter()
    _, last = read_steps(fresh, range(steps - 1, steps))
    jump_s = time.perf_counter() - t
    n = steps * BATCH
    return {"num_blocks": len(blocks), "open_s": round(open_s, 3), "cold_s": round(cold_s, 3),
            "warm_s": round(warm_s, 3), "cold_blocks_per_s": round(n / cold_s), "warm_blocks_per_s": round(n / warm_s),
            "rss_after_imports_mb": imported["VmRSS"], "rss_after_open_mb": opened["VmRSS"], "anon_after_open_mb": opened["RssAnon"], "end": proc_status(),
            "warm_pass_equal": again == digests, "step_from_seed_alone": last[0] == digests[-1],
            "jump_to_last_step_s": round(jump_s, 4), "digest_last_step": digests[-1]}


def worker_check(backend: str, out: Path) -> dict:
    """Token count, document count and SHA-256 of the whole stream, its first and last million."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    eos = _tokenizer().eos_token_id
    whole, n, docs, head, tail = hashlib.sha256(), 0, 0, [], np.empty(0, np.uint32)
    for c in stream_chunks(backend, out):
        c = np.asarray(c).astype("<u4")
        whole.update(c.tobytes())
        n += c.size
        docs += int((c == eos).sum())
        if sum(map(len, head)) < 1_000_000:
            head.append(c[: 1_000_000 - sum(map(len, head))])
        tail = np.concatenate([tail, c])[-1_000_000:]
    info = {"tokens": n, "documents": docs, "sha256": whole.hexdigest(),
            "sha256_first_1M": hashlib.sha256(np.concatenate(head).tobytes()).hexdigest(),
            "sha256_last_1M": hashlib.sha256(tail.tobytes()).hexdigest()}
    if backend == "litdata":
        info["litdata_blocks"] = litdata_block_layout(out, eos)
    return info


def litdata_block_layout(out: Path, eos: int) -> dict:
    """TokensLoader cuts blocks inside each chunk and drops each chunk's tail: how many tokens that
    drops, whether ds[i] is the chunk-local slice, and whether it equals stream block i."""
    import numpy as np

    index = json.loads((out / "data" / "index.json").read_text())
    dims = [c["dim"] for c in index["chunks"]]
    stream = np.concatenate(list(stream_chunks("litdata", out)))
    ds = litdata_open(out)
    starts, first_block = np.concatenate([[0], np.cumsum(dims)]), np.concatenate([[0], np.cumsum([d // BLOCK for d in dims])])
    rng = np.random.default_rng(0)
    probe = sorted(set(rng.integers(0, len(ds), 200).tolist()) | {0, len(ds) - 1})
    local_ok = same_as_stream_block = 0
    for i in probe:
        c = int(np.searchsorted(first_block, i, side="right")) - 1
        at = starts[c] + (i - first_block[c]) * BLOCK
        got = np.asarray(ds[i])
        local_ok += bool(np.array_equal(got, stream[at:at + BLOCK]))
        same_as_stream_block += bool(np.array_equal(got, stream[i * BLOCK:(i + 1) * BLOCK]))
    return {"chunks": len(dims), "chunk_tokens": dims, "blocks": len(ds), "stream_blocks": int(stream.size) // BLOCK,
            "tokens_dropped_at_chunk_tails": int(sum(d % BLOCK for d in dims)), "probed": len(probe),
            "ds_i_is_chunk_local_slice": local_ok, "ds_i_equals_stream_block_i": same_as_stream_block}


def worker_litdata_resume(out: Path) -> dict:
    """What litdata's own loader state offers: resume after k batches with the same worker count,
    and with another one; and whether the batches depend on the worker count at all."""
    import torch
    from litdata import StreamingDataLoader, StreamingDataset, TokensLoader

    def loader(workers):
        ds = StreamingDataset(str(out / "data"), item_loader=TokensLoader(block_size=BLOCK), shuffle=True, seed=SEED)
        return StreamingDataLoader(ds, batch_size=BATCH, num_workers=workers)

    def take(dl, n):
        it, got = iter(dl), []
        for _ in range(n):
            got.append(next(it).clone())
        return got

    result, k, m = {}, 6, 4
    for workers, resume_workers in ((0, 0), (2, 2), (2, 1)):
        full = take(loader(workers), k + m)
        dl = loader(workers)
        take(dl, k)
        state = dl.state_dict()
        dl2 = loader(resume_workers)
        try:
            t = time.perf_counter()
            dl2.load_state_dict(state)
            nxt = take(dl2, m)
            same = [bool(torch.equal(a, b)) for a, b in zip(nxt, full[k:])]
            same_blocks = sorted(x.tolist() for b in nxt for x in b) == sorted(x.tolist() for b in full[k:] for x in b)
            result[f"workers_{workers}_to_{resume_workers}"] = {
                "batches_equal_uninterrupted": same, "same_blocks_any_order": same_blocks,
                "seconds": round(time.perf_counter() - t, 3)}
        except Exception as e:  # a resume the library refuses is a result too
            result[f"workers_{workers}_to_{resume_workers}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    one, two = take(loader(0), 4), take(loader(2), 4)
    result["first_4_batches_equal_workers_0_vs_2"] = [bool(torch.equal(a, b)) for a, b in zip(one, two)]
    result["state_dict_keys"] = sorted(state)
    result["dataset_state_keys"] = sorted(state.get("dataset", {}))
    return result


def worker_main(args) -> None:
    sys.path.insert(0, str(ROOT))
    out = Path(args.out)
    if args.worker == "prepare":
        res = worker_prepare(args.backend, args.corpus, out)
    elif args.worker == "read":
        res = worker_read(args.backend, out, args.batches)
    elif args.worker == "check":
        res = worker_check(args.backend, out)
    else:
        res = worker_litdata_resume(out)
    Path(args.result).write_text(json.dumps(res))


# ================================================================== the parent: measuring
class TreeSampler(threading.Thread):
    """Peak of the summed RSS / PSS / anonymous memory of a process and all its descendants."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every, self.stop = pid, every, threading.Event()
        self.peak = {"rss_mb": 0, "pss_mb": 0, "anon_mb": 0, "processes": 0}

    def tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(p.name))
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def run(self) -> None:
        while not self.stop.is_set():
            total = {"rss_mb": 0, "pss_mb": 0, "anon_mb": 0}
            pids = self.tree()
            for pid in pids:
                try:
                    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
                except OSError:
                    continue
                for line in text.splitlines():
                    key, _, value = line.partition(":")
                    field = {"Rss": "rss_mb", "Pss": "pss_mb", "Anonymous": "anon_mb"}.get(key)
                    if field:
                        total[field] += int(value.split()[0]) / 1024
            for k, v in total.items():
                self.peak[k] = max(self.peak[k], round(v))
            self.peak["processes"] = max(self.peak["processes"], len(pids) - 1)   # minus /usr/bin/time
            self.stop.wait(self.every)


def load() -> dict:
    one, five, fifteen = os.getloadavg()
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"load1": one, "load5": five, "load15": fifteen, "uptime": up}


def parse_time(text: str) -> dict:
    keys = {"Maximum resident set size (kbytes)": "max_rss_mb", "Elapsed (wall clock) time (h:mm:ss or m:ss)": "wall",
            "User time (seconds)": "user_s", "System time (seconds)": "sys_s", "Percent of CPU this job got": "cpu_pct",
            "Exit status": "exit"}
    out = {}
    for line in text.splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key in keys:
            out[keys[key]] = value
    if "max_rss_mb" in out:
        out["max_rss_mb"] = round(int(out["max_rss_mb"]) / 1024)
    for k in ("user_s", "sys_s"):
        if k in out:
            out[k] = float(out[k])
    return out


def measure(work: Path, phase: str, backend: str, argv: list[str], env: dict) -> dict:
    """One worker subprocess under /usr/bin/time -v, its process tree sampled."""
    tag = f"{phase}-{backend}-{time.strftime('%H%M%S')}"
    result, timing, log = work / f"{tag}.json", work / f"{tag}.time", work / f"{tag}.log"
    cmd = ["/usr/bin/time", "-v", "-o", str(timing), sys.executable, str(Path(__file__).resolve()),
           "--worker", phase, "--backend", backend, "--result", str(result), *argv]
    before = load()
    t = time.perf_counter()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        proc.wait()
        sampler.stop.set()
        sampler.join()
    record = {"phase": phase, "backend": backend, "load_before": before, "process_wall_s": round(time.perf_counter() - t, 2),
              "time_v": parse_time(timing.read_text()) if timing.exists() else {}, "tree_peak": sampler.peak,
              "returncode": proc.returncode}
    if proc.returncode == 0 and result.exists():
        record["result"] = json.loads(result.read_text())
    else:
        record["error"] = log.read_text()[-3000:]
    print(f"  {phase:8s} {backend:8s} rc={proc.returncode} {record['process_wall_s']:7.1f}s "
          f"maxrss={record['time_v'].get('max_rss_mb')}MB tree_pss={sampler.peak['pss_mb']}MB "
          f"load1={before['load1']:.2f} {json.dumps(record.get('result', {}))[:160]}", flush=True)
    return record


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    for pkg in ("numpy", "litdata", "datasets", "pyarrow", "tokenizers", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


# ================================================================== code size
CODE_UNITS = {
    # treeffn's own path, in the package (what a user of data=files runs)
    "numpy": {"treeffn/data/prepare.py": ["token_batches", "write_split", "prepare_corpus", "exclusive",
                                          "is_complete", "build"],
              "treeffn/data/shards.py": ["token_dtype", "read_meta", "TokenStream", "TokenBlocks", "ShardWriter"],
              "scripts/data_backends.py": ["numpy_prepare", "numpy_open"]},
    "litdata": {"scripts/data_backends.py": ["line_ranges", "iter_texts", "_tokenizer", "_litdata_tokenize",
                                             "litdata_prepare", "litdata_open"]},
    "arrow": {"scripts/data_backends.py": ["_tokenizer", "_arrow_tokenize", "arrow_prepare", "ArrowBlocks",
                                           "arrow_open"]},
}
FULL_FILES = ["treeffn/data/prepare.py", "treeffn/data/shards.py"]
# The part of treeffn's path that does what the litdata/Arrow code here does (tokenize, write, map,
# read a block): without the lock, the budgets, meta.json, the unigram baseline and the checks.
NUMPY_CORE = {"treeffn/data/prepare.py": ["token_batches"],
              "treeffn/data/shards.py": ["token_dtype", "TokenStream", "TokenBlocks", "ShardWriter"]}


def code_lines(path: Path, names: list[str] | None = None) -> int:
    """Non-blank, non-comment, non-docstring lines of the named top-level functions/classes
    (the whole file when ``names`` is None)."""
    text = path.read_text()
    tree = ast.parse(text)
    code = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENDMARKER):
            code.update(range(tok.start[0], tok.end[0] + 1))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                code -= set(range(first.lineno, first.end_lineno + 1))
    if names is None:
        return len(code)
    wanted, found = set(names), set()
    span = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in wanted:
            found.add(node.name)
            span.update(range(node.lineno - len(node.decorator_list), node.end_lineno + 1))
    missing = wanted - found
    if missing:
        raise SystemExit(f"code size: {path} has no {sorted(missing)}")
    return len(code & span)


def code_size() -> dict:
    out = {}
    for backend, files in CODE_UNITS.items():
        per = {f: code_lines(ROOT / f, names) for f, names in files.items()}
        out[backend] = {"lines": sum(per.values()), "per_file": per, "units": files}
    out["numpy"]["full_files_lines"] = {f: code_lines(ROOT / f) for f in FULL_FILES}
    out["numpy"]["core_lines"] = {f: code_lines(ROOT / f, names) for f, names in NUMPY_CORE.items()}
    out["numpy"]["core_units"] = NUMPY_CORE
    out["method"] = ("ast + tokenize: lines holding code of the named top-level functions/classes; blank lines, "
                     "comments and docstrings not counted; imports inside them counted")
    return out


# ================================================================== the table
def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(values, unit="", digits=0):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    f = (lambda v: f"{v:,.{digits}f}")
    return f"{f(median(values))}{unit}" + (f" ({' / '.join(f(v) for v in values)})" if len(values) > 1 else "")


def table(record: dict) -> str:
    record = {**record, "summary": summarize(record)}
    rows = []
    head = ("| | " + " | ".join(b for b in BACKENDS if b in record["summary"]) + " |")
    rows.append(head)
    rows.append("|---" * (1 + sum(b in record["summary"] for b in BACKENDS)) + "|")
    s = record["summary"]
    names = [b for b in BACKENDS if b in s]
    lines = [
        ("prepare: tokens/s", lambda b: fmt(s[b]["prepare_tokens_per_s"])),
        ("prepare: seconds", lambda b: fmt(s[b]["prepare_seconds"], digits=1)),
        ("prepare: peak RSS, largest process (MB)", lambda b: fmt(s[b]["prepare_max_rss_mb"])),
        ("prepare: peak PSS, all processes (MB)", lambda b: fmt(s[b]["prepare_tree_pss_mb"])),
        ("prepare: processes", lambda b: str(max(s[b]["prepare_processes"]))),
        ("prepare: 1-min load average before (2 cores)", lambda b: fmt(s[b]["prepare_load1"], digits=1)),
        ("on disk: prepared data (MB)", lambda b: fmt(s[b]["disk_mb"], digits=1)),
        ("on disk: datasets cache beside it (MB)", lambda b: fmt(s[b]["extra_disk_mb"], digits=1)),
        ("train-read: RSS after imports (torch, sampler, library) (MB)", lambda b: fmt(s[b]["read_rss_after_imports_mb"])),
        ("train-read: RSS after opening the data (MB)", lambda b: fmt(s[b]["read_rss_after_open_mb"])),
        ("train-read: peak RSS (MB)", lambda b: fmt(s[b]["read_max_rss_mb"])),
        ("train-read: peak anonymous memory (MB)", lambda b: fmt(s[b]["read_tree_anon_mb"])),
        ("train-read: blocks/s, cold cache", lambda b: fmt(s[b]["read_cold_blocks_per_s"])),
        ("train-read: blocks/s, warm cache", lambda b: fmt(s[b]["read_warm_blocks_per_s"])),
        ("exact resume: step s's blocks from (seed, s) alone", lambda b: s[b]["resume"]),
        ("code lines (prepare + read)", lambda b: str(record["code_size"][b]["lines"]) + (
            f" (core: {sum(record['code_size'][b]['core_lines'].values())})" if b == "numpy" else "")),
    ]
    for label, f in lines:
        rows.append(f"| {label} | " + " | ".join(f(b) for b in names) + " |")
    return "\n".join(rows)


def summarize(record: dict) -> dict:
    s = {}
    for b in record["backends_run"]:
        prep = [m for m in record["measurements"] if m["backend"] == b and m["phase"] == "prepare" and "result" in m]
        read = [m for m in record["measurements"] if m["backend"] == b and m["phase"] == "read" and "result" in m]
        if not prep:
            continue
        s[b] = {
            "prepare_tokens_per_s": [m["result"]["tokens_per_s"] for m in prep],
            "prepare_seconds": [m["result"]["seconds"] for m in prep],
            "prepare_max_rss_mb": [m["time_v"].get("max_rss_mb") for m in prep],
            "prepare_tree_pss_mb": [m["tree_peak"]["pss_mb"] for m in prep],
            "prepare_tree_rss_mb": [m["tree_peak"]["rss_mb"] for m in prep],
            "prepare_tree_anon_mb": [m["tree_peak"]["anon_mb"] for m in prep],
            "prepare_processes": [m["tree_peak"]["processes"] for m in prep],
            "prepare_load1": [m["load_before"]["load1"] for m in prep],
            "disk_mb": [m["result"]["disk_mb"] for m in prep],
            "extra_disk_mb": [m["result"].get("hf_cache_mb") for m in prep],
            "read_max_rss_mb": [m["time_v"].get("max_rss_mb") for m in read],
            "read_rss_after_imports_mb": [m["result"]["rss_after_imports_mb"] for m in read],
            "read_rss_after_open_mb": [m["result"]["rss_after_open_mb"] for m in read],
            "read_tree_anon_mb": [m["tree_peak"]["anon_mb"] for m in read],
            "read_anon_end_mb": [m["result"]["end"]["RssAnon"] for m in read],
            "read_cold_blocks_per_s": [m["result"]["cold_blocks_per_s"] for m in read],
            "read_warm_blocks_per_s": [m["result"]["warm_blocks_per_s"] for m in read],
            "read_load1": [m["load_before"]["load1"] for m in read],
            "resume": resume_text(b, read, record.get("litdata_resume")),
        }
    return s


def resume_text(backend: str, read: list[dict], own: dict | None) -> str:
    """Yes/no for random access by step (measured), and how; for litdata also its own loader's resume."""
    ok = bool(read) and all(m["result"]["step_from_seed_alone"] and m["result"]["warm_pass_equal"] for m in read)
    how = {"numpy": "block index -> memmap slice", "litdata": "`StreamingDataset[i]` (TokensLoader) + treeffn's sampler",
           "arrow": "block index -> slice of the mapped Arrow buffers"}[backend]
    text = f"{'yes' if ok else 'no'}: {how}"
    if backend == "litdata" and own:
        def exact(key):
            r = own.get(key, {})
            return "error" if "error" in r else ("exact" if all(r.get("batches_equal_uninterrupted", [])) else "not exact")
        same = "same" if all(own.get("first_4_batches_equal_workers_0_vs_2", [])) else "other"
        text += (f"; own loader state_dict: {exact('workers_2_to_2')} (2->2 workers), {exact('workers_2_to_1')} "
                 f"(2->1), but {same} batches with 0 vs 2 workers")
    return text


def save(record: dict, path: str, partial: bool) -> None:
    """Write the record (after every measurement, so a cut-off run keeps what it measured)."""
    record["complete"] = not partial
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=300.0, help="corpus size in MB (10^6 bytes) when no --corpus")
    p.add_argument("--corpus", help="an existing JSONL corpus with a 'text' field (skips building one)")
    p.add_argument("--work", default="/tmp/treeffn_data_backends", help="scratch folder (corpus, prepared copies)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--record", default=str(ROOT / "results" / "data_backends" / "backends.json"))
    p.add_argument("--table", metavar="JSON", help="print the markdown table of a record and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker_main(args)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return

    started = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "host": platform.node(), "versions": versions(), "load_at_start": load(),
              "settings": {"block": BLOCK, "batch": BATCH, "seed": SEED, "batches": args.batches,
                           "batch_chars": BATCH_CHARS, "workers": WORKERS, "litdata_chunk_tokens": LITDATA_CHUNK_TOKENS,
                           "arrow_map_batch": ARROW_MAP_BATCH, "tokenizer": "embedded (8192 entries, uint16 ids)",
                           "numpy_config": "conf/data/files.yaml (val_fraction 0.05, shard_tokens 2^27)"},
              "skipped": {}, "measurements": []}
    wanted = [b for b in args.backends.split(",") if b]
    runnable = []
    for b in wanted:
        try:
            __import__(LIBRARY[b])
            runnable.append(b)
        except ImportError:
            record["skipped"][b] = (f"{LIBRARY[b]} is not installed: .venv/bin/pip install -c constraints/cpu.txt "
                                    f"{LIBRARY[b]} to measure it")
            print(f"skipping {b}: {record['skipped'][b]}", flush=True)
    record["backends_run"] = runnable

    if args.corpus:
        corpus = Path(args.corpus)
        record["corpus"] = {"path": str(corpus), "bytes": corpus.stat().st_size, "mb": round(corpus.stat().st_size / 1e6, 1)}
    else:
        corpus = work / f"corpus-{args.mb:g}MB.jsonl"
        info_file = corpus.with_suffix(".info.json")
        if corpus.exists() and info_file.exists():
            record["corpus"] = json.loads(info_file.read_text())
        else:
            print(f"building a {args.mb:g} MB corpus at {corpus} ...", flush=True)
            record["corpus"] = build_corpus(corpus, int(args.mb * 1e6))
            info_file.write_text(json.dumps(record["corpus"]))
    print(f"corpus: {record['corpus']}", flush=True)

    env = {**os.environ, "LITDATA_DISABLE_VERSION_CHECK": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "DATA_OPTIMIZER_CACHE_FOLDER": str(work / "litdata_cache" / "chunks"),
           "DATA_OPTIMIZER_DATA_CACHE_FOLDER": str(work / "litdata_cache" / "data"),
           "HF_DATASETS_CACHE": str(work / "hf_datasets_cache"), "TQDM_MININTERVAL": "5",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    checks = {}
    for repeat in range(args.repeats):
        order = runnable if repeat % 2 == 0 else runnable[::-1]
        print(f"repeat {repeat + 1}/{args.repeats}: {', '.join(order)}", flush=True)
        for b in order:
            out = work / b
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            common = ["--out", str(out)]
            m = measure(work, "prepare", b, [*common, "--corpus", str(corpus)], env)
            m["repeat"] = repeat + 1
            record["measurements"].append(m)
            save(record, args.record, partial=True)
            if "result" not in m:
                continue
            m = measure(work, "read", b, [*common, "--batches", str(args.batches)], env)
            m["repeat"] = repeat + 1
            record["measurements"].append(m)
            if b not in checks:
                checks[b] = measure(work, "check", b, common, env).get("result")
                if b == "litdata":
                    record["litdata_resume"] = measure(work, "resume", b, common, env).get("result")
            save(record, args.record, partial=True)
        record["load_after_repeat_" + str(repeat + 1)] = load()

    record["streams"] = checks
    got = {b: (c or {}).get("sha256") for b, c in checks.items()}
    keys = ("tokens", "documents", "sha256", "sha256_first_1M", "sha256_last_1M")
    record["streams_identical"] = (len({tuple((c or {}).get(k) for k in keys) for c in checks.values()}) == 1
                                   and None not in got.values()) if len(checks) > 1 else None  # None: nothing to compare
    record["code_size"] = code_size()
    record["summary"] = summarize(record)
    record["total_seconds"] = round(time.time() - started, 1)
    record["notes"] = [
        "The machine is shared (2 cores, other engineers' jobs): throughput and wall times move with the load "
        "average recorded before each measurement; RSS figures do not depend on it.",
        "max_rss_mb is GNU time's 'Maximum resident set size': the largest single process, not the sum over the "
        "litdata workers / datasets num_proc pool; tree_peak sums RSS, PSS and anonymous memory over the whole "
        "process tree, sampled every 0.2 s (it can miss spikes shorter than that).",
        "train-read RSS includes mapped file pages (reclaimable page cache, shared between processes); "
        "anonymous memory is the part that is the process's own.",
    ]
    save(record, args.record, partial=False)
    print(f"streams identical: {record['streams_identical']}")
    print(table(record))
    print(f"record: {args.record} ({record['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
