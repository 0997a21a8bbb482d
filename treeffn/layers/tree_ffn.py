"""The tree-structured feed-forward layer (docs/design.md): one neuron per node, hard routing.

K trees of depth D, N = 2^(D+1) - 1 nodes each, heap order. Node n has an input row w_n, a
bias b_n and an output row v_n. A token walks root to leaf (right iff w_n·x + b_n > 0) and
only the D+1 nodes on its path contribute:

    placement "node":     y = sum over path nodes of  act(z_n) * v_n
    placement "post_sum": y = act( sum over path nodes of  z_n * v_n )

The path is a constant of the forward pass (stop-gradient): no router, no estimator, no
auxiliary loss; nodes off the path get exactly zero gradient.

Two implementations compute the same function:
  * ``masked`` (training): one GEMM over all nodes, a 0/1 path mask, a second GEMM. The mask
    is built with element-wise operations only (``routing.path_mask``) and the routing
    statistics are read from it, so under ``torch.compile`` (``trainer.compile=true``) routing,
    mask, activation and statistics fuse around the two GEMMs.
  * ``gather`` (inference): walks the levels and touches only the path rows.
  * ``grouped`` (training, few deep trees): the top levels masked, then tokens grouped by the
    subtree they reach, the rest as one grouped GEMM (treeffn/layers/subtree_grouped.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from treeffn import kernels
from treeffn.config import IMPLS, PLACEMENTS
from treeffn.activations import get_activation
from treeffn.layers.path_ops import FULL_PRECISION, gather_chunk_tokens, row_dots, weighted_rows
from treeffn.layers.routing import descend, global_node_index, nodes_per_tree, path_from_mask, path_mask


class TreeFFN(nn.Module):
    """Tree feed-forward layer mapping (..., d_model) -> (..., d_model).

    ``.train()`` uses the masked training path, ``.eval()`` the gather inference path (unless
    ``impl`` forces one). While ``track_stats`` is on, ``node_visits`` counts how often each node
    was on a token's path, and ``level_logits`` holds per level [sum, count] of the routing
    logits on the paths (the masked and gather paths compute them anyway; the Triton paths
    count visits only). The routing-statistics code reads and resets both.
    """

    def __init__(
        self,
        d_model: int,
        depth: int,
        trees: int,
        placement: str = "node",
        activation: str = "gelu",
        bias: bool = True,
        impl: str = "auto",
        init_std: float = 0.02,
    ):
        super().__init__()
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be an integer >= 0 (levels below the root), got {depth!r}")
        if not isinstance(trees, int) or trees < 1:
            raise ValueError(f"trees must be an integer >= 1, got {trees!r}")
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; allowed: {', '.join(PLACEMENTS)}")
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}; allowed: {', '.join(IMPLS)}")
        self.d_model, self.depth, self.trees = d_model, depth, trees
        self.placement, self.activation, self.impl = placement, activation, impl
        self.act = get_activation(activation)
        self.nodes = nodes_per_tree(depth)
        total = trees * self.nodes
        self.w_in = nn.Parameter(torch.empty(total, d_model))
        self.b_in = nn.Parameter(torch.empty(total)) if bias else None
        self.w_out = nn.Parameter(torch.empty(total, d_model))
        self.register_buffer("node_visits", torch.zeros(total, dtype=torch.long))
        # Not saved in checkpoints: a window's logit means restart after a resume.
        self.register_buffer("level_logits", torch.zeros(2, depth + 1, dtype=torch.float64), persistent=False)
        self.track_stats = True
        self.reset_parameters(init_std)

    # ----------------------------------------------------------------- accounting
    @property
    def total_nodes(self) -> int:
        return self.trees * self.nodes

    @property
    def active_nodes(self) -> int:
        """Nodes each token uses: one per level per tree."""
        return self.trees * (self.depth + 1)

    @property
    def active_fraction(self) -> float:
        return self.active_nodes / self.total_nodes

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=std)
        if self.b_in is not None:
            nn.init.zeros_(self.b_in)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, depth={self.depth}, trees={self.trees}, nodes={self.total_nodes}, "
            f"active={self.active_nodes} ({self.active_fraction:.1%}), placement={self.placement}, "
            f"activation={self.activation}, bias={self.b_in is not None}"
        )

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._flat(x)
        if self._decode_fast_path(flat):
            # a decode step: straight to the one-launch kernel (what auto/triton pick here anyway),
            # without the general entry point's checks and casts, which a step pays on the host
            y, path = kernels.tree_decode(flat, self.w_in, self.b_in, self.w_out, self.trees, self.depth,
                                          self.placement, self.activation)
            return self._counted(y, path, x.shape)
        impl = self.impl
        if impl == "auto":
            impl = kernels.auto_impl(flat, self.training)  # the fastest measured path for device and batch
        if impl == "masked":
            y, z, mask = self._masked(flat)
            if self.track_stats:
                self._count_mask(z, mask)
            return y.view(x.shape)
        if impl == "triton":
            from treeffn.kernels import tree_ffn_triton

            y, path = tree_ffn_triton(flat, self.w_in, self.b_in, self.w_out, self.trees, self.depth,
                                      self.placement, self.activation)
        elif impl == "grouped":
            from treeffn.layers.subtree_grouped import grouped_tree_ffn

            y, path = grouped_tree_ffn(flat, self.w_in, self.b_in, self.w_out, self.trees, self.depth,
                                       self.placement, self.act)
        else:
            y, path = self._masked_or_gather(flat, impl)
        return self._counted(y, path, x.shape)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) inputs as (T, d) tokens, or one line on the wrong width."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"{type(self).__name__} expects inputs with last dimension {self.d_model}, "
                             f"got {tuple(x.shape)}")
        return x.reshape(-1, self.d_model)

    def _masked_or_gather(self, flat: torch.Tensor, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The PyTorch paths: masked (every node, training) or gather (the path's rows only)."""
        return self.forward_masked(flat) if impl == "masked" else self.forward_gather(flat)

    def _counted(self, y: torch.Tensor, path: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Count the paths' visits (while track_stats) and give y the input's shape."""
        if self.track_stats:
            self._count_visits(path)
        return y.view(shape)

    def _decode_fast_path(self, flat: torch.Tensor) -> bool:
        """Inference on CUDA at decode sizes, inputs already in the weights' dtype, no autocast."""
        return (flat.is_cuda and not self.training and self.impl in ("auto", "triton")
                and flat.shape[0] <= kernels.DECODE_MAX_TOKENS and not torch.is_grad_enabled()
                and flat.dtype == self.w_in.dtype and not torch.is_autocast_enabled("cuda")
                and kernels.triton_available())

    def forward_masked(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training path: all node pre-activations in one GEMM, mask to the path, second GEMM.
        Returns (y, path); ``forward`` uses ``_masked`` and counts from the mask instead."""
        y, _, mask = self._masked(x)
        return y, path_from_mask(mask.view(x.shape[0], self.trees, self.nodes), self.depth)

    def _masked(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y, z, mask): the output, every node's pre-activation (T, K*N) and the path mask (T, K*N)."""
        z = F.linear(x, self.w_in, self.b_in)
        # 0/1 in z's dtype: a float product is several times cheaper than one with a bool on the CPU
        mask = path_mask(z.detach(), self.trees, self.depth).view(z.shape).to(z.dtype)
        if self.placement == "node":
            return (self.act(z) * mask) @ self.w_out, z, mask
        return self.act((z * mask) @ self.w_out), z, mask

    @torch.no_grad()
    def _count_mask(self, z: torch.Tensor, mask: torch.Tensor) -> None:
        """Visits and per-level logit sums of a masked pass, on the device: column sums of the mask
        (accumulated in float32: exact for counts below 2^24 a call, whatever z's dtype)."""
        self.node_visits += mask.sum(0, dtype=torch.float32).long()
        per_node = torch.sum(z.detach() * mask, dim=0, dtype=torch.float32)
        per_node = per_node.view(self.trees, self.nodes).sum(0)
        per_level = torch.stack([per_node[2**lvl - 1:2**(lvl + 1) - 1].sum() for lvl in range(self.depth + 1)])
        self.level_logits[0] += per_level.double()
        self.level_logits[1] += z.shape[0] * self.trees

    def forward_gather(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference path: touches only the D+1 path rows of each tree."""
        per_token = self.trees * self.d_model
        if x.dtype not in FULL_PRECISION:  # the output rows are gathered too (path_ops.weighted_rows)
            per_token *= self.depth + 1
        chunk = gather_chunk_tokens(per_token)  # (tokens, trees, d) gathered per level
        if x.shape[0] <= chunk:
            return self._gather_chunk(x)
        parts = [self._gather_chunk(piece) for piece in x.split(chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def walk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Root-to-leaf walk of (T, d) tokens: (global rows, pre-activations z), each (T, K, D+1).

        Differentiable in z; the rows (the routing) are constants. z is float32 for bf16/fp16 inputs.
        """
        offsets = torch.arange(self.trees, device=x.device) * self.nodes
        root = torch.zeros(x.shape[0], self.trees, dtype=torch.long, device=x.device)
        nodes, logits = descend(root, self.depth, lambda node: self._logits(x, node + offsets), leaf_logits=True)
        return torch.stack([node + offsets for node in nodes], dim=2), torch.stack(logits, dim=2)

    def _logits(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(T, K) pre-activations z of the nodes at global ``rows`` (T, K), from their rows only."""
        z = row_dots(self.w_in, rows, x)
        return z + self.b_in[rows] if self.b_in is not None else z

    def _gather_chunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = x.shape[0]
        rows, z = self.walk(x)
        if self.track_stats:
            self._sum_level_logits(z.detach())
        weights = self.act(z) if self.placement == "node" else z
        # y[t] = sum_{k,l} weights[t,k,l] * w_out[rows[t,k,l]]
        y = weighted_rows(self.w_out, rows.view(tokens, -1), weights.reshape(tokens, -1))
        if self.placement == "post_sum":
            y = self.act(y)
        y = y.to(x.dtype)
        offsets = torch.arange(self.trees, device=x.device).view(1, -1, 1) * self.nodes
        return y, rows - offsets

    @torch.no_grad()
    def _sum_level_logits(self, z_path: torch.Tensor) -> None:
        """Add (T, K, D+1) path logits to the per-level sums and counts (on the device, no sync)."""
        self.level_logits[0] += z_path.float().sum(dim=(0, 1)).double()
        self.level_logits[1] += z_path.shape[0] * z_path.shape[1]

    @torch.no_grad()
    def _count_visits(self, path: torch.Tensor) -> None:
        # index_add_, not bincount: bincount sizes its output from the data (a host sync on CUDA),
        # which a CUDA-graph capture of a decode step cannot contain.
        rows = global_node_index(path, self.depth).flatten()
        self.node_visits.index_add_(0, rows, torch.ones_like(rows))


def tree_ffn_parameter_count(d_model: int, depth: int, trees: int, bias: bool = True) -> int:
    total = trees * nodes_per_tree(depth)
    return total * (2 * d_model + (1 if bias else 0))

