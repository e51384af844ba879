"""Shared parts of the benchmark scripts: the machine's name and one training (or re-evaluation)
run through the real console scripts, read back from its results.json."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def machine() -> str:
    """CPU model, core count, and torch version and threads when torch is importable."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    try:
        import torch

        text += f", torch {torch.__version__}, {torch.get_num_threads()} threads"
    except ImportError:  # pragma: no cover
        pass
    return text


def run_and_read(experiment: str, overrides: list[str], run_dir: str | None = None,
                 n_samples: int = 50000) -> tuple[dict, Path, float]:
    """Train `experiment=<experiment>` (or re-evaluate `run_dir` with bgexp-eval) and return
    (results, results path, wall seconds). For a re-evaluation the training time and energy
    evaluations are those of the original run."""
    bin_dir = Path(sys.executable).parent
    if run_dir:
        cmd = [str(bin_dir / "bgexp-eval"), f"run_dir={run_dir}", f"n_samples={n_samples}", *overrides]
    else:
        cmd = [str(bin_dir / "bgexp-train"), f"experiment={experiment}", *overrides]
    print("running:", " ".join(cmd), flush=True)
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"training failed (exit {proc.returncode})")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("results: "))
    results_path = Path(line.split("results: ", 1)[1].strip())
    results = json.loads(results_path.read_text())
    if run_dir:
        trained = json.loads((Path(run_dir) / "results.json").read_text())
        wall = trained["wall_s"]
        results["n_energy_evals"]["training"] = trained["n_energy_evals"]["training"]
    return results, results_path, wall
