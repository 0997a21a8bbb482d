"""Tree-layer settings as stored in a saved model's config.json, and the layers built from them.

A tree model's Hugging Face config carries one ``tree`` dict: everything needed to rebuild its
FFN layers with the right shapes before ``from_pretrained`` loads the weights. Values are
resolved (no nulls): ``trees`` and ``leaf_width`` hold the counts actually used.

    family            node | leaf
    depth, trees      tree shape (depth = levels below the root)
    placement         node | post_sum (node family)
    activation        act (the gate's, for gated trees)
    bias              node / leaf input biases
    gated             the model's MLP is gated (Llama): gated trees / gated leaves
    leaf_width        leaf family: hidden units per leaf
    hardening_weight  leaf family: router-entropy loss weight (training only)
    impl              node family: auto | masked | gather | triton
    track_stats       count node visits
    pruned_kept       null, or per decoder layer the number of kept nodes (node family) or
                      kept leaves (leaf family) after ``treeffn prune``
"""

from __future__ import annotations

from torch import nn

from treeffn.config import resolve_leaf_width, resolve_trees
from treeffn.layers import GatedTreeFFN, LeafFFN, PrunedLeafFFN, PrunedTreeFFN, TreeFFN


def tree_settings(model_cfg: dict, tree_cfg: dict, gated: bool) -> dict:
    """Resolved settings from the run config's ``model`` and ``tree`` sections."""
    family = tree_cfg.get("family", "node")
    settings = {
        "family": family,
        "depth": int(tree_cfg["depth"]),
        "trees": int(resolve_trees(model_cfg, tree_cfg)),
        "placement": tree_cfg.get("placement", "node"),
        "activation": tree_cfg.get("activation", "gelu"),
        "bias": bool(tree_cfg.get("bias", True)),
        "gated": bool(gated),
        "impl": tree_cfg.get("impl", "auto"),
        "track_stats": bool(tree_cfg.get("track_stats", True)),
        "leaf_width": None,
        "hardening_weight": float(tree_cfg.get("hardening_weight", 0.0) or 0.0),
        "pruned_kept": None,
    }
    if family == "leaf":
        settings["leaf_width"] = int(resolve_leaf_width(model_cfg, tree_cfg))
    return settings


def make_tree_layer(settings: dict, d_model: int, init_std: float = 0.02) -> nn.Module:
    """A freshly initialised tree layer of the configured family."""
    if settings["family"] == "leaf":
        layer = LeafFFN(d_model, settings["depth"], settings["leaf_width"], trees=settings["trees"],
                        activation=settings["activation"], bias=settings["bias"], gated=settings["gated"],
                        hardening_weight=settings["hardening_weight"], init_std=init_std)
    else:
        cls = GatedTreeFFN if settings["gated"] else TreeFFN
        layer = cls(d_model, settings["depth"], settings["trees"], placement=settings["placement"],
                    activation=settings["activation"], bias=settings["bias"], impl=settings["impl"],
                    init_std=init_std)
    layer.track_stats = settings["track_stats"]
    return layer


def make_pruned_layer(settings: dict, d_model: int, kept: int) -> nn.Module:
    """An empty pruned layer with ``kept`` nodes (node family) or leaves (leaf family), to load into."""
    if settings["family"] == "leaf":
        layer = PrunedLeafFFN(d_model, settings["depth"], settings["leaf_width"], settings["trees"], kept,
                              activation=settings["activation"], bias=settings["bias"], gated=settings["gated"])
    else:
        layer = PrunedTreeFFN(d_model, settings["depth"], settings["trees"], kept, placement=settings["placement"],
                              activation=settings["activation"], bias=settings["bias"], gated=settings["gated"])
    layer.track_stats = settings["track_stats"]
    return layer


def settings_from_layer(layer: nn.Module) -> dict:
    """The settings a built tree layer was made with (for models built by hand, then saved)."""
    leaf = isinstance(layer, LeafFFN)
    pruned = isinstance(layer, (PrunedTreeFFN, PrunedLeafFFN))
    return {
        "family": "leaf" if leaf else "node",
        "depth": layer.depth,
        "trees": layer.trees,
        "placement": getattr(layer, "placement", "node"),
        "activation": layer.activation,
        "bias": (layer.leaf_in_b if leaf else layer.b_in) is not None,
        "gated": bool(getattr(layer, "gated", False)),
        "impl": getattr(layer, "impl", "auto") if isinstance(layer, TreeFFN) else "auto",
        "track_stats": bool(layer.track_stats),
        "leaf_width": layer.leaf_width if leaf else None,
        "hardening_weight": float(getattr(layer, "hardening_weight", 0.0)),
        "pruned_kept": [] if pruned else None,
    }
