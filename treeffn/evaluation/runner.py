"""``treeffn eval`` from settings to a written record: the one function the CLI calls.

Order of work (cheap checks first, so a wrong command fails before any model is loaded):

1. settings (``settings.py``) and task names (``harness.plan_tasks``: lm-eval installed? names known?);
2. the model (``treeffn.models.load``), moved to the device, in eval mode: tree layers route hard;
3. perplexity on each text set (``perplexity.py``), the validation split compared with the
   ``val_ppl`` training logged;
4. lm-eval tasks, once per ``num_fewshot`` value (``harness.py``);
5. the record (``record.py``): eval.json, result.json["eval"], W&B; then the table.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from treeffn.config import ConfigError
from treeffn.evaluation.settings import EvalSettings

DEFAULT_BLOCK_SIZE = 128  # block size for model.path= models without a treeffn config


def default_eval_config() -> dict:
    """conf/eval.yaml as a plain dict (no Hydra): what ``eval_after_train`` starts from."""
    from importlib import resources

    from omegaconf import OmegaConf

    text = resources.files("treeffn.conf").joinpath("eval.yaml").read_text()
    cfg = OmegaConf.create(text)
    cfg.pop("hydra", None)
    cfg.pop("defaults", None)
    return OmegaConf.to_container(cfg, resolve=True)


def evaluate(cfg: dict, console=None) -> dict:
    """Run one evaluation as configured (a resolved conf/eval.yaml dict); returns the invocation's record."""
    from treeffn.models.load import check_model_source

    started = time.perf_counter()
    console = console or default_console()
    s = EvalSettings.from_config(cfg)
    check_model_source(run=s.run, model_path=s.model_path, ckpt=s.ckpt)
    plan, lm_eval_version = preflight(s)

    loaded, model_info, autocast_dtype = prepare_model(s, console)
    data_cfg, train_batch, vlimit = validation_data(loaded, s)
    perplexity = measure_texts(s, loaded, data_cfg, train_batch, vlimit, autocast_dtype, console)
    tasks = []
    if plan is not None:
        max_length = s.max_length or (int(data_cfg["block_size"]) if loaded.source == "run" else None)
        tasks = measure_tasks(s, loaded, plan, lm_eval_version, max_length, autocast_dtype, console)

    from treeffn.evaluation.record import EVAL_FORMAT, package_versions

    record = {
        "format": EVAL_FORMAT,
        "model": model_info,
        "perplexity": {p["name"]: p for p in perplexity},
        "tasks": {},
        "lm_eval_version": lm_eval_version,
        "versions": package_versions(),
        "settings": s.as_dict(),
        "wall_s": round(time.perf_counter() - started, 3),
    }
    for t in tasks:
        record["tasks"].setdefault(t["task"], {})[f"{t['shots']}shot"] = t
    written = write_and_print(s, loaded, record, perplexity, tasks, console)
    return {**record, "written": written}


def default_console():
    from rich.console import Console

    console = Console(highlight=False)
    # piped output gets a table wide enough to read, not 80 columns
    return console if console.is_terminal else Console(highlight=False, width=120)


def prepare_model(s: EvalSettings, console):
    """Load the model, move it to the device in eval mode (tree layers: hard routing); say what it is."""
    import torch

    from treeffn.models.load import load_model

    torch.manual_seed(s.seed)
    loaded = load_model(run=s.run, model_path=s.model_path, ckpt=s.ckpt)
    device = resolve_device(s.device)
    loaded.model = loaded.model.to(device).eval()
    routing = prepare_tree_layers(loaded.model, device)
    autocast_dtype = resolve_precision(s.precision, loaded, device)
    info = describe_model(loaded, routing, device, autocast_dtype)
    console.print(f"evaluating {info['weights']}" + (f" (step {loaded.step})" if loaded.step is not None else "")
                  + f" on {device}, {info['precision']}")
    console.print(f"model: {info['summary']}")
    if routing:
        console.print(f"tree FFN evaluated on the inference path: {routing}")
    return loaded, info, autocast_dtype


