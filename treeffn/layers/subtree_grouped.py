"""A sparse training path for the tree layer: tokens grouped by subtree, one grouped GEMM.

Same contract and values as ``TreeFFN.forward_masked`` (treeffn/layers/tree_ffn.py): K trees of
depth D, N = 2^(D+1) - 1 nodes each in heap order, tree-major parameter rows (tree k's node n is
row k*N + n), right iff z > 0 (ties go left), placement "node" (sum of act(z) * w_out over the
path) or "post_sum" (act of the sum of z * w_out). The masked path computes all K*N nodes for
every token; this one computes only a top part of every tree plus the one subtree each token
ends up in, the way a mixture-of-experts layer runs its experts.

Algorithm, with a split level s (1 <= s <= D, default ``best_split(D)``):

1. Top part, levels 0 .. s-1 (2^s - 1 nodes per tree): one GEMM of all tokens against the
   gathered top rows of w_in (+ bias), the walk through those levels (``routing.descend``, the
   shared rule), the path mask, and a second GEMM against the top rows of w_out.
2. Each (token, tree) pair now sits at one level-s node j of tree k: group g = k * 2^s + j,
   G = K * 2^s groups, each the root of a subtree of S = 2^(D-s+1) - 1 nodes (levels s .. D).
   The T*K pairs are sorted by group (stable argsort), counted per group on the device
   (``index_add_`` into zeros(G), then ``cumsum``: the group offsets), and their token rows are
   gathered into a permuted (T*K, d) copy. The subtree's pre-activations are one grouped GEMM
   of those rows against per-group (d, S_pad) blocks of w_in, S padded with zero rows to a
   multiple of 8 so the shapes stay aligned (a padding node is never on a path: the walk stays
   inside the S real nodes, and the mask zeroes it).
3. The walk inside each subtree (subtree-local heap order), the mask, a second grouped GEMM
   against the per-group (S_pad, d) blocks of w_out, then the rows go back to their pairs and
   are summed over the trees of each token, plus the top part. "post_sum" applies the
   activation to that total.
4. ``path`` (T, K, D+1), local node indices in the full tree, joins the two walks.

The permutation in and out of group order is a pair of small autograd Functions (_PairRows,
_SumPairs), adjoint to each other: gathering the T*K pair rows forward, un-permuting and
summing each token's K rows backward (and the other way round), all gathers and reductions,
deterministic, with float32 sums. Plain index_select would scatter-add T*K rows into T with
atomics in backward (in bfloat16 under autocast), the slowest kernel of the layer on an H200.

The grouped GEMM is ``torch._grouped_mm`` (CPU float32/bfloat16/float16 and CUDA bfloat16, with
16-byte aligned row strides), differentiated by PyTorch's own autograd formula (its backward
is two more grouped GEMMs). Elsewhere (float64, other dtypes or devices, unaligned d, or if the
op refuses) a Python loop over the groups with ordinary matmuls computes the same thing; that
loop reads the group offsets on the host, one synchronisation per call, which the grouped GEMM
path never does.

No host synchronisation on the grouped GEMM path: the sort (argsort), the group counts
(index_add_ into a fixed-size zeros(G)), the offsets (cumsum), gathers, scatters, pads and
the grouped GEMM (offsets read on the device) all have sizes known on the host; no .item(),
.tolist(), nonzero, boolean indexing or bincount without minlength. The row tables are built
on the device once per (K, D, s, device) (``_row_tables``, cached).

Cost per token. Each computed node costs d multiply-adds in and d out (4d FLOP). The masked path
computes K * N nodes; this one K * (2^s - 1) top nodes plus K * S_pad subtree nodes (S_pad =
S rounded up to 8), e.g. K=8, D=9, s=5: 8 * (31 + 32) = 504 nodes instead of 8 * 1023 = 8184.
The price is memory traffic and memory: the permuted copy of the tokens has T*K rows of d
(K times the input), it is written once, read by the forward grouped GEMM and again by the
backward one (for the gradient of the w_in blocks), and its gradient has the same size.
The per-group GEMMs have only S_pad output columns, so their arithmetic intensity is about S_pad
FLOP per loaded element: small subtrees make them bandwidth bound. The path can win for few,
deep trees, where K*N dwarfs the extra traffic (K=8, D=9 at d=2048: 16x fewer FLOPs for a
copy eight times the input), and loses for many shallow trees (K=24 or 64, D=6: N = 127,
S_pad = 16, where the masked GEMM is cheap and the T*K*d copy dominates). That is the
expectation from the counts; the measurement per shape against dense and the masked path is
``python3 scripts/h200_train_speed.py layers`` (no committed record yet).

Mixed precision. Under ``torch.autocast`` for x's device type the GEMM operands are cast to the
autocast dtype here (``torch._grouped_mm`` is on no autocast list), with autocast turned off
inside. Pre-activations leave the GEMMs in that dtype and are widened to float32 for the bias,
the routing decisions and the activation; the node outputs are cast back to the autocast
dtype for the output GEMMs, and y is accumulated over levels and trees in float32 (as is the
"post_sum" activation). The result is returned in the autocast dtype, what ``F.linear`` under
autocast (and so ``forward_masked``) gives. Without autocast the computation runs in x's dtype,
y accumulated in float32 for 16-bit inputs, and y is returned in x's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F

from treeffn.layers.routing import (
    descend,
    global_node_index,
    nodes_per_tree,
    route_from_logits,
)

_PAD = 8  # subtree width padded to a multiple of this (aligned GEMM shapes)
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_PLACEMENTS = ("node", "post_sum")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def split_cost(depth: int, split: int) -> int:
    """Nodes computed per token and tree at split level ``split``: top plus padded subtree."""
    return (2 ** split - 1) + _round_up(nodes_per_tree(depth - split), _PAD)


def best_split(depth: int) -> int:
    """The split level (1 .. depth) with the fewest computed nodes per token and tree.

    Minimises top nodes (2^s - 1) plus the subtree's nodes padded to a multiple of 8, which
    lands at about (depth + 1) / 2 for deep trees (D=9: s=5, 31 + 32 nodes); a tie goes to the
    smaller s (fewer, larger groups). Depth 0 has no split and gives 0.
    """
    if not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be an integer >= 0, got {depth!r}")
    if depth == 0:
        return 0
    return min(range(1, depth + 1), key=lambda s: (split_cost(depth, s), s))


@lru_cache(maxsize=64)
def _row_tables(trees: int, depth: int, split: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Global parameter rows of the top part (K * (2^s - 1),) and of every subtree (G, S).

    Built on the device itself (arange arithmetic, no host-to-device copy), once per key.
    Subtree row (g, m): group g = k * 2^s + j is tree k's level-s node at position j; its local
    node m at local level l, position i (m = 2^l - 1 + i) is full-tree node
    2^(s+l) - 1 + j * 2^l + i.
    """
    n = nodes_per_tree(depth)
    width = 2 ** split
    tree_base = torch.arange(trees, device=device) * n
    top = (tree_base[:, None] + torch.arange(width - 1, device=device)[None, :]).reshape(-1)
    local_levels = depth - split + 1
    level = torch.cat([torch.full((2 ** l,), l, dtype=torch.long, device=device) for l in range(local_levels)])
    scale = 2 ** level
    position = torch.arange(level.numel(), device=device) - (scale - 1)  # m - (2^l - 1)
    j = torch.arange(width, device=device)
    full = (2 ** split) * scale[None, :] - 1 + j[:, None] * scale[None, :] + position[None, :]  # (2^s, S)
    sub = (tree_base[:, None, None] + full[None, :, :]).reshape(trees * width, -1)
    return top, sub


