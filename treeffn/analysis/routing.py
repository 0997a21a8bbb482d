"""Routing statistics computed from a tree layer's per-node visit counts.

Everything derives from ``node_visits`` (trees * N counts, tree-major, heap order): leaf usage
is the last level's counts, and a node's right-going fraction is visits(2n+2) / visits(n).
Per-level mean routing logits come from the layer's ``level_logits`` sums.
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


def right_share_per_level(visits: torch.Tensor, trees: int, depth: int) -> list[float]:
    """Per level 0..depth-1: the share of the tokens arriving at that level (all trees) that went
    right. 0.5 = the level splits its tokens evenly; a drift away from 0.5 at the root is the
    first sign of a tree settling on a few paths."""
    v = visits.view(trees, nodes_per_tree(depth)).double()
    out = []
    for level in range(depth):
        first, last = 2**level - 1, 2 ** (level + 1) - 1  # the level's nodes, heap order
        arrived = v[:, first:last].sum()
        right = v[:, 2 * first + 2:2 * last + 1:2].sum()  # right children 2n+2 of n in [first, last)
        out.append(float(right / arrived) if arrived > 0 else float("nan"))
    return out


def dead_fraction(visits: torch.Tensor) -> float:
    """Share of nodes that no token visited (with hard routing, also the share of the layer's
    parameters that got no gradient from those tokens: static sparsity)."""
    return float((visits == 0).double().mean())


def verdict(leaf_entropy: float) -> str:
    """Absolute verdict on one layer's normalized leaf entropy (thresholds above)."""
    if math.isnan(leaf_entropy):
        return "unvisited"
    if leaf_entropy >= BALANCED_AT_LEAST:
        return "balanced"
    if leaf_entropy < COLLAPSED_BELOW:
        return "collapsed"
    return "collapsing"


# Change of normalized leaf entropy since initialisation that counts as a trend. A random
# initialisation already routes unevenly (OPT-125M shape, depth 6: ~0.71), so the absolute
# thresholds above say more about the initialisation than about training.
TREND_AT_LEAST = 0.02


def trend(initial_entropy: float, final_entropy: float) -> str:
    """Verdict relative to the model's own initialisation: ``collapsed`` (below the absolute
    floor), else ``concentrating`` / ``spreading`` when the leaf entropy fell / rose by at least
    TREND_AT_LEAST, else ``unchanged``."""
    if math.isnan(initial_entropy) or math.isnan(final_entropy):
        return "unvisited"
    if final_entropy < COLLAPSED_BELOW:
        return "collapsed"
    change = final_entropy - initial_entropy
    if change <= -TREND_AT_LEAST:
        return "concentrating"
    if change >= TREND_AT_LEAST:
        return "spreading"
    return "unchanged"


def level_logit_means(level_logits: torch.Tensor) -> list[float]:
    """Mean routing logit per level from a layer's ``level_logits`` ([sums, counts]); NaN where
    nothing was summed (the Triton paths and pruned or leaf-family layers do not sum logits)."""
    sums, counts = level_logits.double().cpu()
    return torch.where(counts > 0, sums / counts.clamp_min(1), float("nan")).tolist()


def layer_summary(visits: torch.Tensor, trees: int, depth: int) -> dict:
    ent = normalized_leaf_entropy(visits, trees, depth)
    leaves = leaf_counts(visits, trees, depth)
    right = right_fraction(visits, trees, depth)
    per_level = right_share_per_level(visits, trees, depth)
    return {
        "dead_frac": dead_fraction(visits),
        "leaf_entropy": float(ent.nanmean()) if not torch.isnan(ent).all() else float("nan"),
        "leaves_used": float((leaves > 0).double().sum(dim=1).mean()),
        "right_frac": float(right.nanmean()) if right.numel() and not torch.isnan(right).all() else float("nan"),
        "right_share_per_level": per_level,
        "root_right_share": per_level[0] if per_level else float("nan"),
    }


def mean_over_layers(per_layer: list[dict]) -> dict:
    """Means over layers of the scalar statistics and, level by level, of the per-level lists."""
    def mean(values):
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else float("nan")

    out = {k: mean([s[k] for s in per_layer]) for k in ("dead_frac", "leaf_entropy", "leaves_used", "right_frac",
                                                         "root_right_share")}
    for key in ("right_share_per_level", "logit_per_level"):
        levels = max((len(s[key]) for s in per_layer), default=0)
        out[key] = [mean([s[key][j] for s in per_layer if j < len(s[key])]) for j in range(levels)]
    return out
