"""`bgexp-sample run_dir=<run folder> n_samples=N`: write N samples of a run's model with their log-weights.

For a Boltzmann-generator run the .npz holds x [N, dim], log_q (flow log-density), energy
(reduced, kT) and log_w = -energy - log_q (importance log-weights toward the Boltzmann density).
Tasks without a model to sample from (targeted FEP) refuse with UnsupportedOperationError.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from bgexp.train import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    from bgexp.training.assemble import load_run_config
    from bgexp.training.tasks import build_task

    if cfg.n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {cfg.n_samples}")
    task = build_task(load_run_config(cfg.run_dir))
    task.sample_run(Path(cfg.run_dir), cfg)


if __name__ == "__main__":
    main()
