"""Building Hugging Face models with every weight initialised once.

A stock ``XForCausalLM(config)`` initialises every weight twice: each module's constructor draws
its own (nn.Linear's kaiming_uniform_, nn.Embedding's normal_, LayerNorm's ones/zeros, ...), then
``post_init`` draws them all again with the family's law (``_init_weights``: normal(0, init_std)
matrices, zero biases, unit norms, zeroed padding rows, ...). Tree models also initialised the
stock MLPs they then threw away. On two CPU cores that was ~12 s (dense) / ~15 s (tree) for
OPT-1.3B; one pass of ``normal_`` over its 1.3e9 weights takes ~5 s.

Here the constructors run under transformers' ``no_init_weights`` (the torch init functions and
``PreTrainedModel.init_weights`` become no-ops: parameters are allocated, nothing is written;
buffers such as Llama's rotary ``inv_freq`` or the tree layers' counters are computed as usual),
and ``init_weights_once`` then makes exactly the ``init_weights`` calls the nested ``post_init``
calls would have made: innermost ``PreTrainedModel`` first (OPTDecoder, OPTModel,
OPTForCausalLM), each with its own ``_init_weights`` and custom-code rule, so the law is the
stock one bit for bit in its choices (only the random stream differs). Parameters that will be
replaced anyway (a tree model's stock MLPs, a tied lm_head) are marked done first, as
``from_pretrained`` marks loaded ones, so the guarded init functions skip them.

Options weighed (see results/model_build/): building under ``torch.device("meta")`` and
``to_empty`` + one pass does the same work, but leaves every buffer as garbage to recompute
(rotary ``inv_freq``, ``node_visits``, ``level_logits``); ``no_init_weights`` keeps buffers and
exists with the same behaviour in transformers 5.17 and 5.24.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def no_weight_init() -> Iterator[None]:
    """Inside: module constructors and ``post_init`` initialise nothing (weights stay
    ``torch.empty``); whoever builds a model here initialises or loads every weight after."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        yield


def _pretrained_models_inner_first(module: nn.Module) -> Iterator[nn.Module]:
    """The PreTrainedModel instances in ``module``, in the order their ``post_init`` ran."""
    from transformers import PreTrainedModel

    for child in module.children():
        yield from _pretrained_models_inner_first(child)
    if isinstance(module, PreTrainedModel):
        yield module


def tied_targets(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that ``tie_weights`` replaces by their source (e.g. a tied lm_head.weight)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return [params[name] for name in getattr(model, "all_tied_weights_keys", None) or {} if name in params]


def init_weights_once(model: nn.Module, skip: Iterable[torch.Tensor] = ()) -> None:
    """The init ``post_init`` would have run on ``model`` built under ``no_weight_init``, once,
    then the weight tying; parameters in ``skip`` (and tied targets) are left alone.

    Under an enclosing ``no_weight_init`` (``init_weights`` is a no-op there) or on the meta
    device (``init_weights`` only ties) this draws nothing, as ``post_init`` would.
    """
    done = [*skip, *tied_targets(model)]
    for p in done:
        p._is_hf_initialized = True  # the guarded init functions skip flagged tensors
    try:
        for sub in _pretrained_models_inner_first(model):
            sub.init_weights()
    finally:
        for p in done:  # replaced or dropped by the caller; leave no flag behind
            if getattr(p, "_is_hf_initialized", False):
                del p._is_hf_initialized


def new_stock_model(cls, config) -> nn.Module:
    """``cls(config)`` for a stock transformers class, each weight initialised once by its law."""
    with no_weight_init():
        model = cls(config)
    init_weights_once(model)
    return model


def from_config_once(config) -> nn.Module:
    """``AutoModelForCausalLM.from_config(config)`` (its dtype handling included), initialised once."""
    from transformers import AutoModelForCausalLM

    with no_weight_init():
        model = AutoModelForCausalLM.from_config(config)
    init_weights_once(model)
    return model


def is_initialisable_tree_layer(module: nn.Module) -> bool:
    """Tree layers with their own init law (``reset_parameters``); pruned layers are only loaded into."""
    from treeffn.layers import LeafFFN, PrunedLeafFFN, TreeFFN

    return isinstance(module, (TreeFFN, LeafFFN)) and not isinstance(module, PrunedLeafFFN)


@torch.no_grad()
def init_tree_layer(layer: nn.Module, std: float) -> None:
    """A tree layer built without init gets its own law (``reset_parameters``: normal(0, std)
    vectors, zero biases) and zeroed statistics buffers (``node_visits``, ``level_logits``)."""
    layer.reset_parameters(std)
    for buffer in layer.buffers(recurse=False):
        nn.init.zeros_(buffer)
