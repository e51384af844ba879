"""Sweeps: Hydra multiruns with the launchers of conf/launcher, Optuna searches (conf/hparams_search),
a failing member, and bgexp-summarize on the real sweep folders.

The sweeps run the real console scripts on a tiny dimer budget (one epoch, 200 final samples,
no logger): a few seconds per member on 2 cores.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import TINY, cli_env, console_script

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# TINY, smaller still: one epoch, no periodic evaluation, a 200-sample final evaluation
SWEEP_TINY = {
    **dict(o.split("=", 1) for o in TINY),
    "trainer.max_epochs": "1",
    "evaluation.every_n_epochs": "5",
    "evaluation.n_samples": "200",
    "evaluation.n_bootstrap": "10",
    "evaluation.final_n_samples": "200",
    "evaluation.final_n_bootstrap": "10",
    "logger": "none",
}


def tiny(*drop: str) -> list[str]:
    """The tiny overrides, without the keys in `drop` (which the test sweeps over)."""
    return [f"{k}={v}" for k, v in SWEEP_TINY.items() if k not in drop]


def run(name: str, args: list[str], tmp: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = cli_env(tmp)
    env["OMP_NUM_THREADS"] = "1"  # every member one thread: parallel members share 2 cores
    return subprocess.run([console_script(name), *args], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=timeout)


def sweep_dirs(tmp: Path, experiment: str = "dimer_realnvp") -> list[Path]:
    root = tmp / "outputs" / "multiruns" / experiment
    return sorted(root.iterdir()) if root.is_dir() else []


def members(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def summarize(sweep: Path, tmp: Path) -> list[dict[str, str]]:
    proc = run("bgexp-summarize", [str(sweep)], tmp, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (sweep / "summary.md").is_file()
    with open(sweep / "summary.csv") as f:
        return list(csv.DictReader(f))


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


# --------------------------------------------------------------------------------------------
# composition only (fast)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_help_lists_launchers_and_searches(tmp_path):
    proc = run("bgexp-train", ["--help"], tmp_path, timeout=120)
    check(proc)
    assert "launcher: basic, joblib, slurm, submitit_local" in proc.stdout
    assert "hparams_search: optuna_delta_f, optuna_ess" in proc.stdout


def test_default_launcher_is_basic_and_runs_are_unaffected():
    cfg = compose([])
    assert cfg.hydra.launcher._target_ == "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    assert cfg.hydra.sweeper._target_ == "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
    assert "launcher" not in cfg  # the group only sets hydra.launcher
    joblib = compose(["launcher=joblib"])
    assert joblib.hydra.launcher._target_.endswith("JoblibLauncher") and joblib.hydra.launcher.n_jobs == 2
    # everything outside hydra is the same with any launcher
    def job(c):
        return {k: v for k, v in OmegaConf.to_container(c).items() if k != "hydra"}

    assert job(cfg) == job(joblib) == job(compose(["launcher=slurm"]))


def test_slurm_launcher_composes_with_resources_from_the_trainer(tmp_path):
    cfg = compose(["launcher=slurm", "trainer=ddp", "experiment=ala2_nsf", "hydra.launcher.partition=gpu-a100"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu-a100"
    assert launcher.tasks_per_node == 2 and launcher.gpus_per_node == 2  # trainer.devices of trainer=ddp
    assert launcher.nodes == 1 and launcher.cpus_per_task >= 1 and launcher.mem_gb > 0
    assert launcher.array_parallelism >= 1 and launcher.timeout_min > 0
    assert launcher.name == "ala2_nsf"
    assert any("OMP_NUM_THREADS" in line for line in launcher.setup)
    assert compose(["launcher=slurm"]).hydra.launcher.gpus_per_node == 1  # trainer=cpu: devices=1

    # the sbatch script submitit would write for these settings (the plugin passes the generic
    # keys through submitit's equivalences, the SLURM-specific ones as they are)
    slurm = pytest.importorskip("submitit.slurm.slurm")
    params = {slurm.SlurmExecutor._equivalence_dict().get(k, k): v
              for k, v in OmegaConf.to_container(launcher, resolve=True).items()
              if k not in ("_target_", "submitit_folder", "max_num_timeout")}
    params["mem"] = f"{params['mem']}GB"
    text = slurm._make_sbatch_string(command="python -m submitit.core._submit", folder=str(tmp_path), **params)
    for line in ("#SBATCH --partition=gpu-a100", "#SBATCH --gpus-per-node=2", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --nodes=1", "#SBATCH --job-name=ala2_nsf", "export OMP_NUM_THREADS="):
        assert line in text, (line, text)


@pytest.mark.parametrize("search, metric, direction", [("optuna_ess", "ess", "maximize"),
                                                        ("optuna_delta_f", "abs_delta_f_error", "minimize")])
def test_optuna_searches_compose(search, metric, direction):
    cfg = compose([f"hparams_search={search}", "experiment=torus_smooth"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert cfg.optimized_metric == metric and sweeper.direction == direction
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert sweeper.study_name.startswith("torus_smooth")
    assert sweeper.storage == f"sqlite:///{cfg.paths.output_dir}/optuna/torus_smooth.db"
    assert sweeper.n_jobs == 1 and sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed == cfg.seed
    # the search space exists in every experiment
    for experiment in sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml")):
        composed = compose([f"hparams_search={search}", f"experiment={experiment}"])
        for key in sweeper.params:
            assert OmegaConf.select(composed, key, default="MISSING") != "MISSING", (experiment, key)


# --------------------------------------------------------------------------------------------
# real sweeps (slow)


@pytest.mark.slow
def test_basic_multirun_two_by_two_and_summary(tmp_path):
    # with the real W&B logger (offline): one run per member
    proc = run("bgexp-train", ["-m", *tiny("logger"), "optim.lr=1e-3,5e-4", "seed=0,1"], tmp_path)
    check(proc)
    (sweep,) = sweep_dirs(tmp_path)
    runs = members(sweep)
    assert [p.name for p in runs] == ["0", "1", "2", "3"]
    for p in runs:
        assert (p / "results.json").is_file() and not (p / "failed.json").exists()
    assert {json.loads((p / "results.json").read_text())["seed"] for p in runs} == {0, 1}
    rows = summarize(sweep, tmp_path)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert "optim.lr" in rows[0]
    assert sorted(float(r["optim.lr"]) for r in rows) == [5e-4, 5e-4, 1e-3, 1e-3]
    assert "optim.lr" in (sweep / "summary.md").read_text()
    # one W&B run per member, named <experiment>-<num> and tagged with the sweep (offline records)
    for p in runs:
        (record,) = (p / "wandb").glob("offline-run-*/*.wandb")
        data = record.read_bytes()
        assert f"sweep:{sweep.name}".encode() in data and f"dimer_realnvp-{p.name}".encode() in data


@pytest.mark.slow
def test_joblib_launcher_runs_members_in_parallel(tmp_path):
    proc = run("bgexp-train", ["-m", "launcher=joblib", *tiny(), "optim.lr=1e-3,5e-4"], tmp_path)
    check(proc)
    assert "Joblib" in proc.stdout + proc.stderr
    (sweep,) = sweep_dirs(tmp_path)
    assert [p.name for p in members(sweep)] == ["0", "1"]
    assert all((p / "results.json").is_file() for p in members(sweep))
    assert len(summarize(sweep, tmp_path)) == 2


@pytest.mark.slow
def test_a_failing_member_does_not_stop_the_sweep(tmp_path):
    # n_couplings=0 fails when the flow is built; the other member trains
    proc = run("bgexp-train", ["-m", *tiny("flow.transform.n_couplings"), "flow.transform.n_couplings=0,2"],
               tmp_path)
    check(proc)  # the sweep's exit code is 0
    (sweep,) = sweep_dirs(tmp_path)
    bad, good = members(sweep)
    failed = json.loads((bad / "failed.json").read_text())
    assert "n_couplings" in failed["error"] and "Traceback" in failed["traceback"]
    assert not (bad / "results.json").exists()
    assert (good / "results.json").is_file() and not (good / "failed.json").exists()
    rows = summarize(sweep, tmp_path)
    status = {r["run"]: r["status"] for r in rows}
    assert status["0"].startswith("failed") and status["1"] == "ok"
    summary = run("bgexp-summarize", [str(sweep)], tmp_path, timeout=120)
    assert "FAILED runs (1): 0" in summary.stdout


@pytest.mark.slow
def test_optuna_search_resumes_its_sqlite_study(tmp_path):
    optuna = pytest.importorskip("optuna")
    args = ["hparams_search=optuna_ess", *tiny()]
    proc = run("bgexp-train", [*args, "hydra.sweeper.n_trials=3"], tmp_path)
    check(proc)
    (first,) = sweep_dirs(tmp_path)
    assert [p.name for p in members(first)] == ["0", "1", "2"]
    assert all((p / "results.json").is_file() for p in members(first))
    best = (first / "optimization_results.yaml").read_text()
    assert "best_value" in best and "optim.lr" in best
    rows = summarize(first, tmp_path)
    assert len(rows) == 3 and "optim.lr" in rows[0]

    storage = f"sqlite:///{tmp_path}/outputs/optuna/dimer_realnvp.db"
    study = optuna.load_study(study_name="dimer_realnvp", storage=storage)
    assert len(study.trials) == 3 and study.direction == optuna.study.StudyDirection.MAXIMIZE
    values = sorted(json.loads((p / "results.json").read_text())["ess"] for p in members(first))
    assert sorted(t.value for t in study.trials) == pytest.approx(values)

    # the same command again (another sampler seed, so that the random start-up points differ)
    proc = run("bgexp-train", [*args, "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=1"], tmp_path)
    check(proc)
    assert "Using an existing study" in proc.stdout + proc.stderr
    assert len(sweep_dirs(tmp_path)) == 2
    study = optuna.load_study(study_name="dimer_realnvp", storage=storage)
    assert len(study.trials) == 5
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path):
    pytest.importorskip("submitit")
    proc = run("bgexp-train", ["-m", "launcher=submitit_local", *tiny(), "seed=0,1"], tmp_path)
    check(proc)
    (sweep,) = sweep_dirs(tmp_path)
    assert [p.name for p in members(sweep)] == ["0", "1"]
    assert all((p / "results.json").is_file() for p in members(sweep))
    assert (sweep / ".submitit").is_dir()  # submitted and collected as submitit jobs
    assert len(summarize(sweep, tmp_path)) == 2


@pytest.mark.slow
def test_a_failing_optuna_trial_is_recorded_and_the_search_goes_on(tmp_path):
    """n_couplings=0 fails at build time: that trial is FAIL with failed.json, the others complete."""
    optuna = pytest.importorskip("optuna")
    args = ["-m", "hparams_search=optuna_ess", *tiny("flow.transform.n_couplings"), "hydra.sweeper.n_trials=4",
            "flow.transform.n_couplings=choice(0,2)"]  # a search dimension added on the command line
    proc = run("bgexp-train", args, tmp_path)
    check(proc)
    study = optuna.load_study(study_name="dimer_realnvp", storage=f"sqlite:///{tmp_path}/outputs/optuna/dimer_realnvp.db")
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.FAIL in states and optuna.trial.TrialState.COMPLETE in states
    (sweep,) = sweep_dirs(tmp_path)
    failed = [p for p in members(sweep) if (p / "failed.json").is_file()]
    assert len(failed) == states.count(optuna.trial.TrialState.FAIL)

