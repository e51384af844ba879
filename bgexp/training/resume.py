"""Losing nothing when a run dies or is resumed: atomic checkpoints, resuming a run from its folder
(whose provenance stays intact), one W&B run, run-folder paths that hold from anywhere.

- `AtomicCheckpointIO`: every checkpoint is written to a temporary file in the same folder, fsynced
  and renamed over the old one (`bgexp.atomic`; `os.replace` is atomic on POSIX), so a kill at
  any moment leaves either the previous checkpoint or the new one, never a truncated file.
  (Lightning's default writes the bytes straight into the final path.)
- `resumed_config(cfg)`: `bgexp-train resume=<run folder>` continues that run in that folder: the
  run's stored, fully resolved config.yaml (or, once resumed, the config of its latest recorded
  resume) is the config (so the experiment, data and model are those of the run, whatever the
  defaults are today, and a killed resume with `trainer.max_epochs=50` resumed again keeps going to
  50), the command line's other value overrides are
  applied on top (e.g. `trainer.max_epochs=50` to train longer; the values as Hydra parsed them),
  and `ckpt_path` points at the folder's checkpoints/last.ckpt, from which Lightning restores
  model, optimiser, scheduler, epoch and step. A folder without a checkpoint (killed in its first
  epoch) starts again from scratch. `experiment=`, `ckpt_path=` or another config-group choice
  (`loss=nll`) given with `resume=` is a `ResumeError` naming both keys: a resumed run keeps its
  experiment, its groups and its own checkpoint.
- Provenance that cannot be lost: a run folder's config.yaml and Hydra's `.hydra/` (config,
  overrides) are written once, by the fresh run. A resume writes nothing until it is checked
  completely (bgexp.training.run: the stored config merged, the checkpoint read and loaded into the
  module built from the merged config); then `record_resume` writes its own overrides and resolved
  config to `<run>/resumes/<stamp>/` (overrides.yaml, resolved.yaml; not named config.yaml, which
  marks a run folder for bgexp-summarize). `RunFolderCallback` (a Hydra callback, conf/config.yaml)
  turns Hydra's own `.hydra/` output off for a resumed job, whose run folder is the old one.
- Paths: `absolute_paths` makes every path value of a config (paths.*, keys named path, dir, file,
  topology or ending in _path, _dir, _file) absolute before config.yaml is stored, so bgexp-eval,
  bgexp-sample and a resume read the same data from any working directory. A copied or moved run
  folder resumed with `resume=<copy>` writes into the copy: values that pointed into the folder the
  run was made in (Hydra's `.hydra/hydra.yaml` runtime.output_dir, else paths.output_dir, the run
  folder outside Hydra) are rewritten to the folder being resumed (`rebase_run_folder`).
- `check_output_dir`: an empty `paths.output_dir` (`BGEXP_OUTPUT_DIR=` sets it to ""; runs would go
  to /runs and /data) or one that is a file or not writable is an `OutputDirError` before any work
  (and, through `RunFolderCallback`, before Hydra creates a folder).
- `wandb_run_id(run_dir)`: the W&B run id of a run folder, created once and stored in
  `<run>/wandb_id`; the logger is created with that id and `resume="allow"`, so a resumed run
  logs into the same W&B run (offline: a second offline-run folder with the same id, which
  `wandb sync` merges into one run).
"""

from __future__ import annotations

import logging
import os
import secrets
import string
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from bgexp.atomic import atomic_path, atomic_write
from bgexp.training.errors import ConfigError

log = logging.getLogger(__name__)

RESOLVED_CONFIG = "config.yaml"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
WANDB_ID_FILE = "wandb_id"
RESUMES_DIR = "resumes"
RESUMED_CONFIG = "resolved.yaml"  # in <run>/resumes/<stamp>/, beside overrides.yaml
HYDRA_RECORD = Path(".hydra") / "hydra.yaml"
# keys whose values are file-system paths (besides everything under `paths`)
PATH_KEYS = ("path", "dir", "file", "topology", "structure_file")
PATH_SUFFIXES = ("_path", "_dir", "_file", "_paths", "_dirs", "_files")
# keys that hold a path or else a name (a PDB id): made absolute only when the file exists
PATH_OR_NAME_KEYS = ("source",)
# keys given with resume= that are refused: the run's experiment and its own checkpoint are fixed
RESUME_FIXED_KEYS = ("experiment", "ckpt_path")


class ResumeError(ConfigError):
    """`resume=<run folder>` was given with something a resumed run cannot take (`experiment=`,
    `ckpt_path=`, a config-group choice), or the run's checkpoint does not fit its merged config."""


class OutputDirError(ConfigError):
    """`paths.output_dir` (BGEXP_OUTPUT_DIR) is empty, a file, or not writable."""


