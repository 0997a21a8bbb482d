"""Hard hierarchical routing through complete binary trees stored in heap order.

A tree of depth D has D+1 levels and N = 2^(D+1) - 1 nodes; node n's children are 2n+1 (left)
and 2n+2 (right). A token goes right at a node iff the node's pre-activation z is > 0 (ties go
left). Routing is a constant of the forward pass: nothing here carries a gradient.
"""

from __future__ import annotations

import torch

from treeffn.config import nodes_per_tree  # the one torch-free definition


@torch.no_grad()
def route_from_logits(z: torch.Tensor, trees: int, depth: int) -> torch.Tensor:
    """Path of every token through every tree, from the pre-activations of all nodes.

    z: (T, trees * N) pre-activations, tree-major. Returns (T, trees, depth + 1) int64 node
    indices local to each tree (0 = root).
    """
    z = z.view(z.shape[0], trees, nodes_per_tree(depth))
    node = torch.zeros(z.shape[0], trees, 1, dtype=torch.long, device=z.device)
    path = [node]
    for _ in range(depth):
        go_right = (torch.gather(z, 2, node) > 0).long()
        node = 2 * node + 1 + go_right
        path.append(node)
    return torch.cat(path, dim=2)


def global_node_index(path: torch.Tensor, depth: int) -> torch.Tensor:
    """Local (per-tree) node indices -> row indices into the (trees * N, d) parameter tables."""
    trees = path.shape[1]
    offsets = torch.arange(trees, device=path.device).view(1, trees, 1) * nodes_per_tree(depth)
    return path + offsets
