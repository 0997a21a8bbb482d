"""Triton kernels for the tree FFN, in two modes that compute the same function.

The layer (docs/design.md) for one token x, per tree k, walks D+1 levels (L = D+1 nodes):

    z_l = w_in[row_l] . x + b_in[row_l],   row_{l+1} = child of row_l (right iff z_l > 0)
    node:     y = sum_{k,l} act(z_l) * w_out[row_l]
    post_sum: y = act( sum_{k,l} z_l * w_out[row_l] )

mode "gather" touches only the path rows (fp32 accumulation; fp64 for fp64 inputs):

    _route_kernel    grid (token tiles, trees): walk the levels, store z and the node of
                     every (token, tree, level). Decode speculates: one round loads a whole
                     2-level subtree, so the chain of dependent memory round trips is shorter.
    _combine_kernel  grid (token tiles, d tiles): out = sum over the K*L path entries of
                     coef * W[row]. Forward: W = w_out, coef = act(z) or z. Backward for x:
                     W = w_in, coef = dL/dz.
    _gcoef_kernel    grid (token tiles, trees): dL/dz for every path entry, from dL/dy and the
                     path rows of w_out (times act'(z) for placement "node").
    _wgrad_kernel    grid (node rows, d tiles): weight gradients of one node row from the
                     entries routed through it (a CSR list built with one sort); rows no token
                     visited are written as zeros without reading anything.

These are CUDA-core dot products on gathered rows: each (token, tree, level) needs its own row,
so there is no tile with reuse for tensor cores. They win while the layer is bound by weight
bytes and latency (a few tokens); measured on an H200 they lose to one cuBLAS GEMM from about
16 tokens on (docs/kernels.md). Mode "dense" is for those batches: all node pre-activations in
one GEMM, a Triton kernel that routes and writes the (tokens, K*N) coefficient matrix (path
entries, zeros elsewhere) in place, and a second GEMM; the backward is four GEMMs around the
same kind of kernel. Same function and gradients; ``mode="auto"`` picks by token count.
Entries are laid out (T, K, L) row-major everywhere: flat index t*K*L + k*L + l.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from treeffn.activations import get_activation
from treeffn.config import MAX_DEPTH, PLACEMENTS, nodes_per_tree
from treeffn.kernels import triton_common as tc
from treeffn.kernels.triton_common import ACT_IDS, _act, _act_grad, _p2, _warps, interpreting

WGRADS = ("auto", "sparse", "dense")
MODES = ("auto", "gather", "dense", "decode")
# mode="auto": the path-only kernels up to this many tokens, the GEMM form above (measured
# crossover on an H200 at OPT-1.3B width: 16 tokens).
GATHER_MAX_TOKENS = 16
# The dense mode's routing tile holds one tree's N nodes per token: up to depth 11.
DENSE_MAX_DEPTH = 11
# wgrad="auto" (gather mode): sparse CSR kernel up to this many tokens, two GEMMs above. 0: the
# GEMMs were faster at every batch measured on an H200 (docs/kernels.md); "sparse" stays on offer.
SPARSE_WGRAD_MAX_TOKENS = 0


# --------------------------------------------------------------------------- kernels
@triton.jit
def _route_kernel(
    x_ptr, w_ptr, b_ptr, z_ptr, node_ptr,
    T, D_MODEL, N_NODES, LEVELS, stride_x, stride_w,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    SPEC: tl.constexpr, JP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    pid_t = tl.program_id(0)
    tree = tl.program_id(1)
    n_trees = tl.num_programs(1)
    tok = pid_t * BT + tl.arange(0, BT)
    tmask = tok < T
    # A round covers SPEC levels: the subtree below the current node, slots in heap order.
    j = tl.arange(0, JP)
    sub = (j >= 1).to(tl.int32) + (j >= 3).to(tl.int32) + (j >= 7).to(tl.int32)  # slot's depth
    pow_sub = tl.full([JP], 1, tl.int32) << sub  # 2^depth of each slot
    first = pow_sub - 1  # first slot at that depth
    jvalid = j < (1 << SPEC) - 1
    x_rows = x_ptr + tok.to(tl.int64) * stride_x
    out_base = tok.to(tl.int64) * (n_trees * LEVELS) + tree * LEVELS
    node = tl.zeros([BT], dtype=tl.int32)  # node (local to the tree) at the top of the round
    for level0 in range(0, LEVELS, SPEC):
        # Descendants of `node` at relative depth s are contiguous in heap order.
        cand = (node[:, None] + 1) * pow_sub[None, :] - 1 + (j - first)[None, :]
        lmask = tmask[:, None] & (jvalid & (level0 + sub < LEVELS))[None, :]
        rows = tree * N_NODES + cand
        w_rows = w_ptr + rows.to(tl.int64) * stride_w
        acc = tl.zeros([BT, JP, BD], dtype=ACC)
        for d0 in range(0, D_MODEL, BD):
            cols = d0 + tl.arange(0, BD)
            cmask = cols < D_MODEL
            xv = tl.load(x_rows[:, None] + cols[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
            wv = tl.load(w_rows[:, :, None] + cols[None, None, :],
                         mask=lmask[:, :, None] & cmask[None, None, :], other=0.0)
            acc += wv.to(ACC) * xv.to(ACC)[:, None, :]
        z = tl.sum(acc, axis=2)
        if HAS_BIAS:
            z += tl.load(b_ptr + rows, mask=lmask, other=0.0).to(ACC)
        cur = tl.zeros([BT], dtype=tl.int32)  # the token's slot inside this round's subtree
        for s in tl.static_range(SPEC):
            pick = j[None, :] == cur[:, None]
            zc = tl.sum(tl.where(pick, z, 0.0), axis=1)
            nc = tl.sum(tl.where(pick, cand, 0), axis=1)
            smask = tmask & ((tok * 0 + level0 + s) < LEVELS)  # block-shaped: scalar&block trips the interpreter
            tl.store(z_ptr + out_base + level0 + s, zc, mask=smask)
            tl.store(node_ptr + out_base + level0 + s, nc.to(tl.int64), mask=smask)
            cur = 2 * cur + 1 + (zc > 0).to(tl.int32)  # strict >: ties go left
        node = (node + 1) * (1 << SPEC) - 1 + (cur - ((1 << SPEC) - 1))


@triton.jit
def _combine_kernel(
    coef_ptr, node_ptr, w_ptr, out_ptr,
    T, D_MODEL, N_NODES, LEVELS, KL, stride_w, stride_out,
    COEF_ACT: tl.constexpr, OUT_ACT: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
    BT: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    tok = pid_t * BT + tl.arange(0, BT)
    tmask = tok < T
    cols = pid_d * BD + tl.arange(0, BD)
    cmask = cols < D_MODEL
    base = tok.to(tl.int64) * KL
    acc = tl.zeros([BT, BD], dtype=ACC)
    for e0 in range(0, KL, BE):
        e = e0 + tl.arange(0, BE)
        m2 = tmask[:, None] & (e < KL)[None, :]
        node = tl.load(node_ptr + base[:, None] + e[None, :], mask=m2, other=0)
        c = tl.load(coef_ptr + base[:, None] + e[None, :], mask=m2, other=0.0).to(ACC)
        if COEF_ACT:
            c = _act(c, ACT)
        c = tl.where(m2, c, 0.0)
        rows = (e // LEVELS)[None, :] * N_NODES + node
        wv = tl.load(w_ptr + rows.to(tl.int64)[:, :, None] * stride_w + cols[None, None, :],
                     mask=m2[:, :, None] & cmask[None, None, :], other=0.0)
        acc += tl.sum(c[:, :, None] * wv.to(ACC), axis=1)
    if OUT_ACT:
        acc = _act(acc, ACT)
    out = out_ptr + tok.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])


@triton.jit
def _gcoef_kernel(
    gy_ptr, z_ptr, node_ptr, w_ptr, gz_ptr,
    T, D_MODEL, N_NODES, LEVELS, stride_gy, stride_w,
    ACT_GRAD: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
    BT: tl.constexpr, LP: tl.constexpr, BD: tl.constexpr,
):
    pid_t = tl.program_id(0)
    tree = tl.program_id(1)
    n_trees = tl.num_programs(1)
    tok = pid_t * BT + tl.arange(0, BT)
    tmask = tok < T
    lvl = tl.arange(0, LP)
    m2 = tmask[:, None] & (lvl < LEVELS)[None, :]
    ent = (tok.to(tl.int64) * (n_trees * LEVELS) + tree * LEVELS)[:, None] + lvl[None, :]
    node = tl.load(node_ptr + ent, mask=m2, other=0)
    w_rows = w_ptr + (tree * N_NODES + node).to(tl.int64) * stride_w
    gy_rows = gy_ptr + tok.to(tl.int64) * stride_gy
    acc = tl.zeros([BT, LP, BD], dtype=ACC)
    for d0 in range(0, D_MODEL, BD):  # every level's row is known: no dependency chain here
        cols = d0 + tl.arange(0, BD)
        cmask = cols < D_MODEL
        g = tl.load(gy_rows[:, None] + cols[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
        wv = tl.load(w_rows[:, :, None] + cols[None, None, :], mask=m2[:, :, None] & cmask[None, None, :], other=0.0)
        acc += wv.to(ACC) * g.to(ACC)[:, None, :]
    gz = tl.sum(acc, axis=2)
    if ACT_GRAD:
        z = tl.load(z_ptr + ent, mask=m2, other=0.0).to(ACC)
        gz = gz * _act_grad(z, ACT)
    tl.store(gz_ptr + ent, gz, mask=m2)


@triton.jit
def _wgrad_kernel(
    ptr_ptr, perm_ptr, z_ptr, gz_ptr, gy_ptr, x_ptr, dwin_ptr, dwout_ptr,
    D_MODEL, KL, stride_gy, stride_x, stride_dw,
    COEF_ACT: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
    BE: tl.constexpr, BD: tl.constexpr,
):
    # One program per node row, looping over d inside: a grid of (rows x d tiles) spent most
    # of its time starting programs and waiting on the row's entry list.
    row = tl.program_id(0)
    start = tl.load(ptr_ptr + row)
    end = tl.load(ptr_ptr + row + 1)
    for d0 in range(0, D_MODEL, BD):
        cols = d0 + tl.arange(0, BD)
        cmask = cols < D_MODEL
        acc_in = tl.zeros([BD], dtype=ACC)
        acc_out = tl.zeros([BD], dtype=ACC)
        for e0 in range(start, end, BE):  # the entries (token, tree, level) routed through `row`
            e = e0 + tl.arange(0, BE)
            em = e < end
            ent = tl.load(perm_ptr + e, mask=em, other=0)
            tok = ent // KL
            a = tl.load(z_ptr + ent, mask=em, other=0.0).to(ACC)
            if COEF_ACT:
                a = _act(a, ACT)
            a = tl.where(em, a, 0.0)
            g = tl.load(gz_ptr + ent, mask=em, other=0.0).to(ACC)
            m2 = em[:, None] & cmask[None, :]
            gyv = tl.load(gy_ptr + tok[:, None] * stride_gy + cols[None, :], mask=m2, other=0.0).to(ACC)
            xv = tl.load(x_ptr + tok[:, None] * stride_x + cols[None, :], mask=m2, other=0.0).to(ACC)
            acc_out += tl.sum(a[:, None] * gyv, axis=0)
            acc_in += tl.sum(g[:, None] * xv, axis=0)
        off = row.to(tl.int64) * stride_dw + cols
        tl.store(dwout_ptr + off, acc_out.to(dwout_ptr.dtype.element_ty), mask=cmask)
        tl.store(dwin_ptr + off, acc_in.to(dwin_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _route_dense_kernel(
    zall_ptr, z_ptr, node_ptr,
    T, N_NODES, LEVELS, stride_zall,
    COEF_ACT: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr,
):
    """Dense mode: route on the precomputed z of all nodes (T, K*N) and overwrite each tree's
    block of it, in place, with the coefficient matrix: act(z) or z on the path, 0 elsewhere.

    The block is loaded once and the levels are walked in registers: no chain of dependent
    memory reads, and no thread can overwrite an element another thread has yet to read.
    """
    pid_t = tl.program_id(0)
    tree = tl.program_id(1)
    n_trees = tl.num_programs(1)
    tok = pid_t * BT + tl.arange(0, BT)
    tmask = tok < T
    cols = tl.arange(0, NP)
    row = zall_ptr + tok.to(tl.int64) * stride_zall + tree * N_NODES
    bmask = tmask[:, None] & (cols < N_NODES)[None, :]
    zb = tl.load(row[:, None] + cols[None, :], mask=bmask, other=0.0).to(ACC)
    out_base = tok.to(tl.int64) * (n_trees * LEVELS) + tree * LEVELS
    node = tl.zeros([BT], dtype=tl.int32)
    coef = tl.zeros([BT, NP], dtype=ACC)
    for level in range(LEVELS):
        sel = cols[None, :] == node[:, None]
        zc = tl.sum(tl.where(sel, zb, 0.0), axis=1)
        tl.store(z_ptr + out_base + level, zc, mask=tmask)
        tl.store(node_ptr + out_base + level, node.to(tl.int64), mask=tmask)
        c = _act(zc, ACT) if COEF_ACT else zc
        coef = tl.where(sel, c[:, None], coef)
        node = 2 * node + 1 + (zc > 0).to(tl.int32)
    tl.debug_barrier()  # every thread has read the block before any thread overwrites it
    tl.store(row[:, None] + cols[None, :], coef.to(zall_ptr.dtype.element_ty), mask=bmask)


@triton.jit
def _grad_dense_kernel(
    da_ptr, z_ptr, node_ptr, gz_ptr,
    T, N_NODES, LEVELS, stride_da,
    ACT_GRAD: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr,
):
    """Dense-mode backward: dL/dA (T, K*N) from one GEMM -> dL/dz on the path, written to gz
    (T, K, L) and, in place over dL/dA, as the (T, K*N) matrix with zeros off the path."""
    pid_t = tl.program_id(0)
    tree = tl.program_id(1)
    n_trees = tl.num_programs(1)
    tok = pid_t * BT + tl.arange(0, BT)
    tmask = tok < T
    cols = tl.arange(0, NP)
    row = da_ptr + tok.to(tl.int64) * stride_da + tree * N_NODES
    bmask = tmask[:, None] & (cols < N_NODES)[None, :]
    gb = tl.load(row[:, None] + cols[None, :], mask=bmask, other=0.0).to(ACC)
    out_base = tok.to(tl.int64) * (n_trees * LEVELS) + tree * LEVELS
    g = tl.zeros([BT, NP], dtype=ACC)
    for level in range(LEVELS):
        node = tl.load(node_ptr + out_base + level, mask=tmask, other=0)
        sel = cols[None, :] == node[:, None]
        gzc = tl.sum(tl.where(sel, gb, 0.0), axis=1)
        if ACT_GRAD:
            gzc = gzc * _act_grad(tl.load(z_ptr + out_base + level, mask=tmask, other=0.0).to(ACC), ACT)
        tl.store(gz_ptr + out_base + level, gzc, mask=tmask)
        g = tl.where(sel, gzc[:, None], g)
    tl.debug_barrier()  # as in _route_dense_kernel: all reads of the block before the overwrite
    tl.store(row[:, None] + cols[None, :], g.to(da_ptr.dtype.element_ty), mask=bmask)


# --------------------------------------------------------------------------- tile choices
# Fixed tiles, a function of the shape alone: no tuner runs, what these tables say is what runs.
# They come from tile sweeps on an H200 at OPT-1.3B width (`treeffn bench mode=tune`, which
# measures candidates by passing ``tile=`` to a launcher; docs/kernels.md). ``tile``, where a
# function takes it, replaces keys of the fixed choice for one call.
def route_config(tokens: int, d: int, inference: bool, tile: dict | None = None) -> dict:
    """Tiles of _route_kernel."""
    if inference and tokens <= 8:
        cfg = dict(SPEC=2, BT=1, BD=min(_p2(d), 2048))  # 4 dependent rounds instead of 7
    elif tokens <= 32:
        cfg = dict(SPEC=1, BT=1, BD=min(_p2(d), 2048))
    elif tokens <= 512:
        cfg = dict(SPEC=1, BT=16, BD=min(_p2(d), 256))
    else:
        cfg = dict(SPEC=1, BT=32, BD=min(_p2(d), 256))
    return {**cfg, **(tile or {})}


def combine_config(tokens: int, entries: int, d: int, tile: dict | None = None) -> dict:
    """Tiles of _combine_kernel."""
    if tokens <= 512:
        be = min(_p2(entries), 512 if tokens <= 4 else 256)
        cfg = dict(BT=1, BE=be, BD=min(_p2(d), max(16, 8192 // be)))
    else:
        cfg = dict(BT=64, BE=4, BD=min(_p2(d), 32))
    return {**cfg, **(tile or {})}


def gcoef_config(tokens: int, levels: int, d: int, tile: dict | None = None) -> dict:
    """Tiles of _gcoef_kernel."""
    lp = _p2(levels)
    if tokens <= 4:
        cfg = dict(BT=1, BD=min(_p2(d), max(16, 8192 // lp)))
    elif tokens <= 512:
        cfg = dict(BT=1, BD=min(_p2(d), 256))
    else:
        cfg = dict(BT=max(1, 128 // lp), BD=min(_p2(d), 64))
    return {**cfg, **(tile or {})}


def dense_config(n_nodes: int) -> dict:
    # ~4 block elements per thread: 32 tokens x 128 nodes on 4 warps needed 254 registers and
    # spilled (cuobjdump -res-usage), which made the kernel the slowest part of the GEMM form.
    np_ = _p2(n_nodes)
    bt = max(1, 1024 // np_)
    return dict(BT=bt, NP=np_, num_warps=max(1, min(8, bt * np_ // 128)))


def wgrad_config(d: int) -> dict:
    return dict(BE=16, BD=min(_p2(d), 256))


def _acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


# --------------------------------------------------------------------------- launchers
def route(x, w_in, b_in, trees: int, depth: int, inference: bool = False, tile: dict | None = None):
    """z (T, K, L) in the accumulator dtype and node (T, K, L) int64, local to each tree.

    int64 so the path is returned as is: a conversion would be one more launch per decode step.
    """
    T, d = x.shape
    levels, n_nodes = depth + 1, nodes_per_tree(depth)
    acc_tl, acc_torch = _acc_dtype(x.dtype)
    z = tc._empty(T, trees, levels, device=x.device, dtype=acc_torch)
    node = tc._empty(T, trees, levels, device=x.device, dtype=torch.int64)
    if T == 0:
        return z, node
    cfg = route_config(T, d, inference, tile)
    spec = min(cfg["SPEC"], levels)
    jp = _p2((1 << spec) - 1)
    bt, bd = cfg["BT"], cfg["BD"]
    grid = (triton.cdiv(T, bt), trees)
    _route_kernel[grid](
        x, w_in, b_in if b_in is not None else w_in, z, node,
        T, d, n_nodes, levels, x.stride(0), w_in.stride(0),
        HAS_BIAS=b_in is not None, ACC=acc_tl, SPEC=spec, JP=jp, BT=bt, BD=bd,
        num_warps=cfg.get("num_warps", _warps(bt * jp * bd)),
    )
    return z, node


def combine(coef, node, w, depth: int, out_dtype, coef_act: bool, out_act: bool, act_id: int,
            tile: dict | None = None):
    """out (T, d) = sum over each token's path entries of f(coef) * w[row]."""
    T, trees, levels = node.shape
    d = w.shape[1]
    out = tc._empty(T, d, device=w.device, dtype=out_dtype)
    if T == 0:
        return out
    kl = trees * levels
    acc_tl, _ = _acc_dtype(w.dtype)
    cfg = combine_config(T, kl, d, tile)
    bt, be, bd = cfg["BT"], cfg["BE"], cfg["BD"]
    grid = (triton.cdiv(T, bt), triton.cdiv(d, bd))
    _combine_kernel[grid](
        coef, node, w, out, T, d, nodes_per_tree(depth), levels, kl, w.stride(0), out.stride(0),
        COEF_ACT=coef_act, OUT_ACT=out_act, ACT=act_id, ACC=acc_tl, BT=bt, BE=be, BD=bd,
        num_warps=cfg.get("num_warps", _warps(bt * be * bd)),
    )
    return out


