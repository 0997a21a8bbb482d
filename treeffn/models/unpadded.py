"""Attention for full, unpadded blocks: SDPA's causal kernel with no mask to check.

For SDPA, transformers builds no mask when the padding mask is all ones and lets SDPA apply
causality itself. Finding out reads the mask on the host (`masking_utils._ignore_causal_mask_sdpa`),
and OPT in transformers up to at least 5.17 always passes an all-ones mask: one host
synchronisation in every forward pass of every training step, found with CUDA's sync debug
mode on an H200 (results/h200_train_speed/call1_speed/syncs_tree.json).

Training and validation batches are whole blocks of `block_size` tokens with no padding, so the
answer is known: inside `unpadded_blocks(model)` the model's attention implementation is the SDPA
function under a name of its own. transformers then skips mask creation for it (a name with no
mask function gets no mask) and SDPA runs with `is_causal=True`, which is what it runs after
the check anyway. Outside the block the model is unchanged (exports, evaluation and generation,
where inputs may be padded, see "sdpa").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

UNPADDED_SDPA = "treeffn_sdpa_unpadded"


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if UNPADDED_SDPA not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(UNPADDED_SDPA, ALL_ATTENTION_FUNCTIONS["sdpa"])


@contextmanager
def unpadded_blocks(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` (a transformers model using SDPA) on unpadded causal blocks without the
    host-side mask check; any other attention implementation is left as it is."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    _register()
    config._attn_implementation = UNPADDED_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
