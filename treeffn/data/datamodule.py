"""LightningDataModule: tokenize once, pack into fixed blocks, cache on disk, serve batches.

Documents are tokenized, each followed by the end-of-text token, concatenated, and cut into
blocks of ``block_size`` tokens (the remainder is dropped). The packed splits are saved under
``<cache_dir>/packed/<key>`` where the key hashes everything that produced them (source files
and their sizes/mtimes, tokenizer, block size, format version), so a change to any of these
re-packs and nothing stale is ever reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from treeffn.data.sampler import ResumableBatchSampler, ShardedEvalBatches, limited_blocks
from treeffn.data.sources import load_source
from treeffn.data.tokenizer import load_tokenizer, tokenizer_fingerprint

PACK_FORMAT = 1


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
    def prepare(self) -> Path:
        """Build (or find) the packed cache; returns its folder. Safe to call repeatedly."""
        if self.cfg["source"] == "tokens":  # pre-tokenized streams: no datasets, no tokenization
            from treeffn.data.pretokenized import prepare_pretokenized

            return prepare_pretokenized(self.cfg, self.cache_dir, self.tokenizer, self.block_size)
        raw, description = load_source(self.cfg, self.cache_dir)
        key_src = f"{PACK_FORMAT}|{description}|{tokenizer_fingerprint(self.tokenizer)}|{self.block_size}"
        key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
        out = self.cache_dir / "packed" / key
        if (out / "stats.json").exists():
            return out
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        counts = np.zeros(len(tok), dtype=np.int64)
        stats = {"key_source": key_src, "block_size": self.block_size}
        for split in ("train", "validation"):
            tokenized = raw[split].map(
                lambda b: {"ids": tok(b["text"], add_special_tokens=False)["input_ids"]},
                batched=True, remove_columns=["text"], desc=f"tokenize {split}", load_from_cache_file=False,
            )
            flat = concat_documents(tokenized["ids"], eos)
            n_tokens = len(flat)
            if split == "train":
                counts += np.bincount(flat, minlength=len(tok))
            else:
                stats["unigram_ppl"] = unigram_perplexity(counts, flat)
            blocks = pack_blocks(flat, self.block_size)
            if len(blocks) == 0:
                from treeffn.data.sources import DataError

                raise DataError(f"the {split} split has {n_tokens} tokens, fewer than one block of "
                                f"data.block_size={self.block_size}; give more text or a smaller block size")
            tmp.mkdir(parents=True, exist_ok=True)
            np.save(tmp / f"{split}.npy", blocks.astype(np.int32 if len(tok) < 2**31 else np.int64))
            stats[f"{split}_tokens"] = int(n_tokens)
            stats[f"{split}_blocks"] = int(blocks.shape[0])
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
        try:
            tmp.rename(out)  # atomic: a concurrent job that lost the race just uses the winner's copy
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        folder = self.prepare()
        self.stats = json.loads((folder / "stats.json").read_text())
        self.train_set = torch.from_numpy(np.load(folder / "train.npy").astype(np.int64))
        self.val_set = torch.from_numpy(np.load(folder / "validation.npy").astype(np.int64))

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
            from treeffn.data.sources import DataError

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
        return DataLoader(self.train_set, batch_sampler=sampler, num_workers=int(self.cfg.get("num_workers", 0)))

    def val_dataloader(self) -> DataLoader:
        rank, world = self._ranks()
        kept = limited_blocks(len(self.val_set), self.batch_size, self.val_limit)
        sampler = ShardedEvalBatches(kept, self.batch_size, rank=rank, world_size=world)
        return DataLoader(self.val_set, batch_sampler=sampler, num_workers=int(self.cfg.get("num_workers", 0)))

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
