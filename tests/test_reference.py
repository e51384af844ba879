"""The shipped dimer reference (scripts/reference_dimer.py, umbrella sampling + MBAR)."""

from __future__ import annotations

import numpy as np
import pytest

from bgexp.targets import DimerTarget


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_reference_loads_with_its_source(temperature):
    ref = DimerTarget(temperature=temperature).reference
    assert ref is not None
    entry = ref.delta_f["closed->open"]
    assert entry.ci_low < entry.value < entry.ci_high
    assert "MBAR" in entry.source and "reference_dimer.py" in entry.source
    profile = ref.profiles["dimer_distance"]
    assert len(profile["x"]) == len(profile["f"]) == len(profile["bin_edges"]) - 1


def test_no_reference_at_other_temperatures():
    assert DimerTarget(temperature=1.234).reference is None


def test_reference_profile_integrates_to_the_reference_delta_f():
    """Delta F = -ln( int_open e^-F / int_closed e^-F ): the profile and the state free-energy
    difference of the file must agree (within the coarse binning)."""
    ref = DimerTarget().reference
    p = ref.profiles["dimer_distance"]
    x = np.asarray(p["x"])
    f = np.array([np.inf if v is None else v for v in p["f"]])
    widths = np.diff(np.asarray(p["bin_edges"]))
    w = np.exp(-(f - f[np.isfinite(f)].min())) * widths
    df = -np.log(w[x >= 1.5].sum() / w[x < 1.5].sum())
    assert df == pytest.approx(ref.delta_f["closed->open"].value, abs=0.15)


def test_reference_profile_has_the_two_minima_and_a_barrier():
    p = DimerTarget().reference.profiles["dimer_distance"]
    x, f = np.asarray(p["x"]), np.array([np.inf if v is None else v for v in p["f"]])
    closed = f[(x > 0.8) & (x < 1.1)].min()
    opened = f[(x > 1.9) & (x < 2.2)].min()
    barrier = f[(x > 1.4) & (x < 1.6)].max()
    assert barrier - max(closed, opened) > 5.0


def test_reference_script_runs_end_to_end(tmp_path):
    """A tiny umbrella-sampling run through the real CLI writes the file format the target reads."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "reference_dimer.py"
    out = tmp_path / "dimer.json"
    proc = subprocess.run([sys.executable, str(script), "--n-windows", "12", "--chains-per-window", "2",
                           "--burn-in", "100", "--steps", "400", "--thin", "10", "--threads", "1",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    entry = data["temperatures"]["1"]
    df = entry["delta_f"]["closed->open"]
    assert df["ci_low"] <= df["value"] <= df["ci_high"]
    assert len(entry["profiles"]["dimer_distance"]["f"]) == 40
    assert "reference_dimer.py" in data["command"]


@pytest.mark.bad_input
def test_ala2_reference_is_keyed_by_temperature_and_force_field():
    """A modified ALA2 (another temperature or force field) has no reference instead of the 300 K one."""
    from types import SimpleNamespace

    from bgexp.targets.peptides import DEFAULT_FORCEFIELD, AlanineDipeptide

    standard = AlanineDipeptide._load_reference(SimpleNamespace(temperature=300.0, forcefield=list(DEFAULT_FORCEFIELD)))
    if standard is None:
        pytest.skip("no ALA2 reference shipped")
    assert standard.delta_f["C7eq->C7ax"].value == pytest.approx(4.04, abs=0.1)
    for temperature, forcefield in [(310.0, DEFAULT_FORCEFIELD), (300.0, ["amber14-all.xml"])]:
        other = SimpleNamespace(temperature=temperature, forcefield=list(forcefield))
        assert AlanineDipeptide._load_reference(other) is None
