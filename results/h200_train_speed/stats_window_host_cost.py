"""Host time of one routing-statistics window of the OPT-1.3B tree shape (24 layers, K=64, D=6):
RoutingStats._finish_window on counts already on the host (split, per-layer statistics, means),
without loggers. Run: python results/h200_train_speed/stats_window_host_cost.py"""
import statistics
import time
from types import SimpleNamespace

import torch

from treeffn.training.callbacks import RoutingStats

K, D, LAYERS = 64, 6, 24
N = 2 ** (D + 1) - 1
torch.manual_seed(0)
layers = [SimpleNamespace(trees=K, depth=D, node_visits=torch.randint(0, 1000, (K * N,)),
                          level_logits=torch.randn(2, D + 1, dtype=torch.float64)) for _ in range(LAYERS)]
buffers = [layer.node_visits.double() for layer in layers] + [layer.level_logits for layer in layers]
flat = torch.cat([b.flatten() for b in buffers])
callback = RoutingStats(10)
trainer = SimpleNamespace(is_global_zero=False, loggers=[])
times = []
for _ in range(7):
    start = time.perf_counter()
    callback._pending = (flat.clone(), None, buffers, layers, 10, 10)
    callback._finish_window(trainer)
    times.append((time.perf_counter() - start) * 1e3)
print(f"finish_window host time, ms: {[round(t, 1) for t in times]}; median {statistics.median(times):.1f}")
