"""Prepare a corpus once: stream documents, tokenize in parallel, write token shards.

    treeffn prepare data=hub data.name=HuggingFaceFW/fineweb-edu data.config=sample-10BT \\
        data.max_train_tokens=3000000000 data.max_val_tokens=10000000

``treeffn train`` runs the same step first when the prepared copy is missing, so preparing
ahead is optional (it lets a login node or one job do it before a sweep starts).

What it guarantees:

* **Bounded memory.** Documents stream in (:mod:`treeffn.data.documents`), are tokenized a
  batch at a time by the Rust tokenizer (on all cores) and appended to shard files; nothing
  holds the corpus. Documents longer than ``PIECE_CHARS`` are tokenized in pieces cut at word
  boundaries (exact for byte-level BPE tokenizers).
* **Token budgets.** ``data.max_train_tokens`` / ``data.max_val_tokens`` stop the streams;
  a budget the source cannot fill is refused (one line), since the run would train on less
  data than its config says.
* **Once, under concurrency.** The prepared folder's name hashes everything that made it (source,
  tokenizer, budgets), so the same settings always find the same copy. Preparation holds an
  exclusive lock on ``<name>.lock`` beside it: of 8 jobs that start together on a shared file
  system, one prepares and the others wait, then reuse its copy. Shards are written to a
  temporary folder that is renamed into place with ``meta.json`` in it, so a crash leaves
  nothing that looks complete; the next run removes the leftover and starts again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from treeffn.data.documents import iter_file_documents, iter_hub_documents, split_long
from treeffn.data.shards import META_FILE, SHARD_FORMAT, SPLITS, ShardWriter, TokenStream, read_meta, token_dtype
from treeffn.data.sources import DataError, expand_paths, files_fingerprint
from treeffn.data.tokenizer import tokenizer_fingerprint

PIECE_CHARS = 1 << 20          # longer documents are tokenized in pieces of about this size
BATCH_CHARS = 4 << 20          # characters handed to the tokenizer per call
DEFAULT_SHARD_TOKENS = 1 << 27  # 134M tokens: 256 MB a shard in uint16


# ------------------------------------------------------------------ what a source is
class Source:
    """A corpus as two document streams plus everything that identifies it."""

    def __init__(self, description: dict, train: callable, validation: callable, holdout_tokens: int | None = None,
                 sizes: dict | None = None):
        self.description = description      # goes into the folder's key and meta.json
        self.train, self.validation = train, validation  # callables returning fresh iterators
        self.holdout_tokens = holdout_tokens  # validation taken from the head of the train stream
        self.sizes = sizes or {}  # split -> its text's size in bytes, where known (for the ETA)


def describe_source(data: dict) -> Source:
    kind = data["source"]
    if kind == "embedded":
        from treeffn.data.corpus import CORPORA, EMBEDDED_DIR, VALIDATION_TITLES, read_documents

        corpus = data.get("corpus", "shakespeare")
        blob = (EMBEDDED_DIR / CORPORA[corpus]).read_bytes()

        def docs(held_out: bool):
            return lambda: (d["text"] for d in read_documents(corpus) if (d["title"] in VALIDATION_TITLES) == held_out)

        sizes = {split: sum(len(d.encode()) for d in docs(held)()) for split, held in (("train", False),
                                                                                          ("validation", True))}
        return Source({"kind": "embedded", "corpus": corpus, "sha256": hashlib.sha256(blob).hexdigest()[:16]},
                      docs(False), docs(True), sizes=sizes)
    if kind == "files":
        field = data.get("text_field", "text")
        train_files = expand_paths(data["path"], "data.path")
        size = sum(f.stat().st_size for f in train_files)

        def stream(files, label):
            return lambda: (d for f in files for d in iter_file_documents(f, field, label))

        if data.get("val_path"):
            val_files = expand_paths(data["val_path"], "data.val_path")
            return Source({"kind": "files", "train": files_fingerprint(train_files), "train_files": len(train_files),
                           "validation": files_fingerprint(val_files), "text_field": field},
                          stream(train_files, "data.path"), stream(val_files, "data.val_path"),
                          sizes={"train": size, "validation": sum(f.stat().st_size for f in val_files)})
        fraction = float(data.get("val_fraction", 0.05))
        everything = stream(train_files, "data.path")
        n_docs = sum(1 for _ in everything())  # one cheap pass: the split is by document count
        if n_docs < 2:
            raise DataError(f"data.path={data['path']} holds {n_docs} document(s); give data.val_path for validation")
        n_val = min(n_docs - 1, max(1, int(n_docs * fraction + 0.5)))
        first = n_docs - n_val
        return Source({"kind": "files", "train": files_fingerprint(train_files), "train_files": len(train_files),
                       "val_fraction": fraction, "text_field": field},
                      lambda: (d for i, d in enumerate(everything()) if i < first),
                      lambda: (d for i, d in enumerate(everything()) if i >= first),
                      sizes={"train": size * (1 - fraction), "validation": size * fraction})
    if kind == "hub":
        name, config, revision = data.get("name"), data.get("config"), data.get("revision")
        if name in (None, "", "???"):
            raise DataError("data.name is missing; data=hub needs data.name=<hub dataset id>")
        field, train_split, val_split = data.get("text_field", "text"), data["train_split"], data.get("val_split")
        desc = {"kind": "hub", "name": name, "config": config, "revision": revision, "train_split": train_split,
                "val_split": val_split, "text_field": field}
        train = lambda: iter_hub_documents(name, config, train_split, field, revision)  # noqa: E731
        if val_split:
            return Source(desc, train, lambda: iter_hub_documents(name, config, val_split, field, revision))
        # No validation split (FineWeb-Edu has none): the first documents of the train stream,
        # max_val_tokens of them, are held out and never trained on.
        if not data.get("max_val_tokens"):
            raise DataError(f"data.val_split is null for {name}: set data.max_val_tokens=<n> to hold out the first "
                            f"n tokens of documents of the {train_split!r} split for validation")
        return Source(desc, train, None, holdout_tokens=int(data["max_val_tokens"]))
    raise DataError(f"data.source={kind!r} cannot be prepared from text; choose one of: embedded, files, hub")


def budgets(data: dict) -> dict:
    return {"train": data.get("max_train_tokens"), "validation": data.get("max_val_tokens")}


def prepared_name(data: dict, source: Source, tokenizer) -> str:
    key_parts = {"format": SHARD_FORMAT, "source": source.description, "tokenizer": tokenizer_fingerprint(tokenizer),
                 "budgets": budgets(data), "shard_tokens": int(data.get("shard_tokens") or DEFAULT_SHARD_TOKENS)}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:16]
    d = source.description
    label = {"embedded": lambda: f"embedded-{d['corpus']}", "files": lambda: "files",
             "hub": lambda: f"hub-{d['name']}-{d['config'] or ''}"}[d["kind"]]()
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', label).strip('_')}-{key}"


# ------------------------------------------------------------------ tokenizing a stream
def token_batches(docs: Iterable[str], tokenizer) -> Iterator[tuple[np.ndarray, int, int]]:
    """(token ids with end-of-text after each document, documents, characters) per batch."""
    backend, eos = tokenizer.backend_tokenizer, tokenizer.eos_token_id
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no offsets: faster
    pending: list[str] = []   # texts (whole documents or pieces) for one tokenizer call
    ends: list[bool] = []     # whether each text ends a document (gets the end-of-text token)
    size = 0

    def flush():
        encodings = encode(pending, add_special_tokens=False)
        ids = []
        for enc, end in zip(encodings, ends):
            ids.append(np.asarray(enc.ids, dtype=np.int64))
            if end:
                ids.append(np.array([eos], dtype=np.int64))
        return np.concatenate(ids) if ids else np.empty(0, np.int64), sum(ends), size

    for doc in docs:
        pieces = list(split_long(doc, PIECE_CHARS)) if len(doc) > PIECE_CHARS else [doc]
        for i, piece in enumerate(pieces):
            pending.append(piece)
            ends.append(i == len(pieces) - 1)
            size += len(piece)
            if size >= BATCH_CHARS:
                yield flush()
                pending, ends, size = [], [], 0
    if pending:
        yield flush()


class Progress:
    """A tqdm bar in tokens with tokens/s and an ETA: its total is the budget, or, when there is
    none, an estimate from the text's size in bytes and the tokens per byte seen so far."""

    def __init__(self, split: str, budget: int | None, text_bytes: float | None):
        from tqdm.auto import tqdm

        self.budget, self.text_bytes, self.bytes_seen = budget, text_bytes, 0
        self.bar = tqdm(total=budget, unit="tok", unit_scale=True, desc=f"prepare {split}", mininterval=1.0,
                        file=sys.stderr, dynamic_ncols=True)

    def update(self, tokens: int, text_bytes: int) -> None:
        self.bytes_seen += text_bytes
        if self.budget is None and self.text_bytes and self.bytes_seen:
            estimate = (self.bar.n + tokens) * self.text_bytes / self.bytes_seen
            self.bar.total = max(int(estimate), self.bar.n + tokens)
        self.bar.update(tokens)

    def close(self) -> None:
        self.bar.close()


