"""`bgexp-train`: train a Boltzmann generator from a Hydra config (see conf/)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from bgexp.training.run import train

    results = train(cfg)
    return results.get("ess") if results else None


if __name__ == "__main__":
    main()
