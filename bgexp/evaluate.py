"""`bgexp-eval run_dir=<run folder>`: re-evaluate a checkpoint into a new results.json.

Writes <run_dir>/eval/<stamp>/results.json and figures; the run's own config rebuilds the model.
Targeted-FEP runs (configs with `tfep`) are re-evaluated by LFEP/LBAR on the run's own held-out
frames (n_samples does not apply; n_bootstrap and seed do).
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from bgexp.train import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from bgexp.training.evaluation import evaluate
    from bgexp.training.run import build_datamodule, load_run, print_summary, write_results

    start = time.time()
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if is_tfep_run(cfg.run_dir):  # targeted FEP: LFEP/LBAR of the trained map (bgexp/training/tfep_run.py)
        from bgexp.training.tfep_run import evaluate_tfep_run

        evaluate_tfep_run(cfg.run_dir, out_dir, checkpoint=cfg.checkpoint, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
        return
    run_cfg, model, ckpt = load_run(cfg.run_dir, cfg.checkpoint)
    model.seed = int(cfg.seed)
    datamodule = build_datamodule(run_cfg, model.target)
    datamodule.progress = False
    datamodule.setup()
    evaluation = evaluate(model, n_samples=cfg.n_samples, batch_size=cfg.batch_size,
                          n_bootstrap=cfg.n_bootstrap, confidence=cfg.confidence,
                          data=datamodule.x_val if cfg.get("n_data") is None else datamodule.x_val[: int(cfg.n_data)],
                          figure_dir=out_dir / "figures")
    path = write_results(out_dir, run_cfg, model, evaluation, wall_s=time.time() - start,
                         extra={"files": {"checkpoint": str(ckpt), "data": datamodule.source},
                                "evaluated_from": str(cfg.run_dir)})
    import json

    print_summary(path, json.loads(path.read_text()), None)


def is_tfep_run(run_dir: str) -> bool:
    """Whether the run folder holds a targeted-FEP experiment (its resolved config has `tfep`)."""
    from omegaconf import OmegaConf

    from bgexp.training.resume import RESOLVED_CONFIG

    path = Path(run_dir) / RESOLVED_CONFIG
    return path.is_file() and bool(OmegaConf.load(path).get("tfep"))


if __name__ == "__main__":
    main()