def _grouped_mm_supported(dtype: torch.dtype, device: torch.device, d: int, width: int) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: (rows, d) x (G, d, width) and
    (rows, width) x (G, width, d), row strides a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        ok_dtype = dtype in (torch.float32, torch.bfloat16, torch.float16)
    elif device.type == "cuda":
        ok_dtype = dtype == torch.bfloat16
    else:
        ok_dtype = False
    size = dtype.itemsize
    return ok_dtype and (d * size) % 16 == 0 and (width * size) % 16 == 0


class _GroupedMatmul:
    """Row-grouped matmuls sharing one set of group offsets: ``torch._grouped_mm`` when it is
    supported, else a loop over the groups (group bounds read on the host once, lazily)."""

    def __init__(self, offs: torch.Tensor, use_native: bool):
        self.offs, self.use_native, self._bounds = offs, use_native, None

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a (rows, p) sorted by group, b (G, p, q) -> (rows, q): rows of group g times b[g]."""
        if self.use_native:
            try:
                return torch._grouped_mm(a, b, offs=self.offs)
            except (RuntimeError, NotImplementedError):
                self.use_native = False  # refused (dtype, device, build): the loop from now on
        return self._loop(a, b)

    def _loop(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self._bounds is None:
            self._bounds = [0] + self.offs.tolist()  # the one host sync of the fallback
        pieces = [a[start:end] @ b[g] for g, (start, end) in enumerate(zip(self._bounds, self._bounds[1:]))
                  if end > start]
        return torch.cat(pieces) if pieces else a.new_zeros(a.shape[0], b.shape[2])


class _PairRows(torch.autograd.Function):
    """x (T, d) -> the rows of the sorted (token, tree) pairs (T*K, d), in ``dtype``.

    Row i is token ``token[i]``; ``inverse`` maps pair p = t*K + k to its sorted row. The
    backward un-permutes the rows' gradient and sums each token's K rows, in float32 for 16-bit
    gradients: one gather and one reduction, deterministic. (autograd's own index_select
    backward scatter-adds the T*K rows into T with atomics, in the rows' 16-bit dtype under
    autocast, and was the slowest kernel of the whole layer on an H200.)
    """

    @staticmethod
    def forward(ctx, x, token, inverse, trees, dtype):
        ctx.save_for_backward(inverse)
        ctx.trees, ctx.x_dtype = trees, x.dtype
        return x.to(dtype).index_select(0, token)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (inverse,) = ctx.saved_tensors
        rows = grad.index_select(0, inverse).view(-1, ctx.trees, grad.shape[1])
        grad_x = rows.sum(1, dtype=torch.promote_types(grad.dtype, torch.float32)).to(ctx.x_dtype)
        return grad_x, None, None, None, None


class _SumPairs(torch.autograd.Function):
    """The adjoint of _PairRows: rows of the sorted pairs (T*K, d) -> per token the sum over its
    K trees (T, d), in ``acc``. Backward: one gather of the tokens' gradient rows."""

    @staticmethod
    def forward(ctx, rows, token, inverse, trees, acc):
        ctx.save_for_backward(token)
        ctx.rows_dtype = rows.dtype
        return rows.index_select(0, inverse).view(-1, trees, rows.shape[1]).sum(1, dtype=acc)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (token,) = ctx.saved_tensors
        return grad.to(ctx.rows_dtype).index_select(0, token), None, None, None, None


