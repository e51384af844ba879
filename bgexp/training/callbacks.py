"""Lightning callbacks: checkpoints in the run folder, the step timer, periodic evaluation (ESS,
free energies, figures) during training, and the divergence guard.

The generic ones are listed in the config group `callbacks/` and built by
`bgexp.training.assemble.build_callbacks` with run_dir=<the run folder>; a task adds its own
(the Boltzmann-generator task adds `EvaluationCallback`). `run_guards` are added to every run by
run_experiment: the divergence guard (config block `divergence:`) and the signal handling
(bgexp.training.signals)."""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from bgexp.evaluation import evaluate
from bgexp.training.errors import ConfigError, TrainingDivergedError

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
        # the epoch of the last evaluation and what made its weights unusable (None: nothing),
        # read by DivergenceGuard
        self.last_epoch: int | None = None
        self.last_problem: str | None = None

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
        self.last_epoch, self.last_problem = trainer.current_epoch, result.problem
        pl_module.log_dict({f"eval/{k}": v for k, v in result.metrics.items()}, sync_dist=True)
        if trainer.is_global_zero:
            log_figures(trainer, result.figures, trainer.global_step)
            if result.problem:
                log.warning("epoch %d: %s", trainer.current_epoch, result.problem)
            log.info("epoch %d: ESS %.2f%% %s", trainer.current_epoch, 100 * result.metrics["ess"],
                     {k: round(v["value"], 3) for k, v in result.delta_f.items() if v["value"] is not None})


class RunCheckpoint(ModelCheckpoint):
    """One checkpoint file `<run_dir>/checkpoints/<filename>.ckpt`: the best by `monitor` (lower or
    higher by `mode`), or, without `monitor`, the last one, written after every epoch (Lightning's
    save_last only writes when the monitored checkpoint is written, i.e. not after epochs that got
    worse)."""

    def __init__(self, run_dir: str | Path, filename: str, monitor: str | None = None, mode: str = "min"):
        super().__init__(dirpath=Path(run_dir) / "checkpoints", filename=filename, monitor=monitor, mode=mode,
                         save_top_k=1, every_n_epochs=None if monitor else 1,
                         enable_version_counter=False)  # a resumed copy of a run overwrites its last.ckpt


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


class LossDivergence:
    """Divergence of a loss series: after `min_steps` values, the median of the last `window` values
    (fewer at the start) exceeds the best such median seen so far, which includes the very first
    losses, by more than `growth * max(|best|, floor)`. A median ignores single spikes; comparing
    against the best since the first step also catches a run that explodes within its first window.
    `update(value)` returns a description when diverged, else None."""

    def __init__(self, window: int = 20, growth: float = 1e4, floor: float = 1.0, min_steps: int = 5):
        if window < 1 or min_steps < 1:
            raise ConfigError(f"divergence.window and divergence.min_steps must be >= 1, got {window}, {min_steps}")
        if not growth > 0 or not floor > 0:
            raise ConfigError(f"divergence.growth and divergence.floor must be > 0, got {growth}, {floor}")
        self.window, self.growth, self.floor, self.min_steps = int(window), float(growth), float(floor), int(min_steps)
        self.values: deque[float] = deque(maxlen=self.window)
        self.best = math.inf
        self.n = 0

    def update(self, value: float) -> str | None:
        if not math.isfinite(value):
            return None  # non-finite losses are the non-finite guard's (FlowModule.skip_nonfinite)
        self.values.append(float(value))
        self.n += 1
        median = statistics.median(self.values)
        limit = self.best + self.growth * max(abs(self.best), self.floor)
        if self.n >= self.min_steps and math.isfinite(self.best) and median > limit:
            return (f"the median of the last {len(self.values)} training losses is {median:.4g}, its best was "
                    f"{self.best:.4g} (limit {limit:.4g}: divergence.growth={self.growth:g} times max(|best|, "
                    f"divergence.floor={self.floor:g}))")
        self.best = min(self.best, median)
        return None


