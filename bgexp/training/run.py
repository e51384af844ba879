"""`run_experiment(cfg)`: what `bgexp-train` does with a composed config, for every task.

It owns what all tasks share: the launch check, resuming, the run folder and its resolved config,
seeding, the target's lifetime (OpenMM workers closed however the run ends), the logger, the
generic callbacks (conf/callbacks) plus the task's own, the Lightning fit, `wandb.finish` in one
`finally`, and the failure record of a sweep member (`failed.json`). What differs between tasks
(module, data, evaluation, results) is the task's (bgexp/training/tasks, config group `task/`).
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bgexp.atomic import write_json_atomic
from bgexp.training.artifacts import FAILURE_FILE, ConfigInCheckpoint, read_checkpoint
from bgexp.training.assemble import build_callbacks, build_logger, build_target
from bgexp.training.callbacks import run_guards
from bgexp.training.launch import check_parallel_launch, is_multirun
from bgexp.training.resume import (AtomicCheckpointIO, absolute_config, check_checkpoint_fits, check_output_dir,
                                   record_resume, resumed_config, write_run_config)
from bgexp.training.tasks import FitContext, Task, build_task
from bgexp.training.validation import validate_config



def run_dir_of(cfg: DictConfig) -> Path:
    """The run folder: Hydra's output folder inside a Hydra app, else `paths.output_dir`."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def _task_overrides() -> list[str]:
    """The command line's overrides of this job (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _config_groups() -> list[str]:
    """The config groups of this job (task, target, flow, loss, experiment, ...; empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [g for g in HydraConfig.get().runtime.choices if not str(g).startswith("hydra/")]


def run_experiment(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate the experiment of `cfg` in its run folder; the content of results.json
    (empty on ranks other than zero)."""
    check_parallel_launch(OmegaConf.to_container(cfg.trainer, resolve=True), is_multirun())
    start = time.time()
    check_output_dir(cfg)  # an empty (BGEXP_OUTPUT_DIR=) or unusable output folder fails before any work
    # resume=<run folder>: that run's config and last.ckpt (experiment=, ckpt_path=, group choices refused)
    cfg = resumed_config(cfg, _task_overrides(), _config_groups())
    validate_config(cfg, mode="train")  # every config-value error before any data, MD or training (< 5 s)
    cfg = absolute_config(cfg)  # resolved; stored paths hold from any working directory
    task = build_task(cfg)
    if cfg.get("ckpt_path"):
        read_checkpoint(cfg.ckpt_path, cfg)  # a foreign, corrupt or crafted file fails before any work
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    if not cfg.get("resume"):
        write_run_config(run_dir, cfg)  # once, by the fresh run; a resume records itself once checked (_fit)
    target = build_target(cfg)
    try:  # an OpenMM target owns worker processes: closed however training ends (errors, Ctrl-C)
        return _fit(cfg, task, target, run_dir, start)
    finally:
        target.close()


def _fit(cfg: DictConfig, task: Task, target, run_dir: Path, start: float) -> dict[str, Any]:
    module, datamodule = task.build(cfg, target)
    _check_resume(cfg, module, run_dir)
    logger = build_logger(cfg, run_dir)
    callbacks = [*build_callbacks(cfg, run_dir), ConfigInCheckpoint(cfg), *task.callbacks(cfg, run_dir),
                 *run_guards(cfg, run_dir)]  # divergence guard, signals (bgexp.training.signals)
    exit_code = 1
    try:
        trainer: pl.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks,
                                          default_root_dir=str(run_dir), plugins=[AtomicCheckpointIO()])
        if logger:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        results = task.finish(FitContext(cfg, trainer, module, datamodule, run_dir, start, logger))
        exit_code = 0
        return results
    finally:
        _finish_wandb(logger, exit_code)


def _check_resume(cfg: DictConfig, module, run_dir: Path) -> None:
    """The checkpoint loads into the module built from this config; a resume, so checked
    completely, then writes its own record beside the run's original config (resumes/<stamp>/)."""
    if cfg.get("ckpt_path"):
        check_checkpoint_fits(module, cfg.ckpt_path)
    if cfg.get("resume"):
        record_resume(run_dir, cfg, _task_overrides())


def _finish_wandb(logger, exit_code: int) -> None:
    """One W&B run per job, closed even when training fails (multirun members must not share one)."""
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        import wandb

        wandb.finish(exit_code=exit_code)


def write_failure(cfg: DictConfig, err: BaseException, **extra: Any) -> Path:
    """`failed.json` (the error, its traceback and `extra`, e.g. reason="terminated") in the run
    folder of a run that failed."""
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / FAILURE_FILE
    write_json_atomic(path, {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(), **extra})
    return path


def train(cfg: DictConfig) -> dict[str, Any]:
    """Alias of `run_experiment` (the name `bgexp-train` and older scripts use)."""
    return run_experiment(cfg)


__all__ = ["run_experiment", "train", "run_dir_of", "write_failure", "FAILURE_FILE"]
