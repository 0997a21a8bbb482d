"""Replacing the MLP blocks of Hugging Face decoder layers with other feed-forward modules.

transformers 5.x OPT runs the MLP inline in ``OPTDecoderLayer.forward``: ``fc2(activation_fn(
fc1(h)))`` on the layer-normed hidden states flattened to (tokens, hidden), followed by dropout
and the residual add. We put the whole new FFN into ``fc1`` and make ``activation_fn`` and
``fc2`` identities, so layer norm, dropout and residual stay exactly as OPT has them.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from treeffn.layers import DenseFFN, TreeFFN


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a supported causal LM, or a clear error for anything else."""
    from transformers.models.opt.modeling_opt import OPTDecoderLayer

    layers = [m for m in model.modules() if isinstance(m, OPTDecoderLayer)]
    if not layers:
        raise TypeError(
            f"{type(model).__name__} has no decoder layer treeffn knows how to swap; supported: OPTDecoderLayer"
        )
    return layers


def swap_mlp(model: nn.Module, make_ffn: Callable[[DenseFFN], nn.Module]) -> nn.Module:
    """Replace every decoder layer's MLP by ``make_ffn(dense_mlp)``; returns the model."""
    for layer in decoder_layers(model):
        current = layer.fc1
        if isinstance(current, (TreeFFN, DenseFFN)):
            raise ValueError("this model's MLPs were already swapped")
        act_name = layer.activation_fn.__class__.__name__
        dense = DenseFFN.from_linears(layer.fc1, layer.fc2, _activation_name(layer.activation_fn, act_name))
        layer.fc1 = make_ffn(dense)
        layer.activation_fn = nn.Identity()
        layer.fc2 = nn.Identity()
    return model


def ffn_modules(model: nn.Module) -> list[nn.Module]:
    """The swapped-in feed-forward module of each decoder layer (TreeFFN or DenseFFN)."""
    return [layer.fc1 for layer in decoder_layers(model) if isinstance(layer.fc1, (TreeFFN, DenseFFN))]


def tree_layers(model: nn.Module) -> list[TreeFFN]:
    return [m for m in model.modules() if isinstance(m, TreeFFN)]


def _activation_name(module: nn.Module, class_name: str) -> str:
    from transformers.activations import GELUActivation, NewGELUActivation

    if isinstance(module, NewGELUActivation):
        return "gelu_tanh"
    if isinstance(module, GELUActivation) or class_name == "GELU":
        return "gelu"
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.SiLU):
        return "silu"
    raise TypeError(f"the dense MLP uses activation {class_name}, which treeffn has no name for")
