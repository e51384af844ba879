"""The training floor's seams: the task group, the results schema, the callbacks group."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bgexp.training.artifacts import Results, objective, read_results, write_results
from bgexp.training.callbacks import RunCheckpoint, StepTimer
from bgexp.training.errors import ConfigError, ResultsError
from bgexp.training.tasks import Task, build_task
from bgexp.training.tasks.bg import BoltzmannGeneratorTask
from bgexp.training.tasks.tfep import TargetedFEPTask

REPO = Path(__file__).resolve().parents[1]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _results(**changes) -> dict:
    base = {"experiment": "x", "config_hash": "abc", "seed": 0, "ess": 0.5, "n_samples": 10,
            "delta_f": {"a->b": {"value": 1.0, "ci_low": 0.5, "ci_high": 1.5, "confidence": 0.95, "reference": None}},
            "nll_test": None, "n_energy_evals": {"training": 3, "evaluation": 10}, "wall_s": 1.0,
            "figures": {}, "files": {}, "metrics": {"ess": 0.5}}
    base.update(changes)
    return base


@pytest.mark.parametrize("name, cls", [("bg", BoltzmannGeneratorTask), ("tfep", TargetedFEPTask)])
def test_every_task_config_builds_its_task(name, cls):
    cfg = _compose([f"task={name}"])
    task = build_task(cfg)
    assert isinstance(task, cls) and task.name == name
    assert task.monitor == cfg.task.monitor


def test_experiments_choose_their_task():
    assert isinstance(build_task(_compose([])), BoltzmannGeneratorTask)
    assert isinstance(build_task(_compose(["experiment=ice16_rigid"])), TargetedFEPTask)
    assert isinstance(build_task(_compose(["experiment=ice128_rigid"])), TargetedFEPTask)


def test_runs_stored_before_the_task_group_are_dispatched_by_their_config():
    assert isinstance(build_task(OmegaConf.create({"tfep": {"temperature_a": 250.0}})), TargetedFEPTask)
    assert isinstance(build_task(OmegaConf.create({"flow": {}})), BoltzmannGeneratorTask)


def test_a_task_target_that_is_not_a_task_is_refused():
    with pytest.raises(ConfigError, match="not a bgexp.training.tasks.Task"):
        build_task(OmegaConf.create({"task": {"_target_": "builtins.dict"}}))
    with pytest.raises(ConfigError, match="cannot be imported"):
        build_task(OmegaConf.create({"task": {"_target_": "bgexp.no_such.Task"}}))


def test_the_callbacks_group_builds_checkpoints_in_the_run_folder(tmp_path):
    from bgexp.training.assemble import build_callbacks

    cfg = _compose(["experiment=ice16_rigid"])
    callbacks = build_callbacks(cfg, tmp_path)
    best = [c for c in callbacks if isinstance(c, RunCheckpoint) and c.monitor]
    assert len(best) == 1 and best[0].monitor == "val/work" and Path(best[0].dirpath) == tmp_path / "checkpoints"
    assert any(isinstance(c, StepTimer) for c in callbacks)
    off = _compose(["callbacks.step_timer=null"])
    assert not any(isinstance(c, StepTimer) for c in build_callbacks(off, tmp_path))


def test_results_round_trip_through_the_schema(tmp_path):
    path = tmp_path / "results.json"
    written = write_results(path, Results.from_dict(_results(ess=float("nan"))))
    assert written["ess"] is None  # non-finite numbers are written as null
    again = read_results(path)
    assert again.ess is None and again.blocks["metrics"] == {"ess": 0.5}
    assert json.loads(path.read_text())["n_energy_evals"] == {"training": 3, "evaluation": 10}


@pytest.mark.parametrize("change, message", [
    ({"ess": 1.5}, "ess must be a fraction"),
    ({"seed": "0"}, "seed must be an integer"),
    ({"n_energy_evals": {"training": 3}}, "n_energy_evals needs"),
    ({"delta_f": {"a->b": {"ci_low": 1.0}}}, r"delta_f\['a->b'\] needs a `value`"),
    ({"surprise": 1}, "unknown blocks"),
])
def test_results_that_break_the_schema_are_named(change, message):
    with pytest.raises(ResultsError, match=message):
        Results.from_dict(_results(**change))


def test_reading_names_the_file_and_the_missing_field(tmp_path):
    path = tmp_path / "results.json"
    data = _results()
    del data["config_hash"]
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsError, match=r"results.json: missing \['config_hash'\]"):
        read_results(path)
    path.write_text("{not json")
    with pytest.raises(ResultsError, match="cannot be read as JSON"):
        read_results(path)


def test_objective_reads_dotted_paths_and_absolute_errors():
    results = _results(delta_f={"a->b": {"value": 1.0, "error": -0.25}}, metrics={"surface/r/kl": 0.1})
    assert objective(results, "ess") == 0.5
    assert objective(results, "abs_delta_f_error") == 0.25
    assert objective(results, "metrics.surface/r/kl") == 0.1
    assert math.isnan(objective(results, "metrics.missing"))


def test_a_task_without_sampling_refuses_bgexp_sample(tmp_path):
    from bgexp.training.errors import UnsupportedOperationError

    with pytest.raises(UnsupportedOperationError, match="bgexp-eval"):
        TargetedFEPTask().sample_run(tmp_path, OmegaConf.create({}))
    assert issubclass(TargetedFEPTask, Task)
