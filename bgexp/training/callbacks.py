"""Lightning callbacks: checkpoints in the run folder, the step timer, periodic evaluation (ESS,
free energies, figures) during training.

The generic ones are listed in the config group `callbacks/` and built by
`bgexp.training.assemble.build_callbacks` with run_dir=<the run folder>; a task adds its own
(the Boltzmann-generator task adds `EvaluationCallback`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from bgexp.evaluation import evaluate

log = logging.getLogger(__name__)


def log_figures(trainer: pl.Trainer, figures: dict[str, str], step: int) -> None:
    """Send figure files to W&B as images (other loggers keep them as files in the run folder)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            for key, path in figures.items():
                logger.log_image(key=f"figures/{key}", images=[path], step=step)


class EvaluationCallback(pl.Callback):
    """Every `every_n_epochs` epochs: draw samples, log ESS, Delta F with CI, profile error,
    energy statistics (and the force-matching error when the data module has forces, `f_val`)
    under `eval/`, and the figures (rank zero)."""

    def __init__(self, every_n_epochs: int = 1, n_samples: int = 5_000, batch_size: int = 2_000,
                 n_bootstrap: int = 100, figure_dir: str | None = None):
        if every_n_epochs < 1:
            raise ValueError(f"evaluation.every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs, self.n_samples, self.batch_size = every_n_epochs, n_samples, batch_size
        self.n_bootstrap = n_bootstrap
        self.figure_dir = Path(figure_dir) if figure_dir else None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0 or trainer.sanity_checking:
            return
        figure_dir = self.figure_dir if trainer.is_global_zero else None
        datamodule = trainer.datamodule  # the Boltzmann-generator task's TargetDataModule
        data = datamodule.x_val if datamodule is not None else None
        forces = datamodule.f_val if data is not None else None
        result = evaluate(pl_module, n_samples=self.n_samples, batch_size=self.batch_size,
                          n_bootstrap=self.n_bootstrap, figure_dir=figure_dir, data=data,
                          tag=f"epoch{trainer.current_epoch:04d}", forces=forces)
        pl_module.log_dict({f"eval/{k}": v for k, v in result.metrics.items()}, sync_dist=True)
        if trainer.is_global_zero:
            log_figures(trainer, result.figures, trainer.global_step)
            log.info("epoch %d: ESS %.2f%% %s", trainer.current_epoch, 100 * result.metrics["ess"],
                     {k: round(v["value"], 3) for k, v in result.delta_f.items() if v["value"] is not None})


class RunCheckpoint(ModelCheckpoint):
    """One checkpoint file `<run_dir>/checkpoints/<filename>.ckpt`: the best by `monitor` (lower or
    higher by `mode`), or, without `monitor`, the last one, written after every epoch (Lightning's
    save_last only writes when the monitored checkpoint is written, i.e. not after epochs that got
    worse)."""

    def __init__(self, run_dir: str | Path, filename: str, monitor: str | None = None, mode: str = "min"):
        super().__init__(dirpath=Path(run_dir) / "checkpoints", filename=filename, monitor=monitor, mode=mode,
                         save_top_k=1, every_n_epochs=None if monitor else 1)


class StepTimer(pl.Callback):
    """Wall time of the training batches alone (forward, backward, optimiser step), without
    validation and periodic evaluation: `seconds / steps` is the cost of one training step."""

    def __init__(self, run_dir: str | Path | None = None) -> None:
        self.seconds, self.steps, self._start = 0.0, 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.steps += 1
            self._start = None

    @property
    def seconds_per_step(self) -> float | None:
        return self.seconds / self.steps if self.steps else None