def _atomic_checkpoint_io() -> type:
    """`AtomicCheckpointIO`, defined on first use: this module is imported by Hydra (RunFolderCallback)
    before every run, and Lightning takes seconds to import (a config error is reported before)."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Checkpoints written through `bgexp.atomic.atomic_path` (see the module docstring)."""

        def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
            with atomic_path(path) as tmp:
                super().save_checkpoint(checkpoint, tmp, storage_options=storage_options)

        def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
            """Lightning's resume load, always weights-only (a checkpoint never runs code; see
            bgexp.training.artifacts.read_checkpoint, which checks the file first)."""
            kwargs = {} if map_location is None else {"map_location": map_location}
            return super().load_checkpoint(path, weights_only=True, **kwargs)

    AtomicCheckpointIO.__module__, AtomicCheckpointIO.__qualname__ = __name__, "AtomicCheckpointIO"
    return AtomicCheckpointIO


_LAZY: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    if name == "AtomicCheckpointIO":
        if name not in _LAZY:
            _LAZY[name] = _atomic_checkpoint_io()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# resume -------------------------------------------------------------------------------------------
def resume_folder(cfg: DictConfig) -> Path:
    """The run folder of `resume=`, absolute as Hydra makes its run folder (hydra.run.dir)."""
    return Path(os.path.abspath(str(cfg.resume)))


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)


def resumed_config(cfg: DictConfig, task_overrides: list[str] | None = None,
                   groups: Iterable[str] = ()) -> DictConfig:
    """The config of the run folder `cfg.resume` with the other command-line overrides (`cfg`, as
    composed, holds their values) applied and `ckpt_path` set to its last checkpoint (see the module
    docstring); `cfg` when not resuming. `groups`: the config groups (Hydra's runtime.choices), whose
    choice a resume cannot change. Reads only: nothing is written."""
    if not cfg.get("resume"):
        return cfg
    check_not_multirun(cfg)
    run_dir = resume_folder(cfg)
    overrides = [o for o in _parse(list(task_overrides or [])) if o.key_or_group != "resume"]
    refused = [o for o in overrides if o.key_or_group in RESUME_FIXED_KEYS or o.key_or_group in set(groups)]
    if refused:
        raise ResumeError(f"resume={cfg.resume} continues that run as it was made; it cannot be given with:\n  "
                          + "\n  ".join(_refusal(o.input_line, o.key_or_group) for o in refused))
    stored_path = run_dir / RESOLVED_CONFIG
    if not stored_path.is_file():
        raise FileNotFoundError(f"resume={cfg.resume}: not a bgexp run folder (no {RESOLVED_CONFIG}); give the folder "
                                f"that holds config.yaml, checkpoints/ and results.json")
    original = OmegaConf.load(stored_path)
    latest = latest_resume(run_dir)  # a run resumed before continues with that resume's config
    stored = OmegaConf.load(latest) if latest else original
    origins = {made_in(run_dir, original), Path(str(stored.resume)) if latest and stored.get("resume") else None}
    for origin in sorted((o for o in origins if o is not None and o != run_dir), key=lambda o: -len(str(o))):
        log.info("resume=%s: the run was made or last resumed in %s; its paths into that folder now point into %s",
                 run_dir, origin, run_dir)
        stored = OmegaConf.create(rebase_run_folder(OmegaConf.to_container(stored), origin, run_dir))
    with open_dict(stored):
        for o in overrides:
            if o.is_delete():
                _delete(stored, o.key_or_group)
            else:
                OmegaConf.update(stored, o.key_or_group, _composed_value(cfg, o.key_or_group), merge=False,
                                 force_add=True)
    checkpoint = run_dir / LAST_CHECKPOINT
    with open_dict(stored):
        stored.resume = str(run_dir)
        stored.ckpt_path = str(checkpoint) if checkpoint.is_file() else None
        if "hydra" in cfg:
            stored.hydra = cfg.hydra
    if checkpoint.is_file():
        log.info("resuming %s from %s", run_dir, checkpoint)
    else:
        log.warning("resume=%s: no %s yet (killed in its first epoch?); training starts again", run_dir, LAST_CHECKPOINT)
    return stored


def check_not_multirun(cfg: DictConfig, multirun: bool | None = None) -> None:
    """`resume=` in a multirun (`-m`) is a ResumeError: Hydra would run the member in a new sweep
    subfolder, not in the run folder being resumed. `multirun`: None asks Hydra."""
    if not cfg.get("resume"):
        return
    if multirun is None:
        from bgexp.training.launch import is_multirun

        multirun = is_multirun()
    if multirun:
        raise ResumeError(f"resume={cfg.resume} cannot run in a multirun (-m): the sweep would train in a new sweep "
                          f"subfolder, not in the run folder. Resume each member on its own, without -m: "
                          f"`bgexp-train resume=<member folder>` (one command per member)")


