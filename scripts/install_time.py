"""Time the README's main-job install in fresh clones: the command before issue 17 (Python's
bundled pip, compiling file by file), against the README's command since (the venv made with
``--upgrade-deps``, i.e. today's pip, then ``pip install --no-compile`` and
scripts/compile_venv.py on every core). Writes a record.

Each round clones the repository afresh for each variant (alternating which goes first),
syncs the disk, times the install command step by step (wall, and the CPU time of the step's
processes: user + system, which another job on the machine inflates less than wall time),
notes the load average before and after (other jobs may share the machine), then times one
import of what ``treeffn train`` loads, twice, to show the .pyc files are there (where
PYTHONDONTWRITEBYTECODE=1, Python never writes them itself).

    python3 scripts/install_time.py --rounds 3 --out results/setup/install_time.txt
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The second is the README's main-job install (without its last step, `.venv/bin/treeffn train`).
VARIANTS = {
    "pip compiles (before)": "python3 -m venv .venv && .venv/bin/pip install -c constraints/cpu.txt -e .",
    "--no-compile + compile_venv.py (after)": "python3 -m venv --upgrade-deps .venv && .venv/bin/pip install --no-compile "
                                              "-c constraints/cpu.txt -e . && .venv/bin/python scripts/compile_venv.py",
}
IMPORTS = "import torch, lightning, transformers, datasets, wandb, hydra, treeffn.training.train, treeffn.cli.main"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: str, cwd: Path) -> tuple[float, int, float]:
    """(wall s, exit status, CPU s of the command's processes)."""
    cpu0, started = children_cpu(), time.perf_counter()
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    wall, cpu = time.perf_counter() - started, children_cpu() - cpu0
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr)
    return wall, proc.returncode, cpu


def timed_steps(command: str, cwd: Path) -> tuple[float, int, list[float], list[float]]:
    """The ``&&`` chain one step at a time (stopping at a failure): total, exit status, wall and
    CPU seconds per step."""
    walls, cpus = [], []
    for step in command.split(" && "):
        seconds, code, cpu = timed(step, cwd)
        walls.append(seconds)
        cpus.append(cpu)
        if code:
            return sum(walls), code, walls, cpus
    return sum(walls), 0, walls, cpus


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/treeffn-install-time")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    lines = [f"# Install time of the README's main-job install in fresh clones of {commit} "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}), {os.cpu_count()} cores, "
             f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')}",
             f"# command: python3 scripts/install_time.py --rounds {args.rounds} --out {args.out}",
             f"# import check: .venv/bin/python -c '{IMPORTS}' (twice; the second with the files in the page cache)",
             "variant | round | install s (wall per step of the && chain) | CPU s per step | exit | "
             "load avg 1/5/15 min before | after | import s (1st, 2nd)"]
    results: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(1, args.rounds + 1):
        order = list(VARIANTS) if r % 2 else list(reversed(VARIANTS))
        for variant in order:
            clone = Path(args.work) / "clone"
            shutil.rmtree(clone, ignore_errors=True)
            clone.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
            subprocess.run(["sync"], check=True)  # the deleted clone's writes are not the next install's
            time.sleep(5)
            before = load()
            seconds, code, steps, cpus = timed_steps(VARIANTS[variant], clone)
            after = load()
            imports = [timed(f".venv/bin/python -c '{IMPORTS}'", clone)[0] for _ in range(2)]
            results[variant].append(seconds)
            lines.append(f"{variant} | {r} | {seconds:.2f} ({' + '.join(f'{s:.1f}' for s in steps)}) | "
                         f"{' + '.join(f'{c:.1f}' for c in cpus)} | {code} | {before} | {after} | "
                         f"{imports[0]:.2f}, {imports[1]:.2f}")
            print(lines[-1], flush=True)
    lines.append("# summary (install s): " + "; ".join(
        f"{v}: min {min(s):.2f}, median {sorted(s)[len(s) // 2]:.2f}, max {max(s):.2f}" for v, s in results.items()))
    for v in VARIANTS:
        lines.append(f"# {v}: {VARIANTS[v]}")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(lines[-3])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
