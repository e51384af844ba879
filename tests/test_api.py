"""The Python API (bgexp/api.py): the README's snippet runs as written on a tiny budget, and the Run it
leaves behaves (samples, weights, ESS, Delta F, densities, evaluation, named errors)."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from omegaconf import DictConfig

import bgexp
from bgexp import api
from helpers import REPO, TINY

MARKER = "<!-- python-api-snippet"
FLOAT = r"(-?\d+\.\d+|-?inf|nan)"


def readme_snippet() -> str:
    """The first ```python block after the marker in README.md."""
    text = (REPO / "README.md").read_text()
    assert MARKER in text, "README.md lost the Python API snippet marker"
    match = re.search(r"```python\n(.*?)```", text[text.index(MARKER):], re.S)
    assert match, "no ```python block after the Python API snippet marker"
    return match.group(1)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> dict:
    """The README snippet executed in a tmp folder, with the tiny budget appended to its overrides."""
    tmp = tmp_path_factory.mktemp("api")
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    for key, value in {"BGEXP_OUTPUT_DIR": str(tmp / "outputs"), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                       "WANDB_DIR": str(tmp), "MPLBACKEND": "Agg"}.items():
        mp.setenv(key, value)
    compose = api.compose
    tiny = [*TINY, "logger=csv", f"paths.output_dir={tmp / 'outputs'}"]
    mp.setattr(bgexp, "compose", lambda experiment="dimer_realnvp", overrides=(): compose(experiment, [*overrides, *tiny]))
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(readme_snippet(), "README.md:python-api", "exec"), {"__name__": "readme_snippet"})
    finally:
        mp.undo()
    runs = sorted((tmp / "outputs" / "runs" / "dimer_realnvp").iterdir())
    assert len(runs) == 1, runs
    return {"tmp": tmp, "run_dir": runs[0], "stdout": out.getvalue()}


@pytest.fixture(scope="module")
def run(readme_run):
    with bgexp.load_run(readme_run["run_dir"]) as loaded:
        yield loaded


def test_readme_snippet_prints_delta_f_with_its_ci(readme_run):
    stdout = readme_run["stdout"]
    match = re.search(rf"Delta F\(closed->open\) = {FLOAT} kT, 95% CI \[{FLOAT}, {FLOAT}\]; reference {FLOAT} kT",
                      stdout)
    assert match, stdout[-3000:]
    low, high = float(match.group(2)), float(match.group(3))
    assert np.isfinite([low, high]).all() and low <= high
    assert re.search(r"ESS: \d+\.\d+% of 5000 samples", stdout)
    assert (readme_run["run_dir"] / "results.json").is_file()


def test_run_parts_and_results(run, readme_run):
    from bgexp.training.artifacts import Results
    from bgexp.training.module import BoltzmannGenerator

    assert isinstance(run.config, DictConfig) and run.config.experiment_name == "dimer_realnvp"
    assert isinstance(run.model, BoltzmannGenerator) and not run.model.training
    assert run.target is run.model.target and run.flow is run.model.flow and run.prior is run.model.prior
    assert type(run.target).__name__ == "DimerTarget" and run.checkpoint.name == "last.ckpt"
    assert isinstance(run.results, Results) and 0 <= run.results.ess <= 1
    assert "closed->open" in run.results.delta_f
    # the data cache stayed in paths.data_dir, the run in its stamped folder
    assert list((readme_run["tmp"] / "outputs" / "data").glob("dimer-*.npz"))


def test_sample_shapes_weights_ess_and_delta_f(run):
    samples = run.sample(400, seed=3, batch_size=150)
    assert isinstance(samples, bgexp.Samples) and samples.n == 400
    assert tuple(samples.x.shape) == (400, run.target.space.dim) == (400, 76)
    assert tuple(samples.log_q.shape) == tuple(samples.u.shape) == samples.log_w.shape == (400,)
    u, log_q = samples.u.double().numpy(), samples.log_q.double().numpy()
    finite = np.isfinite(u)
    np.testing.assert_allclose(samples.log_w[finite], -u[finite] - log_q[finite], rtol=1e-12, atol=1e-9)
    assert np.all(np.isneginf(samples.log_w[~finite])) and samples.n_nonfinite == int((~finite).sum())
    assert 0.0 < samples.ess() <= 1.0
    assert set(samples.observed) == set(run.target.observables)
    df = samples.delta_f("closed", "open", n_bootstrap=30, confidence=0.9)
    assert {"value", "ci_low", "ci_high", "std", "confidence", "n_bootstrap", "reference"} <= set(df)
    assert df["confidence"] == 0.9 and df["n_bootstrap"] == 30 and df["reference"] == pytest.approx(1.156, abs=0.01)
    closed = samples.state_mask("closed")
    assert samples.delta_f(closed, samples.state_mask("open"), n_bootstrap=30, confidence=0.9)["value"] == df["value"]
    with pytest.raises(KeyError, match="closed"):
        samples.delta_f("closd", "open")
    # a seed (with the same batch size) makes the draw reproducible
    again = run.sample(400, seed=3, batch_size=150)
    assert torch.equal(again.x, samples.x)
    assert not torch.equal(run.sample(400, seed=4).x, samples.x)


