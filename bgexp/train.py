"""`bgexp-train`: train a Boltzmann generator from a Hydra config (see conf/).

The return value (for Hydra sweepers such as Optuna) is `optimized_metric` read from the run's
results.json. In a multirun (`-m`), a member that fails writes `failed.json` (the error and its
traceback) into its run folder and lets the other members finish: it returns NaN to the basic,
joblib and submitit launchers, and raises under the Optuna sweeper, which records the trial as
FAIL (optuna 2.x refuses NaN values). `bgexp-summarize` lists it as failed. A single run that
fails exits with the error.
"""

from __future__ import annotations

import logging
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
    from bgexp.training.artifacts import objective
    from bgexp.training.run import run_dir_of, run_experiment, write_failure

    try:
        results = run_experiment(cfg)
    except Exception as err:
        from bgexp.training.launch import UnsupportedLaunchError, is_multirun

        if not is_multirun() or isinstance(err, UnsupportedLaunchError):
            raise  # a single run, or a sweep that cannot work at all (every member would fail alike)
        path = write_failure(cfg, err)
        log.error("this sweep member failed (%s: %s); the sweep goes on. Details: %s", type(err).__name__, err, path)
        if _is_optuna():
            raise  # optuna 2.x rejects NaN values; a raised trial is recorded as FAIL and the search goes on
        return float("nan")
    if not results:  # not rank zero
        return None
    metric = str(cfg.get("optimized_metric") or "ess")
    value = objective(results, metric)
    if value != value and _is_optuna():  # NaN: the metric is missing or undefined in this run
        raise ValueError(f"optimized_metric={metric!r} is missing or undefined in {run_dir_of(cfg) / 'results.json'}")
    return value


if __name__ == "__main__":
    main()