def grad_coef(gy, z, node, w_out, depth: int, act_grad: bool, act_id: int, tile: dict | None = None):
    """dL/dz (T, K, L): <gy[t], w_out[row]> (times act'(z) for placement node)."""
    T, trees, levels = node.shape
    d = w_out.shape[1]
    gz = tc._empty(T, trees, levels, device=gy.device, dtype=z.dtype)
    if T == 0:
        return gz
    acc_tl, _ = _acc_dtype(w_out.dtype)
    lp = _p2(levels)
    cfg = gcoef_config(T, levels, d, tile)
    bt, bd = cfg["BT"], cfg["BD"]
    _gcoef_kernel[(triton.cdiv(T, bt), trees)](
        gy, z, node, w_out, gz, T, d, nodes_per_tree(depth), levels, gy.stride(0), w_out.stride(0),
        ACT_GRAD=act_grad, ACT=act_id, ACC=acc_tl, BT=bt, LP=lp, BD=bd,
        num_warps=cfg.get("num_warps", _warps(bt * lp * bd)),
    )
    return gz


def global_rows(node, depth: int):
    """(T, K, L) local nodes -> (T, K*L) int64 rows of the (K*N, d) tables."""
    T, trees, levels = node.shape
    offsets = torch.arange(trees, device=node.device).view(1, trees, 1) * nodes_per_tree(depth)
    return (node.long() + offsets).view(T, trees * levels)


