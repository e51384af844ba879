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


# The Python API (bgexp/api.py), imported on first use so that `import bgexp` stays light. Its `train`
# is re-exported as `bgexp.fit`: `bgexp.train` is the console-script module bgexp/train.py
# (`bgexp-train`, `python -m bgexp.train`), which importing sets as an attribute of the package.
_API = {"load_run": "load_run", "compose": "compose", "fit": "train", "Run": "Run", "Samples": "Samples",
        "NotARunFolderError": "NotARunFolderError", "WrongTaskError": "WrongTaskError",
        "NotMolecularError": "NotMolecularError"}


def __getattr__(name: str):
    if name in _API:
        from bgexp import api

        return getattr(api, _API[name])
    raise AttributeError(f"module 'bgexp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
