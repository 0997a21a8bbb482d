"""One GPU against two: DDP and FSDP runs of the tree presets through the real `treeffn train`.

    python3 scripts/h200_scaleout.py --out $OUT --corpus .corpus --budget 420      # the 2-GPU call
    python scripts/h200_scaleout.py --out /tmp/scale --smoke                        # CPU check (gloo)

Each job is the CLI in a subprocess (Lightning starts the second rank itself), with the same
global batch in tokens on 1 and 2 devices (`optim.global_batch_tokens`), so step s sees the same
blocks and the loss curves should agree up to bf16 noise. From each run dir it reads
result.json and the CSV log: median tokens/s after warm-up (per device and in all), peak GPU
memory, logged training losses and the validation loss. Jobs run in priority order and a job
that would not fit the remaining budget is skipped, and said so; summary.json is rewritten after
every job so a cut-off call still returns what finished.
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
import time
from pathlib import Path

T0 = time.perf_counter()


def corpus_file(corpus: Path, name: str) -> Path:
    """The stream, or its .xz copy (what travels to the GPU machine; data=tokens reads either)."""
    return corpus / name if (corpus / name).exists() else corpus / f"{name}.xz"


def jobs(corpus: Path | None, smoke: bool, work: Path) -> list[dict]:
    """(name, overrides, steps, rough seconds needed) in priority order: two rounds, the one- and
    two-device runs of each pair alternating, and an FSDP checkpoint resumed on one device."""
    if smoke:
        data = ["data=embedded"]
        m125 = ["model=tiny", "tree.depth=3", "data.block_size=64", "data.batch_size=4"]
        m13 = ["model=tiny", "tree.depth=2", "data.block_size=64", "data.batch_size=2"]
        # bf16-mixed as on the GPUs: another Lightning precision plugin than float32's
        one = ["trainer=cpu", "trainer.precision=bf16-mixed"]
        two = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=bf16-mixed"]
        fsdp = two  # Lightning's FSDP needs GPUs: the CPU check runs the same jobs under DDP
        s125, s13 = 20, 12
    else:
        data = ["data=tokens", f"data.path={corpus_file(corpus, 'train.u16')}",
                f"data.val_path={corpus_file(corpus, 'validation.u16')}"]
        m125 = ["model=opt125m", "tree.depth=6", "data.block_size=512", "data.batch_size=32"]
        m13 = ["model=opt1.3b", "tree.depth=6", "data.block_size=2048", "data.batch_size=4"]
        one, two, fsdp = ["trainer=gpu"], ["trainer=ddp", "trainer.devices=2"], ["trainer=fsdp", "trainer.devices=2"]
        s125, s13 = 200, 50
    tok125 = 2 * (4 if smoke else 32) * (64 if smoke else 512)   # two micro-batches: 1 GPU accumulates 2
    tok13 = 2 * (2 if smoke else 4) * (64 if smoke else 2048)
    # Default loggers (W&B offline and CSV), as a user runs it.
    common = [*data, "seed=0", "trainer.log_every_n_steps=5", "trainer.limit_val_batches=16",
              "optim.warmup_steps=20", "resume=never"]
    kept = (s13 // 2) // 5 * 5 - 1  # a checkpoint whose next step is a logged one (every 5th step is)

    def job(name, model, trainer, steps, tokens, need_s, extra=()):
        return {"name": name, "steps": steps, "need_s": need_s,
                "overrides": [*model, *trainer, *common, f"optim.global_batch_tokens={tokens}",
                              f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                              f"checkpoint.every_n_steps={steps}", *extra]}

    fsdp_kept = job("opt1.3b_tree_fsdp2_r1", m13, fsdp, s13, tok13, 150,
                    [f"checkpoint.every_n_steps={kept}", "checkpoint.keep_all=true"])
    fsdp_kept["overrides"].remove(f"checkpoint.every_n_steps={s13}")
    resume = job("opt1.3b_tree_fsdp_resumed_gpu1", m13, one, kept + 1, tok13, 70)
    resume["overrides"] = [o.replace("resume=never", f"resume={work / fsdp_kept['name'] / 'checkpoints'}"
                                                       f"/step{kept:07d}.ckpt") for o in resume["overrides"]]
    resume["resumes"] = (fsdp_kept["name"], kept)
    return [job("opt125m_tree_ddp2_r1", m125, two, s125, tok125, 50),
            job("opt125m_tree_gpu1_r1", m125, one, s125, tok125, 50),
            fsdp_kept,
            job("opt1.3b_tree_gpu1_r1", m13, one, s13, tok13, 100),
            resume,
            job("opt125m_tree_gpu1_r2", m125, one, s125, tok125, 50),
            job("opt125m_tree_ddp2_r2", m125, two, s125, tok125, 50),
            job("opt1.3b_tree_gpu1_r2", m13, one, s13, tok13, 100),
            job("opt1.3b_tree_fsdp2_r2", m13, fsdp, s13, tok13, 120),
            *resume_pair("opt125m", m125, fsdp, one, 30, tok125, common, work),
            # What the FSDP windows with a routing-statistics window lose (2026-11-30: ~0.9 s
            # each): the same pair without statistics, and the dense pair.
            job("opt1.3b_tree_nostats_gpu1_r1", m13, one, s13, tok13, 100, ["tree.track_stats=false"]),
            job("opt1.3b_tree_nostats_fsdp2_r1", m13, fsdp, s13, tok13, 120, ["tree.track_stats=false"]),
            job("opt1.3b_dense_gpu1_r1", [o for o in m13 if not o.startswith("tree.")] + ["tree=dense"], one, s13, tok13, 100),
            job("opt1.3b_dense_fsdp2_r1", [o for o in m13 if not o.startswith("tree.")] + ["tree=dense"], fsdp, s13, tok13, 120),
            # Host seconds per Lightning hook on one GPU and under FSDP (trainer.profiler=simple),
            # and FSDP without its limit of two all-gathers in flight (the host may run ahead).
            job("opt1.3b_tree_gpu1_r3", m13, one, s13, tok13, 100, ["trainer.profiler=simple"]),
            job("opt1.3b_tree_fsdp2_r3", m13, fsdp, s13, tok13, 120, ["trainer.profiler=simple"]),
            job("opt1.3b_tree_fsdp2_nolimit_r3", m13, fsdp, s13, tok13, 120,
                [] if smoke else ["trainer.fsdp.limit_all_gathers=false"])]  # the CPU check's "fsdp" is ddp


def resume_pair(tag, model, fsdp, one, steps, tokens, common, work) -> list[dict]:
    """A shorter FSDP run that keeps a checkpoint, and that checkpoint continued on one device."""
    kept = (steps // 2) // 5 * 5 - 1
    base = [*model, *common, f"optim.global_batch_tokens={tokens}"]
    saved = {"name": f"{tag}_tree_fsdp2_kept", "steps": steps, "need_s": 45,
             "overrides": [*base, *fsdp, f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                           f"checkpoint.every_n_steps={kept}", "checkpoint.keep_all=true"]}
    ckpt = work / saved["name"] / "checkpoints" / f"step{kept:07d}.ckpt"
    resumed = {"name": f"{tag}_tree_fsdp_resumed_gpu1", "steps": kept + 1, "need_s": 35, "resumes": (saved["name"], kept),
               "overrides": [*[o.replace("resume=never", f"resume={ckpt}") for o in base], *one,
                             f"trainer.max_steps={kept + 1}", f"trainer.val_check_interval={kept + 1}",
                             f"checkpoint.every_n_steps={kept + 1}"]}
    return [saved, resumed]


def read_run(run: Path) -> dict:
    """What one run dir says: result.json, and rates/memory/losses from the CSV log."""
    info: dict = {}
    if (run / "result.json").exists():
        result = json.loads((run / "result.json").read_text())
        info.update({k: result.get(k) for k in ("status", "steps", "tokens_seen", "val_loss", "val_ppl", "wall_s",
                                                 "params_total", "active_ffn_fraction", "peak_memory_gib_per_rank")})
    rates, per_device, peak, losses = [], [], [], {}
    for path in sorted((run / "logs" / "csv").glob("metrics*.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/tokens_per_s"):
                    rates.append(float(row["train/tokens_per_s"]))
                if row.get("train/tokens_per_s_per_device"):
                    per_device.append(float(row["train/tokens_per_s_per_device"]))
                if row.get("train/peak_memory_gib"):
                    peak.append(float(row["train/peak_memory_gib"]))
                if row.get("train/loss"):
                    losses[int(row["step"])] = float(row["train/loss"])
    skip = len(rates) // 4  # the first quarter of the windows holds compilation and warm-up
    if rates[skip:]:
        info["tokens_per_s"] = statistics.median(rates[skip:])
        info["tokens_per_s_per_device"] = statistics.median(per_device[skip:])
        info["rate_windows"] = len(rates) - skip
    if peak:
        info["peak_memory_gib_rank0"] = max(peak)
    info["train_loss"] = losses
    return info


def compare(summary: dict, a: str, b: str) -> dict | None:
    """Scaling efficiency and loss agreement of job b (n devices) against job a (one device)."""
    ra, rb = summary["runs"].get(a, {}), summary["runs"].get(b, {})
    if "tokens_per_s" not in ra or "tokens_per_s" not in rb:
        return None
    common = sorted(set(ra["train_loss"]) & set(rb["train_loss"]))
    diffs = [abs(ra["train_loss"][s] - rb["train_loss"][s]) for s in common]
    return {"one_device": a, "two_devices": b,
            "speed_up": rb["tokens_per_s"] / ra["tokens_per_s"],
            "scaling_efficiency": rb["tokens_per_s"] / (2 * ra["tokens_per_s"]),
            "logged_steps_compared": len(common),
            "max_abs_train_loss_diff": max(diffs) if diffs else None,
            "median_abs_train_loss_diff": statistics.median(diffs) if diffs else None,
            "val_loss": [ra.get("val_loss"), rb.get("val_loss")]}


def resume_check(summary: dict) -> dict | None:
    """The FSDP run's loss at the step after its kept checkpoint against the same step trained
    on one device from that checkpoint."""
    for tag, source_name in (("opt1.3b", "opt1.3b_tree_fsdp2_r1"), ("opt125m", "opt125m_tree_fsdp2_kept")):
        resumed = summary["runs"].get(f"{tag}_tree_fsdp_resumed_gpu1", {})
        source = summary["runs"].get(source_name, {})
        if resumed.get("train_loss") and source.get("train_loss"):
            break
    if not resumed.get("train_loss") or not source.get("train_loss"):
        return None
    step = max(resumed["train_loss"])  # the CSV's step of the one step trained after the resume
    if step not in source["train_loss"]:
        return None
    a, b = source["train_loss"][step], resumed["train_loss"][step]
    return {"step_logged": step, "fsdp_two_devices": a, "resumed_one_device": b, "abs_diff": abs(a - b),
            "resumed_status": resumed.get("status")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, default=Path(".corpus"))
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all jobs together")
    ap.add_argument("--smoke", action="store_true", help="tiny models, 2 CPU processes (gloo), no FSDP")
    ap.add_argument("--only", nargs="*", default=None, help="run only these jobs (names as in the summary)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "treeffn-scaleout"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    summary: dict = {"budget_s": args.budget, "smoke": args.smoke, "runs": {}, "skipped": [], "failed": {}}
    try:
        import torch

        summary["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        summary["gpus"] = torch.cuda.device_count()
        summary["torch"] = torch.__version__
    except Exception as e:  # noqa: BLE001 - the summary says what could not be read
        summary["device"] = f"unknown ({e})"
    corpus = args.corpus.resolve()
    all_jobs = jobs(corpus, args.smoke, work)
    if args.only is not None:  # in the order given
        by_name = {j["name"]: j for j in all_jobs}
        unknown = [n for n in args.only if n not in by_name]
        if unknown:
            sys.exit(f"unknown jobs {unknown}; the jobs are: {', '.join(by_name)}")
        all_jobs = [by_name[n] for n in args.only]
    for job in all_jobs:
        left = args.budget - (time.perf_counter() - T0)
        if left < job["need_s"]:
            summary["skipped"].append(f"{job['name']}: {left:.0f} s left, needs ~{job['need_s']} s")
            continue
        run = work / job["name"]
        cmd = [sys.executable, "-m", "treeffn.cli.main", "train", *job["overrides"], f"hydra.run.dir={run}"]
        print(f"[{time.perf_counter() - T0:6.0f} s] {job['name']}: treeffn train {' '.join(job['overrides'])}",
              flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=left)
            code, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            code, err = "timeout", (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        info = read_run(run) if run.exists() else {}
        info.update({"command": "treeffn train " + " ".join(job["overrides"]), "exit": code,
                     "invocation_s": round(time.perf_counter() - start, 1)})
        summary["runs"][job["name"]] = info
        if code != 0:
            summary["failed"][job["name"]] = err[-3000:]
            print(err[-3000:], flush=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        if run.exists():
            for path in (run / "logs" / "csv").glob("metrics*.csv"):
                shutil.copy(path, args.out / f"{job['name']}.{path.name}")
            if (run / "result.json").exists():
                shutil.copy(run / "result.json", args.out / f"{job['name']}.result.json")
            for path in (run / "profile").glob("*.txt"):  # trainer.profiler=simple: one table per rank
                shutil.copy(path, args.out / f"{job['name']}.{path.name}")
        # OPT-1.3B checkpoints are ~16 GB each: keep only the one a later job resumes from.
        needed = {j["resumes"][0] for j in all_jobs[all_jobs.index(job) + 1:] if "resumes" in j}
        for name in [job["name"], *(job["resumes"][:1] if "resumes" in job else [])]:
            if name not in needed:
                shutil.rmtree(work / name / "checkpoints", ignore_errors=True)
                shutil.rmtree(work / name / "hf", ignore_errors=True)
    for rnd in ("r1", "r2", "r3"):
        for one, two in [("opt125m_tree_gpu1", "opt125m_tree_ddp2"), ("opt1.3b_tree_gpu1", "opt1.3b_tree_fsdp2"),
                         ("opt1.3b_tree_nostats_gpu1", "opt1.3b_tree_nostats_fsdp2"),
                         ("opt1.3b_dense_gpu1", "opt1.3b_dense_fsdp2"), ("opt1.3b_tree_gpu1", "opt1.3b_tree_fsdp2_nolimit")]:
            if (c := compare(summary, f"{one}_{rnd}", f"{two}_{rnd}")) is not None:
                summary.setdefault("comparisons", []).append(c)
    summary["fsdp_resume"] = resume_check(summary)
    summary["elapsed_s"] = round(time.perf_counter() - T0, 1)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'run':24} {'exit':>5} {'tok/s':>10} {'tok/s/dev':>10} {'peak GiB':>9} {'val loss':>9} {'wall s':>7}")
    for name, r in summary["runs"].items():
        print(f"{name:24} {r['exit']!s:>5} {r.get('tokens_per_s', float('nan')):10.0f} "
              f"{r.get('tokens_per_s_per_device', float('nan')):10.0f} {r.get('peak_memory_gib_rank0', float('nan')):9.2f} "
              f"{r.get('val_loss') or float('nan'):9.4f} {r.get('wall_s') or float('nan'):7.1f}")
    for c in summary.get("comparisons", []):
        print(f"{c['two_devices']} vs {c['one_device']}: speed-up {c['speed_up']:.2f}x, "
              f"efficiency {c['scaling_efficiency']:.1%}, max |train loss diff| {c['max_abs_train_loss_diff']} "
              f"over {c['logged_steps_compared']} logged steps, val loss {c['val_loss']}")
    print("skipped:", summary["skipped"] or "none", f"| elapsed {summary['elapsed_s']} s")


if __name__ == "__main__":
    main()
