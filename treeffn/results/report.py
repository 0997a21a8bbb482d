"""``treeffn report``: a sweep's run dirs -> the paper-style table (Markdown, CSV, LaTeX) and plots.

    treeffn report sweep=table_strategies_opt125m_smoke     # by name (sweeps/sweep/<name>.yaml)
    treeffn report sweep=runs/sweeps/<folder>                # or by the sweep dir itself

Nothing is trained or evaluated here; everything comes from files the runs wrote:

    <sweep dir>/multirun.yaml           the config the sweep was launched with: its grid
                                        (hydra.sweeper.params + the command's overrides) and
                                        how Hydra names run dirs
    <sweep dir>/<run>/result.json       each run's status and numbers (lm-eval results: eval.json)
    <sweep dir>/<run>/failure.json      present when the run's newest attempt failed (its error)
    <sweep dir>/<run>/logs/csv/metrics*.csv   training curves
    <sweep dir>/index.jsonl             every job's outcome, with the error of a failed one

The grid is expanded the way Hydra's basic sweeper expands it and every grid point's run dir is
named the way Hydra names it, so a point that never started shows up as ``missing`` instead of
being silently absent. Rows group points by the sweep's declared factors (``sweep_meta.factors``)
and aggregate the seeds: mean ± sample standard deviation over finished runs, n = finished /
expected. Statuses: finished, failed (an error, a non-finite stop, or no result.json at all: the
job was killed), preempted (stopped by a signal or Ctrl-C after a checkpoint; a rerun continues it),
missing (never started).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from treeffn.results.index import INDEX_FILE, latest_by_run, read_index
from treeffn.results.record import FAILURE_FILE, RESULT_FILE

MULTIRUN_FILE = "multirun.yaml"
EVAL_FILE = "eval.json"
DEFAULT_METRIC = "val_ppl"


class ReportError(ValueError):
    """Bad input to the report (unknown sweep, not a sweep dir, ...): one line for the user."""


# ------------------------------------------------------------------------------ the sweep
@dataclass
class Sweep:
    name: str
    dir: Path
    meta: dict
    jobs: list[list[str]]          # each job's overrides ("key=value"), in launch order
    exclude_keys: list[str]        # keys left out of run-dir names
    item_sep: str = ","
    kv_sep: str = "="
    runs_root: str | None = None   # to find the sweeps named in sweep_meta.reference
    launched: bool = True          # False: no multirun.yaml yet, the grid comes from the sweep file


def load_sweep(spec: str, runs_root: str | None = None) -> Sweep:
    """A sweep by name (a file in sweeps/sweep/) or by its dir (which holds multirun.yaml)."""
    from omegaconf import OmegaConf

    path = Path(spec).expanduser()
    if path.is_dir() or "/" in spec:
        launched = path / MULTIRUN_FILE
        if not launched.is_file():
            raise ReportError(f"sweep={spec}: not a sweep dir (no {MULTIRUN_FILE}); pass a sweep name "
                              f"or the folder `treeffn train -m` wrote")
        cfg = OmegaConf.load(launched)
        meta = _container(cfg, "sweep_meta") or {}
        if runs_root is None and path.resolve().parent.name == "sweeps":  # <runs_root>/sweeps/<folder>
            runs_root = str(path.resolve().parent.parent)
        return _sweep_from(cfg, meta, meta.get("name") or path.name, path, runs_root, launched=True)

    cfg = compose_sweep(spec, runs_root)
    meta = _container(cfg, "sweep_meta") or {}
    sweep_dir = Path(str(OmegaConf.select(cfg, "hydra.sweep.dir")))
    launched_file = sweep_dir / MULTIRUN_FILE
    # The sweep dir's multirun.yaml records what was actually launched (extra overrides such as
    # trainer.max_steps=... change run-dir names): its grid wins over the file's.
    grid_cfg = OmegaConf.load(launched_file) if launched_file.is_file() else cfg
    return _sweep_from(grid_cfg, meta, spec, sweep_dir, runs_root or cfg.get("runs_root"),
                       launched=launched_file.is_file())


def compose_sweep(name: str, runs_root: str | None = None):
    """The training config with sweep=<name> (and the hydra node, where the grid lives)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from treeffn.config_files import group_choices

    choices = group_choices("sweep")
    if name not in choices:
        raise ReportError(f"sweep={name} is not a sweep name or dir; choose one of: {', '.join(choices)}")
    overrides = [f"sweep={name}"] + ([f"runs_root={runs_root}"] if runs_root else [])
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("treeffn.conf", version_base="1.3"):
            return compose("config", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def _container(cfg, key: str):
    from omegaconf import OmegaConf

    node = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(node, resolve=False) if node is not None else None


def _sweep_from(cfg, meta: dict, name: str, sweep_dir: Path, runs_root, launched: bool) -> Sweep:
    from omegaconf import OmegaConf

    params = _container(cfg, "hydra.sweeper.params") or {}
    task = list(_container(cfg, "hydra.overrides.task") or []) if launched else []
    naming = OmegaConf.select(cfg, "hydra.job.config.override_dirname")
    return Sweep(name=name, dir=sweep_dir, meta=meta, jobs=expand_grid(params, task),
                 exclude_keys=list(naming.exclude_keys), item_sep=naming.item_sep, kv_sep=naming.kv_sep,
                 runs_root=str(runs_root) if runs_root else None, launched=launched)


def expand_grid(params: dict, task_overrides: list[str]) -> list[list[str]]:
    """Every job of a sweep, as Hydra's basic sweeper builds them: the sweeper's params, then the
    command's overrides (a key given twice keeps its first place and its last value), then the
    cartesian product in that key order, first key outermost."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{k}={v}" for k, v in params.items()] + list(task_overrides)
    per_key: dict[str, list[str]] = {}
    for o in OverridesParser.create().parse_overrides(lines):
        key = o.get_key_element()
        if o.is_sweep_override():
            per_key[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            per_key[key] = [f"{key}={o.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*per_key.values())]


def run_dir_name(job: list[str], sweep: Sweep) -> str:
    """The run dir Hydra gives a job: its overrides minus excluded keys, sorted, joined (Hydra's
    override_dirname), then treeffn's file-name sanitizer (hydra.sweep.subdir)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from treeffn.config_files import run_name

    kept = sorted(o.input_line for o in OverridesParser.create().parse_overrides(job)
                  if o.key_or_group not in sweep.exclude_keys)
    return run_name(re.sub("=", sweep.kv_sep, sweep.item_sep.join(kept)))


def job_values(job: list[str]) -> dict[str, str]:
    """{key: value} of a job's overrides ("+key" and "key" alike)."""
    out = {}
    for line in job:
        key, _, value = line.partition("=")
        out[key.lstrip("+~")] = value
    return out


# ------------------------------------------------------------------------------ runs and rows
@dataclass
class Point:
    """One grid point: one run dir."""

    values: dict[str, str]         # the job's overrides
    run_dir: Path
    status: str                    # finished | failed | preempted | missing
    detail: str = ""               # the error, or why there is no result
    result: dict | None = None
    eval: dict | None = None       # eval.json (lm-eval tasks), when the run was evaluated


@dataclass
class Row:
    label: dict[str, str]          # factor -> value
    points: list[Point]
    source: str | None = None      # the other sweep a reference row comes from
    stats: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The row's label in tables and plot legends."""
        name = ", ".join(v for v in self.label.values() if v and v != "—") or "all"
        return f"{name} (from {self.source})" if self.source else name


def collect_points(sweep: Sweep) -> list[Point]:
    index = {_norm(r.get("run_dir", "")): r for r in latest_by_run(read_index(sweep.dir / INDEX_FILE)).values()}
    return [point_of(job_values(job), sweep.dir / run_dir_name(job, sweep), index) for job in sweep.jobs]


def _norm(path) -> str:
    return str(Path(path).resolve()) if path else ""


def point_of(values: dict, run_dir: Path, index: dict) -> Point:
    result = _read_json(run_dir / RESULT_FILE)
    failure = _read_json(run_dir / FAILURE_FILE)  # the newest attempt failed; result.json keeps the last good record
    record = index.get(_norm(run_dir))
    if failure is not None:
        return Point(values, run_dir, "failed", failure.get("error") or "failed", result)
    if result is not None:
        status = result.get("status")
        if status == "finished":
            return Point(values, run_dir, "finished", result=result, eval=_read_json(run_dir / EVAL_FILE))
        if status in ("preempted", "interrupted"):
            return Point(values, run_dir, "preempted", f"stopped by {result.get('signal', 'a signal')} at step "
                         f"{result.get('steps', '?')}; rerun the sweep to continue it", result)
        detail = result.get("error") or result.get("stop_reason") or f"status {status}"
        return Point(values, run_dir, "failed", detail, result)
    if record is not None and record.get("status") in ("failed", "preempted", "interrupted"):
        return Point(values, run_dir, record["status"], record.get("error", ""))
    if run_dir.is_dir():
        return Point(values, run_dir, "failed", "no result.json: the job was killed (or is still running)")
    return Point(values, run_dir, "missing", "never started")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def factors_of(sweep: Sweep) -> tuple[list[str], str]:
    """The row keys (declared factors, plus any other key the grid varies) and the seed key."""
    seed_key = sweep.meta.get("seed_key", "seed")
    factors = list(sweep.meta.get("factors") or [])
    varying: dict[str, set] = {}
    for job in sweep.jobs:
        for k, v in job_values(job).items():
            varying.setdefault(k, set()).add(v)
    factors += [k for k, vs in varying.items() if len(vs) > 1 and k != seed_key and k not in factors]
    return factors, seed_key


def group_rows(points: list[Point], factors: list[str], source: str | None = None) -> list[Row]:
    rows: dict[tuple, Row] = {}
    for p in points:
        label = {f: p.values.get(f, "") for f in factors}
        rows.setdefault(tuple(label.values()), Row(label, [], source)).points.append(p)
    return list(rows.values())


def reference_rows(sweep: Sweep, factors: list[str]) -> list[Row]:
    """Rows another sweep measured (sweep_meta.reference), e.g. the dense baseline of a depth sweep."""
    rows = []
    for ref in sweep.meta.get("reference") or []:
        other = load_sweep(ref["sweep"], sweep.runs_root)
        where = {k: str(v) for k, v in (ref.get("where") or {}).items()}
        points = [p for p in collect_points(other) if all(p.values.get(k) == v for k, v in where.items())]
        if not points:
            continue
        row = Row({f: where.get(f, None) or _setting(points, f) for f in factors}, points, source=other.name)
        rows.append(row)
    return rows


def _setting(points: list[Point], key: str) -> str:
    """A factor a reference row's sweep does not vary (the width of a depth sweep's row): the
    value its finished runs trained with (tree.*: the resolved tree record; else config.yaml)."""
    from omegaconf import OmegaConf

    for p in points:
        if p.status != "finished":
            continue
        if key.startswith("tree.") and (p.result or {}).get("tree"):
            value = p.result["tree"].get(key.removeprefix("tree."))
        else:
            try:
                value = OmegaConf.select(OmegaConf.load(p.run_dir / "config.yaml"), key)
            except OSError:
                value = None
        return "—" if value is None else str(value)
    return "—"


# ------------------------------------------------------------------------------ numbers
def eval_value(point: Point, task: str, metric: str, shots: int):
    """One lm-eval number of a run: eval.json, else the copy under result.json["eval"]."""
    record = point.eval or (point.result or {}).get("eval") or {}
    entry = record.get("tasks", {}).get(task, {}).get(f"{shots}shot", {})
    value = entry.get("metrics", {}).get(metric)
    return value if isinstance(value, (int, float)) else None


HEADLINE_METRICS = ("acc", "f1")  # lm-eval columns shown when a sweep declares no eval_metrics


def eval_columns(sweep: Sweep, points: list[Point]) -> list[tuple[str, str, int]]:
    """(task, metric, shots) columns: the sweep's eval_metrics (<task>:<metric>), else every task's
    headline metric found in the runs' eval records; at every shot count found."""
    wanted = [tuple(s.split(":", 1)) for s in sweep.meta.get("eval_metrics") or [] if ":" in s]
    found = set()
    for p in points:
        record = p.eval or (p.result or {}).get("eval") or {}
        for task, by_shot in record.get("tasks", {}).items():
            for shot_key, entry in by_shot.items():
                for metric in entry.get("metrics", {}):
                    found.add((task, metric, int(shot_key.removesuffix("shot"))))
    if not wanted:
        wanted = sorted({(t, m) for t, m, _ in found if m in HEADLINE_METRICS})
    return [(t, m, k) for t, m in wanted for k in sorted({k for ft, fm, k in found if (ft, fm) == (t, m)})]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def row_stats(row: Row, metric: str, seed_key: str, qa: list[tuple[str, str, int]]) -> dict:
    done = [p for p in row.points if p.status == "finished"]
    first = done[0].result if done else {}
    m, s = mean_std([p.result.get(metric) for p in done])
    loss, _ = mean_std([p.result.get("val_loss") for p in done])
    wall, _ = mean_std([p.result.get("wall_s") for p in done])
    tree = first.get("tree") or {}
    not_done = [p for p in row.points if p.status != "finished"]
    stats = {
        "n": len(done), "expected": len(row.points), "mean": m, "std": s, "val_loss_mean": loss,
        "active_ffn_fraction": first.get("active_ffn_fraction"), "params_total": first.get("params_total"),
        "params_ffn": first.get("params_ffn"), "ffn": first.get("ffn"), "depth": tree.get("depth"),
        "trees": tree.get("trees"), "placement": tree.get("placement"), "tokens_seen": first.get("tokens_seen"),
        "wall_s_mean": wall,
        "epochs": max((p.result["epochs"] for p in done if p.result.get("epochs") is not None), default=None),
        "status": "ok" if not not_done else "; ".join(
            f"{seed_key}={p.values.get(seed_key, '?')} {p.status}" for p in not_done),
    }
    for task, qa_metric, shots in qa:
        stats[(task, qa_metric, shots)] = mean_std([eval_value(p, task, qa_metric, shots) for p in done])
    for key, read in ROUTING_COLUMNS.items():
        stats[key] = mean_std([read(p.result.get("routing") or {}) for p in done])
    # trainer.val_at_start: the metric before the first step (a fine-tune's converted model)
    stats["at_start"] = mean_std([(p.result.get("val_at_start") or {}).get(metric) for p in done])
    return stats


# Routing columns of tree rows, from result.json's routing record (the last validation, and its
# last training window), means over layers; each a mean ± std over seeds.
ROUTING_COLUMNS = {
    "leaf_entropy": lambda r: (r.get("mean") or {}).get("leaf_entropy"),
    "static_sparsity": lambda r: ((r.get("train_window") or {}).get("mean") or {}).get("dead_frac"),
    "root_right_share": lambda r: (r.get("mean") or {}).get("root_right_share"),
}
ROUTING_HEADERS = {"leaf_entropy": "leaf entropy", "static_sparsity": "static sparsity",
                   "root_right_share": "root → right"}


def compare_with_dense(rows: list[Row]) -> None:
    """Each tree row's metric against the one dense row: the difference of the means with its
    standard error (sqrt(s_t²/n_t + s_d²/n_d), the seed spreads), and the ratio of the means."""
    dense = [r for r in rows if r.stats.get("ffn") == "dense" and r.stats.get("mean") is not None]
    if len(dense) != 1:
        return
    d = dense[0].stats
    for row in rows:
        s = row.stats
        if row is dense[0] or s.get("mean") is None:
            continue
        spread = None
        if s["std"] is not None and d["std"] is not None:
            spread = math.sqrt(s["std"] ** 2 / s["n"] + d["std"] ** 2 / d["n"])
        s["minus_dense"] = (s["mean"] - d["mean"], spread)
        s["over_dense"] = s["mean"] / d["mean"]


# ------------------------------------------------------------------------------ the report
@dataclass
class Report:
    sweep: Sweep
    metric: str
    factors: list[str]
    rows: list[Row]
    points: list[Point]
    qa: list[tuple[str, str, int]]
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.points:
            out[p.status] = out.get(p.status, 0) + 1
        return out


def build_report(spec: str, runs_root: str | None = None, metric: str | None = None,
                 out: str | None = None) -> Report:
    sweep = load_sweep(spec, runs_root)
    metric = metric or sweep.meta.get("metric") or DEFAULT_METRIC
    factors, seed_key = factors_of(sweep)
    points = collect_points(sweep)
    rows = group_rows(points, factors) + reference_rows(sweep, factors)
    qa = eval_columns(sweep, points)  # the sweep's own runs decide which lm-eval columns there are
    for row in rows:
        row.stats = row_stats(row, metric, seed_key, qa)
    compare_with_dense(rows)
    default_out = sweep.dir / ("report" if sweep.meta.get("runs", sweep.name) == sweep.name else f"report_{sweep.name}")
    report = Report(sweep, metric, factors, rows, points, qa, Path(out) if out else default_out)
    if not sweep.launched:
        report.notes.append(f"not launched yet: no {MULTIRUN_FILE} in {sweep.dir} "
                            f"(treeffn train -m sweep={sweep.name})")
    known = {p.run_dir.name for p in points}
    others = [d.name for d in sweep.dir.iterdir() if d.is_dir() and d.name not in known
              and (d / "config.yaml").exists()] if sweep.dir.is_dir() else []
    repeated = [p.run_dir.name for p in points if p.status == "finished" and (p.result.get("epochs") or 0) > 1]
    if repeated:
        report.notes.append(f"{len(repeated)} run(s) trained more than one epoch of their data (repeated tokens), "
                            f"e.g. {repeated[0]}: their perplexities are not those of single-pass training")
    if others:
        report.notes.append(f"{len(others)} other run dir(s) in {sweep.dir} are not in this grid "
                            f"(launched with other overrides), e.g. {others[0]}")
    return report


def write_report(report: Report, plots: bool = True) -> Report:
    report.out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": report.out_dir / "table.md",
        "csv": report.out_dir / "table.csv",
        "latex": report.out_dir / "table.tex",
        "runs_csv": report.out_dir / "runs.csv",
    }
    files["markdown"].write_text(to_markdown(report))
    write_table_csv(report, files["csv"])
    files["latex"].write_text(to_latex(report))
    write_runs_csv(report, files["runs_csv"])
    if plots:
        from treeffn.results import plots as _plots  # matplotlib is an optional extra

        try:
            files.update(_plots.make_plots(report))
        except ImportError:
            report.notes.append("no plots: matplotlib is not installed (pip install 'treeffn[plots]')")
    report.files = files
    return report


