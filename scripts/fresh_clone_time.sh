#!/usr/bin/env bash
# The README's two commands in a fresh clone, timed step by step: the main job (install, then
# `treeffn train`) and the tests as CI runs them (`bash .ci/run`). Writes a record with the
# load average around each step (other jobs may share the machine) and the last lines printed.
#
#     bash scripts/fresh_clone_time.sh results/setup/fresh_clone.txt [/tmp/fresh]
set -euo pipefail
out=$(realpath -m "$1"); work=${2:-/tmp/fresh}
repo=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$work" && git clone -q "$repo" "$work" && cd "$work"
rev=$(git rev-parse --short HEAD)
say() { echo "$*" | tee -a "$out.tmp"; }
step() {  # step NAME COMMAND: wall time (GNU time), load before and after, last lines of output
  local name=$1; shift
  sync; sleep 5
  local before; before=$(cut -d' ' -f1-3 /proc/loadavg)
  /usr/bin/time -f "%e" -o /tmp/fresh_clone_time.s bash -c "$*" > /tmp/fresh_clone_time.log 2>&1
  say "## $name: $* -> $(cat /tmp/fresh_clone_time.s) s wall (GNU time); load average 1/5/15 min before $before, after $(cut -d' ' -f1-3 /proc/loadavg); last lines:"
  grep -v "^WARNING: Location" /tmp/fresh_clone_time.log | tail -n "${TAIL:-8}" | tee -a "$out.tmp"
}
: > "$out.tmp"
say "# Fresh clone of $rev, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores; command: bash scripts/fresh_clone_time.sh $1"
install=$(grep -m1 -o 'python3 -m venv [^`]*&& \.venv/bin/treeffn train' README.md | sed 's/ && \.venv\/bin\/treeffn train$//')
TAIL=2 step "main job, install" "$install"
step "main job, training" ".venv/bin/treeffn train"
TAIL=3 step "tests (.ci/run)" "bash .ci/run"
mv "$out.tmp" "$out"
