"""`bgexp-eval run_dir=<run folder>`: re-evaluate a checkpoint into a new results.json.

Writes <run_dir>/eval/<stamp>/results.json and figures; the run's own config rebuilds the model,
and the run's task (config group `task/`) evaluates it: a Boltzmann generator by importance
sampling with `n_samples` fresh samples, a targeted-FEP map by LFEP/LBAR on the run's own
held-out frames (`n_samples` does not apply; `n_bootstrap` and `seed` do).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from bgexp.train import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from bgexp.training.assemble import load_run_config
    from bgexp.training.tasks import build_task
    from bgexp.training.validation import validate_config

    validate_config(cfg, mode="eval")  # the eval settings, before the run is loaded

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    task = build_task(load_run_config(cfg.run_dir))
    task.evaluate_run(Path(cfg.run_dir), out_dir, cfg)


if __name__ == "__main__":
    main()
