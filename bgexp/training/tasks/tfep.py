"""The targeted free-energy perturbation task (`task=tfep`, settings in the config's `tfep` block):
MD samples of state A (and B) -> a rigid-body (or any) flow trained by the mapped work -> LFEP,
LBAR and the plain FEP/BAR baselines with bootstrap error bars, against the reference.

Writes into the run folder: results.json (the estimates, the ESS of the mapped samples, energy
evaluations, wall time, the reference and whether 2 sigma covers it), works.npz (the forward and
reverse works), figures/works.png (work distributions, mapped against plain), checkpoints, and
logs to the configured logger (W&B offline by default) under train/, val/ and final/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from bgexp.evaluation import plots
from bgexp.atomic import atomic_write
from bgexp.training.artifacts import (RESULTS_FILE, Results, checkpoint_path, config_hash, load_checkpoint_into,
                                      write_results)
from bgexp.training.allowlist import instantiate
from bgexp.training.assemble import build_target, build_transform, load_run_config
from bgexp.training.callbacks import log_figures
from bgexp.training.tasks import FitContext, Task, training_block
from bgexp.training.tfep import StatePairData, StateSamples, TargetedFEP, evaluate_tfep, load_state


class TargetedFEPTask(Task):
    """Train a map from state A onto the target's state B by the mapped work; LFEP/LBAR against plain
    FEP/BAR (module docstring). Checkpoints: best by the held-out mean work."""

    name = "tfep"

    def __init__(self, name: str | None = None, monitor: str = "val/work"):
        super().__init__(name, monitor)

    def build(self, cfg: DictConfig, target):
        return build_tfep(cfg, target)

    def finish(self, fit: FitContext) -> dict[str, Any]:
        return finish_tfep(fit.cfg, fit.module.target, fit.module, fit.datamodule, fit.run_dir, fit.start,
                           training_block(fit),
                           logger=fit.logger, trainer=fit.trainer,
                           files={"checkpoint": str(fit.run_dir / "checkpoints" / "last.ckpt")})

    def evaluate_run(self, run_dir: Path, out_dir: Path, settings: DictConfig) -> dict[str, Any]:
        return evaluate_tfep_run(run_dir, out_dir, checkpoint=settings.checkpoint, n_bootstrap=settings.n_bootstrap,
                                 seed=settings.seed)


def reference_for(cfg: DictConfig, target) -> dict[str, Any] | None:
    """The reference Delta f of this pair of states: `tfep.references` keyed by the target temperature."""
    table = cfg.tfep.get("references") or {}
    for key, value in table.items():
        if abs(float(key) - float(target.temperature)) < 1e-6:
            return OmegaConf.to_container(value, resolve=True)
    return None


def build_tfep(cfg: DictConfig, target) -> tuple[TargetedFEP, StatePairData]:
    node = cfg.tfep
    state_a = load_state(target, node.data_a.path, md=_container(node.data_a.get("md")),
                         temperature=float(node.temperature_a), max_frames=node.data_a.get("max_frames"))
    state_b = None
    if node.get("data_b") and node.data_b.get("path"):
        state_b = load_state(target, node.data_b.path, md=_container(node.data_b.get("md")),
                             max_frames=node.data_b.get("max_frames"))
    flow = build_tfep_flow(cfg, target)
    scheduler = instantiate(cfg.scheduler, where="scheduler") if cfg.get("scheduler") else None
    module = TargetedFEP(flow, target, float(node.temperature_a), optimizer=instantiate(cfg.optim, where="optim"),
                         scheduler=scheduler, random_translations=bool(node.get("random_translations", False)),
                         seed=int(cfg.seed), max_consecutive_nonfinite=int(cfg.max_consecutive_nonfinite))
    data = StatePairData(state_a, state_b, val_fraction=float(node.val_fraction), batch_size=int(node.batch_size),
                         seed=int(cfg.seed))
    return module, data


def build_tfep_flow(cfg: DictConfig, target):
    """The flow of a targeted-FEP experiment, built on the target's space (a rigid-body target gives
    the molecule count and the box)."""
    return build_transform(cfg.flow.transform, target.space)


def _container(node):
    return None if node is None else OmegaConf.to_container(node, resolve=True)


def finish_tfep(cfg: DictConfig, target, module: TargetedFEP, data: StatePairData, out_dir: Path, start: float,
                training: dict[str, Any], logger=None, trainer: pl.Trainer | None = None,
                files: dict[str, Any] | None = None, n_bootstrap: int | None = None, seed: int | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a trained map (LFEP on the held-out frames of A, LBAR with the frames of B, plain
    FEP/BAR) and write results.json, works.npz and figures/works.png into `out_dir`."""
    reference = reference_for(cfg, target)
    seed = int(cfg.seed if seed is None else seed)
    held_out = StateSamples(data.x_val, data.u_val, "held-out frames of state A")
    evaluation = evaluate_tfep(module, held_out, data.state_b, batch_size=int(cfg.tfep.eval_batch_size),
                               n_boot=int(cfg.tfep.n_bootstrap if n_bootstrap is None else n_bootstrap),
                               seed=seed, reference=reference)
    works = evaluation.pop("works")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "works.npz", lambda f: np.savez(f, **works))
    figures = {"works": str(plot_works(works, data, module, out_dir / "figures" / "works.png"))}
    lfep = evaluation["estimates"]["lfep"]
    delta_f = {f"{cfg.tfep.temperature_a:g}K->{target.temperature:g}K": {
            "value": lfep["value"], "ci_low": lfep["ci95"][0], "ci_high": lfep["ci95"][1], "confidence": 0.95,
            "two_sigma": 2 * lfep["std"], "estimator": "LFEP",
            "reference": reference["value"] if reference else None,
            "reference_source": reference.get("source") if reference else None}}
    files = {**(files or {}), "works": str(out_dir / "works.npz"),
             "data_a": data_source(cfg.tfep.data_a), "data_b": data_source(cfg.tfep.get("data_b"))}
    if isinstance(logger, WandbLogger) and trainer is not None:
        scalars = {"final/ess_mapped": evaluation["ess_mapped"]}
        for name, entry in evaluation["estimates"].items():
            scalars[f"final/{name}"] = entry["value"]
            scalars[f"final/{name}_std"] = entry["std"]
        logger.log_metrics(scalars, step=trainer.global_step)
        log_figures(trainer, {f"final_{k}": v for k, v in figures.items()}, trainer.global_step)
        files["wandb_run"] = str(Path(logger.experiment.dir).parent)
    # nll_test: the map has no density of the target's data (it transports samples of A)
    results = Results(experiment=cfg.get("experiment_name"), config_hash=config_hash(cfg), seed=int(cfg.seed),
                      ess=evaluation["ess_mapped"], n_samples=evaluation["n_samples_a"], delta_f=delta_f, nll_test=None,
                      n_energy_evals={"training": module.n_energy_evals_train, "evaluation": module.n_energy_evals_eval},
                      wall_s=time.time() - start, figures=figures, files=files,
                      blocks={"tfep": evaluation, "training": training, **(extra or {})})
    path = out_dir / RESULTS_FILE
    written = write_results(path, results)
    print_tfep_summary(path, written)
    return written