def _masked(x, w_in, b_in, w_out, trees, depth, placement, act):
    """Every node, masked to the path (what forward_masked computes); for depth 0 and T = 0."""
    z = F.linear(x, w_in, b_in)
    path = route_from_logits(z.detach(), trees, depth)
    rows = global_node_index(path, depth).view(x.shape[0], trees * (depth + 1))
    mask = torch.zeros_like(z).scatter_(1, rows, 1.0)
    if placement == "node":
        return (act(z) * mask) @ w_out, path
    return act((z * mask) @ w_out), path


def grouped_tree_ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_out: torch.Tensor,
    trees: int,
    depth: int,
    placement: str,
    act: Callable[[torch.Tensor], torch.Tensor],
    split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tree layer on (T, d) tokens by top part + subtree-grouped GEMMs (see the module doc).

    Returns (y (T, d), path (T, K, D+1) int64 local node indices), the values of
    ``TreeFFN.forward_masked``; differentiable in x, w_in, b_in and w_out by autograd
    (torch._grouped_mm's own backward; two small adjoint Functions for the permutation).
    ``split`` is the first level of the subtrees (1 <= split <= depth; default best_split).
    """
    if placement not in _PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; allowed: {', '.join(_PLACEMENTS)}")
    if not isinstance(depth, int) or depth < 0 or not isinstance(trees, int) or trees < 1:
        raise ValueError(f"need integers depth >= 0 and trees >= 1, got depth={depth!r}, trees={trees!r}")
    n = nodes_per_tree(depth)
    if x.dim() != 2 or w_in.shape != (trees * n, x.shape[1]) or w_out.shape != w_in.shape:
        raise ValueError(f"expected x (T, d) and w_in, w_out ({trees * n}, d); got x {tuple(x.shape)}, "
                         f"w_in {tuple(w_in.shape)}, w_out {tuple(w_out.shape)}")
    if b_in is not None and b_in.shape != (trees * n,):
        raise ValueError(f"expected b_in ({trees * n},), got {tuple(b_in.shape)}")
    if depth == 0 or x.shape[0] == 0:
        return _masked(x, w_in, b_in, w_out, trees, depth, placement, act)
    s = best_split(depth) if split is None else split
    if not isinstance(s, int) or not 1 <= s <= depth:
        raise ValueError(f"split must be an integer in 1..{depth}, got {split!r}")

    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        compute = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            y, path = _grouped(x, w_in, b_in, w_out, trees, depth, s, placement, act, compute)
        return y.to(compute), path
    y, path = _grouped(x, w_in, b_in, w_out, trees, depth, s, placement, act, x.dtype)
    return y.to(x.dtype), path


def _grouped(x, w_in, b_in, w_out, trees, depth, s, placement, act, compute):
    """The body of grouped_tree_ffn with autocast off: GEMMs in ``compute``, y in ``acc``."""
    tokens, d = x.shape
    pairs = tokens * trees
    width = 2 ** s  # level-s nodes per tree
    groups = trees * width
    sub_nodes = nodes_per_tree(depth - s)
    sub_pad = _round_up(sub_nodes, _PAD)
    acc = torch.float32 if compute in _LOW_PRECISION else compute
    top_rows, sub_rows = _row_tables(trees, depth, s, x.device)
    # parameter rows by index_select (its backward is an index_add_ over distinct rows),
    # not by [] indexing (an accumulating index_put_, which sorts on CUDA)
    w_in_c, w_out_c = w_in.to(compute), w_out.to(compute)
    b_acc = None if b_in is None else b_in.to(acc)

    # ---- top part: levels 0 .. s-1, all tokens, dense
    top = width - 1
    z_top = (x.to(compute) @ w_in_c.index_select(0, top_rows).t()).to(acc)  # (T, K * top)
    if b_acc is not None:
        z_top = z_top + b_acc.index_select(0, top_rows)
    z_top3 = z_top.detach().view(tokens, trees, top)
    root = torch.zeros(tokens, trees, dtype=torch.long, device=x.device)
    top_nodes, _ = descend(root, s, lambda node: z_top3.gather(2, node.unsqueeze(2)).squeeze(2))
    top_path = torch.stack(top_nodes[:s], dim=2)  # (T, K, s) levels 0 .. s-1
    tree_offsets = (torch.arange(trees, device=x.device) * top).view(1, trees, 1)
    mask_top = torch.zeros_like(z_top).scatter_(1, (top_path + tree_offsets).view(tokens, -1), 1.0)
    h_top = act(z_top) * mask_top if placement == "node" else z_top * mask_top
    y = (h_top.to(compute) @ w_out_c.index_select(0, top_rows)).to(acc)

    # ---- grouping: (token, tree) pairs sorted by their level-s node
    with torch.no_grad():
        j = top_nodes[s] - (width - 1)  # (T, K) position of the level-s node
        group = (j + torch.arange(trees, device=x.device).view(1, trees) * width).reshape(-1)
        order = torch.argsort(group, stable=True)  # pair ids p = t * K + k, sorted by group
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(pairs, device=x.device))
        group_sorted = group[order]
        counts = torch.zeros(groups, dtype=torch.long, device=x.device)
        counts.index_add_(0, group, torch.ones_like(group))
        offs = counts.cumsum(0).to(torch.int32)  # end offset of every group, on the device
    gmm = _GroupedMatmul(offs, _grouped_mm_supported(compute, x.device, d, sub_pad))

    # ---- bottom part: the subtree of every pair, as grouped GEMMs
    token = order // trees  # the token of each sorted pair
    a = _PairRows.apply(x, token, inverse, trees, compute)  # (T*K, d) permuted token rows
    flat_rows = sub_rows.view(-1)

    def blocks(table: torch.Tensor) -> torch.Tensor:
        """(G, S_pad, ...) subtree rows of a parameter table, zero rows after the S real ones."""
        rows = table.index_select(0, flat_rows).view(groups, sub_nodes, *table.shape[1:])
        return F.pad(rows, (0, 0) * (table.dim() - 1) + (0, sub_pad - sub_nodes))

    z_sub = gmm(a, blocks(w_in_c).transpose(1, 2)).to(acc)  # (T*K, S_pad)
    if b_acc is not None:
        z_sub = z_sub + blocks(b_acc).index_select(0, group_sorted)
    z_sub_d = z_sub.detach()
    sub_root = torch.zeros(pairs, dtype=torch.long, device=x.device)
    sub_nodes_walk, _ = descend(sub_root, depth - s,
                                lambda node: z_sub_d.gather(1, node.unsqueeze(1)).squeeze(1))
    sub_path = torch.stack(sub_nodes_walk, dim=1)  # (T*K, D-s+1) subtree-local heap indices
    mask_sub = torch.zeros_like(z_sub).scatter_(1, sub_path, 1.0)
    h_sub = act(z_sub) * mask_sub if placement == "node" else z_sub * mask_sub
    out = gmm(h_sub.to(compute), blocks(w_out_c))  # (T*K, d), sorted pairs
    y = y + _SumPairs.apply(out, token, inverse, trees, acc)
    if placement == "post_sum":
        y = act(y)

    # ---- path: top walk + subtree walk mapped to full-tree heap indices
    with torch.no_grad():
        level = torch.arange(depth - s + 1, device=x.device)
        scale = 2 ** level
        j_sorted = (group_sorted % width).unsqueeze(1)
        full = (width * scale - 1) + j_sorted * scale + (sub_path - (scale - 1))
        bottom_path = full.index_select(0, inverse).view(tokens, trees, -1)
        path = torch.cat([top_path, bottom_path], dim=2)
    return y, path
