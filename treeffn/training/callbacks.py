"""Callbacks: training throughput and per-layer routing summaries of tree models."""

from __future__ import annotations

import time

import lightning as L

import torch

from treeffn.analysis.routing import LevelLogits, layer_summary, leaf_counts, usage_histogram
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
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # tokens_per_step is one optimizer step's global batch: count steps
        self._window_steps += 1
        now = time.perf_counter()
        pl_module.train_wall_s += now - self._t0
        self._t0 = now
        if self._window_steps >= trainer.log_every_n_steps:
            rate = self._window_steps * self.tokens_per_step / (now - self._window_start)
            pl_module.log("train/tokens_per_s", rate, prog_bar=True)
            pl_module.log("train/tokens_per_s_per_device", rate / trainer.world_size)
            if pl_module.device.type == "cuda":
                pl_module.log("train/peak_memory_gib", torch.cuda.max_memory_allocated(pl_module.device) / 2**30)
            self._window_start, self._window_steps = now, 0

    def on_validation_start(self, trainer, pl_module):
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        # Validation time is not training time: move the clocks past it.
        if self._t0 is not None:
            spent = time.perf_counter() - self._val_start
            self._t0 += spent
            self._window_start += spent


class RoutingStats(L.Callback):
    """Routing statistics of every tree layer, logged as ``tree/layer<i>/...``.

    Training window (every ``every_n_steps`` steps): ``static_sparsity`` (share of nodes, and so
    of FFN parameters, that no training token reached in the window: they got no gradient) and
    ``train_leaf_entropy``. Validation: ``dead_frac``, ``leaf_entropy``, ``leaves_used``,
    ``right_frac`` and ``logit_level<j>`` (mean routing logit per level), their mean over
    layers under ``tree/mean/...``, and W&B histograms of leaf usage. Counts are summed over
    ranks before anything is computed.
    """

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps
        self.last: dict = {}
        self._stash: list | None = None
        self._logits: list = []

    @staticmethod
    def _reduced(trainer, pl_module, visits):
        return pl_module.all_gather(visits).sum(0) if trainer.world_size > 1 else visits

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches or trainer.global_step % self.every_n_steps:
            return
        for i, layer in enumerate(tree_layers(pl_module)):
            visits = self._reduced(trainer, pl_module, layer.node_visits).cpu()
            s = layer_summary(visits, layer.trees, layer.depth)
            pl_module.log(f"tree/layer{i}/static_sparsity", s["dead_frac"])
            pl_module.log(f"tree/layer{i}/train_leaf_entropy", s["leaf_entropy"])
            layer.node_visits.zero_()

    def on_validation_epoch_start(self, trainer, pl_module):
        layers = tree_layers(pl_module)
        # Keep the training window's counts aside; validation counts start from zero.
        self._stash = [layer.node_visits.clone() for layer in layers]
        for layer in layers:
            layer.node_visits.zero_()
        self._logits = [LevelLogits(layer) for layer in layers] if not trainer.sanity_checking else []

    def on_validation_epoch_end(self, trainer, pl_module):
        layers = tree_layers(pl_module)
        logits, self._logits = self._logits, []
        for hook in logits:
            hook.remove()
        if not layers or trainer.sanity_checking:
            self._restore(layers)
            return
        per_layer = []
        for i, layer in enumerate(layers):
            visits = self._reduced(trainer, pl_module, layer.node_visits).cpu()
            s = layer_summary(visits, layer.trees, layer.depth)
            level_means = self._reduced_level_means(trainer, pl_module, logits[i]) if logits else []
            for key, value in s.items():
                pl_module.log(f"tree/layer{i}/{key}", value)
            for j, value in enumerate(level_means):
                pl_module.log(f"tree/layer{i}/logit_level{j}", value)
            per_layer.append({**s, "logit_per_level": level_means})
            self._histogram(trainer, f"tree/layer{i}/leaf_usage", leaf_counts(visits, layer.trees, layer.depth))
        means = {k: sum(s[k] for s in per_layer) / len(per_layer) for k in ("dead_frac", "leaf_entropy",
                                                                             "leaves_used", "right_frac")}
        for key, value in means.items():
            pl_module.log(f"tree/mean/{key}", value)
        self.last = {"mean": means, "layers": per_layer}
        self._restore(layers)

    @staticmethod
    def _reduced_level_means(trainer, pl_module, hook) -> list[float]:
        """Per-level mean routing logits over the validation blocks of all ranks."""
        if trainer.world_size == 1:
            return hook.means()
        sums = pl_module.all_gather(hook.sums.to(pl_module.device)).sum(0).cpu()
        counts = pl_module.all_gather(hook.counts.to(pl_module.device)).sum(0).cpu()
        return torch.where(counts > 0, sums / counts.clamp_min(1), float("nan")).tolist()

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
            for layer, saved in zip(layers, self._stash):
                layer.node_visits.copy_(saved)
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


class InitialCheckpoint(L.Callback):
    """Saves the untrained weights as ``step0000000.ckpt`` at the start of a fresh run, so that
    analyses over checkpoints (``treeffn analyze``) see the routing at initialisation too."""

    def __init__(self, path):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        # Rank 0 decides: every rank must call save_checkpoint (it ends in a barrier), and the
        # others could see the file rank 0 has just written.
        if trainer.global_step == 0 and trainer.strategy.broadcast(not self.path.exists()):
            trainer.save_checkpoint(str(self.path))
