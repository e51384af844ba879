"""Training data: MC/MD samples of a target, cached on disk with the settings that made them.

Sources:
- `path`: a user's own .npz file with an array `x` of shape [n, dim] (MD frames, flattened).
  A missing, unreadable, wrongly shaped or non-finite file is an error that names the file.
- `path`: an MD folder of `bgexp.targets.dynamics` (scripts/generate_md.py). With `md` settings
  the MD is run into that folder when it is missing or incomplete (a killed run resumes).
  `path` may be a list of sources, concatenated; `md` is then one setting for all or a list with
  one entry per source (an entry's `temperature` makes biased data, e.g. 600 K MD).
- `path`: a trajectory file in any format mdtraj reads, with `topology` (a PDB file); the atom
  count must match the target.
- generated: when `path` is null, the data are produced by `bgexp.targets.md.sample_states`
  (`generate.method: mc`, the default: Metropolis runs confined to states) or, with
  `generate.method: exact`, drawn from the target's exact sampler, `target.sample(n_samples,
  generator=torch.Generator().manual_seed(seed))`, and cached as `<cache_dir>/<name>-<hash>.npz`,
  where the hash covers the target's config and the sampler settings. The file stores those settings; a cache whose stored settings differ
  (stale: the warning lists each differing field, requested against stored), that stores none
  (an older format) or that cannot be read (damaged, truncated) is regenerated with a warning,
  never used silently. Files are written atomically (`bgexp.atomic`), so a crash never leaves half
  a cache.

Provenance of MD folders and caches. The two differ on purpose:
- a generated cache is ours, cheap to remake and already keyed by its settings: other settings
  mean another file name, so a request never meets another request's cache; a file at the keyed
  path with other or no stored settings is regenerated in place (with the warning above);
- an MD folder is the user's own `data.path` and costs up to hours of MD. With `data.md` settings,
  a folder (complete or not) made with other settings (temperature, frame count, any MD setting,
  target, force field) or whose metadata.json stores none (an older format) is a
  `DataProvenanceError` (a DataError) that lists each differing field, requested against stored,
  and says what to do: delete the folder to run the MD again, or point data.path elsewhere.
  Regenerating into a keyed folder elsewhere would leave the user's path silently unused and the
  data a run trained on harder to find. Without `data.md`, a folder is used as it is (its
  temperature and frame count are logged).

Validation split (`split`):
- `random` (the default): a random val_fraction of the frames. Frames of one Markov chain are
  correlated, so with few long chains the held-out NLL measures memory of the chains as much as
  generalisation.
- `chains`: whole chains held out (chains drawn at random until val_fraction of the frames): the
  held-out NLL is then that of configurations from chains the flow never saw. Generated MC data
  store each frame's chain (`chain` in the cache); an .npz file may carry an integer array `chain`
  of length n; an MD folder or trajectory without one is one chain. Measured on the dimer's
  default MC data (100 chains per state, 200 frames each, 20 epochs-worth of ML): held-out NLL
  -61 on a random split against +18 on held-out chains, the flow fitting each chain's own region.
- `tail`: the last frames held out (one long MD trajectory).

Forces (`forces: true`, for force matching): the data module also provides `f_train`, `f_val`,
the reduced forces f = -grad_x u(x) at the target's temperature (units kT per unit of x, rows
paired with `x_train`, `x_val`), and batches become (x, f) instead of (x,):
- MD folders: the stored forces F (kJ/mol/nm) divided by the target's kT (`target.kbt`, kJ/mol).
  This holds for MD at another temperature too (biased data), since U does not depend on T.
- .npz files: an array `forces` of the same shape as `x`, holding reduced forces at the target's
  temperature, when present; computed as below otherwise.
- trajectory files and generated data: -grad_x target.energy(x) by autograd, in batches.
Non-finite forces are an error naming the source and the number of bad samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from bgexp.atomic import atomic_write
from bgexp.targets.base import EnergyScale, ExactSampler, MolecularTarget, ParticleSystem, Target
from bgexp.targets.dynamics import (MDError, MDSettings, MDSettingsMismatch, differences, is_complete, load_md,
                                    load_trajectory, run_md)
from bgexp.targets.md import sample_states

GENERATION_METHODS = ("mc", "exact")
SPLITS = ("random", "tail", "chains")
FORCE_BATCH_SIZE = 1024

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file is missing, malformed or does not fit the target."""


