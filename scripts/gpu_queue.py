"""Run several sweeps' grid points on one host's GPUs, a few runs per GPU at a time.

`hydra/launcher=local_gpus` starts every job of one sweep at once. A session with several sweeps,
one of which starts from another's result (a fine-tune from a pretrained run), needs more: a
fixed number of runs per GPU (memory), an order (long and blocking runs first) and waiting on a
dependency. This script is that queue. Each grid point runs as

    treeffn train -m sweep=<sweep> <the point's overrides> hydra/launcher=local_serial trainer=gpu trainer.devices=[g]

from the work dir, so it lands in the run dir the whole sweep would give it; `finish` then
rewrites each sweep's multirun.yaml so that it holds the whole grid for `treeffn report`.

    python3 scripts/gpu_queue.py start  <work dir> <plan.yaml>   # the queue, in its own session (setsid)
    python3 scripts/gpu_queue.py wait   <work dir> <seconds>     # progress until done or timeout
    python3 scripts/gpu_queue.py finish <work dir> <out dir>     # full-grid multirun.yaml, reports, records.tar.gz
    python3 scripts/gpu_queue.py report <runs root> <plan.yaml>  # the same full grids and reports on copied records

A plan (scripts/plans/*.yaml):

    trainer: gpu            # or cpu for a rehearsal (then no trainer.devices)
    gpus: 2                 # GPUs to use (0..gpus-1); default: all torch sees
    slots_per_gpu: 6        # runs a GPU holds at once
    retries: 1              # a failed run is started again (resume=auto continues it) this often
    overrides: []           # added to every run (a rehearsal shrinks the model here)
    env: {OMP_NUM_THREADS: "2"}
    poll_s: 5               # seconds between looks at the running jobs
    sweeps:                 # in priority order; a sweep's points in grid order
      - sweep: finetune_opt125m_docs_pretrain
        slots: 6            # slots each of its runs takes (6: a GPU to itself)
      - sweep: finetune_opt125m_docs
        after: [finetune_opt125m_docs_pretrain]   # starts once every run of these has finished
        overrides: []       # added to this sweep's runs
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE = "queue.json"


def load_plan(path: str) -> dict:
    from omegaconf import OmegaConf

    plan = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    plan.setdefault("trainer", "gpu")
    plan.setdefault("slots_per_gpu", 6)
    plan.setdefault("retries", 1)
    plan.setdefault("overrides", [])
    plan.setdefault("env", {})
    plan.setdefault("poll_s", 5)
    for entry in plan["sweeps"]:
        entry.setdefault("slots", 1)
        entry.setdefault("after", [])
        entry.setdefault("overrides", [])
    return plan


def expand(plan: dict, work: Path) -> list[dict]:
    """One job per grid point, in plan order."""
    from treeffn.results.report import load_sweep, run_dir_name

    jobs = []
    for entry in plan["sweeps"]:
        sweep = load_sweep(entry["sweep"], runs_root=str(work / "runs"))
        for point in sweep.jobs:
            extra = [*plan["overrides"], *entry["overrides"]]
            jobs.append({"sweep": entry["sweep"], "point": point, "extra": extra, "slots": entry["slots"],
                         "after": entry["after"], "name": run_dir_name([*point, *extra], sweep),
                         "status": "pending", "gpu": None, "tries": 0, "started": None, "ended": None})
    return jobs


def command(plan: dict, job: dict, gpu: int | None) -> list[str]:
    trainer = [f"trainer={plan['trainer']}"] + ([f"trainer.devices=[{gpu}]"] if plan["trainer"] == "gpu" else [])
    return ["treeffn", "train", "-m", f"sweep={job['sweep']}", *job["point"], *job["extra"],
            "hydra/launcher=local_serial", *trainer]


def finished(work: Path, job: dict) -> bool:
    try:
        result = json.loads((work / "runs" / "sweeps" / job["sweep"] / job["name"] / "result.json").read_text())
    except (OSError, ValueError):
        return False
    return result.get("status") == "finished"


def gpu_count(plan: dict) -> int:
    if plan["trainer"] != "gpu":
        return 1  # a CPU rehearsal: one "device" with the plan's slots
    if plan.get("gpus"):
        return int(plan["gpus"])
    import torch

    return torch.cuda.device_count()


def serve(work: Path, plan_path: str) -> None:
    """The queue itself (started by `start` in its own session)."""
    plan = load_plan(plan_path)
    jobs = expand(plan, work)
    gpus = gpu_count(plan)
    free = {g: plan["slots_per_gpu"] for g in range(gpus)}
    running: dict[int, subprocess.Popen] = {}
    env = {**os.environ, **{k: str(v) for k, v in plan["env"].items()}}
    (work / "logs").mkdir(parents=True, exist_ok=True)

    def save():
        state = {"gpus": gpus, "slots_per_gpu": plan["slots_per_gpu"], "time": time.time(), "jobs": jobs}
        tmp = work / (STATE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(work / STATE)

    while True:
        for i, proc in list(running.items()):
            if proc.poll() is None:
                continue
            job = jobs[i]
            del running[i]
            free[job["gpu"]] += job["slots"]
            job["ended"] = time.time()
            ok = proc.returncode == 0 and finished(work, job)
            job["status"] = "finished" if ok else ("pending" if job["tries"] <= plan["retries"] else "failed")
        for i, job in enumerate(jobs):
            if job["status"] != "pending":
                continue
            deps = [j for j in jobs if j["sweep"] in job["after"]]
            if any(d["status"] == "failed" for d in deps):
                job["status"] = "blocked"
                continue
            if any(d["status"] != "finished" for d in deps):
                continue
            gpu = max(free, key=lambda g: (free[g], -g))
            if free[gpu] < min(job["slots"], plan["slots_per_gpu"]):
                continue
            free[gpu] -= job["slots"]
            job.update(status="running", gpu=gpu, tries=job["tries"] + 1, started=time.time())
            log = open(work / "logs" / f"{job['sweep']}--{job['name']}.log", "a")
            running[i] = subprocess.Popen(command(plan, job, gpu), cwd=work, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        save()
        if not running and not any(j["status"] == "pending" for j in jobs):
            return
        time.sleep(plan["poll_s"])


def start(work: Path, plan_path: str) -> None:
    work.mkdir(parents=True, exist_ok=True)
    plan = Path(plan_path).resolve()
    (work / "plan.yaml").write_text(plan.read_text())
    out = open(work / "queue.log", "a")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "serve", str(work), str(plan)],
                            cwd=work, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)  # keeps running after the calling shell ends
    (work / "queue.pid").write_text(str(proc.pid))
    print(f"queue started (pid {proc.pid}); state {work / STATE}, logs {work / 'logs'}")


def last_step(run_dir: Path) -> tuple[str, float]:
    import csv

    step, rate = "", 0.0
    for file in sorted((run_dir / "logs" / "csv").glob("metrics*.csv")):
        with file.open(newline="") as f:
            for row in csv.DictReader(f):
                step = row.get("step") or step
                rate = float(row.get("train/tokens_per_s") or rate)
    return step, rate


def wait(work: Path, seconds: float) -> None:
    t0 = time.time()
    while True:
        try:
            state = json.loads((work / STATE).read_text())
        except (OSError, ValueError):
            state = {"jobs": []}
        jobs = state["jobs"]
        counts: dict[str, int] = {}
        for job in jobs:
            counts[job["status"]] = counts.get(job["status"], 0) + 1
            if job["status"] == "running":
                step, rate = last_step(work / "runs" / "sweeps" / job["sweep"] / job["name"])
                print(f"  gpu {job['gpu']} {job['sweep']}/{job['name']}: step {step}, {rate:,.0f} tokens/s")
            if job["status"] in ("failed", "blocked"):
                print(f"  {job['status'].upper()}: {job['sweep']}/{job['name']}")
        smi = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used",
                              "--format=csv,noheader"], capture_output=True, text=True) if _has("nvidia-smi") else None
        if smi and smi.stdout:
            print("  " + smi.stdout.strip().replace("\n", "\n  "))
        print(f"{time.strftime('%H:%M:%S')} " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), flush=True)
        alive = _alive(work)
        if jobs and not alive:
            print("the queue has ended")
            return
        if time.time() - t0 >= seconds:
            return
        time.sleep(min(60, max(1, seconds - (time.time() - t0))))


def _has(tool: str) -> bool:
    from shutil import which

    return which(tool) is not None


def _alive(work: Path) -> bool:
    try:
        os.kill(int((work / "queue.pid").read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def full_grid(sweep_dir: Path) -> None:
    """Make <sweep dir>/multirun.yaml hold the whole grid: the queue launched each point with
    the point's own values on the command line, so the last launch's file names one point.
    Dropping the overrides of the grid's keys leaves what `treeffn train -m sweep=<name>` with the
    same other overrides writes; treeffn report then expands the grid from it."""
    from omegaconf import OmegaConf

    path = sweep_dir / "multirun.yaml"
    cfg = OmegaConf.load(path)
    grid = set(OmegaConf.select(cfg, "hydra.sweeper.params") or {})
    task = [o for o in cfg.hydra.overrides.task if o.split("=", 1)[0].lstrip("+~") not in grid]
    cfg.hydra.overrides.task = task
    OmegaConf.save(cfg, path)


def finish(work: Path, out: Path) -> None:
    """Full-grid multirun.yaml files, the reports, and the records packed into <out>."""
    plan = load_plan(str(work / "plan.yaml"))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "finish.log", "w") as log:
        report(work / "runs", [e["sweep"] for e in plan["sweeps"]], log)
    # The records only: no checkpoints, no hf/ export, no W&B binaries.
    names = ("result.json", "config.yaml", "environment.json", "command.json", "multirun.yaml", "index.jsonl",
             "runs.csv", "failure.json")
    files = [p.relative_to(work / "runs") for p in (work / "runs").rglob("*") if p.is_file() and (
        p.name in names or p.name.startswith("metrics") and p.suffix == ".csv" or p.name.startswith("table.")
        or p.suffix == ".png")]
    subprocess.run(["tar", "-czf", str(out / "records.tar.gz"), *map(str, files)], cwd=work / "runs", check=True)
    for name in ("queue.json", "queue.log", "plan.yaml"):
        if (work / name).exists():
            (out / name).write_bytes((work / name).read_bytes())
    subprocess.run(["tar", "-czf", str(out / "logs.tar.gz"), "logs"], cwd=work, check=False)
    print(f"records of {len(files)} files in {out / 'records.tar.gz'}")


def report(runs_root: Path, sweeps: list[str], log=None) -> None:
    """full_grid, then `treeffn report`, for every sweep (also usable on copied records); the
    reports print to ``log`` (an open file), else to stdout."""
    for sweep in sweeps:
        if (runs_root / "sweeps" / sweep / "multirun.yaml").exists():
            full_grid(runs_root / "sweeps" / sweep)
    for sweep in sweeps:
        subprocess.run(["treeffn", "report", f"sweep={sweep}", f"runs_root={runs_root}"], stdout=log,
                       stderr=subprocess.STDOUT if log else None, check=False)


def main(argv: list[str]) -> None:
    if len(argv) >= 3 and argv[0] == "report":  # report <runs root> <plan.yaml>: on copied records
        report(Path(argv[1]), [e["sweep"] for e in load_plan(argv[2])["sweeps"]])
        return
    if len(argv) != 3 or argv[0] not in ("start", "serve", "wait", "finish"):
        sys.exit(__doc__.split("\n\n")[2])
    phase, work, arg = argv[0], Path(argv[1]).resolve(), argv[2]
    if phase == "start":
        start(work, arg)
    elif phase == "serve":
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        serve(work, arg)
    elif phase == "wait":
        wait(work, float(arg))
    else:
        finish(work, Path(arg).resolve())


if __name__ == "__main__":
    main(sys.argv[1:])
