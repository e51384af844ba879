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


# The Python API (bgexp/api.py), imported on first use so that `import bgexp` stays light.
# `bgexp.train` is also the console-script module bgexp/train.py (`bgexp-train`, `python -m bgexp.train`,
# `from bgexp.train import CONFIG_DIR`): importing a submodule sets it as an attribute of the package, so
# that module is made callable instead of hidden, and `bgexp.train(cfg)` is `bgexp.api.train(cfg)` whichever
# was imported first.
import sys as _sys  # noqa: E402
import types as _types  # noqa: E402

_API = ("load_run", "compose", "Run", "Samples", "NotARunFolderError", "WrongTaskError", "NotMolecularError")


def __getattr__(name: str):
    if name in _API:
        from bgexp import api

        return getattr(api, name)
    if name == "train":
        import importlib

        return importlib.import_module("bgexp.train")  # made callable by _Package.__setattr__ on import
    raise AttributeError(f"module 'bgexp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API, "train"})


class _TrainModule(_types.ModuleType):
    """bgexp/train.py (the `bgexp-train` console script), callable as the API's train:
    `bgexp.train(cfg, run_dir=None) -> Run` is `bgexp.api.train` (see its docstring)."""

    def __call__(self, cfg, run_dir=None):
        from bgexp.api import train

        return train(cfg, run_dir=run_dir)


class _Package(_types.ModuleType):
    """The bgexp package: a submodule `train` set on it on import becomes a `_TrainModule`."""

    def __setattr__(self, name, value):
        if name == "train" and type(value) is _types.ModuleType:
            value.__class__ = _TrainModule
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
if type(globals().get("train")) is _types.ModuleType:  # imported before this line ran
    train.__class__ = _TrainModule  # noqa: F821

__all__ = ["__version__", *_API, "train"]
