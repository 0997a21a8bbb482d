"""Dense vs tree-FFN reproduction on one GPU, in one process, inside a fixed time budget.

    python3 scripts/h200_repro.py --out $OUT --budget 480 --corpus .corpus      # the H200 call
    python scripts/h200_repro.py --out /tmp/smoke --budget 240 --smoke           # CPU smoke test

Phases (each later one is skipped, and said so, when the budget is spent):

1. ceiling: bf16 GEMM rate measured here (8192^3, median of 10), the denominator of MFU.
2. train-step throughput at OPT-125M shape (dense, tree node, tree post_sum; plain loop:
   AdamW, bf16 autocast, real corpus blocks): tokens/s, MFU, peak memory. These rates set the
   step budget of phase 3 so the three runs see the same tokens and fit the time.
3. `treeffn train` runs (the library's train(), same composed config as the CLI): dense, node,
   post_sum; same seed, data, schedule and sequence length; periodic checkpoints kept for the tree
   runs. Validation perplexity on held-out documents, Lightning tokens/s, peak memory.
4. auto-pruning statistics of the tree runs over their checkpoints (treeffn.analysis, on the GPU).
5. train-step throughput at OPT-1.3B shape, dense vs tree (K=64, D=6).
6. generate() tokens/s at batch 1 and 32, OPT-1.3B shape, random init, bf16, dense vs tree.

Writes summary.json, repro.log and runs.tar.gz (result.json, metrics.csv, analysis.json, PNGs of
every run) under --out, and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tarfile
import time
import traceback
from pathlib import Path

T_START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T_START


def log(msg: str) -> None:
    print(f"[{elapsed():7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------- config
def compose(overrides: list[str]) -> dict:
    """The resolved config `treeffn train <overrides>` would run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="treeffn.conf", version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def model_overrides(size: str, ffn: str, smoke: bool) -> list[str]:
    model = "tiny" if smoke else size
    ffn_part = ["tree=dense"] if ffn == "dense" else ["tree=tree", f"tree.placement={ffn}",
                                                      f"tree.depth={2 if smoke else 6}"]
    return [f"model={model}", *ffn_part]


# --------------------------------------------------------------------------- helpers
def sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(dev) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None


def gemm_ceiling(dev, smoke: bool) -> dict:
    import torch

    n = 1024 if (smoke or dev.type != "cuda") else 8192
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        a @ b
        sync(dev)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"n": n, "dtype": str(dtype), "median_s": med, "tflops": 2 * n**3 / med / 1e12}


def forward_flops_per_token(model, acct, seq_len: int, ffn_key: str = "ffn_flops_per_token_train") -> float:
    """Forward FLOPs per token: 2 x (matmul weights outside the FFN) + LM head + FFN + attention scores.

    Attention scores and the weighted sum count 4 * layers * d * T per token (PaLM's convention,
    no causal discount); the FFN term is the accounting's (training path: every node computed).
    """
    cfg = model.config
    d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    emb = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
    other = acct.params_total - acct.params_ffn - emb  # attention projections, norms, biases
    return 2 * other + 2 * vocab * d + getattr(acct, ffn_key) + 4 * layers * d * seq_len


def build(cfg: dict, vocab: int, dev):
    import torch

    from treeffn.models.build import accounting, build_model

    with torch.device(dev):
        model = build_model(cfg["model"], cfg["tree"], vocab_size=vocab, pad_id=1, bos_id=2, eos_id=2)
    return model, accounting(model)


def step_throughput(cfg: dict, vocab: int, dev, batch: int, seq: int, steps: int, warmup: int, blocks, peak_flops):
    """Plain training loop (AdamW fused, bf16 autocast, clip 1.0): median step time over `steps`."""
    import torch

    reset_peak(dev)
    model, acct = build(cfg, vocab, dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=dev.type == "cuda")
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + steps):
        if blocks is not None and len(blocks) >= batch and blocks.shape[1] >= seq:
            idx = torch.randint(0, len(blocks), (batch,), generator=g)
            x = blocks[idx][:, :seq].to(dev, non_blocking=True)
        else:
            x = torch.randint(0, vocab, (batch, seq), generator=g).to(dev)
        sync(dev)
        t0 = time.perf_counter()
        with amp:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tps = batch * seq / med
    fwd = forward_flops_per_token(model, acct, seq)
    out = {"batch": batch, "seq": seq, "steps_timed": steps, "median_step_s": round(med, 5),
           "tokens_per_s": round(tps), "train_flops_per_token": 3 * fwd,
           "mfu": round(3 * fwd * tps / peak_flops, 4) if peak_flops else None,
           "peak_mem_gib": peak_gib(dev), "params_total": acct.params_total,
           "active_ffn_fraction": acct.active_ffn_fraction, "final_loss": float(loss.detach())}
    del model, opt
    reset_peak(dev)
    return out


