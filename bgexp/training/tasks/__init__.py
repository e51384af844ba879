"""Tasks: the kinds of experiment `bgexp-train` runs (config group `task/`).

A task builds its LightningModule and data module from the composed config, adds the callbacks
only it needs, turns the trained module into one `Results` (bgexp/training/artifacts.py), and
serves `bgexp-eval` and `bgexp-sample` on its run folders. `run_experiment`
(bgexp/training/run.py) owns everything else (seeding, run folder, logger, generic callbacks, fit,
W&B, failure records).

    bg     Boltzmann generator: prior + flow trained against the target (tasks/bg.py)
    tfep   targeted free-energy perturbation between two states (tasks/tfep.py)

A new task is one module here with a `Task` subclass and one file conf/task/<name>.yaml naming it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig

from bgexp.training.allowlist import ForbiddenTargetError, check_config, get_class
from bgexp.training.errors import ConfigError, UnsupportedOperationError


@dataclass
class FitContext:
    """What a task needs to finish a run: the config, the fitted trainer and module, its data, the
    run folder, the wall-clock start and the logger (False when none)."""

    cfg: DictConfig
    trainer: pl.Trainer
    module: pl.LightningModule
    datamodule: pl.LightningDataModule
    run_dir: Path
    start: float
    logger: Any


class Task(ABC):
    """One kind of experiment (module docstring). `monitor` is the validation metric that picks
    checkpoints/best.ckpt (lower is better)."""

    name: str = "task"

    def __init__(self, name: str | None = None, monitor: str = "val/loss"):
        self.name = name or self.name
        self.monitor = monitor

    @abstractmethod
    def build(self, cfg: DictConfig, target) -> tuple[pl.LightningModule, pl.LightningDataModule]:
        """The module and the (set-up) data module of this task."""

    def callbacks(self, cfg: DictConfig, run_dir: Path) -> list[pl.Callback]:
        """Callbacks only this task needs (the generic ones come from conf/callbacks)."""
        return []

    @abstractmethod
    def finish(self, fit: FitContext) -> dict[str, Any]:
        """Evaluate the trained module, write results.json (rank zero) and return its content."""

    @abstractmethod
    def evaluate_run(self, run_dir: Path, out_dir: Path, settings: DictConfig) -> dict[str, Any]:
        """`bgexp-eval`: re-evaluate a run's checkpoint into `out_dir`/results.json."""

    def sample_run(self, run_dir: Path, settings: DictConfig) -> Path:
        """`bgexp-sample`: write samples of a run's model; refused by tasks that cannot sample."""
        raise UnsupportedOperationError(f"bgexp-sample: a run of task {self.name!r} has no model to sample from "
                                        f"(use bgexp-eval run_dir={run_dir})")


def training_block(fit: FitContext) -> dict[str, Any]:
    """results.json's `training` block: optimiser steps (read from checkpoints/last.ckpt when this
    process did none: under ddp_spawn the workers did them), seconds per training step (StepTimer,
    when it is among the callbacks) and trainable parameters of the flow."""
    from bgexp.training.artifacts import read_checkpoint
    from bgexp.training.callbacks import StepTimer

    steps, last = fit.trainer.global_step, fit.run_dir / "checkpoints" / "last.ckpt"
    if not steps and last.is_file():
        steps = int(read_checkpoint(last)["global_step"])
    timer = next((c for c in fit.trainer.callbacks if isinstance(c, StepTimer)), None)
    return {"steps": steps, "step_s": timer.seconds_per_step if timer is not None else None,
            "n_parameters": sum(p.numel() for p in fit.module.flow.parameters() if p.requires_grad)}


def build_task(cfg: DictConfig) -> Task:
    """The task of a composed or stored config (`task._target_`). Configs of runs written before the
    task group existed have none: those with a `tfep` block are targeted-FEP runs, the others
    Boltzmann-generator runs.

    Every entry point calls this first, so it is where a config's `_target_`s are checked, all of
    them, against the allow-list (bgexp/training/allowlist.py): a ForbiddenTargetError before any
    data generation, MD or training."""
    node = cfg.get("task")
    if node is None:
        path = "bgexp.training.tasks.tfep.TargetedFEPTask" if cfg.get("tfep") else "bgexp.training.tasks.bg.BoltzmannGeneratorTask"
        node = {"_target_": path}
    target = node.get("_target_") if isinstance(node, (dict, DictConfig)) else None
    if not target:
        raise ConfigError("task: needs `_target_` (a bgexp.training.tasks.Task class); choose one with task=bg|tfep")
    try:
        cls = get_class(str(target), "task._target_",
                        hint="it is not a bgexp.training.tasks.Task subclass under the allowed prefixes")
    except ForbiddenTargetError:
        raise
    except Exception as err:
        raise ConfigError(f"task._target_={target!r} cannot be imported: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"task._target_={target!r} is not a bgexp.training.tasks.Task subclass")
    check_config(cfg)
    kwargs = {k: v for k, v in node.items() if k != "_target_"}
    return cls(**kwargs)


__all__ = ["Task", "FitContext", "build_task", "training_block"]
