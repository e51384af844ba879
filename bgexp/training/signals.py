"""Ending a run on SIGTERM and SIGINT: `failed.json`, a last checkpoint, a non-zero exit status.

SIGTERM is what `kill`, `timeout`, `docker stop` and a scheduler at its time limit send; SIGINT is
Ctrl-C. `bgexp-train` (bgexp/train.py) installs `terminating_on_signals()` around each run:

- During `trainer.fit` the first signal only asks to stop: Lightning's own signal connector
  notices SIGTERM and raises its `SIGTERMException` at the next step boundary (synchronised over
  DDP ranks); for SIGINT `TerminationCallback` raises `TerminatedError` at the next step
  boundary. Either way the callback's `on_exception` writes `checkpoints/last.ckpt` (through the
  trainer, so atomically: AtomicCheckpointIO) with model, optimiser, scheduler, loop state and the
  bgexp counters; `bgexp-train resume=<run folder>` continues from it.
- Outside `fit` (building the target, data generation before the trainer starts, the final
  evaluation) the first signal raises `TerminatedError` at once, wherever the main thread is
  (as Python's own KeyboardInterrupt would); the OpenMM workers are closed by run_experiment's
  `finally`, and the last epoch's checkpoint, if any, is the one to resume from.
- A second signal stops at once (`TerminatedError(forced=True)`), also during fit, and then no
  checkpoint is written (the step may be half done; the previous last.ckpt stays, intact).

`TerminatedError` is a BaseException (like KeyboardInterrupt), so no `except Exception` on the way
up swallows it. bgexp-train writes failed.json (reason: terminated) and exits with 128 + the
signal number (143, 130); see bgexp/train.py for what that means for a sweep.

SLURM: Lightning's SLURMEnvironment auto-requeue plugin keeps working unchanged: it owns the
requeue signal (SIGUSR1, `#SBATCH --signal=SIGUSR1@90`), which bgexp never touches, and it composes
its SIGTERM handlers with the one installed here (Lightning keeps an existing handler and calls it
after its own), so on SIGUSR1 Lightning saves its hpc checkpoint and requeues the job, and the
SIGTERM that SLURM sends when it ends the job ends the run as above.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException

from bgexp.training.errors import TerminatedError

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
TERMINATED = "terminated"  # the `reason` in failed.json

_active: "Termination | None" = None


class Termination:
    """The signal state of one run (module docstring): which signal came first, how many came,
    and whether the trainer is fitting (then the first signal only asks to stop)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self.fitting = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, frame: Any = None) -> None:
        self.count += 1
        if self.signum is None:
            self.signum = int(signum)
        name = signal.Signals(signum).name
        if self.fitting and self.count == 1:
            log.warning("%s received: training stops at the next step boundary, writes checkpoints/last.ckpt "
                        "and failed.json (send it again to stop at once, without a checkpoint)", name)
            return
        raise TerminatedError(self.signum, forced=self.fitting or self.count > 1,
                              where="during training" if self.fitting else "")

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set in the main thread (e.g. not in a joblib thread)
        for signum in SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self.handle)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


def active() -> Termination | None:
    """The Termination installed by `terminating_on_signals` (None outside bgexp-train)."""
    return _active


@contextmanager
def terminating_on_signals() -> Iterator[Termination]:
    """SIGTERM and SIGINT end the enclosed run with `TerminatedError` (module docstring)."""
    global _active
    previous, termination = _active, Termination()
    termination.install()
    _active = termination
    try:
        yield termination
    finally:
        termination.uninstall()
        _active = previous


def as_terminated(err: BaseException) -> TerminatedError | None:
    """The TerminatedError that `err` stands for: itself, or Lightning's SIGTERMException (a
    SystemExit raised by its loops after SIGTERM); None for anything else."""
    if isinstance(err, TerminatedError):
        return err
    if isinstance(err, SIGTERMException):
        termination = active()
        signum = termination.signum if termination is not None and termination.signum else signal.SIGTERM
        return TerminatedError(signum, where="during training")
    return None


class TerminationCallback(pl.Callback):
    """Stops `fit` at a step boundary after a signal and writes `<run_dir>/checkpoints/last.ckpt`
    (module docstring). Added to every run by run_experiment, independent of conf/callbacks."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "checkpoints" / "last.ckpt"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if active() is not None:
            active().fitting = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if active() is not None:
            active().fitting = False

    def _stop_if_asked(self, trainer: pl.Trainer) -> None:
        termination = active()
        # SIGTERM: Lightning's own loops raise SIGTERMException, synchronised over DDP ranks
        if termination is not None and termination.requested and not trainer.received_sigterm:
            raise TerminatedError(termination.signum, where="during training")

    def on_train_start(self, trainer, pl_module) -> None:
        termination = active()
        if termination is not None and termination.requested:  # a signal during the data set-up
            raise TerminatedError(termination.signum, where="before the first training step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stop_if_asked(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop_if_asked(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        terminated = as_terminated(exception)
        if terminated is None or terminated.forced:
            return
        try:
            trainer.save_checkpoint(self.path)
        except Exception as err:  # noqa: BLE001 (the run ends anyway; say why there is no new checkpoint)
            log.error("stopped by %s, but the checkpoint %s could not be written (%s: %s); resume starts from "
                      "the previous one", terminated.signal_name, self.path, type(err).__name__, err)
            return
        log.warning("stopped by %s at epoch %d, step %d: wrote %s", terminated.signal_name, trainer.current_epoch,
                    trainer.global_step, self.path)


__all__ = ["Termination", "TerminationCallback", "terminating_on_signals", "active", "as_terminated", "SIGNALS",
           "TERMINATED"]
