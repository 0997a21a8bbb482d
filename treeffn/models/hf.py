"""Tree models as Hugging Face models: config and model classes, registration, ``save_hf``.

Each supported family gets a config subclass that adds one ``tree`` dict (see
treeffn/models/tree_settings.py) under its own ``model_type``, and a model subclass whose
``__init__`` builds the stock model and swaps its MLPs for the configured tree layers (each weight
initialised once: the stock part by the family's ``_init_weights``, the stock MLPs not at all,
the tree layers by their own ``reset_parameters``; see treeffn/models/weight_init.py):

    treeffn_opt    TreeOPTConfig(OPTConfig)     TreeOPTForCausalLM(OPTForCausalLM)
    treeffn_gpt2   TreeGPT2Config(GPT2Config)   TreeGPT2LMHeadModel(GPT2LMHeadModel)
    treeffn_llama  TreeLlamaConfig(LlamaConfig) TreeLlamaForCausalLM(LlamaForCausalLM)

Registered with AutoConfig / AutoModelForCausalLM (``register()``; ``import treeffn`` arranges
it lazily, see treeffn/_hf_registration.py), so a saved dir loads with
``AutoModelForCausalLM.from_pretrained(dir)`` and generates like any causal LM. Weights are
safetensors; nothing runs remote code. Dense models are saved as the stock family (model_type
opt / gpt2 / llama) and load without treeffn at all.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM, OPTForCausalLM

from treeffn.layers import DENSE_LAYER_TYPES, TREE_LAYER_TYPES
from treeffn.models.families import FAMILIES, dense_of, find_decoder_layers, get_ffn, init_std_of
from treeffn.models.hf_config import (
    CONFIG_CLASSES,
    TREE_MODEL_TYPES,
    TreeGPT2Config,
    TreeLlamaConfig,
    TreeOPTConfig,
    register_configs,
)
from treeffn.models.swap import ffn_modules, swap_mlp
from treeffn.models.tree_settings import TreeSpec, make_pruned_layer, make_tree_layer
from treeffn.models.weight_init import (
    init_tree_layer,
    init_weights_once,
    is_initialisable_tree_layer,
    no_weight_init,
)


def install_tree_layers(model: nn.Module, config) -> None:
    """Swap every MLP of a freshly built stock model for the tree layers ``config.tree`` describes."""
    if not config.tree:
        raise ValueError(f"{type(config).__name__} has no tree settings; save dense models as their stock family")
    spec = TreeSpec.from_dict(config.tree)
    d_model, std = config.hidden_size, init_std_of(config)
    kept = spec.pruned_kept
    if kept:
        counter = itertools.count()
        swap_mlp(model, lambda dense: make_pruned_layer(spec, d_model, kept[next(counter)]))
    else:
        swap_mlp(model, lambda dense: make_tree_layer(spec, d_model, std))


def _stock_mlp_parameters(model: nn.Module) -> list[nn.Parameter]:
    family, layers = find_decoder_layers(model)
    return [p for layer in layers for p in dense_of(family, layer).parameters()]


def _finish_tree_init(model: nn.Module, config) -> None:
    """The tree classes' ``__init__`` after the stock ``__init__`` ran under ``no_weight_init``."""
    # The stock law for everything but the MLPs, which are replaced right after (not drawn).
    init_weights_once(model, skip=_stock_mlp_parameters(model))
    # Each tree layer's constructor draws its own law once (nothing under an enclosing
    # no_weight_init, nothing real on the meta device of from_pretrained).
    install_tree_layers(model, config)
    if next(model.parameters()).device.type != "meta":
        for layer in model.modules():
            if is_initialisable_tree_layer(layer):
                layer._is_hf_initialized = True  # as HF flags the modules its init pass did


def _init_unloaded_tree_layers(model: nn.Module) -> None:
    """The tree part of ``initialize_weights``, which ``from_pretrained`` runs after loading.

    HF's pass reaches the tree layers through the stock model's ``_init_weights``, which does not
    know them: a tree weight missing from the checkpoint and the non-persistent ``level_logits``
    (left as ``torch.empty`` by from_pretrained) would stay garbage. Here they get the layer's law;
    loaded tensors carry ``_is_hf_initialized`` and the guarded init functions leave them as loaded.
    """
    from transformers.initialization import guard_torch_init_functions

    std = init_std_of(model.config)
    with guard_torch_init_functions():
        for layer in model.modules():
            if is_initialisable_tree_layer(layer) and not getattr(layer, "_is_hf_initialized", False):
                init_tree_layer(layer, std)
                layer._is_hf_initialized = True


class _TreeModel:
    """What the three tree classes add to their stock model: the stock part built without drawing
    weights, then the tree layers (see _finish_tree_init); and after from_pretrained the tree
    weights the checkpoint did not hold get their law."""

    def __init__(self, config):
        with no_weight_init():  # nothing drawn twice: see _finish_tree_init
            super().__init__(config)
        _finish_tree_init(self, config)

    def initialize_weights(self):
        _init_unloaded_tree_layers(self)  # first: HF's pass flags every module it visits
        super().initialize_weights()


class TreeOPTForCausalLM(_TreeModel, OPTForCausalLM):
    config_class = TreeOPTConfig