def measure_texts(s, loaded, data_cfg, train_batch, vlimit, autocast_dtype, console) -> list[dict]:
    """Perplexity on every text set of ``texts=``; the validation split next to training's val_ppl."""
    out = []
    for name in s.texts:
        entry = measure_text_set(name, loaded, data_cfg, train_batch, vlimit, s, autocast_dtype).as_dict()
        if name == "validation":
            entry.update(compare_with_training(loaded, entry, s, int(data_cfg["block_size"])))
        out.append(entry)
        console.print(perplexity_line(entry))
    return out


def measure_tasks(s, loaded, plan, lm_eval_version, max_length, autocast_dtype, console) -> list[dict]:
    """lm-eval once per ``num_fewshot`` value; results as dicts with the settings that made them."""
    from treeffn.evaluation.harness import run_tasks

    out = []
    done_at_zero: set[str] = set()
    for shots in s.num_fewshot:
        # perplexity tasks are zero-shot whatever num_fewshot says: run them once
        names = [n for n in plan.names if not (n in plan.zero_shot_only and n in done_at_zero)]
        if not names:
            continue
        console.print(f"lm-eval {lm_eval_version}: {', '.join(names)} with {shots} shot(s)"
                      + (f", limit {s.limit}" if s.limit else ""))
        t0 = time.perf_counter()
        results = run_tasks(loaded.model, loaded.tokenizer, plan.subset(names), shots, limit=s.limit,
                            batch_size=s.batch_size, seed=s.seed, max_length=max_length,
                            bootstrap_iters=s.bootstrap_iters, autocast_dtype=autocast_dtype, verbose=s.verbose)
        done_at_zero |= {r.task for r in results if r.shots == 0}
        wall = round(time.perf_counter() - t0, 3)
        out += [{**r.as_dict(), "requested_shots": shots, "lm_eval_version": lm_eval_version, "seed": s.seed,
                 "limit": s.limit, "batch_size": s.batch_size, "max_length": max_length, "wall_s": wall}
                for r in results]
    return out


def write_and_print(s, loaded, record, perplexity, tasks, console) -> dict:
    """eval.json (+ result.json, W&B), then the table and where things went."""
    from treeffn.evaluation.record import log_to_wandb, save
    from treeffn.evaluation.table import results_table

    out_dir = Path(s.output_dir).expanduser() if s.output_dir else (loaded.run_dir or Path(loaded.weights))
    written = save(record, out_dir, loaded.run_dir)
    wandb = log_to_wandb(loaded.run_dir, loaded.config, record) if s.wandb == "auto" else None

    console.print(results_table(record, perplexity, tasks, f"treeffn eval: {loaded.run_dir or loaded.weights}"))
    where = f"wrote {written['eval_json']}"
    if written["result_json"]:
        where += f"; added to {written['result_json']} under \"eval\""
    elif loaded.run_dir and Path(written["eval_json"]).name != "eval.json":
        where += " (not the run's last.ckpt: result.json left as it is)"
    elif loaded.run_dir:
        where += f" (no result.json in {loaded.run_dir}: nothing added there)"
    if wandb:
        where += f"; logged to the run's W&B run ({wandb})"
    console.print(where + f" [{record['wall_s']:.1f} s]")
    return written


def preflight(s: EvalSettings):
    """Checks that need no model: text sets exist, lm-eval is installed, task names are known.

    Returns (task plan or None, lm-eval version or None).
    """
    check_texts(s.texts)
    if not s.tasks:
        return None, None
    from treeffn.evaluation.harness import plan_tasks, require_lm_eval

    version = require_lm_eval()
    plan = plan_tasks(s.tasks, s.task_dirs, cache_dir=_cache_dir(s) / "lm-eval-datasets")
    plan.check_hub_data()
    return plan, version


