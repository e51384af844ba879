"""What a run leaves in its folder: the results schema, results.json, checkpoints, the config hash.

Results schema (ARCHITECTURE.md, Contracts): every task writes one `Results`, validated when
written and when read:

    experiment, config_hash, seed, ess, n_samples,
    delta_f: {name: {value, ci_low, ci_high, confidence, reference, reference_source, ...}},
    nll_test (None where the task has no held-out data of the target),
    n_energy_evals: {training, evaluation[, smc]}, wall_s, figures: {name: path}, files: {name: path},

plus optional named blocks (`OPTIONAL_BLOCKS`: metrics, training, tfep, smc, evaluated_from,
n_nonfinite_energies). `bgexp-summarize`, the benchmarks and the tests read results.json through
`read_results`; nothing parses logs.

Checkpoints are read with `torch.load(weights_only=True)` only (`read_checkpoint`): a file that is
not a PyTorch zip archive with a pickle inside is a `CheckpointReadError` before anything is
unpickled, and one whose pickle needs a global outside torch's weights-only allow-list (plus
`CHECKPOINT_SAFE_GLOBALS`) is an `UnsafeCheckpointError` naming the globals; nothing in it runs.
What bgexp's checkpoints hold (Lightning's epoch/step/loops/callback states/optimizer and scheduler
state dicts, tensors, `bgexp_config`: the resolved config as plain containers, `bgexp_counters`:
ints) is all within torch's default allow-list, so `CHECKPOINT_SAFE_GLOBALS` is empty; a global
that a future checkpoint needs is added there (and so registered with
`torch.serialization.add_safe_globals`, which Lightning's own `trainer.fit(ckpt_path=...)` load,
weights-only by default with torch >= 2.6, sees too).
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from bgexp.atomic import write_json_atomic
from bgexp.training.errors import ConfigError, ResultsError

# the parts of a config that fix the model's structure: a checkpoint only fits a config whose parts agree
MODEL_KEYS = ("target", "flow")
# config keys that do not change results (left out of the config hash)
UNHASHED_KEYS = ("hydra", "paths", "ckpt_path", "logger", "resume", "optimized_metric")
OPTIONAL_BLOCKS = ("metrics", "training", "tfep", "smc", "evaluated_from", "n_nonfinite_energies", "temperatures")
RESULTS_FILE = "results.json"
FAILURE_FILE = "failed.json"  # a run that failed or was stopped: the error, its traceback, the reason


def config_hash(cfg: DictConfig) -> str:
    """sha256 of the resolved config without the parts that do not change results (`UNHASHED_KEYS`
    and data.cache_dir); first 12 hex digits."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in UNHASHED_KEYS:
        container.pop(key, None)
    container.get("data", {}).pop("cache_dir", None)
    blob = json.dumps(container, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# results schema -----------------------------------------------------------------------------------
@dataclass
class Results:
    """One run's results (module docstring); `blocks` holds the optional named blocks."""

    experiment: str | None
    config_hash: str
    seed: int
    ess: float | None
    n_samples: int
    delta_f: dict[str, dict[str, Any]]
    nll_test: float | None
    n_energy_evals: dict[str, int]
    wall_s: float
    figures: dict[str, str] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)
    blocks: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ResultsError naming the first field that breaks the schema."""
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ResultsError(f"results: {what}")

        need(isinstance(self.config_hash, str) and len(self.config_hash) > 0, "config_hash must be a non-empty string")
        need(_is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        need(self.ess is None or (_is_number(self.ess) and (not math.isfinite(self.ess) or 0 <= self.ess <= 1 + 1e-9)),
             f"ess must be a fraction in [0, 1] or null, got {self.ess!r}")
        need(_is_int(self.n_samples) and self.n_samples >= 0, f"n_samples must be an integer >= 0, got {self.n_samples!r}")
        need(isinstance(self.delta_f, dict), "delta_f must be a mapping name -> estimate")
        for name, entry in self.delta_f.items():
            need(isinstance(entry, dict) and "value" in entry, f"delta_f[{name!r}] needs a `value` (null if undefined)")
            for key in ("value", "ci_low", "ci_high", "reference"):
                need(entry.get(key) is None or _is_number(entry[key]), f"delta_f[{name!r}].{key} must be a number or null")
        need(self.nll_test is None or _is_number(self.nll_test), "nll_test must be a number or null")
        need(isinstance(self.n_energy_evals, dict) and {"training", "evaluation"} <= set(self.n_energy_evals),
             "n_energy_evals needs `training` and `evaluation`")
        need(all(v is None or _is_int(v) for v in self.n_energy_evals.values()), "n_energy_evals values must be integers")
        need(_is_number(self.wall_s) and self.wall_s >= 0, f"wall_s must be a number >= 0, got {self.wall_s!r}")
        need(isinstance(self.figures, dict) and isinstance(self.files, dict), "figures and files must be mappings")
        unknown = set(self.blocks) - set(OPTIONAL_BLOCKS)
        need(not unknown, f"unknown blocks {sorted(unknown)} (allowed: {list(OPTIONAL_BLOCKS)})")

    def to_dict(self) -> dict[str, Any]:
        out = {"experiment": self.experiment, "config_hash": self.config_hash, "seed": int(self.seed),
               "ess": self.ess, "n_samples": int(self.n_samples), "delta_f": self.delta_f, "nll_test": self.nll_test,
               "n_energy_evals": self.n_energy_evals, "wall_s": self.wall_s}
        out.update(self.blocks)
        out.update({"figures": self.figures, "files": self.files})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "results") -> "Results":
        if not isinstance(data, dict):
            raise ResultsError(f"{source}: not a JSON object")
        required = ("experiment", "config_hash", "seed", "ess", "n_samples", "delta_f", "nll_test", "n_energy_evals",
                    "wall_s")
        missing = [k for k in required if k not in data]
        if missing:
            raise ResultsError(f"{source}: missing {missing}")
        known = set(required) | {"figures", "files"}
        blocks = {k: v for k, v in data.items() if k not in known}
        try:
            return cls(**{k: data[k] for k in required}, figures=data.get("figures") or {},
                       files=data.get("files") or {}, blocks=blocks)
        except ResultsError as err:
            raise ResultsError(f"{source}: {err}") from err


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def write_results(path: Path, results: Results) -> dict[str, Any]:
    """Validate `results`, write them atomically as JSON (non-finite floats as null), return what a
    reader of the file will see."""
    results.validate()
    write_json_atomic(path, results.to_dict())
    return json.loads(Path(path).read_text())


def read_results(path: str | Path) -> Results:
    """results.json through the schema; ResultsError names the file and the broken field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ResultsError(f"{path}: cannot be read as JSON ({type(err).__name__}: {err})") from err
    return Results.from_dict(data, source=str(path))


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
    if not _is_number(node):
        return float("nan")
    value = float(node)
    return abs(value) if take_abs else value


