"""bgexp.evaluation.plots: every figure is written as a readable PNG, also from inputs with inf/NaN."""

from __future__ import annotations

import warnings

import matplotlib.image as mpimg
import numpy as np
import pytest

from bgexp.evaluation import plots


def check_png(path, expected) -> np.ndarray:
    assert path == expected and path.suffix == ".png"
    assert path.is_file() and path.stat().st_size > 1000
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] == 4  # RGBA
    assert img.shape[0] > 100 and img.shape[1] > 100
    # something was drawn: not a blank canvas
    assert (img[..., :3] < 0.5).mean() > 0.001
    return img


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_energy_histograms_with_outliers_and_nonfinite(tmp_path, rng):
    data = rng.normal(-100.0, 5.0, 5000)
    samples = rng.normal(-98.0, 6.0, 5000)
    samples[:20] = 1e12  # a few huge energies must not squash the plot
    samples[20:25] = np.inf
    samples[25:30] = np.nan
    logw = -samples - 0.5 * ((samples + 98.0) / 6.0) ** 2
    w = np.exp(logw - np.nanmax(logw[np.isfinite(logw)]))
    w[30] = np.nan
    out = tmp_path / "sub" / "energies.png"  # parent folder is created
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarnings from NaN handling
        got = plots.plot_energy_histograms(
            {"data": data, "flow samples": samples, "reweighted": samples},
            out, title="energies", weights={"reweighted": w},
        )
    check_png(got, out)


def test_energy_histograms_edge_cases(tmp_path):
    out = tmp_path / "edge.png"
    got = plots.plot_energy_histograms(
        {"constant": np.full(10, 3.0), "all bad": np.array([np.nan, np.inf, -np.inf])}, str(out)
    )
    check_png(got, out)
    with pytest.raises(ValueError, match="unknown"):
        plots.plot_energy_histograms({"a": np.zeros(3)}, tmp_path / "x.png", weights={"b": np.ones(3)})
    with pytest.raises(ValueError, match="match"):
        plots.plot_energy_histograms({"a": np.zeros(3)}, tmp_path / "x.png", weights={"a": np.ones(4)})


def test_free_energy_profile_with_reference_states_and_nonfinite(tmp_path):
    x = np.linspace(0.5, 2.5, 41)
    f = 10 * (x - 0.94) ** 2 * (x - 2.06) ** 2 + 3.0  # shifted to min 0 by the plot
    f[0] = np.inf  # empty bin
    f[5] = np.nan
    err = np.full_like(x, 0.3)
    err[10] = np.nan
    reference = {"x": x, "f": f + 0.2, "f_std": np.full_like(x, 0.1), "label": "umbrella sampling"}
    states = {"closed": (-np.inf, 1.5), "open": (1.5, np.inf)}
    out = tmp_path / "profile.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = plots.plot_free_energy_profile(
            x, f, out, f_err=err, reference=reference, states=states, title="T = 1"
        )
    check_png(got, out)


def test_free_energy_profile_minimal_and_all_nonfinite(tmp_path):
    out = tmp_path / "minimal.png"
    check_png(plots.plot_free_energy_profile([0.0, 1.0, 2.0], [1.0, 0.0, 2.0], out), out)
    out = tmp_path / "empty.png"
    got = plots.plot_free_energy_profile(
        np.array([0.0, 1.0]), np.array([np.nan, np.inf]), out, states={"a": (0.0, 1.0)}
    )
    check_png(got, out)
    with pytest.raises(ValueError, match="shape"):
        plots.plot_free_energy_profile([0.0, 1.0], [1.0], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="'x' and 'f'"):
        plots.plot_free_energy_profile([0.0], [1.0], tmp_path / "bad.png", reference={"x": [0.0]})


def test_observable_histogram(tmp_path, rng):
    d_data = np.concatenate([rng.normal(0.94, 0.05, 3000), rng.normal(2.06, 0.05, 3000)])
    d_samples = np.concatenate([rng.normal(1.0, 0.1, 3000), [np.nan, np.inf, -np.inf]])
    weights = {"samples": np.concatenate([rng.uniform(0, 1, 3000), [1.0, 1.0, 1.0]])}
    out = tmp_path / "distance.png"
    got = plots.plot_observable_histogram(
        {"data": d_data, "samples": d_samples}, out, xlabel="dimer distance d", weights=weights
    )
    check_png(got, out)


def test_no_pyplot_figures_left_open(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plots.plot_observable_histogram({"a": np.arange(10.0)}, tmp_path / "a.png", xlabel="a")
    plots.plot_free_energy_profile(np.arange(3.0), np.arange(3.0), tmp_path / "b.png")
    assert plt.get_fignums() == before


def test_free_energy_surface_figure_with_reference(tmp_path):
    from bgexp.evaluation.plots import plot_free_energy_surface

    edges = np.linspace(-np.pi, np.pi, 11)
    p = np.random.default_rng(0).random((10, 10))
    p[0, 0] = 0.0  # an empty bin is left blank, not an error
    path = plot_free_energy_surface(edges, edges, p / p.sum(), tmp_path / "s.png", reference=p.T / p.sum(),
                                    title="reweighted")
    assert path.stat().st_size > 1000


def test_a_profile_line_breaks_at_an_empty_bin_instead_of_bridging_it():
    """An empty bin (F = inf, e.g. the unsampled barrier between two states after SMC) is NaN in the
    drawn line, which matplotlib breaks there; the curve is shifted to min 0 over the finite bins."""
    x, f, e = plots._profile([3.0, 0.0, 1.0, 2.0], [4.0, 2.0, np.inf, 1.0], [0.1, 0.1, 0.1, 0.1], "profile")
    assert np.array_equal(x, [0.0, 1.0, 2.0, 3.0])
    assert f[0] == 1.0 and np.isnan(f[1]) and f[2] == 0.0 and f[3] == 3.0
    assert np.isnan(e[1]) and e[0] == 0.1
