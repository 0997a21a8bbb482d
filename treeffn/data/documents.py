"""Documents, streamed: every corpus treeffn reads is an iterator of strings, one per document.

Nothing here holds a whole corpus in memory. Local files are read the way their kind suggests:

    .txt / .text      one document per blank-line-separated paragraph, read line by line
    .jsonl / .json    one JSON object a line with a text field (a .json file that starts with
                      ``[`` is read as one array of objects)
    .parquet          record batches of the text column (pyarrow)

Hub datasets stream through ``datasets.load_dataset(..., streaming=True)``; the embedded corpus
is decompressed in memory (it is a few MB). Bad input fails with one line naming the file, the
line and the field (:class:`treeffn.data.sources.DataError`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from treeffn.data.sources import SUFFIX_BUILDERS, DataError


def iter_file_documents(path: Path, text_field: str, field: str = "data.path") -> Iterator[str]:
    """The documents of one local file, in file order."""
    kind = SUFFIX_BUILDERS[path.suffix.lower()]
    if kind == "text":
        yield from _paragraphs(path, field)
    elif kind == "json":
        yield from _json_documents(path, text_field, field)
    else:
        yield from _parquet_documents(path, text_field, field)


def _open_text(path: Path, field: str):
    try:
        return open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{field}: {path} cannot be read ({e.strerror or type(e).__name__})") from None


def _paragraphs(path: Path, field: str) -> Iterator[str]:
    # A paragraph ends at an empty line. Lines are read one at a time, so memory is bounded by
    # the longest paragraph (a 50 MB single-line file is one 50 MB string, never more).
    lines: list[str] = []
    with _open_text(path, field) as f:
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).rstrip("\n")
                lines = []
    if lines:
        yield "".join(lines).rstrip("\n")


def _text_of(row, text_field: str, where: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with a {text_field!r} field, got {type(row).__name__}")
    if text_field not in row:
        keys = ", ".join(map(str, list(row)[:8])) or "none"
        raise DataError(f"{where} has no {text_field!r} field (data.text_field); its fields: {keys}")
    text = row[text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, not text")
    return text


def _json_documents(path: Path, text_field: str, field: str) -> Iterator[str]:
    with _open_text(path, field) as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):  # one JSON array: read whole (JSON lines is the streaming form)
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{field}: {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
            for i, row in enumerate(rows):
                yield _text_of(row, text_field, f"{field}: {path} item {i}")
            return
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{field}: {path} line {number} is not valid JSON ({e.msg}); "
                                f"JSON lines need one object a line") from None
            yield _text_of(row, text_field, f"{field}: {path} line {number}")


def _parquet_documents(path: Path, text_field: str, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...: the user needs one line
        raise DataError(f"{field}: {path} is not a readable parquet file ({str(e).splitlines()[0]})") from None
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{field}: {path} has no {text_field!r} column (data.text_field); "
                        f"columns: {', '.join(pf.schema_arrow.names)}")
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            yield text or ""


def iter_hub_documents(name: str, config, split: str, text_field: str, revision=None) -> Iterator[str]:
    """A hub dataset split, streamed (nothing is downloaded whole)."""
    from datasets import load_dataset

    try:
        stream = load_dataset(name, config, split=split, streaming=True, revision=revision)
        first = True
        for row in stream:
            if first and text_field not in row:
                raise DataError(f"data.text_field={text_field!r} is not a field of {name}/{split}; "
                                f"fields: {', '.join(row)}")
            first = False
            yield row[text_field] or ""
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds here; the user needs one line
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"could not stream hub dataset data.name={name!r} (config {config!r}, split {split!r}): "
                        f"{first_line} — hub datasets need the network; offline, use data=embedded, "
                        f"data=files or data=tokens") from None


def split_long(text: str, max_chars: int) -> Iterator[str]:
    """A document in pieces of at most about ``max_chars`` characters, cut only where a space
    follows a non-space character. Byte-level BPE tokenizers (the embedded one, GPT-2's) split
    words at exactly such places before merging, so the pieces tokenize to the same ids as the
    whole; a document with no such place in reach is cut at ``max_chars`` (rare: a 1 MB "word")."""
    start = 0
    while len(text) - start > max_chars:
        cut = start + max_chars
        while cut > start and not (text[cut] == " " and not text[cut - 1].isspace()):
            cut -= 1
        if cut == start:
            cut = start + max_chars
        yield text[start:cut]
        start = cut
    yield text[start:]
