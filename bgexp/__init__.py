"""bgexp: an experiment framework for Boltzmann generators.

Layers (arrows run one way): entry points -> training -> (flows, targets, estimators).
"""

__version__ = "0.1.0"


def _register_config_resolvers() -> None:
    """OmegaConf resolvers used by conf/config.yaml; registered on import, so that every way of
    composing the config (console scripts, the compose API in tests and notebooks) can resolve it.
    `bgexp_run_dir`: hydra.run.dir is the folder of the run being resumed (resume=<folder>), else a
    new stamped folder; `bgexp_mkdir`: a folder, created on use."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("bgexp_run_dir", lambda resume, new: str(resume) if resume else new,
                                    replace=True)
    OmegaConf.register_new_resolver("bgexp_mkdir", _mkdir, replace=True)


def _mkdir(path: str) -> str:
    """`${bgexp_mkdir:<folder>}`: the folder, created if missing (the Optuna study's SQLite file)."""
    from pathlib import Path

    Path(path).mkdir(parents=True, exist_ok=True)
    return path


_register_config_resolvers()