class DivergenceGuard(pl.Callback):
    """Stops a run whose training diverges, with `TrainingDivergedError` and advice (config block
    `divergence:`): the training loss grows by orders of magnitude over its early best
    (`LossDivergence`), or `zero_weight_evaluations` periodic evaluations in a row gave every sample
    log-weight -inf (ESS 0; 0 switches that check off). The decision is reduced over DDP ranks, so
    all ranks stop together. Without it such a run went on and failed later with unrelated
    messages from the evaluation."""

    def __init__(self, enabled: bool = True, window: int = 20, growth: float = 1e4, floor: float = 1.0,
                 min_steps: int = 5, zero_weight_evaluations: int = 1, advice: str = ""):
        self.enabled = bool(enabled)
        self.monitor = LossDivergence(window, growth, floor, min_steps)
        if int(zero_weight_evaluations) < 0:
            raise ConfigError(f"divergence.zero_weight_evaluations must be >= 0, got {zero_weight_evaluations}")
        self.zero_weight_evaluations = int(zero_weight_evaluations)
        self.advice = advice
        self._zero_weight_run = 0
        self._seen_epoch: int | None = None

    def _stop(self, trainer: pl.Trainer, what: str | None) -> None:
        if not trainer.strategy.reduce_boolean_decision(what is not None, all=False):
            return
        raise TrainingDivergedError(
            f"training diverged at epoch {trainer.current_epoch}, step {trainer.global_step}: "
            f"{what or 'on another rank'}. {self.advice}".strip())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:  # a skipped (non-finite) step: the same on every rank
            return
        self._stop(trainer, self.monitor.update(float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.enabled or not self.zero_weight_evaluations:
            return
        for callback in trainer.callbacks:
            if isinstance(callback, EvaluationCallback) and callback.last_epoch == trainer.current_epoch \
                    and self._seen_epoch != trainer.current_epoch:
                self._seen_epoch = trainer.current_epoch
                self._zero_weight_run = self._zero_weight_run + 1 if callback.last_problem else 0
                what = None
                if self._zero_weight_run >= self.zero_weight_evaluations:
                    what = (f"{callback.last_problem} (in {self._zero_weight_run} periodic evaluation(s) in a row, "
                            f"divergence.zero_weight_evaluations={self.zero_weight_evaluations})")
                self._stop(trainer, what)


def divergence_advice(cfg: Any) -> str:
    """What to change, with the run's current values."""
    lr = (cfg.get("optim") or {}).get("lr")
    warmup = (cfg.get("loss") or {}).get("nll_warmup_steps")
    return ("Lower the learning rate (optim.lr" + (f", now {lr}" if lr is not None else "") + "), lengthen the "
            "maximum-likelihood warm-up (loss.nll_warmup_steps" + (f", now {warmup}" if warmup is not None else "")
            + ") or clip gradients (trainer.gradient_clip_val), and check the data's scale (finite coordinates "
            "of order one in the target's units, nm for molecules; integer or boolean data have no density). "
            "The thresholds are the config block divergence: (enabled, window, growth, floor, min_steps, "
            "zero_weight_evaluations).")


def run_guards(cfg: Any, run_dir: str | Path) -> list[pl.Callback]:
    """The callbacks every run gets besides conf/callbacks: the divergence guard (`divergence:`) and
    the signal handling (bgexp.training.signals.TerminationCallback)."""
    from bgexp.training.signals import TerminationCallback

    settings = dict(cfg.get("divergence") or {})
    unknown = set(settings) - {"enabled", "window", "growth", "floor", "min_steps", "zero_weight_evaluations"}
    if unknown:
        raise ConfigError(f"divergence: unknown keys {sorted(unknown)} (allowed: enabled, window, growth, floor, "
                          "min_steps, zero_weight_evaluations)")
    return [DivergenceGuard(**settings, advice=divergence_advice(cfg)), TerminationCallback(run_dir)]
