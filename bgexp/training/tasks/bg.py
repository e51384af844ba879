"""The Boltzmann-generator task (`task=bg`): prior + flow trained against the target by the
configured loss (maximum likelihood, reverse KL, joint, force or flow matching), evaluated by
importance sampling (bgexp/evaluation): ESS, Delta F with bootstrap CIs against the reference,
profiles, surfaces, held-out NLL. Writes results.json, samples.npz (and samples.dcd for molecular
targets), figures, and the W&B summary.
"""

from __future__ import annotations

import math

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bgexp.atomic import atomic_write
from bgexp.estimators import ess
from bgexp.evaluation import Evaluation, draw_samples, evaluate
from bgexp.evaluation.samples import canonical_region, importance_log_weights
from bgexp.evaluation.refinement import SMCSettings, smc_block, smc_figures
from bgexp.targets.base import MolecularTarget
from bgexp.training.artifacts import (
    RESULTS_FILE,
    Results,
    checkpoint_path,
    config_hash,
    load_checkpoint_into,
    write_results,
)
from bgexp.training.assemble import (
    build_datamodule,
    build_model,
    build_target,
    load_run_config,
)
from bgexp.training.callbacks import EvaluationCallback, log_figures
from bgexp.training.errors import ConfigError
from bgexp.training.module import BoltzmannGenerator
from bgexp.training.tasks import FitContext, Task, training_block
from bgexp.training.tasks.temperatures import evaluate_at_temperatures
from bgexp.training.validation import check_flow_on_target


class BoltzmannGeneratorTask(Task):
    name = "bg"

    def __init__(self, name: str | None = None, monitor: str = "val/nll"):
        super().__init__(name, monitor)

    def build(self, cfg: DictConfig, target):
        smc_settings(cfg)  # a bad smc setting fails here, before data and training
        # the flow on the target's space (its layers unfitted), before any data or MD: validate_config
        # builds only the cheap targets, so a flow that cannot act on an OpenMM target fails here
        check_flow_on_target(cfg, target)
        datamodule = build_datamodule(cfg, target)
        datamodule.setup()
        return build_model(cfg, target, data=datamodule.x_train), datamodule

    def callbacks(self, cfg: DictConfig, run_dir: Path):
        ev = cfg.evaluation
        return [EvaluationCallback(every_n_epochs=ev.every_n_epochs, n_samples=ev.n_samples, batch_size=ev.batch_size,
                                   n_bootstrap=ev.n_bootstrap, figure_dir=str(run_dir / "figures"))]

    def finish(self, fit: FitContext) -> dict[str, Any]:
        """Final evaluation on rank zero: samples.npz, figures, W&B summary, results.json."""
        trainer, model, datamodule, cfg = fit.trainer, fit.module, fit.datamodule, fit.cfg
        if not trainer.is_global_zero:
            return {}
        # energy evaluations of all ranks: logged summed over ranks (the main process of ddp_spawn and
        # rank zero of ddp only count their own, or none)
        synced = trainer.callback_metrics.get("train/energy_evals")
        if synced is not None:
            model.n_energy_evals_train = max(model.n_energy_evals_train, int(float(synced)))
        evaluation = final_evaluation(cfg, model, datamodule.x_val, fit.run_dir, forces=datamodule.f_val)
        refined = refine_by_smc(cfg, model, evaluation, fit.run_dir / "figures", data=datamodule.x_train,
                                heldout=datamodule.x_val)
        temperatures = evaluate_at_temperatures(cfg, model, fit.run_dir / "figures")
        if temperatures:
            refined["temperatures"] = temperatures
        checkpoint_dir = fit.run_dir / "checkpoints"
        files: dict[str, Any] = {"checkpoint": str(checkpoint_dir / "last.ckpt"), "data": datamodule.source}
        if cfg.get("save_samples", True):
            files.update(write_samples(model, evaluation, fit.run_dir))
        wandb_dir = log_final(fit, evaluation, refined) if _is_wandb(fit.logger) else None
        if wandb_dir:
            files["wandb_run"] = wandb_dir
        results = results_of(cfg, model, evaluation, time.time() - fit.start, files,
                             {"training": training_block(fit), **refined})
        path = fit.run_dir / RESULTS_FILE
        written = write_results(path, results)
        print_summary(path, written, wandb_dir)
        return written

    def evaluate_run(self, run_dir: Path, out_dir: Path, settings: DictConfig) -> dict[str, Any]:
        start = time.time()
        run_cfg, model, ckpt = load_run(run_dir, settings.checkpoint)
        try:
            model.seed = int(settings.seed)
            datamodule = build_datamodule(run_cfg, model.target)
            datamodule.progress = False
            datamodule.setup()
            data = datamodule.x_val if settings.get("n_data") is None else datamodule.x_val[: int(settings.n_data)]
            evaluation = evaluate(model, n_samples=settings.n_samples, batch_size=settings.batch_size,
                                  n_bootstrap=settings.n_bootstrap, confidence=settings.confidence, data=data,
                                  figure_dir=out_dir / "figures")
            refined = refine_by_smc(settings, model, evaluation, out_dir / "figures", data=datamodule.x_train,
                                    heldout=datamodule.x_val)
            files = {"checkpoint": str(ckpt), "data": datamodule.source}
            results = results_of(run_cfg, model, evaluation, time.time() - start, files,
                                 {"evaluated_from": str(run_dir), **refined})
            path = out_dir / RESULTS_FILE
            written = write_results(path, results)
            print_summary(path, written, None)
            return written
        finally:
            model.target.close()

    def sample_run(self, run_dir: Path, settings: DictConfig) -> Path:
        """N flow samples with log q, reduced energies and log-weights log w = -u - log q as .npz
        (weight zero outside the canonical region of relabelled particles), with a progress bar."""
        _, model, _ = load_run(run_dir, settings.checkpoint)
        try:
            generator = torch.Generator().manual_seed(int(settings.seed))
            x, log_q, u = draw_samples(model, int(settings.n_samples), int(settings.batch_size), generator,
                                       progress=bool(settings.get("progress", True)))
            log_w = importance_log_weights(u, log_q, canonical_region(model.target, x))
        finally:
            model.target.close()
        out = Path(settings.out) if settings.get("out") else Path(run_dir) / f"samples-{time.strftime('%Y%m%d-%H%M%S')}.npz"
        if out.suffix != ".npz":  # the printed path is the file's (np.savez would append .npz silently)
            out = out.with_name(out.name + ".npz")
        arrays = {"x": x.numpy(), "log_q": log_q.double().numpy(), "energy": u.double().numpy(), "log_w": log_w}
        atomic_write(out, lambda f: np.savez(f, **arrays))
        print(f"wrote {len(x)} samples (ESS {100 * ess(log_w):.2f}%) to {out}", flush=True)
        return out


