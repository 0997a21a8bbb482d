"""The leaf-MLP tree layer: Fast Feedforward Networks (Belcak & Wattenhofer 2023), ``tree.family=leaf``.

Each of K trees has D levels of router nodes in front of 2^D small leaf MLPs:

    routers  n = 0 .. 2^D - 2 (heap order),   p_n(x) = sigmoid(r_n . x + c_n) = P(go right at n)
    leaves   l = 0 .. 2^D - 1 (left to right), leaf_l(x) = W2_l act(W1_l x + b1_l) + b2_l
             (gated models: W2_l (act(W1_l x + b1_l) * (U_l x)) + b2_l, the SwiGLU shape)

Training ("soft"): every token uses every leaf, weighted by the probability of reaching it,
P(l | x) = product over the routers on l's path of p_n or 1 - p_n:

    y = sum over trees, sum over leaves  P(l | x) * leaf_l(x)

Evaluation ("hard"): a token descends to one leaf per tree (right iff r_n . x + c_n > 0, ties go
left, as in the node family) and only that leaf's MLP runs.

Hardening (the paper's entropy loss): the mean binary entropy of the router decisions,
H(p_n(x)) over all routers and tokens, in [0, ln 2]. ``tree.hardening_weight`` times it is added
to the training loss (``auxiliary_loss(model)``); pushing it to 0 makes soft and hard agree.
The soft-vs-hard gap is the difference of the two losses (``routing_mode``).

Layout: routers and leaves share one heap per tree for statistics: ``node_visits`` holds
2^(D+1) - 1 counts per tree, routers at 0 .. 2^D - 2 and leaves at 2^D - 1 .. 2^(D+1) - 2, so
the routing summaries of the node family (dead fraction, leaf entropy) read it unchanged.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from treeffn.activations import get_activation
from treeffn.layers.path_ops import gather_chunk_tokens, row_dots, weighted_rows
from treeffn.layers.routing import descend, nodes_per_tree, route_from_logits

ROUTING_MODES = ("auto", "soft", "hard")


class LeafFFN(nn.Module):
    """K parallel FFF trees of depth D with leaf MLPs of width ``leaf_width``; (..., d) -> (..., d).

    ``routing``: "auto" (soft in ``.train()``, hard in ``.eval()``), or force "soft" / "hard".
    """

    def __init__(
        self,
        d_model: int,
        depth: int,
        leaf_width: int,
        trees: int = 1,
        activation: str = "gelu",
        bias: bool = True,
        gated: bool = False,
        hardening_weight: float = 0.0,
        init_std: float = 0.02,
    ):
        super().__init__()
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be an integer >= 0 (router levels), got {depth!r}")
        if not isinstance(trees, int) or trees < 1:
            raise ValueError(f"trees must be an integer >= 1, got {trees!r}")
        if not isinstance(leaf_width, int) or leaf_width < 1:
            raise ValueError(f"leaf_width must be an integer >= 1, got {leaf_width!r}")
        self.d_model, self.depth, self.trees, self.leaf_width = d_model, depth, trees, leaf_width
        self.activation, self.gated, self.hardening_weight = activation, gated, float(hardening_weight)
        self.act = get_activation(activation)
        self.routers = 2**depth - 1   # per tree
        self.leaves = 2**depth        # per tree
        self.nodes = nodes_per_tree(depth)  # routers + leaves: the heap the statistics use
        units = trees * self.leaves * leaf_width
        self.router_w = nn.Parameter(torch.empty(trees * self.routers, d_model))
        self.router_b = nn.Parameter(torch.empty(trees * self.routers))
        self.leaf_in = nn.Parameter(torch.empty(units, d_model))
        self.leaf_in_b = nn.Parameter(torch.empty(units)) if bias else None
        self.leaf_up = nn.Parameter(torch.empty(units, d_model)) if gated else None
        self.leaf_out = nn.Parameter(torch.empty(units, d_model))
        self.leaf_out_b = nn.Parameter(torch.empty(trees * self.leaves, d_model)) if bias else None
        self.register_buffer("node_visits", torch.zeros(trees * self.nodes, dtype=torch.long))
        self.track_stats = True
        self.routing = "auto"
        # Mean router entropy of the last soft forward (a tensor in the autograd graph), or None.
        self.last_router_entropy: torch.Tensor | None = None
        self.reset_parameters(init_std)

    # ----------------------------------------------------------------- accounting
    @property
    def total_units(self) -> int:
        """Routers plus leaf hidden units, per layer."""
        return self.trees * (self.routers + self.leaves * self.leaf_width)

    @property
    def active_units(self) -> int:
        """A token evaluates D routers and one leaf per tree in the hard path."""
        return self.trees * (self.depth + self.leaf_width)

    @property
    def active_fraction(self) -> float:
        return self.active_units / self.total_units

    @property
    def total_nodes(self) -> int:
        """Routers plus leaves (the heap ``node_visits`` counts), per layer."""
        return self.trees * self.nodes

    @property
    def active_nodes(self) -> int:
        return self.trees * (self.depth + 1)

    @property
    def impl(self) -> str:
        """The routing the next forward uses (named like the node family's ``impl`` for reports)."""
        if self.routing != "auto":
            return self.routing
        return "soft" if self.training else "hard"

    def reset_parameters(self, std: float = 0.02) -> None:
        for p in (self.router_w, self.leaf_in, self.leaf_up, self.leaf_out):
            if p is not None:
                nn.init.normal_(p, std=std)
        for p in (self.router_b, self.leaf_in_b, self.leaf_out_b):
            if p is not None:
                nn.init.zeros_(p)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, depth={self.depth}, trees={self.trees}, leaves={self.leaves}, "
                f"leaf_width={self.leaf_width}, activation={self.activation}, gated={self.gated}, "
                f"hardening_weight={self.hardening_weight}")

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if shape[-1] != self.d_model:
            raise ValueError(f"LeafFFN expects inputs with last dimension {self.d_model}, got {tuple(shape)}")
        flat = x.reshape(-1, self.d_model)
        mode = self.routing
        if mode == "auto":
            mode = "soft" if self.training else "hard"
        if mode == "soft":
            y, leaf = self.forward_soft(flat)
        elif mode == "hard":
            y, leaf = self.forward_hard(flat)
        else:
            raise ValueError(f"unknown routing mode {mode!r}; allowed: {', '.join(ROUTING_MODES)}")
        if self.track_stats:
            self._count_visits(flat, leaf)
        return y.view(shape)

    def leaf_probabilities(self, z: torch.Tensor) -> torch.Tensor:
        """(T, K*R) router logits -> (T, K, L) probability of reaching each leaf."""
        tokens = z.shape[0]
        p_right = torch.sigmoid(z).view(tokens, self.trees, self.routers)
        prob = z.new_ones(tokens, self.trees, 1)
        for level in range(self.depth):
            first = 2**level - 1
            right = p_right[:, :, first:first + 2**level]
            # Children of the level's nodes in heap order: (left, right) of each parent in turn.
            prob = torch.stack((prob * (1 - right), prob * right), dim=-1).flatten(2)
        return prob

    def forward_soft(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training path: the probability-weighted mixture of all leaves (two GEMMs, like a dense MLP)."""
        tokens = x.shape[0]
        z = F.linear(x, self.router_w, self.router_b)
        prob = self.leaf_probabilities(z)  # (T, K, L)
        # Binary entropy of sigmoid(z), written stably: H = softplus(z) - sigmoid(z) * z.
        entropy = F.softplus(z) - torch.sigmoid(z) * z
        self.last_router_entropy = entropy.mean() if z.numel() else z.new_zeros(())
        h = self.act(F.linear(x, self.leaf_in, self.leaf_in_b))
        if self.gated:
            h = h * F.linear(x, self.leaf_up)
        h = h.view(tokens, self.trees, self.leaves, self.leaf_width) * prob.unsqueeze(-1)
        y = h.view(tokens, -1) @ self.leaf_out
        if self.leaf_out_b is not None:
            y = y + prob.view(tokens, -1) @ self.leaf_out_b
        return y, self._hard_leaves_from_logits(z.detach())

    @torch.no_grad()
    def _hard_leaves_from_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(T, K*R) logits of all routers -> (T, K) leaf index reached by hard descent."""
        return route_from_logits(z, self.trees, self.depth, self.routers)[:, :, -1] - self.routers

    def _descend(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Hard descent of (T, d) tokens touching only the path routers: D+1 heap nodes per level
        (the last one a leaf), D router logits."""
        offsets = torch.arange(self.trees, device=x.device) * self.routers

        def router_logits(node):
            row = node + offsets
            return row_dots(self.router_w, row, x) + self.router_b[row]

        root = torch.zeros(x.shape[0], self.trees, dtype=torch.long, device=x.device)
        return descend(root, self.depth, router_logits)

    def hard_leaves(self, x: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (T, K) leaf reached by each token in each tree, touching only path routers."""
        return self._descend(x)[0][-1] - self.routers

    @torch.no_grad()
    def walk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard root-to-leaf walk of (T, d) tokens, in the node family's ``walk`` format:
        (global heap rows, routing logits), each (T, K, D+1). Leaves route nothing: their
        level's logit is NaN."""
        nodes, logits = self._descend(x)
        leaf_level = torch.full(nodes[-1].shape, float("nan"), dtype=x.dtype, device=x.device)
        heap_offsets = torch.arange(self.trees, device=x.device).view(1, -1, 1) * self.nodes
        return torch.stack(nodes, dim=2) + heap_offsets, torch.stack([*logits, leaf_level], dim=2)

    def forward_hard(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference path: one leaf MLP per tree and token."""
        leaf = self.hard_leaves(x)
        slot = leaf + torch.arange(self.trees, device=x.device) * self.leaves  # global leaf index
        return self._run_leaves(x, slot, torch.ones_like(slot, dtype=torch.bool)), leaf

    def _run_leaves(self, x: torch.Tensor, slot: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """y[t] = sum_k leaf_{slot[t,k]}(x[t]) over entries where ``alive``; chunked over tokens."""
        chunk = gather_chunk_tokens(self.trees * self.leaf_width * self.d_model)
        if x.shape[0] <= chunk:
            return self._leaf_chunk(x, slot, alive)
        return torch.cat([self._leaf_chunk(a, b, c) for a, b, c in zip(x.split(chunk), slot.split(chunk),
                                                                       alive.split(chunk))])

    def _leaf_chunk(self, x: torch.Tensor, slot: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        tokens, w = x.shape[0], self.leaf_width
        safe = slot.clamp_min(0)
        rows = (safe.unsqueeze(-1) * w + torch.arange(w, device=x.device)).view(tokens, -1)  # (T, K*w)
        h = row_dots(self.leaf_in, rows, x)  # (T, K*w)
        if self.leaf_in_b is not None:
            h = h + self.leaf_in_b[rows]
        h = self.act(h)
        if self.gated:
            h = h * row_dots(self.leaf_up, rows, x)
        # pruned leaves contribute nothing (expand, not repeat_interleave: a view, nothing read on the host)
        h = h * alive.unsqueeze(-1).expand(-1, -1, w).reshape(tokens, -1).to(h.dtype)
        y = weighted_rows(self.leaf_out, rows, h)
        if self.leaf_out_b is not None:
            y = y + (self.leaf_out_b[safe] * alive.unsqueeze(-1).to(y.dtype)).sum(1)
        return y.to(x.dtype)

    @torch.no_grad()
    def _count_visits(self, x: torch.Tensor, leaf: torch.Tensor) -> None:
        """Visits along each token's hard path: D routers and one leaf per tree."""
        heap = self._heap_path(leaf)
        offsets = torch.arange(self.trees, device=leaf.device).view(1, -1, 1) * self.nodes
        rows = (heap + offsets).flatten()
        self.node_visits.index_add_(0, rows, torch.ones_like(rows))  # no host sync (bincount has one on CUDA)

    def _heap_path(self, leaf: torch.Tensor) -> torch.Tensor:
        """(T, K) leaf index -> (T, K, D+1) heap indices from the root down to the leaf."""
        node = leaf + self.routers
        path = [node]
        for _ in range(self.depth):
            node = (node - 1) // 2
            path.append(node)
        return torch.stack(path[::-1], dim=2)


def leaf_layers(model: nn.Module) -> list[LeafFFN]:
    return [m for m in model.modules() if isinstance(m, LeafFFN)]


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum over leaf layers of hardening_weight * mean router entropy of their last soft forward.

    None when the model has no leaf layer with a weight > 0 (add nothing to the loss then).
    Call it right after the training forward pass: it reads what that pass stored.
    """
    terms = [m.hardening_weight * m.last_router_entropy for m in leaf_layers(model)
             if m.hardening_weight > 0 and m.last_router_entropy is not None]
    return torch.stack(terms).sum() if terms else None


def mean_router_entropy(model: nn.Module) -> float | None:
    """Mean over leaf layers of the router entropy of their last soft forward (for logging)."""
    values = [float(m.last_router_entropy.detach()) for m in leaf_layers(model) if m.last_router_entropy is not None]
    return sum(values) / len(values) if values else None


@contextlib.contextmanager
def routing_mode(model: nn.Module, mode: str, track_stats: bool | None = None):
    """Force every leaf layer of ``model`` to "soft" or "hard" routing inside the block
    (``track_stats``: also override visit counting, e.g. False for an extra measuring pass).

    The soft-vs-hard gap of a validation batch: its loss under routing_mode(model, "soft") minus
    the (default, hard) eval loss.
    """
    if mode not in ROUTING_MODES:
        raise ValueError(f"unknown routing mode {mode!r}; allowed: {', '.join(ROUTING_MODES)}")
    layers = leaf_layers(model)
    saved = [(m.routing, m.track_stats) for m in layers]
    for m in layers:
        m.routing = mode
        if track_stats is not None:
            m.track_stats = track_stats
    try:
        yield model
    finally:
        for m, (routing, stats) in zip(layers, saved):
            m.routing, m.track_stats = routing, stats
