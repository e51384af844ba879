"""The Python face of bgexp, for notebooks and scripts: compose a config, train, load a run, sample.

    >>> import bgexp
    >>> cfg = bgexp.compose("dimer_realnvp", ["trainer.max_epochs=2"])     # doctest: +SKIP
    >>> with bgexp.train(cfg) as run:                                    # doctest: +SKIP
    ...     samples = run.sample(5000, seed=0)
    ...     print(samples.ess(), samples.delta_f("closed", "open"))

or, for a run that `bgexp-train` made:

    >>> with bgexp.load_run("outputs/runs/dimer_realnvp/<stamp>") as run:  # doctest: +SKIP
    ...     print(run.results.delta_f)

`load_run` serves Boltzmann-generator runs (task=bg); a `Run` owns its target, and an OpenMM target
owns worker processes: close the run (`run.close()`, or use it as a context manager) when done.
Nothing here keeps global Hydra state: `compose` initialises Hydra for one call and restores what
was there before.

Errors: `NotARunFolderError` (no config.yaml or no checkpoint), `WrongTaskError` (a targeted-FEP
run), `NotMolecularError` (`to_mdtraj` on a target without atoms); all are ValueError or
FileNotFoundError subclasses with a message that says what to do instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bgexp.evaluation.samples import SampleSet, canonical_region, draw_samples, importance_log_weights
from bgexp.training.errors import ConfigError, UnsupportedOperationError

if TYPE_CHECKING:  # heavy (Lightning) imports only where they are used
    from bgexp.evaluation import Evaluation
    from bgexp.training.artifacts import Results
    from bgexp.training.module import BoltzmannGenerator

DEFAULT_EXPERIMENT = "dimer_realnvp"
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # the same folder as bgexp.train.CONFIG_DIR


class NotARunFolderError(FileNotFoundError):
    """The folder given to `load_run` is not a bgexp run folder (no config.yaml) or lacks the asked checkpoint."""


class WrongTaskError(UnsupportedOperationError):
    """`load_run` on a run of a task other than the Boltzmann generator (task=bg)."""


class NotMolecularError(UnsupportedOperationError):
    """`Run.to_mdtraj` on a target that is not a molecule (no topology)."""


# samples -----------------------------------------------------------------------------------------
@dataclass
class Samples(SampleSet):
    """Flow samples of a `Run` (a `bgexp.evaluation.SampleSet`: x, log_q, u as torch tensors, log_w
    float64 numpy with log w = -u - log q, -inf where u is not finite) with the estimators at hand:

        >>> samples = run.sample(10_000, seed=0)                          # doctest: +SKIP
        >>> samples.ess()                                                 # doctest: +SKIP
        0.0123
        >>> samples.delta_f("closed", "open")["value"]                    # doctest: +SKIP
        1.31
    """

    target: Any = field(default=None, repr=False, compare=False)

    def ess(self) -> float:
        """Kish effective sample size as a fraction of n, in (0, 1] (`bgexp.estimators.ess`); 0.0 when
        every sample has zero weight (all energies non-finite)."""
        from bgexp.estimators import ess

        if not np.isfinite(self.log_w).any():
            return 0.0
        return ess(self.log_w)

    def state_mask(self, state: str | Any) -> np.ndarray:
        """bool [N]: which samples lie in `state` (a name of the target's states, or a mask / a
        callable x -> bool tensor)."""
        if isinstance(state, str):
            states = getattr(self.target, "states", None) or {}
            if state not in states:
                raise KeyError(f"state {state!r} is not one of the target's states {list(states)}; "
                               f"pass one of them or a boolean mask over the {self.n} samples")
            state = states[state]
        if callable(state):
            state = state(self.x)
        if isinstance(state, torch.Tensor):
            state = state.detach().cpu().numpy()
        mask = np.asarray(state)
        if mask.shape != (self.n,):
            raise ValueError(f"a state mask must have shape ({self.n},), got {mask.shape}")
        return mask.astype(bool)

    def delta_f(self, a: str | Any, b: str | Any, n_bootstrap: int = 200, confidence: float = 0.95,
                seed: int | None = 0) -> dict[str, Any]:
        """The reweighted free-energy difference F_b - F_a (kT) between two states with its bootstrap
        percentile interval (`bgexp.estimators.free_energy_difference` under `bootstrap`).

        `a`, `b`: state names of the target (`run.target.states`) or boolean masks over the samples.
        Returns {"value", "ci_low", "ci_high", "std", "confidence", "n_bootstrap", "reference"}
        (floats; inf where a state has no weight, nan where the interval is undefined; "reference" is
        the target's reference value for "a->b" or None).

            >>> d = samples.delta_f("closed", "open")                     # doctest: +SKIP
            >>> print(f"{d['value']:.2f} kT, CI [{d['ci_low']:.2f}, {d['ci_high']:.2f}]")  # doctest: +SKIP
        """
        from bgexp.estimators import bootstrap, free_energy_difference

        result = bootstrap(free_energy_difference, self.log_w, self.state_mask(a), self.state_mask(b),
                           n_boot=int(n_bootstrap), confidence=confidence, seed=seed)
        reference = None
        ref_table = getattr(getattr(self.target, "reference", None), "delta_f", None) or {}
        if isinstance(a, str) and isinstance(b, str) and f"{a}->{b}" in ref_table:
            reference = float(ref_table[f"{a}->{b}"].value)
        return {"value": result.value, "ci_low": result.ci_low, "ci_high": result.ci_high, "std": result.std,
                "confidence": confidence, "n_bootstrap": int(n_bootstrap), "reference": reference}


# runs ----------------------------------------------------------------------------------------------
class Run:
    """A trained Boltzmann generator loaded from its run folder (see `load_run`).

    Attributes: `run_dir`, `checkpoint` (the loaded file), `config` (the run's resolved DictConfig),
    `model` (the BoltzmannGenerator, in eval mode), `target`, `flow`, `prior`, and `results` (the
    run's results.json through the schema, None before the run finished).

        >>> with bgexp.load_run(run_dir) as run:                          # doctest: +SKIP
        ...     s = run.sample(2000, seed=1)
        ...     torch.allclose(run.log_prob(s.x), s.log_q, atol=1e-3)
        True
    """

    def __init__(self, run_dir: Path, config: DictConfig, model: "BoltzmannGenerator", checkpoint: Path):
        self.run_dir = Path(run_dir)
        self.config = config
        self.model = model
        self.checkpoint = Path(checkpoint)
        self._closed = False

    # parts
    @property
    def target(self):
        return self.model.target

    @property
    def flow(self):
        return self.model.flow

    @property
    def prior(self):
        return self.model.prior

    @property
    def results(self) -> "Results | None":
        """The run's results.json (`bgexp.training.artifacts.read_results`), None if it has none yet."""
        from bgexp.training.artifacts import RESULTS_FILE, read_results

        path = self.run_dir / RESULTS_FILE
        return read_results(path) if path.is_file() else None

    # sampling and densities
    def sample(self, n: int, seed: int | None = None, batch_size: int = 2000) -> Samples:
        """n flow samples x ~ q with log q(x), the reduced energies u(x) and log w = -u - log q.

        `seed`: an integer makes the draw reproducible for the same batch_size (None: a fresh random
        seed). The target's observables are evaluated on the samples (`samples.observed`)."""
        n, batch_size = int(n), int(batch_size)
        if n < 1 or batch_size < 1:
            raise ValueError(f"sample needs n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        self._check_open()
        generator = torch.Generator(device=self.model.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
        was_training = self.model.training
        self.model.eval()
        try:
            x, log_q, u = draw_samples(self.model, n, batch_size, generator)
        finally:
            self.model.train(was_training)
        with torch.no_grad():
            observed = {name: obs(x).double().cpu().numpy() for name, obs in self.target.observables.items()}
        inside = canonical_region(self.target, x)
        return Samples(x=x, log_q=log_q, u=u, log_w=importance_log_weights(u, log_q, inside),
                       n_nonfinite=int((~torch.isfinite(u)).sum()), observed=observed, target=self.target,
                       n_outside_region=0 if inside is None else int((~inside).sum()))

    def log_prob(self, x: Any, batch_size: int = 10_000) -> torch.Tensor:
        """log q(x) of the flow for configurations x [N, dim] (tensor or array), as a tensor [N]."""
        self._check_open()
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        x = x.to(device=self.model.device, dtype=torch.get_default_dtype())
        if x.ndim == 1:
            x = x[None]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return torch.cat([self.model.log_prob(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
        finally:
            self.model.train(was_training)

    def energy(self, x: Any) -> torch.Tensor:
        """The target's reduced energy u(x) (kT) for configurations x [N, dim]."""
        self._check_open()
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(torch.get_default_dtype())
        with torch.no_grad():
            return self.target.energy(x)

    def evaluate(self, data: Any = None, **overrides: Any) -> "Evaluation":
        """The importance-sampling evaluation of `bgexp.evaluation.evaluate` (ESS, Delta F with CIs,
        profiles, ...), returning its `Evaluation`. Defaults are the run's final evaluation settings
        (evaluation.final_n_samples, batch_size, final_n_bootstrap, confidence); `overrides` are
        keyword arguments of `evaluate` (n_samples=, n_bootstrap=, figure_dir=, ...).

        `data`: held-out configurations for the NLL and the distances to the data; "heldout" uses the
        run's own held-out split (its data module; may generate or read the data)."""
        from bgexp.evaluation import evaluate

        self._check_open()
        ev = self.config.get("evaluation") or {}
        kwargs: dict[str, Any] = {"n_samples": int(ev.get("final_n_samples", 10_000)),
                                  "batch_size": int(ev.get("batch_size", 2_000)),
                                  "n_bootstrap": int(ev.get("final_n_bootstrap", 200)),
                                  "confidence": float(ev.get("confidence", 0.95))}
        if isinstance(data, str):
            if data != "heldout":
                raise ValueError(f"data={data!r}: give 'heldout', configurations [N, dim], or None")
            data, forces = self._heldout()
            kwargs["forces"] = forces
        elif data is not None:
            data = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data)
            data = data.to(torch.get_default_dtype())
        kwargs.update(overrides)
        return evaluate(self.model, data=data, **kwargs)

    def _heldout(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        from bgexp.training.assemble import build_datamodule

        datamodule = build_datamodule(self.config, self.target)
        datamodule.progress = False
        datamodule.setup()
        return datamodule.x_val, getattr(datamodule, "f_val", None)

    # molecules
    def to_mdtraj(self, samples: Any, superpose: bool = True):
        """Samples of a molecular target as an `mdtraj.Trajectory` (one frame per sample, in nm, in
        the order given; superposed on the target's structure unless superpose=False). `samples`: a
        SampleSet or configurations [N, 3 n_atoms]."""
        from bgexp.targets.base import MolecularTarget

        target = self.target
        if not isinstance(target, MolecularTarget):
            raise NotMolecularError(
                f"to_mdtraj: the target of {self.run_dir} ({type(target).__name__}) is not a molecule (no "
                f"topology); use samples.x (configurations [N, {target.space.dim}]) directly")
        import mdtraj

        x = samples.x if isinstance(samples, SampleSet) else samples
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        xyz = np.asarray(x, dtype=np.float32).reshape(-1, int(target.n_atoms), 3)
        top = target.mdtraj_topology()
        traj = mdtraj.Trajectory(xyz, top)
        if superpose:
            traj = traj.superpose(mdtraj.Trajectory(np.asarray(target.positions, dtype=np.float32)[None], top))
        return traj

    # lifetime
    def close(self) -> None:
        """Release the target (an OpenMM target's worker processes); the Run cannot sample afterwards."""
        if not self._closed:
            self._closed = True
            self.target.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this Run of {self.run_dir} is closed; load it again with bgexp.load_run")

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        experiment = self.config.get("experiment_name")
        return (f"Run({str(self.run_dir)!r}, experiment={experiment!r}, target={type(self.target).__name__}, "
                f"checkpoint={self.checkpoint.name!r}{', closed' if self._closed else ''})")


def load_run(run_dir: str | Path, checkpoint: str = "last") -> Run:
    """Load the Boltzmann generator of a run folder (one `bgexp-train` or `bgexp.train` made).

    `checkpoint`: "last", "best" or a path to a .ckpt file of a run with the same target and flow.
    Raises NotARunFolderError (no config.yaml, or no such checkpoint) and WrongTaskError (a
    targeted-FEP run, which has no generator to sample: use `bgexp-eval` or its results.json).

        >>> run = bgexp.load_run("outputs/runs/dimer_realnvp/2026-11-24_02-11-44-092518")  # doctest: +SKIP
        >>> run.results.delta_f["closed->open"]["value"]                  # doctest: +SKIP
        >>> run.close()                                                   # doctest: +SKIP
    """
    from bgexp.training.artifacts import RESULTS_FILE, checkpoint_path
    from bgexp.training.resume import RESOLVED_CONFIG

    run_dir = Path(run_dir).expanduser()
    if not (run_dir / RESOLVED_CONFIG).is_file():
        what = "does not exist" if not run_dir.exists() else f"has no {RESOLVED_CONFIG}"
        raise NotARunFolderError(f"{run_dir} is not a bgexp run folder ({what}); give the folder that holds "
                                 f"{RESOLVED_CONFIG}, checkpoints/ and {RESULTS_FILE} "
                                 f"(outputs/runs/<experiment>/<stamp>)")
    from bgexp.training.assemble import load_run_config
    from bgexp.training.tasks import build_task
    from bgexp.training.tasks.bg import BoltzmannGeneratorTask, load_run as load_bg_run

    task = build_task(load_run_config(run_dir))
    if not isinstance(task, BoltzmannGeneratorTask):
        raise WrongTaskError(
            f"{run_dir} is a run of task {task.name!r}, not a Boltzmann generator (task=bg): it has no flow "
            f"to sample. Read its estimates with bgexp.training.artifacts.read_results('{run_dir / RESULTS_FILE}') "
            f"or re-evaluate it with `bgexp-eval run_dir={run_dir}`")
    ckpt = checkpoint_path(run_dir, checkpoint)
    if not ckpt.is_file():
        existing = sorted(p.stem for p in (run_dir / "checkpoints").glob("*.ckpt"))
        raise NotARunFolderError(f"{run_dir}: checkpoint {ckpt} does not exist (checkpoints there: "
                                 f"{existing or 'none; the run died before its first epoch ended'})")
    cfg, model, ckpt = load_bg_run(run_dir, checkpoint)
    return Run(run_dir, cfg, model, ckpt)


# composing and training ----------------------------------------------------------------------------
def compose(experiment: str = DEFAULT_EXPERIMENT, overrides: Sequence[str] = ()) -> DictConfig:
    """The config `bgexp-train experiment=<experiment> <overrides...>` would run (Hydra's compose API
    on the project's conf/), without the `hydra` node. Safe to call repeatedly: Hydra is initialised
    for this call only, and whatever global Hydra state existed before is restored.

        >>> cfg = bgexp.compose("dimer_realnvp", ["trainer.max_epochs=5", "optim.lr=5e-4"])  # doctest: +SKIP
        >>> cfg.flow.transform.n_couplings                                # doctest: +SKIP
        8
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.singleton import Singleton

    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of strings such as ['trainer.max_epochs=5'], got the string "
                        f"{overrides!r}")
    overrides = [str(o) for o in overrides]
    given = [o for o in overrides if o.lstrip("+").split("=", 1)[0] == "experiment"]
    if given:
        raise ValueError(f"give the experiment as the first argument, not in overrides ({given})")
    # Hydra's global state (a user's own `initialize`, or none) is set aside and put back afterwards
    saved = Singleton._instances.pop(GlobalHydra, None)
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return hydra_compose(config_name="config", overrides=[f"experiment={experiment}", *overrides])
    finally:
        Singleton._instances.pop(GlobalHydra, None)
        if saved is not None:
            Singleton._instances[GlobalHydra] = saved


HYDRA_OUTPUT_DIR = "${hydra:runtime.output_dir}"


def _replace_hydra_output_dir(node: Any, run_dir: str) -> None:
    """Set every `${hydra:runtime.output_dir}` of a config (the loggers' save_dir) to the run folder:
    outside a Hydra app there is no Hydra runtime to resolve it."""
    if isinstance(node, DictConfig):
        keys = list(node.keys())
        get = lambda k: node._get_node(k)  # noqa: E731
    elif OmegaConf.is_list(node):
        keys = list(range(len(node)))
        get = lambda k: node._get_node(k)  # noqa: E731
    else:
        return
    for key in keys:
        child = get(key)
        if OmegaConf.is_config(child):
            _replace_hydra_output_dir(child, run_dir)
            continue
        value = child._value()
        if isinstance(value, str) and HYDRA_OUTPUT_DIR in value:
            node[key] = value.replace(HYDRA_OUTPUT_DIR, run_dir)


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> Run:
    """Train and evaluate `cfg` as `bgexp-train` does (`bgexp.training.run.run_experiment`: data,
    fit, final evaluation, results.json, samples, figures, logger) and return the loaded `Run`.

    The run folder is `run_dir` when given (it must not hold a run already), else a new stamped folder
    `<paths.output_dir>/runs/<experiment_name>/<stamp>` as bgexp-train makes; cached data stay in
    paths.data_dir. `cfg` itself is not changed. To continue a killed run use
    `bgexp-train resume=<run folder>`.

        >>> run = bgexp.train(bgexp.compose("dimer_realnvp", ["trainer.max_epochs=2"]))  # doctest: +SKIP
        >>> run.results.ess                                               # doctest: +SKIP
    """
    from bgexp.training.resume import RESOLVED_CONFIG, check_output_dir
    from bgexp.training.run import run_experiment

    if not isinstance(cfg, DictConfig):
        raise TypeError(f"train needs a DictConfig (from bgexp.compose), got {type(cfg).__name__}")
    if cfg.get("resume"):
        raise ConfigError(f"resume={cfg.resume}: bgexp.train starts new runs; continue a run with "
                          f"`bgexp-train resume={cfg.resume}` and load it with bgexp.load_run")
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))  # a copy, interpolations kept
    with _open(cfg):
        cfg.pop("hydra", None)
        check_output_dir(cfg)  # empty (BGEXP_OUTPUT_DIR=''), a file or not writable: OutputDirError
        paths = cfg.paths
        data_dir = Path(str(paths.data_dir)).expanduser().resolve()
        if run_dir is None:
            stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
            run_dir = Path(str(paths.output_dir)).expanduser() / "runs" / str(cfg.get("experiment_name") or "run") / stamp
        run_dir = Path(run_dir).expanduser().resolve()
        if (run_dir / RESOLVED_CONFIG).exists():
            raise ConfigError(f"{run_dir} holds a run already; give a new run_dir (or none: a stamped folder), "
                              f"or continue that run with `bgexp-train resume={run_dir}`")
        # outside a Hydra app the run folder is paths.output_dir (run_dir_of); the data cache stays put
        paths.data_dir = str(data_dir)
        paths.output_dir = str(run_dir)
        _replace_hydra_output_dir(cfg, str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    run_experiment(cfg)
    return load_run(run_dir)


class _open:
    """open_dict / read-only off for the duration (a composed config is struct)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def __enter__(self):
        self.struct = OmegaConf.is_struct(self.cfg)
        OmegaConf.set_struct(self.cfg, False)
        return self.cfg

    def __exit__(self, *exc):
        OmegaConf.set_struct(self.cfg, self.struct)


__all__ = ["Run", "Samples", "load_run", "compose", "train", "NotARunFolderError", "WrongTaskError",
           "NotMolecularError"]