def weight_grads_sparse(x, gy, z, gz, node, depth: int, coef_act: bool, act_id: int, total_rows: int):
    """dW_in, dW_out from a CSR list of the entries per node row (one sort, no atomics)."""
    T, trees, levels = node.shape
    d = x.shape[1]
    rows = global_rows(node, depth).flatten()
    sorted_rows, perm = torch.sort(rows, stable=True)  # stable: a fixed summation order
    # ptr[r] = first entry of row r; searchsorted needs no host sync (bincount would).
    ptr = torch.searchsorted(sorted_rows, torch.arange(total_rows + 1, device=x.device))
    dw_in = tc._empty(total_rows, d, device=x.device, dtype=x.dtype)
    dw_out = tc._empty(total_rows, d, device=x.device, dtype=x.dtype)
    acc_tl, _ = _acc_dtype(x.dtype)
    cfg = wgrad_config(d)
    be, bd = cfg["BE"], cfg["BD"]
    _wgrad_kernel[(total_rows,)](
        ptr, perm, z, gz, gy, x, dw_in, dw_out, d, trees * levels, gy.stride(0), x.stride(0), dw_in.stride(0),
        COEF_ACT=coef_act, ACT=act_id, ACC=acc_tl, BE=be, BD=bd,
        num_warps=cfg.get("num_warps", _warps(2 * be * bd)),
    )
    return dw_in, dw_out