def evaluate_tfep_run(run_dir: str | Path, out_dir: Path, checkpoint: str = "last", n_bootstrap: int | None = None,
                      seed: int | None = None) -> dict[str, Any]:
    """`bgexp-eval` for a targeted-FEP run: rebuild the flow and the data split from the run's own
    config (the held-out frames are the run's), load the checkpoint, evaluate into `out_dir`. The
    training figures (steps, energy evaluations of training) are the run's."""
    start = time.time()
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ckpt = checkpoint_path(run_dir, checkpoint)
    target = build_target(cfg)
    try:
        module, data = build_tfep(cfg, target)
        # the run's own checkpoint belongs to this config; another file is checked against the run's
        # target and flow config
        load_checkpoint_into(module, None if checkpoint in ("last", "best") else cfg, ckpt)
        module.n_energy_evals_eval = 0
        trained_path = run_dir / "results.json"
        trained = json.loads(trained_path.read_text()) if trained_path.is_file() else {}
        training = trained.get("training", {"steps": None, "step_s": None,
                                            "n_parameters": sum(p.numel() for p in module.flow.parameters())})
        return finish_tfep(cfg, target, module, data, out_dir, start, training, files={"checkpoint": str(ckpt)},
                           n_bootstrap=n_bootstrap, seed=seed, extra={"evaluated_from": str(run_dir)})
    finally:
        target.close()


def data_source(node) -> str | None:
    return None if not node else str(node.get("path"))


def plot_works(works: dict[str, np.ndarray], data: StatePairData, module: TargetedFEP, path: Path) -> Path:
    """Forward works with the map and without it, and minus the reverse works (their overlap is what
    BAR needs; the better the map, the narrower and the closer together)."""
    beta_difference = 1.0 / module.kbt_b - 1.0 / module.kbt_a
    values = {"W_F mapped": works["forward"], "W_F plain": data.u_val.double().numpy() * beta_difference}
    if "reverse" in works:
        values["-W_R mapped"] = -works["reverse"]
    path.parent.mkdir(parents=True, exist_ok=True)
    return plots.plot_observable_histogram(values, path, xlabel="work [kT]", clip_quantile=0.995,
                                           title="forward and reverse works")


def print_tfep_summary(path: Path, results: dict[str, Any]) -> None:
    lines = [f"ESS of the mapped samples: {100 * results['ess']:.2f}% of {results['n_samples']}"]
    reference = results["tfep"].get("reference")
    for name, entry in results["tfep"]["estimates"].items():
        if entry["value"] is None:
            lines.append(f"{entry['estimator']}: undefined")
            continue
        text = f"{entry['estimator']}: Delta f = {entry['value']:.3f} +- {2 * (entry['std'] or float('nan')):.3f} (2 sigma)"
        if reference:
            text += f"; reference {reference['value']:.3f} +- {2 * reference.get('std', 0.0):.3f}"
        lines.append(text)
    lines.append(f"results: {path}")
    print("\n".join(lines), flush=True)


__all__ = ["TargetedFEPTask", "finish_tfep", "evaluate_tfep_run", "build_tfep", "build_tfep_flow", "reference_for"]