# ------------------------------------------------------------------------------ formats
def _fmt(value: float | None, std: float | None = None, digits: int = 2, pm: str = " ± ") -> str:
    if value is None:
        return "—"
    text = f"{value:.{digits}f}"
    return text + (f"{pm}{std:.{digits}f}" if std is not None else "")


def _pct(fraction) -> str:
    return "—" if fraction is None else f"{100 * fraction:.1f}%"


def _count(n) -> str:
    if n is None:
        return "—"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def _epochs(epochs) -> str:
    """Passes over the unique training tokens; more than one is marked: the run saw data again."""
    if epochs is None:
        return "—"
    return f"{epochs:.2f}" + (" (repeated data)" if epochs > 1 else "")


def qa_header(task: str, metric: str, shots: int) -> str:
    return f"{task} {metric} ({shots}-shot)"


def table_cells(report: Report, row: Row) -> list[str]:
    s = row.stats
    cells = [row.label[f] for f in report.factors]
    cells.append(_fmt(s["mean"], s["std"]))
    if has_start(report):
        cells.append(_fmt(*s["at_start"]))
    cells += [f"{s['n']}/{s['expected']}", _pct(s["active_ffn_fraction"]),
              _count(s["params_ffn"]), _count(s["tokens_seen"]), _epochs(s["epochs"])]
    if has_dense_comparison(report):
        diff = s.get("minus_dense")
        cells += [_fmt(*diff) if diff else "—", _fmt(s.get("over_dense"), digits=3)]
    cells += [_fmt(*s[key], digits=3) for key in report.qa]
    if has_routing(report):
        cells += [_fmt(*s[key], digits=3) for key in ROUTING_COLUMNS]
    cells.append(s["status"] if not row.source else f"{s['status']} (from {row.source})")
    return cells


