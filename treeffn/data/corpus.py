"""The embedded default corpus: public-domain English text that ships inside the package.

Shakespeare's 42 works (modern spelling) are the language-modelling corpus: every work but the
validation ones trains, and the validation split is whole works the model never trains on. The
King James Bible is a second, out-of-domain text for evaluation. Sources and licences: NOTICE.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

EMBEDDED_DIR = Path(__file__).parent / "embedded"
EMBEDDED_TOKENIZER = EMBEDDED_DIR / "tokenizer.json"

# Held-out works: a different document than anything in training.
VALIDATION_TITLES = ("hamlet",)

CORPORA = {"shakespeare": "shakespeare.jsonl.xz", "kjv": "kjv.jsonl.xz"}


def read_documents(corpus: str = "shakespeare") -> list[dict]:
    """All documents of an embedded corpus as ``{"title", "text"}`` dicts."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown embedded corpus {corpus!r}; allowed: {', '.join(CORPORA)}")
    raw = lzma.decompress((EMBEDDED_DIR / CORPORA[corpus]).read_bytes()).decode("utf-8")
    return [json.loads(line) for line in raw.splitlines() if line]


def materialize_split(corpus: str, split: str, out_dir: Path) -> Path:
    """Write one split as a JSONL file (one document a line) and return its path.

    ``datasets`` then reads it like any user file, so the embedded default goes through the
    same pipeline as ``data=files``.
    """
    docs = read_documents(corpus)
    if corpus == "shakespeare":
        held_out = [d for d in docs if d["title"] in VALIDATION_TITLES]
        docs = held_out if split == "validation" else [d for d in docs if d["title"] not in VALIDATION_TITLES]
    elif split != "validation":
        raise ValueError(f"embedded corpus {corpus!r} is for evaluation only (validation split)")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{corpus}-{split}.jsonl"
    payload = "".join(json.dumps({"text": d["text"]}, ensure_ascii=False) + "\n" for d in docs)
    if not path.exists() or path.read_text(encoding="utf-8") != payload:
        from treeffn.results.record import write_text_atomic

        write_text_atomic(path, payload)  # sweep jobs may fill one cache at the same time
    return path