def write_split(folder: Path, split: str, docs: Iterable[str], tokenizer, budget: int | None, shard_tokens: int,
                vocab: int, counts: np.ndarray | None, text_bytes: float | None = None) -> dict:
    """Tokenize ``docs`` into ``folder/split`` until the source or the budget ends."""
    writer = ShardWriter(folder / split, token_dtype(vocab), shard_tokens)
    progress = Progress(split, budget, text_bytes)
    documents = 0
    try:
        for ids, n_docs, n_bytes in token_batches(docs, tokenizer):
            if budget is not None:
                ids = ids[: budget - writer.tokens]
            writer.write(ids)
            if counts is not None:
                counts += np.bincount(ids, minlength=vocab)[:vocab]
            documents += n_docs
            progress.update(len(ids), n_bytes)
            if budget is not None and writer.tokens >= budget:
                break
    finally:
        progress.close()
        shards = writer.close()
    return {"tokens": writer.tokens, "documents": documents, "shards": shards, "budget_reached": budget is not None
            and writer.tokens >= budget}


def split_holdout(docs: Iterator[str], tokenizer, holdout_tokens: int) -> tuple[list[str], Iterator[str]]:
    """The head of a document stream that holds ``holdout_tokens`` tokens, and the rest."""
    held, seen = [], 0
    for doc in docs:
        held.append(doc)
        seen += len(tokenizer.backend_tokenizer.encode(doc, add_special_tokens=False).ids) + 1
        if seen >= holdout_tokens:
            break
    return held, docs