def has_routing(report: Report) -> bool:
    return any(r.stats.get("leaf_entropy", (None,))[0] is not None for r in report.rows)


def has_start(report: Report) -> bool:
    return any(r.stats.get("at_start", (None,))[0] is not None for r in report.rows)


def has_dense_comparison(report: Report) -> bool:
    return any("minus_dense" in r.stats for r in report.rows)


def table_header(report: Report) -> list[str]:
    header = [*report.factors, f"{report.metric} (mean ± std)",
              *([f"{report.metric} at step 0"] if has_start(report) else []),
              "n", "active FFN", "FFN params", "tokens/run", "epochs"]
    if has_dense_comparison(report):
        header += ["− dense (± s.e.)", "/ dense"]
    header += [qa_header(*key) for key in report.qa]
    if has_routing(report):
        header += [ROUTING_HEADERS[k] for k in ROUTING_COLUMNS]
    return header + ["status"]


def to_markdown(report: Report) -> str:
    sw, counts = report.sweep, report.counts
    lines = [f"# {sw.name}", ""]
    if sw.meta.get("table"):
        lines += [str(sw.meta["table"]), ""]
    lines += [f"Sweep dir `{sw.dir}`; {len(report.points)} grid points: "
              + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
              + f". Mean ± sample std of `{report.metric}` over finished seeds; n = finished / expected.", ""]
    header = table_header(report)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for row in report.rows:
        lines.append("| " + " | ".join(_md_escape(c) for c in table_cells(report, row)) + " |")
    if has_dense_comparison(report):
        lines += ["", "− dense: the row's mean minus the dense row's, ± the standard error of that difference "
                      "from the two seed spreads (sqrt(s²/n + s_dense²/n_dense)); / dense: the ratio of the means."]
    if has_start(report):
        lines += ["", f"{report.metric} at step 0: the same validation before the first training step "
                      "(trainer.val_at_start), i.e. the model as converted from its starting checkpoint."]
    if has_routing(report):
        lines += ["", routing_legend(report)]
    unfinished = [p for p in report.points if p.status != "finished"]
    if unfinished:
        lines += ["", "Not finished (rerun the same `treeffn train -m` command to fill these in; finished runs "
                      "are not retrained):", ""]
        lines += [f"- `{p.run_dir.name}`: **{p.status}** — {p.detail}" for p in unfinished]
    if report.notes:
        lines += ["", *[f"Note: {n}" for n in report.notes]]
    return "\n".join(lines) + "\n"


