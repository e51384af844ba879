"""Toy densities on the 2-torus with an exact normaliser and exact samples.

Configurations are angle pairs theta = (t1, t2) in [-pi, pi)^2 (any real input is read as an
angle: the energy is 2 pi-periodic in each coordinate). The unnormalised density is a mixture of
K bivariate von Mises "sine model" components,

    p~(theta) = sum_k w_k exp( k_k1 cos(t1 - m_k1) + k_k2 cos(t2 - m_k2)
                               + r_k sin(t1 - m_k1) sin(t2 - m_k2) ),

and the reduced energy at relative temperature T is u(theta) = -log p~(theta) / T (logsumexp over
the components). The normaliser Z = int exp(-u) dtheta is computed by the midpoint rule on the
periodic N x N grid (spectrally accurate for a smooth periodic integrand); samples are exact, by
rejection from the uniform distribution on the torus. Reference values (the free-energy difference
between the halves t1 < 0 and t1 >= 0, the marginal free-energy profiles and the 2-D histogram)
integrate the normalised density over each bin with Gauss-Legendre rules (spectrally accurate on
the non-periodic bins). This family is the kind of target the smooth torus flows are tested on
(Koehler, Kraemer, Noe, "Smooth Normalizing Flows", NeurIPS 2021).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bgexp.geometry import wrap_angle
from bgexp.spaces import Space
from bgexp.targets.base import Reference, ReferenceValue, Target

PI = math.pi
TWO_PI = 2.0 * math.pi

# Named parameter sets: weight w, mean (m1, m2), concentration (k1, k2), correlation r.
PRESETS: dict[str, list[dict[str, Any]]] = {
    # four unequal wells near (+-pi/2, +-pi/2) and one on the seam t1 = +-pi (tests periodicity)
    "four_wells": [
        {"weight": 1.0, "mean": [-1.6, 1.4], "concentration": [3.0, 2.5], "correlation": 1.0},
        {"weight": 0.6, "mean": [-1.5, -1.7], "concentration": [2.5, 3.5], "correlation": -1.2},
        {"weight": 0.5, "mean": [3.0, 0.3], "concentration": [4.0, 2.0], "correlation": 0.8},
        {"weight": 0.3, "mean": [1.4, -1.8], "concentration": [3.0, 3.0], "correlation": 1.5},
    ],
    # two elongated, strongly correlated wells with opposite tilts
    "correlated": [
        {"weight": 1.0, "mean": [-1.2, -1.0], "concentration": [5.0, 4.0], "correlation": 3.5},
        {"weight": 0.6, "mean": [1.6, 1.8], "concentration": [4.0, 6.0], "correlation": -4.0},
    ],
}

N_BINS = 36  # reference profiles and surface: 36 bins (10 degrees) per angle
GAUSS_NODES_PER_BIN = 16  # Gauss-Legendre nodes per bin and axis for the reference integrals
BOUND_GRID_POINTS = 1024  # grid on which the maximum of p~ is located for rejection sampling
BOUND_MARGIN = 1.05  # rejection bound M = 1.05 * grid maximum of p~
MAX_PROPOSALS = 1 << 20  # proposals per rejection batch


def _parse_components(components: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Validate a list of component dicts; float64 arrays log_w [K], mean [K, 2],
    concentration [K, 2], correlation [K]."""
    if isinstance(components, (str, bytes, Mapping)) or not isinstance(components, Sequence):
        raise ValueError(f"components must be a list of dicts, got {type(components).__name__}")
    if len(components) == 0:
        raise ValueError("components must hold at least one component")
    allowed = {"weight", "mean", "concentration", "correlation"}
    log_w, mean, conc, corr = [], [], [], []
    for k, comp in enumerate(components):
        where = f"components[{k}]"
        if not isinstance(comp, Mapping):
            raise ValueError(f"{where} must be a dict with keys {sorted(allowed)}, got {type(comp).__name__}")
        unknown = set(comp) - allowed
        if unknown:
            raise ValueError(f"{where} has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        for key in ("mean", "concentration"):
            if key not in comp:
                raise ValueError(f"{where}.{key} is missing")

        def pair(key: str) -> list[float]:
            value = comp[key]
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
                raise ValueError(f"{where}.{key} must be a list of 2 numbers, got {value!r}")
            try:
                out = [float(v) for v in value]
            except (TypeError, ValueError) as err:
                raise ValueError(f"{where}.{key} must be a list of 2 numbers, got {value!r}") from err
            if not all(math.isfinite(v) for v in out):
                raise ValueError(f"{where}.{key} must be finite, got {out}")
            return out

        def number(key: str, default: float) -> float:
            value = comp.get(key, default)
            try:
                out = float(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{where}.{key} must be a number, got {value!r}") from err
            if not math.isfinite(out):
                raise ValueError(f"{where}.{key} must be finite, got {out}")
            return out

        w = number("weight", 1.0)
        if w <= 0:
            raise ValueError(f"{where}.weight must be positive, got {w}")
        m, c, r = pair("mean"), pair("concentration"), number("correlation", 0.0)
        if min(c) < 0:
            raise ValueError(f"{where}.concentration must be >= 0, got {c}")
        log_w.append(math.log(w))
        mean.append(m)
        conc.append(c)
        corr.append(r)
    return {"log_w": np.array(log_w), "mean": np.array(mean), "concentration": np.array(conc),
            "correlation": np.array(corr)}


def _log_kernel(t1: Tensor, t2: Tensor, log_w: Tensor, mean: Tensor, conc: Tensor, corr: Tensor) -> Tensor:
    """log p~ at angles t1, t2 (same shape): logsumexp over the K components."""
    d1 = t1.unsqueeze(-1) - mean[:, 0]
    d2 = t2.unsqueeze(-1) - mean[:, 1]
    terms = log_w + conc[:, 0] * torch.cos(d1) + conc[:, 1] * torch.cos(d2) + corr * torch.sin(d1) * torch.sin(d2)
    return torch.logsumexp(terms, dim=-1)


def _gauss_legendre_bins(edges: np.ndarray, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes [n_bins, n_nodes] and weights [n_bins, n_nodes] of a Gauss-Legendre rule in each bin."""
    x, w = np.polynomial.legendre.leggauss(n_nodes)
    lo, hi = edges[:-1, None], edges[1:, None]
    half = 0.5 * (hi - lo)
    return lo + half * (x[None] + 1.0), half * w[None]


class TorusMixture(Target):
    """Mixture of bivariate von Mises sine-model densities on [-pi, pi)^2 (module docstring).

    `components`: list of dicts {weight, mean: [2], concentration: [2], correlation}; when None the
    named `preset` (see PRESETS) is used. `quadrature_points`: N of the N x N midpoint rule for the
    normaliser `log_normalizer` = log int exp(-u) dtheta.
    """

    dim = 2

    def __init__(
        self,
        components: Sequence[Mapping[str, Any]] | None = None,
        preset: str = "four_wells",
        temperature: float = 1.0,
        quadrature_points: int = 512,
    ):
        super().__init__()
        if components is None:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; known presets: {sorted(PRESETS)}")
            components = PRESETS[preset]
            self.preset: str | None = preset
        else:
            self.preset = None
        try:
            temperature = float(temperature)
        except (TypeError, ValueError) as err:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}") from err
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be positive and finite, got {temperature}")
        if isinstance(quadrature_points, bool) or not isinstance(quadrature_points, (int, np.integer)) \
                or quadrature_points < 16:
            raise ValueError(f"quadrature_points must be an integer >= 16, got {quadrature_points!r}")
        self.temperature = temperature
        self.quadrature_points = int(quadrature_points)
        params = _parse_components(components)
        self.n_components = len(params["log_w"])
        # float64 copies on the CPU for quadrature and sampling; buffers follow the module's device
        self._params64 = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in params.items()}
        for k, v in self._params64.items():
            self.register_buffer(f"param_{k}", v.clone(), persistent=False)

        self.observables = {"theta1": self.theta1, "theta2": self.theta2}
        self.states = {"left": self.is_left, "right": self.is_right}
        self.surfaces = {"torus": ("theta1", "theta2", (-PI, PI), (-PI, PI))}
        self.log_normalizer = self._log_normalizer(self.quadrature_points)
        self._log_bound: float | None = None  # log M of the rejection sampler, set on first use

    @property
    def space(self) -> Space:
        """Both features are angles on the circle [-pi, pi)."""
        return Space(self.dim, circular=(True,) * self.dim)

    # observables and states -------------------------------------------------------------
    def theta1(self, x: Tensor) -> Tensor:
        return wrap_angle(x[:, 0])

    def theta2(self, x: Tensor) -> Tensor:
        return wrap_angle(x[:, 1])

    def is_left(self, x: Tensor) -> Tensor:
        return self.theta1(x) < 0

    def is_right(self, x: Tensor) -> Tensor:
        return self.theta1(x) >= 0

    # energy ------------------------------------------------------------------------------
    def _log_kernel64(self, t1: Tensor, t2: Tensor) -> Tensor:
        """log p~ / T in float64 on the CPU (quadrature and sampling)."""
        p = self._params64
        return _log_kernel(t1, t2, p["log_w"], p["mean"], p["concentration"], p["correlation"]) / self.temperature

    def energy(self, x: Tensor) -> Tensor:
        """Reduced energy u = -log p~(x) / T, [batch]."""
        self.check_input(x)
        p = [b.to(device=x.device, dtype=x.dtype) for b in
             (self.param_log_w, self.param_mean, self.param_concentration, self.param_correlation)]
        return -_log_kernel(x[:, 0], x[:, 1], *p) / self.temperature

    def log_density(self, x: Tensor) -> Tensor:
        """Normalised log density log p(x) = -u(x) - log Z, [batch]."""
        return -self.energy(x) - self.log_normalizer

    # quadrature --------------------------------------------------------------------------
    @staticmethod
    def midpoint_grid(n_points: int) -> Tensor:
        """Cell centres -pi + (i + 1/2) 2 pi / n of the periodic midpoint rule, float64."""
        return -PI + (torch.arange(n_points, dtype=torch.float64) + 0.5) * (TWO_PI / n_points)

    def _grid_log_kernel(self, n_points: int) -> Tensor:
        grid = self.midpoint_grid(n_points)
        t1, t2 = torch.meshgrid(grid, grid, indexing="ij")
        return self._log_kernel64(t1, t2)

    def _log_normalizer(self, n_points: int) -> float:
        cell_area = (TWO_PI / n_points) ** 2
        return float(torch.logsumexp(self._grid_log_kernel(n_points).flatten(), 0)) + math.log(cell_area)

    def quadrature(self, n_points: int | None = None) -> tuple[Tensor, Tensor, float]:
        """Midpoint rule on the periodic n x n grid (default `quadrature_points`), float64:
        (grid [n], log p [n, n] normalised on that grid with log_p[i, j] at (grid[i], grid[j]),
        cell area (2 pi / n)^2); sum(exp(log_p)) * cell_area = 1."""
        n = self.quadrature_points if n_points is None else int(n_points)
        if n < 2:
            raise ValueError(f"n_points must be >= 2, got {n_points!r}")
        cell_area = (TWO_PI / n) ** 2
        log_k = self._grid_log_kernel(n)
        log_z = float(torch.logsumexp(log_k.flatten(), 0)) + math.log(cell_area)
        return self.midpoint_grid(n), log_k - log_z, cell_area

    # exact sampling ----------------------------------------------------------------------
    @property
    def log_bound(self) -> float:
        """log M, M = 1.05 * max of p~^(1/T) on a 1024 x 1024 grid (computed once)."""
        if self._log_bound is None:
            self._log_bound = float(self._grid_log_kernel(BOUND_GRID_POINTS).max()) + math.log(BOUND_MARGIN)
        return self._log_bound

    def _rejection(self, n: int, generator: torch.Generator | None, state: str | None) -> Tensor:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        dtype = torch.get_default_dtype()
        log_m = self.log_bound
        acceptance = math.exp(self.log_normalizer - log_m) / TWO_PI**2
        accepted: list[Tensor] = []
        remaining = int(n)
        while remaining > 0:
            size = min(MAX_PROPOSALS, int(1.2 * remaining / acceptance) + 1024)
            theta = -PI + TWO_PI * torch.rand(size, 2, generator=generator, dtype=torch.float64)
            log_u = torch.log(torch.rand(size, generator=generator, dtype=torch.float64))
            log_k = self._log_kernel64(theta[:, 0], theta[:, 1])
            if bool((log_k > log_m).any()):
                raise RuntimeError(
                    f"rejection bound violated: log p~ = {float(log_k.max()):.6g} > log M = {log_m:.6g}; "
                    "the grid maximum underestimates the density's maximum")
            x = wrap_angle(theta[log_u < log_k - log_m].to(dtype))
            if state is not None:
                x = x[self.states[state](x)]
            x = x[:remaining]
            accepted.append(x)
            remaining -= len(x)
        return torch.cat(accepted) if accepted else torch.empty(0, 2, dtype=dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n exact samples [n, 2] in [-pi, pi)^2 (default dtype), by rejection from the uniform
        density with bound M (`log_bound`); deterministic given `generator`."""
        return self._rejection(n, generator, None)

    def initial_configurations(
        self, state: str, n: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """n exact samples of the density restricted to `state` (rejection)."""
        if state not in self.states:
            raise ValueError(f"unknown state {state!r}; {type(self).__name__} has {list(self.states)}")
        return self._rejection(n, generator, state)

    # reference ---------------------------------------------------------------------------
    @property
    def reference(self) -> Reference:
        """Exact reference by quadrature, built on first access."""
        if self._reference is None:
            self._reference = self._build_reference()
        return self._reference

    @reference.setter
    def reference(self, value: Reference | None) -> None:
        # None (as set by Target.__init__) means: build from quadrature when first read
        self._reference = value

    def bin_log_probabilities(self, x_edges: np.ndarray, y_edges: np.ndarray,
                              n_nodes: int = GAUSS_NODES_PER_BIN) -> np.ndarray:
        """log of the probability of each bin [len(x_edges) - 1, len(y_edges) - 1], by a
        Gauss-Legendre rule with `n_nodes` nodes per bin and axis, normalised with log Z."""
        x_nodes, x_w = _gauss_legendre_bins(np.asarray(x_edges, dtype=np.float64), n_nodes)
        y_nodes, y_w = _gauss_legendre_bins(np.asarray(y_edges, dtype=np.float64), n_nodes)
        t1, t2 = torch.meshgrid(torch.from_numpy(x_nodes.ravel()), torch.from_numpy(y_nodes.ravel()),
                                indexing="ij")
        log_k = self._log_kernel64(t1, t2) - self.log_normalizer
        log_k = log_k + torch.from_numpy(np.log(x_w.ravel()))[:, None] + torch.from_numpy(np.log(y_w.ravel()))[None]
        nx, ny = x_nodes.shape[0], y_nodes.shape[0]
        log_k = log_k.reshape(nx, n_nodes, ny, n_nodes)
        return torch.logsumexp(log_k, dim=(1, 3)).numpy()

    def _build_reference(self) -> Reference:
        source = (f"quadrature, midpoint rule, {self.quadrature_points} x {self.quadrature_points} points "
                  f"(normaliser); Gauss-Legendre, {GAUSS_NODES_PER_BIN} x {GAUSS_NODES_PER_BIN} nodes per bin "
                  f"(states, profiles, surface)")
        edges = np.linspace(-PI, PI, N_BINS + 1)
        log_p = self.bin_log_probabilities(edges, edges)  # [36, 36], t1 bins x t2 bins
        log_p = log_p - float(torch.logsumexp(torch.from_numpy(log_p).flatten(), 0))  # sum exactly 1
        half = N_BINS // 2  # edge N_BINS / 2 is t1 = 0
        log_left = float(torch.logsumexp(torch.from_numpy(log_p[:half]).flatten(), 0))
        log_right = float(torch.logsumexp(torch.from_numpy(log_p[half:]).flatten(), 0))
        delta_f = {"left->right": ReferenceValue(value=log_left - log_right, source=source)}
        centres = 0.5 * (edges[:-1] + edges[1:])
        width = edges[1] - edges[0]
        profiles = {}
        for name, axis in (("theta1", 1), ("theta2", 0)):
            log_marginal = torch.logsumexp(torch.from_numpy(log_p), dim=axis).numpy()
            f = -(log_marginal - math.log(width))
            profiles[name] = {"x": centres.tolist(), "f": (f - f.min()).tolist(), "bin_edges": edges.tolist()}
        surfaces = {"torus": {"observables": ["theta1", "theta2"], "x_edges": edges.tolist(),
                              "y_edges": edges.tolist(), "p": np.exp(log_p).tolist()}}
        return Reference(delta_f=delta_f, profiles=profiles, source=source, surfaces=surfaces)

    def state_probabilities(self) -> dict[str, float]:
        """Exact probability of each state (from the reference quadrature)."""
        surface = np.asarray(self.reference.surfaces["torus"]["p"])
        half = N_BINS // 2
        return {"left": float(surface[:half].sum()), "right": float(surface[half:].sum())}
