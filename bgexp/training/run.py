"""Build everything from a composed config and run training or evaluation.

`train(cfg)` is what `bgexp-train` calls: build target -> data -> prior + flow -> loss -> module,
fit with Lightning, evaluate the final model, write results.json into the run folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
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

from bgexp.flows.base import AffineStandardization, SequentialFlow
from bgexp.flows.coordinates import BoundedTorsions, MixedCoordinates, ZMatrix
from bgexp.training.callbacks import EvaluationCallback, StepTimer, log_figures
from bgexp.training.data import TargetDataModule
from bgexp.training.evaluation import Evaluation, evaluate
from bgexp.training.launch import check_parallel_launch, is_multirun
from bgexp.training.module import BoltzmannGenerator
# RESOLVED_CONFIG: the fully resolved config of a run, next to Hydra's .hydra/config.yaml
from bgexp.training.resume import RESOLVED_CONFIG, AtomicCheckpointIO, resumed_config, wandb_run_id

log = logging.getLogger(__name__)

# the parts of a config that fix the model's structure: a checkpoint only fits a config whose
# parts agree
MODEL_KEYS = ("target", "flow")


class ConfigError(ValueError):
    """A configuration value is missing or inconsistent."""


def config_hash(cfg: DictConfig) -> str:
    """sha256 of the resolved config without the parts that do not change results (hydra, paths,
    logger, ckpt_path, resume, optimized_metric, data.cache_dir); first 12 hex digits."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in ("hydra", "paths", "ckpt_path", "logger", "resume", "optimized_metric"):
        container.pop(key, None)
    container.get("data", {}).pop("cache_dir", None)
    blob = json.dumps(container, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _without_name(node: DictConfig) -> dict[str, Any]:
    d = OmegaConf.to_container(node, resolve=True)
    d.pop("name", None)
    return d


def build_target(cfg: DictConfig):
    if "target" not in cfg or cfg.target is None:
        raise ConfigError("config has no `target`: choose one with target=<name>")
    return instantiate(_without_name(cfg.target))


def build_coordinates(node: dict[str, Any], target, data: torch.Tensor | None):
    """The mixed internal/Cartesian representation of a molecular target (flow.coordinates).

    `cartesian` is an mdtraj selection string (e.g. "backbone", "name N or name CA or name C")
    or a list of atom indices; all other atoms get internal coordinates from a Z-matrix built
    from the topology's bonds. With `whiten`, the Cartesian block is whitened by PCA on `data`.
    """
    topology = getattr(target, "topology", None)
    if topology is None:
        raise ConfigError(f"flow.coordinates needs a molecular target with a topology; "
                          f"{type(target).__name__} has none (use a flow without coordinates)")
    import mdtraj

    md_top = mdtraj.Topology.from_openmm(topology) if not isinstance(topology, mdtraj.Topology) else topology
    selection = node.get("cartesian", "backbone")
    if isinstance(selection, str):
        try:
            cartesian = md_top.select(selection)
        except Exception as err:
            raise ConfigError(f"flow.coordinates.cartesian={selection!r} is not a valid mdtraj selection: {err}") from err
    else:
        cartesian = np.asarray(selection, dtype=int)
    if len(cartesian) < 3:
        raise ConfigError(f"flow.coordinates.cartesian={selection!r} selects {len(cartesian)} atoms; at least 3 "
                          f"are needed to fix the rigid-body frame")
    coordinates = MixedCoordinates(ZMatrix.from_topology(md_top, cartesian=cartesian),
                                   whiten=bool(node.get("whiten", True)))
    if data is not None:
        coordinates.fit(data.double())
    return coordinates


def build_model(cfg: DictConfig, target, data: torch.Tensor | None = None) -> BoltzmannGenerator:
    """Prior + flow + target + loss.

    The flow is [transform (RealNVP, ...)] -> [AffineStandardization if flow.standardize] ->
    [BoundedTorsions, MixedCoordinates if flow.coordinates]. With `flow.torus`, the angles (all
    features of a target without coordinates, else the torsions) are circular: the transform and
    the prior get `circular`, angles are not standardized and BoundedTorsions is left out. The transform works in the latent width: the
    target's dimension, or 3N - 6 with coordinates. The standardization is fitted to the training
    data (in feature space when there are coordinates), x = mean + std * y; when loading a
    checkpoint, its fitted buffers come from the checkpoint instead."""
    flow_cfg = OmegaConf.to_container(cfg.flow, resolve=True)
    transform = dict(flow_cfg["transform"])
    coordinates = None
    if flow_cfg.get("coordinates"):
        coordinates = build_coordinates(flow_cfg["coordinates"], target, data)
    latent_dim = coordinates.dim if coordinates is not None else target.dim
    dim = transform.pop("dim", None)
    if dim is not None and int(dim) != latent_dim:
        raise ConfigError(
            f"flow.transform.dim={dim} does not match the latent dimension {latent_dim} of target "
            f"{cfg.target.get('name', '')!r}; remove flow.transform.dim or set it to {latent_dim}"
        )
    circular = None
    if flow_cfg.get("torus", False):
        # angles live on the circle: every feature of a target without coordinates, the torsions
        # with coordinates; the transform treats them as circular and the prior is uniform on them
        circular = (coordinates.circular.clone() if coordinates is not None
                    else torch.ones(latent_dim, dtype=torch.bool))
        transform["circular"] = circular
    layers = [instantiate(transform, dim=latent_dim)]
    # on the real line, torsions are squeezed into (-pi, pi): one preimage per configuration, so
    # that log q is exact; torus flows map the circle onto itself and need no squeezing
    bounded = None
    if coordinates is not None and circular is None:
        bounded = BoundedTorsions(coordinates.circular)
    if flow_cfg.get("standardize", False):
        standardization = AffineStandardization(latent_dim)
        if data is not None:
            with torch.no_grad():
                features = data
                if coordinates is not None:
                    features = coordinates.inverse(data.double())[0]
                    if bounded is not None:
                        features = bounded.inverse(features)[0]
                    features = features.to(data.dtype)
            standardization.fit(features)
        if circular is not None:  # angles are not standardized (a shift or scale would leave the circle)
            standardization.mean[circular] = 0.0
            standardization.std[circular] = 1.0
        layers.append(standardization)
    if bounded is not None:
        layers.append(bounded)
    if coordinates is not None:
        layers.append(coordinates.to(torch.get_default_dtype()))
    flow = layers[0] if len(layers) == 1 else SequentialFlow(layers)
    prior_kwargs = {}
    if circular is not None:
        if not str(flow_cfg["prior"].get("_target_", "")).endswith("TorusPrior"):
            raise ConfigError(f"flow.torus needs a prior on the circle: set flow.prior._target_ to "
                              f"bgexp.flows.TorusPrior (got {flow_cfg['prior'].get('_target_')!r})")
        prior_kwargs = {"circular": circular}
    prior = instantiate(flow_cfg["prior"], dim=latent_dim, **prior_kwargs)
    loss = instantiate(cfg.loss)
    return BoltzmannGenerator(
        prior=prior,
        flow=flow,
        target=target,
        loss=loss,
        optimizer=instantiate(cfg.optim),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        seed=cfg.seed,
        max_consecutive_nonfinite=cfg.max_consecutive_nonfinite,
    )


def build_datamodule(cfg: DictConfig, target) -> TargetDataModule:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return TargetDataModule(target, target_config=OmegaConf.to_container(cfg.target, resolve=True), **data)


def build_logger(cfg: DictConfig, run_dir: Path | None = None):
    """The configured logger; a W&B logger gets the run folder's own run id (`wandb_run_id`) with
    resume="allow", so that a resumed run continues the same W&B run."""
    node = cfg.get("logger")
    if not node or "_target_" not in node:
        return False
    if run_dir is not None and str(node["_target_"]).endswith("WandbLogger"):
        return instantiate(node, id=wandb_run_id(run_dir), resume="allow", **_sweep_labels(node))
    return instantiate(node)


def _sweep_labels(node: DictConfig) -> dict[str, Any]:
    """In a multirun: the W&B run is named <name>-<member number> and tagged sweep:<sweep stamp>, so a
    dashboard groups a sweep's runs (they are grouped by experiment already)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hydra_cfg = HydraConfig.get()
    tags = list(node.get("tags") or []) + [f"sweep:{Path(hydra_cfg.sweep.dir).name}"]
    return {"name": f"{node.get('name') or 'run'}-{hydra_cfg.job.num}", "tags": tags}


def _task_overrides() -> list[str]:
    """The command line's overrides of this job (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _differences(a: Any, b: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    """Dotted keys where two nested config containers differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{prefix}.{k}")
        return out
    return [] if a == b else [(prefix, a, b)]


def check_checkpoint_config(checkpoint: dict[str, Any], cfg: DictConfig, path: Path) -> None:
    """A checkpoint written under another target/flow config is refused with the differing keys."""
    stored = checkpoint.get("bgexp_config")
    if stored is None:
        raise ConfigError(f"checkpoint {path} was not written by bgexp (no stored config)")
    diffs = []
    for key in MODEL_KEYS:
        a = stored.get(key)
        b = OmegaConf.to_container(cfg[key], resolve=True) if key in cfg else None
        diffs += [f"{name}: checkpoint has {x!r}, config has {y!r}" for name, x, y in _differences(a, b, key)]
    if diffs:
        raise ConfigError(f"checkpoint {path} comes from another configuration:\n  " + "\n  ".join(diffs))


class ConfigInCheckpoint(pl.Callback):
    """Store the resolved config in every checkpoint, so a checkpoint says what it belongs to."""

    def __init__(self, cfg: DictConfig):
        self.container = OmegaConf.to_container(cfg, resolve=True)
        self.container.pop("hydra", None)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["bgexp_config"] = self.container


def read_checkpoint(path: str | Path, cfg: DictConfig) -> dict[str, Any]:
    """Load a checkpoint and check it belongs to `cfg`; clear errors for missing/corrupt/foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise ConfigError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict)")
    check_checkpoint_config(checkpoint, cfg, path)
    return checkpoint


def load_checkpoint_into(model: BoltzmannGenerator, cfg: DictConfig, path: str | Path) -> dict[str, Any]:
    checkpoint = read_checkpoint(path, cfg)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise ConfigError(f"checkpoint {path} does not fit the model: {err}") from err
    model.on_load_checkpoint(checkpoint)
    return checkpoint


def objective(results: dict[str, Any], metric: str) -> float:
    """The number a sweep optimises, read from a run's results.json (`optimized_metric`).

    `metric` is a dotted path into results.json ("ess", "nll_test", "metrics.kl_quadrature",
    "delta_f.C7eq->C7ax.value"; a key may itself contain dots only if it is the last part), or
    "abs_delta_f_error": |Delta F - reference| of the first free-energy difference that has a
    reference. A prefix "abs:" takes the absolute value. Missing or undefined values are NaN, which
    a sweeper records as a failed trial."""
    take_abs = metric.startswith("abs:")
    path = metric[4:] if take_abs else metric
    if path == "abs_delta_f_error":
        errors = [entry.get("error") for entry in results.get("delta_f", {}).values() if entry.get("error") is not None]
        return abs(float(errors[0])) if errors else float("nan")
    node: Any = results
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict):
            return float("nan")
        if part not in node:
            rest = ".".join(parts[i:])  # keys such as "surface/ramachandran/kl" or with dots
            node = node.get(rest)
            break
        node = node[part]
    if not isinstance(node, (int, float)) or isinstance(node, bool) or node is None:
        return float("nan")
    value = float(node)
    return abs(value) if take_abs else value


def run_dir_of(cfg: DictConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_results(run_dir: Path, cfg: DictConfig, model: BoltzmannGenerator, evaluation: Evaluation,
                  wall_s: float, extra: dict[str, Any] | None = None, name: str = "results.json") -> Path:
    """results.json as in ARCHITECTURE.md (Contracts)."""
    metrics = evaluation.metrics
    results = {
        "experiment": cfg.get("experiment_name"),
        "config_hash": config_hash(cfg),
        "seed": int(cfg.seed),
        "ess": metrics["ess"],
        "n_samples": int(metrics["n_samples"]),
        "delta_f": evaluation.delta_f,
        "nll_test": metrics.get("nll_test"),
        "n_energy_evals": {"training": model.n_energy_evals_train, "evaluation": model.n_energy_evals_eval},
        "n_nonfinite_energies": int(metrics["n_nonfinite_energies"]),
        "wall_s": wall_s,
        "metrics": metrics,
        "figures": evaluation.figures,
    }
    results.update(extra or {})
    return write_json_atomic(run_dir / name, results)


def write_json_atomic(path: Path, results: dict[str, Any]) -> Path:
    """`results` as JSON (non-finite floats as null) written to a temporary file and renamed, so a
    reader never sees a half-written file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_json_safe(results), indent=2))
    tmp.replace(path)
    return path


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