def _refusal(line: str, key: str) -> str:
    if key == "experiment":
        return (f"`{line}` with `resume=`: a resumed run keeps its own experiment (stored in its config.yaml); "
                f"to train another experiment start a new run: drop `resume=`")
    if key == "ckpt_path":
        return (f"`{line}` with `resume=`: a resumed run continues from its own {LAST_CHECKPOINT}; to start "
                f"from another checkpoint start a new run with `ckpt_path=` and without `resume=`")
    return (f"`{line}` with `resume=`: a resumed run keeps its config groups ({key} is one); override single "
            f"values ({key}.<key>=...) or start a new run without `resume=`")


def _composed_value(cfg: DictConfig, key: str) -> Any:
    """The value of `key` in the composed config (Hydra's parse of the override), resolved."""
    node = OmegaConf.select(cfg, key, throw_on_missing=True)
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _delete(cfg: DictConfig, key: str) -> None:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if isinstance(node, DictConfig) and leaf in node:
        del node[leaf]


def run_config_path(run_dir: str | Path) -> Path:
    """The config a run folder's results come from: the resolved config of its latest recorded resume
    (a resume's overrides, e.g. trainer.max_epochs=50, are part of the run's results and config
    hash), else the fresh run's config.yaml."""
    return latest_resume(Path(run_dir)) or Path(run_dir) / RESOLVED_CONFIG


def latest_resume(run_dir: Path) -> Path | None:
    """The resolved config of the run folder's latest recorded resume (`record_resume`), if any."""
    found = sorted((Path(run_dir) / RESUMES_DIR).glob(f"*/{RESUMED_CONFIG}"))
    return found[-1] if found else None


def made_in(run_dir: Path, stored: DictConfig) -> Path | None:
    """The folder a run was made in: Hydra's runtime.output_dir of the fresh run, else (a run made
    outside Hydra, where the run folder is paths.output_dir) paths.output_dir."""
    record = Path(run_dir) / HYDRA_RECORD
    if record.is_file():
        try:
            value = OmegaConf.select(OmegaConf.load(record), "hydra.runtime.output_dir")
        except Exception:  # noqa: BLE001 (a damaged record: fall back)
            value = None
        if value:
            return Path(str(value))
    value = OmegaConf.select(stored, "paths.output_dir", default=None)
    return Path(str(value)) if value and os.path.isabs(str(value)) and not (Path(run_dir) / ".hydra").is_dir() else None


def rebase_run_folder(node: Any, old: str | Path, new: str | Path) -> Any:
    """`node` (plain containers) with every string that is `old` or a path below it moved to `new`."""
    old, new = str(old).rstrip("/"), str(new).rstrip("/")
    if isinstance(node, dict):
        return {k: rebase_run_folder(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [rebase_run_folder(v, old, new) for v in node]
    if isinstance(node, str) and (node == old or node.startswith(old + "/")):
        return new + node[len(old):]
    return node


def record_resume(run_dir: Path, cfg: DictConfig, task_overrides: list[str]) -> Path:
    """`<run>/resumes/<stamp>/`: this resume's command-line overrides (overrides.yaml, as Hydra writes
    them) and the resolved config it runs with (resolved.yaml). Written after the resume is checked."""
    folder = Path(run_dir) / RESUMES_DIR / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    atomic_write(folder / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(task_overrides))))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    atomic_write(folder / RESUMED_CONFIG, OmegaConf.to_yaml(OmegaConf.create(resolved)))
    return folder


# paths --------------------------------------------------------------------------------------------
def _is_path_key(key: str) -> bool:
    return key in PATH_KEYS or key.endswith(PATH_SUFFIXES)


def _absolute(value: Any, must_exist: bool = False) -> Any:
    if isinstance(value, list):
        return [_absolute(v, must_exist) for v in value]
    if not isinstance(value, str) or not value or "://" in value or os.path.isabs(value):
        return value
    expanded = os.path.expanduser(value)
    if must_exist and not os.path.exists(expanded):
        return value
    return os.path.abspath(expanded)


def absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """`config` (the plain containers of a resolved config) with its path values absolute, relative
    paths taken from the working directory (module docstring): every leaf of `paths` and the values
    of path-named keys anywhere; the `hydra` node is left alone."""
    out = _absolute_below(config, every_leaf=False)
    if isinstance(config.get("paths"), dict):
        out["paths"] = _absolute_below(config["paths"], every_leaf=True)
    return out


