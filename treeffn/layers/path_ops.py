"""The two gathered-row products of the path-only (``gather``) forms of the tree layers.

Both keep the float32/float64 path exactly as it was (``bmm`` on gathered rows, and
``F.embedding_bag``: the fastest measured CPU inference path). For bf16/fp16 they compute in
float32: ``embedding_bag`` sums its bag in the table's dtype (4-6x the error of the masked path,
measured on an H200) and its per-sample-weight backward has no bf16 CUDA kernel, so training
with ``tree.impl=gather`` in bf16 failed there. Half-precision results come back in float32;
the caller casts the layer output back to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FULL_PRECISION = (torch.float32, torch.float64)
# The path-only forms gather rows for a chunk of tokens at a time; a chunk holds at most this
# many gathered elements (every tree layer family chunks by it).
GATHER_CHUNK_ELEMENTS = 1 << 24


def row_dots(table: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(T, K) dot products table[rows[t, k]] . x[t] (float32 for half-precision inputs)."""
    w = table[rows]  # (T, K, d)
    if w.dtype not in FULL_PRECISION or x.dtype not in FULL_PRECISION:
        w, x = w.float(), x.float()
    return torch.bmm(w, x.unsqueeze(2)).squeeze(2)


def weighted_rows(table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(T, d): y[t] = sum over e of weights[t, e] * table[rows[t, e]]; rows and weights (T, E)."""
    if table.dtype in FULL_PRECISION and weights.dtype == table.dtype:
        return F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")
    return torch.bmm(weights.float().unsqueeze(1), table[rows].float()).squeeze(1)


def gather_chunk_tokens(per_token_elements: int) -> int:
    """Tokens per chunk so that one chunk's gathered rows stay within GATHER_CHUNK_ELEMENTS."""
    return max(1, GATHER_CHUNK_ELEMENTS // max(1, per_token_elements))