def decode_speed(cfgs: dict, vocab: int, dev, batches: list[int], prompt: int, new: int, reps: int = 3) -> dict:
    """generate() tokens/s of each model in ``cfgs`` ({name: composed config}).

    All models are built first and timed in alternating order (dense, tree, tree, dense, ...)
    over ``reps`` rounds, so a clock ramp or a neighbour's load does not land on one model
    only; each result is the median round, with every round's time kept.
    """
    import torch

    models, out = {}, {}
    for name, cfg in cfgs.items():
        model, acct = build(cfg, vocab, dev)
        model.eval()
        if dev.type == "cuda":
            model.to(torch.bfloat16)
        models[name] = model
        out[name] = {"params_total": acct.params_total, "active_ffn_fraction": acct.active_ffn_fraction,
                     "prompt_tokens": prompt, "new_tokens": new, "dtype": str(next(model.parameters()).dtype)}
    g = torch.Generator().manual_seed(1)
    kw = dict(do_sample=False, pad_token_id=1, eos_token_id=None)
    with torch.inference_mode():
        for b in batches:
            x = torch.randint(3, vocab, (b, prompt), generator=g).to(dev)
            for model in models.values():
                model.generate(input_ids=x, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up
            times: dict[str, list[float]] = {name: [] for name in models}
            names = list(models)
            for r in range(reps):
                for name in (names if r % 2 == 0 else names[::-1]):
                    sync(dev)
                    t0 = time.perf_counter()
                    y = models[name].generate(input_ids=x, max_new_tokens=new, min_new_tokens=new, **kw)
                    sync(dev)
                    times[name].append(time.perf_counter() - t0)
                    assert y.shape[1] - prompt == new
            for name in models:
                dt = statistics.median(times[name])
                out[name][f"batch{b}"] = {"tokens_per_s": round(new * b / dt, 1), "ms_per_step": round(1000 * dt / new, 3),
                                          "wall_s_each_round": [round(t, 3) for t in times[name]]}
    del models
    reset_peak(dev)
    return out


def pruning_summary(analysis: dict) -> dict:
    """Per-checkpoint means over layers: leaf entropy, dead nodes, leaves used; final verdicts."""
    rows = []
    for c in analysis["checkpoints"]:
        layers = [lay for lay in c["layers"] if not math.isnan(lay["leaf_entropy"])]
        rows.append({"step": c["step"],
                     "leaf_entropy_mean": round(statistics.fmean(lay["leaf_entropy"] for lay in layers), 4),
                     "dead_frac_mean": round(statistics.fmean(lay["dead_frac"] for lay in layers), 4),
                     "leaves_used_mean": round(statistics.fmean(lay["leaves_used"] for lay in layers), 2)})
    verdicts: dict[str, int] = {}
    for lay in analysis["final"]:
        verdicts[lay["verdict"]] = verdicts.get(lay["verdict"], 0) + 1
    return {"per_checkpoint": rows, "final_verdicts": verdicts,
            "final_leaf_entropy_per_layer": [round(lay["leaf_entropy"], 4) for lay in analysis["final"]],
            "final_dead_frac_per_layer": [round(lay["dead_frac"], 4) for lay in analysis["final"]]}


def lightning_tokens_per_s(run_dir: Path) -> float | None:
    import csv

    rates = []
    for path in sorted((run_dir / "logs" / "csv").glob("metrics*.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                v = row.get("train/tokens_per_s")
                if v not in (None, ""):
                    rates.append(float(v))
    if not rates:
        return None
    rates = rates[len(rates) // 4:] or rates  # leave out the warm-up windows
    return round(statistics.median(rates))


# --------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=480, help="seconds for everything (default 480)")
    ap.add_argument("--corpus", default=".corpus", help="folder from python -m treeffn.data.build_corpus")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, a few steps (CPU check of this script)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=0, help="fix the step count of phase 3 (0: from the budget)")
    ap.add_argument("--workdir", default="/tmp/treeffn_repro")
    ap.add_argument("--skip", default="", help="comma list of phases to leave out: tput125,train,analyze,tput13,decode")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    (work / "runs").mkdir(parents=True)
    os.environ.setdefault("TREEFFN_CACHE", str(work / "cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    deadline = args.budget
    summary: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": args.budget, "smoke": args.smoke,
                     "skipped": [], "errors": {}}

    def save():
        summary["elapsed_s"] = round(elapsed(), 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    def failed(phase: str, e: Exception) -> None:
        """Record a phase's error and go on: one failing phase must not cost the others' figures."""
        summary["errors"][phase] = f"{type(e).__name__}: {e}"
        traceback.print_exc()

    def left() -> float:
        return deadline - elapsed()

    import torch

    import treeffn

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "treeffn": treeffn.__version__}
    for name in ("transformers", "lightning", "triton", "hydra", "omegaconf", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    summary["versions"] = versions
    summary["treeffn_commit"] = os.environ.get("TREEFFN_COMMIT")
    summary["device"] = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    log(f"device {summary['device']}, versions {versions}")

    # ---- data
    corpus = Path(args.corpus)
    train_file = next((corpus / n for n in ("train.u16", "train.u16.xz") if (corpus / n).exists()), None)
    val_file = next((corpus / n for n in ("validation.u16", "validation.u16.xz") if (corpus / n).exists()), None)
    if train_file is None or val_file is None:
        print(f"no corpus in {corpus}: run python -m treeffn.data.build_corpus --out {corpus}", file=sys.stderr)
        return 2
    if (corpus / "meta.json").exists():
        meta = json.loads((corpus / "meta.json").read_text())
        summary["corpus"] = {k: meta[k] for k in ("train_tokens", "validation_tokens", "validation_rule") if k in meta}
    seq = 64 if args.smoke else args.seq
    batch = 4 if args.smoke else args.batch
    skip = set(filter(None, args.skip.split(",")))
    data_ov = ["data=tokens", f"data.path={train_file.resolve()}", f"data.val_path={val_file.resolve()}",
               f"data.block_size={seq}", f"data.batch_size={batch}", f"seed={args.seed}", "logger=csv"]
    from treeffn.data.datamodule import TextDataModule

    import treeffn.data.datamodule as dm_mod

    t0 = time.perf_counter()
    dm = dm_mod.TextDataModule(compose(model_overrides("opt125m", "dense", args.smoke) + data_ov)["data"], seed=args.seed)
    dm.setup()
    vocab = dm.vocab_size
    summary["data"] = {**{k: v for k, v in dm.stats.items() if k != "key_source"}, "seq": seq, "batch": batch,
                       "vocab": vocab, "prepare_s": round(time.perf_counter() - t0, 1)}
    log(f"data ready: {summary['data']}")
    blocks = dm.train_set
    del TextDataModule
    save()

    # ---- 1. ceiling
    ceiling = gemm_ceiling(dev, args.smoke)
    peak = ceiling["tflops"] * 1e12
    summary["gemm_ceiling"] = ceiling
    log(f"GEMM ceiling {ceiling['tflops']:.1f} TFLOP/s ({ceiling['dtype']}, n={ceiling['n']})")
    save()

    variants = ["dense", "node", "post_sum"]

    def throughputs(size: str, tag: str, variants: list[str], overrides: list[str], vocab: int, batch: int,
                    seq: int, steps: int, warmup: int, blocks, min_left: float = 0) -> dict:
        """Step throughput of each variant at one model size, into summary["throughput_<size>"]."""
        found = {}
        for v in variants:
            if left() < min_left:
                summary["skipped"].append(f"{tag} throughput {v}: out of time")
                continue
            try:
                cfg = compose(model_overrides(size, v, args.smoke) + overrides)
                found[v] = step_throughput(cfg, vocab, dev, batch, seq, steps=steps, warmup=warmup, blocks=blocks,
                                           peak_flops=peak)
                log(f"{size} {v}: {found[v]}")
            except Exception as e:
                failed(f"throughput_{tag.lower()}_{v}", e)
        summary[f"throughput_{size}"] = found
        save()
        return found

    # ---- 2. OPT-125M step throughput
    tput125 = throughputs("opt125m", "125M", [] if "tput125" in skip else variants, data_ov, vocab, batch, seq,
                          steps=5 if args.smoke else 15, warmup=2 if args.smoke else 5, blocks=blocks)

    # ---- 3. training runs
    reserve = (60 if args.smoke else 120)  # analysis + 1.3B throughput + decode + packing up
    per_run_overhead = 10 if args.smoke else 25  # build, data, checkpoints, final validation
    if args.max_steps:
        steps = args.max_steps
    else:
        slowest = min((r["tokens_per_s"] for r in tput125.values()), default=0)
        per_run = (left() - reserve) / 3 - per_run_overhead
        steps = int(0.85 * per_run * slowest / (batch * seq)) if slowest else 0
        steps = max(0, min(steps, 5000))
        steps -= steps % 10
    summary["train_steps"] = steps
    summary["tokens_per_run"] = steps * batch * seq
    log(f"phase 3: {steps} steps x {batch * seq} tokens = {steps * batch * seq:,} tokens per run")
    from treeffn.training.train import train

    runs = {}
    if "train" in skip:
        summary["skipped"].append("training runs: --skip")
    elif steps < 20:
        summary["skipped"].append(f"training runs: budget gives {steps} steps")
    else:
        every = max(10, steps // 3)
        for v in variants:
            if left() < reserve / 2:
                summary["skipped"].append(f"training run {v}: out of time")
                continue
            ov = model_overrides("opt125m", v, args.smoke) + data_ov + [
                f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                f"optim.warmup_steps={max(1, steps // 10)}", "trainer.log_every_n_steps=10",
                f"checkpoint.every_n_steps={every if v != 'dense' else steps}",
                f"checkpoint.keep_all={'true' if v != 'dense' else 'false'}", "resume=never",
                *(["trainer.limit_val_batches=8"] if args.smoke else [])]
            run_dir = work / "runs" / f"opt125m_{v}_seed{args.seed}"
            try:
                cfg = compose(ov)
                reset_peak(dev)
                t0 = time.perf_counter()
                result = train(cfg, run_dir, command={"argv": ["train", *ov], "overrides": ov, "job_num": None})
                rec = {k: result.get(k) for k in ("status", "val_loss", "val_ppl", "unigram_val_ppl", "steps",
                                                  "tokens_seen", "wall_s", "params_total", "params_ffn",
                                                  "active_ffn_fraction")}
                rec["invocation_s"] = round(time.perf_counter() - t0, 1)
                rec["peak_mem_gib"] = peak_gib(dev)
                rec["lightning_tokens_per_s"] = lightning_tokens_per_s(run_dir)
                rec["tokens_per_s_wall"] = round(result["tokens_seen"] / result["wall_s"]) if result.get("wall_s") else None
                if tput125.get(v) and rec["lightning_tokens_per_s"]:
                    rec["mfu"] = round(tput125[v]["train_flops_per_token"] * rec["lightning_tokens_per_s"] / peak, 4)
                rec["overrides"] = ov
                runs[v] = rec
                log(f"run {v}: {rec}")
            except Exception as e:
                failed(f"train_{v}", e)
            summary["runs_opt125m"] = runs
            save()
    if "dense" in runs:
        for v in ("node", "post_sum"):
            if v in runs and runs[v].get("val_ppl") and runs["dense"].get("val_ppl"):
                runs[v]["ppl_ratio_vs_dense"] = round(runs[v]["val_ppl"] / runs["dense"]["val_ppl"], 4)
                if runs[v].get("lightning_tokens_per_s") and runs["dense"].get("lightning_tokens_per_s"):
                    runs[v]["tokens_per_s_ratio_vs_dense"] = round(
                        runs[v]["lightning_tokens_per_s"] / runs["dense"]["lightning_tokens_per_s"], 3)
    save()

    # ---- 4. auto-pruning analysis
    pruning = {}
    for v in ("node", "post_sum"):
        run_dir = work / "runs" / f"opt125m_{v}_seed{args.seed}"
        if v not in runs or "analyze" in skip:
            continue
        if left() < 60 if not args.smoke else left() < 10:
            summary["skipped"].append(f"analysis {v}: out of time")
            continue
        try:
            from treeffn.analysis.analyze import analyse_run

            t0 = time.perf_counter()
            analysis = analyse_run(run_dir, max_blocks=16 if args.smoke else None, device=dev)  # None: the whole split
            pruning[v] = pruning_summary(analysis)
            pruning[v]["analysis_s"] = round(time.perf_counter() - t0, 1)
            log(f"analysis {v}: {pruning[v]['per_checkpoint']} verdicts {pruning[v]['final_verdicts']}")
        except Exception as e:
            failed(f"analysis_{v}", e)
    summary["auto_pruning"] = pruning
    save()
    # Checkpoints are large and not needed any more.
    for ckpt_dir in (work / "runs").glob("*/checkpoints"):
        shutil.rmtree(ckpt_dir, ignore_errors=True)

    # ---- 5. OPT-1.3B step throughput
    big = "opt1.3b"
    big_vocab = 50272  # OPT's own vocabulary size: the LM head as in the published model
    bb, ss = (2, 64) if args.smoke else (4, 2048)
    throughputs(big, "13B", [] if "tput13" in skip else ["dense", "node"], ["logger=csv"], big_vocab, bb, ss,
                steps=3 if args.smoke else 10, warmup=1 if args.smoke else 3, blocks=None,
                min_left=20 if args.smoke else 75)

    # ---- 6. decode
    dec = {}
    if "decode" not in skip and left() < (20 if args.smoke else 80):
        summary["skipped"].append("decode: out of time")
    elif "decode" not in skip:
        try:
            cfgs = {v: compose(model_overrides(big, v, args.smoke) + ["logger=csv"]) for v in ("dense", "node")}
            dec = decode_speed(cfgs, big_vocab, dev, [1, 32], prompt=32, new=16 if args.smoke else 128)
            log(f"decode {big}: {dec}")
        except Exception as e:
            failed("decode", e)
    summary["decode_opt1.3b"] = dec
    save()

    # ---- pack up
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
        for run_dir in sorted((work / "runs").iterdir()):
            if run_dir.is_dir():
                tar.add(run_dir, arcname=run_dir.name)
    save()
    print_table(summary)
    return 0


def print_table(s: dict) -> None:
    print("\n==== summary ====")
    print(f"device {s.get('device')}  GEMM ceiling {s.get('gemm_ceiling', {}).get('tflops', 0):.0f} TFLOP/s  "
          f"steps {s.get('train_steps')}  tokens/run {s.get('tokens_per_run', 0):,}")
    runs = s.get("runs_opt125m", {})
    tput = s.get("throughput_opt125m", {})
    print(f"{'opt125m':<10}{'val_ppl':>9}{'ratio':>8}{'L tok/s':>10}{'loop tok/s':>11}{'MFU':>7}{'peak GiB':>9}")
    for v in ("dense", "node", "post_sum"):
        r, t = runs.get(v, {}), tput.get(v, {})
        print(f"{v:<10}{r.get('val_ppl') or float('nan'):>9.2f}{r.get('ppl_ratio_vs_dense') or float('nan'):>8.3f}"
              f"{r.get('lightning_tokens_per_s') or 0:>10,}{t.get('tokens_per_s') or 0:>11,}"
              f"{t.get('mfu') or float('nan'):>7.3f}{r.get('peak_mem_gib') or t.get('peak_mem_gib') or float('nan'):>9.1f}")
    for v, t in s.get("throughput_opt1.3b", {}).items():
        print(f"opt1.3b {v:<8} train {t['tokens_per_s']:>9,} tok/s  MFU {t['mfu'] or float('nan'):.3f}  "
              f"peak {t['peak_mem_gib']} GiB")
    for v, d in s.get("decode_opt1.3b", {}).items():
        print(f"decode 1.3b {v:<6} b1 {d.get('batch1', {}).get('tokens_per_s')} tok/s   "
              f"b32 {d.get('batch32', {}).get('tokens_per_s')} tok/s")
    for v, p in s.get("auto_pruning", {}).items():
        print(f"pruning {v:<8} {p['per_checkpoint']} {p['final_verdicts']}")
    if s.get("skipped"):
        print("skipped:", s["skipped"])
    if s.get("errors"):
        print("errors:", json.dumps(s["errors"])[:2000])
    print(f"elapsed {s.get('elapsed_s')} s")


if __name__ == "__main__":
    sys.exit(main())
