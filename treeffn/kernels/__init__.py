"""Fast paths for the tree FFN (DESIGN.md §2, §4), each checked against ``treeffn.layers``.

* ``tree_ffn_triton``: Triton kernels for CUDA (inference and training, with a custom
  autograd Function). Triton is optional: ``triton_available()`` says whether it imports.
* ``treeffn.kernels.bench``: the ``treeffn bench`` benchmark.

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


def tree_ffn_triton(*args, **kwargs):
    """See ``treeffn.kernels.triton_tree.tree_ffn_triton``."""
    from treeffn.kernels.triton_tree import tree_ffn_triton as impl

    return impl(*args, **kwargs)


__all__ = ["tree_ffn_triton", "triton_available"]
