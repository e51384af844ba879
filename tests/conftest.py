"""Shared fixtures: a tiny real training run through the `bgexp-train` console script."""

from __future__ import annotations

import json

import pytest

import bgexp  # noqa: F401  (registers the OmegaConf resolvers of conf/config.yaml for the compose API)
from helpers import TINY, run_cli


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """One real `bgexp-train` run with the W&B logger offline; returns its folder and results."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    proc = run_cli("bgexp-train", TINY, tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    runs = sorted((tmp / "outputs" / "runs" / "dimer_realnvp").iterdir())
    assert len(runs) == 1
    run_dir = runs[0]
    return {"tmp": tmp, "run_dir": run_dir, "stdout": proc.stdout,
            "results": json.loads((run_dir / "results.json").read_text())}