def train(cfg: DictConfig) -> dict[str, Any]:
    check_parallel_launch(OmegaConf.to_container(cfg.trainer, resolve=True), is_multirun())
    start = time.time()
    cfg = resumed_config(cfg, _task_overrides())  # resume=<run folder>: that run's config and last.ckpt
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    OmegaConf.save(OmegaConf.create(resolved), run_dir / RESOLVED_CONFIG)
    target = build_target(cfg)
    try:  # an OpenMM target owns worker processes: closed however training ends (errors, Ctrl-C)
        return _train(cfg, target, run_dir, start)
    finally:
        if hasattr(target, "close"):
            target.close()


def _train(cfg: DictConfig, target, run_dir: Path, start: float) -> dict[str, Any]:
    if cfg.get("tfep"):  # targeted free-energy perturbation between two states (bgexp/training/tfep_run.py)
        return _train_tfep(cfg, target, run_dir, start)
    datamodule = build_datamodule(cfg, target)
    datamodule.setup()
    model = build_model(cfg, target, data=datamodule.x_train)
    if cfg.get("ckpt_path"):
        read_checkpoint(cfg.ckpt_path, cfg)  # fail before training on a foreign or corrupt file
    logger = build_logger(cfg, run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    callbacks: list[pl.Callback] = [
        # best.ckpt by held-out NLL; last.ckpt after every epoch (Lightning's save_last only
        # writes when the monitored checkpoint is written, i.e. not after epochs that got worse)
        ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor="val/nll", mode="min", save_top_k=1),
        ModelCheckpoint(dirpath=checkpoint_dir, filename="last", save_top_k=1, every_n_epochs=1),
        ConfigInCheckpoint(cfg),
        StepTimer(),
        EvaluationCallback(every_n_epochs=cfg.evaluation.every_n_epochs, n_samples=cfg.evaluation.n_samples,
                           batch_size=cfg.evaluation.batch_size, n_bootstrap=cfg.evaluation.n_bootstrap,
                           figure_dir=str(run_dir / "figures")),
    ]
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks,
                                      default_root_dir=str(run_dir), plugins=[AtomicCheckpointIO()])
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    is_wandb = isinstance(logger, WandbLogger)
    exit_code = 1
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        results = finish_run(cfg, trainer, model, datamodule, logger if is_wandb else None, run_dir,
                             checkpoint_dir, start)
        exit_code = 0
        return results
    finally:
        if is_wandb:  # one W&B run per job, closed even when training fails
            import wandb

            wandb.finish(exit_code=exit_code)