def test_log_prob_of_samples_is_their_log_q(run):
    samples = run.sample(300, seed=0)
    torch.testing.assert_close(run.log_prob(samples.x), samples.log_q, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(run.log_prob(samples.x.numpy()), samples.log_q, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(run.energy(samples.x), samples.u, rtol=1e-5, atol=1e-4, equal_nan=True)


def test_evaluate_returns_the_evaluation(run):
    from bgexp.evaluation import Evaluation

    evaluation = run.evaluate(n_samples=300, n_bootstrap=10)
    assert isinstance(evaluation, Evaluation)
    assert evaluation.metrics["n_samples"] == 300 and "closed->open" in evaluation.delta_f
    assert evaluation.samples["x"].shape == (300, 76)


def test_results_none_before_the_run_finished(readme_run, tmp_path):
    copy = tmp_path / "unfinished"
    copy.mkdir()
    shutil.copy(readme_run["run_dir"] / "config.yaml", copy / "config.yaml")
    shutil.copytree(readme_run["run_dir"] / "checkpoints", copy / "checkpoints")
    with bgexp.load_run(copy, checkpoint="best") as loaded:
        assert loaded.results is None and loaded.checkpoint.name == "best.ckpt"
    with pytest.raises(RuntimeError, match="closed"):
        loaded.sample(10)


def test_not_a_run_folder(tmp_path, readme_run):
    with pytest.raises(api.NotARunFolderError, match="not a bgexp run folder"):
        bgexp.load_run(tmp_path)
    with pytest.raises(api.NotARunFolderError, match="does not exist"):
        bgexp.load_run(tmp_path / "missing")
    with pytest.raises(api.NotARunFolderError, match="checkpoint .* does not exist"):
        bgexp.load_run(readme_run["run_dir"], checkpoint=str(tmp_path / "other.ckpt"))


@pytest.mark.parametrize("kind", ["task", "legacy"])
def test_a_targeted_fep_run_is_refused(readme_run, tmp_path, kind):
    stored = yaml.safe_load((readme_run["run_dir"] / "config.yaml").read_text())
    if kind == "task":
        stored["task"] = {"_target_": "bgexp.training.tasks.tfep.TargetedFEPTask", "name": "tfep"}
    else:  # a run from before the task group: a tfep block and no task
        stored.pop("task", None)
        stored["tfep"] = {"state_a": "a"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    with pytest.raises(api.WrongTaskError, match="tfep.*bgexp-eval"):
        bgexp.load_run(tmp_path)


def test_to_mdtraj_needs_a_molecule(run):
    with pytest.raises(api.NotMolecularError, match="not a molecule"):
        run.to_mdtraj(run.sample(5, seed=0))


def test_to_mdtraj_on_a_molecular_target(tmp_path):
    from bgexp.training.assemble import build_target

    target = build_target(bgexp.compose("ala2_nsf", ["target.n_workers=1"]))
    try:
        fake = api.Run(tmp_path, DictConfig({}), SimpleNamespace(target=target), tmp_path / "last.ckpt")
        x = np.asarray(target.positions, dtype=np.float64).reshape(1, -1).repeat(3, 0)
        x += np.random.default_rng(0).normal(scale=0.01, size=x.shape)
        traj = fake.to_mdtraj(torch.as_tensor(x))
        assert traj.n_frames == 3 and traj.n_atoms == target.n_atoms == 22
        np.testing.assert_allclose(fake.to_mdtraj(x, superpose=False).xyz.reshape(3, -1), x, atol=1e-6)
    finally:
        target.close()


def test_compose_leaves_no_hydra_state():
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    first = bgexp.compose("dimer_realnvp", ["trainer.max_epochs=3"])
    second = bgexp.compose("dimer_realnvp", ["trainer.max_epochs=4"])
    assert (first.trainer.max_epochs, second.trainer.max_epochs) == (3, 4) and "hydra" not in first
    assert not GlobalHydra.instance().is_initialized()
    with initialize_config_dir(config_dir=api.CONFIG_DIR, version_base="1.3"):  # a user's own Hydra session
        hydra = GlobalHydra.instance().hydra
        assert bgexp.compose("torus_spline").experiment_name == "torus_spline"
        assert GlobalHydra.instance().hydra is hydra
    assert not GlobalHydra.instance().is_initialized()
    with pytest.raises(ValueError, match="first argument"):
        bgexp.compose("dimer_realnvp", ["experiment=ala2_nsf"])


def test_train_refuses_an_existing_run_and_resume(readme_run):
    cfg = bgexp.compose("dimer_realnvp", ["logger=none"])
    with pytest.raises(bgexp.api.ConfigError, match="holds a run already"):
        bgexp.fit(cfg, run_dir=readme_run["run_dir"])
    with pytest.raises(bgexp.api.ConfigError, match="bgexp-train resume="):
        bgexp.fit(bgexp.compose("dimer_realnvp", [f"resume={readme_run['run_dir']}"]))


def test_import_bgexp_stays_light_and_the_console_module_keeps_its_name():
    code = ("import sys, bgexp; heavy = [m for m in ('bgexp.api', 'torch', 'lightning') if m in sys.modules]; "
            "assert not heavy, heavy; from bgexp.train import main, CONFIG_DIR; "
            "assert bgexp.train.main is main; "
            "assert {'load_run', 'compose', 'fit', 'Run'} <= set(dir(bgexp))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
    assert bgexp.fit is api.train
    assert bgexp.Run is api.Run and bgexp.load_run is api.load_run and bgexp.compose.__module__ == "bgexp.api"
