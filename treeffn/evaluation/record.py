"""The evaluation record: ``eval.json`` in the run dir, a copy under ``"eval"`` in ``result.json``.

(A checkpoint other than the run's ``last.ckpt`` gets ``eval-<checkpoint name>.json`` and leaves
``result.json`` alone: the run's result record describes its final weights.)

One record per set of weights. A later ``treeffn eval`` of the same checkpoint adds to it
(a text set or a task at a shot count it already had is replaced); a record of other weights
(the run trained on, a different ``ckpt=``) is started afresh. Layout:

    {"format": 1,
     "model": {source, run_dir, weights, step, fingerprint, ffn, routing, ...},
     "perplexity": {"validation": {loss, ppl, tokens, blocks, block_size, description,
                                   training_val_ppl, rel_diff_to_training}, "kjv": {...}},
     "tasks": {"<task>": {"<k>shot": {shots, metrics, stderr, version, samples, samples_total,
                                      lm_eval_version, seed, limit, batch_size, max_length}}},
     "lm_eval_version": ..., "versions": {package versions}, "settings": {last invocation},
     "updated": ISO time}
"""

from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path

from treeffn.atomic import write_json_atomic
from treeffn.results.record import RESULT_FILE

EVAL_FILE = "eval.json"
EVAL_FORMAT = 1
PACKAGES = ("treeffn", "torch", "transformers", "lm_eval", "datasets")


def weights_fingerprint(path: Path) -> str:
    """Size and modification time of a checkpoint file (or of a model dir's newest file)."""
    path = Path(path)
    files = [path] if path.is_file() else [f for f in path.iterdir() if f.is_file()] if path.is_dir() else []
    if not files:
        return "missing"
    newest = max(files, key=lambda f: f.stat().st_mtime_ns)
    return f"{sum(f.stat().st_size for f in files)}:{newest.stat().st_mtime_ns}"


def package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def same_weights(a: dict, b: dict) -> bool:
    """Same checkpoint file, unchanged, evaluated at the same precision: numbers that belong together."""
    keys = ("weights", "step", "fingerprint", "precision")
    return all(a.get("model", {}).get(k) == b.get("model", {}).get(k) for k in keys)


def merge(old: dict | None, new: dict) -> dict:
    """``new`` on top of ``old`` when both describe the same weights; else ``new`` alone."""
    if not old or old.get("format") != EVAL_FORMAT or not same_weights(old, new):
        return new
    merged = {**old, **{k: v for k, v in new.items() if k not in ("perplexity", "tasks")}}
    merged["perplexity"] = {**old.get("perplexity", {}), **new.get("perplexity", {})}
    tasks = {name: dict(shots) for name, shots in old.get("tasks", {}).items()}
    for name, shots in new.get("tasks", {}).items():
        tasks.setdefault(name, {}).update(shots)
    merged["tasks"] = tasks
    return merged


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def eval_file_name(weights: Path, run_dir: Path | None) -> str:
    """``eval.json`` for a run's final weights (last.ckpt) or a model dir; ``eval-<ckpt>.json`` for
    any other checkpoint, so evaluating an earlier checkpoint never overwrites the final one's record."""
    if run_dir is None or Path(weights).resolve() == (Path(run_dir) / "checkpoints" / "last.ckpt").resolve():
        return EVAL_FILE
    return f"eval-{Path(weights).stem}.json"


def save(record: dict, out_dir: Path, run_dir: Path | None) -> dict:
    """Merge into ``out_dir/eval*.json`` and, for a run's final weights, into its ``result.json``.

    Returns the paths written (``result_json`` None when result.json was not touched).
    """
    record = {**record, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    name = eval_file_name(Path(record["model"]["weights"]), run_dir)
    eval_path = Path(out_dir) / name
    merged = merge(read_json(eval_path), record)
    write_json_atomic(eval_path, merged)
    written = {"eval_json": str(eval_path), "result_json": None}
    if run_dir is not None and name == EVAL_FILE:
        result_path = Path(run_dir) / RESULT_FILE
        result = read_json(result_path)
        if result is not None:
            result["eval"] = merged
            write_json_atomic(result_path, result)
            written["result_json"] = str(result_path)
    return written


# ------------------------------------------------------------------------------ W&B
def flat_metrics(record: dict) -> dict:
    """``eval/...`` scalars for a W&B summary."""
    out = {}
    for name, p in record.get("perplexity", {}).items():
        out[f"eval/ppl/{name}"] = p["ppl"]
        out[f"eval/loss/{name}"] = p["loss"]
    for task, by_shots in record.get("tasks", {}).items():
        for shots, entry in by_shots.items():
            for metric, value in entry["metrics"].items():
                if isinstance(value, (int, float)):
                    out[f"eval/{task}/{shots}/{metric}"] = value
    return out


def log_to_wandb(run_dir: Path | None, run_config: dict | None, record: dict) -> str | None:
    """Add the metrics to the run's W&B run (same id) when training logged to W&B.

    Returns the W&B mode used, or None when nothing was logged. Never fails the evaluation:
    a W&B problem becomes a warning line.
    """
    if run_dir is None or run_config is None:
        return None
    id_file = Path(run_dir) / "wandb_id.txt"
    logger = run_config.get("logger") or {}
    if not id_file.is_file() or "wandb" not in (logger.get("names") or []):
        return None
    from treeffn.results.record import wandb_mode

    mode = wandb_mode(logger.get("mode", "auto"))
    if mode == "disabled":
        return None
    try:
        import wandb

        run = wandb.init(project=logger.get("project", "treeffn"), id=id_file.read_text().strip(), resume="allow",
                         dir=str(run_dir), mode=mode)
        run.summary.update(flat_metrics(record))
        run.finish()
    except Exception as e:  # noqa: BLE001 - logging must not cost the user the evaluation
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"treeffn eval: warning: could not log to W&B ({first}); the results are in eval.json")
        return None
    return mode