class DataProvenanceError(DataError):
    """An MD folder made with other settings (or with none stored) than the requested `data.md`."""


def settings_hash(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _json_differences(requested: str, stored: str) -> list[tuple[str, Any, Any]]:
    """(dotted key, requested, stored) for every leaf in which two JSON settings differ."""
    try:
        return differences(json.loads(requested), json.loads(stored))
    except json.JSONDecodeError:
        return [("settings", requested, stored)]


def load_npz(path: Path, dim: int) -> dict[str, np.ndarray]:
    """Read an .npz data file and check `x` is a finite [n, dim] array; DataError otherwise."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"data file {path} is not a readable .npz file (damaged or truncated? "
                        f"{type(err).__name__}: {err}); replace it, or delete it if bgexp generated it") from err
    if "x" not in arrays:
        raise DataError(f"data file {path} has no array 'x' (found {sorted(arrays)})")
    x = arrays["x"]
    if x.ndim != 2 or x.shape[1] != dim:
        raise DataError(f"data file {path}: 'x' has shape {x.shape}, the target expects [n, {dim}]")
    if x.shape[0] == 0:
        raise DataError(f"data file {path} holds no samples")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"data file {path}: 'x' holds {x.dtype} values; configurations are floating-point "
                        f"coordinates (rounded or boolean data would train a flow on a lattice of points): "
                        f"save the coordinates as float32 or float64")
    n_bad = int((~np.isfinite(x)).any(axis=1).sum())
    if n_bad:
        raise DataError(f"data file {path}: {n_bad} samples contain NaN or infinite coordinates")
    return arrays


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


class TargetDataModule(pl.LightningDataModule):
    """Train/validation split of a target's data; generation and caching as described above."""

    def __init__(
        self,
        target: Target,
        target_config: dict[str, Any] | None = None,
        path: str | list[str] | None = None,
        cache_dir: str = "data_cache",
        generate: dict[str, Any] | None = None,
        val_fraction: float = 0.1,
        batch_size: int = 256,
        num_workers: int = 0,
        split_seed: int = 0,
        progress: bool = True,
        md: dict[str, Any] | None = None,
        topology: str | None = None,
        split: str = "random",
        forces: bool = False,
    ):
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if path is None and not generate:
            raise ValueError("data needs either data.path (an .npz file, MD folder or trajectory) "
                             "or data.generate settings")
        if split not in SPLITS:
            raise ValueError(f"data.split must be 'random', 'tail' (the last frames held out) or 'chains' "
                             f"(whole Markov chains held out), got {split!r}")
        self.topology = topology
        self.split = split
        self.target = target
        self.target_config = target_config or {"class": type(target).__name__}
        if isinstance(path, (list, tuple)) or (path is not None and not isinstance(path, (str, os.PathLike))):
            paths = [Path(p) for p in path]  # several sources (e.g. MD runs with other seeds), concatenated
            if not paths:
                raise ValueError("data.path is an empty list")
        else:
            paths = [Path(path)] if path else []
        self.paths = paths
        if isinstance(md, (list, tuple)):
            md_list = [dict(m) if m else None for m in md]  # one MD setting per data.path entry
            if len(md_list) != len(paths):
                raise ValueError(f"data.md lists {len(md_list)} MD settings for {len(paths)} data.path entries")
        else:
            md_list = [dict(md) if md else None] * max(1, len(paths))
        self.md_list = md_list
        self.cache_dir = Path(cache_dir)
        self.generate_settings = dict(generate or {})
        method = self.generate_settings.get("method", "mc")
        if method not in GENERATION_METHODS:
            raise ValueError(f"data.generate.method must be one of {GENERATION_METHODS}, got {method!r}")
        if path is None and method == "exact":
            missing = [k for k in ("n_samples", "seed") if k not in self.generate_settings]
            unknown = sorted(set(self.generate_settings) - {"method", "n_samples", "seed"})
            if missing or unknown:
                raise ValueError(f"data.generate with method: exact takes n_samples and seed "
                                 f"(missing {missing}, unknown {unknown})")
            if not isinstance(target, ExactSampler):
                raise DataError(f"data.generate.method=exact: {type(target).__name__} has no exact sampler "
                                f"(no `sample` method); use method: mc or a data.path")
        self.forces = bool(forces)
        self.val_fraction, self.batch_size = float(val_fraction), int(batch_size)
        self.num_workers, self.split_seed, self.progress = int(num_workers), int(split_seed), progress
        self.x_train: torch.Tensor | None = None
        self.x_val: torch.Tensor | None = None
        self.f_train: torch.Tensor | None = None
        self.f_val: torch.Tensor | None = None
        self.chain: np.ndarray | None = None  # [n] each frame's Markov chain, after load_data
        self.source: str = ""

    # loading -------------------------------------------------------------------------------
    def cache_settings(self) -> dict[str, Any]:
        return {"target": self.target_config, "generate": self.generate_settings, "format": 2}

    def cache_path(self) -> Path:
        name = str(self.target_config.get("name", type(self.target).__name__)).lower()
        return self.cache_dir / f"{name}-{settings_hash(self.cache_settings())}.npz"

    def _generate(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        settings = dict(self.generate_settings)
        method = settings.pop("method", "mc")
        log.info("generating training data (%s) into %s", self.generate_settings, path)
        settings_json = np.array(json.dumps(self.cache_settings(), sort_keys=True, default=str))
        if method == "exact":
            if not isinstance(self.target, ExactSampler):
                raise DataError(f"data.generate.method=exact: {type(self.target).__name__} has no exact "
                                f"sampler (no `sample` method)")
            sampler = self.target.sample
            generator = torch.Generator().manual_seed(int(settings["seed"]))
            with torch.no_grad():
                samples = sampler(int(settings["n_samples"]), generator=generator)
            x = torch.as_tensor(samples).detach().cpu()
            if x.ndim != 2 or x.shape[1] != self.target.dim:
                raise DataError(f"{type(self.target).__name__}.sample returned shape {tuple(x.shape)}, "
                                f"expected [{settings['n_samples']}, {self.target.dim}]")
            with torch.no_grad():
                state = self.target.state_of(x)
            x = x.numpy()
            chain = np.arange(x.shape[0])  # independent samples: each its own chain
            save_npz_atomic(path, x=x, state=state.numpy(), states=np.array(list(self.target.states)),
                            chain=chain, settings_json=settings_json)
            return x, chain
        samples = sample_states(self.target, progress=self.progress, **settings)
        x = samples.x.detach()
        if isinstance(self.target, ParticleSystem):  # particle systems: mean-free samples
            x = self.target.remove_com(x)
        x = x.cpu().numpy()
        save_npz_atomic(
            path,
            x=x,
            state=samples.state.numpy(),
            states=np.array(samples.states),
            chain=samples.chain.numpy(),
            settings_json=settings_json,
            acceptance_json=np.array(json.dumps(samples.acceptance)),
        )
        return x, samples.chain.numpy()

    def _load_cache(self, path: Path) -> tuple[np.ndarray, np.ndarray] | None:
        """The cached (x, chain), or None (with a warning) when the cache is absent, stale or malformed."""
        if not path.exists():
            return None
        try:
            arrays = load_npz(path, self.target.dim)
        except DataError as err:
            log.warning("ignoring malformed data cache: %s; regenerating", err)
            return None
        expected = json.dumps(self.cache_settings(), sort_keys=True, default=str)
        if "settings_json" not in arrays:
            log.warning("data cache %s stores no settings (an older format), so it cannot be checked; "
                        "regenerating", path)
            return None
        stored = str(arrays["settings_json"])
        if stored != expected:
            log.warning("data cache %s was made with other settings; regenerating. Differences:\n%s", path,
                        "\n".join(f"  {k}: requested {r!r}, stored {o!r}"
                                   for k, r, o in _json_differences(expected, stored)))
            return None
        if "chain" not in arrays or arrays["chain"].shape != (arrays["x"].shape[0],):
            log.warning("data cache %s stores no chain of each frame; regenerating", path)
            return None
        return arrays["x"], arrays["chain"]

    def _load_md_folder(self, path: Path, md: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray | None]:
        if md is not None:
            self._run_or_check_md(path, md)
        try:
            data = load_md(path, n_atoms=self.target.dim // 3)
        except MDError as err:
            raise DataError(str(err)) from err
        if md is None:
            meta = data.metadata
            log.info("MD folder %s used as it is (no data.md settings): %d frames at %s K", path, len(data.x),
                     meta.get("temperature_kelvin", "unknown"))
        if not self.forces:
            return data.x, None
        if not isinstance(self.target, EnergyScale):
            raise DataError(f"data.forces: the MD folder {path} stores forces in kJ/mol/nm, but "
                            f"{type(self.target).__name__} has no `kbt` (kT in kJ/mol) to reduce them with")
        forces = np.asarray(data.forces, dtype=np.float64).reshape(data.x.shape) / float(self.target.kbt)
        return data.x, forces

    def _run_or_check_md(self, path: Path, md: dict[str, Any]) -> None:
        """Run (or resume) the MD of `md` into `path`, or check that the complete run there was
        made with exactly these settings (`run_md` checks first, before any work):
        DataProvenanceError listing the differing fields otherwise."""
        if not isinstance(self.target, MolecularTarget):
            raise DataError(f"data.md: {type(self.target).__name__} is not an OpenMM target; MD data cannot "
                            f"be generated or checked for it (set data.md: null to read {path} as it is)")
        md = dict(md)
        platform, threads = md.pop("platform", "CPU"), md.pop("threads", None)
        try:
            settings = MDSettings(**md)
        except TypeError as err:
            raise DataError(f"data.md: {err} (keys: {sorted(MDSettings.__dataclass_fields__)}, platform, threads)") from err
        if not is_complete(path):
            log.info("running MD into %s", path)
        try:
            run_md(self.target, path, settings, platform=platform, threads=threads, progress=self.progress)
        except MDSettingsMismatch as err:
            raise DataProvenanceError(f"data.path {path} with data.md: {err}") from err
        except MDError as err:
            raise DataError(str(err)) from err

    def _load_source(self, path: Path, md: dict[str, Any] | None
                     ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """One data source (an MD folder, an .npz file or a trajectory file): x, the reduced
        forces when forces are on and the source stores them (None: compute them from the
        energy), and each frame's chain when the source says (None: the source is one chain)."""
        if path.is_dir() or md is not None:
            return (*self._load_md_folder(path, md), None)
        if path.suffix == ".npz":
            arrays = load_npz(path, self.target.dim)
            x = arrays["x"]
            chain = arrays.get("chain")
            if chain is not None and (chain.shape != (x.shape[0],) or not np.issubdtype(chain.dtype, np.integer)):
                raise DataError(f"data file {path}: 'chain' must be an integer array of length {x.shape[0]} "
                                f"(each frame's Markov chain), got {chain.dtype} {chain.shape}")
            if not self.forces or "forces" not in arrays:
                return x, None, chain
            forces = arrays["forces"]
            if forces.shape != x.shape:
                raise DataError(f"data file {path}: 'forces' has shape {forces.shape}, 'x' has {x.shape}")
            return x, forces, chain
        if self.topology is None:
            raise DataError(f"data file {path} is a trajectory: give its topology as data.topology")
        try:
            traj = load_trajectory(path, self.topology, self.target.dim // 3)
        except MDError as err:
            raise DataError(str(err)) from err
        return traj.xyz.reshape(traj.n_frames, -1), None, None

    def compute_forces(self, x: np.ndarray | torch.Tensor, source: str = "data",
                       batch_size: int = FORCE_BATCH_SIZE) -> np.ndarray:
        """Reduced forces f = -grad_x u(x) of the target's energy, by autograd in batches."""
        x = torch.as_tensor(x, dtype=torch.get_default_dtype())
        out = np.empty(tuple(x.shape), dtype=np.float64)
        from tqdm.auto import tqdm

        with tqdm(total=x.shape[0], desc=f"forces ({source})", unit="sample", disable=not self.progress) as bar:
            with torch.inference_mode(False), torch.enable_grad():
                for start in range(0, x.shape[0], batch_size):
                    xb = x[start : start + batch_size].clone().requires_grad_(True)
                    u = self.target.energy(xb)
                    (grad,) = torch.autograd.grad(u.sum(), xb)
                    out[start : start + len(xb)] = -grad.detach().double().cpu().numpy()
                    bar.update(len(xb))
        return out

    @staticmethod
    def _check_forces(forces: np.ndarray, source: str) -> np.ndarray:
        n_bad = int((~np.isfinite(forces)).any(axis=1).sum())
        if n_bad:
            raise DataError(f"data.forces: {source}: {n_bad} of {len(forces)} samples have NaN or infinite forces")
        return forces

    def load_data(self) -> tuple[np.ndarray, np.ndarray | None]:
        """x [n, dim] of all sources and, with forces on, their reduced forces [n, dim] (else None)."""
        if self.paths:
            self.source = ", ".join(str(p) for p in self.paths)
            xs, fs, chains, n_chains = [], [], [], 0
            for p, md in zip(self.paths, self.md_list):
                x, f, chain = self._load_source(p, md)
                if self.forces:
                    f = self.compute_forces(x, str(p)) if f is None else f
                    fs.append(self._check_forces(np.asarray(f, dtype=np.float64), str(p)))
                xs.append(x)
                # chains numbered over all sources; a source without chains is one chain
                chain = np.zeros(len(x), dtype=np.int64) if chain is None else np.unique(chain, return_inverse=True)[1]
                chains.append(n_chains + chain)
                n_chains += int(chain.max()) + 1
            self.chain = np.concatenate(chains)
            return np.concatenate(xs), (np.concatenate(fs) if self.forces else None)
        path = self.cache_path()
        cached = self._load_cache(path)
        x, self.chain = cached if cached is not None else self._generate(path)
        self.source = str(path)
        f = self._check_forces(self.compute_forces(x, str(path)), str(path)) if self.forces else None
        return x, f

    def load_all(self) -> np.ndarray:
        return self.load_data()[0]

    def setup(self, stage: str | None = None) -> None:
        if self.x_train is not None:
            return
        x_all, f_all = self.load_data()
        x = torch.as_tensor(x_all, dtype=torch.get_default_dtype())
        if self.target.relabelling is not None:  # interchangeable particles: canonical order
            perm = self.target.relabelling.permutation(x)
            x = self.target.relabelling.permute(x, perm)
            if f_all is not None:
                f_all = self.target.relabelling.permute(torch.as_tensor(f_all), perm).numpy()
        if self.split == "tail":  # correlated MD frames: hold out the end of the trajectory
            perm = torch.arange(x.shape[0] - 1, -1, -1)
            n_val = max(1, int(round(self.val_fraction * x.shape[0])))
        elif self.split == "chains":
            perm, n_val = self._chain_split()
        else:
            perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.split_seed))
            n_val = max(1, int(round(self.val_fraction * x.shape[0])))
        if x.shape[0] - n_val < 1:
            raise DataError(f"only {x.shape[0]} samples: too few to split into train and validation")
        self.x_val, self.x_train = x[perm[:n_val]], x[perm[n_val:]]
        if f_all is not None:
            f = torch.as_tensor(f_all, dtype=torch.get_default_dtype())
            self.f_val, self.f_train = f[perm[:n_val]], f[perm[n_val:]]

    def _chain_split(self) -> tuple[torch.Tensor, int]:
        """(an order of the frames with the held-out chains' frames first, their number): chains
        drawn in a random order (split_seed) until val_fraction of the frames are held out."""
        chain = self.chain
        ids, counts = np.unique(chain, return_counts=True)
        if len(ids) < 2:
            raise DataError(f"data.split=chains needs data from several Markov chains, but {self.source} is one "
                            f"chain (an MD folder or trajectory without chain ids); use data.split=tail, give "
                            f"several data.path sources, or an .npz file with an integer array 'chain'")
        order = np.random.default_rng(self.split_seed).permutation(len(ids))  # chains in a random order
        target = self.val_fraction * len(chain)
        n_chains_val = min(len(ids) - 1, max(1, int(np.searchsorted(np.cumsum(counts[order]), target) + 1)))
        held_out = np.isin(chain, ids[order[:n_chains_val]])
        perm = np.concatenate([np.flatnonzero(held_out), np.flatnonzero(~held_out)])
        log.info("validation: %d of %d chains held out (%d frames)", n_chains_val, len(ids), int(held_out.sum()))
        return torch.as_tensor(perm), int(held_out.sum())

    # loaders -------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            TensorDataset(*self._tensors(self.x_train, self.f_train)),
            batch_size=min(self.batch_size, len(self.x_train)),
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self._tensors(self.x_val, self.f_val)), batch_size=1024,
                          num_workers=self.num_workers)

    def _tensors(self, x: torch.Tensor, f: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(x, f) when forces are on, (x,) otherwise."""
        if self.forces:
            if f is None:
                raise DataError("data.forces is on but no forces were loaded (call setup() first)")
            return x, f
        return (x,)
