"""Helpers for tests that run the real console scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# a budget small enough for CI: little MC data, a small flow, two short epochs
TINY = [
    "data.generate.n_chains=16",
    "data.generate.burn_in=300",
    "data.generate.n_steps=400",
    "data.generate.thin=20",
    "data.batch_size=64",
    "flow.transform.n_couplings=4",
    "flow.transform.hidden=[32,32]",
    "loss.nll_warmup_steps=4",
    "loss.kl_ramp_steps=4",
    "loss.kl_batch_size=64",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "evaluation.every_n_epochs=1",
    "evaluation.n_samples=300",
    "evaluation.n_bootstrap=20",
    "evaluation.final_n_samples=500",
    "evaluation.final_n_bootstrap=20",
]


# short evaluation settings for the CLI runs of the molecular experiments
SHORT_EVALUATION = ["trainer.enable_progress_bar=false", "evaluation.every_n_epochs=1", "evaluation.n_samples=200",
                    "evaluation.n_bootstrap=10", "evaluation.final_n_samples=300", "evaluation.final_n_bootstrap=10"]


def ala2_tiny_md(tmp: Path) -> list[str]:
    """Overrides for tiny ALA2 MD data in `tmp` (200 frames at 300 K and 100 at 600 K), made by the run."""
    return [f"data.path=[{tmp}/md300,{tmp}/md600]",
            "data.md=[{n_frames:200,report_interval:50,chunk_frames:100,equilibration_steps:200},"
            "{n_frames:100,report_interval:50,chunk_frames:100,equilibration_steps:200,temperature:600}]"]


def console_script(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.skip(f"console script {name} not installed next to {sys.executable}")
    return str(path)


def cli_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", MPLBACKEND="Agg",
               WANDB_DIR=str(tmp), WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
               WANDB_CONFIG_DIR=str(tmp / "wandb-config"), BGEXP_OUTPUT_DIR=str(tmp / "outputs"))
    return env


def run_cli(name: str, args: list[str], tmp: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([console_script(name), *args], cwd=tmp, env=cli_env(tmp), capture_output=True,
                          text=True, timeout=timeout)


