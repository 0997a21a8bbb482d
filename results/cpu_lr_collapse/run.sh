#!/usr/bin/env bash
# The README's learning-rate table (auto-pruning section): the sweep, `treeffn analyze` on each
# run, then table.json (leaf entropy at steps 0/25/50, the lowest and its dead nodes, step 300,
# val PPL). Usage (repository root, the main job's venv): bash results/cpu_lr_collapse/run.sh /tmp/lr
set -euo pipefail
root=${1:-/tmp/cpu_lr_collapse}
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$root"
echo "$(date -u +%FT%TZ) $(git rev-parse --short HEAD) load $(cut -d' ' -f1-3 /proc/loadavg)" > "$here/runs.txt"
.venv/bin/treeffn train -m model.lr=4e-3,1e-3 optim.warmup_steps=30,150 trainer.max_steps=300 \
  checkpoint.every_n_steps=25 checkpoint.keep_all=true logger=csv runs_root="$root" > "$here/sweep.log" 2>&1
for run in "$root"/multirun/*/; do
  name=$(basename "$run")
  .venv/bin/treeffn analyze run="$run" > "$here/analyze_$name.log" 2>&1
  cp "$run/analysis/analysis.json" "$here/$name.analysis.json"
  cp "$run/result.json" "$here/$name.result.json"
done
.venv/bin/python - "$here" <<'PY'
import json, sys
from pathlib import Path
here = Path(sys.argv[1])
rows = []
for path in sorted(here.glob("*.analysis.json")):
    a = json.loads(path.read_text())
    name = path.name.replace(".analysis.json", "")
    result = json.loads((here / f"{name}.result.json").read_text())
    series = {c["step"]: c["mean"] for c in a["checkpoints"]}
    low_step = min(series, key=lambda s: series[s]["leaf_entropy"])
    rows.append({"run": name, "entropy": {s: round(series[s]["leaf_entropy"], 3) for s in (0, 25, 50, 300) if s in series},
                 "lowest": [round(series[low_step]["leaf_entropy"], 3), low_step],
                 "dead_at_lowest": round(series[low_step]["dead_frac"], 3),
                 "dead_at_300": round(series[300]["dead_frac"], 3), "val_ppl": round(result["val_ppl"], 2),
                 "tokens": a["tokens"]})
(here / "table.json").write_text(json.dumps(rows, indent=1))
print(json.dumps(rows, indent=1))
PY
echo "done $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$here/runs.txt"
