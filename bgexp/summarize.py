"""`bgexp-summarize <folder>`: gather the results.json files of a sweep into a table and plots.

Every run folder below <folder> that holds a `config.yaml` (written by bgexp-train) or a
`failed.json` (a member refused before it wrote its config) is one row; a run without
`results.json` is reported as failed, one whose results.json breaks the results schema
(bgexp/training/artifacts.py) as damaged. The columns are the config keys whose values
differ between runs (the swept hyperparameters, dotted names), the seed, and the metrics: ESS,
every Delta F with its confidence interval and error against the reference, held-out NLL,
energy evaluations and wall time. Writes `summary.csv` and `summary.md`, and for every swept
hyperparameter a figure of each metric against it, with the mean over seeds and their standard
deviation as error bars (`summary_<metric>_vs_<key>.png`).

    bgexp-summarize outputs/multiruns/dimer_realnvp/<stamp> [--out DIR] [--metrics ess nll_test]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from bgexp.training.artifacts import FAILURE_FILE, RESULTS_FILE, read_results
from bgexp.training.errors import ResultsError

IGNORED_KEYS = ("hydra", "paths", "logger", "seed", "experiment_name", "tags")


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {dotted.key: value}; lists become their JSON text."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(node) if isinstance(node, list) else node}


def load_runs(folder: Path) -> list[dict[str, Any]]:
    """One dict per run folder: its path, flattened config, results (None if it failed)."""
    import yaml

    runs = []
    folders = {p.parent for p in folder.rglob("config.yaml") if p.parent.name != ".hydra"}
    folders |= {p.parent for p in folder.rglob(FAILURE_FILE)}  # failed before its config.yaml (a bad value)
    for run_dir in sorted(folders):
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():  # Hydra's copy of the composed config
            config_path = run_dir / ".hydra" / "config.yaml"
        config = flatten(yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
        results_path = run_dir / RESULTS_FILE
        results, problem = None, "failed (no results.json)"
        if results_path.is_file():
            try:  # one damaged file is one row marked damaged, not an aborted table
                results = read_results(results_path).to_dict()
            except ResultsError as err:
                problem = f"damaged results.json ({err})"
        runs.append({"run_dir": run_dir, "config": config, "results": results, "problem": problem})
    return runs


def swept_keys(runs: list[dict[str, Any]]) -> list[str]:
    """Config keys whose values differ between runs (the seed and bookkeeping keys excluded)."""
    keys = sorted({k for r in runs for k in r["config"]})
    swept = []
    for key in keys:
        if key.split(".")[0] in IGNORED_KEYS:
            continue
        values = {json.dumps(r["config"].get(key), sort_keys=True, default=str) for r in runs}
        if len(values) > 1:
            swept.append(key)
    return swept


def row_of(run: dict[str, Any], keys: list[str], folder: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"run": str(run["run_dir"].relative_to(folder)) or "."}
    row.update({key: run["config"].get(key) for key in keys})
    row["seed"] = run["config"].get("seed")
    results = run["results"]
    row["status"] = "ok" if results is not None else run.get("problem", "failed (no results.json)")
    if results is None:
        return row
    row["ess"] = results.get("ess")
    row["nll_test"] = results.get("nll_test")
    for name, entry in (results.get("delta_f") or {}).items():
        for field in ("value", "ci_low", "ci_high", "error"):
            if entry.get(field) is not None:
                row[f"delta_f[{name}].{field}"] = entry[field]
    evals = results.get("n_energy_evals") or {}
    row["energy_evals_training"] = evals.get("training")
    row["wall_s"] = results.get("wall_s")
    return row


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def write_tables(rows: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    csv_path, md_path = out / "summary.csv", out / "summary.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_metric(rows: list[dict[str, Any]], key: str, metric: str, out: Path) -> Path | None:
    """Mean +- standard deviation over seeds of `metric` for each value of `key`."""
    from bgexp.evaluation.plots import new_figure, save_figure

    groups: dict[str, list[float]] = {}
    for row in rows:
        value = row.get(metric)
        if row.get("status") != "ok" or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        groups.setdefault(_fmt(row.get(key)), []).append(float(value))
    if not groups:
        return None
    labels = list(groups)
    try:  # numeric hyperparameters in numeric order
        order = np.argsort([float(label) for label in labels])
        labels = [labels[i] for i in order]
    except ValueError:
        pass
    means = [np.mean(groups[label]) for label in labels]
    stds = [np.std(groups[label]) if len(groups[label]) > 1 else 0.0 for label in labels]
    fig = new_figure()
    ax = fig.add_subplot()
    ax.errorbar(range(len(labels)), means, yerr=stds, fmt="o-", capsize=4)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    counts = sorted({len(groups[label]) for label in labels})
    ax.set_title(f"{metric} against {key} (mean +- std over {'/'.join(map(str, counts))} seeds)", fontsize="small")
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{metric}_vs_{key}")
    return save_figure(fig, out / f"summary_{safe}.png")


def summarize(folder: str | Path, out: str | Path | None = None,
              metrics: tuple[str, ...] = ("ess", "nll_test")) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"bgexp-summarize: {folder} is not a folder")
    runs = load_runs(folder)
    if not runs:
        raise SystemExit(f"bgexp-summarize: no run folders (config.yaml) below {folder}")
    out = Path(out) if out else folder
    out.mkdir(parents=True, exist_ok=True)
    keys = swept_keys(runs)
    rows = [row_of(run, keys, folder) for run in runs]
    csv_path, md_path = write_tables(rows, out)
    figures = [p for key in keys for metric in metrics if (p := plot_metric(rows, key, metric, out))]
    failed = [row["run"] for row in rows if row["status"] != "ok"]
    return {"rows": rows, "swept": keys, "csv": csv_path, "markdown": md_path, "figures": figures, "failed": failed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a multirun folder (or any folder of run folders)")
    parser.add_argument("--out", default=None, help="where to write the table and plots (default: the folder)")
    parser.add_argument("--metrics", nargs="+", default=["ess", "nll_test"], help="metrics to plot")
    args = parser.parse_args(argv)
    summary = summarize(args.folder, args.out, tuple(args.metrics))
    print(summary["markdown"].read_text())
    print(f"{len(summary['rows'])} runs, swept: {', '.join(summary['swept']) or 'nothing'}; "
          f"table: {summary['csv']}, {summary['markdown']}; {len(summary['figures'])} figures")
    if summary["failed"]:
        print(f"FAILED runs ({len(summary['failed'])}): {', '.join(summary['failed'])}")


if __name__ == "__main__":
    main()