class TreeGPT2LMHeadModel(_TreeModel, GPT2LMHeadModel):
    config_class = TreeGPT2Config


class TreeLlamaForCausalLM(_TreeModel, LlamaForCausalLM):
    config_class = TreeLlamaConfig


# family name -> (stock config, tree config, tree model)
_MODELS = {"opt": TreeOPTForCausalLM, "gpt2": TreeGPT2LMHeadModel, "llama": TreeLlamaForCausalLM}
TREE_CLASSES = {family: (stock, tree, _MODELS[family]) for family, (stock, tree) in CONFIG_CLASSES.items()}


def register() -> None:
    """Make the Auto classes know the tree model types (idempotent; replaces the stand-ins of
    treeffn/_hf_registration.py with the real classes)."""
    register_configs()
    for _, config_cls, model_cls in TREE_CLASSES.values():
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


register()


# ------------------------------------------------------------------------------ building
def tree_config(family: str, stock_kwargs: dict, spec: TreeSpec):
    """The tree config of ``family`` from stock config keyword arguments plus the tree spec."""
    return TREE_CLASSES[family][1](**stock_kwargs, tree=spec.to_dict())


def is_tree_model(model: nn.Module) -> bool:
    return isinstance(model, tuple(cls for _, _, cls in TREE_CLASSES.values()))


def as_tree_model(model: nn.Module) -> nn.Module:
    """A stock model whose MLPs were swapped by hand -> the registered tree class (shares nothing:
    a copy of the weights in the saveable class). Tree classes are returned as they are."""
    if is_tree_model(model):
        return model
    family, layers = find_decoder_layers(model)
    ffns = [get_ffn(family, layer) for layer in layers]
    if not all(isinstance(m, TREE_LAYER_TYPES) for m in ffns):
        raise ValueError("as_tree_model needs every decoder layer's FFN to be a tree layer")
    spec = TreeSpec.from_layer(ffns[0])
    if spec.pruned_kept is not None:
        spec = spec.replace(pruned_kept=tuple(_kept_count(m) for m in ffns))
    config_cls = TREE_CLASSES[family.name][1]
    config = config_cls.from_dict({**model.config.to_dict(), "model_type": config_cls.model_type,
                                   "tree": spec.to_dict()})
    with no_weight_init():  # every weight is loaded right below: nothing to draw
        new = TREE_CLASSES[family.name][2](config)
    new.tie_weights()  # post_init ties; under no_weight_init it did not
    new.load_state_dict(model.state_dict(), strict=True)
    return new.train(model.training)


def _kept_count(layer: nn.Module) -> int:
    return int(layer.kept)


# ------------------------------------------------------------------------------ saving
def stock_state_dict(model: nn.Module) -> dict:
    """A dense model's state dict under the stock family's key names (the DenseFFN wrapper undone)."""
    family, _ = find_decoder_layers(model)
    state = model.state_dict()
    if not family.stock_names:
        return state
    renamed = {}
    for key, value in state.items():
        for ours, stock in family.stock_names.items():
            marker = f".{ours}."
            if marker in key:
                key = key.replace(marker, f".{stock}.")
                break
        renamed[key] = value
    return renamed


@contextlib.contextmanager
def no_weight_bars():
    """Without transformers' tqdm bars ("Loading weights", "Writing model shards"): treeffn's
    save and load calls print their own one line, and a bar per file is noise in every log."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def save_hf(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """Save ``model`` (tree or dense) and ``tokenizer`` as a Hugging Face model dir.

    Tree models: config.json with model_type treeffn_<family> + model.safetensors; loading needs
    ``import treeffn`` (then ``AutoModelForCausalLM.from_pretrained(out_dir)``). Dense models:
    the stock family's dir, loadable without treeffn. Returns the dir.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ffns = ffn_modules(model)
    if ffns and all(isinstance(m, TREE_LAYER_TYPES) for m in ffns):
        to_save = as_tree_model(model)
        # impl=triton only runs on CUDA; the saved model says auto (which picks Triton there anyway).
        spec = TreeSpec.from_dict(to_save.config.tree)
        if spec.impl == "triton":
            to_save.config.tree = spec.replace(impl="auto").to_dict()
        with no_weight_bars():
            to_save.save_pretrained(out)
    elif all(isinstance(m, DENSE_LAYER_TYPES) for m in ffns):  # a swapped dense model, or a stock one
        with no_weight_bars():
            model.save_pretrained(out, state_dict=stock_state_dict(model) if ffns else None)
    else:
        raise ValueError("the model mixes tree and dense FFN layers; save_hf expects one kind")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer) from a dir ``save_hf`` wrote."""
    from transformers import AutoTokenizer

    with no_weight_bars():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    return model.eval(), tokenizer


__all__ = ["FAMILIES", "TREE_CLASSES", "TREE_MODEL_TYPES", "TreeGPT2Config", "TreeGPT2LMHeadModel",
           "TreeLlamaConfig", "TreeLlamaForCausalLM", "TreeOPTConfig", "TreeOPTForCausalLM", "as_tree_model",
           "is_tree_model", "load_hf", "register", "save_hf", "stock_state_dict", "tree_config"]
