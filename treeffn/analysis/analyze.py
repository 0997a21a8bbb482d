"""``treeffn analyze``: routing statistics of a run's checkpoints on held-out text, with plots.

For every checkpoint of the run (oldest first) the model runs in eval mode (hard routing, the
inference path) over the held-out blocks; node visits and per-level routing logits give, per
layer: dead-node fraction, normalized leaf entropy, leaves used, right-going fraction and the
mean logit per level. The last checkpoint also gives the path-usage map (tree × leaf).
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from treeffn.analysis.routing import (BALANCED_AT_LEAST, COLLAPSED_BELOW, LevelLogits, layer_summary,
                                      leaf_counts, verdict)


class NothingToAnalyse(Exception):
    """The run has no tree layers."""


def run_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints along the run, oldest first, one per training step."""
    from treeffn.models.load import read_state_dict  # noqa: F401  (same loader the model uses)

    folder = run_dir / "checkpoints"
    by_step: dict[int, Path] = {}
    for path in sorted(folder.glob("step*.ckpt")):
        m = re.search(r"step(\d+)", path.name)
        if m:
            by_step[int(m.group(1))] = path
    last = folder / "last.ckpt"
    if last.exists():
        import torch

        step = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("global_step")
        by_step.setdefault(int(step) if step is not None else max(by_step, default=0) + 1, last)
    return [by_step[s] for s in sorted(by_step)]


