"""`bgexp-sample run_dir=<run folder> n_samples=N`: write N flow samples with their log-weights.

The .npz holds x [N, dim], log_q (flow log-density), energy (reduced, kT) and
log_w = -energy - log_q (importance log-weights toward the Boltzmann density).
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from bgexp.train import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    from bgexp.estimators import ess, log_weights
    from bgexp.training.evaluation import draw_samples
    from bgexp.training.run import load_run

    if cfg.n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {cfg.n_samples}")
    _, model, _ = load_run(cfg.run_dir, cfg.checkpoint)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    x, log_q, u = draw_samples(model, int(cfg.n_samples), int(cfg.batch_size), generator)
    log_w = log_weights(u, log_q)
    out = Path(cfg.out) if cfg.out else Path(cfg.run_dir) / f"samples-{time.strftime('%Y%m%d-%H%M%S')}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, x=x.numpy(), log_q=log_q.double().numpy(), energy=u.double().numpy(), log_w=log_w)
    print(f"wrote {len(x)} samples (ESS {100 * ess(log_w):.2f}%) to {out}", flush=True)


if __name__ == "__main__":
    main()
