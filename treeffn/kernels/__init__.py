"""Fast paths for the tree FFN (docs/design.md), each checked against ``treeffn.layers``.

* ``tree_ffn_triton``: Triton kernels for CUDA (inference and training, with a custom
  autograd Function). Triton is optional: ``triton_available()`` says whether it imports.
* ``tree_decode`` (triton_decode.py): the one-launch inference kernel for decode steps.

Nothing here is imported by ``treeffn.layers`` at module load; the layer asks for it lazily.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when ``import triton`` works (it is an optional dependency)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return True


# tree.impl=auto on CUDA: the Triton kernels up to this many tokens per call, the masked
# PyTorch path above. Measured on an H200 (docs/kernels.md): the Triton forms beat dense-masked
# at decode and small batches; from about 2k tokens the masked path's two cuBLAS GEMMs win.
AUTO_TRITON_MAX_TOKENS = 1024


# tree.impl=auto on the CPU at inference: the gather walk up to this many tokens per call, the
# masked path (two GEMMs) above. Measured on this project's 2-core CPU machine, fp32, OPT-125M and
# OPT-1.3B widths with depth-6 trees, host-inclusive loop times, two runs per thread count
# (results/cpu_auto_crossover/: raw records, commands, load averages): with torch's default of 2
# threads gather was 1.0-1.15x masked's speed at 16 tokens and 0.84-0.93x at 24; with 1 thread
# 1.05-1.9x at 8 tokens and 0.75-0.95x at 16. More threads were not measured (the 16 stands).
AUTO_GATHER_MAX_TOKENS_CPU = 16
AUTO_GATHER_MAX_TOKENS_CPU_ONE_THREAD = 8


def cpu_gather_max_tokens() -> int:
    """The CPU inference crossover for torch's current thread count (see above)."""
    import torch

    return AUTO_GATHER_MAX_TOKENS_CPU_ONE_THREAD if torch.get_num_threads() == 1 else AUTO_GATHER_MAX_TOKENS_CPU


def auto_impl(x, training: bool) -> str:
    """What tree.impl=auto runs for this input: "triton", "masked" or "gather".

    CUDA: the Triton kernels up to AUTO_TRITON_MAX_TOKENS tokens (at inference up to 64 tokens
    that is the one-launch decode kernel), masked above. CPU: masked in training; at inference
    gather up to ``cpu_gather_max_tokens()`` tokens (16; 8 with one thread), masked above.
    """
    if x.is_cuda:
        import torch

        if torch.compiler.is_compiling():
            return "masked"  # trainer.compile: the path torch.compile can fuse (treeffn/training/compiling.py)
        if x.shape[0] <= AUTO_TRITON_MAX_TOKENS and triton_available():
            return "triton"
        return "masked"  # the gather path is 50-100x slower than dense on a GPU (docs/design.md, "Speed")
    if training:
        return "masked"
    return "gather" if x.shape[0] <= cpu_gather_max_tokens() else "masked"


# Tokens a call up to which inference runs the one-launch decode kernel (triton_decode.py; the
# same value, kept here so that the layers can ask without importing Triton).
DECODE_MAX_TOKENS = 64


def tree_decode(*args, **kwargs):
    """See ``treeffn.kernels.triton_decode.tree_decode``."""
    global _tree_decode
    if _tree_decode is None:
        from treeffn.kernels.triton_decode import tree_decode as impl

        _tree_decode = impl
    return _tree_decode(*args, **kwargs)


_tree_decode = None


def tree_ffn_triton(*args, **kwargs):
    """See ``treeffn.kernels.triton_tree.tree_ffn_triton``."""
    from treeffn.kernels.triton_tree import tree_ffn_triton as impl

    return impl(*args, **kwargs)


__all__ = ["AUTO_GATHER_MAX_TOKENS_CPU", "AUTO_GATHER_MAX_TOKENS_CPU_ONE_THREAD", "cpu_gather_max_tokens", "AUTO_TRITON_MAX_TOKENS", "DECODE_MAX_TOKENS", "auto_impl", "tree_decode",
           "tree_ffn_triton", "triton_available"]
