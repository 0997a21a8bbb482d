"""Feed-forward layers: the tree families, their routing, pruned forms and the dense twins.

* ``TreeFFN`` / ``GatedTreeFFN``: the node family (one neuron per node, hard routing).
* ``LeafFFN``: the leaf family (sigmoid routers in front of leaf MLPs; soft train, hard eval).
* ``PrunedTreeFFN`` / ``PrunedLeafFFN``: either family with unreached subtrees removed.
* ``DenseFFN`` / ``GatedDenseFFN``: the dense MLPs they replace.
"""

from treeffn.config import matched_trees
from treeffn.activations import ACTIVATIONS, get_activation
from treeffn.layers.dense_ffn import DenseFFN, GatedDenseFFN
from treeffn.layers.gated_tree_ffn import GatedTreeFFN
from treeffn.layers.leaf_ffn import LeafFFN, auxiliary_loss, routing_mode
from treeffn.layers.pruned import PrunedLeafFFN, PrunedTreeFFN
from treeffn.layers.routing import nodes_per_tree, route_from_logits
from treeffn.layers.tree_ffn import IMPLS, PLACEMENTS, TreeFFN, tree_ffn_parameter_count

# Every module that routes through trees and keeps ``node_visits`` in the heap layout
# (trees * (2^(depth+1) - 1) counts) that treeffn.analysis.routing reads.
TREE_LAYER_TYPES = (TreeFFN, LeafFFN, PrunedTreeFFN)
DENSE_LAYER_TYPES = (DenseFFN, GatedDenseFFN)

__all__ = [
    "ACTIVATIONS", "DENSE_LAYER_TYPES", "IMPLS", "PLACEMENTS", "TREE_LAYER_TYPES", "DenseFFN", "GatedDenseFFN",
    "GatedTreeFFN", "LeafFFN", "PrunedLeafFFN", "PrunedTreeFFN", "TreeFFN", "auxiliary_loss", "get_activation",
    "matched_trees", "nodes_per_tree", "route_from_logits", "routing_mode", "tree_ffn_parameter_count",
]
