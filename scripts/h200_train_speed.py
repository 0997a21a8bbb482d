"""Training speed through the real `treeffn train`: the runner's overhead, compile, tree vs dense.

    python3 scripts/h200_train_speed.py --out $OUT --corpus .corpus --budget 540   # the 2-GPU call
    python scripts/h200_train_speed.py --out /tmp/speed --smoke --budget 400        # CPU check

Two queues run side by side, one per GPU (CUDA_VISIBLE_DEVICES): the OPT-125M shape on GPU 0,
the OPT-1.3B shape on GPU 1, so every comparison is made on one GPU within one call. A job is
a subprocess:

* `treeffn train ...` as a user types it (default loggers: W&B offline and CSV). Its speed is
  the median of the logged `train/tokens_per_s` windows after the first quarter of the steps:
  the whole model, host time included;
* `plain`: a plain PyTorch loop over the same composed config (same model, data loader,
  parameter groups, fused AdamW, schedule, clipping, bf16 autocast), timed the same way (wall
  clock over windows of `trainer.log_every_n_steps` steps, one sync per window);
* `layers`: one FFN layer, forward + backward, per shape (dense against every tree path),
  after a float64 parity check of each tree path against treeffn.bench.reference (outputs,
  gradients, routing). A diagnostic: loop time of one layer, not the model's speed;
* `syncs`: a short `treeffn train` with CUDA's sync debug mode on from step 5 to 25: every
  host synchronisation left in a training step, with where it comes from.

Side by side, the queues share the host's CPU (model builds, data loading, compilation), and a
run whose step is bound by host work varies with what the other queue does: on 2026-11-30 the
OPT-1.3B tree ran at 41,370 and 30,500 tokens/s in two rounds here, dense at 49,868 and 50,080.
`--serial` runs one queue after the other. Dense and tree runs of a shape alternate (dense, tree, ..., then the same again in reverse).
Jobs run in priority order; one that would not fit the remaining budget is skipped, and said
so. summary.json is rewritten after every job, so a cut-off call still returns what finished.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

T0 = time.perf_counter()
HERE = Path(__file__).resolve()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------- the jobs
def shapes(smoke: bool) -> dict:
    """Per queue: model overrides, steps, rough seconds a run takes (eager, compiled)."""
    if smoke:
        return {
            "125m": {"model": ["model=tiny", "data.block_size=64", "data.batch_size=8"], "tree": ["tree.depth=3"],
                     "steps": 30, "need": (40, 90)},
            "1.3b": {"model": ["model=tiny", "data.block_size=64", "data.batch_size=4"], "tree": ["tree.depth=2"],
                     "steps": 20, "need": (40, 90)},
        }
    return {
        "125m": {"model": ["model=opt125m", "data.block_size=512", "data.batch_size=32"], "tree": ["tree.depth=6"],
                 "steps": 160, "need": (40, 65)},
        "1.3b": {"model": ["model=opt1.3b", "data.block_size=2048", "data.batch_size=4"], "tree": ["tree.depth=6"],
                 "steps": 60, "need": (95, 120)},
    }


def corpus_file(corpus: Path, name: str) -> Path:
    """The stream, or its .xz copy (what travels to the GPU machine; data=tokens reads either)."""
    return corpus / name if (corpus / name).exists() else corpus / f"{name}.xz"


def data_overrides(corpus: Path | None, smoke: bool) -> list[str]:
    if smoke or corpus is None:
        return ["data=embedded"]
    return ["data=tokens", f"data.path={corpus_file(corpus, 'train.u16')}",
                f"data.val_path={corpus_file(corpus, 'validation.u16')}"]


def train_overrides(shape: dict, data: list[str], variant: str, smoke: bool) -> list[str]:
    """A variant: dense | tree | tree_k8d9 (K=8, D=9), optionally + _compile or _grouped
    (tree.impl=grouped: tokens grouped by subtree)."""
    ffn = variant.replace("_compile", "").replace("_grouped", "")
    if ffn == "dense":
        part = ["tree=dense"]
    elif ffn == "tree":
        part = ["tree=tree", *shape["tree"]]
    elif ffn == "tree_k8d9":
        part = ["tree=tree", "tree.depth=4" if smoke else "tree.depth=9", "tree.trees=8"]
    else:
        raise ValueError(variant)
    steps = shape["steps"]
    return [*shape["model"], *part, *data, "seed=0", f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}", f"checkpoint.every_n_steps={steps}", "trainer.limit_val_batches=8",
            "optim.warmup_steps=10", "resume=never", *(["trainer.compile=true"] if "_compile" in variant else []),
            *(["tree.impl=grouped"] if "_grouped" in variant else []),
            # The CPU check runs the GPUs' precision too: bf16-mixed goes through another Lightning
            # plugin than float32 (one that refused to clip for the fused optimizer).
            *(["trainer=gpu"] if not smoke else ["trainer.precision=bf16-mixed"])]


def queue(name: str, shape: dict, data: list[str], smoke: bool) -> list[dict]:
    """The jobs of one GPU in priority order; pairs alternate dense and tree."""
    eager, compiled = shape["need"]

    def run(variant, rnd):
        return {"name": f"{name}_{variant}_r{rnd}", "kind": "train", "variant": variant, "round": rnd,
                "overrides": train_overrides(shape, data, variant, smoke),
                "need_s": compiled if "_compile" in variant else eager}

    def plain(rnd):
        return {"name": f"{name}_dense_plain_r{rnd}", "kind": "plain", "variant": "dense_plain", "round": rnd,
                "overrides": train_overrides(shape, data, "dense", smoke), "need_s": eager * 0.6}

    def profile(variant):
        return {"name": f"{name}_profile_{variant}", "kind": "profile", "need_s": eager * 0.6,
                "overrides": train_overrides(shape, data, variant, smoke)}

    jobs = []
    if name == "125m":
        # The layer table last: it writes its JSON after every shape, so a cut leaves the first ones.
        jobs += [run("dense", 1), run("tree", 1), plain(1), run("tree_compile", 1), run("dense_compile", 1),
                 {"name": "syncs_tree", "kind": "syncs", "overrides": train_overrides(shape, data, "tree", smoke),
                  "need_s": eager},
                 *(profile(v) for v in ("tree", "dense")),
                 plain(2), run("tree", 2), run("dense", 2),
                 {"name": "layers", "kind": "layers", "need_s": 40 if not smoke else 200}]
    else:
        jobs += [run("dense", 1), run("tree", 1), profile("tree"), profile("dense"), run("tree", 2), run("dense", 2),
                 run("tree_compile", 1), run("dense_compile", 1), run("tree_k8d9_grouped", 1),
                 run("tree_k8d9_compile", 1)]
    return jobs


# --------------------------------------------------------------------------- reading runs
def window_rates(run: Path) -> list[float]:
    rates = []
    for path in sorted((run / "logs" / "csv").glob("metrics*.csv")):
        with open(path) as f:
            rates += [float(r["train/tokens_per_s"]) for r in csv.DictReader(f) if r.get("train/tokens_per_s")]
    return rates


def read_run(run: Path) -> dict:
    info: dict = {"run_dir": str(run)}
    if (run / "result.json").exists():
        result = json.loads((run / "result.json").read_text())
        info.update({k: result.get(k) for k in ("status", "steps", "tokens_seen", "val_loss", "wall_s",
                                                 "invocation_wall_s", "params_total", "active_ffn_fraction",
                                                 "peak_memory_gib_per_rank")})
    rates = window_rates(run)
    kept = rates[len(rates) // 4:]  # after the first quarter: warm-up and compilation
    info["windows"] = len(rates)
    info["tokens_per_s"] = round(statistics.median(kept)) if kept else None
    peaks = []
    for path in sorted((run / "logs" / "csv").glob("metrics*.csv")):
        with open(path) as f:
            peaks += [float(r["train/peak_memory_gib"]) for r in csv.DictReader(f) if r.get("train/peak_memory_gib")]
    info["peak_memory_gib"] = round(max(peaks), 2) if peaks else None
    return info


# --------------------------------------------------------------------------- composed config
def compose(overrides: list[str]) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="treeffn.conf", version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


# --------------------------------------------------------------------------- plain loop
def plain_setup(overrides: list[str]):
    """What `treeffn train <overrides>` trains, without Lightning: (cfg, device, model, one
    training step as a function of a batch, the data loader)."""
    import torch

    from treeffn.data.datamodule import TextDataModule
    from treeffn.data.shards import collate_blocks
    from treeffn.models.build import build_model
    from treeffn.models.unpadded import unpadded_blocks
    from treeffn.training.lm_module import CausalLMModule, parameter_groups, warmup_cosine

    cfg = compose(overrides)
    torch.manual_seed(cfg["seed"])
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = TextDataModule(cfg["data"], seed=cfg["seed"])
    data.setup()
    model = build_model(cfg["model"], cfg["tree"], vocab_size=data.vocab_size, **data.special_ids()).to(dev)
    module = CausalLMModule(model, cfg["optim"], max_steps=cfg["trainer"]["max_steps"])
    o = cfg["optim"]
    groups = parameter_groups(model, o["weight_decay"], module.matrices, o["lr"])
    opt = torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, o["warmup_steps"], cfg["trainer"]["max_steps"], o["min_lr_ratio"]))
    loader = torch.utils.data.DataLoader(data.train_set, batch_size=cfg["data"]["batch_size"], shuffle=True,
                                         collate_fn=collate_blocks,
                                         pin_memory=dev.type == "cuda", drop_last=True)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    model.train()

    def step(batch):
        x = batch.to(dev, non_blocking=True)
        with amp, unpadded_blocks(model):  # as the runner does: no host check of an all-ones mask
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return cfg, dev, model, step, loader


def plain_loop(overrides: list[str], out: Path) -> dict:
    """The same training as `treeffn train <overrides>`, without Lightning: tokens/s per window."""
    import torch

    cfg, dev, _, train_step, loader = plain_setup(overrides)
    steps, every = cfg["trainer"]["max_steps"], cfg["trainer"]["log_every_n_steps"]
    tokens = cfg["data"]["batch_size"] * cfg["data"]["block_size"]
    rates, step, losses = [], 0, []
    start = time.perf_counter()
    while step < steps:
        for batch in loader:
            loss = train_step(batch)
            step += 1
            if step % every == 0:
                losses.append(float(loss.detach()))  # the one host read of a window, as Lightning's logging
                now = time.perf_counter()
                rates.append(every * tokens / (now - start))
                start = now
            if step >= steps:
                break
    kept = rates[len(rates) // 4:]
    result = {"tokens_per_s": round(statistics.median(kept)), "windows": len(rates), "rates": [round(r) for r in rates],
              "last_loss": losses[-1] if losses else None,
              "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None}
    out.write_text(json.dumps(result, indent=1))
    return result


# --------------------------------------------------------------------------- profile
def profile_steps(overrides: list[str], out: Path, warmup: int = 10, profiled: int = 5) -> dict:
    """Where a training step's device time goes (a diagnostic): torch.profiler over a few steps
    of the plain loop after warm-up, kernels summed by name and by kind (GEMM, attention,
    element-wise and reductions, copies, other)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cfg, dev, _, train_step, loader = plain_setup(overrides)
    batches = iter(loader)
    for _ in range(warmup):
        train_step(next(batches))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(profiled):
            train_step(next(batches))
        if dev.type == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / profiled
    on_device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    # (name, microseconds) per kernel; on the CPU check, operator self times stand in for kernels
    device_events = ([(e.name, e.device_time_total) for e in on_device] if on_device else
                     [(e.name, e.self_cpu_time_total) for e in prof.events()])

    def kind(name: str) -> str:
        n = name.lower()
        if any(k in n for k in ("gemm", "cutlass", "xmma", "matmul", "_mm", "::mm", "bmm", "addmm", "nvjet")):
            return "gemm"
        if any(k in n for k in ("flash", "fmha", "attention", "sdpa")):
            return "attention"
        if any(k in n for k in ("memcpy", "memset", "copy")):
            return "copy"
        if any(k in n for k in ("elementwise", "reduce", "triton", "vectorized", "unrolled", "fused", "softmax",
                                "norm", "adam", "cat", "index", "scatter", "gather", "sort", "cumsum")):
            return "elementwise/reduce"
        return "other"

    by_name: dict = {}
    for name, us in device_events:
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += us
        entry[1] += 1
    by_kind: dict = {}
    for name, (us, _) in by_name.items():
        by_kind[kind(name)] = by_kind.get(kind(name), 0.0) + us
    busy = sum(by_kind.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:30]
    result = {"note": "diagnostic: device time of kernels per training step (plain loop), not a speed",
              "steps_profiled": profiled, "wall_ms_per_step": round(wall * 1e3, 2),
              "device_busy_ms_per_step": round(busy / profiled / 1e3, 2),
              "by_kind_ms_per_step": {k: round(v / profiled / 1e3, 2) for k, v in sorted(by_kind.items())},
              "top_kernels": [{"name": n[:160], "ms_per_step": round(us / profiled / 1e3, 3), "calls_per_step": c / profiled,
                               "kind": kind(n)} for n, (us, c) in top]}
    out.write_text(json.dumps(result, indent=1))
    return result


