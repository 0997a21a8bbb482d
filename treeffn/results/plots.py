"""The report's PNG plots (matplotlib, an optional extra: pip install 'treeffn[plots]').

    ppl_vs_active.png   the metric vs the fraction of FFN units a token uses (one point per row)
    ppl_vs_depth.png    the metric vs tree depth, one line per other factor (dense as a level line)
    ppl_vs_params.png   the metric vs FFN parameters, when the tree rows differ in width (dense as a
                        level line)
    curves.png          training loss and validation perplexity vs step, one colour per row
                        (mean over seeds; each seed faint)
    routing.png         tree rows: static sparsity of the training windows, the root's right-going
                        share and mean routing logit vs step (means over layers; the band is
                        mean ± std over seeds)
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401


def make_plots(report) -> dict[str, Path]:
    rows = [r for r in report.rows if r.stats.get("mean") is not None]
    files = {}
    if rows:
        files["ppl_vs_active"] = plot_vs_active(report, rows, report.out_dir / "ppl_vs_active.png")
        if any(r.stats.get("depth") is not None for r in rows):
            files["ppl_vs_depth"] = plot_vs_depth(report, rows, report.out_dir / "ppl_vs_depth.png")
        if spans_params(rows):
            files["ppl_vs_params"] = plot_vs_params(report, rows, report.out_dir / "ppl_vs_params.png")
    curves = {r.name: [read_metrics(p.run_dir) for p in r.points if p.run_dir.is_dir()] for r in report.rows}
    if any(any(c) for c in curves.values()):
        files["curves"] = plot_curves(curves, report.out_dir / "curves.png", report.sweep.name)
    routing = {name: runs for name, runs in curves.items() if any(r.get(ROUTING_PANELS[0][0]) for r in runs)}
    if routing:
        files["routing"] = plot_routing(routing, report.out_dir / "routing.png", report.sweep.name)
    return files


def plot_vs_active(report, rows, path: Path) -> Path:
    """Tree rows over the share of FFN units a token uses, one line per group of the factors
    other than depth and width (e.g. the placement), each point marked with its D and K; dense
    rows as level lines."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    lines: dict[str, list] = {}
    for row in rows:
        s = row.stats
        if s.get("ffn") != "dense":
            shape = ("depth", "trees")
            name = ", ".join(v for k, v in row.label.items() if not k.endswith(shape) and v and v != "—") or "tree"
            lines.setdefault(name, []).append((100 * (s["active_ffn_fraction"] or 1.0), s["mean"], s["std"] or 0.0,
                                               s.get("depth"), s.get("trees")))
    for name, pts in lines.items():
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=name)
        if len(pts) > 1:
            for x, y, _, depth, trees in pts:
                ax.annotate(f"D={depth}, K={trees}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    _dense_lines(ax, rows)
    ax.set_xscale("log")
    _labels(ax, "active FFN units per token (%)", f"{report.metric} (mean ± std over seeds)",
            f"{report.sweep.name}: {report.metric} vs active fraction")
    return _save(fig, path)


def plot_vs_params(report, rows, path: Path) -> Path:
    """Tree rows over their FFN parameter count (all layers), one line per placement; dense rows
    as level lines, marked at their own count. K: trees per layer."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    lines: dict[str, list] = {}
    for row in rows:
        s = row.stats
        if s.get("ffn") == "tree" and s.get("params_ffn"):
            name = f"{s.get('placement') or 'tree'}, D={s.get('depth')}"
            lines.setdefault(name, []).append((s["params_ffn"] / 1e6, s["mean"], s["std"] or 0.0, s.get("trees")))
    for name, pts in lines.items():
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=name)
        for x, y, _, trees in pts:
            if trees:
                ax.annotate(f"K={trees}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    _dense_lines(ax, rows, at_params=True)
    ax.set_xscale("log")
    _labels(ax, "FFN parameters, all layers (millions)", f"{report.metric} (mean ± std over seeds)",
            f"{report.sweep.name}: {report.metric} vs FFN parameters")
    return _save(fig, path)


def spans_params(rows, factor: float = 1.5) -> bool:
    """Whether the tree rows differ in FFN parameters enough to plot against them."""
    counts = [r.stats["params_ffn"] for r in rows if r.stats.get("ffn") == "tree" and r.stats.get("params_ffn")]
    return len(counts) > 1 and max(counts) >= factor * min(counts)


def _dense_lines(ax, rows, at_params: bool = False) -> None:
    """Dense rows as horizontal lines (± std band); at_params: also a marker at their FFN count."""
    for row in rows:
        s = row.stats
        if s.get("ffn") != "dense":
            continue
        label = "dense" + (f" (from {row.source})" if row.source else "")
        ax.axhline(s["mean"], linestyle="--", color="black", linewidth=1, label=label)
        if s["std"]:
            ax.axhspan(s["mean"] - s["std"], s["mean"] + s["std"], color="black", alpha=0.08)
        if at_params and s.get("params_ffn"):
            ax.plot([s["params_ffn"] / 1e6], [s["mean"]], marker="s", color="black")


def plot_vs_depth(report, rows, path: Path) -> Path:
    """Tree rows as lines over depth (grouped by the factors other than depth); dense rows as
    horizontal lines, since they have no depth."""
    depth_key = next((f for f in report.factors if f.endswith("depth")), None)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    lines: dict[str, list] = {}
    for row in rows:
        s = row.stats
        if s.get("ffn") == "tree" and s.get("depth") is not None:
            other = ", ".join(v for k, v in row.label.items() if k != depth_key and v and v != "—") or "tree"
            lines.setdefault(other, []).append((s["depth"], s["mean"], s["std"] or 0.0))
    for name, pts in lines.items():
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=name)
    _dense_lines(ax, rows)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # depths are whole numbers
    _labels(ax, "tree depth D (levels below the root; a token visits D+1 nodes per tree)",
            f"{report.metric} (mean ± std over seeds)", f"{report.sweep.name}: {report.metric} vs depth")
    return _save(fig, path)


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{column: [(step, value)]} from logs/csv/metrics-part*.csv (earlier parts of a resumed run)
    and metrics.csv; where parts overlap, the later one's value for a step wins."""
    folder = Path(run_dir) / "logs" / "csv"
    files = sorted(folder.glob("metrics-part*.csv")) + ([folder / "metrics.csv"] if (folder / "metrics.csv").exists() else [])
    series: dict[str, dict[int, float]] = {}
    for file in files:
        with file.open(newline="") as f:
            for rec in csv.DictReader(f):
                try:
                    step = int(float(rec.get("step") or ""))
                except ValueError:
                    continue
                for key, value in rec.items():
                    if key in ("step", "epoch") or value in (None, ""):
                        continue
                    try:
                        series.setdefault(key, {})[step] = float(value)
                    except ValueError:
                        continue
    return {k: sorted(v.items()) for k, v in series.items()}


def plot_curves(curves: dict[str, list[dict]], path: Path, title: str) -> Path:
    panels = [("train/loss", "training loss"), ("val/ppl", "validation perplexity")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, runs) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        for ax, (key, _) in zip(axes, panels):
            seeds = [dict(r[key]) for r in runs if r.get(key)]
            for s in seeds:
                ax.plot(list(s), list(s.values()), color=colour, alpha=0.25, linewidth=0.8,
                        marker="." if len(s) < 3 else None)  # a short run logs one or two points
            steps = sorted({st for s in seeds for st in s})
            if steps:  # mean over the seeds that logged each step
                mean = [sum(s[st] for s in seeds if st in s) / sum(st in s for s in seeds) for st in steps]
                ax.plot(steps, mean, color=colour, linewidth=1.8, label=name, marker="o" if len(steps) < 3 else None)
    for ax, (key, label) in zip(axes, panels):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if key == "val/ppl":
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{title}: training curves (mean over seeds; seeds faint)")
    return _save(fig, path)


ROUTING_PANELS = [("tree/mean/static_sparsity", "static sparsity (nodes no training token reached)"),
                  ("tree/mean/train_right_level0", "share of tokens the root sends right"),
                  ("tree/mean/train_logit_level0", "mean routing logit at the root")]


def plot_routing(curves: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Training-window routing statistics per row: mean over seeds, mean ± std as a band."""
    import statistics

    fig, axes = plt.subplots(1, len(ROUTING_PANELS), figsize=(15, 4.0))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, runs) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        for ax, (key, _) in zip(axes, ROUTING_PANELS):
            seeds = [dict(r[key]) for r in runs if r.get(key)]
            steps = sorted(set.intersection(*(set(s) for s in seeds))) if seeds else []
            if not steps:
                continue
            values = [[s[st] for s in seeds] for st in steps]
            mean = [statistics.fmean(v) for v in values]
            ax.plot(steps, mean, color=colour, linewidth=1.4, label=f"{name} (n={len(seeds)})")
            if len(seeds) > 1:
                std = [statistics.stdev(v) for v in values]
                ax.fill_between(steps, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                                color=colour, alpha=0.2, linewidth=0)
    for ax, (key, label) in zip(axes, ROUTING_PANELS):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if key.endswith("right_level0"):
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{title}: routing during training (means over layers; band: ± std over seeds)")
    return _save(fig, path)


def _labels(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
