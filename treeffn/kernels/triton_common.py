"""What the two Triton kernel modules share: the activations as Triton code, tile helpers, buffers.

triton_tree.py (training and the general inference path) and triton_decode.py (the one-launch
decode kernel) both import this; triton_tree.py hands decode-sized inference to triton_decode.py,
so nothing shared may live in either of them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from treeffn.config import ACTIVATIONS

# Activation name -> the constexpr id _act and _act_grad branch on (the order of config.ACTIVATIONS).
ACT_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}


def _empty(*shape, **kwargs):
    """Every output buffer comes from here, so tests can poison it (NaN) and catch unwritten elements."""
    return torch.empty(*shape, **kwargs)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------- activations
@triton.jit
def _tanh(u):
    # tanh through exp: tl.math has no tanh on every backend (the interpreter included).
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:  # exact (erf) GELU
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 1:  # tanh-approximated GELU
        out = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == 2:
        out = tl.where(z > 0, z, 0.0)
    elif ACT == 3:
        out = z / (1.0 + tl.exp(-z))
    elif ACT == 4:
        out = _tanh(z)
    else:
        out = z
    return out


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        out = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 1:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        out = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACT == 2:
        out = tl.where(z > 0, 1.0, 0.0)  # as torch: relu'(0) = 0
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-z))
        out = s * (1.0 + z * (1.0 - s))
    elif ACT == 4:
        t = _tanh(z)
        out = 1.0 - t * t
    else:
        out = tl.where(z == z, 1.0, 1.0)  # ones of z's shape
    return out


# --------------------------------------------------------------------------- tile choices
def _p2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _warps(elements: int) -> int:
    # About 32 accumulator elements per thread.
    return max(1, min(16, elements // 1024))