# --------------------------------------------------------------------------- host syncs
def find_syncs(overrides: list[str], out: Path, run_dir: Path) -> dict:
    """treeffn train with CUDA's sync debug mode on for steps 5-25: each sync and its call site."""
    import collections
    import warnings

    import lightning as L
    import torch

    seen: collections.Counter = collections.Counter()

    class Switch(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            on = 5 <= trainer.global_step < 25
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("warn" if on else 0)

    def record(message, category, filename, lineno, file=None, line=None):
        import traceback as tb

        if "synchronizing" in str(message).lower() or "synchroniz" in str(message):
            frames = [f for f in tb.extract_stack()[:-1] if "warnings" not in f.filename]
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in frames[-5:])
            seen[f"{str(message)[:80]} @ {where}"] += 1

    warnings.showwarning = record
    warnings.simplefilter("always")
    real_trainer = L.Trainer

    def trainer_with_switch(*args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), Switch()]
        return real_trainer(*args, **kwargs)

    L.Trainer = trainer_with_switch
    from treeffn.training.train import train

    train(compose(overrides), run_dir)
    result = {"steps_watched": 20, "syncs": [{"count": c, "where": w} for w, c in seen.most_common()]}
    out.write_text(json.dumps(result, indent=1))
    return result


# --------------------------------------------------------------------------- one layer
def layer_shapes(smoke: bool) -> list[dict]:
    if smoke:
        return [{"name": "smoke", "d": 64, "ffn": 256, "trees": 4, "depth": 5, "tokens": 512}]
    return [
        {"name": "opt125m K24 D6", "d": 768, "ffn": 3072, "trees": 24, "depth": 6, "tokens": 16384},
        {"name": "opt1.3b K64 D6", "d": 2048, "ffn": 8192, "trees": 64, "depth": 6, "tokens": 8192},
        {"name": "opt1.3b K8 D9", "d": 2048, "ffn": 8192, "trees": 8, "depth": 9, "tokens": 8192},
        {"name": "opt1.3b K16 D8", "d": 2048, "ffn": 8192, "trees": 16, "depth": 8, "tokens": 8192},
        {"name": "opt1.3b K4 D10", "d": 2048, "ffn": 8192, "trees": 4, "depth": 10, "tokens": 8192},
        {"name": "opt1.3b K2 D11", "d": 2048, "ffn": 8192, "trees": 2, "depth": 11, "tokens": 8192},
    ]


