"""Model presets (conf/model/*.yaml) to Hugging Face models with dense or tree feed-forward blocks."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from treeffn.config import resolve_trees
from treeffn.layers import DenseFFN, TreeFFN
from treeffn.models.swap import ffn_modules, swap_mlp, tree_layers


def opt_config(model_cfg: dict, vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=vocab_size,
        hidden_size=model_cfg["hidden_size"],
        ffn_dim=model_cfg["ffn_dim"],
        num_hidden_layers=model_cfg["num_hidden_layers"],
        num_attention_heads=model_cfg["num_attention_heads"],
        max_position_embeddings=model_cfg["max_position_embeddings"],
        word_embed_proj_dim=model_cfg["word_embed_proj_dim"],
        do_layer_norm_before=model_cfg["do_layer_norm_before"],
        dropout=model_cfg["dropout"],
        attention_dropout=0.0,
        activation_function=model_cfg["activation"],
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )


def make_tree_ffn(model_cfg: dict, tree_cfg: dict, init_std: float = 0.02) -> TreeFFN:
    layer = TreeFFN(
        d_model=model_cfg["hidden_size"],
        depth=tree_cfg["depth"],
        trees=resolve_trees(model_cfg, tree_cfg),
        placement=tree_cfg["placement"],
        activation=tree_cfg["activation"],
        bias=tree_cfg["bias"],
        impl=tree_cfg["impl"],
        init_std=init_std,
    )
    layer.track_stats = bool(tree_cfg.get("track_stats", True))
    return layer


def build_model(model_cfg: dict, tree_cfg: dict, vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    """A randomly initialised causal LM from a preset; its MLPs swapped for the configured FFN."""
    from transformers import OPTForCausalLM

    config = opt_config(model_cfg, vocab_size, pad_id, bos_id, eos_id)
    model = OPTForCausalLM(config)
    if tree_cfg["ffn"] == "tree":
        swap_mlp(model, lambda dense: make_tree_ffn(model_cfg, tree_cfg, config.init_std))
    else:
        # Same computation as the stock model; the wrapper only gives every FFN one module.
        swap_mlp(model, lambda dense: dense)
    return model


@dataclass
class Accounting:
    params_total: int
    params_ffn: int
    ffn_units: int          # dense: ffn_dim; tree: trees * nodes (per layer)
    active_ffn_units: int   # units a token uses per layer
    active_ffn_fraction: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def accounting(model: nn.Module) -> Accounting:
    ffns = ffn_modules(model)
    params_ffn = sum(p.numel() for m in ffns for p in m.parameters())
    params_total = sum(p.numel() for p in model.parameters())
    first = ffns[0]
    if isinstance(first, TreeFFN):
        units, active = first.total_nodes, first.active_nodes
    elif isinstance(first, DenseFFN):
        units = active = first.fc1.out_features
    else:  # pragma: no cover
        raise TypeError(type(first))
    return Accounting(params_total, params_ffn, units, active, active / units)


__all__ = ["Accounting", "accounting", "build_model", "make_tree_ffn", "opt_config", "tree_layers"]
