"""Generate MD training/reference data for a molecular target (OpenMM Langevin dynamics).

    python scripts/generate_md.py target=ala2 md.n_frames=20000 md.seed=1
    python scripts/generate_md.py target=bpti md.n_frames=2000 md.report_interval=250

Writes <out_dir>/{topology.pdb, metadata.json, chunks/*.dcd + *.npz, state.xml} through
`bgexp.targets.dynamics.run_md`; the frames open in VMD or PyMOL with topology.pdb. A killed run
resumes when the same command is run again. Settings: conf/generate_md.yaml.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger("generate_md")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="generate_md")
def main(cfg: DictConfig) -> None:
    from bgexp.targets.dynamics import MDSettings, run_md

    target_cfg = OmegaConf.to_container(cfg.target, resolve=True)
    target_cfg.pop("name", None)
    target_cfg["n_workers"] = 0  # MD needs no energy workers
    target = instantiate(target_cfg)
    try:
        out = run_md(target, cfg.out_dir, MDSettings(**cfg.md), platform=cfg.platform, threads=cfg.threads,
                     progress=cfg.progress)
    finally:
        target.close()
    print(f"MD data in {out}")


if __name__ == "__main__":
    main()