def old_masked(layer, x):
    """The masked path as it was before this change (gather routing, scatter mask, index_add
    visits), kept here to measure what the element-wise mask changed."""
    import torch.nn.functional as F

    from treeffn.layers.routing import global_node_index, route_from_logits

    z = F.linear(x, layer.w_in, layer.b_in)
    path = route_from_logits(z.detach(), layer.trees, layer.depth)
    rows = global_node_index(path, layer.depth).view(x.shape[0], -1)
    mask = z.new_zeros(z.shape).scatter_(1, rows, 1.0)
    layer._sum_level_logits(z.detach().gather(1, rows).view(path.shape))
    y = (layer.act(z) * mask) @ layer.w_out
    layer._count_visits(path)
    return y


def tree_paths(layer, dev) -> dict:
    """name -> callable(x) of every tree training path to compare."""
    import torch

    from treeffn import kernels

    paths = {"masked (before)": lambda x: old_masked(layer, x), "masked": layer}
    paths["masked, compiled"] = torch.compile(layer)
    if dev.type == "cuda" and kernels.triton_available():
        def triton(x):
            return kernels.tree_ffn_triton(x, layer.w_in, layer.b_in, layer.w_out, layer.trees, layer.depth,
                                           layer.placement, layer.activation)[0]
        paths["triton"] = triton
    try:
        from treeffn.layers.subtree_grouped import grouped_tree_ffn

        def grouped(x):
            return grouped_tree_ffn(x, layer.w_in, layer.b_in, layer.w_out, layer.trees, layer.depth,
                                    layer.placement, layer.act)[0]
        paths["grouped by subtree"] = grouped
    except ImportError:
        pass
    return paths


