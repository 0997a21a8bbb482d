"""Replacing the MLP blocks of Hugging Face decoder layers with other feed-forward modules.

Where each family keeps its MLP, and how ours is put there so that norms, dropout and
residuals stay exactly as the stock model has them, is in treeffn/models/families.py (OPT:
the FFN goes into ``fc1``; GPT-2: into ``mlp.c_fc``; Llama: it replaces ``mlp``).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from treeffn.layers import DENSE_LAYER_TYPES, TREE_LAYER_TYPES
from treeffn.models.families import Family, dense_of, find_decoder_layers, get_ffn, install


def model_family(model: nn.Module) -> Family:
    return find_decoder_layers(model)[0]


def swap_mlp(model: nn.Module, make_ffn: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Replace every decoder layer's MLP by ``make_ffn(dense_mlp)``; returns the model.

    ``dense_mlp`` is the stock MLP wrapped as a DenseFFN / GatedDenseFFN (sharing its
    parameters): return it to keep the dense model, or build a tree layer (from it).
    """
    family, layers = find_decoder_layers(model)
    for layer in layers:
        if isinstance(get_ffn(family, layer), (*TREE_LAYER_TYPES, *DENSE_LAYER_TYPES)):
            raise ValueError("this model's MLPs were already swapped")
        install(family, layer, make_ffn(dense_of(family, layer)))
    return model


def replace_ffns(model: nn.Module, modules: list[nn.Module]) -> nn.Module:
    """Put ``modules[i]`` in place of layer i's (already swapped) FFN: pruning uses this."""
    family, layers = find_decoder_layers(model)
    if len(modules) != len(layers):
        raise ValueError(f"{len(modules)} FFN modules for {len(layers)} decoder layers")
    for layer, module in zip(layers, modules):
        install(family, layer, module)
    return model


def ffn_modules(model: nn.Module) -> list[nn.Module]:
    """The swapped-in feed-forward module of each decoder layer (tree, pruned or dense wrapper)."""
    family, layers = find_decoder_layers(model)
    found = [get_ffn(family, layer) for layer in layers]
    return [m for m in found if isinstance(m, (*TREE_LAYER_TYPES, *DENSE_LAYER_TYPES))]


def tree_layers(model: nn.Module) -> list[nn.Module]:
    """Every tree-routed layer (node or leaf family, pruned or not); each has ``node_visits``,
    ``trees`` and ``depth`` in the heap layout treeffn.analysis.routing reads."""
    return [m for m in model.modules() if isinstance(m, TREE_LAYER_TYPES)]