def weight_grads_dense(x, gy, a, gz, node, depth: int, total_rows: int):
    """The same gradients through two GEMMs of a mostly-zero (T, K*N) coefficient matrix."""
    T = x.shape[0]
    rows = global_rows(node, depth)
    coef = torch.zeros(T, total_rows, device=x.device, dtype=x.dtype)
    coef.scatter_(1, rows, a.reshape(T, -1).to(x.dtype))
    dw_out = coef.t() @ gy
    coef.zero_().scatter_(1, rows, gz.reshape(T, -1).to(x.dtype))
    dw_in = coef.t() @ x
    return dw_in, dw_out


def route_dense(x, w_in, b_in, trees: int, depth: int, coef_act: bool, act_id: int):
    """Dense mode forward, first half: (coefficient matrix (T, K*N) in x's dtype, z, node)."""
    T = x.shape[0]
    levels, n_nodes = depth + 1, nodes_per_tree(depth)
    acc_tl, acc_torch = _acc_dtype(x.dtype)
    coef = torch.nn.functional.linear(x, w_in, b_in)  # z of every node; overwritten in place
    z = tc._empty(T, trees, levels, device=x.device, dtype=acc_torch)
    node = tc._empty(T, trees, levels, device=x.device, dtype=torch.int64)
    if T:
        cfg = dense_config(n_nodes)
        _route_dense_kernel[(triton.cdiv(T, cfg["BT"]), trees)](
            coef, z, node, T, n_nodes, levels, coef.stride(0),
            COEF_ACT=coef_act, ACT=act_id, ACC=acc_tl, BT=cfg["BT"], NP=cfg["NP"],
            num_warps=cfg.get("num_warps", _warps(cfg["BT"] * cfg["NP"])),
        )
    return coef, z, node