def parity(shape: dict, dev) -> dict:
    """Each tree path against the float64 reference: outputs, gradients, routing (fresh inputs)."""
    import torch

    from treeffn import TreeFFN
    from treeffn.bench.reference import reference_tree

    d, K, D = 64, shape["trees"], shape["depth"]
    out = {}
    torch.manual_seed(1)
    layer = TreeFFN(d, D, K).to(dev).double()
    with torch.no_grad():
        layer.w_in.normal_(0, 1)
        layer.w_out.normal_(0, 1)
        layer.b_in.normal_(0, 0.5)
    x = torch.randn(777, d, device=dev, dtype=torch.float64)
    x[:5] = 0  # ties
    g = torch.randn(777, d, device=dev, dtype=torch.float64)
    params = [layer.w_in, layer.b_in, layer.w_out]
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    xr = x.clone().requires_grad_(True)
    y_ref, path_ref, _ = reference_tree(xr, *ref_params, K, D, "node", "gelu")
    (y_ref * g).sum().backward()
    layer.train()
    for name, fn in tree_paths(layer, dev).items():
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        try:
            y = fn(xi)
            (y * g).sum().backward()
            err = max(float((y - y_ref).detach().abs().max()), float((xi.grad - xr.grad).abs().max()),
                      *(float((p.grad - r.grad).abs().max()) for p, r in zip(params, ref_params)))
            off_path = bool((layer.w_in.grad.abs().sum(1) > 0).eq(ref_params[0].grad.abs().sum(1) > 0).all())
            same_path = None  # the routing itself, where the path exposes it
            if name == "masked":
                same_path = bool(torch.equal(layer.forward_masked(x)[1], path_ref))
            elif name == "grouped by subtree":
                from treeffn.layers.subtree_grouped import grouped_tree_ffn

                same_path = bool(torch.equal(grouped_tree_ffn(x, layer.w_in, layer.b_in, layer.w_out, K, D, "node",
                                                              layer.act)[1], path_ref))
            elif name == "triton":
                from treeffn import kernels

                same_path = bool(torch.equal(kernels.tree_ffn_triton(x, layer.w_in, layer.b_in, layer.w_out, K, D,
                                                                     "node", "gelu")[1], path_ref))
            ok = err < 1e-8 and off_path and same_path is not False
            out[name] = {"max_abs_err": err, "ok": ok, "same_touched_rows": off_path, "same_path": same_path}
        except Exception as e:  # a path that cannot run here is reported, not timed
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def time_layers(smoke: bool, out: Path, only: list[str] | None = None) -> dict:
    """Per shape: parity, then loop time of forward + backward (bf16 autocast on CUDA)."""
    import torch

    from treeffn import TreeFFN
    from treeffn.layers.dense_ffn import DenseFFN

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    iters, reps = (3, 3) if smoke else (20, 5)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    result = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "iters": iters, "reps": reps,
              "note": "diagnostic: one layer, loop of forward+backward calls, wall clock incl. host", "shapes": []}
    for shape in [s for s in layer_shapes(smoke) if only is None or s["name"] in only]:
        entry = {**shape, "parity": parity(shape, dev)}
        log(f"layers {shape['name']}: parity {json.dumps(entry['parity'])[:400]}")
        torch.manual_seed(0)
        dense = DenseFFN(shape["d"], shape["ffn"]).to(dev)
        tree = TreeFFN(shape["d"], shape["depth"], shape["trees"]).to(dev).train()
        fns = {"dense": dense, **{k: v for k, v in tree_paths(tree, dev).items() if entry["parity"][k].get("ok")}}
        x = torch.randn(shape["tokens"], shape["d"], device=dev, requires_grad=True)
        g = torch.randn(shape["tokens"], shape["d"], device=dev)
        times = {k: [] for k in fns}

        def loop(fn):
            for _ in range(iters):
                with amp:
                    y = fn(x)
                y.backward(g.to(y.dtype))
            if dev.type == "cuda":
                torch.cuda.synchronize()

        for k, fn in fns.items():  # warm-up (and compilation)
            try:
                loop(fn)
            except Exception as e:
                entry.setdefault("errors", {})[k] = f"{type(e).__name__}: {str(e)[:300]}"
        fns = {k: v for k, v in fns.items() if k not in entry.get("errors", {})}
        order = list(fns)
        for r in range(reps):
            for k in (order if r % 2 == 0 else order[::-1]):
                t = time.perf_counter()
                loop(fns[k])
                times[k].append((time.perf_counter() - t) / iters)
        med = {k: statistics.median(v) for k, v in times.items() if v}
        entry["median_ms"] = {k: round(v * 1e3, 3) for k, v in med.items()}
        entry["vs_dense"] = {k: round(med["dense"] / v, 3) for k, v in med.items()}
        result["shapes"].append(entry)
        log(f"layers {shape['name']}: {entry['vs_dense']}")
        out.write_text(json.dumps(result, indent=1))
        del dense, tree, x, g
    return result


