"""What keeps long runs dependable: exact resume state, atomic checkpoints, preemption and
Ctrl-C, non-finite steps, checkpoint checks."""

from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from treeffn.atomic import atomic_open, link_atomic
from treeffn.config import ConfigError
from treeffn.training.distributed import is_fsdp


class RNGState(L.Callback):
    """Carries the Python, NumPy and torch RNG states through checkpoints, so that dropout after
    a resume draws what it would have drawn without the interruption."""

    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict  # applied when training starts, after everything else is built

    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending is None:
            return
        s, self._pending = self._pending, None
        random.setstate(s["python"])
        np.random.set_state((s["numpy"][0], s["numpy"][1].numpy(), *s["numpy"][2:]))
        torch.set_rng_state(s["torch"])
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])


class NonFiniteGuard(L.Callback):
    """Skips an optimizer step whose gradients are not finite (a NaN/inf loss gives such
    gradients), so AdamW leaves weights and moments untouched; stops the run after
    ``max_consecutive`` skipped steps in a row.

    Decided on the device, so that no step waits for the host: the gradients' norms are checked
    there and the fused AdamW skips the update itself when its ``found_inf`` says so (what
    GradScaler uses for fp16). The counts are read on the host every ``trainer.log_every_n_steps``
    steps (a stop comes at most that many steps late; the steps in between are skipped too).
    Optimizers without that argument (fp16 with its GradScaler, which skips such steps itself)
    are guarded the old way, reading the flag every step.
    """

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.streak = 0
        self.skipped = 0
        self.stop_reason: str | None = None
        self._device_counts: torch.Tensor | None = None  # [skipped, streak, longest streak]
        self._skipped_at_read = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        bad = (~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())).float()
        if trainer.world_size > 1 and is_fsdp(trainer):  # each rank sees only its shard of the gradients
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        torch_optimizer = getattr(optimizer, "_optimizer", optimizer)
        if not skips_on_device(trainer, torch_optimizer):
            self._on_host(trainer, pl_module, bool(bad))
            return
        torch_optimizer.found_inf, torch_optimizer.grad_scale = bad, None
        counts = self._device_counts
        if counts is None or counts.device != bad.device:
            counts = self._device_counts = torch.zeros(3, device=bad.device)
        counts[0] += bad
        counts[1] = (counts[1] + bad) * bad  # the streak: +1 on a skipped step, back to 0 on a good one
        counts[2] = torch.maximum(counts[2], counts[1])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not (batch_idx + 1) % trainer.accumulate_grad_batches and \
                not trainer.global_step % trainer.log_every_n_steps:
            self._read(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._read(trainer, pl_module, log=False)  # Lightning allows no logging here

    def _read(self, trainer, pl_module, log: bool = True) -> None:
        """The device's counts to the host (one transfer); log new skips, stop on a long streak."""
        if self._device_counts is None:
            return
        skipped, self.streak, longest = (int(v) for v in self._device_counts.tolist())
        self.skipped = self._skipped_at_read + skipped
        if skipped and log:
            pl_module.log("train/skipped_non_finite", float(self.skipped))
        if longest >= self.max_consecutive and self.stop_reason is None:
            self.stop_reason = (f"at least {self.max_consecutive} consecutive steps with a non-finite loss or "
                                f"gradients (up to step {trainer.global_step}); weights are those of the last "
                                f"finite step")
            trainer.should_stop = True

    def _on_host(self, trainer, pl_module, bad: bool) -> None:
        if not bad:
            self.streak = 0
            return
        for p in pl_module.parameters():
            p.grad = None
        self.streak += 1
        self.skipped += 1
        pl_module.log("train/skipped_non_finite", float(self.skipped))
        if self.streak >= self.max_consecutive:
            self.stop_reason = (f"{self.streak} consecutive steps with a non-finite loss or gradients "
                                f"(up to step {trainer.global_step}); weights are those of the last finite step")
            trainer.should_stop = True

    def state_dict(self) -> dict:
        if self._device_counts is not None:  # a checkpoint is written: the host reads anyway
            self.skipped = self._skipped_at_read + int(self._device_counts[0])
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = self._skipped_at_read = int(state_dict.get("skipped", 0))
        self._device_counts = None


def skips_on_device(trainer, optimizer) -> bool:
    """Whether ``optimizer`` can skip a step on the device through ``found_inf`` (fused Adam and
    AdamW can) and no GradScaler (fp16) sets that argument itself."""
    fused = all(group.get("fused") for group in optimizer.param_groups)
    return fused and getattr(trainer.precision_plugin, "scaler", None) is None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its destination, fsyncs it and renames
    it into place. Lightning's own writer stages the file in $TMPDIR and, when that is another
    filesystem, copies it over the destination, truncating the previous good checkpoint first;
    here a full disk or a kill mid-save leaves the previous checkpoint as it was."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        with atomic_open(path, "wb") as f:
            torch.save(checkpoint, f)


class PeriodicCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint for the periodic ``step*.ckpt`` files, with ``last.ckpt`` made
    a hard link to each one as it is written, instead of Lightning's ``save_last``, which writes
    the same state a second time (~15 GB at OPT-1.3B: fp32 weights and AdamW's moments) and, in
    its "link" mode, can point last.ckpt back at an older periodic file after a newer save by
    another callback. Every other save of last.ckpt (preemption, the end of the run) is a full
    write that replaces the link."""

    def __init__(self, last_ckpt: Path, **kwargs):
        super().__init__(save_last=False, **kwargs)
        self.last_ckpt = Path(last_ckpt)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero:  # only rank 0 writes the file (Lightning's checkpoint IO)
            link_atomic(filepath, self.last_ckpt)


class Preemption(L.Callback):
    """On SIGTERM, SIGUSR1 or SIGUSR2 (what Slurm or submitit's launcher sends before a time
    limit or a preemption) and on Ctrl-C (SIGINT): finish the current step, save ``last.ckpt``
    and stop; rerunning the same command continues the run. A second Ctrl-C ends the process at
    once (what was being saved stays in a temporary file; the previous checkpoints are intact).
    ``pass_on_signal`` then hands SIGUSR2 to the handler that was there before (submitit's,
    which requeues the job)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, last_ckpt: Path):
        self.last_ckpt = Path(last_ckpt)
        self.received: str | None = None
        self.saved_step: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":  # the second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            return
        self.received = self.received or signal.Signals(signum).name
        if signum == signal.SIGINT:
            print("\ntreeffn train: Ctrl-C: saving a checkpoint after this step (Ctrl-C again to quit now)",
                  file=sys.stderr, flush=True)

    def setup(self, trainer, pl_module, stage) -> None:
        # At the start of fit, before the checkpoint loads: a signal from here on is held until
        # the next step ends (a Ctrl-C during loading still saves nothing new, it just stops there).
        if not self._previous:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def on_train_start(self, trainer, pl_module) -> None:
        # Loggers start between setup and here, and W&B installs its own SIGTERM handler: take the
        # signals back, and restore that handler at teardown (as it would be without us).
        for sig in self.SIGNALS:
            current = signal.getsignal(sig)
            if current != self._handle:
                self._previous[sig] = current
                signal.signal(sig, self._handle)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        # A signal may reach one rank only (kill, Ctrl-C): all ranks stop together, or rank 0
        # would wait in the checkpoint's barrier for ranks that trained on. That takes a
        # collective, which waits for the step to finish: several ranks ask every
        # log_every_n_steps steps only (a stop comes that many steps late at most).
        if trainer.world_size > 1 and trainer.global_step % trainer.log_every_n_steps:
            return
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        self.received = self.received or "a signal to another rank"
        trainer.save_checkpoint(str(self.last_ckpt))
        self.saved_step = trainer.global_step
        trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        # A signal during the last validation arrives after the last step's batch end: save here.
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False) and \
                self.saved_step != trainer.global_step:
            self.received = self.received or "a signal to another rank"
            trainer.save_checkpoint(str(self.last_ckpt))
            self.saved_step = trainer.global_step

    def teardown(self, trainer, pl_module, stage) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def pass_on_signal(signal_name: str | None) -> None:
    """After a clean stop on SIGUSR2, raise it again for the handler Preemption restored.

    Under Hydra's submitit launcher that handler requeues the job and exits, so a run that hit
    its time limit comes back as the same command and continues from the ``last.ckpt`` just
    saved, instead of from the last periodic checkpoint. Without such a handler (SIGUSR2 left at
    its default, which would kill the process) nothing is raised."""
    if signal_name != "SIGUSR2":
        return
    handler = signal.getsignal(signal.SIGUSR2)
    if callable(handler):
        signal.raise_signal(signal.SIGUSR2)


def check_checkpoint_fits(path: Path, model: torch.nn.Module) -> None:
    """Refuse, before training, a checkpoint whose weights do not fit this model."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ConfigError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is corrupted, truncated "
                          f"or not a treeffn checkpoint") from None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {path} holds no state_dict; it is not a treeffn training checkpoint")
    expected = {f"model.{k}": v.shape for k, v in model.state_dict().items()}
    got = {k: v.shape for k, v in state.items() if k.startswith("model.")}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k]))
    if missing or unexpected or mismatched:
        first = (mismatched or missing or unexpected)[0]
        detail = (f"{first} has shape {tuple(got[first])}, the model needs {tuple(expected[first])}" if mismatched
                  else f"{first} is {'missing' if missing else 'unexpected'}")
        raise ConfigError(f"checkpoint {path} is of another architecture ({detail}; "
                          f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mismatched tensors)")
