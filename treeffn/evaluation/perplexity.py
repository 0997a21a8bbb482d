"""Perplexity on packed token blocks, computed exactly the way training validates.

Training's ``val_loss`` (``CausalLMModule.validation_step``) is Hugging Face's mean loss of each
batch weighted by the tokens it predicts (``batch * (block_size - 1)``). Here every batch's
loss is multiplied by its predicted-token count, summed in float64 and divided by the total:
the same number, so ``treeffn eval`` reproduces the ``val_ppl`` of a run's ``result.json``.

Text sets (``texts=[...]`` of ``treeffn eval``):

* ``validation``: the run's own validation split, packed by ``TextDataModule`` with the run's
  data config. By default only the blocks training validated on (``trainer.limit_val_batches``).
* ``kjv``: the embedded King James Bible (out of domain for the embedded Shakespeare corpus).
* ``shakespeare``: the embedded corpus' held-out work (Hamlet).
* a path, folder or glob of .txt/.json/.jsonl/.parquet files (``text`` field / paragraphs).

Every set is tokenized the same way: documents without special tokens, each followed by the
end-of-text token, concatenated, cut into ``block_size`` blocks (the remainder dropped).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch

from treeffn.config import ConfigError

EMBEDDED_TEXTS = ("kjv", "shakespeare")


@dataclass
class PerplexityResult:
    name: str            # "validation", "kjv", or the path given
    loss: float          # mean negative log-likelihood per predicted token (nats)
    ppl: float
    tokens: int          # predicted tokens (blocks * (block_size - 1))
    blocks: int
    block_size: int
    description: str     # where the blocks came from

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------ the computation
@torch.no_grad()
def block_perplexity(model, blocks: torch.Tensor, batch_size: int, autocast_dtype=None) -> tuple[float, int]:
    """Token-weighted mean loss of ``model`` over ``blocks`` (rows of token ids) -> (loss, tokens)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start:start + batch_size].to(device)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        predicted = batch.shape[0] * (batch.shape[1] - 1)
        total += float(loss) * predicted
        count += predicted
    return total / count, count


def measure(name: str, model, blocks: torch.Tensor, batch_size: int, description: str,
            autocast_dtype=None) -> PerplexityResult:
    loss, tokens = block_perplexity(model, blocks, batch_size, autocast_dtype)
    return PerplexityResult(name=name, loss=loss, ppl=math.exp(min(loss, 50.0)), tokens=tokens,
                            blocks=len(blocks), block_size=int(blocks.shape[1]), description=description)


# ------------------------------------------------------------------------------ the run's validation split
def lightning_limited_batches(batches: int, limit: int | float) -> int:
    """How many validation batches Lightning runs for ``trainer.limit_val_batches=limit``.

    Mirrors ``lightning.pytorch.trainer.connectors.data_connector._parse_num_batches``: an int
    is a count, a float a fraction of the batches (rounded down).
    """
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit < 0:
        raise ConfigError(f"validation limit {limit!r} is not allowed; use an int (batches) or a float in [0, 1]")
    if isinstance(limit, int):
        return min(batches, limit)
    return int(batches * limit)


def validation_blocks(data_cfg: dict, seed: int, train_batch_size: int,
                      limit_batches: int | float | None) -> tuple[torch.Tensor, str]:
    """The run's packed validation blocks, cut to what training validated on.

    ``train_batch_size`` is the batch size training validated with: ``limit_batches`` counts
    batches of that size, so the same blocks are chosen whatever batch size eval uses.
    """
    from treeffn.data.datamodule import TextDataModule

    data = TextDataModule(data_cfg, seed=seed)
    data.setup()
    blocks = data.val_set
    batches = math.ceil(len(blocks) / train_batch_size)
    if limit_batches is not None:
        kept = lightning_limited_batches(batches, limit_batches)
        if kept == 0:
            raise ConfigError(f"validation limit {limit_batches!r} leaves no validation batches "
                              f"({batches} batches of {train_batch_size})")
        blocks = blocks[: kept * train_batch_size]
    source = data_cfg.get("source")
    where = f"{source}:{data_cfg.get('corpus') or data_cfg.get('path') or data_cfg.get('name')}"
    limit_note = "" if limit_batches in (None, 1.0) else f", limit {limit_batches!r} batches of {train_batch_size}"
    return blocks, f"validation split of {where} ({len(blocks)} of {len(data.val_set)} blocks{limit_note})"


# ------------------------------------------------------------------------------ other text sets
def read_text_set(spec: str) -> tuple[list[str], str]:
    """Documents of a text set named in ``texts=``: an embedded corpus or local files."""
    from treeffn.data.corpus import VALIDATION_TITLES, read_documents

    if spec == "kjv":
        return [d["text"] for d in read_documents("kjv")], "embedded King James Bible"
    if spec == "shakespeare":
        docs = [d["text"] for d in read_documents("shakespeare") if d["title"] in VALIDATION_TITLES]
        return docs, f"embedded Shakespeare, held-out work(s): {', '.join(VALIDATION_TITLES)}"
    from datasets import load_dataset

    from treeffn.data.sources import SUFFIX_BUILDERS, DataError, expand_paths

    try:
        files = expand_paths(spec, f"texts[{spec}]")
    except DataError as e:
        raise ConfigError(f"{e} (a text set is 'validation', {', '.join(map(repr, EMBEDDED_TEXTS))}, "
                          f"or a file, folder or glob)") from None
    builder = SUFFIX_BUILDERS[files[0].suffix.lower()]
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    ds = load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
    if "text" not in ds.column_names:
        raise ConfigError(f"texts[{spec}]: {files[0]} has no 'text' field; columns: {', '.join(ds.column_names)}")
    return [t for t in ds["text"] if t and t.strip()], f"{len(files)} file(s) at {spec}"


def text_blocks(docs: list[str], tokenizer, block_size: int, max_tokens: int | None) -> torch.Tensor:
    """Documents -> (blocks, block_size) token ids, the way TextDataModule packs (at most ``max_tokens``)."""
    import numpy as np

    from treeffn.data.datamodule import concat_documents, pack_blocks

    ids: list[list[int]] = []
    seen = 0
    for start in range(0, len(docs), 16):  # tokenize in small batches, stop once enough is there
        chunk = tokenizer(docs[start:start + 16], add_special_tokens=False)["input_ids"]
        ids += chunk
        seen += sum(len(x) + 1 for x in chunk)
        if max_tokens is not None and seen >= max_tokens:
            break
    stream = concat_documents(ids, tokenizer.eos_token_id)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    return torch.from_numpy(pack_blocks(np.asarray(stream), block_size).astype(np.int64))
