"""treeffn: transformer language models with tree-structured feed-forward layers.

Heavy modules (torch, transformers, lightning) load on first use, so that the command line
can compose and print configs without importing them.
"""

__version__ = "0.1.0"

_LAZY = {
    "TreeFFN": "treeffn.layers.tree_ffn",
    "DenseFFN": "treeffn.layers.dense_ffn",
    "LeafFFN": "treeffn.layers.leaf_ffn",
    "GatedTreeFFN": "treeffn.layers.gated_tree_ffn",
    "save_hf": "treeffn.models.hf",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'treeffn' has no attribute {name!r}")


__all__ = ["TreeFFN", "DenseFFN", "GatedTreeFFN", "LeafFFN", "save_hf", "__version__"]

# Saved tree models (model_type treeffn_*) load with AutoModelForCausalLM.from_pretrained after
# `import treeffn`; registration waits until transformers' Auto classes are imported (no torch here).
from treeffn import _hf_registration  # noqa: E402

_hf_registration.install()
