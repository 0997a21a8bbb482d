"""``trainer.compile=true``: torch.compile for training, one decoder layer at a time.

Regional compilation: each decoder layer (attention, norms and its FFN, dense or tree) is
compiled in place (``nn.Module.compile``), not the whole model. The layers share one piece of
code, so torch.compile traces it once and reuses the result for every layer: compile time does
not grow with depth. The parameter names (and so checkpoints, FSDP units, the hf/ export) stay
what they were. Embeddings, the LM head and the loss run eagerly.

What it buys for a tree layer: its masked training path (treeffn/layers/tree_ffn.py) is written
with element-wise operations around two GEMMs, so the routing, the path mask, the activation and
the routing statistics fuse into a few kernels instead of one pass over the (tokens x nodes)
matrix each. Under compilation ``tree.impl=auto`` keeps to that masked path: the Triton
kernels (``tree.impl=triton``) are not traced into the graph and run between compiled regions.
"""

from __future__ import annotations

from torch import nn


def compile_decoder_layers(model: nn.Module) -> int:
    """Compile every decoder layer of ``model`` in place; returns how many."""
    from treeffn.models.families import find_decoder_layers

    _, layers = find_decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)
