"""Benchmark: smooth torus flows against circular spline flows (Smooth Normalizing Flows, 2021), CPU.

    python scripts/benchmark_torus.py toy  [--seeds 0 1 2] [hydra overrides ...]
    python scripts/benchmark_torus.py ala2 [--seeds 0] [hydra overrides ...]

`toy`: the four-well density on the 2-torus (bgexp/targets/torus.py), `experiment=torus_smooth`
against `experiment=torus_spline` at equal parameter count, each trained by NLL with and without
force matching; reports KL(target || flow) by quadrature (exact up to quadrature error), ESS,
held-out NLL, the force error of the learned density and the time per training step.

`ala2`: alanine dipeptide with the torsions on the torus, `experiment=ala2_smooth` against
`experiment=ala2_spline_torus`, each with and without force matching (loss.force_weight=0),
trained on the MD data without energy evaluations and reweighted with OpenMM energies; reports
ESS, KL(reference || reweighted) of the 36 x 36 Ramachandran histograms, Delta F(C7eq -> C7ax)
with its 95% CI against the umbrella-sampling reference, the force error of the learned density
(RMSE of grad log q against the MD forces in kT/nm, and relative to the RMS force) on held-out
frames, and the time per training step.

Every run goes through the real CLI (`bgexp-train`); results are read from results.json. Writes
outputs/benchmarks/torus_<toy|ala2>.json and .md, with the machine named; step-time ratios are
measured in the same session on the same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmark_common import fmt, machine, run_and_read

VARIANTS = {
    "toy": [
        ("smooth, NLL + FM", "torus_smooth", []),
        ("smooth, NLL", "torus_smooth", ["loss.force_weight=0.0"]),
        ("spline, NLL + FM", "torus_spline", []),
        ("spline, NLL", "torus_spline", ["loss.force_weight=0.0"]),
    ],
    "ala2": [
        ("smooth, NLL + FM", "ala2_smooth", []),
        ("smooth, NLL", "ala2_smooth", ["loss.force_weight=0.0"]),
        ("spline, NLL + FM", "ala2_spline_torus", []),
        ("spline, NLL + FM/10", "ala2_spline_torus", ["loss.force_weight=1e-4"]),
        ("spline, NLL", "ala2_spline_torus", ["loss.force_weight=0.0"]),
    ],
}

METRICS = {
    "toy": [("KL(target ‖ flow), quadrature", "kl_quadrature", 4), ("ESS %", "ess_percent", 2),
            ("NLL held-out", "nll_test", 4), ("force RMSE", "force_rmse", 3),
            ("force RMSE / RMS force", "force_rmse_relative", 3), ("Delta F left->right", "delta_f", 3),
            ("ms / step (in the run)", "step_ms", 1), ("parameters", "n_parameters", 0)],
    "ala2": [("ESS %", "ess_percent", 2), ("Ramachandran KL", "ramachandran_kl", 3),
             ("Delta F C7eq->C7ax", "delta_f", 2), ("NLL held-out", "nll_test", 2),
             ("force RMSE kT/nm", "force_rmse", 1), ("force RMSE / RMS force", "force_rmse_relative", 3),
             ("ms / step (in the run)", "step_ms", 1), ("parameters", "n_parameters", 0)],
}


def summarize(results: dict) -> dict:
    metrics = results["metrics"]
    key, df = next(iter(results["delta_f"].items()))  # the first state -> the second
    training = results.get("training", {})
    return {
        "ess_percent": 100 * results["ess"],
        "kl_quadrature": metrics.get("kl_quadrature"),
        "ramachandran_kl": metrics.get("surface/ramachandran/kl"),
        "nll_test": results.get("nll_test"),
        "force_rmse": metrics.get("force_rmse"),
        "force_rmse_relative": metrics.get("force_rmse_relative"),
        "delta_f_name": key,
        "delta_f": df["value"],
        "delta_f_ci95": [df["ci_low"], df["ci_high"]],
        "reference": df.get("reference"),
        "reference_source": df.get("reference_source"),
        "step_ms": None if training.get("step_s") is None else 1000 * training["step_s"],
        "n_parameters": training.get("n_parameters"),
        "wall_s": results["wall_s"],
    }


def step_times(system: str, overrides: list[str], n_steps: int = 30, rounds: int = 5) -> dict[str, dict]:
    """Milliseconds per training step (loss, backward, Adam step) of every variant, measured in
    one process with the variants interleaved round by round, so that machine noise hits all of
    them alike; the median over rounds. Also a sampling step (n = batch size, root finding for
    the smooth flow) per variant."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from bgexp.training.assemble import build_datamodule, build_model, build_target

    conf = Path(__file__).resolve().parents[1] / "conf"
    models, batches, targets = {}, {}, []
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        for label, experiment, extra in VARIANTS[system]:
            cfg = compose(config_name="config", overrides=[f"experiment={experiment}", *extra, *overrides])
            target = build_target(cfg)
            targets.append(target)
            data = build_datamodule(cfg, target)
            data.setup()
            model = build_model(cfg, target, data=data.x_train)
            model.latent_generator = torch.Generator().manual_seed(0)
            optimizer = instantiate(cfg.optim)(params=model.parameters())
            x, f = next(iter(data.train_dataloader()))
            models[label], batches[label] = (model, optimizer), (x, f)
    times: dict[str, dict[str, list[float]]] = {label: {"train": [], "sample": []} for label in models}
    try:
        for _ in range(rounds):
            for label, (model, optimizer) in models.items():
                x, f = batches[label]
                start = time.perf_counter()
                for step in range(n_steps):
                    optimizer.zero_grad()
                    loss, _ = model.loss(model, x, step=10**6, forces=f)
                    loss.backward()
                    optimizer.step()
                times[label]["train"].append(1000 * (time.perf_counter() - start) / n_steps)
                start = time.perf_counter()
                with torch.no_grad():
                    for _ in range(3):
                        model.sample(x.shape[0])
                times[label]["sample"].append(1000 * (time.perf_counter() - start) / 3)
    finally:
        for target in targets:
            if hasattr(target, "close"):
                target.close()
    return {label: {"train_ms": statistics.median(t["train"]), "sample_ms": statistics.median(t["sample"]),
                    "batch_size": int(batches[label][0].shape[0])} for label, t in times.items()}


