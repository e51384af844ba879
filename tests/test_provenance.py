"""Provenance that cannot be lost (issue 17, build item 2): a run folder's config and overrides are
written once, a resume is checked before it writes anything and records its own overrides beside
the original ones, `experiment=`/`ckpt_path=` with `resume=` are refused, stored paths are absolute
(a run is evaluated from any directory), a copied run resumes in its own folder, and an empty or
unusable output directory is a named error."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from bgexp.training.errors import ConfigError
from bgexp.training.resume import (OutputDirError, ResumeError, absolute_paths, check_output_dir,
                                   rebase_run_folder, resumed_config)
from helpers import TINY, cli_env, console_script

# the files of a run folder that hold its original config and overrides
PROVENANCE = ("config.yaml", ".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml")


def _env(tmp: Path, **changes: str | None) -> dict[str, str]:
    env = cli_env(tmp)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _cli(name: str, args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300):
    return subprocess.run([console_script(name), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _digests(folder: Path, names=None) -> dict[str, str]:
    files = [folder / n for n in names] if names else sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def relative_run(tmp_path_factory) -> dict:
    """One tiny run launched from <tmp>/launch with the default, relative output folder (./outputs,
    BGEXP_OUTPUT_DIR unset) and the CSV logger."""
    tmp = tmp_path_factory.mktemp("provenance")
    launch = tmp / "launch"
    launch.mkdir()
    env = _env(tmp, BGEXP_OUTPUT_DIR=None)
    proc = _cli("bgexp-train", [*TINY, "trainer.max_epochs=1", "logger=csv"], launch, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (run_dir,) = (launch / "outputs" / "runs" / "dimer_realnvp").iterdir()
    return {"tmp": tmp, "launch": launch, "env": env, "run_dir": run_dir}


# unit: the pieces ---------------------------------------------------------------------------------
def test_absolute_paths_makes_stored_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "protein.pdb").write_text("")
    config = {"paths": {"output_dir": "outputs", "data_dir": "outputs/data", "extra": "x"},
              "data": {"path": ["md/a", "/abs/b"], "cache_dir": "cache", "topology": "top.pdb", "batch_size": 64},
              "tfep": {"data_a": {"path": "md/c"}},
              "target": {"source": "5PTI", "structure_file": None},
              "other": {"source": "protein.pdb", "url_path": "https://example.org/x", "name": "outputs"},
              "logger": {"save_dir": "/runs/x"}, "hydra": {"run": {"dir": "rel"}}}
    out = absolute_paths(config)
    assert out["paths"] == {"output_dir": str(tmp_path / "outputs"), "data_dir": str(tmp_path / "outputs/data"),
                            "extra": str(tmp_path / "x")}
    assert out["data"]["path"] == [str(tmp_path / "md/a"), "/abs/b"]
    assert out["data"]["cache_dir"] == str(tmp_path / "cache") and out["data"]["topology"] == str(tmp_path / "top.pdb")
    assert out["data"]["batch_size"] == 64
    assert out["tfep"]["data_a"]["path"] == str(tmp_path / "md/c")
    assert out["target"] == {"source": "5PTI", "structure_file": None}  # a PDB id stays a name
    assert out["other"]["source"] == str(tmp_path / "protein.pdb")  # an existing file is a path
    assert out["other"]["url_path"] == "https://example.org/x" and out["other"]["name"] == "outputs"
    assert out["logger"]["save_dir"] == "/runs/x" and out["hydra"] == {"run": {"dir": "rel"}}


def test_rebase_run_folder_moves_paths_into_the_new_folder():
    node = {"logger": {"save_dir": "/a/run"}, "files": ["/a/run/x.npz", "/a/run2/y", "/a/runs"], "n": 3,
            "data": {"path": "/a/data"}}
    out = rebase_run_folder(node, "/a/run", "/b/copy")
    assert out == {"logger": {"save_dir": "/b/copy"}, "files": ["/b/copy/x.npz", "/a/run2/y", "/a/runs"], "n": 3,
                   "data": {"path": "/a/data"}}


@pytest.mark.bad_input
@pytest.mark.parametrize("value, message", [("", "is empty"), ("   ", "is empty"), ("afile", "is a file"),
                                            ("afile/below", "which is a file")])
def test_unusable_output_dir_is_a_named_error(tmp_path, monkeypatch, value, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    cfg = OmegaConf.create({"paths": {"output_dir": value, "data_dir": f"{value}/data"}})
    with pytest.raises(OutputDirError, match=message) as err:
        check_output_dir(cfg)
    assert isinstance(err.value, ConfigError) and "paths.output_dir" in str(err.value)
    check_output_dir(OmegaConf.create({"paths": {"output_dir": "new/folder", "data_dir": "new/folder/data"}}))


@pytest.mark.bad_input
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_dir_is_a_named_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputDirError, match="not writable"):
        check_output_dir(OmegaConf.create({"paths": {"output_dir": str(locked / "out"), "data_dir": "x"}}))


@pytest.mark.bad_input
@pytest.mark.parametrize("overrides, keys", [
    (["experiment=dimer_benchmark"], ["experiment="]),
    (["ckpt_path=/x/last.ckpt"], ["ckpt_path="]),
    (["+ckpt_path=/x/last.ckpt", "experiment=dimer_benchmark", "trainer.max_epochs=3"], ["ckpt_path=", "experiment="]),
    (["loss=nll"], ["loss="]),
])
def test_experiment_ckpt_path_or_a_group_with_resume_is_refused(tmp_path, overrides, keys):
    (tmp_path / "config.yaml").write_text("trainer: {max_epochs: 1}\n")
    before = _digests(tmp_path)
    cfg = OmegaConf.create({"resume": str(tmp_path), "trainer": {"max_epochs": 3}})
    with pytest.raises(ResumeError) as err:
        resumed_config(cfg, [f"resume={tmp_path}", *overrides], groups=["experiment", "loss", "flow", "task"])
    message = str(err.value)
    assert "resume=" in message and all(key in message for key in keys), message
    assert "max_epochs" not in message
    assert _digests(tmp_path) == before


# end to end: the real CLI ----------------------------------------------------------------------
def _refused(relative_run, overrides: list[str]) -> subprocess.CompletedProcess:
    """A resume that is refused: config.yaml and .hydra/ byte for byte the same, and nothing else
    written (Hydra's job log may get the attempt's lines), no resume record."""
    run_dir = relative_run["run_dir"]
    before = _digests(run_dir)
    proc = _cli("bgexp-train", [f"resume={run_dir}", *overrides], relative_run["launch"], relative_run["env"])
    assert proc.returncode != 0
    after = _digests(run_dir)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed <= {"train.log"}, changed
    assert not (run_dir / "resumes").exists()
    return proc


@pytest.mark.slow
@pytest.mark.bad_input
def test_a_refused_resume_leaves_the_run_folder_as_it_was(relative_run):
    """`resume=<run> flow.transform.n_couplings=3`: the checkpoint does not fit (refused before any
    write); a plain resume and bgexp-eval of the run still work afterwards (the tests below)."""
    proc = _refused(relative_run, ["flow.transform.n_couplings=3"])
    assert "flow.transform.n_couplings: checkpoint has 4, config has 3" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.bad_input
def test_experiment_and_ckpt_path_with_resume_are_refused_by_the_cli(relative_run):
    ckpt = relative_run["run_dir"] / "checkpoints" / "last.ckpt"
    proc = _refused(relative_run, ["experiment=dimer_benchmark", f"ckpt_path={ckpt}"])
    assert "ResumeError" in proc.stderr, proc.stderr[-3000:]
    assert "`experiment=dimer_benchmark` with `resume=`" in proc.stderr
    assert f"`ckpt_path={ckpt}` with `resume=`" in proc.stderr


@pytest.mark.slow
def test_a_resume_keeps_the_original_config_and_records_its_own_overrides(relative_run):
    run_dir, env = relative_run["run_dir"], relative_run["env"]
    before = _digests(run_dir, PROVENANCE)
    epoch = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]
    proc = _cli("bgexp-train", [f"resume={run_dir}", "trainer.max_epochs=2"], relative_run["launch"], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert _digests(run_dir, PROVENANCE) == before  # config.yaml and .hydra/ byte for byte
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == epoch + 1
    (record,) = (run_dir / "resumes").iterdir()
    assert yaml.safe_load((record / "overrides.yaml").read_text()) == [f"resume={run_dir}", "trainer.max_epochs=2"]
    resolved = yaml.safe_load((record / "resolved.yaml").read_text())
    assert resolved["trainer"]["max_epochs"] == 2 and resolved["resume"] == str(run_dir)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_epochs"] == 1
    assert not list(record.rglob("config.yaml"))  # bgexp-summarize counts folders with a config.yaml as runs


@pytest.mark.slow
def test_eval_from_another_directory_uses_the_runs_data(relative_run):
    """The run was launched with a relative output folder; its stored paths are absolute, so
    bgexp-eval run_dir=<abs> from elsewhere reads the same data and makes no new data folder."""
    run_dir, env = relative_run["run_dir"], relative_run["env"]
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    outputs = relative_run["launch"] / "outputs"
    assert stored["paths"] == {"output_dir": str(outputs), "data_dir": str(outputs / "data")}
    assert stored["data"]["cache_dir"] == str(outputs / "data")
    data_before = _digests(outputs / "data")
    elsewhere = relative_run["tmp"] / "elsewhere"
    elsewhere.mkdir()
    proc = _cli("bgexp-eval", [f"run_dir={run_dir}", "n_samples=200", "n_bootstrap=5"], elsewhere, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert list(elsewhere.iterdir()) == []  # no outputs/data (regenerated data) here
    assert _digests(outputs / "data") == data_before
    assert list((run_dir / "eval").glob("*/results.json"))


@pytest.mark.slow
def test_a_copied_run_resumes_in_the_copy(relative_run):
    """The stored logger.save_dir points into the original folder; resume=<copy> logs and writes
    into the copy and leaves the original untouched."""
    run_dir, env = relative_run["run_dir"], relative_run["env"]
    copy = relative_run["tmp"] / "copied_run"
    shutil.copytree(run_dir, copy)
    original = _digests(run_dir)
    copied_provenance = _digests(copy, PROVENANCE)
    rows = (copy / "csv" / "metrics.csv").read_text().count("\n")
    epoch = torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]
    proc = _cli("bgexp-train", [f"resume={copy}", f"trainer.max_epochs={epoch + 2}"], relative_run["tmp"], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert _digests(run_dir) == original  # not a byte of the original changed
    assert _digests(copy, PROVENANCE) == copied_provenance
    assert (copy / "csv" / "metrics.csv").read_text().count("\n") == rows  # the earlier log is kept
    assert (copy / "csv" / "resumed-1" / "metrics.csv").is_file()  # and the copy's log goes on beside it
    record = sorted((copy / "resumes").iterdir())[-1]
    resolved = yaml.safe_load((record / "resolved.yaml").read_text())
    assert resolved["logger"]["save_dir"] == str(copy) and resolved["resume"] == str(copy)
    assert str(run_dir) not in (record / "resolved.yaml").read_text()
    results = json.loads((copy / "results.json").read_text())
    assert str(run_dir) not in str(results["files"]) and str(run_dir) not in str(results["figures"])
    epochs = {p.name: torch.load(p, weights_only=True)["epoch"] for p in (copy / "checkpoints").glob("last*.ckpt")}
    assert max(epochs.values()) == epoch + 1  # the continued checkpoint is in the copy
    assert epochs == {"last.ckpt": epoch + 1}  # written over last.ckpt, not as a versioned last-v1.ckpt


@pytest.mark.slow
@pytest.mark.bad_input
def test_empty_output_dir_env_is_a_named_error_before_any_folder(tmp_path):
    existed = {p: Path(p).exists() for p in ("/runs", "/data", "/multiruns")}
    proc = _cli("bgexp-train", [*TINY], tmp_path, _env(tmp_path, BGEXP_OUTPUT_DIR=""), timeout=120)
    assert proc.returncode != 0
    assert "OutputDirError" in proc.stderr and "BGEXP_OUTPUT_DIR" in proc.stderr, proc.stderr[-3000:]
    assert {p: Path(p).exists() for p in existed} == existed  # no /runs, /data made
    assert list(tmp_path.iterdir()) == []
