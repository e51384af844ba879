"""Safe loading: crafted checkpoints never run, `_target_`s are restricted to an allow-list.

A crafted pickle (an object whose __reduce__ would create a marker file) given as `ckpt_path`, or
put in a run folder as checkpoints/last.ckpt, is refused with a named error and the marker file
never appears: by read_checkpoint and through bgexp-train (ckpt_path=, resume=) and bgexp-eval. A
`_target_` outside the allow-list (bgexp/training/allowlist.py) is a ForbiddenTargetError through
the compose API, a run folder's config and the command line (before any data generation); what a
user allows with BGEXP_ALLOWED_TARGETS or allow_targets() is built.
"""

from __future__ import annotations

import os
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bgexp.targets import DimerTarget
from bgexp.train import CONFIG_DIR
from bgexp.training import allowlist
from bgexp.training.allowlist import ForbiddenTargetError, allow_targets, check_target
from bgexp.training.artifacts import (
    CheckpointReadError,
    UnsafeCheckpointError,
    read_checkpoint,
)
from bgexp.training.assemble import (
    build_callbacks,
    build_logger,
    build_model,
    build_target,
    load_run_config,
)
from bgexp.training.errors import ConfigError
from bgexp.training.tasks import build_task

pytestmark = pytest.mark.bad_input  # every test here is a crafted file or a forbidden target


def compose_cfg(overrides=()):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


# crafted checkpoints ---------------------------------------------------------------------------------
class SystemPayload:
    """Unpickled, this would run `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ExecPayload(SystemPayload):
    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def write_payload(path: Path, marker: Path, kind: str = "torch") -> Path:
    """A crafted checkpoint: torch.save's archive holding the payload in a Lightning-like dict
    ("torch"), the same with exec ("exec"), or a bare pickle ("pickle")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": SystemPayload(marker)}))
    else:
        payload = ExecPayload(marker) if kind == "exec" else SystemPayload(marker)
        torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": payload, "global_step": 0}, path)
    return path


@pytest.mark.parametrize("kind, error", [("torch", UnsafeCheckpointError), ("exec", UnsafeCheckpointError),
                                         ("pickle", CheckpointReadError)])
def test_read_checkpoint_never_runs_a_crafted_pickle(tmp_path, kind, error):
    marker = tmp_path / "marker"
    path = write_payload(tmp_path / "crafted.ckpt", marker, kind)
    with pytest.raises(error) as err:
        read_checkpoint(path)
    assert not marker.exists()
    assert isinstance(err.value, ConfigError) and str(path) in str(err.value)
    assert "nothing in it was" in str(err.value)
    if error is UnsafeCheckpointError:
        assert ("posix.system" if kind == "torch" else "builtins.exec") in str(err.value)


def test_real_checkpoints_load_weights_only(tiny_run):
    run_dir = tiny_run["run_dir"]
    cfg = load_run_config(run_dir)
    for name in ("last", "best"):
        path = run_dir / "checkpoints" / f"{name}.ckpt"
        torch.load(path, map_location="cpu", weights_only=True)  # nothing beyond torch's defaults is needed
        checkpoint = read_checkpoint(path, cfg)
        assert checkpoint["state_dict"] and checkpoint["bgexp_config"]["target"] == OmegaConf.to_container(cfg.target)


def _copied_run_with_payload(tiny_run, tmp_path: Path, marker: Path) -> Path:
    run = tmp_path / "copied_run"
    shutil.copytree(tiny_run["run_dir"], run, ignore=shutil.ignore_patterns("wandb", "eval"))
    write_payload(run / "checkpoints" / "last.ckpt", marker)
    return run


def _data_cache(tiny_run) -> str:
    """The tiny run's data folder: the CLI runs below reuse its MC data instead of generating it."""
    return f"paths.data_dir={tiny_run['tmp'] / 'outputs' / 'data'}"


def test_train_refuses_a_crafted_ckpt_path(tiny_run, tmp_path):
    marker = tmp_path / "marker"
    payload = write_payload(tmp_path / "crafted.ckpt", marker)
    proc = run_cli("bgexp-train", [*TINY, "logger=none", _data_cache(tiny_run), f"ckpt_path={payload}"], tmp_path)
    assert proc.returncode != 0
    assert "UnsafeCheckpointError" in proc.stderr and "posix.system" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists()
    assert not list((tmp_path / "outputs" / "runs").rglob("results.json"))


def test_resume_and_eval_refuse_a_crafted_last_checkpoint(tiny_run, tmp_path):
    marker = tmp_path / "marker"
    run = _copied_run_with_payload(tiny_run, tmp_path, marker)
    proc = run_cli("bgexp-eval", [f"run_dir={run}", "n_samples=100", "n_bootstrap=5"], tmp_path)
    assert proc.returncode != 0
    assert "UnsafeCheckpointError" in proc.stderr and str(run / "checkpoints" / "last.ckpt") in proc.stderr, \
        proc.stderr[-3000:]
    assert not marker.exists()
    proc = run_cli("bgexp-train", [f"resume={run}"], tmp_path)
    assert proc.returncode != 0
    assert "UnsafeCheckpointError" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists()


