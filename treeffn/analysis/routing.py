"""Routing statistics computed from a tree layer's per-node visit counts.

Everything derives from ``node_visits`` (trees * N counts, tree-major, heap order): leaf usage
is the last level's counts, and a node's right-going fraction is visits(2n+2) / visits(n).
Per-level mean routing logits come from the path pre-activations (``TreeFFN.walk``).
"""

from __future__ import annotations

import math

import torch

from treeffn.layers.routing import nodes_per_tree

# Verdict thresholds on the mean normalized leaf entropy of a layer's trees.
BALANCED_AT_LEAST = 0.75
COLLAPSED_BELOW = 0.35


def leaf_counts(visits: torch.Tensor, trees: int, depth: int) -> torch.Tensor:
    """(trees, 2^depth) visit counts of the leaves, left to right."""
    first_leaf = 2**depth - 1
    return visits.view(trees, nodes_per_tree(depth))[:, first_leaf:]


MAX_HISTOGRAM_BINS = 512  # W&B refuses histograms with more bins


def usage_histogram(leaf_visits: torch.Tensor, max_bins: int = MAX_HISTOGRAM_BINS) -> tuple[torch.Tensor, str]:
    """Leaf usage as at most ``max_bins`` bins, and what a bin is.

    One bin per leaf (tree-major) when all leaves fit; else the trees are summed leaf by leaf
    (bin j = visits of leaf j over all trees); when even one tree has more leaves than bins,
    neighbouring leaves (the leaves of one subtree) share a bin.
    """
    trees, leaves = leaf_visits.shape
    if trees * leaves <= max_bins:
        return leaf_visits.flatten(), "leaf (tree-major)"
    per_leaf = leaf_visits.sum(0)
    if leaves <= max_bins:
        return per_leaf, "leaf position, summed over trees"
    group = -(-leaves // max_bins)  # leaves per bin; a power of two, so bins are whole subtrees
    return per_leaf.view(-1, group).sum(1), f"subtree of {group} leaves, summed over trees"


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


def right_fraction(visits: torch.Tensor, trees: int, depth: int) -> torch.Tensor:
    """(trees, 2^depth - 1): share of each internal node's tokens that went right (NaN if none came)."""
    n_internal = 2**depth - 1
    v = visits.view(trees, nodes_per_tree(depth)).double()
    idx = torch.arange(n_internal)
    parent = v[:, idx]
    right = v[:, 2 * idx + 2]
    return torch.where(parent > 0, right / parent.clamp_min(1), torch.full_like(parent, float("nan")))


def dead_fraction(visits: torch.Tensor) -> float:
    """Share of nodes that no token visited (with hard routing, also the share of the layer's
    parameters that got no gradient from those tokens: static sparsity)."""
    return float((visits == 0).double().mean())


def verdict(leaf_entropy: float) -> str:
    if math.isnan(leaf_entropy):
        return "unvisited"
    if leaf_entropy >= BALANCED_AT_LEAST:
        return "balanced"
    if leaf_entropy < COLLAPSED_BELOW:
        return "collapsed"
    return "collapsing"


def layer_summary(visits: torch.Tensor, trees: int, depth: int) -> dict:
    ent = normalized_leaf_entropy(visits, trees, depth)
    leaves = leaf_counts(visits, trees, depth)
    right = right_fraction(visits, trees, depth)
    return {
        "dead_frac": dead_fraction(visits),
        "leaf_entropy": float(ent.nanmean()) if not torch.isnan(ent).all() else float("nan"),
        "leaves_used": float((leaves > 0).double().sum(dim=1).mean()),
        "right_frac": float(right.nanmean()) if right.numel() and not torch.isnan(right).all() else float("nan"),
    }


class LevelLogits:
    """Accumulates the mean routing logit per level of one tree layer over forward passes
    (a forward hook; attach for a validation pass, then detach)."""

    def __init__(self, layer):
        self.layer = layer
        self.sums = torch.zeros(layer.depth + 1, dtype=torch.float64)
        # Per level: a leaf-family layer has no logit at its leaf level, a pruned one none where a
        # walk stopped in a removed subtree; both come back as NaN and are not counted.
        self.counts = torch.zeros(layer.depth + 1, dtype=torch.float64)
        self.handle = layer.register_forward_hook(self._hook)

    @torch.no_grad()
    def _hook(self, module, inputs, output):
        x = inputs[0].reshape(-1, module.d_model)
        for piece in x.split(4096):
            _, z = module.walk(piece.to(next(module.parameters()).dtype))
            z = z.double()
            self.sums += z.nansum(dim=(0, 1)).cpu()
            self.counts += (~torch.isnan(z)).sum(dim=(0, 1)).cpu()

    def means(self) -> list[float]:
        return torch.where(self.counts > 0, self.sums / self.counts.clamp_min(1), float("nan")).tolist()

    def remove(self) -> None:
        self.handle.remove()
