"""Routing statistics computed from a tree layer's per-node visit counts.

Everything derives from ``node_visits`` (trees * N counts, tree-major, heap order): leaf usage
is the last level's counts, and a node's right-going fraction is visits(2n+2) / visits(n).
"""

from __future__ import annotations

import math

import torch

from treeffn.layers.routing import nodes_per_tree


def leaf_counts(visits: torch.Tensor, trees: int, depth: int) -> torch.Tensor:
    """(trees, 2^depth) visit counts of the leaves, left to right."""
    n = nodes_per_tree(depth)
    first_leaf = 2**depth - 1
    return visits.view(trees, n)[:, first_leaf:]


def normalized_leaf_entropy(visits: torch.Tensor, trees: int, depth: int) -> torch.Tensor:
    """Per tree: entropy of the leaf-usage distribution / log(2^depth), in [0, 1].

    1 = every leaf used equally, 0 = one static path. A depth-0 tree has one leaf and no
    choice to make: reported as 1. A tree no token visited gives NaN.
    """
    counts = leaf_counts(visits, trees, depth).double()
    if depth == 0:
        return torch.ones(trees, dtype=torch.float64)
    total = counts.sum(dim=1, keepdim=True)
    p = counts / total
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(dim=1)
    ent = torch.where(total.squeeze(1) > 0, ent, torch.full_like(ent, float("nan")))
    return ent / math.log(2**depth)


def dead_fraction(visits: torch.Tensor) -> float:
    """Share of nodes that no token visited."""
    return float((visits == 0).double().mean())


def layer_summary(visits: torch.Tensor, trees: int, depth: int) -> dict:
    ent = normalized_leaf_entropy(visits, trees, depth)
    leaves = leaf_counts(visits, trees, depth)
    return {
        "dead_frac": dead_fraction(visits),
        "leaf_entropy": float(ent.nanmean()) if not torch.isnan(ent).all() else float("nan"),
        "leaves_used": float((leaves > 0).double().sum(dim=1).mean()),
    }