def build(folder: Path, data: dict, source: Source, tokenizer) -> dict:
    vocab = len(tokenizer)
    shard_tokens = int(data.get("shard_tokens") or DEFAULT_SHARD_TOKENS)
    limits = budgets(data)
    started = time.time()
    counts = np.zeros(vocab, dtype=np.int64)
    splits = {}
    if source.holdout_tokens:
        train_docs = source.train()
        held, rest = split_holdout(train_docs, tokenizer, source.holdout_tokens)
        val_docs, train_docs = iter(held), rest
    else:
        train_docs, val_docs = source.train(), source.validation()
    splits["train"] = write_split(folder, "train", train_docs, tokenizer, limits["train"], shard_tokens, vocab, counts,
                                  source.sizes.get("train"))
    splits["validation"] = write_split(folder, "validation", val_docs, tokenizer, limits["validation"], shard_tokens,
                                       vocab, None, source.sizes.get("validation"))
    for split, field in (("train", "data.max_train_tokens"), ("validation", "data.max_val_tokens")):
        info, budget = splits[split], limits[split]
        if budget is not None and info["tokens"] < budget:
            raise DataError(f"{field}={budget} is larger than the source: its {split} split has "
                            f"{info['tokens']} tokens ({info['documents']} documents); lower {field} or set it to null")
        if info["tokens"] == 0:
            raise DataError(f"the {split} split of the source holds no text")
    meta = {
        "format": SHARD_FORMAT,
        "dtype": token_dtype(vocab).str,
        "vocab_size": vocab,
        "eos_id": tokenizer.eos_token_id,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenizer_name": getattr(tokenizer, "name_or_path", "") or "embedded",
        "source": source.description,
        "budgets": limits,
        "shard_tokens": shard_tokens,
        "splits": splits,
        "unigram_ppl": unigram_perplexity_of(counts, TokenStream.from_meta(folder, {"dtype": token_dtype(vocab).str,
                                                                                   "splits": splits}, "validation")),
        "prepared": {"seconds": round(time.time() - started, 2), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "host": socket.gethostname(), "pid": os.getpid(),
                     "tokens_per_s": round((splits["train"]["tokens"] + splits["validation"]["tokens"])
                                           / max(time.time() - started, 1e-9))},
    }
    return meta