def grad_dense(gy, z, node, w_out, depth: int, act_grad: bool, act_id: int):
    """Dense mode backward: (dL/dz as a (T, K*N) matrix with zeros off the path, gz (T, K, L))."""
    T, trees, levels = node.shape
    n_nodes = nodes_per_tree(depth)
    g = gy @ w_out.t()  # dL/d(coefficient) of every node; overwritten in place
    gz = tc._empty(T, trees, levels, device=gy.device, dtype=z.dtype)
    if T:
        acc_tl, _ = _acc_dtype(gy.dtype)
        cfg = dense_config(n_nodes)
        _grad_dense_kernel[(triton.cdiv(T, cfg["BT"]), trees)](
            g, z, node, gz, T, n_nodes, levels, g.stride(0),
            ACT_GRAD=act_grad, ACT=act_id, ACC=acc_tl, BT=cfg["BT"], NP=cfg["NP"],
            num_warps=cfg.get("num_warps", _warps(cfg["BT"] * cfg["NP"])),
        )
    return g, gz


def pick_mode(mode: str, tokens: int, depth: int, needs_grad: bool = False) -> str:
    if mode == "auto":
        from treeffn.kernels import DECODE_MAX_TOKENS

        if not needs_grad and tokens <= DECODE_MAX_TOKENS:
            return "decode"  # inference at decode sizes: the one-launch kernel (triton_decode.py)
        mode = "gather" if tokens <= GATHER_MAX_TOKENS else "dense"
    if mode == "decode" and needs_grad:
        raise ValueError("mode='decode' is inference only (no autograd); use mode auto, gather or dense to train")
    if mode == "dense" and depth > DENSE_MAX_DEPTH:
        mode = "gather"  # a (tokens, N) routing tile per tree would not fit
    return mode