def _train_tfep(cfg: DictConfig, target, run_dir: Path, start: float) -> dict[str, Any]:
    from bgexp.training.tfep_run import run_tfep

    logger = build_logger(cfg, run_dir)
    exit_code = 1
    try:
        results = run_tfep(cfg, target, run_dir, start, logger)
        exit_code = 0
        return results
    finally:
        if isinstance(logger, WandbLogger):
            import wandb

            wandb.finish(exit_code=exit_code)


def finish_run(cfg: DictConfig, trainer: pl.Trainer, model: BoltzmannGenerator, datamodule: TargetDataModule,
               wandb_logger: WandbLogger | None, run_dir: Path, checkpoint_dir: Path,
               start: float) -> dict[str, Any]:
    """Final evaluation on rank zero: samples.npz, figures, W&B summary, results.json."""
    if not trainer.is_global_zero:
        return {}
    # energy evaluations of all ranks: logged summed over ranks (the main process of ddp_spawn and
    # rank zero of ddp only count their own, or none)
    synced = trainer.callback_metrics.get("train/energy_evals")
    if synced is not None:
        model.n_energy_evals_train = max(model.n_energy_evals_train, int(float(synced)))
    evaluation = final_evaluation(cfg, model, datamodule.x_val, run_dir, forces=getattr(datamodule, "f_val", None))
    files: dict[str, Any] = {"checkpoint": str(checkpoint_dir / "last.ckpt"), "data": datamodule.source}
    if cfg.get("save_samples", True):
        samples_path = run_dir / "samples.npz"
        np.savez(samples_path, **evaluation.samples)
        files["samples"] = str(samples_path)
        if getattr(model.target, "topology", None) is not None:
            files.update(write_sample_trajectory(model.target, evaluation.samples, run_dir))
    wandb_dir = None
    if wandb_logger is not None:
        scalars = {f"final/{k}": v for k, v in evaluation.metrics.items()}
        scalars.update({"final/wall_s": time.time() - start,
                        "final/energy_evals_training": float(model.n_energy_evals_train),
                        "final/energy_evals_evaluation": float(model.n_energy_evals_eval)})
        wandb_logger.log_metrics(scalars, step=trainer.global_step)
        log_figures(trainer, {f"final_{k}": v for k, v in evaluation.figures.items()}, trainer.global_step)
        wandb_dir = str(Path(wandb_logger.experiment.dir).parent)
        files["wandb_run"] = wandb_dir
    timer = next((c for c in trainer.callbacks if isinstance(c, StepTimer)), None)
    steps = trainer.global_step
    if not steps and (checkpoint_dir / "last.ckpt").is_file():  # ddp_spawn: the workers did the steps
        steps = int(torch.load(checkpoint_dir / "last.ckpt", map_location="cpu", weights_only=False)["global_step"])
    training = {"steps": steps,
                "step_s": timer.seconds_per_step if timer is not None else None,
                "n_parameters": sum(p.numel() for p in model.flow.parameters() if p.requires_grad)}
    path = write_results(run_dir, cfg, model, evaluation, wall_s=time.time() - start,
                         extra={"files": files, "training": training})
    results = json.loads(path.read_text())
    print_summary(path, results, wandb_dir)
    return results


