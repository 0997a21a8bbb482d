"""``treeffn analyze``: routing statistics of a run's checkpoints on held-out text, with plots.

For every checkpoint of the run (oldest first) the model runs in eval mode (hard routing, the
inference path) over held-out blocks drawn from the whole validation split (a seeded sample);
node visits and per-level routing logits give, per layer: dead-node fraction (with the token
count it was measured on: it falls as more tokens are seen), normalized leaf entropy, leaves
used, right-going share per level and the mean logit per level. The last checkpoint also gives
the path-usage map (tree × leaf). Verdicts compare the final checkpoint with the run's own
initial weights (``step0000000.ckpt``), since a random initialisation already routes unevenly.
The training-window curves (static sparsity, right share and logits per level, logged while
training without extra forward passes) are plotted from the run's metrics.csv.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from treeffn.analysis.routing import (BALANCED_AT_LEAST, COLLAPSED_BELOW, TREND_AT_LEAST, layer_summary,
                                      leaf_counts, level_logit_means, mean_over_layers, trend, verdict)


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


def held_out_blocks(cfg: dict, text: str, max_blocks: int | None, seed: int = 0):
    """(blocks, what they are): a seeded sample of ``max_blocks`` blocks spread over the whole
    validation split (all of them when ``max_blocks`` is None or larger), in split order; or the
    first ``max_blocks`` blocks of the King James Bible (``kjv``)."""
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
        n = len(ids) // block if max_blocks is None else min(max_blocks, len(ids) // block)
        return torch.tensor(ids[: n * block]).view(n, block), f"the first {n} blocks"
    if text != "validation":
        raise ValueError(f"text={text!r} is not allowed; choose validation or kjv")
    dm = TextDataModule(data_cfg, seed=cfg.get("seed", 0))
    dm.setup()
    blocks = dm.val_set[:]
    if max_blocks is None or max_blocks >= len(blocks):
        return blocks, f"all {len(blocks)} blocks of the split"
    pick = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:max_blocks]
    return blocks[pick.sort().values], f"{max_blocks} of its {len(blocks)} blocks, drawn with seed {seed}"


def analyse_checkpoint(model, blocks, batch_size: int = 16, bf16: bool = False) -> dict:
    """Statistics of one model on ``blocks`` (eval mode, hard routing); ``bf16``: under CUDA bf16
    autocast, as a bf16-mixed run validated."""
    import contextlib

    import torch

    from treeffn.models.swap import tree_layers

    layers = tree_layers(model)
    for layer in layers:
        layer.node_visits.zero_()
        layer.level_logits.zero_()
        layer.track_stats = True
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        for batch in blocks.split(batch_size):
            model(input_ids=batch)
    out = []
    for layer in layers:
        visits = layer.node_visits.cpu()
        s = layer_summary(visits, layer.trees, layer.depth)
        s["logit_per_level"] = level_logit_means(layer.level_logits)
        s["verdict"] = verdict(s["leaf_entropy"])
        s["leaf_usage"] = leaf_counts(visits, layer.trees, layer.depth).tolist()
        out.append(s)
    return {"layers": out, "mean": mean_over_layers(out)}


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


def analyse_run(run_dir: Path, text: str = "validation", max_blocks: int | None = 256, out_dir: Path | None = None,
                device: str = "cpu", seed: int = 0) -> dict:
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
    blocks, sample = held_out_blocks(cfg, text, max_blocks, seed)
    blocks = blocks.to(device)
    # The run's batch size and, on a GPU, its precision: the final checkpoint on the whole split
    # then repeats the run's last validation (against_training below).
    batch_size = int(cfg["data"]["batch_size"])
    bf16 = str(device).startswith("cuda") and str(_result(run_dir).get("precision", "")).startswith("bf16")
    series = []
    for path in ckpts:
        loaded = load_from_run(run_dir, path)
        stats = analyse_checkpoint(loaded.model.to(device), blocks, batch_size, bf16)
        series.append({"checkpoint": str(path), "step": loaded.step, **stats})
        del loaded  # one model in memory at a time
    final = series[-1]
    initial = series[0] if series[0]["step"] == 0 and len(series) > 1 else None
    for i, layer in enumerate(final["layers"]):
        layer["trend"] = (trend(initial["layers"][i]["leaf_entropy"], layer["leaf_entropy"]) if initial
                          else "no initial checkpoint")
    analysis = {
        "run_dir": str(run_dir),
        "text": text,
        "blocks": int(blocks.shape[0]),
        "tokens": int(blocks.numel()),
        "sample": sample,
        "device": str(device),
        "bf16_autocast": bf16,
        "thresholds": {"balanced_if_leaf_entropy_at_least": BALANCED_AT_LEAST,
                       "collapsed_if_leaf_entropy_below": COLLAPSED_BELOW,
                       "trend_if_entropy_change_at_least": TREND_AT_LEAST},
        "tree": cfg["tree"],
        "checkpoints": [{k: v for k, v in s.items() if k != "layers"} |
                        {"layers": [{k: v for k, v in layer.items() if k != "leaf_usage"} for layer in s["layers"]]}
                        for s in series],
        "initial_step": initial["step"] if initial else None,
        "final": final["layers"],
        "final_mean": final["mean"],
        "against_training": against_training(run_dir, final, int(blocks.numel())),
    }
    out_dir = Path(out_dir) if out_dir else run_dir / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    from treeffn.atomic import write_json_atomic

    write_json_atomic(out_dir / "analysis.json", analysis)
    analysis["plots"] = make_plots(series, logged_curves(run_dir), out_dir, int(blocks.numel()))
    return analysis


def _result(run_dir: Path) -> dict:
    import json

    try:
        return json.loads((Path(run_dir) / "result.json").read_text())
    except (OSError, ValueError):
        return {}


def against_training(run_dir: Path, final: dict, tokens: int) -> dict | None:
    """The final checkpoint's statistics against the run's last validation (result.json), when both
    saw the same tokens (the whole validation split): the largest differences over layers. The
    two differ only by arithmetic (training validates under its precision, e.g. bf16 autocast;
    a token whose routing logit is within rounding of 0 can take the other branch)."""
    result = _result(run_dir)
    routing = result.get("routing") or {}
    if not routing.get("layers") or routing.get("tokens") != tokens or result.get("steps") != final["step"]:
        return None
    out = {"step": final["step"], "tokens": tokens}
    for key in ("dead_frac", "leaf_entropy", "root_right_share"):
        pairs = [(a.get(key), b.get(key)) for a, b in zip(routing["layers"], final["layers"])]
        diffs = [abs(a - b) for a, b in pairs if a is not None and b is not None and not math.isnan(a - b)]
        out[f"max_abs_diff_{key}"] = max(diffs) if diffs else None
    return out


def make_plots(series: list[dict], curves: dict, out_dir: Path, tokens: int | None = None) -> list[str]:
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
    axes[1].set(title=f"dead-node fraction ({tokens:,} held-out tokens)" if tokens else "dead-node fraction",
                xlabel="training step", ylim=(0, 1.02))
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

    if any(k.endswith("/static_sparsity") for k in curves):
        written.append(plot_training_windows(curves, n_layers, out_dir / "routing_over_training.png"))
    return written


def plot_training_windows(curves: dict, n_layers: int, path: Path) -> str:
    """The training-window statistics over training: static sparsity per layer, and per level
    (mean over layers) the right-going share and the mean routing logit."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for i in range(n_layers):
        if curves.get(f"tree/layer{i}/static_sparsity"):
            axes[0].plot(*zip(*curves[f"tree/layer{i}/static_sparsity"]), lw=1, label=f"layer {i}")
    for panel, key, title in ((axes[1], "train_right_level", "share of tokens going right (mean over layers)"),
                              (axes[2], "train_logit_level", "mean routing logit (mean over layers)")):
        level = 0
        while curves.get(f"tree/mean/{key}{level}"):
            panel.plot(*zip(*curves[f"tree/mean/{key}{level}"]), lw=1, label=f"level {level}")
            level += 1
        panel.set(title=title, xlabel="training step")
        panel.legend(fontsize=7)
    axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[2].axhline(0, color="grey", lw=0.8, ls="--")
    axes[0].set(title="static sparsity: nodes no training token reached in the window", xlabel="training step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def format_verdicts(analysis: dict) -> list[str]:
    """One line per layer: the trend against the initial weights, then the absolute figures."""
    lines = []
    initial = next((c for c in analysis["checkpoints"] if c["step"] == analysis.get("initial_step")), None)
    tokens = analysis["tokens"]
    for i, layer in enumerate(analysis["final"]):
        ent = layer["leaf_entropy"]
        if math.isnan(ent):
            lines.append(f"layer {i}: unvisited")
            continue
        since = f" (from {initial['layers'][i]['leaf_entropy']:.3f} at step 0)" if initial else ""
        lines.append(f"layer {i}: {layer['trend']}; leaf entropy {ent:.3f}{since}, {layer['verdict']} by the absolute "
                     f"thresholds; dead nodes {100 * layer['dead_frac']:.2f}% of {tokens:,} tokens; root sends "
                     f"{100 * layer['root_right_share']:.1f}% right")
    return lines
