"""Tokenizers: the embedded byte-level BPE, or any Hugging Face tokenizer name or local dir."""

from __future__ import annotations

import hashlib
from pathlib import Path

from treeffn.data.sources import DataError, check_inputs


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if spec == "embedded":
        from treeffn.data.corpus import EMBEDDED_TOKENIZER

        # Built from the tokenizer file directly: in transformers 5.x GPT2TokenizerFast(vocab_file=,
        # merges_file=) silently yields an empty tokenizer.
        return PreTrainedTokenizerFast(
            tokenizer_file=str(EMBEDDED_TOKENIZER),
            bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>",
        )
    path = Path(spec).expanduser()
    check_inputs({"tokenizer": spec})  # a folder without tokenizer files: one line
    try:
        tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else spec)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data.tokenizer={spec!r} could not be loaded: {first}") from None
    if tok.eos_token_id is None:
        raise DataError(f"data.tokenizer={spec!r} has no end-of-text token; treeffn separates documents with it")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_fingerprint(tok) -> str:
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]