def write_sample_trajectory(target, samples: dict[str, np.ndarray], run_dir: Path,
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


def print_summary(path: Path, results: dict[str, Any], wandb_dir: str | None) -> None:
    lines = [f"ESS: {100 * results['ess']:.2f}% of {results['n_samples']} samples"]
    for name, entry in results["delta_f"].items():
        value = entry.get("value")
        if value is None:
            lines.append(f"Delta F({name}): undefined (a state has no sample)")
            continue
        text = f"Delta F({name}) = {value:.3f} kT, {100 * entry['confidence']:.0f}% CI [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"
        if entry.get("reference") is not None:
            text += f"; reference {entry['reference']:.3f} kT"
        lines.append(text)
    if results.get("nll_test") is not None:
        lines.append(f"NLL (held-out data): {results['nll_test']:.3f}")
    lines.append(f"results: {path}")
    if wandb_dir:
        lines.append(f"W&B offline run: {wandb_dir}  (upload with: wandb sync {wandb_dir})")
    print("\n".join(lines), flush=True)


def checkpoint_path(run_dir: str | Path, checkpoint: str) -> Path:
    """The file of `checkpoint`: "last" or "best" of the run folder, or else a path."""
    return Path(run_dir) / "checkpoints" / f"{checkpoint}.ckpt" if checkpoint in ("last", "best") else Path(checkpoint)


def load_run(run_dir: str | Path, checkpoint: str = "last") -> tuple[DictConfig, BoltzmannGenerator, Path]:
    """Rebuild the model of a finished (or killed) run from its folder and load a checkpoint.

    `checkpoint` is "last", "best" or a path to a .ckpt file (which must come from a run with the
    same target and flow config)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / RESOLVED_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a bgexp run folder (no {RESOLVED_CONFIG})")
    cfg = OmegaConf.load(cfg_path)
    ckpt = checkpoint_path(run_dir, checkpoint)
    target = build_target(cfg)
    model = build_model(cfg, target)
    load_checkpoint_into(model, cfg, ckpt)
    model.eval()
    return cfg, model, ckpt
