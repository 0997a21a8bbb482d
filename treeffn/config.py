"""Checks on a composed training config that run before anything heavy is imported.

Each failure is one line naming the field, the value and what is allowed. Pure Python: no
torch here, so a wrong command fails in well under a second.
"""

from __future__ import annotations

import os

PLACEMENTS = ("node", "post_sum")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "tanh", "identity")
IMPLS = ("auto", "masked", "gather", "triton", "grouped")
FFN_KINDS = ("tree", "dense")
TREE_FAMILIES = ("node", "leaf")  # neuron per node (docs/design.md) | FFF: routers + leaf MLPs
DATA_SOURCES = ("embedded", "files", "hub", "tokens")
LOGGERS = ("csv", "wandb")
MODEL_FAMILIES = ("opt", "gpt2", "llama")
TREE_INITS = ("random", "from_dense")
FREEZE_CHOICES = ("none", "attention", "all_but_ffn")  # model.freeze: what of the reused model stays fixed
# The Hugging Face config.json names of each family's widths (model.init_from checks them).
HF_WIDTH_KEYS = {
    "opt": {"hidden_size": "hidden_size", "ffn_dim": "ffn_dim", "num_hidden_layers": "num_hidden_layers",
            "num_attention_heads": "num_attention_heads"},
    "gpt2": {"hidden_size": "n_embd", "ffn_dim": "n_inner", "num_hidden_layers": "n_layer",
             "num_attention_heads": "n_head"},
    "llama": {"hidden_size": "hidden_size", "ffn_dim": "intermediate_size", "num_hidden_layers": "num_hidden_layers",
              "num_attention_heads": "num_attention_heads"},
}
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
MAX_DEPTH = 20
MAX_SEED = 2**32 - 1  # what NumPy, and so Lightning's seed_everything, accepts
STRATEGIES = ("auto", "ddp", "fsdp")  # trainer.strategy (conf/trainer/{cpu,gpu,ddp,fsdp}.yaml)
FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")


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
    """tree.trees, or when it is null: the parameter-matched count (node family), 1 (leaf family)."""
    if tree.get("trees") is not None:
        return tree["trees"]
    if tree.get("family", "node") == "leaf":
        return 1
    return matched_trees(model["ffn_dim"], tree["depth"])


