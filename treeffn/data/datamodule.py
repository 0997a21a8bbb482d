"""LightningDataModule: a prepared, memory-mapped corpus served as fixed blocks.

Every text source (embedded, files, hub) is prepared once into token shards
(:mod:`treeffn.data.prepare`: streamed, tokenized in parallel, cached by what made it);
``data=tokens`` maps token files or a prepared folder directly (:mod:`treeffn.data.pretokenized`).
Training reads blocks of ``block_size`` tokens straight from the mapped shards
(:class:`treeffn.data.shards.TokenBlocks`): no split is ever copied into memory, on any rank.
Block i is tokens [i*B, (i+1)*B) of a split's stream (every document followed by the
end-of-text token; the remainder is dropped), as the earlier in-memory packing cut them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from treeffn.data.sampler import ResumableBatchSampler, ShardedEvalBatches, limited_blocks
from treeffn.data.shards import TokenBlocks, collate_blocks
from treeffn.data.sources import DataError
from treeffn.data.tokenizer import load_tokenizer


def concat_documents(token_lists: list[list[int]], eos_id: int) -> np.ndarray:
    """One token stream: every document followed by the end-of-text token."""
    total = sum(len(ids) + 1 for ids in token_lists)
    return np.fromiter((t for ids in token_lists for t in (*ids, eos_id)), dtype=np.int64, count=total)


def pack_blocks(stream: np.ndarray, block_size: int) -> np.ndarray:
    """Cut a token stream into full (blocks, block_size) rows; the remainder is dropped."""
    usable = len(stream) - len(stream) % block_size
    return stream[:usable].reshape(-1, block_size)


class TextDataModule(L.LightningDataModule):
    def __init__(self, data_cfg: dict, seed: int = 0):
        super().__init__()
        self.cfg = data_cfg
        self.seed = seed
        self.cache_dir = Path(os.path.expanduser(str(data_cfg["cache_dir"])))
        self.tokenizer = load_tokenizer(data_cfg["tokenizer"])
        self.block_size = int(data_cfg["block_size"])
        self.batch_size = int(data_cfg["batch_size"])
        self.stats: dict = {}
        self.train_set = self.val_set = None
        # trainer.limit_val_batches (batches of data.batch_size, the same on any device count);
        # None = the whole validation split. The Trainer itself is given no limit.
        self.val_limit: int | float | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def special_ids(self) -> dict:
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return {"pad_id": tok.pad_token_id, "bos_id": bos, "eos_id": tok.eos_token_id}

    # ------------------------------------------------------------------ preparation
    def prepare(self) -> Path | None:
        """Prepare the corpus if it is not yet (text sources); returns the prepared folder, or
        None for ``data=tokens`` files, which need no preparation. Safe to call repeatedly and
        from many processes at once."""
        if self.cfg["source"] == "tokens":
            return None
        from treeffn.data.prepare import prepare_corpus

        folder, _ = prepare_corpus(self.cfg, self.tokenizer, self.cache_dir)
        return folder

    def open_streams(self):
        """(train stream, validation stream, stats), memory-mapped, budgets applied."""
        if self.cfg["source"] == "tokens":
            from treeffn.data.pretokenized import open_token_streams

            train, val, stats = open_token_streams(self.cfg, self.cache_dir, self.tokenizer)
        else:
            from treeffn.data.prepare import check_matches_tokenizer, open_split
            from treeffn.data.shards import read_meta

            folder = self.prepare()
            meta = read_meta(folder)
            check_matches_tokenizer(folder, meta, self.tokenizer)
            train, val = open_split(folder, meta, "train"), open_split(folder, meta, "validation")
            stats = {"unigram_ppl": meta.get("unigram_ppl"), "prepared": str(folder)}
        for stream, key in ((train, "max_train_tokens"), (val, "max_val_tokens")):
            budget = self.cfg.get(key)
            if budget is not None and budget < len(stream):
                stream = stream.head(int(budget))
            if key == "max_train_tokens":
                train = stream
            else:
                val = stream
        return train, val, stats

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val, stats = self.open_streams()
        self.train_set, self.val_set = TokenBlocks(train, self.block_size), TokenBlocks(val, self.block_size)
        for split, blocks, stream in (("train", self.train_set, train), ("validation", self.val_set, val)):
            if len(blocks) == 0:
                raise DataError(f"the {split} split has {len(stream)} tokens, fewer than one block of "
                                f"data.block_size={self.block_size}; give more text or a smaller block size")
        self.stats = {**stats, "block_size": self.block_size, "train_tokens": len(train), "validation_tokens": len(val),
                      "train_blocks": len(self.train_set), "validation_blocks": len(self.val_set)}

    # ------------------------------------------------------------------ loaders
    # Batches are sharded by rank here (treeffn/data/sampler.py); the Trainer is built with
    # use_distributed_sampler=False so Lightning leaves these loaders as they are.
    def _ranks(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def global_batch_blocks(self, accumulate: int, world_size: int) -> int:
        """Blocks per optimizer step on all ranks; a DataError when the split cannot fill one."""
        blocks = self.batch_size * accumulate * world_size
        if len(self.train_set) < blocks:
            raise DataError(f"the training split has {len(self.train_set)} blocks, fewer than one global batch of "
                            f"{blocks} (data.batch_size={self.batch_size} x {accumulate} accumulation x "
                            f"{world_size} ranks); give more text or a smaller batch")
        return blocks

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = self._ranks()
        accumulate = trainer.accumulate_grad_batches if trainer else 1
        self.global_batch_blocks(accumulate, world)
        sampler = ResumableBatchSampler(
            len(self.train_set), self.batch_size, self.seed, start_step=trainer.global_step if trainer else 0,
            accumulate=accumulate, rank=rank, world_size=world,
        )
        return DataLoader(self.train_set, batch_sampler=sampler, collate_fn=collate_blocks,
                          num_workers=int(self.cfg.get("num_workers", 0)), pin_memory=self._to_cuda())

    def _to_cuda(self) -> bool:
        """Whether batches go to a GPU: then they are pinned, because a copy from pageable memory
        makes the host wait until the GPU has finished all queued work (a sync every step)."""
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def val_dataloader(self) -> DataLoader:
        rank, world = self._ranks()
        kept = limited_blocks(len(self.val_set), self.batch_size, self.val_limit)
        sampler = ShardedEvalBatches(kept, self.batch_size, rank=rank, world_size=world)
        return DataLoader(self.val_set, batch_sampler=sampler, collate_fn=collate_blocks,
                          num_workers=int(self.cfg.get("num_workers", 0)), pin_memory=self._to_cuda())

    # The global batch in blocks travels in checkpoints: resuming with another one would put
    # the data position (global_step x blocks) and the token count off (see check_resume_batch).
    def state_dict(self) -> dict:
        trainer = getattr(self, "trainer", None)
        if trainer is None or self.train_set is None:
            return {}
        return {"global_batch_blocks": self.batch_size * trainer.accumulate_grad_batches * trainer.world_size,
                "block_size": self.block_size}

    def load_state_dict(self, state_dict: dict) -> None:
        pass  # checked before training starts (treeffn.training.distributed.check_resume_batch)


def unigram_perplexity(train_counts: np.ndarray, tokens: np.ndarray) -> float:
    """Perplexity of ``tokens`` under the add-one-smoothed unigram distribution of the training text."""
    probs = (train_counts + 1) / (train_counts.sum() + len(train_counts))
    return float(math.exp(-np.log(probs[tokens]).mean()))
