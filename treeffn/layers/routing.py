"""Hard hierarchical routing through complete binary trees stored in heap order.

A tree of depth D has D+1 levels and N = 2^(D+1) - 1 nodes; node n's children are 2n+1 (left)
and 2n+2 (right). A token goes right at a node iff the node's pre-activation z is > 0 (ties go
left). ``descend`` is that rule, the one copy every tree family and the float64 reference use.
Routing is a constant of the forward pass: nothing here carries a gradient.
"""

from __future__ import annotations

from typing import Callable

import torch

from treeffn.config import nodes_per_tree  # the one torch-free definition


def heap_child(node: torch.Tensor, go_right: torch.Tensor) -> torch.Tensor:
    """The left (2n+1) or right (2n+2) child of each heap node."""
    return 2 * node + 1 + go_right.long()


def descend(root: torch.Tensor, depth: int, logit_at: Callable[[torch.Tensor], torch.Tensor],
            child: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = heap_child,
            leaf_logits: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The walk from ``root`` down ``depth`` levels: at each node read its logit, then step to
    the right child if it is > 0, else to the left one.

    ``logit_at(nodes)`` gives the logits of a tensor of nodes (same shape); ``child(nodes,
    go_right)`` the next nodes (heap arithmetic unless a pruned tree's table says otherwise).
    Returns (nodes, logits) per level: depth + 1 node tensors, root first, and the logits read on
    the way (depth of them; depth + 1 with ``leaf_logits``, for families whose last level
    computes too). The logits keep their autograd graph; the choices are constants.
    """
    node, nodes, logits = root, [root], []
    for _ in range(depth):
        z = logit_at(node)
        node = child(node, z > 0)
        nodes.append(node)
        logits.append(z)
    if leaf_logits:
        logits.append(logit_at(node))
    return nodes, logits


@torch.no_grad()
def route_from_logits(z: torch.Tensor, trees: int, depth: int, routing_nodes: int | None = None) -> torch.Tensor:
    """Path of every token through every tree, from the pre-activations of all nodes.

    z: (T, trees * M) pre-activations, tree-major, of the first M heap nodes of each tree:
    ``routing_nodes``, by default all N (the node family; the leaf family passes its 2^D - 1
    routers). Returns (T, trees, depth + 1) int64 node indices local to each tree (0 = root).
    """
    z = z.view(z.shape[0], trees, nodes_per_tree(depth) if routing_nodes is None else routing_nodes)
    root = torch.zeros(z.shape[0], trees, 1, dtype=torch.long, device=z.device)
    nodes, _ = descend(root, depth, lambda node: torch.gather(z, 2, node))
    return torch.cat(nodes, dim=2)


@torch.no_grad()
def path_mask(z: torch.Tensor, trees: int, depth: int) -> torch.Tensor:
    """Which nodes are on each token's path, from the pre-activations of all nodes: (T, trees,
    N) bool, heap order. The same rule as ``descend`` (right iff z > 0), written level by level
    with element-wise operations only (a child is on the path iff its parent is and the parent
    chose its side), so that torch.compile fuses the whole routing into one kernel; no gather,
    no scatter, no index tensor.
    """
    z = z.view(z.shape[0], trees, nodes_per_tree(depth))
    level = torch.ones(z.shape[0], trees, 1, dtype=torch.bool, device=z.device)  # the root
    levels = [level]
    for lvl in range(depth):
        first = 2**lvl - 1  # heap index of the level's first node; its 2^lvl nodes follow
        right = z[:, :, first:first + 2**lvl] > 0
        # children of node j of this level are nodes 2j (left) and 2j+1 (right) of the next
        level = torch.stack((level & ~right, level & right), dim=-1).flatten(2)
        levels.append(level)
    return torch.cat(levels, dim=2)


def path_from_mask(mask: torch.Tensor, depth: int) -> torch.Tensor:
    """(T, trees, N) path mask -> (T, trees, depth + 1) local node index per level."""
    return torch.stack([mask[:, :, 2**lvl - 1:2**(lvl + 1) - 1].int().argmax(dim=2) + 2**lvl - 1
                        for lvl in range(depth + 1)], dim=2).long()


def global_node_index(path: torch.Tensor, depth: int) -> torch.Tensor:
    """Local (per-tree) node indices -> row indices into the (trees * N, d) parameter tables."""
    trees = path.shape[1]
    offsets = torch.arange(trees, device=path.device).view(1, trees, 1) * nodes_per_tree(depth)
    return path + offsets
