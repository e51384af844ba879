"""`bgexp-sample` before any work (issue 17, item 11 / Build 8): n_samples must be a positive integer
and the samples must fit in memory and on disk. The printed path being the written one (a name
without .npz) is tested on a real run in tests/test_cli.py::test_eval_and_sample_reuse_the_checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bgexp.sample import SampleSizeError, check_size, memory_bytes, positive_int
from bgexp.training.errors import ConfigError
from helpers import run_cli

# a run folder with only the stored config of a dimer run: enough for every check made before the
# model is built (a check that came later would fail on the missing checkpoint instead)
RUN_CONFIG = """target:
  name: dimer
  _target_: bgexp.targets.DimerTarget
  temperature: 1.0
"""


@pytest.fixture()
def config_only_run(tmp_path) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(RUN_CONFIG)
    return run_dir


@pytest.mark.bad_input
@pytest.mark.parametrize("value", [2.5, 0, -3, 0.0, float("nan"), float("inf"), True, "many", None])
def test_n_samples_must_be_a_positive_integer(value):
    with pytest.raises(ConfigError, match="n_samples must be"):
        positive_int(value, "n_samples")


def test_integral_floats_are_counts():
    assert positive_int(1e5, "n_samples") == 100000 and positive_int(7, "n_samples") == 7


@pytest.mark.bad_input
def test_size_check_names_the_need_the_limit_and_what_fits():
    with pytest.raises(SampleSizeError) as info:
        check_size(1000, 76, max_bytes=memory_bytes(10, 76))
    message = str(info.value)
    assert "n_samples=1000" in message and "76-dimensional" in message
    assert "more than max_bytes" in message and "at most n_samples=10 fit" in message
    check_size(10, 76, max_bytes=memory_bytes(10, 76))  # exactly fits
    with pytest.raises(SampleSizeError, match="the available memory"):
        check_size(10**15, 76)


@pytest.mark.bad_input
def test_size_check_refuses_a_file_larger_than_the_free_disk(tmp_path):
    with pytest.raises(SampleSizeError, match="free on the disk"):
        check_size(10**14, 1, max_bytes=10**20, out_dir=tmp_path / "not_yet" / "made")


@pytest.mark.bad_input
def test_cli_refuses_1e12_samples_at_once(config_only_run, tmp_path):
    start = time.perf_counter()
    proc = run_cli("bgexp-sample", [f"run_dir={config_only_run}", "n_samples=1e12"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "SampleSizeError" in proc.stderr and "n_samples=1000000000000" in proc.stderr, proc.stderr[-3000:]
    assert "even a 1-dimensional target" in proc.stderr
    assert not list(config_only_run.glob("samples-*.npz"))
    assert time.perf_counter() - start < 60


@pytest.mark.bad_input
def test_cli_refuses_samples_above_max_bytes_with_the_target_dimension(config_only_run, tmp_path):
    proc = run_cli("bgexp-sample", [f"run_dir={config_only_run}", "n_samples=5000", "max_bytes=1e6"],
                   tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "76-dimensional" in proc.stderr and "more than max_bytes" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.bad_input
def test_cli_refuses_a_fractional_n_samples(config_only_run, tmp_path):
    proc = run_cli("bgexp-sample", [f"run_dir={config_only_run}", "n_samples=2.5"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "n_samples must be a positive integer, got 2.5" in proc.stderr, proc.stderr[-3000:]
