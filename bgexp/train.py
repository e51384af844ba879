"""`bgexp-train`: train a Boltzmann generator from a Hydra config (see conf/).

The return value (for Hydra sweepers such as Optuna) is `optimized_metric` read from the run's
results.json. In a multirun (`-m`), a member that fails writes `failed.json` (the error and its
traceback) into its run folder and lets the other members finish: it returns NaN to the basic,
joblib and submitit launchers, and raises under the Optuna sweeper, which records the trial as
FAIL (optuna 2.x refuses NaN values). `bgexp-summarize` lists it as failed. A single run that
fails exits with the error. A config error that involves none of the keys the sweep varies (a bad
`optimized_metric`, a typo in a fixed key) stops the sweep at its first member: every member
would fail alike; so does a ResumeError (`-m resume=<run>`: resume each member on its own).

The config's values, ranges, unknown keys and optimized_metric are checked first, before Lightning,
torch and the flows are imported (the import-free pass of validate_config: about a second for
the whole command instead of the seconds those imports take); the rest of the check follows in
run_experiment.

A run that diverges (bgexp.training.callbacks.DivergenceGuard) ends with `TrainingDivergedError`
and writes `failed.json` with reason "diverged", also as a single run; in a sweep the other
members go on (a diverging learning rate is an ordinary outcome of a sweep over it).

Signals (bgexp.training.signals): SIGTERM (kill, timeout, docker stop, a scheduler's time limit)
and SIGINT (Ctrl-C) end the run with `failed.json` (reason "terminated", the signal, and the
command that resumes it), `checkpoints/last.ckpt` written at the next step boundary, and exit
status 128 + the signal number (143, 130). `bgexp-train resume=<run folder>` completes the run;
a later success removes the failed.json.
In a sweep a signal stops the whole sweep, with that status: the remaining members are not
launched. A SIGTERM means the job's time is up or its owner wants it stopped (Ctrl-C, docker
stop, scancel), not that one configuration is bad: starting the next member would only be killed
in turn (SIGKILL follows SIGTERM after a grace period) and would leave a member without a
checkpoint. The interrupted member has failed.json and last.ckpt, finished members have
results.json, unstarted ones have no folder, and the non-zero status tells the caller. To finish
the sweep, resume the interrupted member and launch the unstarted ones again (Optuna: rerun the
same study; the trial is recorded as FAIL). On SLURM, Lightning's SLURMEnvironment auto-requeue
(SIGUSR1, `#SBATCH --signal=SIGUSR1@90`) still saves its hpc checkpoint and requeues the job;
bgexp leaves that signal to Lightning. With the joblib or submitit launchers signal every process
of the job (SLURM does; `kill -TERM -<process group>`), since the members run in other processes.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger(__name__)


def _is_optuna() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and "optuna" in str(HydraConfig.get().sweeper.get("_target_", "")).lower()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        _check_values_first(cfg)
    except Exception as err:  # noqa: BLE001 (handled as a failure of the run in _failed)
        return _failed(cfg, err)
    from bgexp.training.signals import terminating_on_signals

    with terminating_on_signals():
        return _main(cfg)


def _check_values_first(cfg: DictConfig) -> None:
    """The import-free pass of validate_config, before Lightning, torch and the flows are imported
    (seconds): a bad value, range, unknown key or optimized_metric is reported in well under a
    second. A resumed run is checked after its stored config is merged (run_experiment)."""
    if cfg.get("resume"):
        return
    from bgexp.training.validation import validate_config

    validate_config(cfg, mode="train", quick=True)


def swept_keys(argv: list[str] | None = None) -> set[str]:
    """The config keys a sweep varies: the command line's sweep overrides (`a=1,2`, `range()`,
    `choice()`, ...) and the Optuna sweeper's `params`."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    keys: set[str] = set()
    try:
        keys.update(o.key_or_group for o in OverridesParser.create().parse_overrides(args) if o.is_sweep_override())
    except Exception:  # noqa: BLE001 - unparsable arguments: Hydra itself reported them
        pass
    if HydraConfig.initialized():
        keys.update(str(k) for k in (HydraConfig.get().sweeper.get("params") or {}))
    return {k.lstrip("+~") for k in keys}


def _fails_alike(err: BaseException) -> bool:
    """A config error that involves no key the sweep varies: every member would fail alike, so the
    sweep stops at its first member instead of failing each one (e.g. a bad optimized_metric)."""
    from bgexp.training.validation import InvalidConfigError

    if not isinstance(err, InvalidConfigError):
        return False
    swept = swept_keys()
    return not any(k == s or k.startswith(s + ".") or s.startswith(k + ".") for k in err.keys() for s in swept)


def _failed(cfg: DictConfig, err: Exception) -> float:
    """A run that failed with `err`: raised (a single run, or a sweep that cannot work at all), or
    recorded in failed.json while the sweep goes on (module docstring)."""
    from bgexp.training.errors import TrainingDivergedError
    from bgexp.training.launch import UnsupportedLaunchError, is_multirun
    from bgexp.training.resume import ResumeError

    diverged = isinstance(err, TrainingDivergedError)
    path = None
    if diverged:
        from bgexp.training.run import write_failure

        path = write_failure(cfg, err, reason="diverged")
        log.error("the run diverged; details in %s", path)
    if not is_multirun() or isinstance(err, (UnsupportedLaunchError, ResumeError)) or _fails_alike(err):
        raise err  # a single run, or a sweep that cannot work at all (every member would fail alike)
    if not diverged:
        from bgexp.training.run import write_failure

        path = write_failure(cfg, err)
    log.error("this sweep member failed (%s: %s); the sweep goes on. Details: %s", type(err).__name__, err, path)
    if _is_optuna():
        raise err  # optuna 2.x rejects NaN values; a raised trial is recorded as FAIL and the search goes on
    return float("nan")


def _main(cfg: DictConfig) -> float | None:
    from bgexp.training.artifacts import objective
    from bgexp.training.launch import is_multirun
    from bgexp.training.run import FAILURE_FILE, run_dir_of, run_experiment, write_failure
    from bgexp.training.signals import TERMINATED, as_terminated

    try:
        results = run_experiment(cfg)
    except BaseException as err:
        terminated = as_terminated(err)
        if terminated is not None:  # SIGTERM / SIGINT: stop this run, and a sweep (module docstring)
            run_dir = run_dir_of(cfg)
            path = write_failure(cfg, terminated, reason=TERMINATED, signal=terminated.signal_name,
                                 resume=f"bgexp-train resume={run_dir}")
            log.error("%s: the run stopped (exit status %d); failed.json: %s; continue it with: bgexp-train "
                      "resume=%s%s", terminated, terminated.exit_status, path, run_dir,
                      " (the rest of the sweep is not launched)" if is_multirun() else "")
            raise SystemExit(terminated.exit_status) from None
        if not isinstance(err, Exception):
            raise
        return _failed(cfg, err)
    if not results:  # not rank zero
        return None
    (run_dir_of(cfg) / FAILURE_FILE).unlink(missing_ok=True)  # a resumed run that completed has not failed
    metric = str(cfg.get("optimized_metric") or "ess")
    value = objective(results, metric)
    if value != value and _is_optuna():  # NaN: the metric is missing or undefined in this run
        raise ValueError(f"optimized_metric={metric!r} is missing or undefined in {run_dir_of(cfg) / 'results.json'}")
    return value


if __name__ == "__main__":
    main()
