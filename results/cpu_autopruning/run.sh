#!/usr/bin/env bash
# The README's placement x activation table (auto-pruning section): `treeffn train -m
# sweep=autopruning_cpu`, `treeffn analyze` on each run, the plots to docs/autopruning/, then
# table.json (leaf entropy and dead nodes at steps 0, 50, 400; verdicts; val PPL; training s).
# Usage (repository root, the main job's venv): bash results/cpu_autopruning/run.sh /tmp/ap
set -euo pipefail
root=${1:-/tmp/cpu_autopruning}
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$root"
echo "$(date -u +%FT%TZ) $(git rev-parse --short HEAD) load $(cut -d' ' -f1-3 /proc/loadavg)" > "$here/runs.txt"
.venv/bin/treeffn train -m sweep=autopruning_cpu runs_root="$root" > "$here/sweep.log" 2>&1
echo "sweep done $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$here/runs.txt"
for run in "$root"/sweeps/autopruning_cpu/*/; do
  name=$(basename "$run")
  .venv/bin/treeffn analyze run="$run" > "$here/analyze_$name.log" 2>&1
  cp "$run/analysis/analysis.json" "$here/$name.analysis.json"
  cp "$run/result.json" "$here/$name.result.json"
  for png in "$run"/analysis/entropy_dead_nodes.png; do cp "$png" "$here/${name}.entropy_dead_nodes.png"; done
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
    rows.append({"run": name, "placement": a["tree"]["placement"], "activation": a["tree"]["activation"],
                 "val_ppl": round(result["val_ppl"], 2), "train_s": round(result["wall_s"]),
                 "leaf_entropy": {s: round(series[s]["leaf_entropy"], 3) for s in (0, 50, 400) if s in series},
                 "dead_frac": {s: round(series[s]["dead_frac"], 3) for s in (0, 50, 400) if s in series},
                 "verdicts": [layer["verdict"] for layer in a["final"]], "tokens": a["tokens"]})
(here / "table.json").write_text(json.dumps(rows, indent=1))
print(json.dumps(rows, indent=1))
PY
echo "done $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$here/runs.txt"