def held_out_blocks(cfg: dict, text: str, max_blocks: int):
    import torch

    from treeffn.data.datamodule import TextDataModule

    data_cfg = dict(cfg["data"])
    if text == "kjv":
        from treeffn.data.corpus import read_documents
        from treeffn.data.tokenizer import load_tokenizer

        tok = load_tokenizer(data_cfg["tokenizer"])
        ids = []
        for doc in read_documents("kjv"):
            ids += tok(doc["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        block = int(data_cfg["block_size"])
        n = min(max_blocks, len(ids) // block)
        return torch.tensor(ids[: n * block]).view(n, block)
    if text != "validation":
        raise ValueError(f"text={text!r} is not allowed; choose validation or kjv")
    dm = TextDataModule(data_cfg, seed=cfg.get("seed", 0))
    dm.setup()
    return dm.val_set[:max_blocks]


def analyse_checkpoint(model, blocks, batch_size: int = 16) -> dict:
    import torch

    from treeffn.models.swap import tree_layers

    layers = tree_layers(model)
    for layer in layers:
        layer.node_visits.zero_()
        layer.track_stats = True
    hooks = [LevelLogits(layer) for layer in layers]
    model.eval()
    with torch.no_grad():
        for batch in blocks.split(batch_size):
            model(input_ids=batch)
    out = []
    for layer, hook in zip(layers, hooks):
        hook.remove()
        visits = layer.node_visits.cpu()
        s = layer_summary(visits, layer.trees, layer.depth)
        s["logit_per_level"] = hook.means()
        s["verdict"] = verdict(s["leaf_entropy"])
        s["leaf_usage"] = leaf_counts(visits, layer.trees, layer.depth).tolist()
        out.append(s)
    return {"layers": out}


def logged_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tree/... validation curves from the run's CSV logs (later rows win on repeated steps)."""
    curves: dict[str, dict[int, float]] = {}
    for path in sorted((run_dir / "logs" / "csv").glob("metrics*.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key.startswith("tree/") and value not in ("", None):
                        curves.setdefault(key, {})[int(row["step"])] = float(value)
    return {k: sorted(v.items()) for k, v in curves.items()}


def analyse_run(run_dir: Path, text: str = "validation", max_blocks: int = 64, out_dir: Path | None = None,
                device: str = "cpu") -> dict:
    """Routing statistics of every checkpoint of a run; the forward passes run on ``device``."""
    from treeffn.models.load import load_from_run, read_run_config

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if cfg["tree"]["ffn"] != "tree":
        raise NothingToAnalyse(f"run {run_dir} is a dense model (tree=dense): it has no tree layers, so there is "
                               f"no routing to analyse")
    if cfg["tree"].get("family", "node") != "node":
        raise NothingToAnalyse(f"run {run_dir} uses tree.family={cfg['tree']['family']}; routing analysis covers "
                               f"the node family (one neuron per node, hard routing)")
    ckpts = run_checkpoints(run_dir)
    if not ckpts:
        raise FileNotFoundError(f"run {run_dir} has no checkpoints to analyse")
    blocks = held_out_blocks(cfg, text, max_blocks).to(device)
    series = []
    for path in ckpts:
        loaded = load_from_run(run_dir, path)
        stats = analyse_checkpoint(loaded.model.to(device), blocks)
        series.append({"checkpoint": str(path), "step": loaded.step, **stats})
        del loaded  # one model in memory at a time
    final = series[-1]
    analysis = {
        "run_dir": str(run_dir),
        "text": text,
        "tokens": int(blocks.numel()),
        "device": str(device),
        "thresholds": {"balanced_if_leaf_entropy_at_least": BALANCED_AT_LEAST,
                       "collapsed_if_leaf_entropy_below": COLLAPSED_BELOW},
        "tree": cfg["tree"],
        "checkpoints": [{k: v for k, v in s.items() if k != "layers"} |
                        {"layers": [{k: v for k, v in layer.items() if k != "leaf_usage"} for layer in s["layers"]]}
                        for s in series],
        "final": final["layers"],
    }
    out_dir = Path(out_dir) if out_dir else run_dir / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    from treeffn.atomic import write_json_atomic

    write_json_atomic(out_dir / "analysis.json", analysis)
    analysis["plots"] = make_plots(series, logged_curves(run_dir), out_dir)
    return analysis


def make_plots(series: list[dict], curves: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    steps = [s["step"] if s["step"] is not None else i for i, s in enumerate(series)]
    n_layers = len(series[-1]["layers"])

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i in range(n_layers):
        axes[0].plot(steps, [s["layers"][i]["leaf_entropy"] for s in series], marker="o", label=f"layer {i}")
        axes[1].plot(steps, [s["layers"][i]["dead_frac"] for s in series], marker="o", label=f"layer {i}")
        live = curves.get(f"tree/layer{i}/leaf_entropy")
        if live and len(live) > len(series):
            axes[0].plot(*zip(*live), linestyle=":", alpha=0.6, color=axes[0].lines[-1].get_color())
    axes[0].axhline(BALANCED_AT_LEAST, color="grey", lw=0.8, ls="--")
    axes[0].axhline(COLLAPSED_BELOW, color="grey", lw=0.8, ls="--")
    axes[0].set(title="normalized leaf entropy (held-out text)", xlabel="training step", ylim=(0, 1.02))
    axes[1].set(title="dead-node fraction", xlabel="training step", ylim=(0, 1.02))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "entropy_dead_nodes.png", dpi=110)
    plt.close(fig)
    written.append("entropy_dead_nodes.png")

    for i, layer in enumerate(series[-1]["layers"]):
        usage = np.array(layer["leaf_usage"], dtype=float)
        share = usage / np.maximum(usage.sum(axis=1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(min(12, 2 + 0.12 * usage.shape[1]), min(8, 1.2 + 0.3 * usage.shape[0])))
        im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set(title=f"layer {i}: share of tokens per leaf (final checkpoint)", xlabel="leaf", ylabel="tree")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        name = f"path_usage_layer{i}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)

    fig, axes = plt.subplots(1, n_layers, figsize=(4 * n_layers, 3.5), squeeze=False)
    for i in range(n_layers):
        per_level = np.array([s["layers"][i]["logit_per_level"] for s in series])
        for level in range(per_level.shape[1]):
            axes[0][i].plot(steps, per_level[:, level], marker=".", label=f"level {level}")
        axes[0][i].axhline(0, color="grey", lw=0.8)
        axes[0][i].set(title=f"layer {i}: mean routing logit", xlabel="training step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "routing_logit_drift.png", dpi=110)
    plt.close(fig)
    written.append("routing_logit_drift.png")
    return written


def format_verdicts(analysis: dict) -> list[str]:
    lines = []
    for i, layer in enumerate(analysis["final"]):
        ent = layer["leaf_entropy"]
        lines.append(f"layer {i}: {layer['verdict']} (normalized leaf entropy {ent:.3f}, dead nodes "
                     f"{100 * layer['dead_frac']:.1f}%, leaves used per tree {layer['leaves_used']:.1f})"
                     if not math.isnan(ent) else f"layer {i}: unvisited")
    return lines
