"""treeffn: transformer language models with tree-structured feed-forward layers.

Heavy modules (torch, transformers, lightning) load on first use, so that the command line
can compose and print configs without importing them.
"""

__version__ = "0.1.0"

_LAZY = {
    "TreeFFN": "treeffn.layers.tree_ffn",
    "DenseFFN": "treeffn.layers.dense_ffn",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'treeffn' has no attribute {name!r}")


__all__ = ["TreeFFN", "DenseFFN", "__version__"]
