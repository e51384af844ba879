"""`bgexp-train` for targeted free-energy perturbation experiments (configs with a `tfep` block):
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
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from bgexp import plots
from bgexp.training.callbacks import StepTimer, log_figures
from bgexp.training.resume import AtomicCheckpointIO
from bgexp.training.tfep import StatePairData, StateSamples, TargetedFEP, evaluate_tfep, load_state


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
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = TargetedFEP(flow, target, float(node.temperature_a), optimizer=instantiate(cfg.optim),
                         scheduler=scheduler, random_translations=bool(node.get("random_translations", False)),
                         seed=int(cfg.seed))
    data = StatePairData(state_a, state_b, val_fraction=float(node.val_fraction), batch_size=int(node.batch_size),
                         seed=int(cfg.seed))
    return module, data


def build_tfep_flow(cfg: DictConfig, target):
    """The flow of a targeted-FEP experiment; rigid-body targets give the molecule count and the box."""
    extra = {}
    if hasattr(target, "n_molecules"):
        extra = {"n_molecules": target.n_molecules, "box": [float(v) for v in target.box]}
    return instantiate(cfg.flow.transform, **extra)


def _container(node):
    return None if node is None else OmegaConf.to_container(node, resolve=True)


def run_tfep(cfg: DictConfig, target, run_dir: Path, start: float, logger) -> dict[str, Any]:
    """Train, evaluate and write the results of a targeted-FEP experiment (module docstring)."""
    from bgexp.training.run import ConfigInCheckpoint

    module, data = build_tfep(cfg, target)
    checkpoint_dir = run_dir / "checkpoints"
    timer = StepTimer()
    callbacks = [ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor="val/work", mode="min", save_top_k=1),
                 ModelCheckpoint(dirpath=checkpoint_dir, filename="last", save_top_k=1, every_n_epochs=1), timer,
                 ConfigInCheckpoint(cfg)]
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=str(run_dir),
                                      plugins=[AtomicCheckpointIO()])
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=data, ckpt_path=cfg.get("ckpt_path"))
    training = {"steps": trainer.global_step, "step_s": timer.seconds_per_step,
                "n_parameters": sum(p.numel() for p in module.flow.parameters() if p.requires_grad)}
    return finish_tfep(cfg, target, module, data, run_dir, start, training, logger=logger, trainer=trainer,
                       files={"checkpoint": str(checkpoint_dir / "last.ckpt")})


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
    np.savez(out_dir / "works.npz", **works)
    figures = {"works": str(plot_works(works, data, module, out_dir / "figures" / "works.png"))}
    lfep = evaluation["estimates"]["lfep"]
    results = {
        "experiment": cfg.get("experiment_name"),
        "seed": int(cfg.seed),
        "ess": evaluation["ess_mapped"],
        "n_samples": evaluation["n_samples_a"],
        "delta_f": {f"{cfg.tfep.temperature_a:g}K->{target.temperature:g}K": {
            "value": lfep["value"], "ci_low": lfep["ci95"][0], "ci_high": lfep["ci95"][1], "confidence": 0.95,
            "two_sigma": 2 * lfep["std"], "estimator": "LFEP",
            "reference": reference["value"] if reference else None,
            "reference_source": reference.get("source") if reference else None}},
        "tfep": evaluation,
        "n_energy_evals": {"training": module.n_energy_evals_train, "evaluation": module.n_energy_evals_eval},
        "wall_s": time.time() - start,
        "training": training,
        "figures": figures,
        "files": {**(files or {}), "works": str(out_dir / "works.npz"),
                  "data_a": data_source(cfg.tfep.data_a), "data_b": data_source(cfg.tfep.get("data_b"))},
        **(extra or {}),
    }
    if isinstance(logger, WandbLogger) and trainer is not None:
        scalars = {"final/ess_mapped": evaluation["ess_mapped"]}
        for name, entry in evaluation["estimates"].items():
            scalars[f"final/{name}"] = entry["value"]
            scalars[f"final/{name}_std"] = entry["std"]
        logger.log_metrics(scalars, step=trainer.global_step)
        log_figures(trainer, {f"final_{k}": v for k, v in figures.items()}, trainer.global_step)
        results["files"]["wandb_run"] = str(Path(logger.experiment.dir).parent)
    from bgexp.training.run import write_json_atomic

    path = write_json_atomic(out_dir / "results.json", results)
    print_tfep_summary(path, results)
    return json.loads(path.read_text())


def evaluate_tfep_run(run_dir: str | Path, out_dir: Path, checkpoint: str = "last", n_bootstrap: int | None = None,
                      seed: int | None = None) -> dict[str, Any]:
    """`bgexp-eval` for a targeted-FEP run: rebuild the flow and the data split from the run's own
    config (the held-out frames are the run's), load the checkpoint, evaluate into `out_dir`. The
    training figures (steps, energy evaluations of training) are the run's."""
    from bgexp.training.run import RESOLVED_CONFIG, build_target, checkpoint_path, load_checkpoint_into

    start = time.time()
    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / RESOLVED_CONFIG)
    ckpt = checkpoint_path(run_dir, checkpoint)
    target = build_target(cfg)
    try:
        module, data = build_tfep(cfg, target)
        if checkpoint in ("last", "best"):  # the run's own checkpoint: it belongs to this config
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            module.load_state_dict(state["state_dict"])
            module.on_load_checkpoint(state)
        else:  # another file: checked against the run's target and flow config
            load_checkpoint_into(module, cfg, ckpt)
        module.n_energy_evals_eval = 0
        trained_path = run_dir / "results.json"
        trained = json.loads(trained_path.read_text()) if trained_path.is_file() else {}
        training = trained.get("training", {"steps": None, "step_s": None,
                                            "n_parameters": sum(p.numel() for p in module.flow.parameters())})
        return finish_tfep(cfg, target, module, data, out_dir, start, training, files={"checkpoint": str(ckpt)},
                           n_bootstrap=n_bootstrap, seed=seed, extra={"evaluated_from": str(run_dir)})
    finally:
        close = getattr(target, "close", None)
        if close is not None:
            close()


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


__all__ = ["run_tfep", "finish_tfep", "evaluate_tfep_run", "build_tfep", "build_tfep_flow", "reference_for"]