# ------------------------------------------------------------------------------ after training
def eval_config_for_run(run_dir, train_cfg: dict) -> dict:
    """The eval config of ``treeffn train ... eval_after_train=true``: conf/eval.yaml, then the
    training config's ``eval`` section, for this run, with the run's data cache."""
    cfg = default_eval_config()
    cfg.update(train_cfg.get("eval") or {})
    cfg["run"] = str(run_dir)
    cfg["data"] = {**cfg["data"], "cache_dir": train_cfg["data"]["cache_dir"]}
    return cfg


def check_eval_after_train(run_dir, train_cfg: dict) -> None:
    """Before training starts: a bad task name or a missing lm-eval fails now, not hours later."""
    preflight(EvalSettings.from_config(eval_config_for_run(run_dir, train_cfg)))


# ------------------------------------------------------------------------------ helpers
def _cache_dir(s: EvalSettings) -> Path:
    return Path(os.path.expanduser(s.cache_dir or os.environ.get("TREEFFN_CACHE") or "~/.cache/treeffn"))


def check_texts(texts: list[str]) -> None:
    from treeffn.evaluation.perplexity import EMBEDDED_TEXTS

    for name in texts:
        if name in ("validation", *EMBEDDED_TEXTS):
            continue
        import glob

        path = Path(name).expanduser()
        if not path.exists() and not glob.glob(str(path)):
            raise ConfigError(f"texts: {name!r} is neither a text set (validation, {', '.join(EMBEDDED_TEXTS)}) "
                              f"nor an existing file, folder or glob")


def resolve_device(setting: str):
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={setting}: CUDA is not available on this machine; use device=cpu")
    return torch.device(setting)


def resolve_precision(setting: str, loaded, device):
    """None (fp32) or torch.bfloat16 (autocast). auto: bf16 when training used bf16 on this kind of GPU."""
    import torch

    if setting == "32":
        return None
    if setting == "bf16":
        return torch.bfloat16
    trained = ((loaded.config or {}).get("trainer") or {}).get("precision", "32-true")
    bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if str(trained).startswith("bf16") or (trained == "auto" and bf16_gpu):
        return torch.bfloat16 if bf16_gpu else None
    return None


def prepare_tree_layers(model, device) -> str | None:
    """Turn off node-visit counting (eval leaves routing statistics alone); describe the routing used.

    Covers every tree-routed layer kind (treeffn.layers.TREE_LAYER_TYPES): the node family
    (TreeFFN), pruned trees, and the FFF leaf family (LeafFFN, soft in training, hard in eval).
    """
    from treeffn.models.swap import tree_layers

    layers = tree_layers(model)
    if not layers:
        return None
    for layer in layers:
        layer.track_stats = False
    first = layers[0]
    impl = effective_impl(first, device)
    active = getattr(first, "active_units", first.active_nodes)
    total = getattr(first, "total_units", first.total_nodes)
    routing = "SOFT routing (forced by the layer's settings)" if impl == "soft" else "hard routing"
    return (f"{routing}, model.eval(), {type(first).__name__} impl={impl}; each token uses {active} of {total} "
            f"FFN units per layer ({100 * active / total:.1f}%)")


def effective_impl(layer, device) -> str:
    """The implementation a tree layer's forward picks on ``device`` (mirrors TreeFFN's ``auto`` rule;
    other layer kinds say it themselves through ``.impl``)."""
    from treeffn.layers import TreeFFN

    if not isinstance(layer, TreeFFN) or layer.impl != "auto":
        return str(layer.impl)
    if device.type == "cuda":
        try:
            from treeffn.kernels import triton_available
        except ImportError:
            triton_available = None
        if triton_available is not None and triton_available():
            return "triton"
    if layer.training:
        return "masked"
    from treeffn.kernels import cpu_gather_max_tokens

    return f"gather (up to {cpu_gather_max_tokens()} tokens a call; masked above)"