def resolve_leaf_width(model: dict, tree: dict) -> int:
    """tree.leaf_width, or when null the width that makes trees * 2^depth leaves hold ffn_dim units."""
    if tree.get("leaf_width") is not None:
        return tree["leaf_width"]
    return max(1, model["ffn_dim"] // (resolve_trees(model, tree) * 2 ** tree["depth"]))


def ffn_weight_count(model: dict, tree: dict) -> int:
    """Weights of one tree layer (biases left out): what the memory check multiplies out."""
    d, k = model["hidden_size"], resolve_trees(model, tree)
    vectors = 3 if model.get("family") == "llama" else 2  # gated units have gate, up and down vectors
    if tree.get("family", "node") == "leaf":
        routers, leaves = 2 ** tree["depth"] - 1, 2 ** tree["depth"]
        return k * d * (routers + leaves * resolve_leaf_width(model, tree) * vectors)
    return k * nodes_per_tree(tree["depth"]) * vectors * d


def machine_memory_bytes() -> int:
    """Physical memory, or the container's limit (cgroup v2 or v1) when that is lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - non-POSIX
        total = 1 << 40
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def training_activation_bytes(model: dict, tree: dict, tokens: int, bytes_per_value: int) -> int:
    """A lower bound on the FFN activations one micro-batch of ``tokens`` keeps for the backward
    pass, summed over layers.

    The node family's masked training path computes every node for every token and keeps three
    (tokens x nodes) tensors per layer (pre-activations, the path mask, the masked activations);
    the leaf family's soft mixture keeps the router logits and every leaf's hidden units; a dense
    MLP keeps its hidden units. The path-only Triton kernels keep far less, so they are not
    counted here."""
    if tree["ffn"] == "dense":
        per_token = 2 * model["ffn_dim"]
    elif tree.get("family", "node") == "leaf":
        k, leaves = resolve_trees(model, tree), 2 ** tree["depth"]
        per_token = 2 * k * (leaves * resolve_leaf_width(model, tree) + leaves - 1)
    elif tree.get("impl", "auto") in ("auto", "masked"):
        per_token = 3 * resolve_trees(model, tree) * nodes_per_tree(tree["depth"])
    else:
        return 0
    return per_token * tokens * bytes_per_value * model["num_hidden_layers"]


def check_training_memory(cfg: dict, limit_bytes: int, where: str, bytes_per_value: int = 4,
                          processes: int = 1) -> None:
    """Refuse a config whose FFN weights, optimizer state and training-path activations would not
    fit in ``limit_bytes`` (the machine's memory, or one GPU's), before anything is built."""
    model, tree, data = cfg["model"], cfg["tree"], cfg["data"]
    if tree["ffn"] == "dense":
        return
    tokens = data["batch_size"] * data["block_size"]
    weights = 3 * 4 * ffn_weight_count(model, tree) * model["num_hidden_layers"]  # fp32 weights + AdamW's 2 moments
    activations = training_activation_bytes(model, tree, tokens, bytes_per_value)
    needed = processes * (weights + activations)
    if needed > limit_bytes:
        k = resolve_trees(model, tree)
        shape = f"tree.depth={tree['depth']} ({k} tree{'s' if k > 1 else ''} per layer)"
        raise ConfigError(
            f"{shape} needs an estimated {needed / 2**30:.1f} GiB to train ({weights / 2**30:.1f} GiB of FFN "
            f"weights and optimizer state, at least {activations / 2**30:.1f} GiB of training-path activations "
            f"for {tokens:,} tokens per micro-batch{f', x {processes} processes' if processes > 1 else ''}), "
            f"more than {where}'s {limit_bytes / 2**30:.1f} GiB; use a smaller tree.depth, tree.trees or "
            f"data.batch_size")


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
    kv_heads = model.get("num_key_value_heads")
    if kv_heads is not None and (_int_at_least("model.num_key_value_heads", kv_heads, 1)
                                 and model["num_attention_heads"] % kv_heads):
        raise ConfigError(f"model.num_key_value_heads={kv_heads} must divide "
                          f"model.num_attention_heads={model['num_attention_heads']}")
    if tree["ffn"] == "dense":
        validate_finetune(model, tree)
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
    if tree.get("impl") in ("triton", "grouped") and model.get("family", "opt") == "llama":
        raise ConfigError(f"tree.impl={tree['impl']!r} is not allowed with model.family=llama; gated trees run "
                          f"the masked and gather paths (use tree.impl=auto)")
    if "stats_every_n_steps" in tree:
        _int_at_least("tree.stats_every_n_steps", tree["stats_every_n_steps"], 1)
    validate_leaf_family(model, tree)
    validate_finetune(model, tree)
    # fp32 weights of every tree layer, twice over for the optimizer's two moments: refuse a
    # depth whose FFN weights alone would not fit in this machine's memory.
    nodes = resolve_trees(model, tree) * nodes_per_tree(depth)
    ffn_bytes = 4 * ffn_weight_count(model, tree) * model["num_hidden_layers"]
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
    fraction = data.get("val_fraction")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0 < fraction < 1):
        raise ConfigError(f"data.val_fraction={fraction!r} is not allowed; it must be a number between 0 and 1 "
                          f"(the share of documents held out for validation)")
    if data["source"] == "files":
        path = data.get("path")
        if path in (None, "", "???"):
            raise ConfigError("data.path is missing; data=files needs data.path=<file, folder or glob>")
    if data["source"] == "tokens":
        path = data.get("path")
        if path in (None, "", "???"):
            raise ConfigError("data.path is missing; data=tokens needs data.path=<prepared folder> or a token file "
                              "with data.val_path=<validation token file> (treeffn prepare writes a folder)")
        if not os.path.isdir(os.path.expanduser(str(path))) and data.get("val_path") in (None, "", "???"):
            raise ConfigError(f"data.val_path is missing; data=tokens with the token file data.path={path} needs "
                              f"data.val_path=<validation token file> (a prepared folder needs none)")
    for key in ("max_train_tokens", "max_val_tokens"):
        if data.get(key) is not None:
            _int_at_least(f"data.{key}", data[key], 1)
    if data.get("shard_tokens") is not None:
        _int_at_least("data.shard_tokens", data["shard_tokens"], 1024)


def validate_train_config(cfg: dict) -> None:
    """Raise ConfigError on the first wrong field of a resolved training config (a plain dict)."""
    validate_model_and_tree(cfg["model"], cfg["tree"])
    validate_data(cfg["data"], cfg["model"])
    optim, trainer = cfg["optim"], cfg["trainer"]
    if not isinstance(optim.get("lr"), (int, float)) or optim["lr"] <= 0:
        raise ConfigError(f"optim.lr={optim.get('lr')!r} is not allowed; it must be a number > 0")
    scale = optim.get("tree_lr_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ConfigError(f"optim.tree_lr_scale={scale!r} is not allowed; it must be a number > 0 (1: the model's lr)")
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        shown = "null" if seed is None else repr(seed)
        raise ConfigError(f"seed={shown} is not allowed; it must be an integer from 0 to {MAX_SEED}")
    _int_at_least("trainer.max_steps", trainer.get("max_steps"), 1)
    _int_at_least("trainer.val_check_interval", trainer.get("val_check_interval"), 1)
    _int_at_least("trainer.log_every_n_steps", trainer.get("log_every_n_steps", 1), 1)
    limit = trainer.get("limit_val_batches", 1.0)
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit < 0 or (
            isinstance(limit, float) and limit > 1):
        raise ConfigError(f"trainer.limit_val_batches={limit!r} is not allowed; use a number of batches (an "
                          f"integer >= 0) or a fraction from 0.0 to 1.0")
    val_at_start = trainer.get("val_at_start", "auto")
    if not (val_at_start == "auto" or isinstance(val_at_start, bool)):
        raise ConfigError(f"trainer.val_at_start={val_at_start!r} is not allowed; choose one of: auto, true, false")
    if not isinstance(trainer.get("compile", False), bool):
        raise ConfigError(f"trainer.compile={trainer.get('compile')!r} is not allowed; choose true or false")
    if trainer.get("profiler") not in (None, "simple"):
        raise ConfigError(f"trainer.profiler={trainer.get('profiler')!r} is not allowed; choose null or simple")
    _int_at_least("optim.warmup_steps", optim.get("warmup_steps"), 0)
    _int_at_least("checkpoint.every_n_steps", cfg["checkpoint"].get("every_n_steps"), 1)
    _int_at_least("guard.max_non_finite_steps", cfg.get("guard", {}).get("max_non_finite_steps"), 1)
    for name in cfg["logger"].get("names", []):
        _allowed("logger.names", name, LOGGERS)
    validate_scale_out(trainer, optim)
    resume = cfg.get("resume")
    if resume not in ("auto", "never") and not (isinstance(resume, str) and resume.endswith(".ckpt")):
        raise ConfigError(f"resume={resume!r} is not allowed; choose auto, never, or a path to a .ckpt file")


def validates_at_start(cfg: dict) -> bool:
    """trainer.val_at_start: a validation before the first step, logged at step 0 (auto: when the
    run starts from a checkpoint, model.init_from, so the cost of the conversion is measured)."""
    setting = cfg["trainer"].get("val_at_start", "auto")
    return bool(cfg["model"].get("init_from")) if setting == "auto" else setting


def validate_scale_out(trainer: dict, optim: dict) -> None:
    """trainer.strategy / devices / num_nodes / fsdp.* and optim.global_batch_tokens. Whether the
    global batch divides by the device count is checked once the device count is known
    (treeffn.training.distributed.accumulation)."""
    _allowed("trainer.strategy", trainer.get("strategy", "auto"), STRATEGIES)
    _int_at_least("trainer.num_nodes", trainer.get("num_nodes", 1), 1)
    devices = trainer.get("devices", 1)
    if not (devices in ("auto", -1) or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1)
            or (isinstance(devices, list) and devices and all(isinstance(d, int) for d in devices))):
        raise ConfigError(f"trainer.devices={devices!r} is not allowed; use an integer >= 1, auto (all of the "
                          f"node's devices) or a list of device indices")
    _int_at_least("trainer.accumulate_grad_batches", trainer.get("accumulate_grad_batches", 1), 1)
    tokens = optim.get("global_batch_tokens")
    if tokens is not None:
        _int_at_least("optim.global_batch_tokens", tokens, 1)
        if trainer.get("accumulate_grad_batches", 1) != 1:
            raise ConfigError(f"optim.global_batch_tokens={tokens} derives the gradient accumulation itself; "
                              f"drop trainer.accumulate_grad_batches={trainer['accumulate_grad_batches']} or set "
                              f"optim.global_batch_tokens=null")
    if trainer.get("strategy") == "fsdp" and trainer.get("accelerator") == "cpu":
        raise ConfigError("trainer.strategy=fsdp with trainer.accelerator=cpu is not allowed; Lightning's FSDP runs "
                          "on GPUs only (on CPUs use trainer=ddp)")
    fsdp = trainer.get("fsdp") or {}
    if "sharding_strategy" in fsdp:
        _allowed("trainer.fsdp.sharding_strategy", fsdp["sharding_strategy"], FSDP_SHARDING)
    for key in ("activation_checkpointing", "limit_all_gathers"):
        if not isinstance(fsdp.get(key, False), bool):
            raise ConfigError(f"trainer.fsdp.{key}={fsdp[key]!r} is not allowed; choose true or false")


def validate_leaf_family(model: dict, tree: dict) -> None:
    """tree.leaf_width / tree.hardening_weight, and the node-family keys the leaf family cannot take."""
    hardening = tree.get("hardening_weight", 0.0)
    if isinstance(hardening, bool) or not isinstance(hardening, (int, float)) or hardening < 0:
        raise ConfigError(f"tree.hardening_weight={hardening!r} is not allowed; it must be a number >= 0")
    if tree.get("family", "node") != "leaf":
        if hardening:
            raise ConfigError("tree.hardening_weight applies to tree.family=leaf only; set it to 0 or use tree.family=leaf")
        return
    if tree.get("leaf_width") is not None:
        _int_at_least("tree.leaf_width", tree["leaf_width"], 1)
    if tree.get("placement", "node") != "node":
        raise ConfigError(f"tree.placement={tree['placement']!r} applies to tree.family=node only; "
                          f"the leaf family mixes whole leaf MLPs (use tree.placement=node)")
    if tree.get("impl", "auto") in ("triton", "grouped"):
        raise ConfigError(f"tree.impl={tree['impl']!r} is not allowed with tree.family=leaf; it implements the "
                          f"node family (use tree.impl=auto)")


def validate_finetune(model: dict, tree: dict) -> None:
    """model.init_from / model.freeze / tree.init: a one-line error for each way they cannot work.

    Reads the checkpoint's config.json (plain JSON), so a wrong dir fails before torch loads.
    """
    import json

    init = tree.get("init", "random")
    if tree["ffn"] == "tree":
        _allowed("tree.init", init, TREE_INITS)
    freeze = model.get("freeze") or "none"
    _allowed("model.freeze", freeze, FREEZE_CHOICES)
    path = model.get("init_from")
    if not path:
        if tree["ffn"] == "tree" and init == "from_dense":
            raise ConfigError("tree.init=from_dense needs model.init_from=<dense checkpoint dir> to take fc1 rows "
                              "and fc2 columns from")
        if freeze != "none":
            raise ConfigError(f"model.freeze={freeze} needs model.init_from=<checkpoint dir>: a model trained "
                              f"from scratch has nothing pretrained to freeze")
        return
    folder = os.path.expanduser(str(path))
    if not os.path.exists(folder):
        raise ConfigError(f"model.init_from={path}: no such directory")
    if not os.path.isdir(folder):
        raise ConfigError(f"model.init_from={path} is a file; give the directory save_pretrained wrote")
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise ConfigError(f"model.init_from={path} is not a Hugging Face model dir: it has no config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            hf = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"model.init_from={path}: config.json is not valid JSON ({e})") from None
    model_type = hf.get("model_type")
    if model_type not in HF_WIDTH_KEYS:
        raise ConfigError(f"model.init_from={path} holds a {model_type!r} model; treeffn fine-tunes dense "
                          f"checkpoints of: {', '.join(HF_WIDTH_KEYS)}")
    if model_type != model.get("family"):
        raise ConfigError(f"model.init_from={path} is a {model_type} checkpoint but model.family="
                          f"{model.get('family')}; choose a {model_type} model preset (model=...)")
    if not any(os.path.isfile(os.path.join(folder, name)) for name in HF_WEIGHT_FILES):
        raise ConfigError(f"model.init_from={path} has no weights ({' or '.join(HF_WEIGHT_FILES[::2])})")
    for ours, theirs in HF_WIDTH_KEYS[model_type].items():
        value = hf.get(theirs)
        if ours == "ffn_dim" and value is None and model_type == "gpt2":
            value = 4 * hf.get("n_embd", 0)  # GPT-2's default inner width
        if value is not None and value != model.get(ours):
            raise ConfigError(f"model.{ours}={model.get(ours)} does not match the checkpoint in {path} "
                              f"({theirs}={value}); set model.{ours}={value} or choose the matching preset")
    if tree["ffn"] == "tree" and init == "from_dense":
        units = (resolve_trees(model, tree) * 2 ** tree["depth"] * resolve_leaf_width(model, tree)
                 if tree.get("family", "node") == "leaf" else resolve_trees(model, tree) * nodes_per_tree(tree["depth"]))
        if units > model["ffn_dim"]:
            raise ConfigError(f"tree.init=from_dense needs at most model.ffn_dim={model['ffn_dim']} tree units per "
                              f"layer to copy dense units into, but the tree has {units}; lower tree.trees "
                              f"(or tree.leaf_width)")
