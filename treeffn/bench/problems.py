"""What ``treeffn bench`` runs: layer shapes, the paths under test, and their float64 checks.

Every path is checked on fresh random inputs against a float64 reference before it is timed:
the outputs (and, for fwd+bwd, the gradients of x, w_in, b_in, w_out) within a relative error
that depends on the dtype, and every routing decision against the float64 pre-activation (a
flip is allowed only at a near-tie, |z| < 1% of rms(z)). A path that fails is not timed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from treeffn.bench.reference import reference_tree
from treeffn.config import nodes_per_tree
from treeffn.layers.routing import global_node_index

# name -> (d_model, dense ffn_dim, trees K, depth D); K = floor(ffn / (2^(D+1)-1)) (docs/design.md)
PRESETS = {
    "opt125m-K24-D6": (768, 3072, 24, 6),
    "opt125m-K12-D7": (768, 3072, 12, 7),
    "opt1.3b-K64-D6": (2048, 8192, 64, 6),
    "opt1.3b-K32-D7": (2048, 8192, 32, 7),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative error (norm of difference / norm of reference) a path may have against float64.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
# Path name -> tree_ffn_triton (mode, wgrad). "triton" is what tree.impl=triton runs (mode auto:
# the decode kernel for inference up to 64 tokens). triton_gather_sparse: the path-only kernels
# with the CSR weight-gradient kernel (fwd+bwd only).
TRITON_MODES = {"triton": ("auto", "auto"), "triton_gather": ("gather", "auto"), "triton_dense": ("dense", "auto"),
                "triton_decode": ("decode", "auto"), "triton_gather_sparse": ("gather", "sparse")}
PATHS = ("dense", "masked", "gather", *TRITON_MODES)
# The gather path's backward is very slow at large batches; it is an inference path.
GATHER_FWDBWD_MAX_TOKENS = 2048


class BenchInputError(ValueError):
    """A bench option that cannot work; the message is one line."""


def parse_preset(name: str) -> tuple[int, int, int, int]:
    """A preset name or ``custom:d,ffn,K,D`` -> (d, ffn, K, D), or BenchInputError."""
    if name in PRESETS:
        return PRESETS[name]
    if not name.startswith("custom:"):
        raise BenchInputError(f"unknown config {name!r}; choose from {', '.join(PRESETS)} or custom:d,ffn,K,D")
    parts = name.split(":", 1)[1].split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4:
        raise BenchInputError(f"config {name!r}: custom: takes four integers d,ffn,K,D (e.g. custom:768,3072,24,6)")
    d, ffn, trees, depth = values
    if d < 1 or ffn < 1 or trees < 1:
        raise BenchInputError(f"config {name!r}: d, ffn and K must be at least 1")
    if not 0 <= depth <= 20:
        raise BenchInputError(f"config {name!r}: depth D must be 0..20")
    if trees * nodes_per_tree(depth) * d > 1 << 31:
        raise BenchInputError(f"config {name!r}: {trees} trees of depth {depth} at width {d} is "
                              f"{trees * nodes_per_tree(depth) * d:,} weights per table; too large to build")
    return d, ffn, trees, depth


def split_configs(text: str) -> list[str]:
    """``configs`` -> names; ``custom:d,ffn,K,D`` keeps its commas (it may sit among presets)."""
    names, i, parts = [], 0, text.split(",")
    while i < len(parts):
        if parts[i].startswith("custom:"):
            names.append(",".join(parts[i:i + 4]))
            i += 4
        else:
            if parts[i]:
                names.append(parts[i])
            i += 1
    return names


# --------------------------------------------------------------------------- problems
def make_dense(d, ffn, device, dtype):
    g = lambda *s: (torch.randn(*s, device=device) * 0.02).to(dtype)  # noqa: E731
    return [g(ffn, d), g(ffn), g(d, ffn), g(d)]


def dense_mlp(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def make_tree(d, trees, depth, device, dtype, placement):
    from treeffn.layers import TreeFFN

    layer = TreeFFN(d, depth, trees, placement=placement, activation="gelu", bias=True).to(device)
    with torch.no_grad():  # routing depends on the signs of w_in.x + b: give the bias a spread too
        layer.b_in.normal_(0, 0.02)
    layer.track_stats = False
    return layer.to(dtype)


def tree_fn(path: str, layer):
    """(x) -> (y, path) for one tree implementation, on the layer's own parameters."""
    if path == "masked":
        return layer.forward_masked
    if path == "gather":
        return layer.forward_gather
    if path in TRITON_MODES:
        from treeffn.kernels.triton_tree import tree_ffn_triton

        mode, wgrad = TRITON_MODES[path]
        return lambda x: tree_ffn_triton(x, layer.w_in, layer.b_in, layer.w_out, layer.trees, layer.depth,
                                         layer.placement, layer.activation, wgrad=wgrad, mode=mode)
    raise BenchInputError(f"unknown path {path!r}; choose from {', '.join(PATHS)}")


