#!/usr/bin/env bash
# Table 6 on one GPU host (docs/reproduction.md, "Table 6"): the nine runs of
# sweep=table_strategies_opt125m_docs side by side on the host's GPUs, then the analysis and the
# report. Three phases, so that the work fits calls of a few minutes on a lent machine:
#
#   bash scripts/table6_gpu.sh start  <work dir>   launch the sweep in its own session (setsid);
#        TABLE6_EXTRA="<overrides>" also starts one more run of the same recipe on the last GPU
#        (an idea to close the tree-dense gap, e.g. "strategy=node seed=0 optim.tree_lr_scale=3")
#   bash scripts/table6_gpu.sh wait   <work dir> <seconds>   print progress until done or timeout
#   bash scripts/table6_gpu.sh finish <work dir> <out dir>   analyze + report, pack the records
#
# A CPU rehearsal of all three phases (tiny model, a few steps):
#   TABLE6_TRAINER=cpu TABLE6_OVERRIDES="model=tiny trainer.max_steps=20 ..." bash scripts/table6_gpu.sh start /tmp/t6
#
# The work dir holds runs/ and a link to the corpus (.corpus: train.u16.xz, validation.u16.xz).
# The jobs start in the work dir, not in the repository: submitit's job processes put their
# working directory first on sys.path, where the repository's source tree would shadow the
# installed treeffn (whose treeffn.cli and treeffn.conf come from cli/ and conf/).
set -euo pipefail
phase=$1 work=$2
repo=$(cd "$(dirname "$0")/.." && pwd)
sweep=${TABLE6_SWEEP:-table_strategies_opt125m_docs}   # or table_strategies_opt125m_docs_tree_lr3
expected=${TABLE6_RUNS:-9}                              # grid points of that sweep
sweep_dir=$work/runs/sweeps/$sweep
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")

case $phase in
start)
  mkdir -p "$work" && ln -sfn "$repo/.corpus" "$work/.corpus"
  cd "$work"
  # 3 CPU threads per job: nine jobs on a 32-core host
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-3} setsid nohup treeffn train -m sweep=$sweep hydra/launcher=local_gpus \
      trainer=${TABLE6_TRAINER:-gpu_shared} hydra.launcher.gpus_per_node="$gpus" ${TABLE6_OVERRIDES:-} \
      > "$work/sweep.log" 2>&1 < /dev/null &
  echo $! > "$work/sweep.pid"
  echo "launched on $gpus GPU(s); log $work/sweep.log"
  if [ -n "${TABLE6_EXTRA:-}" ]; then
    extra_trainer="trainer=gpu trainer.devices=[$(( gpus > 0 ? gpus - 1 : 0 ))]"
    [ -n "${TABLE6_TRAINER:-}" ] && extra_trainer="trainer=$TABLE6_TRAINER"
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-3} setsid nohup treeffn train sweep=$sweep $TABLE6_EXTRA $extra_trainer \
        ${TABLE6_OVERRIDES:-} > "$work/extra.log" 2>&1 < /dev/null &
    echo "extra run ($TABLE6_EXTRA) launched; log $work/extra.log"
  fi
  ;;
wait)
  limit=$3 t0=$(date +%s)
  while true; do
    done_runs=$( (ls "$sweep_dir"/*/result.json 2>/dev/null || true) | wc -l)
    extra_done=$( (ls "$work"/runs/*/result.json 2>/dev/null || true) | wc -l)
    python3 - "$sweep_dir" <<'PY'
import csv, sys, pathlib
root = pathlib.Path(sys.argv[1])
for run in sorted([*root.glob("*/logs/csv/metrics.csv"), *root.parent.parent.glob("*/logs/csv/metrics.csv")]):
    step = rate = ""
    for row in csv.DictReader(open(run)):
        step = row.get("step") or step
        rate = row.get("train/tokens_per_s") or rate
    print(f"  {run.parents[2].name}: step {step}, {float(rate or 0):,.0f} tokens/s")
PY
    for f in "$sweep_dir"/*/failure.json; do [ -f "$f" ] && { echo "FAILED: $f"; head -c 600 "$f"; echo; }; done
    grep -h -m2 -E "Error|error:" "$sweep_dir"/.submitit/*/*.err 2>/dev/null | head -4 || true
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader 2>/dev/null || true
    echo "$(date -u +%T) finished $done_runs/$expected (+ $extra_done extra)"
    [ "$done_runs" -ge "$expected" ] && { [ -z "${TABLE6_EXTRA:-}" ] || [ "$extra_done" -ge 1 ]; } && break
    kill -0 "$(cat "$work/sweep.pid")" 2>/dev/null || { echo "the sweep process has ended:"; tail -5 "$work/sweep.log"; break; }
    [ $(( $(date +%s) - t0 )) -ge "$limit" ] && break
    sleep 60
  done
  ;;
finish)
  out=$3
  cd "$work"
  for run in "$sweep_dir"/*/ "$work"/runs/*/; do  # in parallel; dense runs answer "nothing to analyse"
    [ -f "$run/config.yaml" ] || continue
    (treeffn analyze run="$run" max_blocks=all > "$run/analyze.txt" 2>&1 || echo "analyze failed: $run") &
  done
  wait
  treeffn report sweep=$sweep > "$work/report.txt" 2>&1 || true
  cd "$work/runs"
  # The records only: no checkpoints, no hf/ export, no W&B binaries.
  find . \( -name result.json -o -name config.yaml -o -name environment.json -o -name command.json \
      -o -name 'metrics*.csv' -o -name analysis.json -o -name '*.png' -o -name analyze.txt -o -name multirun.yaml \
      -o -name index.jsonl -o -name 'table.*' -o -name runs.csv -o -name failure.json \) -print0 \
    | tar -czf "$out/records.tar.gz" --null -T -
  cp "$work/sweep.log" "$work/report.txt" "$out/" || true
  [ -f "$work/extra.log" ] && cp "$work/extra.log" "$out/" || true
  ;;
esac