# --------------------------------------------------------------------------- autograd
class TreeFFNFunction(torch.autograd.Function):
    """Training path. Returns (out, node): out = sum act(z)*v ("node") or sum z*v (post_sum's
    pre-activation; the caller applies act so that autograd handles act').

    gather mode saves x, the weights, z (T,K,L) and the path, and its backward reads only path
    rows (weight gradients through the CSR kernel, or two GEMMs when wgrad says so). dense mode
    saves the coefficient matrix instead and runs four GEMMs around _grad_dense_kernel.
    """

    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, depth, node_act, act_id, wgrad, mode):
        trees = w_in.shape[0] // nodes_per_tree(depth)
        if mode == "dense":
            coef, z, node = route_dense(x, w_in, b_in, trees, depth, node_act, act_id)
            out = coef @ w_out
            ctx.save_for_backward(x, w_in, b_in, w_out, z, node, coef)
        else:
            z, node = route(x, w_in, b_in, trees, depth, inference=False)
            out = combine(z, node, w_out, depth, x.dtype, coef_act=node_act, out_act=False, act_id=act_id)
            ctx.save_for_backward(x, w_in, b_in, w_out, z, node)
        ctx.depth, ctx.node_act, ctx.act_id, ctx.wgrad, ctx.mode = depth, node_act, act_id, wgrad, mode
        ctx.mark_non_differentiable(node)
        return out, node

    @staticmethod
    def backward(ctx, gy, _gnode):
        x, w_in, b_in, w_out, z, node, *saved = ctx.saved_tensors
        depth, node_act, act_id = ctx.depth, ctx.node_act, ctx.act_id
        gy = gy.contiguous()
        T = x.shape[0]
        total_rows = w_in.shape[0]
        gx = gb = dw_in = dw_out = None
        if ctx.mode == "dense":
            (coef,) = saved
            g, gz = grad_dense(gy, z, node, w_out, depth, act_grad=node_act, act_id=act_id)
            if ctx.needs_input_grad[0]:
                gx = g @ w_in
            if ctx.needs_input_grad[1]:
                dw_in = g.t() @ x
            if ctx.needs_input_grad[3]:
                dw_out = coef.t() @ gy
            if b_in is not None and ctx.needs_input_grad[2]:
                # Column sums of G: index_add would pile thousands of atomics onto each root row.
                gb = g.sum(0, dtype=gz.dtype).to(b_in.dtype)
        else:
            gz = grad_coef(gy, z, node, w_out, depth, act_grad=node_act, act_id=act_id)
            if ctx.needs_input_grad[0]:
                gx = combine(gz, node, w_in, depth, x.dtype, coef_act=False, out_act=False, act_id=act_id)
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
                wgrad = ctx.wgrad
                if wgrad == "auto":
                    wgrad = "sparse" if T <= SPARSE_WGRAD_MAX_TOKENS else "dense"
                if wgrad == "sparse":
                    dw_in, dw_out = weight_grads_sparse(x, gy, z, gz, node, depth, node_act, act_id, total_rows)
                else:
                    a = get_activation(_ACT_NAMES[act_id])(z) if node_act else z
                    dw_in, dw_out = weight_grads_dense(x, gy, a, gz, node, depth, total_rows)
        if b_in is not None and ctx.needs_input_grad[2] and gb is None:
            gb = torch.zeros(total_rows, device=x.device, dtype=gz.dtype)
            gb.index_add_(0, global_rows(node, depth).flatten(), gz.flatten())
            gb = gb.to(b_in.dtype)
        return gx, dw_in, gb, dw_out, None, None, None, None, None