def routing_flips(path, z64, trees, depth) -> tuple[int, float]:
    """Decisions on ``path`` that disagree with float64 z, and the largest |z|/rms(z) among them."""
    T = path.shape[0]
    zz = z64.view(T, trees, nodes_per_tree(depth))
    zp = torch.gather(zz, 2, path[:, :, :-1])
    went_right = (path[:, :, 1:] - 2 * path[:, :, :-1] - 1) == 1
    wrong = went_right != (zp > 0)
    worst = (zp[wrong].abs().max() / zz.pow(2).mean().sqrt()).item() if wrong.any() else 0.0
    return int(wrong.sum()), worst


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_tree(path_name, layer, T, mode, dtype, device) -> dict:
    """Fresh random x (and dL/dy); relative errors of y (and grads) against float64."""
    fn = tree_fn(path_name, layer)
    x = torch.randn(T, layer.d_model, device=device).to(dtype)
    params = [layer.w_in, layer.b_in, layer.w_out]
    if mode == "fwd":
        with torch.no_grad():
            y, path = fn(x)
        grads = []
    else:
        xg = x.clone().requires_grad_(True)
        y, path = fn(xg)
        gy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [xg, *params], gy)
    p64 = [t.detach().double().requires_grad_(mode != "fwd") for t in params]
    x64 = x.double().requires_grad_(mode != "fwd")
    y64, _, z64 = reference_tree(x64, *p64, layer.trees, layer.depth, layer.placement, layer.activation, path=path)
    out = {"y": rel(y, y64)}
    if mode != "fwd":
        refs = torch.autograd.grad(y64, [x64, *p64], gy.double())
        for name, g, r in zip(("dx", "dw_in", "db_in", "dw_out"), grads, refs):
            out[name] = rel(g, r)
    flips, worst = routing_flips(path, z64.detach(), layer.trees, layer.depth)
    tol = TOLERANCE[dtype]
    ok = all(v < tol and math.isfinite(v) for v in out.values()) and worst < 1e-2
    rows = global_node_index(path, layer.depth).unique().numel()
    return {"ok": ok, "rel_err": out, "routing_flips": flips, "flip_max_z_over_rms": worst, "distinct_rows": rows}


def check_dense(params, T, mode, dtype, device) -> dict:
    d = params[0].shape[1]
    x = torch.randn(T, d, device=device).to(dtype)
    p = [t.detach().clone().requires_grad_(mode != "fwd") for t in params]
    xg = x.clone().requires_grad_(mode != "fwd")
    y = dense_mlp(xg, *p)
    p64 = [t.detach().double().requires_grad_(mode != "fwd") for t in params]
    x64 = x.double().requires_grad_(mode != "fwd")
    y64 = dense_mlp(x64, *p64)
    out = {"y": rel(y, y64)}
    if mode != "fwd":
        gy = torch.randn_like(y)
        for name, g, r in zip(("dx", "dw1", "db1", "dw2", "db2"), torch.autograd.grad(y, [xg, *p], gy),
                              torch.autograd.grad(y64, [x64, *p64], gy.double())):
            out[name] = rel(g, r)
    return {"ok": all(v < TOLERANCE[dtype] for v in out.values()), "rel_err": out}


def call_closure(fn, x, params, mode):
    """A closure running one forward (no grad) or forward+backward (grads of x and ``params``)."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(x)
        return run
    xg = x.detach().clone().requires_grad_(True)
    gy = torch.randn_like(x)

    def run():
        y = fn(xg)
        y = y[0] if isinstance(y, tuple) else y
        torch.autograd.grad(y, [xg, *params], gy)
    return run


def cost(kind, d, ffn, trees, depth, T, mode, elt, distinct_rows=None) -> tuple[float, float]:
    """(fewest bytes, useful FLOPs). Forward: weights (or the distinct path rows) read once,
    x read, y written. Forward+backward: those weights read once and their gradients written
    once, x, y, dL/dy, dL/dx once each. FLOPs: 4*T*d*units (two products); backward twice that."""
    if kind == "dense":
        w_bytes = (2 * ffn * d + ffn + d) * elt
        flops = 4.0 * T * d * ffn
    else:
        rows = distinct_rows if distinct_rows is not None else trees * nodes_per_tree(depth)
        w_bytes = rows * (2 * d + 1) * elt
        flops = 4.0 * T * d * trees * (depth + 1)
    act_bytes = 2 * T * d * elt
    if mode == "fwd":
        return w_bytes + act_bytes, flops
    return 2 * w_bytes + 2 * act_bytes, 3 * flops
