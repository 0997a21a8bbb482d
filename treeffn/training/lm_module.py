"""LightningModule for causal language modelling with a Hugging Face model inside."""

from __future__ import annotations

import math

import lightning as L
import torch
from torchmetrics import MeanMetric

from treeffn.layers.leaf_ffn import auxiliary_loss, leaf_layers, mean_router_entropy, routing_mode
from treeffn.models.unpadded import unpadded_blocks


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# Name pieces FSDP (and its activation checkpointing) insert into parameter names.
WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_name(name: str) -> str:
    for piece in WRAPPER_NAMES:
        name = name.replace(piece, "")
    return name


def matrix_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that are matrices (ndim >= 2), read before any wrapping."""
    return {n for n, p in model.named_parameters() if p.ndim >= 2}


def tree_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters of tree FFN layers (any family), read before any wrapping."""
    return {f"{prefix}.{n}" for prefix, m in model.named_modules() if hasattr(m, "node_visits")
            for n, _ in m.named_parameters()}


def parameter_groups(model: torch.nn.Module, weight_decay: float, matrices: set[str] | None = None,
                     lr: float | None = None, tree_lr_scale: float = 1.0, trees: set[str] | None = None) -> list[dict]:
    """Matrices (linear, tree node tables, embeddings) decay; biases and norm weights do not.
    With ``tree_lr_scale`` != 1, the tree layers' parameters (names in ``trees``) form their own
    groups at ``lr * tree_lr_scale``.

    ``matrices``: names from ``matrix_names`` before wrapping. FSDP (use_orig_params) shows a
    sharded parameter as a flat 1-D piece, so its shape no longer says what it is.
    """
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            is_matrix = unwrapped_name(name) in matrices if matrices is not None else p.ndim >= 2
            is_tree = tree_lr_scale != 1 and unwrapped_name(name) in (trees or set())
            groups.setdefault((is_matrix, is_tree), []).append(p)
    out = []
    for is_tree in (False, True):
        for is_matrix in (True, False):
            if (is_matrix, is_tree) in groups or not is_tree:
                group = {"params": groups.get((is_matrix, is_tree), []), "weight_decay": weight_decay if is_matrix else 0.0}
                if is_tree:
                    group["lr"] = lr * tree_lr_scale
                out.append(group)
    return out


class CausalLMModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, optim_cfg: dict, max_steps: int):
        super().__init__()
        self.model = model
        self.matrices = matrix_names(model)  # before a strategy wraps (and maybe flattens) it
        self.tree_parameters = tree_parameter_names(model)
        self.optim_cfg = optim_cfg
        self.max_steps = max_steps
        self.val_loss = MeanMetric()  # token-weighted, reduced across ranks
        # Leaf-family models (tree.family=leaf) train soft and validate hard; validation also
        # measures the soft loss so the train/eval gap (hard - soft) is logged.
        self.has_leaf_layers = bool(leaf_layers(model))
        self.val_soft_loss = MeanMetric()
        self.last_validation: dict | None = None
        self.val_at_start: dict | None = None  # trainer.val_at_start: the validation before step 1
        self._micro_losses: list[torch.Tensor] = []  # this optimizer step's so far
        self.train_wall_s = 0.0  # accumulated over resumes through the checkpoint
        self.shown: dict[str, str] = {}  # host copies of logged values for the progress bar

    def forward(self, input_ids: torch.Tensor):
        # Batches are whole blocks, never padded: no attention mask to build or check on the host.
        with unpadded_blocks(self.model):
            return self.model(input_ids=input_ids, labels=input_ids)

    def training_step(self, batch: torch.Tensor, batch_idx: int):
        loss = self(batch).loss
        self._micro_losses.append(loss.detach())
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            # The loss of the optimizer step's whole global batch: the mean over its micro-batches
            # (equal in size) and over ranks, the same number on any device count.
            step_loss = torch.stack(self._micro_losses).mean()
            self._micro_losses = []
            if (self.trainer.global_step + 1) % self.trainer.log_every_n_steps == 0:
                self._log_step_loss(step_loss)
        if self.has_leaf_layers:
            entropy = mean_router_entropy(self.model)  # of the forward pass just run
            if entropy is not None:
                self.log("train/router_entropy", entropy, batch_size=batch.shape[0])
            hardening = auxiliary_loss(self.model)  # tree.hardening_weight * router entropy; None when 0
            if hardening is not None:
                self.log("train/hardening_loss", hardening.detach(), batch_size=batch.shape[0])
                loss = loss + hardening
        return loss

    def _log_step_loss(self, step_loss: torch.Tensor) -> None:
        """train/loss, on the steps Lightning writes to the loggers only. Not through
        sync_dist (Lightning's cross-rank sync puts a barrier in every step) nor prog_bar (Lightning
        reads progress-bar values on the host after every batch): either makes the host wait for
        the GPU each step. The progress bar shows the logged value (treeffn/training/progress.py)."""
        world = self.trainer.world_size
        if world > 1:  # an all-reduce is queued on the GPU like any other kernel
            step_loss = step_loss.clone()
            torch.distributed.all_reduce(step_loss)
            step_loss /= world
        self.log("train/loss", step_loss)
        self.shown["loss"] = f"{float(step_loss):.3f}"  # a logging step: the host reads the device anyway

    def validation_step(self, batch: torch.Tensor, batch_idx: int):
        loss = self(batch).loss
        # HF averages over the (block_size - 1) predicted positions of each row.
        weight = batch.shape[0] * (batch.shape[1] - 1)
        self.val_loss.update(loss.detach(), weight=weight)
        if self.has_leaf_layers:  # the same batch through the soft mixture (not counted in routing stats)
            with routing_mode(self.model, "soft", track_stats=False):
                self.val_soft_loss.update(self(batch).loss.detach(), weight=weight)

    def on_validation_epoch_end(self):
        loss = float(self.val_loss.compute())
        self.val_loss.reset()
        ppl = math.exp(min(loss, 50.0))
        self.log("val/loss", loss, sync_dist=False)
        self.log("val/ppl", ppl)  # no prog_bar: Lightning would read it after every later batch
        self.shown["val ppl"] = f"{ppl:.2f}"
        self.last_validation = {"step": int(self.global_step), "val_loss": loss, "val_ppl": ppl}
        if self.has_leaf_layers:
            soft = float(self.val_soft_loss.compute())
            self.val_soft_loss.reset()
            self.log("val/soft_loss", soft)
            self.log("val/hard_soft_gap", loss - soft)  # > 0: hard descent loses what the mixture had
            self.last_validation.update(val_soft_loss=soft, hard_soft_gap=loss - soft)

    def configure_optimizers(self):
        o = self.optim_cfg
        groups = parameter_groups(self.model, o["weight_decay"], self.matrices, o["lr"], o.get("tree_lr_scale", 1.0),
                                  self.tree_parameters)
        # Fused: one kernel for the whole update, and it can skip a non-finite step on the device
        # (NonFiniteGuard). Not under fp16's GradScaler, which Lightning cannot clip through then.
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        fused = not precision.startswith("16")
        opt = torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, o["warmup_steps"], self.max_steps, o["min_lr_ratio"])
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip by the global norm, under FSDP too: Lightning's FSDP precision plugin refuses
        norm clipping, so a sharded model uses FSDP's own clip_grad_norm_, whose norm is taken
        over every rank's shard (the same number an unsharded model would clip by)."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = self.trainer.strategy.model
        if gradient_clip_val and isinstance(wrapped, FSDP):
            wrapped.clip_grad_norm_(gradient_clip_val)
            return
        if gradient_clip_val and getattr(self.trainer.precision_plugin, "scaler", None) is None and \
                gradient_clip_algorithm in (None, "norm"):
            # Lightning's mixed-precision plugin refuses to clip for a fused optimizer even with
            # bf16, where no gradient is scaled: clip here, as it would.
            grads = [p for p in self.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["treeffn"] = {"train_wall_s": self.train_wall_s, "val_at_start": self.val_at_start}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("treeffn", {})
        self.train_wall_s = float(state.get("train_wall_s", 0.0))
        self.val_at_start = state.get("val_at_start")
