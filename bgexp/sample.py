"""`bgexp-sample run_dir=<run folder> n_samples=N`: write N samples of a run's model with their log-weights.

For a Boltzmann-generator run the .npz holds x [N, dim], log_q (flow log-density), energy
(reduced, kT) and log_w = -energy - log_q (importance log-weights toward the Boltzmann density).
Tasks without a model to sample from (targeted FEP) refuse with UnsupportedOperationError.

Checked before any work (no model is built, no sample drawn):
- the settings of conf/eval.yaml, as bgexp-eval checks them (`validate_config(cfg, mode="eval")`:
  ranges such as 0 < confidence < 1, unknown keys also when added with `+`), before the run is loaded;
- `n_samples` and `batch_size` are positive integers (`1e5` is accepted as 100000; `2.5`, `0`,
  `-3`, `true` or text are a ConfigError);
- the samples fit: the memory needed is estimated as n_samples x (dim + 3) x 8 bytes x 2 (x and
  three float64 columns, held twice: the batches and their concatenation) and must not exceed
  `max_bytes` (default null: the machine's available memory, MemAvailable); the file written,
  about n_samples x (dim + 3) x 8 bytes, must fit on the disk of the output folder. Otherwise a
  `SampleSizeError` says how many samples fit (draw several files with other seeds instead).
  A first check with dim = 1 refuses an impossible n_samples (1e12) before the run's target is
  even built; the second uses the target's real dimension.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from bgexp.train import CONFIG_DIR
from bgexp.training.errors import ConfigError

# x plus log_q, energy and log_w; every value counted as 8 bytes (float64 at most)
COLUMNS_BEYOND_DIM = 3
BYTES_PER_VALUE = 8
COPIES_IN_MEMORY = 2  # the list of batches and their concatenation


class SampleSizeError(ConfigError):
    """`bgexp-sample`: the requested samples would not fit in memory (or on disk)."""


def positive_int(value: Any, key: str) -> int:
    """`value` as a positive int: ints, and floats with an integral value (Hydra reads `1e5` as
    100000.0); ConfigError naming `key` for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    if value < 1:
        raise ConfigError(f"{key} must be >= 1, got {value!r}")
    return int(value)


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (MemAvailable of /proc/meminfo, else free
    physical pages); None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def memory_bytes(n: int, dim: int) -> int:
    """The estimated peak memory of drawing `n` samples of a `dim`-dimensional target."""
    return n * (dim + COLUMNS_BEYOND_DIM) * BYTES_PER_VALUE * COPIES_IN_MEMORY


def file_bytes(n: int, dim: int) -> int:
    """The estimated size of the .npz file of `n` samples (at most)."""
    return n * (dim + COLUMNS_BEYOND_DIM) * BYTES_PER_VALUE


def _human(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n_bytes < 1000 or unit == "PB":
            return f"{n_bytes:.3g} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.3g} EB"  # unreachable


def check_size(n: int, dim: int, max_bytes: int | float | None = None, out_dir: str | Path | None = None,
               dim_known: bool = True) -> None:
    """SampleSizeError when `n` samples of a `dim`-dimensional target exceed `max_bytes` (None: the
    available memory) or the free disk space of `out_dir`."""
    what = f"a {dim}-dimensional target" if dim_known else "even a 1-dimensional target"
    limit, source = max_bytes, "max_bytes"
    if limit is None:
        limit, source = available_memory(), "the available memory"
    if limit is not None:
        need = memory_bytes(n, dim)
        if need > limit:
            fit = max(0, int(limit) // memory_bytes(1, dim))
            raise SampleSizeError(
                f"bgexp-sample: n_samples={n} of {what} needs about {_human(need)} of memory "
                f"(n_samples x (dim + {COLUMNS_BEYOND_DIM}) x {BYTES_PER_VALUE} bytes x {COPIES_IN_MEMORY}), more than "
                f"{source} ({_human(limit)}): at most n_samples={fit} fit; draw several files with other "
                f"seeds (seed=...), or raise max_bytes if the memory is there")
    if out_dir is not None:
        folder = Path(out_dir)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        if file_bytes(n, dim) > free:
            raise SampleSizeError(
                f"bgexp-sample: n_samples={n} of {what} makes a file of about {_human(file_bytes(n, dim))}, "
                f"more than the {_human(free)} free on the disk of {folder}: draw fewer samples or write "
                f"elsewhere (out=...)")


def _target_dim(run_cfg: DictConfig) -> int:
    from bgexp.training.assemble import build_target

    target = build_target(run_cfg)
    try:
        return int(target.dim)
    finally:
        target.close()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    from bgexp.training.validation import validate_config

    n = positive_int(cfg.n_samples, "n_samples")
    batch_size = positive_int(cfg.batch_size, "batch_size")
    max_bytes = cfg.get("max_bytes")
    if max_bytes is not None:
        max_bytes = positive_int(max_bytes, "max_bytes")
    cfg.n_samples, cfg.batch_size = n, batch_size  # 1e5 read as 100000.0: the count it stands for
    validate_config(cfg, mode="eval")  # the other settings (confidence, seed, unknown keys), before the run is loaded

    from bgexp.training.assemble import load_run_config
    from bgexp.training.tasks import Task, build_task

    out_dir = Path(cfg.out).parent if cfg.get("out") else Path(cfg.run_dir)
    check_size(n, 1, max_bytes, dim_known=False)  # before anything is built: no target has dim < 1
    run_cfg = load_run_config(cfg.run_dir)
    task = build_task(run_cfg)
    if type(task).sample_run is not Task.sample_run:  # the task can sample (the base class refuses)
        check_size(n, _target_dim(run_cfg), max_bytes, out_dir)
    task.sample_run(Path(cfg.run_dir), cfg)


if __name__ == "__main__":
    main()
