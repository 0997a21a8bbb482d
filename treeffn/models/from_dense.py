"""``tree.init=from_dense``: tree layers initialised from a pretrained dense MLP's units.

A dense unit j has an input row w_j (fc1 row / gate row), a bias b_j, an output vector v_j
(fc2 column / down column) and, in gated MLPs, an up row u_j. The trees are filled with whole
units, copied exactly, grouped as follows (deterministic, data-free):

1. Rank units by importance ||w_j|| * ||v_j|| (times ||u_j|| when gated) and keep as many of the
   most important ones as the tree layer has places (node family: trees * (2^(D+1) - 1) nodes;
   leaf family: trees * 2^D * leaf_width leaf units). Parameter-matched trees drop fewer than
   one tree's worth of the weakest units.
2. Deal the kept units to the K trees round-robin by rank, so every tree gets a similar mix.
3. Node family, per tree, recursively ("sign-based split"): a subtree's root takes the most
   important unit of its group; the other units are sorted by the cosine of their input row with
   the root's row: the more aligned half goes to the right subtree, the rest to the left. A
   token goes right where the root's unit is active (w_n . x + b_n > 0), and units whose input
   rows point the same way tend to be active on those tokens too; the others sit where the root
   is inactive.
   Leaf family, per tree, recursively: a router's group is split at the median of its
   projection on the group's first principal direction (of the unit-normalised input rows);
   the router's vector is that direction (scaled to the group's mean row norm, bias 0), so
   tokens it sends right are the ones the right half's units respond to. Leaves get the units of
   their group; every leaf's output bias is the dense output bias / trees, so any one leaf per
   tree adds up to the dense bias.

The node family has no output bias: the dense fc2 bias is dropped. A tree uses only its path's
units, so the initial function is a sparse part of the dense one; fine-tuning takes it from there.
"""

from __future__ import annotations

import torch
from torch import nn

from treeffn.layers import LeafFFN, TreeFFN
from treeffn.layers.dense_ffn import dense_units


def importance(units: dict) -> torch.Tensor:
    score = units["in"].norm(dim=1) * units["out"].norm(dim=1)
    if units["up"] is not None:
        score = score * units["up"].norm(dim=1)
    return score


def deal_to_trees(units: dict, trees: int, per_tree: int) -> list[torch.Tensor]:
    """Indices of the trees * per_tree most important units, dealt round-robin: one list per tree."""
    needed = trees * per_tree
    available = units["in"].shape[0]
    if needed > available:
        raise ValueError(f"the tree layer has {needed} places but the dense MLP only {available} units")
    order = torch.argsort(importance(units), descending=True, stable=True)[:needed]
    return [order[k::trees] for k in range(trees)]


@torch.no_grad()
def init_from_dense(layer: nn.Module, dense: nn.Module) -> None:
    """Fill ``layer`` (TreeFFN / GatedTreeFFN / LeafFFN) with units of ``dense`` (Dense/GatedDenseFFN)."""
    units = {k: (v.detach().float() if v is not None else None) for k, v in dense_units(dense).items()}
    if units["in"].shape[1] != layer.d_model:
        raise ValueError(f"dense MLP width {units['in'].shape[1]} != tree layer width {layer.d_model}")
    if bool(getattr(layer, "gated", False)) != (units["up"] is not None):
        raise ValueError("gated tree layers need a gated dense MLP and plain ones a plain MLP")
    if isinstance(layer, LeafFFN):
        _fill_leaf_layer(layer, units)
    elif isinstance(layer, TreeFFN):
        _fill_node_layer(layer, units)
    else:
        raise TypeError(f"tree.init=from_dense does not know {type(layer).__name__}")


