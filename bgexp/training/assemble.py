"""Builders from a composed config: target, flow recipe, model, data module, logger, callbacks.

The flow recipe (conf/flow/*.yaml), read from the target's side:

    layers:     representation layers, each a factory (space, data, topology, ...) -> (layer, next space)
                (bgexp/flows/representation.py: internal_coordinates, bounded_torsions, standardization)
    transform:  the trainable bijection, a factory (space, ...) -> Flow on the last space
    prior:      the latent density, built with space= the last space

so the flow is x = L_1(L_2(... L_k(T(z)))) with z ~ prior; a key can be followed from YAML to object
with `hydra.utils.instantiate` alone. A torus space (circular features that no layer squeezed)
gives the transform and the prior their circular mask.

Every node is instantiated through `bgexp.training.allowlist.instantiate`: its `_target_`s
(recursively) must be on the allow-list (bgexp/training/allowlist.py) or a ForbiddenTargetError
names the key before anything outside the list is imported or called.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from bgexp.flows.base import Flow, SequentialFlow
from bgexp.spaces import Space, SpaceError
from bgexp.targets.base import MolecularTarget
from bgexp.training.allowlist import check_config, instantiate
from bgexp.training.data import TargetDataModule
from bgexp.training.errors import ConfigError
from bgexp.training.module import BoltzmannGenerator
# RESOLVED_CONFIG: the fully resolved config of a run, next to Hydra's .hydra/config.yaml
from bgexp.training.resume import RESOLVED_CONFIG, run_config_path, wandb_run_id


def _without_name(node: DictConfig) -> dict[str, Any]:
    d = OmegaConf.to_container(node, resolve=True)
    d.pop("name", None)
    return d


def build_target(cfg: DictConfig):
    if "target" not in cfg or cfg.target is None:
        raise ConfigError("config has no `target`: choose one with target=<name>")
    return instantiate(_without_name(cfg.target), where="target")


def _factory(node, where: str = ""):
    """The callable of a config node with its keys bound. Objects such as a Space are passed at call
    time: given to `instantiate` they would be turned into config nodes."""
    return instantiate(node, _partial_=True, where=where)


def build_transform(node: DictConfig | dict[str, Any], space: Space):
    """The trainable bijection of `flow.transform` on `space` (its factory is called with space=)."""
    transform = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    dim = transform.pop("dim", None)
    if dim is not None and int(dim) != space.dim:
        raise ConfigError(f"flow.transform.dim={dim} does not match the latent dimension {space.dim} of the "
                          f"target; remove flow.transform.dim or set it to {space.dim}")
    try:
        return _factory(transform, "flow.transform")(space=space)
    except SpaceError as err:
        raise ConfigError(f"flow.transform ({transform.get('_target_')}): {err}") from err


@dataclass
class BuiltFlow:
    """A built flow recipe: the prior, the whole flow x = R(T(z)), the latent space (where the prior
    and the transform T live) and the fixed representation R alone (None without layers; the
    no-flow baselines of the SMC refinement start from the prior pushed through R only)."""

    prior: torch.nn.Module
    flow: Flow
    latent_space: Space
    representation: Flow | None


def build_flow(flow_cfg: DictConfig | dict[str, Any], target, data: torch.Tensor | None = None) -> BuiltFlow:
    """The flow recipe (module docstring) on the target's space; the representation layers are
    fitted to `data` (when given; a checkpoint provides them otherwise)."""
    flow_cfg = OmegaConf.create(flow_cfg) if isinstance(flow_cfg, dict) else flow_cfg
    space = target.space
    topology = target.topology if isinstance(target, MolecularTarget) else None
    current = None if data is None else data.double()
    layers = []
    for name, node in (flow_cfg.get("layers") or {}).items():
        if node is None:  # switched off (flow.layers.<name>=null)
            continue
        try:
            layer, space = _factory(node, f"flow.layers.{name}")(space=space, data=current, topology=topology)
        except SpaceError as err:
            raise ConfigError(f"flow.layers.{name} ({node.get('_target_')}): {err}") from err
        if current is not None:  # the data one representation further, still in float64
            with torch.no_grad():
                current = layer.inverse(current)[0]
        layers.append(layer)
    transform = build_transform(flow_cfg.transform, space)
    try:
        prior = _factory(flow_cfg.prior, "flow.prior")(space=space)
    except SpaceError as err:
        raise ConfigError(f"flow.prior ({flow_cfg.prior.get('_target_')}): {err}; a space with circular features "
                          f"needs a prior on the circle (bgexp.flows.TorusPrior)") from err
    layers = [layer.to(torch.get_default_dtype()) for layer in reversed(layers)]
    parts = [transform, *layers]
    representation = None if not layers else layers[0] if len(layers) == 1 else SequentialFlow(layers)
    return BuiltFlow(prior, parts[0] if len(parts) == 1 else SequentialFlow(parts), space, representation)


def build_model(cfg: DictConfig, target, data: torch.Tensor | None = None) -> BoltzmannGenerator:
    """Prior + flow (the recipe of cfg.flow, fitted to `data`) + target + loss + optimiser."""
    built = build_flow(cfg.flow, target, data)
    return BoltzmannGenerator(prior=built.prior, flow=built.flow, target=target,
                              loss=instantiate(cfg.loss, where="loss"),
                              latent_space=built.latent_space, representation=built.representation,
                              optimizer=instantiate(cfg.optim, where="optim"),
                              scheduler=instantiate(cfg.scheduler, where="scheduler") if cfg.get("scheduler") else None,
                              seed=cfg.seed, max_consecutive_nonfinite=cfg.max_consecutive_nonfinite)


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
        return instantiate(node, id=wandb_run_id(run_dir), resume="allow", **_sweep_labels(node), where="logger")
    if str(node["_target_"]).endswith("CSVLogger"):
        return instantiate(node, **_csv_version(node), where="logger")
    return instantiate(node, where="logger")


def _csv_version(node: DictConfig) -> dict[str, Any]:
    """A resumed run's CSV log goes into a new version folder (<save_dir>/<name>/resumed-<k>/):
    Lightning's CSVLogger would otherwise replace the metrics.csv of the earlier part of the run."""
    folder = Path(str(node.get("save_dir", "."))) / str(node.get("name") or "lightning_logs")
    version = node.get("version")
    if version is None or not (folder / str(version) / "metrics.csv").is_file():
        return {}
    k = 1
    while (folder / str(version) / f"resumed-{k}").exists():
        k += 1
    return {"version": str(Path(str(version)) / f"resumed-{k}") if str(version) else f"resumed-{k}"}


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


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list:
    """The generic callbacks of `callbacks` (conf/callbacks): each entry is instantiated with
    run_dir=<the run folder>; a null entry is switched off."""
    nodes = cfg.get("callbacks") or {}
    return [instantiate(node, run_dir=run_dir, where=f"callbacks.{name}") for name, node in nodes.items()
            if node is not None]


def load_run_config(run_dir: str | Path) -> DictConfig:
    """The resolved config a run folder was trained with: its config.yaml, or once resumed the
    resolved.yaml of its latest resume (resumes/<stamp>/; `run_config_path`), so an evaluation has
    the config hash of the run's results.json. Its `_target_`s are checked against the allow-list (a
    ForbiddenTargetError names one that is not) before anything is built from it."""
    if not (Path(run_dir) / RESOLVED_CONFIG).is_file():
        raise FileNotFoundError(f"{run_dir} is not a bgexp run folder (no {RESOLVED_CONFIG})")
    cfg = OmegaConf.load(run_config_path(run_dir))
    check_config(cfg)
    return cfg


__all__ = ["BuiltFlow", "build_target", "build_transform", "build_flow", "build_model", "build_datamodule", "build_logger",
           "build_callbacks", "load_run_config", "ConfigError"]
