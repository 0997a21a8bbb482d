"""One-launch tree FFN for decoding: every tree and every level of a layer in one Triton kernel.

Inference only (no autograd), for a few tokens a call (decode steps: batch 1 to 64). For one
token x the layer (docs/design.md) is, per tree k, a walk of L = D+1 levels

    z_l = w_in[row_l] . x + b_in[row_l],   row_{l+1} = child of row_l (right iff z_l > 0)
    node:      y = sum_{k,l} act(z_l) * w_out[row_l]
    post_sum:  y = act( sum_{k,l} z_l * w_out[row_l] )
    gated (u_l = w_up[row_l] . x):
      node:      y = sum_{k,l} act(z_l) * u_l * w_out[row_l]
      post_sum:  y = act( sum_{k,l} z_l * w_out[row_l] ) * ( sum_{k,l} u_l * w_out[row_l] )

Grid: (tokens, tree groups). A program takes one token and KB trees. It

1. walks its trees: each round loads the (2^SPEC - 1)-node subtree below the current node of
   every tree (rows known before any of them is needed, so the chain of dependent memory round
   trips is ceil(L / SPEC) long), keeps z and the node of each level in registers;
2. (gated) computes u on the path rows;
3. reads the path rows of w_out once and adds its trees' share of the output to an fp32 row of
   a per-device workspace with atomic adds;
4. counts itself done on the token's counter; the program that arrives last (the counter tells
   it) reads the finished sum, applies the post-sum activation, writes y in the output dtype and
   puts the workspace row and the counter back to zero for the next call.

So there is one launch, no host synchronisation and no shape that depends on the data: the
kernel can be captured in a CUDA graph. The order in which the programs' atomic adds land is
not fixed, so fp32 sums can differ in the last bits between runs (float64 inputs accumulate in
float64 and are checked to 1e-9 against the float64 reference). Calls that share a workspace
must run in stream order (one stream per device, as a decode loop does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# DECODE_MAX_TOKENS: the decode range (batch 1-64). The path-only work grows with the token count
# while dense's weight read does not; above it the multi-launch kernels (gather / GEMM form) take over.
from treeffn.config import nodes_per_tree
from treeffn.kernels import DECODE_MAX_TOKENS
from treeffn.kernels import triton_common as tc
from treeffn.kernels.triton_common import ACT_IDS, _act, _p2, _warps


@triton.jit
def _decode_kernel(
    x_ptr, w_in_ptr, b_in_ptr, w_up_ptr, w_out_ptr, y_ptr, node_ptr, acc_ptr, cnt_ptr,
    D_MODEL, N_NODES, LEVELS, N_TREES, stride_x, stride_w, stride_y, ACC_W,
    HAS_BIAS: tl.constexpr, GATED: tl.constexpr, NODE_ACT: tl.constexpr, ACT: tl.constexpr,
    ACC: tl.constexpr, SPEC: tl.constexpr, JP: tl.constexpr, LP: tl.constexpr, KB: tl.constexpr,
    BD: tl.constexpr,
):
    tok = tl.program_id(0)
    grp = tl.program_id(1)
    n_grp = tl.num_programs(1)
    trees = grp * KB + tl.arange(0, KB)
    kmask = trees < N_TREES
    x_row = x_ptr + tok.to(tl.int64) * stride_x
    tree_base = trees.to(tl.int64) * N_NODES  # first row of each tree

    # ---- 1. routing: rounds of SPEC levels, the whole subtree of a round loaded at once
    j = tl.arange(0, JP)  # slot in the round's subtree, heap order
    sub = (j >= 1).to(tl.int32) + (j >= 3).to(tl.int32) + (j >= 7).to(tl.int32)  # slot's depth (SPEC <= 3)
    pow_sub = tl.full([JP], 1, tl.int32) << sub
    first = pow_sub - 1
    jvalid = j < (1 << SPEC) - 1
    lvl = tl.arange(0, LP)
    node = tl.zeros([KB], dtype=tl.int32)  # local node at the top of the round
    path = tl.zeros([KB, LP], dtype=tl.int32)  # local node of every level
    zs = tl.zeros([KB, LP], dtype=ACC)  # its pre-activation
    for level0 in range(0, LEVELS, SPEC):
        cand = (node[:, None] + 1) * pow_sub[None, :] - 1 + (j - first)[None, :]  # [KB, JP]
        lmask = kmask[:, None] & (jvalid & (level0 + sub < LEVELS))[None, :]
        w_rows = w_in_ptr + (tree_base[:, None] + cand) * stride_w
        z = tl.zeros([KB, JP], dtype=ACC)
        for d0 in range(0, D_MODEL, BD):
            cols = d0 + tl.arange(0, BD)
            cmask = cols < D_MODEL
            xv = tl.load(x_row + cols, mask=cmask, other=0.0).to(ACC)
            wv = tl.load(w_rows[:, :, None] + cols[None, None, :], mask=lmask[:, :, None] & cmask[None, None, :],
                         other=0.0)
            z += tl.sum(wv.to(ACC) * xv[None, None, :], axis=2)
        if HAS_BIAS:
            z += tl.load(b_in_ptr + tree_base[:, None] + cand, mask=lmask, other=0.0).to(ACC)
        cur = tl.zeros([KB], dtype=tl.int32)  # slot inside the round's subtree
        for s in tl.static_range(SPEC):
            pick = j[None, :] == cur[:, None]
            zc = tl.sum(tl.where(pick, z, 0.0), axis=1)
            nc = tl.sum(tl.where(pick, cand, 0), axis=1)
            at = lvl[None, :] == level0 + s  # past the last level this matches no kept column
            path = tl.where(at, nc[:, None], path)
            zs = tl.where(at, zc[:, None], zs)
            cur = 2 * cur + 1 + (zc > 0).to(tl.int32)  # strict >: ties go left
        node = (node + 1) * (1 << SPEC) - 1 + (cur - ((1 << SPEC) - 1))

    pmask = kmask[:, None] & (lvl < LEVELS)[None, :]
    node_out = node_ptr + (tok.to(tl.int64) * N_TREES + trees)[:, None] * LEVELS + lvl[None, :]
    tl.store(node_out, path.to(tl.int64), mask=pmask)
    rows = tree_base[:, None] + path  # [KB, LP] global rows of the path

    # ---- 2. coefficients of the path rows
    if GATED:
        u = tl.zeros([KB, LP], dtype=ACC)
        for d0 in range(0, D_MODEL, BD):
            cols = d0 + tl.arange(0, BD)
            cmask = cols < D_MODEL
            xv = tl.load(x_row + cols, mask=cmask, other=0.0).to(ACC)
            uv = tl.load(w_up_ptr + rows[:, :, None] * stride_w + cols[None, None, :],
                         mask=pmask[:, :, None] & cmask[None, None, :], other=0.0)
            u += tl.sum(uv.to(ACC) * xv[None, None, :], axis=2)
        if NODE_ACT:
            coef = _act(zs, ACT) * u
        else:
            coef = zs
            coef2 = tl.where(pmask, u, 0.0)
    else:
        coef = _act(zs, ACT) if NODE_ACT else zs
    coef = tl.where(pmask, coef, 0.0)

    # ---- 3. this program's share of the output, added to the token's workspace row
    acc_row = acc_ptr + tok.to(tl.int64) * ACC_W
    for d0 in range(0, D_MODEL, BD):
        cols = d0 + tl.arange(0, BD)
        cmask = cols < D_MODEL
        wo = tl.load(w_out_ptr + rows[:, :, None] * stride_w + cols[None, None, :],
                     mask=pmask[:, :, None] & cmask[None, None, :], other=0.0).to(ACC)
        part = tl.sum(tl.sum(coef[:, :, None] * wo, axis=1), axis=0)
        tl.atomic_add(acc_row + cols, part, mask=cmask, sem="relaxed")
        if GATED and not NODE_ACT:
            part2 = tl.sum(tl.sum(coef2[:, :, None] * wo, axis=1), axis=0)
            tl.atomic_add(acc_row + D_MODEL + cols, part2, mask=cmask, sem="relaxed")

    # ---- 4. the last program of this token finishes the row
    tl.debug_barrier()  # every thread's adds are issued before the release below
    done = tl.atomic_add(cnt_ptr + tok, 1, sem="acq_rel")
    if done == n_grp - 1:
        tl.debug_barrier()
        y_row = y_ptr + tok.to(tl.int64) * stride_y
        for d0 in range(0, D_MODEL, BD):
            cols = d0 + tl.arange(0, BD)
            cmask = cols < D_MODEL
            zero = tl.zeros([BD], dtype=ACC)
            # An atomic read (add 0): served where the other programs' adds were performed.
            total = tl.atomic_add(acc_row + cols, zero, mask=cmask, sem="acq_rel")
            if GATED and not NODE_ACT:
                up = tl.atomic_add(acc_row + D_MODEL + cols, zero, mask=cmask, sem="acq_rel")
                out = _act(total, ACT) * up
                tl.store(acc_row + D_MODEL + cols, zero, mask=cmask)
            elif NODE_ACT:
                out = total
            else:
                out = _act(total, ACT)
            tl.store(y_row + cols, out.to(y_ptr.dtype.element_ty), mask=cmask)
            tl.store(acc_row + cols, zero, mask=cmask)
        tl.atomic_xchg(cnt_ptr + tok, 0)


# --------------------------------------------------------------------------- tiles, workspace
def decode_config(tokens: int, d: int, trees: int, levels: int, tile: dict | None = None) -> dict:
    """Tile choice: KB trees per program, SPEC levels per routing round, BD columns per load.

    Fixed tiles, a function of the shape alone (no tuner runs; what the table says is what
    runs). ``tile`` replaces any of the keys for one call: the tests cover other tiles through
    it, and ``treeffn bench mode=tune`` measures candidates through it."""
    # From the tile sweep on an H200 (results/h200_decode/call1/tune.json; d=2048, K=64, D=6):
    # one tree a program and whole rows per load; two levels a routing round up to 8 tokens
    # (17.7 µs at 1 token against 24.4 with half rows), one level above (42.0 µs at 32 tokens
    # against 48.6), where the extra speculative rows cost more than the saved round trip.
    small = tokens <= 8
    spec = 2 if levels > 1 and small else 1
    kb = 1 if tokens * trees >= 64 else min(_p2(trees), 4)
    bd = min(_p2(d), 2048)
    cfg = dict(KB=kb, SPEC=spec, BD=bd, num_warps=8 if small and bd >= 2048 else 4)
    cfg.update(tile or {})
    cfg["SPEC"] = max(1, min(int(cfg["SPEC"]), levels, 3))
    return cfg


# (device, accumulator dtype, row width) -> (accumulator rows, counters); zero between calls.
_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(device: torch.device, dtype: torch.dtype, width: int, tokens: int):
    """The zeroed accumulator rows and counters the kernel leaves zeroed again; grown on demand.

    Growing allocates, so a CUDA-graph capture must be preceded by an eager call of the same
    size (a decode loop's warm-up does that)."""
    key = (device, dtype, width)
    have = _WORKSPACES.get(key)
    if have is None or have[0].shape[0] < tokens:
        rows = max(tokens, DECODE_MAX_TOKENS)
        have = (torch.zeros(rows, width, device=device, dtype=dtype),
                torch.zeros(rows, device=device, dtype=torch.int32))
        _WORKSPACES[key] = have
    return have


# --------------------------------------------------------------------------- entry point
def tree_decode(x, w_in, b_in, w_out, trees: int, depth: int, placement: str = "node", activation: str = "gelu",
                w_up=None, tile: dict | None = None):
    """(y (T, d) in x's dtype, path (T, K, D+1) int64 local nodes) in one kernel launch; no autograd.

    Gated trees: pass ``w_up``. Inputs are used in their own dtype (cast them beforehand, as
    ``tree_ffn_triton`` does under autocast); accumulation is fp32 (fp64 for fp64 inputs).
    ``tile``: keys of ``decode_config`` to use instead of its fixed choice (tests, tile sweeps).
    """
    if activation not in ACT_IDS:
        raise ValueError(f"unknown activation {activation!r}; allowed: {', '.join(ACT_IDS)}")
    if placement not in ("node", "post_sum"):
        raise ValueError(f"unknown placement {placement!r}; allowed: node, post_sum")
    T, d = x.shape
    levels, n_nodes = depth + 1, nodes_per_tree(depth)
    if w_in.shape != (trees * n_nodes, d) or w_out.shape != w_in.shape or (w_up is not None and w_up.shape != w_in.shape):
        raise ValueError(f"weights must be ({trees * n_nodes}, {d}) for {trees} trees of depth {depth}, got "
                         f"w_in {tuple(w_in.shape)}, w_out {tuple(w_out.shape)}")
    if w_in.stride(1) != 1 or w_out.stride() != w_in.stride() or (w_up is not None and w_up.stride() != w_in.stride()):
        raise ValueError("w_in, w_out (and w_up) must be row-major with the same strides")
    if x.stride(1) != 1:
        x = x.contiguous()
    y = tc._empty(T, d, device=x.device, dtype=x.dtype)
    node = tc._empty(T, trees, levels, device=x.device, dtype=torch.int64)
    if T == 0:
        return y, node
    acc_tl, acc_torch = (tl.float64, torch.float64) if x.dtype == torch.float64 else (tl.float32, torch.float32)
    gated_post = w_up is not None and placement == "post_sum"
    acc, cnt = workspace(x.device, acc_torch, 2 * d if gated_post else d, T)
    cfg = decode_config(T, d, trees, levels, tile)
    kb, spec, bd = cfg["KB"], cfg["SPEC"], cfg["BD"]
    jp, lp = _p2((1 << spec) - 1), _p2(levels)
    grid = (T, triton.cdiv(trees, kb))
    _decode_kernel[grid](
        x, w_in, b_in if b_in is not None else w_in, w_up if w_up is not None else w_in, w_out, y, node, acc, cnt,
        d, n_nodes, levels, trees, x.stride(0), w_in.stride(0), y.stride(0), acc.shape[1],
        HAS_BIAS=b_in is not None, GATED=w_up is not None, NODE_ACT=placement == "node", ACT=ACT_IDS[activation],
        ACC=acc_tl, SPEC=spec, JP=jp, LP=lp, KB=kb, BD=bd,
        num_warps=cfg.get("num_warps", _warps(kb * max(jp, lp) * bd)),
    )
    return y, node


__all__ = ["DECODE_MAX_TOKENS", "decode_config", "tree_decode", "workspace"]
