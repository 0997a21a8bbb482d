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