def routing_legend(report: Report) -> str:
    routing = next((p.result["routing"] for p in report.points
                    if p.status == "finished" and (p.result or {}).get("routing")), {})
    window = routing.get("train_window") or {}
    tokens = routing.get("tokens")
    return ("Routing columns (tree rows; means over layers, then mean ± std over seeds): leaf entropy = normalized "
            f"entropy of leaf usage at the last validation ({f'{tokens:,} held-out tokens' if tokens else 'the validation split'}); "
            f"static sparsity = share of nodes no training token reached in the last training window "
            f"({window.get('steps', '?')} steps); root → right = share of validation tokens the root sends right.")


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def write_table_csv(report: Report, path: Path) -> None:
    qa_cols = []
    for task, metric, shots in report.qa:
        qa_cols += [f"{task}:{metric}:{shots}shot_mean", f"{task}:{metric}:{shots}shot_std"]
    fields = [*report.factors, "source", "n_finished", "n_expected", f"{report.metric}_mean",
              f"{report.metric}_std", "val_loss_mean", "active_ffn_fraction", "params_total", "params_ffn",
              "ffn", "depth", "trees", "tokens_seen", "epochs", "wall_s_mean", *qa_cols,
              "minus_dense", "minus_dense_se", "over_dense", f"{report.metric}_at_step0_mean",
              f"{report.metric}_at_step0_std",
              *(f"{k}_{m}" for k in ROUTING_COLUMNS for m in ("mean", "std")), "status"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for row in report.rows:
            s = row.stats
            qa_vals = [v for key in report.qa for v in s[key]]
            w.writerow([*(row.label[k] for k in report.factors), row.source or "", s["n"], s["expected"], s["mean"],
                        s["std"], s["val_loss_mean"], s["active_ffn_fraction"], s["params_total"], s["params_ffn"],
                        s["ffn"], s["depth"], s["trees"], s["tokens_seen"], s["epochs"], s["wall_s_mean"], *qa_vals,
                        *(s.get("minus_dense") or (None, None)), s.get("over_dense"), *s["at_start"],
                        *(v for k in ROUTING_COLUMNS for v in s[k]), s["status"]])


def write_runs_csv(report: Report, path: Path) -> None:
    keys = sorted({k for p in report.points for k in p.values})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*keys, "status", report.metric, "val_loss", "steps", "tokens_seen", "wall_s", "run_dir", "detail"])
        for p in report.points:
            r = p.result or {}
            w.writerow([*(p.values.get(k, "") for k in keys), p.status, r.get(report.metric), r.get("val_loss"),
                        r.get("steps"), r.get("tokens_seen"), r.get("wall_s"), str(p.run_dir), p.detail])


