"""bgexp-summarize: the table and plots of a sweep, from run folders with config.yaml/results.json."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from bgexp.summarize import flatten, summarize


def make_run(folder, lr, seed, ess, failed=False):
    folder.mkdir(parents=True)
    config = {"seed": seed, "optim": {"lr": lr, "weight_decay": 0.0}, "flow": {"transform": {"hidden": [8, 8]}},
              "paths": {"output_dir": str(folder)}, "experiment_name": "dimer_realnvp"}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if not failed:
        results = {"experiment": "dimer_realnvp", "config_hash": f"h{n_of(folder)}", "seed": seed, "ess": ess,
                   "n_samples": 100, "nll_test": -ess, "wall_s": 10.0,
                   "n_energy_evals": {"training": 100, "evaluation": 100},
                   "delta_f": {"closed->open": {"value": 1.0 + lr, "ci_low": 0.5, "ci_high": 1.5, "error": lr}}}
        (folder / "results.json").write_text(json.dumps(results))


def n_of(folder) -> str:
    return folder.name


@pytest.mark.bad_input
def test_a_damaged_results_file_is_one_damaged_row(tmp_path):
    make_run(tmp_path / "a", 1e-3, 0, ess=0.2)
    make_run(tmp_path / "b", 1e-2, 0, ess=0.4)
    (tmp_path / "b" / "results.json").write_text('{"ess": 0.4')  # truncated
    summary = summarize(tmp_path)
    rows = {r["run"]: r for r in csv.DictReader(open(summary["csv"]))}
    assert rows["a"]["status"] == "ok" and rows["b"]["status"].startswith("damaged results.json")


def test_flatten_dotted_keys():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": None}


def test_summary_of_a_two_by_two_sweep_with_a_failed_member(tmp_path):
    sweep = tmp_path / "multirun"
    for n, (lr, seed) in enumerate([(1e-3, 0), (1e-3, 1), (3e-4, 0), (3e-4, 1)]):
        make_run(sweep / str(n), lr, seed, ess=0.1 * (n + 1))
    make_run(sweep / "4", 1e-4, 0, ess=0.0, failed=True)
    summary = summarize(sweep)
    assert summary["swept"] == ["optim.lr"]  # seed and output paths are not hyperparameters
    assert summary["failed"] == ["4"]
    rows = list(csv.DictReader(open(summary["csv"])))
    assert [r["run"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert float(rows[2]["ess"]) == pytest.approx(0.3) and rows[4]["status"].startswith("failed")
    assert float(rows[0]["delta_f[closed->open].error"]) == pytest.approx(1e-3)
    text = summary["markdown"].read_text()
    assert "optim.lr" in text and "failed (no results.json)" in text
    names = sorted(p.name for p in summary["figures"])
    assert names == ["summary_ess_vs_optim.lr.png", "summary_nll_test_vs_optim.lr.png"]
    assert all(p.stat().st_size > 1000 for p in summary["figures"])


def test_console_script_prints_the_table(tmp_path, capsys):
    from bgexp.summarize import main

    make_run(tmp_path / "a", 1e-3, 0, ess=0.2)
    make_run(tmp_path / "b", 1e-2, 0, ess=0.4)
    main([str(tmp_path), "--out", str(tmp_path / "out"), "--metrics", "ess"])
    out = capsys.readouterr().out
    assert "| run | optim.lr | seed |" in out and "2 runs, swept: optim.lr" in out
    assert (tmp_path / "out" / "summary.csv").is_file()
    with pytest.raises(SystemExit, match="no run folders"):
        main([str(tmp_path / "out")])