def unigram_perplexity_of(train_counts: np.ndarray, stream: TokenStream) -> float:
    """Perplexity of a stream under the add-one-smoothed unigram model of the training counts."""
    log_probs = np.log((train_counts + 1) / (train_counts.sum() + len(train_counts)))
    total, n = 0.0, 0
    for chunk in stream.chunks():
        total += float(log_probs[chunk.astype(np.int64)].sum())
        n += chunk.size
    return float(math.exp(-total / max(n, 1)))


# ------------------------------------------------------------------ once, under a lock
@contextlib.contextmanager
def exclusive(lock_path: Path, what: str):
    """An exclusive flock on ``lock_path``; says once that it waits when another holder has it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that prepares {what} ...", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def is_complete(folder: Path) -> bool:
    return (folder / META_FILE).is_file()


def prepare_corpus(data: dict, tokenizer, cache_dir: Path) -> tuple[Path, bool]:
    """The prepared folder of ``data`` (built now if missing) and whether this call built it."""
    source = describe_source(data)
    root = Path(cache_dir) / "prepared"
    name = prepared_name(data, source, tokenizer)
    final = root / name
    if is_complete(final):
        return final, False
    with exclusive(root / f"{name}.lock", f"{name} in {root}"):
        if is_complete(final):  # another job finished it while we waited
            return final, False
        for leftover in root.glob(f".{name}.tmp-*"):  # a crashed preparation (we hold the lock)
            shutil.rmtree(leftover, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)      # a folder without meta.json is not complete
        tmp = root / f".{name}.tmp-{socket.gethostname()}-{os.getpid()}"
        try:
            meta = build(tmp, data, source, tokenizer)
            with open(tmp / META_FILE, "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    meta = read_meta(final)
    info = meta["splits"]
    print(f"prepared {final}: {info['train']['tokens']:,} training and {info['validation']['tokens']:,} validation "
          f"tokens in {meta['prepared']['seconds']:.1f} s", file=sys.stderr, flush=True)
    return final, True


def check_matches_tokenizer(folder: Path, meta: dict, tokenizer) -> None:
    """Refuse prepared shards made with another tokenizer (their ids would mean other text)."""
    fp = tokenizer_fingerprint(tokenizer)
    if meta.get("tokenizer") != fp or int(meta.get("vocab_size", -1)) != len(tokenizer):
        raise DataError(f"{folder / META_FILE}: the shards were made with tokenizer {meta.get('tokenizer_name')!r} "
                        f"({meta.get('vocab_size')} entries, fingerprint {meta.get('tokenizer')}); data.tokenizer has "
                        f"{len(tokenizer)} entries (fingerprint {fp}): use the tokenizer the shards were made with")


def open_split(folder: Path, meta: dict, split: str) -> TokenStream:
    if split not in SPLITS or split not in meta.get("splits", {}):
        raise DataError(f"{folder / META_FILE} has no {split!r} split")
    stream = TokenStream.from_meta(folder, meta, split)
    stream.check_files()
    return stream
