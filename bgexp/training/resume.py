"""Losing nothing when a run dies: atomic checkpoints, resuming a run from its folder, one W&B run.

- `AtomicCheckpointIO`: every checkpoint is written to a temporary file in the same folder, fsynced
  and renamed over the old one (`bgexp.atomic`; `os.replace` is atomic on POSIX), so a kill at
  any moment leaves either the previous checkpoint or the new one, never a truncated file.
  (Lightning's default writes the bytes straight into the final path.)
- `resumed_config(cfg)`: `bgexp-train resume=<run folder>` continues that run in that folder: the
  run's stored, fully resolved config.yaml is the config (so the experiment, data and model are
  those of the run, whatever the defaults are today), the command line's other overrides are
  applied on top (e.g. `trainer.max_epochs=50` to train longer), and `ckpt_path` points at the
  folder's checkpoints/last.ckpt, from which Lightning restores model, optimiser, scheduler, epoch
  and step. A folder without a checkpoint (killed in its first epoch) starts again from scratch.
- `wandb_run_id(run_dir)`: the W&B run id of a run folder, created once and stored in
  `<run>/wandb_id`; the logger is created with that id and `resume="allow"`, so a resumed run
  logs into the same W&B run (offline: a second offline-run folder with the same id, which
  `wandb sync` merges into one run).
"""

from __future__ import annotations

import logging
import secrets
import string
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict

from bgexp.atomic import atomic_path, atomic_write

log = logging.getLogger(__name__)

RESOLVED_CONFIG = "config.yaml"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
WANDB_ID_FILE = "wandb_id"


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


def resumed_config(cfg: DictConfig, task_overrides: list[str] | None = None) -> DictConfig:
    """The config of the run folder `cfg.resume` with the other command-line overrides applied and
    `ckpt_path` set to its last checkpoint (see the module docstring); `cfg` when not resuming."""
    if not cfg.get("resume"):
        return cfg
    run_dir = Path(str(cfg.resume))
    stored_path = run_dir / RESOLVED_CONFIG
    if not stored_path.is_file():
        raise FileNotFoundError(f"resume={run_dir}: not a bgexp run folder (no {RESOLVED_CONFIG}); give the folder "
                                f"that holds config.yaml, checkpoints/ and results.json")
    stored = OmegaConf.load(stored_path)
    others = [o for o in (task_overrides or []) if not o.lstrip("+~").startswith(("resume=", "ckpt_path="))]
    if others:
        stored = OmegaConf.merge(stored, OmegaConf.from_dotlist([o.lstrip("+") for o in others if not o.startswith("~")]))
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
