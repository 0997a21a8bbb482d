"""Float64 parity of the tree FFN fast paths, as a function a device run calls before timing.

``decode_parity`` checks the one-launch decode kernel (triton_decode.py) on fresh random inputs
against the float64 reference (treeffn/bench/reference.py): outputs within ``tol`` and every routing
decision equal, over both placements, bias on/off, every activation, plain and gated trees, and
the given tile choices and token counts. ``path_parity`` runs ``treeffn bench``'s check (outputs,
gradients for training paths, routing decisions with near-tie allowance) for any path at a
given width and dtype. tests/test_kernels.py checks against the same reference on the CPU
(Triton's interpreter); scripts/h200_decode.py runs both on the GPU.
"""

from __future__ import annotations

import itertools

import torch

from treeffn.activations import ACTIVATIONS
from treeffn.bench.reference import reference_tree
from treeffn.config import nodes_per_tree

__all__ = ["ACTIVATIONS", "decode_parity", "path_parity", "reference_tree", "training_parity"]


def _params(T, d, trees, depth, bias, gated, device, gen):
    n = trees * nodes_per_tree(depth)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen).to(device)  # noqa: E731
    w_in = r(n, d) / d**0.5
    w_out = r(n, d) / (trees * (depth + 1)) ** 0.5
    b_in = r(n) * 0.3 if bias else None
    w_up = r(n, d) / d**0.5 if gated else None
    return r(T, d), w_in, b_in, w_out, w_up


def decode_parity(device, shapes: list[tuple[int, int, int, int]], tiles: list[dict] | None = None,
                  seed: int = 0, tol: float = 1e-9, exhaustive: bool = False) -> list[dict]:
    """Float64 checks of tree_decode. ``shapes``: (tokens, d, trees, depth). Each shape runs with
    every tile in ``tiles`` (None: the fixed choice); placements x gated x bias are cycled over
    the shapes (all combinations when ``exhaustive``), activations cycled through all six."""
    from treeffn.kernels import triton_decode as td

    gen = torch.Generator().manual_seed(seed)
    combos = list(itertools.product(("node", "post_sum"), (False, True), (True, False)))
    acts = list(ACTIVATIONS)
    out = []
    i = 0
    for shape in shapes:
        T, d, trees, depth = shape
        for tile in tiles or [None]:
            for placement, gated, bias in (combos if exhaustive else [combos[i % len(combos)]]):
                activation = acts[i % len(acts)]
                i += 1
                x, w_in, b_in, w_out, w_up = _params(T, d, trees, depth, bias, gated, device, gen)
                rec = {"kernel": "decode", "tokens": T, "d": d, "trees": trees, "depth": depth,
                       "placement": placement, "gated": gated, "bias": bias, "activation": activation,
                       "tile": td.decode_config(T, d, trees, depth + 1, tile)}
                try:
                    y, path = td.tree_decode(x, w_in, b_in, w_out, trees, depth, placement, activation,
                                             w_up=w_up, tile=tile)
                    y_ref, path_ref, _ = reference_tree(x, w_in, b_in, w_out, trees, depth, placement, activation, w_up)
                    err = ((y - y_ref).abs().max() / y_ref.abs().max().clamp_min(1e-30)).item()
                    rec.update(max_rel_err=err, routing_equal=bool(torch.equal(path, path_ref)),
                               finite=bool(torch.isfinite(y).all()))
                    rec["ok"] = rec["routing_equal"] and rec["finite"] and err < tol
                except Exception as e:
                    rec.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                out.append(rec)
    return out


def training_parity(device, shapes: list[tuple[int, int, int, int]], seed: int = 0, tol: float = 1e-9) -> list[dict]:
    """Float64 outputs and all gradients of tree_ffn_triton's training modes (gather, dense)
    and of the layer's masked and gather PyTorch paths, against the reference by autograd."""
    from treeffn.kernels.triton_tree import tree_ffn_triton

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, (T, d, trees, depth) in enumerate(shapes):
        placement = ("node", "post_sum")[i % 2]
        activation = list(ACTIVATIONS)[i % len(ACTIVATIONS)]
        x, w_in, b_in, w_out, _ = _params(T, d, trees, depth, True, False, device, gen)
        gy = torch.randn(T, d, dtype=torch.float64, generator=gen).to(device)
        leaves = [t.clone().requires_grad_(True) for t in (x, w_in, b_in, w_out)]
        y_ref, path_ref, _ = reference_tree(*leaves, trees, depth, placement, activation)
        refs = torch.autograd.grad(y_ref, leaves, gy)
        for mode in ("gather", "dense"):
            rec = {"kernel": f"triton_{mode}", "tokens": T, "d": d, "trees": trees, "depth": depth,
                   "placement": placement, "activation": activation}
            try:
                mine = [t.clone().requires_grad_(True) for t in (x, w_in, b_in, w_out)]
                y, path = tree_ffn_triton(*mine, trees, depth, placement, activation, mode=mode)
                grads = torch.autograd.grad(y, mine, gy)
                errs = [((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                        for a, b in zip((y, *grads), (y_ref, *refs))]
                rec.update(max_rel_err=max(errs), routing_equal=bool(torch.equal(path, path_ref)))
                rec["ok"] = rec["routing_equal"] and max(errs) < tol
            except Exception as e:
                rec.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            out.append(rec)
    return out


def path_parity(device, dtype, d: int, trees: int, depth: int, tokens: list[int], paths: list[str],
                modes: tuple[str, ...] = ("fwd",), seed: int = 0) -> list[dict]:
    """``treeffn bench``'s check for each path, token count and mode (low precision: the dtype's tolerance)."""
    from treeffn.bench.layer import _skip_reason
    from treeffn.bench.problems import check_tree, make_tree

    torch.manual_seed(seed)
    layer = make_tree(d, trees, depth, device, dtype, "node")
    out = []
    for T in tokens:
        for mode in modes:
            for p in layer.parameters():
                p.requires_grad_(mode != "fwd")
            for path in paths:
                if _skip_reason(path, mode, T):
                    continue
                rec = {"kernel": path, "tokens": T, "d": d, "trees": trees, "depth": depth, "mode": mode,
                       "dtype": str(dtype).replace("torch.", "")}
                try:
                    rec.update(check_tree(path, layer, T, mode, dtype, device))
                except Exception as e:
                    rec.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                out.append(rec)
    return out
