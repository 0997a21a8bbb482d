"""Python's garbage collections during the training steps of a CPU `treeffn train` (after
on_train_start), with FrozenHeap (gc.freeze at the start of training) or without it (FROZEN=0).

    FROZEN=1 python results/host_gc/gc_pauses.py train model=opt125m ...   # one JSON line
"""
import gc
import json
import os
import sys
import time

import lightning as L

from treeffn.training import callbacks

events, began, start = [], {}, {}
if os.environ.get("FROZEN", "1") == "0":
    callbacks.FrozenHeap = L.Callback  # the run without it: a callback that does nothing
real_start = callbacks.Throughput.on_train_start


def marked(self, trainer, pl_module):  # Throughput starts after FrozenHeap: its freeze is not counted
    start["t"], start["objects"] = time.perf_counter(), len(gc.get_objects())
    return real_start(self, trainer, pl_module)


callbacks.Throughput.on_train_start = marked


def timed(phase, info):
    g = info["generation"]
    if phase == "start":
        began[g] = time.perf_counter()
    elif "t" in start:
        events.append((g, (time.perf_counter() - began[g]) * 1e3))


gc.callbacks.append(timed)
from treeffn.cli.main import main  # noqa: E402

try:
    main()
except SystemExit:
    pass
out = {"frozen": os.environ.get("FROZEN", "1") != "0", "objects_tracked_at_train_start": start.get("objects"),
       "argv": sys.argv[1:]}
for g in (0, 1, 2):
    ms = [e[1] for e in events if e[0] == g]
    out[f"gen{g}"] = {"collections": len(ms), "total_ms": round(sum(ms), 1), "max_ms": round(max(ms, default=0), 1)}
print(json.dumps(out))