def describe_model(loaded, routing: str | None, device, autocast_dtype) -> dict:
    from treeffn.evaluation.record import weights_fingerprint

    params = sum(p.numel() for p in loaded.model.parameters())
    if loaded.source == "run":
        tree = loaded.config["tree"]
        arch = (f"tree FFN (depth {tree['depth']}, placement {tree['placement']})" if loaded.ffn == "tree"
                else "dense FFN")
        summary = f"{loaded.config['model']['name']} preset, {arch}, {params:,} parameters"
    else:
        summary = f"{type(loaded.model).__name__} from {loaded.weights}, {loaded.ffn} FFN, {params:,} parameters"
    return {
        "source": loaded.source,
        "run_dir": str(loaded.run_dir) if loaded.run_dir else None,
        "weights": str(loaded.weights),
        "step": loaded.step,
        "fingerprint": weights_fingerprint(loaded.weights),
        "ffn": loaded.ffn,
        "params_total": params,
        "routing": f"inference path: {routing}" if routing else None,
        "device": str(device),
        "precision": "bf16 autocast" if autocast_dtype else "fp32",
        "summary": summary,
    }


def validation_data(loaded, s: EvalSettings) -> tuple[dict, int, int | float | None]:
    """(data config, batch size training validated with, validation batch limit) for this model."""
    if loaded.source == "run":
        data = dict(loaded.config["data"])
        train_batch = int(data["batch_size"])
        run_limit = (loaded.config.get("trainer") or {}).get("limit_val_batches", 1.0)
        vlimit = run_limit if s.validation_limit == "run" else s.validation_limit
    else:  # a Hugging Face dir: the embedded validation text, tokenized by the model's own tokenizer
        data = {"source": "embedded", "corpus": "shakespeare", "tokenizer": str(loaded.weights),
                "block_size": DEFAULT_BLOCK_SIZE, "batch_size": s.batch_size, "num_workers": 0}
        train_batch = s.batch_size
        vlimit = None if s.validation_limit == "run" else s.validation_limit
    if s.block_size:
        data["block_size"] = s.block_size
    data["cache_dir"] = str(_cache_dir(s))
    max_positions = getattr(loaded.model.config, "max_position_embeddings", None)
    if max_positions and data["block_size"] > max_positions:
        raise ConfigError(f"data.block_size={data['block_size']} is longer than the model's "
                          f"max_position_embeddings={max_positions}")
    return data, train_batch, vlimit


def measure_text_set(name, loaded, data_cfg, train_batch, vlimit, s, autocast_dtype):
    from treeffn.evaluation.perplexity import measure, read_text_set, text_blocks, validation_blocks

    if name == "validation":
        seed = (loaded.config or {}).get("seed", s.seed)
        blocks, description = validation_blocks(data_cfg, seed, train_batch, vlimit)
    else:
        docs, description = read_text_set(name)
        blocks = text_blocks(docs, loaded.tokenizer, int(data_cfg["block_size"]), s.text_max_tokens)
        if len(blocks) == 0:
            raise ConfigError(f"texts: {name!r} has fewer tokens than one block of {data_cfg['block_size']}")
        description += f" ({len(blocks)} blocks)"
    return measure(name, loaded.model, blocks, s.batch_size, description, autocast_dtype)


def compare_with_training(loaded, entry: dict, s: EvalSettings, block_size: int) -> dict:
    """The run's logged val_ppl next to ours, when both measure the same weights on the same blocks."""
    from treeffn.results.record import read_result

    if loaded.source != "run":
        return {}
    result = read_result(loaded.run_dir) or {}
    logged = result.get("val_ppl")
    same = (logged is not None and s.validation_limit == "run" and block_size == loaded.config["data"]["block_size"]
            and loaded.step is not None and loaded.step == result.get("steps"))
    if not same:
        return {"training_val_ppl": None}
    return {"training_val_ppl": logged, "rel_diff_to_training": entry["ppl"] / logged - 1.0}


def perplexity_line(p: dict) -> str:
    line = f"perplexity {p['name']}: {p['ppl']:.4f} (loss {p['loss']:.6f}, {p['tokens']:,} tokens; {p['description']})"
    if p.get("training_val_ppl"):
        line += (f"; training logged val_ppl {p['training_val_ppl']:.4f} "
                 f"(relative difference {p['rel_diff_to_training']:.1e})")
    return line