# checkpoints ----------------------------------------------------------------------------------------
def checkpoint_path(run_dir: str | Path, checkpoint: str) -> Path:
    """The file of `checkpoint`: "last" or "best" of the run folder, or else a path."""
    return Path(run_dir) / "checkpoints" / f"{checkpoint}.ckpt" if checkpoint in ("last", "best") else Path(checkpoint)


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


class CheckpointReadError(ConfigError):
    """A file given as a checkpoint is not one bgexp can read (not a PyTorch archive, truncated, or
    not a Lightning checkpoint)."""


class UnsafeCheckpointError(CheckpointReadError):
    """A checkpoint whose unpickling needs globals outside the weights-only allow-list (a crafted
    or foreign file); refused without running any of it."""


# globals bgexp's own checkpoints need beyond torch's weights-only defaults (module docstring): none
CHECKPOINT_SAFE_GLOBALS: tuple[Any, ...] = ()
if CHECKPOINT_SAFE_GLOBALS:
    torch.serialization.add_safe_globals(list(CHECKPOINT_SAFE_GLOBALS))


def _check_archive(path: Path) -> None:
    """A PyTorch checkpoint is a zip archive with one `<name>/data.pkl` (torch.save's format since
    1.6); anything else is refused before any unpickling."""
    what = (f"checkpoint {path} cannot be read: it is not a PyTorch checkpoint (torch.save's zip archive "
            f"with a data.pkl); nothing in it was loaded or run")
    try:
        if not zipfile.is_zipfile(path):
            raise CheckpointReadError(what)
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as err:
        raise CheckpointReadError(f"{what} ({type(err).__name__}: {err})") from err
    if not any(name.endswith("data.pkl") for name in names):
        raise CheckpointReadError(what)


def _unsafe_globals(path: Path) -> list[str]:
    """The globals the checkpoint's pickle needs beyond the allowed ones, found without unpickling
    (torch >= 2.5; empty where unavailable)."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:
        return []
    try:
        return list(finder(path))
    except Exception:  # noqa: BLE001 (only for the message)
        return []


def read_checkpoint(path: str | Path, cfg: DictConfig | None = None) -> dict[str, Any]:
    """Load a checkpoint weights-only (module docstring) and (given `cfg`) check it belongs to it;
    named errors for missing (FileNotFoundError), unreadable or foreign (CheckpointReadError),
    crafted (UnsafeCheckpointError) and mismatched (ConfigError) files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    _check_archive(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the weights-only unpickler met a global it does not allow
        found = _unsafe_globals(path)
        names = f" ({', '.join(found)})" if found else ""
        raise UnsafeCheckpointError(
            f"checkpoint {path} is refused: unpickling it needs globals or operations that a weights-only load "
            f"does not allow{names}; "
            f"it was not loaded and nothing in it was run. Use a checkpoint written by bgexp-train") from err
    except Exception as err:  # a truncated or damaged archive
        raise CheckpointReadError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointReadError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict)")
    if cfg is not None:
        check_checkpoint_config(checkpoint, cfg, path)
    return checkpoint


def load_checkpoint_into(module: pl.LightningModule, cfg: DictConfig | None, path: str | Path) -> dict[str, Any]:
    """Weights and counters of the checkpoint at `path` into `module` (checked against `cfg` when given)."""
    checkpoint = read_checkpoint(path, cfg)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise ConfigError(f"checkpoint {path} does not fit the model: {err}") from err
    module.on_load_checkpoint(checkpoint)
    return checkpoint


__all__ = ["Results", "config_hash", "write_results", "read_results", "objective", "checkpoint_path",
           "check_checkpoint_config", "ConfigInCheckpoint", "read_checkpoint", "load_checkpoint_into", "MODEL_KEYS",
           "RESULTS_FILE", "CheckpointReadError", "UnsafeCheckpointError", "CHECKPOINT_SAFE_GLOBALS"]
