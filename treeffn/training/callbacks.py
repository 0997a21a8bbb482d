"""Callbacks: training throughput and per-layer routing summaries of tree models."""

from __future__ import annotations

import time

import lightning as L

from treeffn.analysis.routing import layer_summary
from treeffn.models.swap import tree_layers


class Throughput(L.Callback):
    """Logs tokens/s over each logging window and accumulates training wall time."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self._t0 = self._window_start = None
        self._window_steps = 0

    def on_train_start(self, trainer, pl_module):
        self._t0 = self._window_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._window_steps += 1
        now = time.perf_counter()
        pl_module.train_wall_s += now - self._t0
        self._t0 = now
        if self._window_steps >= trainer.log_every_n_steps:
            rate = self._window_steps * self.tokens_per_step / (now - self._window_start)
            pl_module.log("train/tokens_per_s", rate, prog_bar=True)
            self._window_start, self._window_steps = now, 0

    def on_validation_start(self, trainer, pl_module):
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        # Validation time is not training time: move the clocks past it.
        if self._t0 is not None:
            spent = time.perf_counter() - self._val_start
            self._t0 += spent
            self._window_start += spent


class RoutingSummary(L.Callback):
    """Counts node visits over each validation pass and logs, per tree layer, the fraction of
    dead nodes and the normalized leaf entropy (plus their mean over layers)."""

    def __init__(self):
        self.last: dict = {}

    def on_validation_epoch_start(self, trainer, pl_module):
        for layer in tree_layers(pl_module):
            layer.node_visits.zero_()

    def on_validation_epoch_end(self, trainer, pl_module):
        layers = tree_layers(pl_module)
        if not layers or trainer.sanity_checking:
            return
        per_layer = []
        for i, layer in enumerate(layers):
            visits = layer.node_visits
            if trainer.world_size > 1:
                visits = pl_module.all_gather(visits).sum(0)
            s = layer_summary(visits.cpu(), layer.trees, layer.depth)
            per_layer.append(s)
            for key, value in s.items():
                pl_module.log(f"routing/layer{i}/{key}", value)
        means = {k: sum(s[k] for s in per_layer) / len(per_layer) for k in per_layer[0]}
        for key, value in means.items():
            pl_module.log(f"routing/mean/{key}", value)
        self.last = {"mean": means, "layers": per_layer}
