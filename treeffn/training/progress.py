"""The training progress bar: optimizer steps out of ``trainer.max_steps``, with the time left.

Lightning's RichProgressBar counts the batches of the current epoch and names the epoch out of
``max_epochs``; a treeffn run is bounded by steps (``max_epochs=-1``), so it read ``Epoch 0/-2``
and restarted at every pass over the data. This bar counts ``trainer.global_step`` (optimizer
steps, so gradient accumulation and resumed runs count right) towards ``trainer.max_steps``, as
one bar over all epochs; its rate is steps per second and its ETA the time to the last step.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar

DESCRIPTION = "training steps"


class StepProgressBar(RichProgressBar):
    """``training steps ━━━━━━━━━━ 120/300 0:00:29 • 0:00:43 4.13it/s loss ...``."""

    @property
    def total_train_batches(self) -> int:
        return self.trainer.max_steps

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{DESCRIPTION:{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # One bar for the whole run: created at the first epoch (at the resumed step), kept after.
        if self.is_disabled or self.progress is None or self.train_progress_bar_id is not None:
            return
        self._initialize_train_progress_bar_id()
        self.refresh()

    def _initialize_train_progress_bar_id(self) -> None:
        # Started at the step training resumes from: no jump from 0 that would skew the rate.
        description = self._get_train_description(self.trainer.current_epoch)
        if self.theme.description:
            description = f"[{self.theme.description}]{description}"
        self.train_progress_bar_id = self.progress.add_task(description, total=self.trainer.max_steps,
                                                            completed=self.trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        # The metrics shown (the loss) are read from the device: a host sync, so only on the
        # steps Lightning logs anyway, not every step.
        if not trainer.global_step % trainer.log_every_n_steps or trainer.global_step >= trainer.max_steps:
            self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer, pl_module) -> dict:
        # No value is logged with prog_bar=True: Lightning converts every progress-bar value to a
        # Python number after every batch, even a stale one, and each conversion makes the host
        # wait for the GPU. The module keeps host copies of what it logged (``shown``) instead.
        return {**super().get_metrics(trainer, pl_module), **getattr(pl_module, "shown", {})}