_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text) -> str:
    return "".join(_LATEX_SPECIALS.get(c, c) for c in str(text))


def _math(mean: float | None, std: float | None, digits: int = 2) -> str:
    return "--" if mean is None else "$" + _fmt(mean, std, digits, pm=r" \pm ") + "$"


def to_latex(report: Report) -> str:
    """A booktabs tabular: factors, the metric as $mean \\pm std$, n, active fraction, QA columns."""
    header = [*report.factors, report.metric, "$n$", "active FFN"] + [qa_header(*k) for k in report.qa]
    lines = [f"% treeffn report: {report.sweep.name}" + (f" -- {report.sweep.meta['table']}"
                                                          if report.sweep.meta.get("table") else ""),
             r"% needs \usepackage{booktabs}",
             r"\begin{tabular}{" + "l" * len(report.factors) + "r" * (len(header) - len(report.factors)) + "}",
             r"\toprule",
             " & ".join(_tex(h) if not h.startswith("$") else h for h in header) + r" \\",
             r"\midrule"]
    for row in report.rows:
        s = row.stats
        label = [_tex(row.label[f]) for f in report.factors]
        if row.source and label:
            label[-1] += r"$^{\dagger}$"
        cells = label + [_math(s["mean"], s["std"]), f"{s['n']}/{s['expected']}", _tex(_pct(s["active_ffn_fraction"]))]
        cells += [_math(*s[k], digits=3) for k in report.qa]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if any(r.source for r in report.rows):
        sources = sorted({r.source for r in report.rows if r.source})
        lines.append(f"% $^\\dagger$ rows from sweep(s): {', '.join(sources)}")
    return "\n".join(lines) + "\n"