# ------------------------------------------------------------------------------ node family
def _fill_node_layer(layer: TreeFFN, units: dict) -> None:
    placement = torch.empty(layer.total_nodes, dtype=torch.long)  # heap row -> dense unit
    for k, group in enumerate(deal_to_trees(units, layer.trees, layer.nodes)):
        _place_subtree(group, 0, k * layer.nodes, units, placement)
    layer.w_in.copy_(units["in"][placement])
    layer.w_out.copy_(units["out"][placement])
    if layer.b_in is not None:
        bias = units["in_bias"]
        layer.b_in.copy_(bias[placement] if bias is not None else torch.zeros(layer.total_nodes))
    if getattr(layer, "gated", False):
        layer.w_up.copy_(units["up"][placement])


def _place_subtree(group: torch.Tensor, node: int, offset: int, units: dict, placement: torch.Tensor) -> None:
    """``group`` is importance-ordered; its first unit becomes ``node``, the rest split by cosine."""
    placement[offset + node] = group[0]
    rest = group[1:]
    if rest.numel() == 0:
        return
    rows = units["in"][rest]
    root = units["in"][group[0]]
    cosine = rows @ root / (rows.norm(dim=1) * root.norm()).clamp_min(1e-12)
    aligned = torch.argsort(cosine, descending=True, stable=True)
    half = rest.numel() // 2
    # Keep importance order inside each half: the next root of each side is its strongest unit.
    right = rest[torch.sort(aligned[:half]).values]
    left = rest[torch.sort(aligned[half:]).values]
    _place_subtree(left, 2 * node + 1, offset, units, placement)
    _place_subtree(right, 2 * node + 2, offset, units, placement)


# ------------------------------------------------------------------------------ leaf family
def _fill_leaf_layer(layer: LeafFFN, units: dict) -> None:
    w = layer.leaf_width
    leaf_units = torch.empty(layer.trees * layer.leaves * w, dtype=torch.long)
    for k, group in enumerate(deal_to_trees(units, layer.trees, layer.leaves * w)):
        _split_group(layer, k, group, 0, units, leaf_units)
    layer.leaf_in.copy_(units["in"][leaf_units])
    layer.leaf_out.copy_(units["out"][leaf_units])
    if layer.leaf_in_b is not None:
        bias = units["in_bias"]
        layer.leaf_in_b.copy_(bias[leaf_units] if bias is not None else torch.zeros(leaf_units.numel()))
    if layer.leaf_out_b is not None:
        out_bias = units["out_bias"]
        layer.leaf_out_b.copy_((out_bias / layer.trees).expand_as(layer.leaf_out_b) if out_bias is not None
                               else torch.zeros_like(layer.leaf_out_b))
    if layer.gated:
        layer.leaf_up.copy_(units["up"][leaf_units])


def _split_group(layer: LeafFFN, tree: int, group: torch.Tensor, node: int, units: dict,
                 leaf_units: torch.Tensor) -> None:
    if node >= layer.routers:  # a leaf: its units, in importance order
        leaf = tree * layer.leaves + node - layer.routers
        leaf_units[leaf * layer.leaf_width:(leaf + 1) * layer.leaf_width] = group
        return
    rows = units["in"][group]
    normed = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    direction = _principal_direction(normed)
    order = torch.argsort(normed @ direction, descending=True, stable=True)
    half = group.numel() // 2
    right, left = group[torch.sort(order[:half]).values], group[torch.sort(order[half:]).values]
    row = tree * layer.routers + node
    layer.router_w[row] = direction * rows.norm(dim=1).mean()
    layer.router_b[row] = 0.0
    _split_group(layer, tree, left, 2 * node + 1, units, leaf_units)
    _split_group(layer, tree, right, 2 * node + 2, units, leaf_units)


def _principal_direction(rows: torch.Tensor) -> torch.Tensor:
    """Unit vector of the largest variance of ``rows``; sign fixed so the mean row projects >= 0."""
    centered = rows - rows.mean(dim=0, keepdim=True)
    if rows.shape[0] < 2 or float(centered.abs().max()) == 0.0:
        direction = rows.mean(dim=0)
    else:
        direction = torch.linalg.svd(centered, full_matrices=False).Vh[0]
    direction = direction / direction.norm().clamp_min(1e-12)
    return direction if float(rows.mean(dim=0) @ direction) >= 0 else -direction