# the _target_ allow-list ----------------------------------------------------------------------------
@pytest.mark.parametrize("override, key, value", [
    ("target._target_=builtins.print", "target._target_", "builtins.print"),
    ("optim._target_=os.system", "optim._target_", "os.system"),
    ("optim._target_=collections.OrderedDict", "optim._target_", "collections.OrderedDict"),
    ("+callbacks.evil={_target_:builtins.exec,_args_:[x]}", "callbacks.evil._target_", "builtins.exec"),
    ("+flow.transform.extra={_target_:builtins.print}", "flow.transform.extra._target_", "builtins.print"),
    ("task._target_=builtins.dict", "task._target_", "builtins.dict"),
    ("optim._target_=bgexp.atomic.os.system", "optim._target_", "bgexp.atomic.os.system"),  # an alias
])
def test_a_target_outside_the_allow_list_is_refused_before_anything_is_built(override, key, value):
    with pytest.raises(ForbiddenTargetError) as err:
        build_task(compose_cfg([override]))
    message = str(err.value)
    assert isinstance(err.value, ConfigError)
    assert f"{key}={value!r} is refused" in message and f"{allowlist.ENV_VAR}=" in message
    if "atomic.os" in override:
        assert "resolves to posix.system" in message and f"{allowlist.ENV_VAR}=posix.system" in message


def test_each_builder_checks_its_node(capsys):
    target, data = DimerTarget(), None
    with pytest.raises(ForbiddenTargetError, match=r"target\._target_='builtins\.print'"):
        build_target(OmegaConf.create({"target": {"_target_": "builtins.print", "_args_": ["PAYLOAD"]}}))
    cfg = compose_cfg(["optim._target_=builtins.print"])
    with pytest.raises(ForbiddenTargetError, match=r"optim\._target_='builtins\.print'"):
        build_model(cfg, target, data=data)
    cfg = compose_cfg(["+flow.prior.extra={_target_:builtins.print,_args_:[PAYLOAD]}"])
    with pytest.raises(ForbiddenTargetError, match=r"flow\.prior\.extra\._target_"):
        build_model(cfg, target, data=data)
    with pytest.raises(ForbiddenTargetError, match=r"logger\._target_"):
        build_logger(OmegaConf.create({"logger": {"_target_": "builtins.print"}}))
    with pytest.raises(ForbiddenTargetError, match=r"callbacks\.x\._target_"):
        build_callbacks(OmegaConf.create({"callbacks": {"x": {"_target_": "builtins.print"}}}), Path("."))
    assert "PAYLOAD" not in capsys.readouterr().out


def test_every_shipped_experiment_passes_the_allow_list():
    for path in sorted((Path(CONFIG_DIR) / "experiment").glob("*.yaml")):
        build_task(compose_cfg([f"experiment={path.stem}"]))


def test_a_run_folder_config_with_a_forbidden_target_is_refused(tmp_path):
    cfg = compose_cfg()
    stored = OmegaConf.to_container(cfg, resolve=False)
    stored.pop("hydra", None)
    stored["optim"]["_target_"] = "builtins.print"
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(stored)))
    with pytest.raises(ForbiddenTargetError, match=r"optim\._target_='builtins\.print'"):
        load_run_config(tmp_path)


def test_prefixes_match_at_dots_only():
    check_target("torch.optim.Adam")
    check_target("lightning.pytorch.Trainer")
    check_target("bgexp.targets.ice.IceTarget.from_config")
    for refused in ("torch.optimx.Adam", "bgexpx.X", "torch.load", "lightning.fabric.Fabric"):
        with pytest.raises(ForbiddenTargetError):
            check_target(refused)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's own module with an optimiser factory, importable as `bgexp_user_targets`."""
    (tmp_path / "bgexp_user_targets.py").write_text(
        "import torch\n\n"
        "def sgd(params, lr=1e-3):\n"
        "    return torch.optim.SGD(params, lr=lr)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(allowlist.ENV_VAR, raising=False)
    yield "bgexp_user_targets.sgd"


def _optimizer_of(cfg):
    return build_model(cfg, DimerTarget()).configure_optimizers()  # no scheduler: the optimiser itself


def test_a_user_target_is_built_once_allowed_by_the_environment(user_module, monkeypatch):
    cfg = compose_cfg([f"optim._target_={user_module}", "~optim.weight_decay"])
    with pytest.raises(ForbiddenTargetError, match="BGEXP_ALLOWED_TARGETS=bgexp_user_targets.sgd"):
        build_task(cfg)
    monkeypatch.setenv(allowlist.ENV_VAR, "mypkg., bgexp_user_targets.")
    build_task(cfg)
    assert isinstance(_optimizer_of(cfg), torch.optim.SGD)


def test_a_user_target_is_built_once_allowed_in_python(user_module, monkeypatch):
    monkeypatch.setattr(allowlist, "_EXTRA", [])
    cfg = compose_cfg([f"optim._target_={user_module}", "~optim.weight_decay"])
    with pytest.raises(ForbiddenTargetError):
        build_task(cfg)
    allow_targets("bgexp_user_targets")
    build_task(cfg)
    assert isinstance(_optimizer_of(cfg), torch.optim.SGD)


@pytest.mark.parametrize("override", ["target._target_=builtins.print", "optim._target_=os.system"])
def test_the_cli_refuses_a_forbidden_target_before_data_generation(override, tmp_path):
    start = time.time()
    proc = run_cli("bgexp-train", [*TINY, override], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "ForbiddenTargetError" in proc.stderr and override.split("=")[0] in proc.stderr, proc.stderr[-3000:]
    assert "MC data" not in proc.stderr and not (tmp_path / "outputs" / "data").exists()
    assert time.time() - start < 120
