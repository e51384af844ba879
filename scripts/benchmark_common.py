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

from bgexp.training.artifacts import read_results


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
        errors = [l for l in proc.stderr.splitlines() if "Error" in l or "error:" in l]
        raise SystemExit(f"training failed (exit {proc.returncode})" + (f": {errors[-1].strip()}" if errors else ""))
    line = next(l for l in proc.stdout.splitlines() if l.startswith("results: "))
    results_path = Path(line.split("results: ", 1)[1].strip())
    results = read_results(results_path).to_dict()  # through the results schema (bgexp.training.artifacts)
    if run_dir:
        trained = read_results(Path(run_dir) / "results.json").to_dict()
        wall = trained["wall_s"]
        results["n_energy_evals"]["training"] = trained["n_energy_evals"]["training"]
    return results, results_path, wall


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_report(out_dir: Path, title: str, row: dict, table: list[tuple[str, str, str]]) -> None:
    """Write <out_dir>/<row['benchmark']>.json (the row) and .md (title, machine, command, the
    (metric, value, goal) table, ESS first and wall time last, reference and run folder); print it."""
    name = row["benchmark"]
    (out_dir / f"{name}.json").write_text(json.dumps(row, indent=2))
    md = [f"# {title} ({time.strftime('%Y-%m-%d')})", "",
          f"Machine: {row['machine']}", f"Command: `{row['command']}`", "",
          "| metric | value | goal |", "|---|---|---|"]
    md += [f"| {metric} | {value} | {goal} |" for metric, value, goal in table]
    md += [f"| energy evaluations (training) | {row['n_energy_evals_training']:.3g} | |",
           f"| wall time | {row['wall_s_total'] / 60:.1f} min | < 60 min |",
           "", f"Reference: {row['reference_source']}", f"Run folder: {row['run_dir']}"]
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
