"""Feed-forward layers: the tree layer, its routing, and the dense twin."""

from treeffn.layers.activations import ACTIVATIONS, get_activation
from treeffn.layers.dense_ffn import DenseFFN
from treeffn.layers.routing import nodes_per_tree, route_from_logits
from treeffn.config import matched_trees
from treeffn.layers.tree_ffn import IMPLS, PLACEMENTS, TreeFFN, tree_ffn_parameter_count

__all__ = [
    "ACTIVATIONS", "IMPLS", "PLACEMENTS", "DenseFFN", "TreeFFN", "get_activation", "matched_trees",
    "nodes_per_tree", "route_from_logits", "tree_ffn_parameter_count",
]