def _absolute_below(node: dict[str, Any], every_leaf: bool) -> dict[str, Any]:
    out = {}
    for key, value in node.items():
        name = str(key)
        if name == "hydra":
            out[key] = value
        elif isinstance(value, dict):
            out[key] = _absolute_below(value, every_leaf)
        elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
            out[key] = [_absolute_below(v, every_leaf) if isinstance(v, dict) else v for v in value]
        elif every_leaf or _is_path_key(name):
            out[key] = _absolute(value)
        elif name in PATH_OR_NAME_KEYS:
            out[key] = _absolute(value, must_exist=True)
        else:
            out[key] = value
    return out


def check_output_dir(cfg: DictConfig) -> None:
    """`paths.output_dir` and `paths.data_dir` are folders bgexp can write to (module docstring)."""
    paths = cfg.get("paths")
    if paths is None:
        return
    for key in ("output_dir", "data_dir"):
        if key not in paths:
            continue
        value = paths[key]
        name = f"paths.{key}"
        if value is None or not str(value).strip():
            env = " (the environment variable BGEXP_OUTPUT_DIR is set to an empty string)" \
                if os.environ.get("BGEXP_OUTPUT_DIR", None) == "" else ""
            raise OutputDirError(f"{name} is empty{env}: runs and data would be written to /runs and /data; "
                                 f"set BGEXP_OUTPUT_DIR to a folder (or unset it: ./outputs) or give paths.output_dir=<folder>")
        path = Path(os.path.abspath(os.path.expanduser(str(value))))
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            what = "is a file" if existing == path else f"lies below {existing}, which is a file"
            raise OutputDirError(f"{name}={value} {what}, not a folder: give a folder for runs and data "
                                 f"(BGEXP_OUTPUT_DIR or paths.output_dir=<folder>)")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OutputDirError(f"{name}={value}: {existing} is not writable by this user: give a folder you can "
                                 f"write to (BGEXP_OUTPUT_DIR or paths.output_dir=<folder>)")


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover (hydra-core < 1.1)
    _HydraCallback = object


class RunFolderCallback(_HydraCallback):
    """Hydra callback (conf/config.yaml hydra.callbacks), before Hydra makes or touches a folder: an
    unusable output directory ends the command (`check_output_dir`), and a resumed job (`resume=`,
    whose run folder is the old one) writes no `.hydra/` there, so the run's original config and
    overrides stay as they were (its own record: `record_resume`).

    Hydra turns an exception of a callback into a warning and goes on (and would create /runs for
    an empty output directory), so the OutputDirError leaves as SystemExit with its name and message
    (exit status 1); run_experiment raises the OutputDirError itself where Hydra is not involved."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_on_bad_output_dir(config)
        if config.get("resume"):
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_on_bad_output_dir(config)
        try:  # before the sweep makes a folder
            check_not_multirun(config, multirun=True)
        except ResumeError as err:
            raise SystemExit(f"{type(err).__name__}: {err}") from err


def _exit_on_bad_output_dir(config: DictConfig) -> None:
    try:
        check_output_dir(config)
    except OutputDirError as err:
        raise SystemExit(f"{type(err).__name__}: {err}") from err


def wandb_run_id(run_dir: Path) -> str:
    """The run folder's W&B run id, created (8 lowercase letters and digits) and stored on first use."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file():
        text = path.read_text().strip()
        if text:
            return text
    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    atomic_write(path, run_id + "\n")
    return run_id


def absolute_config(cfg: DictConfig) -> DictConfig:
    """`cfg` resolved, with its paths absolute (`absolute_paths`); struct as `cfg` was."""
    out = OmegaConf.create(absolute_paths(OmegaConf.to_container(cfg, resolve=True)))
    OmegaConf.set_struct(out, bool(OmegaConf.is_struct(cfg)))
    return out


def write_run_config(run_dir: Path, cfg: DictConfig) -> Path:
    """The run folder's config.yaml (resolved, without `hydra`), written once by the fresh run: a
    folder that holds one already is refused, never overwritten."""
    path = Path(run_dir) / RESOLVED_CONFIG
    if path.exists():
        raise ConfigError(f"{run_dir} holds a run already ({RESOLVED_CONFIG}); a run folder's config is written once: "
                          f"continue that run with `bgexp-train resume={run_dir}` or start a new run in a new folder")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    return atomic_write(path, OmegaConf.to_yaml(OmegaConf.create(resolved)))


def check_checkpoint_fits(module, path: str | Path) -> None:
    """The checkpoint's weights load into `module`, built from the config that is to continue it
    (a ResumeError otherwise, before anything is written)."""
    from bgexp.training.artifacts import read_checkpoint

    checkpoint = read_checkpoint(path)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise ResumeError(f"checkpoint {path} does not fit the model built from this config (nothing was written; "
                          f"drop the overrides that change the model): {err}") from err
