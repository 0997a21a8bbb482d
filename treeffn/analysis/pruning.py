"""Subtree pruning (``treeffn prune``): drop the parts of the trees no token reaches.

The paper observes that node-placement trees collapse into a few static paths: whole subtrees
are never visited. Pruning makes that static sparsity concrete:

1. run the model in hard-routing eval over held-out text (the run's validation split by
   default), counting node visits (the layers' ``node_visits``);
2. drop every node with at most ``min_visits`` visits together with its subtree (node family:
   compact PrunedTreeFFN; leaf family: unreached leaves, PrunedLeafFFN);
3. measure the loss before and after on the same text, and save the smaller model.

With ``min_visits=0`` only nodes no token reached are removed, so on the counting text the
pruned model computes exactly the same logits (and perplexity) as the unpruned one; on other
text a token stepping into a removed subtree stops there (the removed nodes add nothing).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from treeffn.config import ConfigError
from treeffn.layers import LeafFFN, PrunedLeafFFN, PrunedTreeFFN, TreeFFN


@dataclass
class PruneReport:
    params_before: int
    params_after: int
    ffn_params_before: int
    ffn_params_after: int
    loss_before: float
    loss_after: float
    ppl_before: float
    ppl_after: float
    ppl_change: float
    tokens: int                 # predicted tokens the losses average over
    count_tokens: int           # tokens whose routes were counted
    min_visits: int
    layers: list = field(default_factory=list)  # per layer: kept / total (nodes or leaves)
    text: str = "validation"
    out_dir: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------ counting
@torch.no_grad()
def count_visits(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """Zero every tree layer's visits, run ``blocks`` through the model in eval mode (hard
    routing), return the token-weighted mean loss and the predicted-token count. The layers'
    ``node_visits`` then hold the counts."""
    from treeffn.models.swap import tree_layers

    layers = tree_layers(model)
    saved = [layer.track_stats for layer in layers]
    for layer in layers:
        layer.node_visits.zero_()
        layer.track_stats = True
    try:
        return mean_loss(model, blocks, batch_size)
    finally:
        for layer, s in zip(layers, saved):
            layer.track_stats = s


@torch.no_grad()
def mean_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """Token-weighted mean next-token loss over ``blocks`` (the way training validates)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start:start + batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        predicted = batch.shape[0] * (batch.shape[1] - 1)
        total += float(loss) * predicted
        count += predicted
    if count == 0:
        raise ConfigError("no text to count node visits on: the text gave no full block")
    return total / count, count


# ------------------------------------------------------------------------------ pruning
def prune_layer(layer: nn.Module, min_visits: int = 0) -> nn.Module:
    """The pruned form of one tree layer, from its ``node_visits``."""
    if isinstance(layer, (PrunedTreeFFN, PrunedLeafFFN)):
        raise ConfigError("this model is already pruned; prune the unpruned run instead")
    keep = layer.node_visits > min_visits
    if isinstance(layer, LeafFFN):
        leaves = keep.view(layer.trees, layer.nodes)[:, layer.routers:].flatten()
        return PrunedLeafFFN.from_leaf(layer, leaves)
    if isinstance(layer, TreeFFN):
        return PrunedTreeFFN.from_tree(layer, keep)
    raise TypeError(f"no pruning for {type(layer).__name__}")


def prune_model(model: nn.Module, min_visits: int = 0) -> tuple[nn.Module, list[dict]]:
    """A pruned copy of ``model`` (counted with ``count_visits`` first) and per-layer kept counts."""
    from treeffn.models.hf import as_tree_model
    from treeffn.models.swap import ffn_modules, replace_ffns
    from treeffn.models.tree_settings import TreeSpec

    source = as_tree_model(model)
    pruned_layers, summary = [], []
    for layer in ffn_modules(source):
        small = prune_layer(layer, min_visits)
        pruned_layers.append(small)
        if isinstance(small, PrunedLeafFFN):
            summary.append({"kind": "leaves", "kept": small.kept, "total": layer.trees * layer.leaves})
        else:
            summary.append({"kind": "nodes", "kept": small.kept, "total": layer.total_nodes})
    new = copy.deepcopy(source)
    replace_ffns(new, pruned_layers)
    kept = tuple(s["kept"] for s in summary)
    new.config.tree = TreeSpec.from_dict(new.config.tree).replace(pruned_kept=kept).to_dict()
    return new.eval(), summary


def ffn_parameter_count(model: nn.Module) -> int:
    from treeffn.models.swap import ffn_modules

    return sum(p.numel() for m in ffn_modules(model) for p in m.parameters())


