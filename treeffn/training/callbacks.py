"""Callbacks: training throughput, the host's garbage collection, per-layer routing summaries of tree models."""

from __future__ import annotations

import gc
import time

import lightning as L

import torch

from treeffn.analysis.routing import layer_summary, leaf_counts, level_logit_means, mean_over_layers, usage_histogram
from treeffn.models.swap import tree_layers


class FrozenHeap(L.Callback):
    """Moves every object alive when training starts (modules, optimizer, imported libraries:
    ~540k objects for OPT-125M on the CPU) out of the garbage collector's reach with gc.freeze.
    Python's full collection scans every tracked object: in 300 CPU steps of OPT-125M one ran and
    held the host 291 ms, none with the heap frozen (results/host_gc/). On a GPU such a pause is
    idle time whenever the host does not run ahead (FSDP, small steps), and with several ranks
    every rank waits for the paused one. The freeze costs one collection before the first step."""

    def on_train_start(self, trainer, pl_module):
        gc.collect()
        gc.freeze()

    def on_train_end(self, trainer, pl_module):
        gc.unfreeze()

    def on_exception(self, trainer, pl_module, exception):
        gc.unfreeze()


class Throughput(L.Callback):
    """Logs tokens/s over each logging window and accumulates training wall time."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self._t0 = self._window_start = None
        self._window_steps = 0
        self.peak_memory_gib_per_rank: list[float] | None = None  # GPUs only, at the end of training

    def on_train_start(self, trainer, pl_module):
        self._t0 = self._window_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # tokens_per_step is one optimizer step's global batch: count steps
        self._window_steps += 1
        now = time.perf_counter()
        pl_module.train_wall_s += now - self._t0
        self._t0 = now
        if self._window_steps >= trainer.log_every_n_steps:
            rate = self._window_steps * self.tokens_per_step / (now - self._window_start)
            pl_module.log("train/tokens_per_s", rate)  # no prog_bar: see StepProgressBar.get_metrics
            if hasattr(pl_module, "shown"):
                pl_module.shown["tokens/s"] = f"{rate:,.0f}"
            pl_module.log("train/tokens_per_s_per_device", rate / trainer.world_size)
            if pl_module.device.type == "cuda":
                pl_module.log("train/peak_memory_gib", torch.cuda.max_memory_allocated(pl_module.device) / 2**30)
            self._window_start, self._window_steps = now, 0

    def on_train_end(self, trainer, pl_module):
        # Every rank's own peak (ranks may differ: FSDP's root unit, uneven buffers), gathered once.
        if pl_module.device.type == "cuda":
            peak = torch.tensor(torch.cuda.max_memory_allocated(pl_module.device) / 2**30, device=pl_module.device)
            peaks = pl_module.all_gather(peak) if trainer.world_size > 1 else peak.view(1)
            self.peak_memory_gib_per_rank = [round(float(v), 2) for v in peaks.flatten()]

    def on_validation_start(self, trainer, pl_module):
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        # Validation time is not training time: move the clocks past it.
        if self._t0 is not None:
            spent = time.perf_counter() - self._val_start
            self._t0 += spent
            self._window_start += spent


class RoutingStats(L.Callback):
    """Routing statistics of every tree layer, logged as ``tree/layer<i>/...`` and, averaged over
    layers, ``tree/mean/...``.

    Training window (every ``every_n_steps`` optimizer steps, from the counts the training
    forward passes make anyway): ``static_sparsity`` (share of nodes, and so of FFN parameters,
    that no training token of the window reached: they got no gradient), ``train_leaf_entropy``,
    ``train_right_level<j>`` (share of the tokens at level j that went right) and
    ``train_logit_level<j>`` (mean routing logit on the paths). Written straight to the loggers,
    so every window is recorded whatever ``trainer.log_every_n_steps`` is.

    Validation: ``dead_frac``, ``leaf_entropy``, ``leaves_used``, ``right_frac``,
    ``right_level<j>``, ``logit_level<j>``, and W&B histograms of leaf usage. Counts are summed
    over ranks before anything is computed; the device is read once per window.

    A training window's counts are copied to the host without waiting (a pinned buffer and a
    CUDA event) and turned into statistics at the next step's end, when the copy has long
    arrived: the host never stops the GPU for them. A run stopped between the two loses that
    window's log rows, not its counts' effect on anything else.
    """

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps
        self.last: dict = {}          # the last validation's statistics (result.json's routing)
        self.last_window: dict = {}   # the last full training window's (or the only, shorter one)
        self._stash: list | None = None
        self._pending: tuple | None = None  # a training window's counts on their way to the host

    @staticmethod
    def _gather(trainer, pl_module, layers) -> tuple[torch.Tensor, list]:
        """Every layer's counts in one flat float64 tensor on the device, summed over ranks."""
        logits = [getattr(layer, "level_logits", None) for layer in layers]
        buffers = [layer.node_visits.double() for layer in layers] + [x for x in logits if x is not None]
        flat = torch.cat([b.flatten() for b in buffers])
        if trainer.world_size > 1:
            flat = pl_module.all_gather(flat).sum(0)
        return flat, buffers

    @staticmethod
    def _split(flat: torch.Tensor, buffers: list, layers) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(visits, level_logits or None) per layer from the flat host copy."""
        logits = [getattr(layer, "level_logits", None) for layer in layers]
        pieces = flat.split([b.numel() for b in buffers])
        visits, rest = pieces[:len(layers)], iter(pieces[len(layers):])
        return [(v.round().long(), next(rest).view(x.shape) if x is not None else None)
                for v, x in zip(visits, logits)]

    @classmethod
    def _counts(cls, trainer, pl_module, layers) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(visits, level_logits or None) per layer, summed over ranks, on the CPU: one transfer."""
        flat, buffers = cls._gather(trainer, pl_module, layers)
        return cls._split(flat.cpu(), buffers, layers)

    @staticmethod
    def _stats(visits, level_logits, layer) -> dict:
        s = layer_summary(visits, layer.trees, layer.depth)
        s["logit_per_level"] = level_logit_means(level_logits) if level_logits is not None else []
        return s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        self._finish_window(trainer)  # the previous window's copy has arrived by now
        if not trainer.global_step % self.every_n_steps:
            self._start_window(trainer, pl_module, self.every_n_steps)

    def on_train_end(self, trainer, pl_module):
        self._finish_window(trainer)
        # A run shorter than one window still gets one (its steps are recorded with it).
        steps = trainer.global_step % self.every_n_steps
        if not self.last_window and steps:
            self._start_window(trainer, pl_module, steps)
            self._finish_window(trainer)

    def _start_window(self, trainer, pl_module, steps: int):
        """Gather the window's counts (a collective on every rank, same step), start their copy
        to the host and zero the counters; ``_finish_window`` computes and logs."""
        layers = tree_layers(pl_module)
        if not layers:
            return
        flat, buffers = self._gather(trainer, pl_module, layers)
        event = None
        if flat.is_cuda:
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = flat.clone()
        for layer in layers:
            layer.node_visits.zero_()
            if getattr(layer, "level_logits", None) is not None:
                layer.level_logits.zero_()
        self._pending = (host, event, buffers, layers, int(trainer.global_step), steps)

    def _finish_window(self, trainer):
        if self._pending is None:
            return
        host, event, buffers, layers, step, steps = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()  # normally long done: the copy was queued a step ago
        counts = self._split(host, buffers, layers)
        per_layer = [self._stats(v, x, layer) for (v, x), layer in zip(counts, layers)]
        metrics = {}
        for i, s in enumerate(per_layer):
            metrics |= self._window_metrics(f"tree/layer{i}", s)
        metrics |= self._window_metrics("tree/mean", mean_over_layers(per_layer))
        self.last_window = {"step": step, "steps": steps, "tokens": tokens_counted(counts, layers),
                            "mean": mean_over_layers(per_layer),
                            "layers": [{k: s[k] for k in ("dead_frac", "leaf_entropy", "root_right_share")}
                                       for s in per_layer]}
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=step)

    @staticmethod
    def _window_metrics(prefix: str, s: dict) -> dict:
        out = {f"{prefix}/static_sparsity": s["dead_frac"], f"{prefix}/train_leaf_entropy": s["leaf_entropy"]}
        out |= {f"{prefix}/train_right_level{j}": v for j, v in enumerate(s["right_share_per_level"])}
        out |= {f"{prefix}/train_logit_level{j}": v for j, v in enumerate(s["logit_per_level"])}
        return out

    def on_validation_epoch_start(self, trainer, pl_module):
        layers = tree_layers(pl_module)
        # Keep the training window's counts aside; validation counts start from zero.
        self._stash = [(layer.node_visits.clone(), _logit_buffer(layer)) for layer in layers]
        for layer in layers:
            layer.node_visits.zero_()
            if getattr(layer, "level_logits", None) is not None:
                layer.level_logits.zero_()

    def on_validation_epoch_end(self, trainer, pl_module):
        layers = tree_layers(pl_module)
        if not layers or trainer.sanity_checking:
            self._restore(layers)
            return
        counts = self._counts(trainer, pl_module, layers)
        per_layer = []
        for i, ((visits, level_logits), layer) in enumerate(zip(counts, layers)):
            s = self._stats(visits, level_logits, layer)
            for key in ("dead_frac", "leaf_entropy", "leaves_used", "right_frac", "root_right_share"):
                pl_module.log(f"tree/layer{i}/{key}", s[key])
            for j, value in enumerate(s["right_share_per_level"]):
                pl_module.log(f"tree/layer{i}/right_level{j}", value)
            for j, value in enumerate(s["logit_per_level"]):
                pl_module.log(f"tree/layer{i}/logit_level{j}", value)
            per_layer.append(s)
            self._histogram(trainer, f"tree/layer{i}/leaf_usage", leaf_counts(visits, layer.trees, layer.depth))
        means = mean_over_layers(per_layer)
        for key in ("dead_frac", "leaf_entropy", "leaves_used", "right_frac", "root_right_share"):
            pl_module.log(f"tree/mean/{key}", means[key])
        self.last = {"tokens": tokens_counted(counts, layers), "mean": means, "layers": per_layer}
        self._restore(layers)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # Each rank counts its own tokens; the checkpoint (written by rank 0) gets the sum over
        # ranks, and after a resume only rank 0 starts from it (on_train_start): the training
        # window that spans the checkpoint is counted once, on any device count.
        if trainer.world_size == 1:
            return
        state = checkpoint.get("state_dict") or {}
        for name, visits in pl_module.named_buffers():
            if name.endswith("node_visits"):
                total = pl_module.all_gather(visits).sum(0)
                key = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
                if key in state:  # FSDP gives the other ranks an empty state dict
                    state[key] = total.cpu()

    def on_train_start(self, trainer, pl_module):
        if trainer.world_size > 1 and trainer.global_rank != 0 and trainer.global_step > 0:
            for layer in tree_layers(pl_module):
                layer.node_visits.zero_()

    def _restore(self, layers):
        if self._stash is not None:
            for layer, (visits, logits) in zip(layers, self._stash):
                layer.node_visits.copy_(visits)
                if logits is not None:
                    layer.level_logits.copy_(logits)
            self._stash = None

    @staticmethod
    def _histogram(trainer, key, counts):
        for lg in trainer.loggers:
            if type(lg).__name__ == "WandbLogger" and trainer.is_global_zero:
                import wandb

                # How often each path was taken, within W&B's bin limit for any K and depth.
                bins, _ = usage_histogram(counts)
                flat = bins.double()
                edges = torch.arange(flat.numel() + 1).double()
                lg.experiment.log({key: wandb.Histogram(np_histogram=(flat.numpy(), edges.numpy())),
                                   "trainer/global_step": trainer.global_step})


def tokens_counted(counts, layers) -> int:
    """Tokens behind a set of counts: every token visits the root of each tree of layer 0."""
    return int(counts[0][0].view(layers[0].trees, -1)[:, 0].sum()) // layers[0].trees


def _logit_buffer(layer):
    buf = getattr(layer, "level_logits", None)
    return buf.clone() if buf is not None else None


class InitialCheckpoint(L.Callback):
    """Saves the untrained weights (weights only) as ``step0000000.ckpt`` at the start of a fresh
    tree run: ``treeffn analyze`` judges routing relative to the model's own initialisation."""

    def __init__(self, path):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        # Rank 0 decides: every rank must call save_checkpoint (it ends in a barrier), and the
        # others could see the file rank 0 has just written.
        if trainer.global_step == 0 and trainer.strategy.broadcast(not self.path.exists()):
            trainer.save_checkpoint(str(self.path), weights_only=True)
