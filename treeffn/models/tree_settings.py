"""Tree-layer settings (``TreeSpec``) as stored in a saved model's config.json, and the layers built from them.

A tree model's Hugging Face config carries one ``tree`` dict, ``TreeSpec.to_dict()``: everything
needed to rebuild its FFN layers with the right shapes before ``from_pretrained`` loads the
weights. Values are resolved (no nulls): ``trees`` and ``leaf_width`` hold the counts actually used.

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

import dataclasses
from dataclasses import dataclass

from torch import nn

from treeffn.config import resolve_leaf_width, resolve_trees
from treeffn.layers import GatedTreeFFN, LeafFFN, PrunedLeafFFN, PrunedTreeFFN, TreeFFN


@dataclass(frozen=True)
class TreeSpec:
    """Everything that rebuilds a model's tree layers (the keys above), resolved: no nulls
    except ``leaf_width`` (node family) and ``pruned_kept`` (not pruned)."""

    family: str = "node"
    depth: int = 6
    trees: int = 1
    placement: str = "node"
    activation: str = "gelu"
    bias: bool = True
    gated: bool = False
    impl: str = "auto"
    track_stats: bool = True
    leaf_width: int | None = None
    hardening_weight: float = 0.0
    pruned_kept: tuple[int, ...] | None = None

    @classmethod
    def from_config(cls, model_cfg: dict, tree_cfg: dict, gated: bool) -> "TreeSpec":
        """From the run config's ``model`` and ``tree`` sections (nulls resolved)."""
        family = tree_cfg.get("family", "node")
        return cls(
            family=family,
            depth=int(tree_cfg["depth"]),
            trees=int(resolve_trees(model_cfg, tree_cfg)),
            placement=tree_cfg.get("placement", "node"),
            activation=tree_cfg.get("activation", "gelu"),
            bias=bool(tree_cfg.get("bias", True)),
            gated=bool(gated),
            impl=tree_cfg.get("impl", "auto"),
            track_stats=bool(tree_cfg.get("track_stats", True)),
            leaf_width=int(resolve_leaf_width(model_cfg, tree_cfg)) if family == "leaf" else None,
            hardening_weight=float(tree_cfg.get("hardening_weight", 0.0) or 0.0),
        )

    @classmethod
    def from_layer(cls, layer: nn.Module) -> "TreeSpec":
        """The spec a built tree layer was made with (for models built by hand, then saved).
        A pruned layer's ``pruned_kept`` is its own kept count; the caller lists every layer's."""
        leaf = isinstance(layer, LeafFFN)
        pruned = isinstance(layer, (PrunedTreeFFN, PrunedLeafFFN))
        return cls(
            family="leaf" if leaf else "node",
            depth=layer.depth,
            trees=layer.trees,
            placement=getattr(layer, "placement", "node"),
            activation=layer.activation,
            bias=(layer.leaf_in_b if leaf else layer.b_in) is not None,
            gated=bool(getattr(layer, "gated", False)),
            impl=getattr(layer, "impl", "auto") if isinstance(layer, TreeFFN) else "auto",
            track_stats=bool(layer.track_stats),
            leaf_width=layer.leaf_width if leaf else None,
            hardening_weight=float(getattr(layer, "hardening_weight", 0.0)),
            pruned_kept=(int(layer.kept),) if pruned else None,
        )

    @classmethod
    def from_dict(cls, stored: dict) -> "TreeSpec":
        """From a config.json ``tree`` entry. A key an older treeffn did not write takes its
        default; a key this one does not know is refused (it would be dropped silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(stored) - known)
        if unknown:
            raise ValueError(f"tree settings {', '.join(unknown)} are unknown to this treeffn; "
                             f"a newer treeffn saved this model")
        values = dict(stored)
        if values.get("pruned_kept") is not None:
            values["pruned_kept"] = tuple(int(k) for k in values["pruned_kept"])
        return cls(**values)

    def to_dict(self) -> dict:
        """The ``tree`` entry of config.json (plain JSON types, the keys in this order)."""
        out = dataclasses.asdict(self)
        if self.pruned_kept is not None:
            out["pruned_kept"] = list(self.pruned_kept)
        return out

    def replace(self, **changes) -> "TreeSpec":
        return dataclasses.replace(self, **changes)


def make_tree_layer(spec: TreeSpec, d_model: int, init_std: float = 0.02) -> nn.Module:
    """A freshly initialised tree layer of the configured family."""
    if spec.family == "leaf":
        layer = LeafFFN(d_model, spec.depth, spec.leaf_width, trees=spec.trees, activation=spec.activation,
                        bias=spec.bias, gated=spec.gated, hardening_weight=spec.hardening_weight, init_std=init_std)
    else:
        cls = GatedTreeFFN if spec.gated else TreeFFN
        layer = cls(d_model, spec.depth, spec.trees, placement=spec.placement, activation=spec.activation,
                    bias=spec.bias, impl=spec.impl, init_std=init_std)
    layer.track_stats = spec.track_stats
    return layer


def make_pruned_layer(spec: TreeSpec, d_model: int, kept: int) -> nn.Module:
    """An empty pruned layer with ``kept`` nodes (node family) or leaves (leaf family), to load into."""
    if spec.family == "leaf":
        layer = PrunedLeafFFN(d_model, spec.depth, spec.leaf_width, spec.trees, kept, activation=spec.activation,
                              bias=spec.bias, gated=spec.gated)
    else:
        layer = PrunedTreeFFN(d_model, spec.depth, spec.trees, kept, placement=spec.placement,
                              activation=spec.activation, bias=spec.bias, gated=spec.gated)
    layer.track_stats = spec.track_stats
    return layer