def prune_and_measure(model: nn.Module, blocks: torch.Tensor, batch_size: int, min_visits: int = 0,
                      eval_blocks: torch.Tensor | None = None) -> tuple[nn.Module, PruneReport]:
    """Count visits on ``blocks``, prune, and measure the loss before/after on ``eval_blocks``
    (default: the counting blocks themselves)."""
    from treeffn.models.swap import tree_layers

    if not tree_layers(model):
        raise ConfigError("this model has dense FFNs: there are no trees to prune")
    with path_walk(model):  # the unpruned model computes what the pruned one will: bit for bit
        count_loss, predicted = count_visits(model, blocks, batch_size)
    count_tokens = int(blocks.numel())  # every token's route is counted; the loss predicts all but the first
    pruned, layers = prune_model(model, min_visits)
    if eval_blocks is None:
        loss_before, tokens = count_loss, predicted
    else:
        with path_walk(model):
            loss_before, tokens = mean_loss(model, eval_blocks, batch_size)
    loss_after, _ = mean_loss(pruned, blocks if eval_blocks is None else eval_blocks, batch_size)
    ppl_before, ppl_after = math.exp(min(loss_before, 50.0)), math.exp(min(loss_after, 50.0))
    report = PruneReport(
        params_before=sum(p.numel() for p in model.parameters()),
        params_after=sum(p.numel() for p in pruned.parameters()),
        ffn_params_before=ffn_parameter_count(model), ffn_params_after=ffn_parameter_count(pruned),
        loss_before=loss_before, loss_after=loss_after, ppl_before=ppl_before, ppl_after=ppl_after,
        ppl_change=ppl_after - ppl_before, tokens=tokens, count_tokens=count_tokens, min_visits=min_visits,
        layers=layers,
    )
    return pruned, report


@contextlib.contextmanager
def path_walk(model: nn.Module):
    """Node-family layers with impl=auto walk their paths (the gather path) inside the block:
    pruned layers always walk, and auto may take the masked path at larger batches, whose sums
    round differently, so the before/after comparison would not be exact."""
    layers = [m for m in model.modules() if isinstance(m, TreeFFN) and m.impl == "auto"]
    for m in layers:
        m.impl = "gather"
    try:
        yield
    finally:
        for m in layers:
            m.impl = "auto"


# ------------------------------------------------------------------------------ run dirs
def load_run_model(run_dir: Path):
    """(model, tokenizer, run config) of a run: its ``hf/`` dir when there is one, else its last
    checkpoint rebuilt from config.yaml (treeffn.models.load)."""
    from treeffn.models.load import load_from_run, read_run_config

    cfg = read_run_config(run_dir)
    hf_dir = run_dir / "hf"
    if (hf_dir / "config.json").is_file():
        from treeffn.models.hf import load_hf

        model, tokenizer = load_hf(hf_dir)
        return model, tokenizer, cfg
    loaded = load_from_run(run_dir)
    return loaded.model, loaded.tokenizer, cfg


def text_blocks(text: str, cfg: dict, tokenizer, block_size: int) -> tuple[torch.Tensor, str]:
    """Blocks of the run's validation split (``validation``) or of a UTF-8 text file."""
    if text == "validation":
        from treeffn.data.datamodule import TextDataModule

        data = TextDataModule(cfg["data"], seed=cfg.get("seed", 0))
        data.setup()
        return data.val_set, "the run's validation split"
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(f"text={text}: no such file (give validation or a UTF-8 text file)")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"text={text} is not UTF-8 text") from None
    ids = tokenizer(raw, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    usable = len(ids) - len(ids) % block_size
    if usable == 0:
        raise ConfigError(f"text={text} has {len(ids)} tokens, fewer than one block of {block_size}")
    return torch.tensor(ids[:usable], dtype=torch.long).view(-1, block_size), str(path)


def prune_run(run_dir: str | Path, out: str | Path | None = None, text: str = "validation", min_visits: int = 0,
              batch_size: int | None = None, max_blocks: int | None = None) -> PruneReport:
    """``treeffn prune``: count, prune and save ``<run dir>/pruned`` (or ``out``); writes prune.json."""
    import json

    from treeffn.models.hf import save_hf

    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise ConfigError(f"run={run_dir}: no such run dir")
    if isinstance(min_visits, bool) or not isinstance(min_visits, int) or min_visits < 0:
        raise ConfigError(f"min_visits={min_visits!r} is not allowed; it must be an integer >= 0")
    model, tokenizer, cfg = load_run_model(run)
    block_size = int(cfg["data"]["block_size"])
    blocks, description = text_blocks(text, cfg, tokenizer, block_size)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    pruned, report = prune_and_measure(model, blocks, batch_size or int(cfg["data"]["batch_size"]), min_visits)
    report.text = description
    target = Path(out).expanduser() if out else run / "pruned"
    save_hf(pruned, tokenizer, target)
    report.out_dir = str(target)
    (target / "prune.json").write_text(json.dumps(report.as_dict(), indent=2))
    return report
