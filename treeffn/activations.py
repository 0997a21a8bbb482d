"""The element-wise nonlinearities a tree node, a post-sum or a dense MLP may use, by name.

The names, in the order the Triton kernels number them, are ``treeffn.config.ACTIVATIONS``
(torch-free, for config checks); here is what each computes, in PyTorch. The layers, the
kernels' PyTorch side and the float64 reference (treeffn/bench/parity.py) all use this table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from treeffn.config import ACTIVATIONS as ACTIVATION_NAMES

_DEFINITIONS = {
    "gelu": lambda z: F.gelu(z),  # exact (erf) GELU, as OPT uses
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": lambda z: z,
}
# In the names' order; a name without a definition fails here, at import.
ACTIVATIONS = {name: _DEFINITIONS[name] for name in ACTIVATION_NAMES}


def get_activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}") from None
