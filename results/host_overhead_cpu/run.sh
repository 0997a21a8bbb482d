#!/usr/bin/env bash
# Host time a training step spends in the runner: `treeffn train` against the plain loop of
# scripts/h200_train_speed.py on a tiny model on the CPU, where compute is small and every
# step's host work is on the critical path. Alternating order, default loggers, float32.
#   bash results/host_overhead_cpu/run.sh results/host_overhead_cpu
set -euo pipefail
out=$1; mkdir -p "$out"
py=${PY:-.venv/bin/python}
args=(model=tiny data.block_size=32 data.batch_size=2 trainer=cpu trainer.max_steps=400 trainer.log_every_n_steps=20
      trainer.val_check_interval=400 checkpoint.every_n_steps=400 trainer.limit_val_batches=2 resume=never seed=0)
for ffn in dense tree; do
  for round in 1 2; do
    order=(lightning plain); [ $round = 2 ] && order=(plain lightning)
    for kind in "${order[@]}"; do
      name=${ffn}_${kind}_r${round}
      rm -rf /tmp/host_overhead/$name
      if [ $kind = lightning ]; then
        PATH=$(dirname $py):$PATH treeffn train "${args[@]}" tree=$ffn hydra.run.dir=/tmp/host_overhead/$name > /tmp/host_overhead_$name.log 2>&1
        cp /tmp/host_overhead/$name/logs/csv/metrics.csv "$out/$name.metrics.csv"
      else
        $py scripts/h200_train_speed.py plain --out "$out/$name.json" --overrides "${args[@]}" tree=$ffn
      fi
      echo "$name done"
    done
  done
done
$py - "$out" <<'PY'
import csv, json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1]); tokens = 2 * 32; every = 20; summary = {}
for ffn in ("dense", "tree"):
    for kind in ("lightning", "plain"):
        per_run = []
        for rnd in (1, 2):
            name = f"{ffn}_{kind}_r{rnd}"
            if kind == "lightning":
                rates = [float(r["train/tokens_per_s"]) for r in csv.DictReader(open(out / f"{name}.metrics.csv"))
                         if r.get("train/tokens_per_s")]
            else:
                rates = json.loads((out / f"{name}.json").read_text())["rates"]
            kept = rates[len(rates) // 4:]
            per_run.append(round(1e3 * tokens / statistics.median(kept), 3))
        summary[f"{ffn}_{kind}"] = {"ms_per_step_by_round": per_run, "median_ms_per_step": statistics.median(per_run)}
    summary[f"{ffn}_runner_ms_per_step"] = round(summary[f"{ffn}_lightning"]["median_ms_per_step"]
                                                 - summary[f"{ffn}_plain"]["median_ms_per_step"], 3)
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PY