# pieces of finish ----------------------------------------------------------------------------------
def final_evaluation(cfg: DictConfig, model: BoltzmannGenerator, data: torch.Tensor | None,
                     run_dir: Path, forces: torch.Tensor | None = None) -> Evaluation:
    """The final evaluation; `forces` (the reduced forces of `data`) add the force-matching error."""
    ev = cfg.evaluation
    n_data = ev.get("final_n_data")  # held-out frames for the NLL and the histograms (None: all)
    if data is not None and n_data is not None:
        data = data[: int(n_data)]
        forces = None if forces is None else forces[: int(n_data)]
    return evaluate(model, n_samples=ev.final_n_samples, batch_size=ev.batch_size,
                    n_bootstrap=ev.final_n_bootstrap, confidence=ev.confidence, data=data,
                    figure_dir=run_dir / "figures", forces=forces)


def smc_settings(cfg: DictConfig) -> SMCSettings | None:
    """The `smc` group's settings (None when it is off: no group, or smc.enabled=false), checked."""
    node = cfg.get("smc")
    if node is None:
        return None
    try:
        settings = SMCSettings(**OmegaConf.to_container(node, resolve=True))
    except TypeError as err:  # an unknown key
        raise ConfigError(f"smc: {err} (keys: {sorted(SMCSettings.__dataclass_fields__)})") from err
    return settings if settings.enabled else None


def refine_by_smc(cfg: DictConfig, model: BoltzmannGenerator, evaluation: Evaluation, figure_dir: Path,
                  data: torch.Tensor | None = None, heldout: torch.Tensor | None = None) -> dict:
    """The `smc` block of results.json (empty when smc is off; `data`: the training frames the MCMC
    baseline starts from; `heldout`: all held-out frames, whose energies the samplers' energy W2
    is measured against: energies only, so not limited by n_data, which bounds the NLL's solves);
    its figures join the evaluation's."""
    settings = smc_settings(cfg)
    if settings is None:
        return {}
    block = smc_block(model, settings, seed=int(cfg.seed), data=data, heldout=heldout)
    evaluation.figures.update(smc_figures(block, figure_dir, model.target))
    return {"smc": block}


def results_of(cfg: DictConfig, model: BoltzmannGenerator, evaluation: Evaluation, wall_s: float,
               files: dict[str, Any], blocks: dict[str, Any]) -> Results:
    metrics = evaluation.metrics
    n_energy_evals = {"training": model.n_energy_evals_train, "evaluation": model.n_energy_evals_eval}
    if "smc" in blocks:
        n_energy_evals["smc"] = int(blocks["smc"]["flow"]["n_energy_evals"])
    return Results(
        experiment=cfg.get("experiment_name"), config_hash=config_hash(cfg), seed=int(cfg.seed), ess=metrics["ess"],
        n_samples=int(metrics["n_samples"]), delta_f=evaluation.delta_f, nll_test=metrics.get("nll_test"),
        n_energy_evals=n_energy_evals,
        wall_s=wall_s, figures=evaluation.figures, files=files,
        blocks={"n_nonfinite_energies": int(metrics["n_nonfinite_energies"]), "metrics": metrics, **blocks})


