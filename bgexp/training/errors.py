"""Named errors of the training floor (a leaf: imported by the builders, the artifacts and the tasks)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing or inconsistent (the message names the key and what was expected)."""


class ResultsError(ValueError):
    """A results.json does not follow the results schema (bgexp.training.artifacts.Results)."""


class UnsupportedOperationError(ValueError):
    """A run of this task cannot do what was asked (e.g. `bgexp-sample` on a targeted-FEP run)."""




class TrainingDivergedError(RuntimeError):
    """Training diverged: the loss grew by orders of magnitude over its early best, or every
    log-weight of a periodic evaluation was -inf (bgexp.training.callbacks.DivergenceGuard). The
    message says what was seen and what to change (optim.lr, loss.nll_warmup_steps, the data's scale)."""


class TerminatedError(BaseException):
    """The run was stopped by a signal: SIGTERM (kill, timeout, docker stop, a scheduler's time
    limit) or SIGINT (Ctrl-C); see bgexp.training.signals. A BaseException like KeyboardInterrupt,
    so that no `except Exception` on the way up swallows the request to stop. `exit_status` is the
    shell's convention, 128 + the signal number (143 for SIGTERM, 130 for SIGINT); `forced` is set
    for a repeated signal, which stops at once (no checkpoint is written then)."""

    def __init__(self, signum: int, forced: bool = False, where: str = ""):
        import signal

        self.signum, self.forced = int(signum), bool(forced)
        self.signal_name = signal.Signals(self.signum).name
        super().__init__(f"stopped by {self.signal_name}" + (f" {where}" if where else "")
                         + (" (repeated signal: stopped at once)" if forced else ""))

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


__all__ = ["ConfigError", "ResultsError", "UnsupportedOperationError", "TrainingDivergedError", "TerminatedError"]
