"""Tree layers with unreached subtrees removed (``treeffn prune``): smaller, same hard routing.

A node no token visited has no visited descendant (every visit to a child passes its parent),
so "drop unvisited nodes" removes whole subtrees. The kept nodes are stored compactly; a
``children`` table (kept index of the left/right child, -1 when removed) replaces the implicit
heap arithmetic. A token that would step into a removed subtree stops there: the removed nodes
contribute nothing. On text where no token goes there (the text the visits were counted on),
the pruned layer computes exactly what the full one did in hard-routing eval.

Both classes keep ``node_visits`` in the full heap layout (trees * (2^(D+1) - 1), heap order), so
routing statistics read a pruned layer like an unpruned one.
"""

from __future__ import annotations

import torch
from torch import nn

from treeffn.activations import get_activation
from treeffn.layers.leaf_ffn import LeafFFN
from treeffn.layers.path_ops import gather_chunk_tokens, row_dots, weighted_rows
from treeffn.layers.routing import descend, nodes_per_tree
from treeffn.layers.tree_ffn import TreeFFN


class PrunedTreeFFN(nn.Module):
    """The node family (plain or gated) over a subset of each tree's nodes.

    Always walks the tree level by level (the gather path), in training and eval alike: it is an
    inference artefact; fine-tune the unpruned model instead.
    """

    def __init__(self, d_model: int, depth: int, trees: int, kept: int, placement: str = "node",
                 activation: str = "gelu", bias: bool = True, gated: bool = False):
        super().__init__()
        self.d_model, self.depth, self.trees, self.kept = d_model, depth, trees, kept
        self.placement, self.activation, self.gated = placement, activation, gated
        self.act = get_activation(activation)
        self.nodes = nodes_per_tree(depth)
        self.w_in = nn.Parameter(torch.zeros(kept, d_model))
        self.b_in = nn.Parameter(torch.zeros(kept)) if bias else None
        self.w_up = nn.Parameter(torch.zeros(kept, d_model)) if gated else None
        self.w_out = nn.Parameter(torch.zeros(kept, d_model))
        self.register_buffer("children_index", torch.full((kept, 2), -1, dtype=torch.long))
        self.register_buffer("roots", torch.full((trees,), -1, dtype=torch.long))
        self.register_buffer("heap_index", torch.zeros(kept, dtype=torch.long))  # row in the full layout
        self.register_buffer("node_visits", torch.zeros(trees * self.nodes, dtype=torch.long))
        self.track_stats = True

    @classmethod
    def from_tree(cls, layer: TreeFFN, keep: torch.Tensor) -> "PrunedTreeFFN":
        """Copy the rows of ``layer`` where ``keep`` (bool, trees * N) is true."""
        keep = _close_under_parents(keep.view(layer.trees, layer.nodes)).flatten()
        kept_rows = keep.nonzero().squeeze(1)
        gated = getattr(layer, "gated", False)
        new = cls(layer.d_model, layer.depth, layer.trees, int(kept_rows.numel()), layer.placement,
                  layer.activation, layer.b_in is not None, gated)
        compact = torch.full((layer.total_nodes,), -1, dtype=torch.long)
        compact[kept_rows] = torch.arange(kept_rows.numel())
        with torch.no_grad():
            new.w_in.copy_(layer.w_in[kept_rows])
            new.w_out.copy_(layer.w_out[kept_rows])
            if new.b_in is not None:
                new.b_in.copy_(layer.b_in[kept_rows])
            if gated:
                new.w_up.copy_(layer.w_up[kept_rows])
            new.heap_index.copy_(kept_rows)
            new.children_index.copy_(_child_table(kept_rows, compact, layer.trees, layer.nodes))
            new.roots.copy_(compact[torch.arange(layer.trees) * layer.nodes])
            new.node_visits.copy_(layer.node_visits)
        return new

    impl = "pruned"  # one implementation: the level walk

    @property
    def active_nodes(self) -> int:
        return self.trees * (self.depth + 1)

    @property
    def total_nodes(self) -> int:
        return self.kept

    @property
    def active_fraction(self) -> float:
        return self.active_nodes / max(1, self.kept)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, depth={self.depth}, trees={self.trees}, kept={self.kept} of "
                f"{self.trees * self.nodes}, placement={self.placement}, activation={self.activation}, "
                f"gated={self.gated}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.d_model)
        chunk = gather_chunk_tokens(self.trees * self.d_model)
        parts = [self._walk(piece) for piece in flat.split(chunk)] if flat.shape[0] else [self._walk(flat)]
        y = torch.cat([p[0] for p in parts])
        if self.track_stats:
            with torch.no_grad():
                heap = torch.cat([p[1] for p in parts]).flatten()
                # index_add_ with 0/1 weights, not a boolean selection + bincount: no host sync
                self.node_visits.index_add_(0, heap.clamp_min(0), (heap >= 0).long())
        return y.view(shape)

    def _descend(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Kept-node indices (-1 once a walk stepped into a removed subtree) and their logits per
        level, D+1 each; a stopped walk reads row 0 (its logit is masked out by the callers)."""
        def logits(node):
            row = node.clamp_min(0)
            z = row_dots(self.w_in, row, x)
            return z + self.b_in[row] if self.b_in is not None else z

        def child(node, go_right):
            return torch.where(node >= 0, self.children_index[node.clamp_min(0), go_right.long()], -1)

        root = self.roots.view(1, -1).expand(x.shape[0], -1)
        return descend(root, self.depth, logits, child, leaf_logits=True)

    def _heap_rows(self, nodes: list[torch.Tensor]) -> torch.Tensor:
        """(T, K, D+1) rows in the full heap layout, -1 where the walk stopped."""
        return torch.stack([torch.where(node >= 0, self.heap_index[node.clamp_min(0)], -1) for node in nodes], dim=2)

    @torch.no_grad()
    def walk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global heap rows, routing logits), each (T, K, D+1), as TreeFFN.walk; where a token's
        walk stopped in a removed subtree the row is -1 and the logit NaN."""
        nodes, logits = self._descend(x)
        alive = torch.stack([node >= 0 for node in nodes], dim=2)
        return self._heap_rows(nodes), torch.where(alive, torch.stack(logits, dim=2), float("nan"))

    def _walk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same operations, in the same order, as TreeFFN's gather path (so results match bit for bit)."""
        tokens = x.shape[0]
        nodes, logits = self._descend(x)
        heaps = self._heap_rows(nodes)
        alive_t = (heaps >= 0).view(tokens, -1)
        rows_t = torch.stack([node.clamp_min(0) for node in nodes], dim=2).view(tokens, -1)
        z_t = torch.stack(logits, dim=2).view(tokens, -1)
        if self.gated:
            u_t = torch.stack([row_dots(self.w_up, node.clamp_min(0), x) for node in nodes], dim=2).view(tokens, -1)
            if self.placement == "node":
                y = weighted_rows(self.w_out, rows_t, torch.where(alive_t, self.act(z_t) * u_t, 0.0))
            else:
                s = weighted_rows(self.w_out, rows_t, torch.where(alive_t, z_t, 0.0))
                v = weighted_rows(self.w_out, rows_t, torch.where(alive_t, u_t, 0.0))
                y = self.act(s) * v
        else:
            weights = self.act(z_t) if self.placement == "node" else z_t
            weights = torch.where(alive_t, weights, 0.0)
            y = weighted_rows(self.w_out, rows_t, weights)
            if self.placement == "post_sum":
                y = self.act(y)
        return y.to(x.dtype), heaps  # global heap rows, -1 where the walk stopped


class PrunedLeafFFN(LeafFFN):
    """The leaf family with unreached leaves removed (routers are kept: they are D * d per path,
    a small share of the layer). A token reaching a removed leaf gets zero from that tree.
    Always routes hard."""

    def __init__(self, d_model: int, depth: int, leaf_width: int, trees: int, kept: int,
                 activation: str = "gelu", bias: bool = True, gated: bool = False):
        nn.Module.__init__(self)
        self.d_model, self.depth, self.trees, self.leaf_width = d_model, depth, trees, leaf_width
        self.activation, self.gated, self.hardening_weight = activation, gated, 0.0
        self.act = get_activation(activation)
        self.routers, self.leaves, self.nodes = 2**depth - 1, 2**depth, nodes_per_tree(depth)
        self.kept = kept
        units = kept * leaf_width
        self.router_w = nn.Parameter(torch.zeros(trees * self.routers, d_model))
        self.router_b = nn.Parameter(torch.zeros(trees * self.routers))
        self.leaf_in = nn.Parameter(torch.zeros(units, d_model))
        self.leaf_in_b = nn.Parameter(torch.zeros(units)) if bias else None
        self.leaf_up = nn.Parameter(torch.zeros(units, d_model)) if gated else None
        self.leaf_out = nn.Parameter(torch.zeros(units, d_model))
        self.leaf_out_b = nn.Parameter(torch.zeros(kept, d_model)) if bias else None
        self.register_buffer("leaf_slot", torch.full((trees * self.leaves,), -1, dtype=torch.long))
        self.register_buffer("node_visits", torch.zeros(trees * self.nodes, dtype=torch.long))
        self.track_stats = True
        self.routing = "hard"
        self.last_router_entropy = None

    @classmethod
    def from_leaf(cls, layer: LeafFFN, keep_leaf: torch.Tensor) -> "PrunedLeafFFN":
        """Copy the leaves of ``layer`` where ``keep_leaf`` (bool, trees * 2^D) is true."""
        kept = keep_leaf.nonzero().squeeze(1)
        new = cls(layer.d_model, layer.depth, layer.leaf_width, layer.trees, int(kept.numel()), layer.activation,
                  layer.leaf_in_b is not None, layer.gated)
        w = layer.leaf_width
        unit_rows = (kept.unsqueeze(1) * w + torch.arange(w)).flatten()
        with torch.no_grad():
            new.router_w.copy_(layer.router_w)
            new.router_b.copy_(layer.router_b)
            new.leaf_in.copy_(layer.leaf_in[unit_rows])
            new.leaf_out.copy_(layer.leaf_out[unit_rows])
            if new.leaf_in_b is not None:
                new.leaf_in_b.copy_(layer.leaf_in_b[unit_rows])
                new.leaf_out_b.copy_(layer.leaf_out_b[kept])
            if new.gated:
                new.leaf_up.copy_(layer.leaf_up[unit_rows])
            new.leaf_slot[kept] = torch.arange(kept.numel())
            new.node_visits.copy_(layer.node_visits)
        return new

    @property
    def total_units(self) -> int:
        return self.trees * self.routers + self.kept * self.leaf_width

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kept_leaves={self.kept} of {self.trees * self.leaves}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.d_model)
        leaf = self.hard_leaves(flat)
        slot = self.leaf_slot[leaf + torch.arange(self.trees, device=flat.device) * self.leaves]
        y = self._run_leaves(flat, slot, slot >= 0)
        if self.track_stats:
            self._count_visits(flat, leaf)
        return y.view(shape)


def _close_under_parents(keep: torch.Tensor) -> torch.Tensor:
    """(trees, N) keep mask -> also drop every node whose parent is dropped (whole subtrees go)."""
    keep = keep.clone()
    for n in range(1, keep.shape[1]):  # heap order: a parent comes before its children
        keep[:, n] &= keep[:, (n - 1) // 2]
    return keep


def _child_table(kept_rows: torch.Tensor, compact: torch.Tensor, trees: int, nodes: int) -> torch.Tensor:
    """(kept, 2) compact indices of each kept node's left and right child (-1: removed or none)."""
    local = kept_rows % nodes
    base = kept_rows - local
    table = torch.full((kept_rows.numel(), 2), -1, dtype=torch.long)
    for side in (0, 1):
        child = 2 * local + 1 + side
        inside = child < nodes
        table[inside, side] = compact[(base + child)[inside]]
    return table