_ACT_NAMES = {v: k for k, v in ACT_IDS.items()}


# --------------------------------------------------------------------------- entry point
def tree_ffn_triton(x, w_in, b_in, w_out, trees: int, depth: int, placement: str = "node",
                    activation: str = "gelu", wgrad: str = "auto", mode: str = "auto"):
    """Tree FFN through the Triton kernels: (y (T, d), path (T, K, D+1) int64 local nodes).

    x: (T, d). Differentiable when grad mode is on and any input requires grad. Under CUDA
    autocast the inputs and weights are cast to the autocast dtype, as F.linear would be.
    mode: "gather" (path rows only), "dense" (GEMM form), "decode" (inference only: the one-launch
    kernel of triton_decode.py) or "auto" (decode for inference up to DECODE_MAX_TOKENS tokens,
    else gather up to GATHER_MAX_TOKENS, else dense).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; allowed: {', '.join(PLACEMENTS)}")
    if activation not in ACT_IDS:
        raise ValueError(f"unknown activation {activation!r}; allowed: {', '.join(ACT_IDS)}")
    if wgrad not in WGRADS:
        raise ValueError(f"unknown wgrad {wgrad!r}; allowed: {', '.join(WGRADS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    if not 0 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must be 0..{MAX_DEPTH}, got {depth}")
    if x.dim() != 2 or x.shape[1] != w_in.shape[1]:
        raise ValueError(f"x must be (tokens, {w_in.shape[1]}), got {tuple(x.shape)}")
    if w_in.shape[0] != trees * nodes_per_tree(depth):
        raise ValueError(f"w_in has {w_in.shape[0]} rows; {trees} trees of depth {depth} need "
                         f"{trees * nodes_per_tree(depth)}")
    if not x.is_cuda and not interpreting():
        raise RuntimeError("tree.impl=triton needs a CUDA device (or TRITON_INTERPRET=1, for tests)")
    dtype = x.dtype
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    act_id = ACT_IDS[activation]
    node_act = placement == "node"
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, w_in, w_out = (t.to(dtype).contiguous() for t in (x, w_in, w_out))
        b_in = b_in.to(dtype).contiguous() if b_in is not None else None
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, w_in, b_in, w_out))
        mode = pick_mode(mode, x.shape[0], depth, needs_grad)
        if mode == "decode":
            from treeffn.kernels.triton_decode import tree_decode

            return tree_decode(x, w_in, b_in, w_out, trees, depth, placement, activation)
        if needs_grad:
            out, node = TreeFFNFunction.apply(x, w_in, b_in, w_out, depth, node_act, act_id, wgrad, mode)
            y = out if node_act else get_activation(activation)(out)
        elif mode == "dense":
            coef, _, node = route_dense(x, w_in, b_in, trees, depth, node_act, act_id)
            y = coef @ w_out
            y = y if node_act else get_activation(activation)(y)
        else:
            z, node = route(x, w_in, b_in, trees, depth, inference=True)
            y = combine(z, node, w_out, depth, dtype, coef_act=node_act, out_act=not node_act, act_id=act_id)
    return y, node
