"""Benchmark: cost to accuracy of the SMC refinement against its baselines (issue 15, Build item 3).

For one experiment (default dimer_realnvp): `bgexp-train experiment=<experiment> [overrides]` (or
`--run-dir` a finished run), then `bgexp-eval run_dir=<run> smc=default smc.n_particles=<N>` once
per `--particles` entry, with the other SMC settings passed through. Every results.json is read
through bgexp.training.artifacts.read_results. Writes <out-dir>/smc_<experiment>.json, .md and .png:
one row per method and budget,

    is         importance sampling of the flow (the evaluation's own samples)
    smc_flow   SMC from the flow                     (results smc.flow)
    smc_prior  SMC from the prior, no trained flow   (results smc.prior)
    mcmc       MCMC from the training data at the flow's whole budget (results smc.mcmc)

with the energy evaluations as the results state them (IS: training + evaluation; SMC from the
flow: training + evaluation + SMC; SMC from the prior: its SMC; MCMC: its chains), Delta F with its
interval for each state pair, the error against the reference and whether the interval covers it,
the final ESS (per state for SMC), the wall time (the method's own, and with the training for the
flow's rows) and the SMC sampler's own overhead fraction; and a plot of |Delta F error| (CI
half-width as error bars) against energy evaluations. Targets without two states (particle
systems) have no Delta F: the table gives the SMC's log normalizer (log Z) instead and says so.

    python scripts/benchmark_smc.py [--experiment dimer_realnvp] [--particles 250 500 1000]
        [--smc smc.n_steps_per_level=10 smc.n_replicates=5 ...] [--eval n_bootstrap=50 ...]
        [--n-samples 20000] [--out-dir outputs/benchmarks] [training overrides key=value ...]
    python scripts/benchmark_smc.py --run-dir <finished run> --particles 250 500 1000

Arguments `key=value` may stand anywhere: `smc.*` ones (and `smc=<group>`) go to every bgexp-eval,
those following `--eval` whose key has no dot (conf/eval.yaml: n_bootstrap, n_data, seed,
checkpoint, ...) to every bgexp-eval too, all others to bgexp-train.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmark_common import fmt, machine, run_and_read, write_report

from bgexp.training.artifacts import read_results

METHODS = [("is", "IS of the flow"), ("smc_flow", "SMC from the flow"), ("smc_prior", "SMC from the prior"),
           ("mcmc", "MCMC from the data")]
LABELS = dict(METHODS)


# command line -------------------------------------------------------------------------------------
def split_argv(argv: list[str]) -> tuple[list[str], list[str], list[str], list[str]]:
    """(argparse tokens, training overrides, smc overrides, eval overrides): `key=value` tokens are
    taken out before argparse (whose nargs="+" would swallow them), as in benchmark_ice.py."""
    rest, train, smc, evaluation = [], [], [], []
    mode = None
    for token in argv:
        if token in ("--smc", "--eval"):
            mode = token[2:]
            continue
        if token.startswith("-"):
            mode = None
            rest.append(token)
        elif "=" in token:
            key = token.split("=", 1)[0].lstrip("+~")
            if key == "smc" or key.startswith("smc."):
                smc.append(token)
            elif mode == "eval" and "." not in key:
                evaluation.append(token)
            else:
                train.append(token)
        else:
            mode = None
            rest.append(token)
    return rest, train, smc, evaluation


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], list[str], list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default=None,
                        help="experiment to train (default dimer_realnvp; with --run-dir: the run's own)")
    parser.add_argument("--run-dir", default=None, help="evaluate this finished run instead of training")
    parser.add_argument("--particles", nargs="+", type=int, default=[250, 500, 1000],
                        help="smc.n_particles of each bgexp-eval (one run per entry)")
    parser.add_argument("--n-samples", type=int, default=20000, help="importance samples of each bgexp-eval")
    parser.add_argument("--out-dir", "--out", dest="out_dir", default="outputs/benchmarks")
    parser.add_argument("--smc", action="store_true",
                        help="marks the smc.key=value settings that follow (they are recognised anywhere)")
    parser.add_argument("--eval", action="store_true",
                        help="marks the bgexp-eval settings key=value that follow (keys without a dot)")
    rest, train, smc, evaluation = split_argv(argv)
    args = parser.parse_args(rest)
    if any(t.split("=", 1)[0].lstrip("+~") == "smc.n_particles" for t in smc):
        parser.error("set the particles with --particles, not smc.n_particles")
    if any(t.split("=", 1)[0] == "n_samples" for t in evaluation):
        parser.error("set the importance samples with --n-samples, not n_samples")
    if args.run_dir and train:
        parser.error(f"--run-dir evaluates a finished run: no training overrides ({' '.join(train)}); "
                     "bgexp-eval settings go after --eval, SMC settings as smc.key=value")
    if any(n < 2 for n in args.particles):
        parser.error("--particles: every entry must be >= 2")
    return args, train, smc, evaluation


# rows ---------------------------------------------------------------------------------------------
def estimate(entry: dict | None) -> dict:
    """value, interval, reference, error and coverage of one Delta F (or log Z) entry; the error and
    coverage computed here when the entry lacks them (the importance-sampling estimates)."""
    entry = entry or {}
    value, low, high, ref = (entry.get(k) for k in ("value", "ci_low", "ci_high", "reference"))
    error, covered = entry.get("error"), entry.get("covered")
    if ref is not None and value is not None:
        error = value - ref if error is None else error
        if covered is None and low is not None and high is not None:
            covered = bool(low <= ref <= high)
    return {"value": value, "ci_low": low, "ci_high": high, "reference": ref, "error": error, "covered": covered}


def rows_of(results: dict, n_particles: int, training: dict, path: Path) -> list[dict]:
    """The rows one bgexp-eval gives: IS, SMC from the flow and from the prior, MCMC."""
    spent = results["n_energy_evals"]
    block = results.get("smc") or {}
    smc_walls = sum(float(block[k].get("wall_s") or 0) for k in ("flow", "prior", "mcmc") if k in block)
    rows = [{
        "method": "is", "n_particles": None, "n_samples": results["n_samples"],
        "n_energy_evals": int(spent["training"] + spent["evaluation"]),
        "n_energy_evals_parts": {"training": spent["training"], "evaluation": spent["evaluation"]},
        "delta_f": {k: estimate(v) for k, v in results["delta_f"].items()}, "log_normalizer": None,
        "ess": None if results["ess"] is None else {"all": results["ess"]},
        # the evaluation's wall time less its SMC and MCMC (model loading and importance sampling)
        "wall_s": max(0.0, results["wall_s"] - smc_walls),
        "wall_s_with_training": training["wall_s"] + max(0.0, results["wall_s"] - smc_walls),
        "energy_w2": w2_entry(results.get("metrics", {}).get("energy_w2_reweighted")),
        "overhead_fraction": None, "results": str(path), "note": None}]
    for source in ("flow", "prior"):
        entry = block.get(source)
        if entry is None:
            continue
        evals = int(entry["n_energy_evals"])
        parts = {"smc": evals}
        if source == "flow":
            parts = {"training": spent["training"], "evaluation": spent["evaluation"], "smc": evals}
        rows.append({
            "method": f"smc_{source}", "n_particles": n_particles, "n_samples": None,
            "n_energy_evals": int(sum(parts.values())), "n_energy_evals_parts": parts,
            "delta_f": {k: estimate(v) for k, v in entry["delta_f"].items()},
            "log_normalizer": estimate(entry["log_normalizer"]) if "log_normalizer" in entry else None,
            "ess": entry.get("ess"), "wall_s": entry["wall_s"],
            "wall_s_with_training": entry["wall_s"] + (training["wall_s"] if source == "flow" else 0.0),
            "overhead_fraction": entry.get("overhead_fraction"), "mode": entry.get("mode"),
            "energy_w2": w2_entry(entry.get("energy_w2")), "budget_stops": entry.get("budget_stops"),
            "results": str(path), "note": None})
    mcmc = block.get("mcmc")
    if mcmc is not None:
        rows.append({
            "method": "mcmc", "n_particles": n_particles, "n_samples": None, "budget": mcmc.get("budget"),
            "n_energy_evals": mcmc.get("n_energy_evals"), "n_energy_evals_parts": {"mcmc": mcmc.get("n_energy_evals")},
            "delta_f": {k: estimate(v) for k, v in (mcmc.get("delta_f") or {}).items()}, "log_normalizer": None,
            "ess": None, "wall_s": mcmc.get("wall_s"), "wall_s_with_training": mcmc.get("wall_s"),
            "overhead_fraction": None, "n_chains": mcmc.get("n_chains"), "n_steps": mcmc.get("n_steps"),
            "populations": mcmc.get("populations"), "energy_w2": w2_entry(mcmc.get("energy_w2")),
            "results": str(path), "note": mcmc.get("skipped")})
    return rows


def w2_entry(w2) -> dict | None:
    """The energy W2 to the held-out frames as an interval entry: SMC's over replicates as it is,
    a single value (IS, MCMC) without an interval; None when absent or undefined."""
    if isinstance(w2, dict):
        return w2 if w2.get("value") is not None else None
    if w2 is None or w2 != w2:  # NaN
        return None
    return {"value": float(w2), "ci_low": None, "ci_high": None}


# report -------------------------------------------------------------------------------------------
def interval(e: dict | None) -> str:
    if not e or e.get("value") is None:
        return "n/a"
    if e.get("ci_low") is None:
        return fmt(e["value"])
    return f"{fmt(e['value'])} [{fmt(e['ci_low'])}, {fmt(e['ci_high'])}]"


def covered(e: dict | None) -> str:
    c = (e or {}).get("covered")
    return "n/a" if c is None else ("yes" if c else "no")


def markdown_table(rows: list[dict], pairs: list[str], references: dict) -> list[str]:
    head = ["method", "particles / samples", "energy evaluations"]
    if pairs:
        for pair in pairs:
            head += [f"Delta F({pair}) [kT], 95% CI (reference {fmt(references.get(pair))})",
                     f"error ({pair}) [kT]", f"covered ({pair})"]
    else:
        head += ["log Z, 95% CI (no two states: no Delta F)"]
    with_w2 = any(r.get("energy_w2") for r in rows)
    if with_w2:
        head += ["energy W2 to held-out [kT], 95% CI"]
    head += ["final ESS", "wall [s]", "wall with training [s]", "SMC overhead"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        budget = f"{r['n_samples']} samples" if r["n_samples"] is not None else f"{r['n_particles']}"
        if r["method"] == "mcmc" and r.get("n_chains") is not None:
            budget += f" ({r['n_chains']} chains x {r['n_steps']} steps)"
        cells = [LABELS[r["method"]], budget,
                 "n/a" if r["n_energy_evals"] is None else f"{r['n_energy_evals']:.3g}"]
        if pairs:
            for pair in pairs:
                e = r["delta_f"].get(pair)
                cells += [interval(e), fmt((e or {}).get("error")), covered(e)]
        else:
            cells += [interval(r["log_normalizer"]) if r["log_normalizer"] else "n/a"]
        if with_w2:
            cells += [interval(r.get("energy_w2"))]
        ess = r["ess"]
        cells += ["n/a" if not ess else ", ".join(f"{k} {100 * v:.1f}%" for k, v in ess.items()),
                  fmt(r["wall_s"], 1), fmt(r["wall_s_with_training"], 1),
                  "n/a" if r["overhead_fraction"] is None else f"{100 * r['overhead_fraction']:.0f}%"]
        if r.get("note"):
            cells[0] += f" ({r['note']})"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict], pairs: list[str], path: Path, title: str) -> Path:
    """|Delta F error| (CI half-width as error bars) against energy evaluations, log x; without a
    state pair the energy W2 to the held-out frames where the rows have it (the CI half-width over
    replicates as error bars), else the CI half-width of log Z (or of Delta F without a reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    markers = {"is": "s", "smc_flow": "o", "smc_prior": "^", "mcmc": "D"}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ylabel = "|Delta F error| [kT]"
    for method, label in METHODS:
        for i, pair in enumerate(pairs or [None]):
            points = []
            for r in rows:
                if r["method"] != method or not r["n_energy_evals"]:
                    continue
                use_w2 = pair is None and any(q.get("energy_w2") for q in rows)
                e = r["delta_f"].get(pair) if pair else (r.get("energy_w2") if use_w2 else r["log_normalizer"])
                if not e or e.get("value") is None:
                    continue
                half = (e["ci_high"] - e["ci_low"]) / 2 if e.get("ci_low") is not None else 0.0
                if use_w2:
                    ylabel = "energy W2 to held-out data [kT]"
                    points.append((r["n_energy_evals"], e["value"], half))
                    continue
                y = abs(e["error"]) if e.get("error") is not None else half
                if e.get("error") is None:
                    ylabel = "CI half-width [kT]" if pair else "log Z CI half-width"
                points.append((r["n_energy_evals"], y, half if e.get("error") is not None else 0.0))
            if not points:
                continue
            points.sort()
            x, y, yerr = zip(*points)
            name = label + (f" ({pair})" if pair and len(pairs) > 1 else "")
            ax.errorbar(x, y, yerr=yerr, marker=markers[method], linestyle=["-", "--", ":", "-."][i % 4],
                        capsize=3, label=name)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("energy evaluations")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# main ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, train_overrides, smc_overrides, eval_overrides = parse(argv)
    start = time.time()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    commands = []
    if args.run_dir:
        run_dir = Path(args.run_dir).resolve()
    else:
        experiment = args.experiment or "dimer_realnvp"
        commands.append(" ".join(["bgexp-train", f"experiment={experiment}", *train_overrides]))
        _, results_path, _ = run_and_read(experiment, train_overrides)
        run_dir = results_path.parent.resolve()
    trained = read_results(run_dir / "results.json").to_dict()
    experiment = args.experiment or trained["experiment"] or "run"
    training = {"wall_s": float(trained["wall_s"]), "n_energy_evals": trained["n_energy_evals"]}

    group = [t for t in smc_overrides if t.split("=", 1)[0] == "smc"] or ["smc=default"]
    settings = [t for t in smc_overrides if t.split("=", 1)[0] != "smc"]
    rows, evaluations = [], []
    for n in sorted(args.particles):
        overrides = [*group, f"smc.n_particles={n}", *settings, *eval_overrides]
        commands.append(" ".join(["bgexp-eval", f"run_dir={run_dir}", f"n_samples={args.n_samples}", *overrides]))
        results, path, _ = run_and_read(experiment, overrides, str(run_dir), args.n_samples)
        results = read_results(path).to_dict()  # as written (run_and_read rewrites the training count)
        if "smc" not in results:
            raise SystemExit(f"{path}: no smc block (was smc switched off?)")
        evaluations.append({"n_particles": n, "results": str(path), "wall_s": results["wall_s"],
                            "n_energy_evals": results["n_energy_evals"], "smc_settings": results["smc"]["settings"],
                            "data_energy_w2": results["smc"].get("data_energy_w2")})
        batch = rows_of(results, n, training, path)
        rows += [r for r in batch if r["method"] != "is" or not any(q["method"] == "is" for q in rows)]

    rows.sort(key=lambda r: ([m for m, _ in METHODS].index(r["method"]), r["n_particles"] or 0))
    pairs = list(dict.fromkeys(p for r in rows for p in r["delta_f"]))
    references = {p: next((r["delta_f"][p]["reference"] for r in rows
                           if p in r["delta_f"] and r["delta_f"][p]["reference"] is not None), None) for p in pairs}
    name = f"smc_{experiment}"
    figure = plot(rows, pairs, out_dir / f"{name}.png", f"{experiment}: cost to accuracy")
    reference_source = next((e.get("reference_source") for e in trained["delta_f"].values()
                             if e.get("reference_source")), None)
    row = {
        "benchmark": name, "experiment": experiment,
        "command": " ".join(["python", "scripts/benchmark_smc.py", *argv]),
        "commands": commands, "machine": machine(),
        "training_overrides": train_overrides, "smc_overrides": [*group, *settings], "eval_overrides": eval_overrides,
        "particles": sorted(args.particles), "n_samples": args.n_samples,
        "training": training, "n_energy_evals_training": training["n_energy_evals"]["training"],
        "pairs": pairs, "references": references, "reference_source": reference_source or "none (no state pairs)",
        "rows": rows, "evaluations": evaluations, "figure": str(figure),
        "wall_s_total": time.time() - start, "run_dir": str(run_dir),
    }
    summary = [("experiment", experiment, ""),
               ("SMC particles per run (per state)", ", ".join(map(str, row["particles"])), ""),
               ("SMC settings", " ".join(row["smc_overrides"]) or "smc=default", ""),
               ("importance samples per evaluation", str(args.n_samples), ""),
               ("training wall time", f"{training['wall_s']:.1f} s", "")]
    if not pairs:
        summary.append(("Delta F", "none: the target has no two states; log Z of the SMC and the energy W2 instead", ""))
    for e in evaluations:
        floor = e["data_energy_w2"]
        if floor and floor.get("value") is not None:
            summary.append((f"energy W2 of {floor['n_frames']} training frames against the held-out frames "
                            f"(the finite-sample floor at {e['n_particles']} particles)", interval(floor), ""))
    write_report(out_dir, f"SMC cost to accuracy: {experiment}", row, summary)
    extra = ["", "## Cost to accuracy", "",
             ("Energy evaluations as the results state them: IS = training + evaluation; SMC from the flow = "
             "training + evaluation + SMC; SMC from the prior = its SMC only; MCMC = its chains (budget: the "
             "flow's training + evaluation + SMC). Wall: the method's own (IS: the evaluation less its SMC and "
             "MCMC); with training: plus the training run's wall time for the flow's rows. SMC overhead: the "
             "sampler's own share of the SMC wall time (everything but energy and flow evaluations). Final "
             "ESS: SMC per state (mean over replicates), IS over all samples."), "",
             *markdown_table(rows, pairs, references), "",
             f"![|Delta F error| against energy evaluations]({figure.name})", "",
             "Commands run:", "", *[f"    {c}" for c in commands], ""]
    md_path = out_dir / f"{name}.md"
    md_path.write_text(md_path.read_text() + "\n".join(extra))
    print("\n".join(extra))
    return row


if __name__ == "__main__":
    main()
