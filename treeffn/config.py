"""Checks on a composed training config that run before anything heavy is imported.

Each failure is one line naming the field, the value and what is allowed. Pure Python: no
torch here, so a wrong command fails in well under a second.
"""

from __future__ import annotations

import os

PLACEMENTS = ("node", "post_sum")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "tanh", "identity")
IMPLS = ("auto", "masked", "gather", "triton")
FFN_KINDS = ("tree", "dense")
TREE_FAMILIES = ("node",)
DATA_SOURCES = ("embedded", "files", "hub")
LOGGERS = ("csv", "wandb")
MODEL_FAMILIES = ("opt",)
MAX_DEPTH = 20


class ConfigError(ValueError):
    """A config value that cannot work; the message is the one line the user sees."""


def _allowed(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{field}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _int_at_least(field: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{field}={value!r} is not allowed; it must be an integer >= {low}")
    return value


def nodes_per_tree(depth: int) -> int:
    return 2 ** (depth + 1) - 1


def matched_trees(ffn_dim: int, depth: int) -> int:
    """Parameter-matched tree count: the most trees whose nodes do not exceed the dense width.

    OPT-125M (3072): 24 trees at depth 6, 12 at depth 7; OPT-1.3B (8192): 64 and 32.
    """
    return max(1, ffn_dim // nodes_per_tree(depth))


def resolve_trees(model: dict, tree: dict) -> int:
    """tree.trees, or the parameter-matched count when it is null."""
    if tree.get("trees") is not None:
        return tree["trees"]
    return matched_trees(model["ffn_dim"], tree["depth"])


def machine_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - non-POSIX
        return 1 << 40


def validate_model_and_tree(model: dict, tree: dict) -> None:
    _allowed("model.family", model.get("family"), MODEL_FAMILIES)
    for key in ("hidden_size", "ffn_dim", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
        _int_at_least(f"model.{key}", model.get(key), 1)
    if model["hidden_size"] % model["num_attention_heads"]:
        raise ConfigError(
            f"model.hidden_size={model['hidden_size']} must be divisible by "
            f"model.num_attention_heads={model['num_attention_heads']}"
        )
    _allowed("model.activation", model.get("activation"), ACTIVATIONS)
    _allowed("tree.ffn", tree.get("ffn"), FFN_KINDS)
    if tree["ffn"] == "dense":
        return
    _allowed("tree.family", tree.get("family"), TREE_FAMILIES)
    depth = tree.get("depth")
    if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= MAX_DEPTH:
        raise ConfigError(f"tree.depth={depth!r} is not allowed; it must be an integer from 0 to {MAX_DEPTH}")
    if tree.get("trees") is not None:
        _int_at_least("tree.trees", tree["trees"], 1)
    _allowed("tree.placement", tree.get("placement"), PLACEMENTS)
    _allowed("tree.activation", tree.get("activation"), ACTIVATIONS)
    _allowed("tree.impl", tree.get("impl"), IMPLS)
    # fp32 weights of every tree layer, twice over for the optimizer's two moments: refuse a
    # depth whose FFN weights alone would not fit in this machine's memory.
    nodes = resolve_trees(model, tree) * nodes_per_tree(depth)
    ffn_bytes = 4 * nodes * 2 * model["hidden_size"] * model["num_hidden_layers"]
    limit = machine_memory_bytes()
    if 3 * ffn_bytes > limit:
        raise ConfigError(
            f"tree.depth={depth} gives {nodes:,} nodes per layer: {3 * ffn_bytes / 2**30:.1f} GiB of FFN "
            f"weights and optimizer state, more than this machine's {limit / 2**30:.1f} GiB; use a smaller "
            f"tree.depth or tree.trees"
        )


def validate_data(data: dict, model: dict) -> None:
    _allowed("data.source", data.get("source"), DATA_SOURCES)
    block = _int_at_least("data.block_size", data.get("block_size"), 2)
    if block > model["max_position_embeddings"]:
        raise ConfigError(
            f"data.block_size={block} is larger than model.max_position_embeddings="
            f"{model['max_position_embeddings']}; use data.block_size <= {model['max_position_embeddings']}"
        )
    _int_at_least("data.batch_size", data.get("batch_size"), 1)
    if data["source"] == "files":
        path = data.get("path")
        if path in (None, "", "???"):
            raise ConfigError("data.path is missing; data=files needs data.path=<file, folder or glob>")


def validate_train_config(cfg: dict) -> None:
    """Raise ConfigError on the first wrong field of a resolved training config (a plain dict)."""
    validate_model_and_tree(cfg["model"], cfg["tree"])
    validate_data(cfg["data"], cfg["model"])
    optim, trainer = cfg["optim"], cfg["trainer"]
    if not isinstance(optim.get("lr"), (int, float)) or optim["lr"] <= 0:
        raise ConfigError(f"optim.lr={optim.get('lr')!r} is not allowed; it must be a number > 0")
    _int_at_least("trainer.max_steps", trainer.get("max_steps"), 1)
    _int_at_least("optim.warmup_steps", optim.get("warmup_steps"), 0)
    _int_at_least("checkpoint.every_n_steps", cfg["checkpoint"].get("every_n_steps"), 1)
    for name in cfg["logger"].get("names", []):
        _allowed("logger.names", name, LOGGERS)
    resume = cfg.get("resume")
    if resume not in ("auto", "never") and not (isinstance(resume, str) and resume.endswith(".ckpt")):
        raise ConfigError(f"resume={resume!r} is not allowed; choose auto, never, or a path to a .ckpt file")
