#!/usr/bin/env bash
# The README's "Results on CPU" table: five runs of the tiny default, one after the other, each
# run's result.json copied here as <name>.result.json with its load average and wall time.
# Usage (repository root, the main job's venv): bash results/cpu_default/run.sh /tmp/cpu_default
set -euo pipefail
out_runs=${1:-/tmp/cpu_default}
here=$(cd "$(dirname "$0")" && pwd)
run() {
  local name=$1; shift
  local start=$(date +%s.%N)
  .venv/bin/treeffn train "$@" resume=never hydra.run.dir="$out_runs/$name" > "$here/$name.log" 2>&1
  local end=$(date +%s.%N)
  cp "$out_runs/$name/result.json" "$here/$name.result.json"
  echo "$name: $* | command wall $(python3 -c "print(round($end - $start, 1))") s | load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$here/runs.txt"
}
rm -rf "$out_runs"; : > "$here/runs.txt"
echo "$(date -u +%FT%TZ) $(git rev-parse --short HEAD)" >> "$here/runs.txt"
run tree_seed0
run tree_seed1 seed=1
run dense_seed0 tree=dense
run dense_seed1 tree=dense seed=1
run post_sum_seed0 tree.placement=post_sum
