"""The tree models' Hugging Face config classes: the stock family's config plus one ``tree`` dict.

Kept apart from treeffn/models/hf.py (the model classes) so that AutoConfig can learn these
model types without importing any modeling code (see treeffn/_hf_registration.py). The
``tree`` dict's keys are described in treeffn/models/tree_settings.py.
"""

from __future__ import annotations

from transformers.models.gpt2.configuration_gpt2 import GPT2Config
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.opt.configuration_opt import OPTConfig


class TreeOPTConfig(OPTConfig):
    model_type = "treeffn_opt"
    tree: dict | None = None


class TreeGPT2Config(GPT2Config):
    model_type = "treeffn_gpt2"
    tree: dict | None = None


class TreeLlamaConfig(LlamaConfig):
    model_type = "treeffn_llama"
    tree: dict | None = None


# family -> (stock config class, tree config class)
CONFIG_CLASSES = {"opt": (OPTConfig, TreeOPTConfig), "gpt2": (GPT2Config, TreeGPT2Config),
                  "llama": (LlamaConfig, TreeLlamaConfig)}
TREE_MODEL_TYPES = {tree.model_type: family for family, (_, tree) in CONFIG_CLASSES.items()}


def register_configs() -> None:
    from transformers import AutoConfig

    for _, tree in CONFIG_CLASSES.values():
        AutoConfig.register(tree.model_type, tree, exist_ok=True)