# --------------------------------------------------------------------------- orchestration
def run_queue(name: str, jobs: list[dict], gpu: str | None, args, summary: dict, lock: threading.Lock) -> None:
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    for job in jobs:
        left = args.budget - (time.perf_counter() - T0)
        if job["need_s"] > left:
            log(f"{name}: skip {job['name']} (needs ~{job['need_s']:.0f} s, {left:.0f} s left)")
            with lock:
                summary["skipped"].append(job["name"])
            continue
        run_dir = args.out / "runs" / job["name"]
        started = time.perf_counter()
        log(f"{name}: start {job['name']} on GPU {gpu}")
        if job["kind"] == "train":
            cmd = ["treeffn", "train", *job["overrides"], f"hydra.run.dir={run_dir}"]
        else:
            shapes_arg = ["--layer-shapes", *args.layer_shapes] if job["kind"] == "layers" and args.layer_shapes else []
            cmd = [sys.executable, str(HERE), job["kind"], "--out", str(args.out / f"{job['name']}.json"), *shapes_arg,
                   *(["--smoke"] if args.smoke else []), "--run-dir", str(run_dir), "--overrides", *job.get("overrides", [])]
        logf = args.out / "logs" / f"{job['name']}.log"
        with open(logf, "w") as f:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                 timeout=max(30, args.budget - (time.perf_counter() - T0)))
        record = {"name": job["name"], "kind": job["kind"], "variant": job.get("variant"), "round": job.get("round"),
                  "command": " ".join(cmd), "rc": rc, "seconds": round(time.perf_counter() - started, 1), "gpu": gpu}
        if job["kind"] == "train":
            record.update(read_run(run_dir))
        elif (args.out / f"{job['name']}.json").exists():
            record["result"] = json.loads((args.out / f"{job['name']}.json").read_text())
        # An OPT-1.3B run leaves ~21 GB (last.ckpt with AdamW's moments, hf/): the disk holds few.
        for heavy in ("checkpoints", "hf"):
            shutil.rmtree(run_dir / heavy, ignore_errors=True)
        if rc:
            record["log_tail"] = logf.read_text()[-1500:]
        log(f"{name}: {job['name']} rc={rc} {record.get('tokens_per_s') or ''} in {record['seconds']} s")
        with lock:
            summary["jobs"].append(record)
            (args.out / "summary.json").write_text(json.dumps(summary, indent=1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", nargs="?", default="all", choices=["all", "plain", "layers", "syncs", "profile"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--corpus", type=Path, default=None)
    p.add_argument("--budget", type=float, default=540)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--run-dir", type=Path, default=None)
    p.add_argument("--only", nargs="*", default=None, help="run only these jobs (names as in the summary)")
    p.add_argument("--serial", action="store_true",
                   help="one queue after the other: side by side, the queues share the host's CPU, and runs "
                        "bound by host work vary with the other queue's jobs")
    p.add_argument("--layer-shapes", nargs="*", default=None, help="layers: only these shapes (e.g. 'opt125m K24 D6')")
    p.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides of the run (plain, syncs)")
    args = p.parse_args()
    if args.kind == "plain":
        plain_loop(args.overrides, args.out)
        return 0
    if args.kind == "profile":
        profile_steps(args.overrides, args.out)
        return 0
    if args.kind == "layers":
        time_layers(args.smoke, args.out, args.layer_shapes)
        return 0
    if args.kind == "syncs":
        find_syncs(args.overrides, args.out, args.run_dir)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    data = data_overrides(args.corpus, args.smoke)
    summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "budget_s": args.budget,
               "smoke": args.smoke, "jobs": [], "skipped": []}
    try:
        import torch

        summary["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        summary["torch"] = torch.__version__
    except Exception:
        traceback.print_exc()
    lock = threading.Lock()
    two = len(summary.get("gpus", [])) >= 2
    sizes = shapes(args.smoke)
    queues = [(n, [j for j in queue(n, sizes[n], data, args.smoke) if args.only is None or j["name"] in args.only],
               gpu if two else None) for n, gpu in (("125m", "0"), ("1.3b", "1"))]
    if two and not args.serial:
        threads = [threading.Thread(target=run_queue, args=(n, j, g, args, summary, lock)) for n, j, g in queues]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for n, j, g in queues:
            run_queue(n, j, g, args, summary, lock)
    summary["table"] = table(summary)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["table"], indent=1))
    return 0


def table(summary: dict) -> dict:
    """Per queue and variant: the median over rounds of each run's tokens/s, and / dense."""
    rows: dict = {}
    for job in summary["jobs"]:
        if job["kind"] == "train" and job.get("tokens_per_s") and job.get("rc") == 0:
            q = job["name"].split("_")[0]
            rows.setdefault(q, {}).setdefault(job["variant"], []).append(job["tokens_per_s"])
        if job["kind"] == "plain" and job.get("result", {}).get("tokens_per_s"):
            q = job["name"].split("_")[0]
            rows.setdefault(q, {}).setdefault("dense_plain", []).append(job["result"]["tokens_per_s"])
    out = {}
    for q, variants in rows.items():
        med = {v: statistics.median(r) for v, r in variants.items()}
        dense = med.get("dense")
        out[q] = {v: {"runs": variants[v], "median": round(m), "vs_dense": round(m / dense, 3) if dense else None}
                  for v, m in med.items()}
    return out


if __name__ == "__main__":
    sys.exit(main())