def write_samples(model: BoltzmannGenerator, evaluation: Evaluation, run_dir: Path) -> dict[str, str]:
    """samples.npz (x, log_q, energy, log_w) and, for molecular targets, samples.dcd."""
    samples_path = run_dir / "samples.npz"
    atomic_write(samples_path, lambda f: np.savez(f, **evaluation.samples))
    files = {"samples": str(samples_path)}
    if isinstance(model.target, MolecularTarget):
        files.update(write_sample_trajectory(model.target, evaluation.samples, run_dir))
    return files


def write_sample_trajectory(target: MolecularTarget, samples: dict[str, np.ndarray], run_dir: Path,
                            max_frames: int = 2000) -> dict[str, str]:
    """Flow samples of a molecular target as samples.dcd + samples_topology.pdb (VMD, PyMOL):
    the first `max_frames` samples with finite energy, in nm, superposed on the structure."""
    import mdtraj

    x, u = samples["x"], samples.get("energy")
    keep = np.isfinite(u) if u is not None else np.ones(len(x), dtype=bool)
    xyz = x[keep][:max_frames].reshape(-1, target.dim // 3, 3).astype(np.float32)
    top = mdtraj.Topology.from_openmm(target.topology)
    reference = mdtraj.Trajectory(np.asarray(target.positions, dtype=np.float32)[None], top)
    traj = mdtraj.Trajectory(xyz, top).superpose(reference)
    top_path, dcd_path = run_dir / "samples_topology.pdb", run_dir / "samples.dcd"
    reference.save_pdb(str(top_path))
    traj.save_dcd(str(dcd_path))
    return {"samples_trajectory": str(dcd_path), "samples_topology": str(top_path)}


def _is_wandb(logger) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


def log_final(fit: FitContext, evaluation: Evaluation, refined: dict[str, Any]) -> str:
    """The final scalars (with the SMC refinement's) and figures into the W&B run; returns the W&B
    run folder."""
    trainer, model = fit.trainer, fit.module
    scalars = {f"final/{k}": v for k, v in evaluation.metrics.items()}
    scalars.update(smc_scalars(refined.get("smc")))
    scalars.update({"final/wall_s": time.time() - fit.start,
                    "final/energy_evals_training": float(model.n_energy_evals_train),
                    "final/energy_evals_evaluation": float(model.n_energy_evals_eval)})
    fit.logger.log_metrics(scalars, step=trainer.global_step)
    log_figures(trainer, {f"final_{k}": v for k, v in evaluation.figures.items()}, trainer.global_step)
    return str(Path(fit.logger.experiment.dir).parent)


def smc_scalars(block: dict[str, Any] | None) -> dict[str, float]:
    """final/smc/<source>/... scalars: Delta F with its interval, the mean final ESS, energy evaluations."""
    scalars: dict[str, float] = {}
    if not block:
        return scalars
    for source in ("flow", *block["settings"]["baselines"]):
        entry = block.get(source, {})
        for name, estimate in entry.get("delta_f", {}).items():
            for key in ("value", "ci_low", "ci_high", "error"):
                if estimate.get(key) is not None:
                    scalars[f"final/smc/{source}/delta_f/{name}/{key}"] = float(estimate[key])
        for state, value in entry.get("ess", {}).items():
            scalars[f"final/smc/{source}/ess/{state}"] = float(value)
        if "n_energy_evals" in entry:
            scalars[f"final/smc/{source}/energy_evals"] = float(entry["n_energy_evals"])
        w2 = entry.get("energy_w2")
        if w2 is not None:  # an interval over replicates (SMC) or one value (MCMC)
            value = w2["value"] if isinstance(w2, dict) else w2
            if value is not None and math.isfinite(value):
                scalars[f"final/smc/{source}/energy_w2"] = float(value)
        for name, estimate in entry.get("bidirectional", {}).get("delta_f", {}).items():
            for key in ("value", "ci_low", "ci_high", "error"):
                if estimate.get(key) is not None:
                    scalars[f"final/smc/{source}/bidirectional/delta_f/{name}/{key}"] = float(estimate[key])
        for name, value in (entry.get("observables") or {}).get("pooled", {}).items():
            scalars[f"final/smc/{source}/{name}"] = float(value)  # profile/<obs>/rmse, surface/<name>/kl
    return scalars


def _smc_lines(block: dict[str, Any]) -> list[str]:
    lines = []
    labels = {"flow": "SMC from the flow", "prior": "SMC from the prior", "mcmc": "MCMC from the data"}
    for source in ("flow", *block["settings"]["baselines"]):
        entry = block.get(source, {})
        ess = ", ".join(f"{k} {100 * v:.0f}%" for k, v in entry.get("ess", {}).items())
        for name, e in entry.get("delta_f", {}).items():
            text = (f"{labels[source]}: Delta F({name}) = {e['value']:.3f} kT, {100 * e['confidence']:.0f}% CI "
                    f"[{e['ci_low']:.3f}, {e['ci_high']:.3f}]" if e["value"] is not None
                    else f"{labels[source]}: Delta F({name}) undefined (a state lost all weight)")
            if e.get("reference") is not None:
                text += f"; reference {e['reference']:.3f} kT"
            lines.append(f"{text} ({'final ESS ' + ess + '; ' if ess else ''}{entry['n_energy_evals']} energy evaluations)")
        w2 = entry.get("energy_w2")
        if w2 is not None:
            lines.append(f"{labels[source]}: {_w2_text(w2)}" + ("" if entry.get("delta_f") else
                         f" ({'final ESS ' + ess + '; ' if ess else ''}{entry['n_energy_evals']} energy evaluations)"))
        for name, e in entry.get("bidirectional", {}).get("delta_f", {}).items():
            text = (f"Bidirectional AIS + BAR (flow, data): Delta F({name}) = {e['value']:.3f} kT, "
                    f"{100 * e['confidence']:.0f}% CI [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"
                    if e["value"] is not None else f"Bidirectional AIS + BAR: Delta F({name}) undefined")
            if e.get("reference") is not None:
                text += f"; reference {e['reference']:.3f} kT"
            lines.append(f"{text} ({entry['bidirectional']['n_energy_evals']} energy evaluations)")
        observables = entry.get("observables")
        if observables:
            pooled = ", ".join(f"{k} {v:.4g}" for k, v in observables["pooled"].items())
            lines.append(f"{labels[source]}, observables ({sum(observables['n_configurations'])} weighted "
                         f"configurations, replicates pooled): {pooled}")
    return lines


def _w2_text(w2: dict[str, Any] | float) -> str:
    """The energy W2 to the held-out frames: an interval over SMC replicates, or the MCMC's one value."""
    if isinstance(w2, dict):
        if w2.get("value") is None or not math.isfinite(w2["value"]):
            return "energy W2 to held-out data undefined"
        return (f"energy W2 to held-out data {w2['value']:.3f} kT, {100 * w2['confidence']:.0f}% CI "
                f"[{w2['ci_low']:.3f}, {w2['ci_high']:.3f}] over {len(w2['replicates'])} replicates")
    return "energy W2 to held-out data " + (f"{w2:.3f} kT" if math.isfinite(w2) else "undefined")


def print_summary(path: Path, results: dict[str, Any], wandb_dir: str | None) -> None:
    lines = [f"ESS: {100 * results['ess']:.2f}% of {results['n_samples']} samples"]
    for name, entry in results["delta_f"].items():
        value = entry.get("value")
        if value is None:
            lines.append(f"Delta F({name}): undefined (a state has no sample)")
            continue
        text = (f"Delta F({name}) = {value:.3f} kT, {100 * entry['confidence']:.0f}% CI "
                f"[{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]")
        if entry.get("reference") is not None:
            text += f"; reference {entry['reference']:.3f} kT"
        lines.append(text)
    if results.get("smc"):
        lines += _smc_lines(results["smc"])
        floor = results["smc"].get("data_energy_w2")
        if floor and "value" in floor:
            lines.append(f"Training frames ({floor['n_frames']} per set): {_w2_text(floor)}")
    if results.get("nll_test") is not None:
        lines.append(f"NLL (held-out data): {results['nll_test']:.3f}")
    lines.append(f"results: {path}")
    if wandb_dir:
        lines.append(f"W&B offline run: {wandb_dir}  (upload with: wandb sync {wandb_dir})")
    print("\n".join(lines), flush=True)


# run folders -------------------------------------------------------------------------------------
def load_run(run_dir: str | Path, checkpoint: str = "last") -> tuple[DictConfig, BoltzmannGenerator, Path]:
    """Rebuild the Boltzmann generator of a finished (or killed) run from its folder and load a
    checkpoint: "last", "best" or a path to a .ckpt file (which must come from a run with the same
    target and flow config)."""
    cfg = load_run_config(run_dir)
    ckpt = checkpoint_path(run_dir, checkpoint)
    target = build_target(cfg)
    model = build_model(cfg, target)
    load_checkpoint_into(model, cfg, ckpt)
    model.eval()
    return cfg, model, ckpt


__all__ = ["BoltzmannGeneratorTask", "final_evaluation", "load_run", "print_summary", "write_sample_trajectory"]