def mean_and_spread(values: list[float | None], digits: int) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("system", choices=sorted(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (toy), 0 (ala2)")
    parser.add_argument("--out-dir", default="outputs/benchmarks")
    parser.add_argument("--only", nargs="*", default=None, help="run only variants whose label contains these")
    parser.add_argument("--steps-only", action="store_true",
                        help="no training runs: add the interleaved step timing to the last report")
    parser.add_argument("--step-rounds", type=int, default=5, help="rounds of the interleaved step timing (0: skip)")
    args, overrides = parser.parse_known_args(argv)
    seeds = args.seeds if args.seeds is not None else ([0, 1, 2] if args.system == "toy" else [0])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    rows: dict[str, list[dict]] = {}
    for label, experiment, extra in VARIANTS[args.system]:
        if args.steps_only or (args.only and not any(s in label for s in args.only)):
            continue
        for seed in seeds:
            try:
                results, path, _ = run_and_read(experiment, [f"seed={seed}", *extra, *overrides])
            except SystemExit as failure:  # a diverged run is a result too: recorded, the others go on
                rows.setdefault(label, []).append({"seed": seed, "experiment": experiment, "failed": str(failure),
                                                   "run_dir": None})
                print(label, seed, "FAILED:", failure, flush=True)
                continue
            row = summarize(results) | {"seed": seed, "run_dir": str(path.parent), "experiment": experiment}
            rows.setdefault(label, []).append(row)
            print(label, seed, {k: row[k] for k in ("ess_percent", "kl_quadrature", "ramachandran_kl", "force_rmse",
                                                     "step_ms")}, flush=True)
    name = f"torus_{args.system}"
    previous = out_dir / f"{name}.json"
    if (args.only or args.steps_only) and previous.is_file():  # a partial rerun keeps the other variants
        kept = json.loads(previous.read_text())["variants"]
        rows = {label: kept.get(label) or rows.get(label) for label, _, _ in VARIANTS[args.system]
                if (kept.get(label) or rows.get(label))} | rows
    steps = step_times(args.system, overrides, rounds=args.step_rounds) if args.step_rounds > 0 else {}
    if not steps and previous.is_file():  # no new timing: keep the last report's
        steps = json.loads(previous.read_text()).get("step_times", {})
    report = {"benchmark": name, "machine": machine(), "seeds": seeds, "overrides": overrides,
              "command": " ".join(["python", "scripts/benchmark_torus.py", *(argv if argv is not None else sys.argv[1:])]),
              "wall_s_total": time.time() - start, "variants": rows, "step_times": steps}
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2))
    labels = list(rows)
    md = [f"# Smooth vs spline torus flows: {args.system} ({time.strftime('%Y-%m-%d')})", "",
          f"Machine: {report['machine']}", f"Command: `{report['command']}`",
          f"Seeds: {seeds} (mean ± standard deviation over seeds)", "",
          "| metric | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for title, key, digits in METRICS[args.system]:
        md.append(f"| {title} | " + " | ".join(
            mean_and_spread([r.get(key) for r in rows[lb] if not r.get("failed")], digits) for lb in labels) + " |")
    failures = [f"- {lb}, seed {r['seed']}: {r['failed']}" for lb in labels for r in rows[lb] if r.get("failed")]
    if failures:
        md += ["", "Failed runs (n/a above):"] + failures
    if steps:
        base = steps.get("spline, NLL + FM")
        md += ["", "Time per step, measured in one process with the variants interleaved (median of rounds; "
                   f"batch {next(iter(steps.values()))['batch_size']}):", "",
               "| variant | training step (ms) | ratio to spline, NLL + FM | sampling a batch (ms) |", "|---|---|---|---|"]
        for label, t in steps.items():
            ratio = f"{t['train_ms'] / base['train_ms']:.2f}" if base else "n/a"
            md.append(f"| {label} | {t['train_ms']:.1f} | {ratio} | {t['sample_ms']:.1f} |")
    first = next((r for lb in labels for r in rows[lb] if not r.get("failed")), {})
    if first.get("reference") is not None:
        md += ["", f"Reference Delta F {first['delta_f_name']}: {fmt(first['reference'])} kT "
                   f"({first['reference_source']})"]
    md += ["", "Runs:"] + [f"- {lb}, seed {r['seed']}: {r['run_dir']}" for lb in labels for r in rows[lb]
                           if r.get("run_dir")]
    md += ["", f"Total wall time: {report['wall_s_total'] / 60:.1f} min"]
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return report


if __name__ == "__main__":
    main()
