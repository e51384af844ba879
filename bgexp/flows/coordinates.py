"""Mixed internal/Cartesian coordinates (Noe et al., Science 2019), exact modulo rigid motion.

The Boltzmann Generators paper represents a molecule by keeping a set of "Cartesian" atoms
(e.g. the backbone) in Cartesian coordinates, whitened by PCA, and placing every other atom
by internal coordinates (bond, angle, torsion) relative to atoms placed before it. This module
implements that representation as a `Flow`

    forward:  f in R^(3N-6)  ->  x in R^(3N)   (flattened [batch, 3N], atom-major xyz)
    inverse:  x              ->  f

with the six rigid-body degrees of freedom removed *exactly*: the first three Cartesian atoms
a, b, c define a body frame (origin at a, x-axis along b - a, c in the xy-plane with y_c > 0)
and the Cartesian block holds the 3 n_c - 6 non-trivial body coordinates. `forward` returns
configurations in that body frame, so the representation is defined modulo rigid motion:
forward(inverse(x)) equals x after optimal superposition (`superpose`, Kabsch), and equals x
exactly when x is already in the body frame.

Features are ordered [cartesian block (3 n_c - 6), bonds (n_ic), angles (n_ic), torsions
(n_ic)]; torsions are angles in [-pi, pi) (`circular` marks them), measured from a per-torsion
cut that `fit` places where the data are least dense; bonds and angles are raw.
The bijection's domain is r_ab > 0, y_c > 0, bonds > 0 and angles in (0, pi) (torsions are
periodic). `forward` accepts features outside it (it uses |r_ab|, |y_c|, |b|, |sin a| in the
log-det, so the values stay finite) but then returns a reflected/flipped configuration whose
`inverse` is a different feature vector.

Log-determinants (forward direction, f -> x; the inverse returns the negative):

    log|det| = 0.5 sum_k log lambda_k            (whitened -> body, after `fit`)
             + 2 log r_ab + log y_c              (body -> x modulo rigid motion)
             + sum_rows [2 log b + log sin a]    (NeRF placement, spherical coordinates)

The rigid-body term: write x = t + R u with translation t, rotation R and body coordinates u.
Atom a gives d^3 x_a = d^3 t. Atom b relative to a in spherical coordinates gives
d^3 x_b = r_ab^2 dr_ab dOmega_2 (dOmega_2 the area element of the direction e_1 of b - a).
Atom c relative to a in cylindrical coordinates about e_1 gives d^3 x_c = y_c dx_c dy_c dphi
(x_c along e_1, y_c the distance from the axis, phi the rotation about it). The remaining body
atoms are rotated and translated rigidly, which preserves volume. dOmega_2 dphi is the Haar
measure of SO(3) (total mass 8 pi^2; in exponential coordinates omega it is
2 (1 - cos|omega|) / |omega|^2 d^3 omega, i.e. d^3 omega at the identity), so

    d^(3N) x = r_ab^2 y_c  d^3 t  dR_Haar  d(body coordinates) ...,

and log(r_ab^2 y_c) is the (configuration-dependent) log-det of body -> x modulo rigid motion.
The NeRF term: `bgexp.geometry.nerf` places x_i in spherical coordinates about x_j (polar angle
pi - a), so |det dx_i / d(b, a, t)| = b^2 sin a; the atoms are placed in order, so the Jacobian
is block triangular and the log-dets add up.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from bgexp.flows.base import Flow
from bgexp.geometry import bond_angles, bond_lengths, dihedrals
from bgexp.geometry import dot as _dot
from bgexp.geometry import nerf as place_atoms  # NeRF placement (part of this module's API)
from bgexp.geometry import normalize as _normalize
from bgexp.geometry import superpose  # noqa: F401 (part of this module's API)

# --------------------------------------------------------------------------------------------
# Z-matrix
# --------------------------------------------------------------------------------------------


def _as_int_array(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"ZMatrix {name} must hold integer atom indices, got dtype {arr.dtype}")
    return arr.astype(np.int64)


@dataclass(frozen=True, eq=False)
class ZMatrix:
    """Which atoms are Cartesian and how every other atom is placed.

    `cartesian`: atom indices kept in Cartesian coordinates (>= 3; the first three define the body
    frame, so they must not be collinear in any configuration). `rows`: [n_ic, 4] rows (i, j, k, l)
    meaning bond |x_i - x_j|, angle(x_i, x_j, x_k) and dihedral(x_i, x_j, x_k, x_l); j, k, l must be
    Cartesian atoms or atoms placed by an earlier row. Every atom appears exactly once, either as
    a Cartesian atom or as the i of one row. j should be bonded to i (not checkable without bonds).
    """

    n_atoms: int
    cartesian: np.ndarray
    rows: np.ndarray

    def __post_init__(self) -> None:
        n = self.n_atoms
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 3:
            raise ValueError(f"ZMatrix n_atoms must be an integer >= 3, got {n!r}")
        n = int(n)
        cart = _as_int_array(self.cartesian, "cartesian")
        if cart.ndim != 1:
            raise ValueError(
                f"ZMatrix cartesian must be a 1-D array of atom indices, got shape {cart.shape}"
            )
        if len(cart) < 3:
            raise ValueError(
                f"ZMatrix needs at least 3 Cartesian atoms (they define the body frame), got {len(cart)}"
            )
        rows = _as_int_array(self.rows, "rows")
        if rows.size == 0:
            rows = rows.reshape(0, 4)
        if rows.ndim != 2 or rows.shape[1] != 4:
            raise ValueError(f"ZMatrix rows must have shape [n_ic, 4] (i, j, k, l), got {rows.shape}")
        for name, arr in (("cartesian", cart), ("rows", rows)):
            bad = arr[(arr < 0) | (arr >= n)]
            if bad.size:
                raise ValueError(f"ZMatrix {name} has atom indices out of range [0, {n}): {sorted(set(bad.tolist()))}")
        if len(set(cart.tolist())) != len(cart):
            dup = sorted({a for a in cart.tolist() if cart.tolist().count(a) > 1})
            raise ValueError(f"ZMatrix cartesian lists atoms more than once: {dup}")

        _check_placement_order(n, cart, rows)
        cart.setflags(write=False)
        rows.setflags(write=False)
        object.__setattr__(self, "n_atoms", n)
        object.__setattr__(self, "cartesian", cart)
        object.__setattr__(self, "rows", rows)

    @property
    def n_cartesian(self) -> int:
        return len(self.cartesian)

    @property
    def n_ic(self) -> int:
        return len(self.rows)

    @property
    def dim(self) -> int:
        """Number of features, 3N - 6."""
        return 3 * self.n_atoms - 6

    def levels(self) -> list[np.ndarray]:
        """Row indices grouped by placement depth: every row of a group only references Cartesian
        atoms or atoms of earlier groups, so a group can be placed in one batched step."""
        depth = {int(a): 0 for a in self.cartesian}
        row_depth = []
        for i, j, k, l in self.rows.tolist():
            d = 1 + max(depth[j], depth[k], depth[l])
            depth[i] = d
            row_depth.append(d)
        row_depth = np.asarray(row_depth, dtype=np.int64)
        return [np.nonzero(row_depth == d)[0] for d in range(1, int(row_depth.max(initial=0)) + 1)]

    @classmethod
    def from_bonds(
        cls,
        n_atoms: int,
        bonds: Sequence[Sequence[int]],
        cartesian: Sequence[int],
        heavy: Sequence[bool] | None = None,
    ) -> "ZMatrix":
        """Build a Z-matrix from a bond graph, breadth-first from the Cartesian atoms.

        Atoms are placed in BFS order (from the Cartesian atoms in their given order; the
        unplaced neighbours of each visited atom in the order heavy first, then by index). For atom
        i: j = a placed bonded neighbour of i (heavy first, then earliest placed); (k, l) jointly: k a
        placed neighbour of j, l a placed neighbour of k, else of j, all distinct, preferring a heavy
        k, then a heavy l (a torsion measured from a rotating methyl hydrogen would be a poor
        coordinate), then a proper chain i-j-k-l, then the earliest placed. When the graph is too
        small locally, k and l fall back to any placed atom, nearest in the bond graph first.
        Siblings (later atoms with the same j and k as an earlier one) use that first sibling as l,
        so that e.g. the 2nd and 3rd methyl hydrogens have narrow +-120 deg torsions.
        Deterministic. Raises ValueError if an atom is not connected to the Cartesian atoms.
        """
        n = int(n_atoms)
        cart = [int(a) for a in _as_int_array(cartesian, "cartesian").reshape(-1)]
        is_heavy = _heavy_mask(heavy, n)
        neighbours = _neighbour_sets(bonds, n)
        _check_frame_atoms(cart, n)
        placer = _BondGraphPlacer(neighbours, is_heavy, cart)
        rows = placer.place_all()
        missing = placer.unplaced()
        if missing:
            raise ValueError(
                f"{len(missing)} atom(s) are not connected to the Cartesian atoms through bonds: "
                f"{missing[:20]}{' ...' if len(missing) > 20 else ''}"
            )
        return cls(n, np.asarray(cart, dtype=np.int64), np.asarray(rows, dtype=np.int64).reshape(-1, 4))

    @classmethod
    def from_topology(cls, topology: Any, cartesian: Sequence[int] | None = None) -> "ZMatrix":
        """`from_bonds` on an mdtraj.Topology or openmm.app.Topology (hydrogens are not heavy).
        `cartesian=None` uses `backbone_indices(topology)`."""
        top = _to_mdtraj_topology(topology)
        bonds = [(b[0].index, b[1].index) for b in top.bonds]
        heavy = [a.element is not None and a.element.symbol != "H" for a in top.atoms]
        if cartesian is None:
            cartesian = backbone_indices(top)
        return cls.from_bonds(top.n_atoms, bonds, cartesian, heavy=heavy)


def _to_mdtraj_topology(topology: Any) -> Any:
    import mdtraj

    if isinstance(topology, mdtraj.Topology):
        return topology
    try:
        from openmm import app
    except ImportError:  # pragma: no cover - openmm is optional
        app = None
    if app is not None and isinstance(topology, app.Topology):
        return mdtraj.Topology.from_openmm(topology)
    raise ValueError(
        f"expected an mdtraj.Topology or openmm.app.Topology, got {type(topology).__name__}"
    )


def _heavy_mask(heavy: Sequence[bool] | None, n: int) -> np.ndarray:
    """`heavy` as a bool mask of length `n` (all heavy when None); ValueError for another length."""
    if heavy is None:
        return np.ones(n, dtype=bool)
    is_heavy = np.asarray(heavy, dtype=bool).reshape(-1)
    if is_heavy.shape != (n,):
        raise ValueError(f"heavy must be a bool mask of length n_atoms={n}, got shape {is_heavy.shape}")
    return is_heavy


def _neighbour_sets(bonds: Sequence[Sequence[int]], n: int) -> list[set[int]]:
    """The bonded neighbours of each of `n` atoms; ValueError for malformed bonds (not pairs,
    atoms out of range, an atom bonded to itself)."""
    bond_arr = _as_int_array(bonds, "bonds")
    if bond_arr.size == 0:
        bond_arr = bond_arr.reshape(0, 2)
    if bond_arr.ndim != 2 or bond_arr.shape[1] != 2:
        raise ValueError(f"bonds must be a list of (a, b) pairs, got array of shape {bond_arr.shape}")
    if bond_arr.size and (bond_arr.min() < 0 or bond_arr.max() >= n):
        raise ValueError(f"bonds reference atoms outside [0, {n})")
    neighbours: list[set[int]] = [set() for _ in range(n)]
    for a, b in bond_arr.tolist():
        if a == b:
            raise ValueError(f"bond ({a}, {b}) connects an atom to itself")
        neighbours[a].add(b)
        neighbours[b].add(a)
    return neighbours


def _check_frame_atoms(cart: list[int], n: int) -> None:
    """ValueError unless `cart` holds at least 3 distinct atom indices in [0, n)."""
    if len(cart) < 3:
        raise ValueError(
            f"ZMatrix needs at least 3 Cartesian atoms (they define the body frame), got {len(cart)}"
        )
    if any(a < 0 or a >= n for a in cart) or len(set(cart)) != len(cart):
        raise ValueError(f"cartesian must be distinct atom indices in [0, {n}), got {cart}")


class _BondGraphPlacer:
    """The breadth-first placement of `ZMatrix.from_bonds` (its docstring states the rules):
    `order` maps every placed atom to its placement rank, starting with the Cartesian atoms."""

    def __init__(self, neighbours: list[set[int]], is_heavy: np.ndarray, cartesian: list[int]):
        self.neighbours = neighbours
        self.is_heavy = is_heavy
        self.n = len(neighbours)
        self.cartesian = cartesian
        self.order: dict[int, int] = {a: r for r, a in enumerate(cartesian)}  # atom -> placement rank

    def rank(self, a: int) -> tuple[bool, int]:
        """Sort key of a placed atom: heavy first, then earliest placed."""
        return (not self.is_heavy[a], self.order[a])

    def graph_distances(self, src: int) -> dict[int, int]:
        """Bond-graph distance from `src` to every atom connected to it."""
        dist, frontier = {src: 0}, [src]
        while frontier:
            nxt = []
            for a in frontier:
                for b in sorted(self.neighbours[a]):
                    if b not in dist:
                        dist[b] = dist[a] + 1
                        nxt.append(b)
            frontier = nxt
        return dist

    def tiered(self, groups: list[list[int]], exclude: set[int], near: int) -> list[tuple[int, int, int]]:
        """Placed candidates as (tier, graph distance, atom): the atoms of the first groups
        (tiers 0, 1, ...); only if those are all empty, every placed atom (last tier)."""
        out = [(t, 1, a) for t, group in enumerate(groups)
               for a in group if a in self.order and a not in exclude]
        if out:
            return out
        dist = self.graph_distances(near)
        return [(len(groups), dist.get(a, self.n + 1), a) for a in self.order if a not in exclude]

    def references(self, i: int, j: int) -> tuple[int, int]:
        """(k, l): k a neighbour of j, l a neighbour of k (else of j); heavy atoms first."""
        nb, is_heavy, order = self.neighbours, self.is_heavy, self.order
        best = None
        for tk, dk, k in self.tiered([sorted(nb[j])], {i, j}, near=j):
            for tl, dl, l in self.tiered([sorted(nb[k]), sorted(nb[j])], {i, j, k}, near=k):
                key = (tk, not is_heavy[k], not is_heavy[l], tl, dk, dl, order[k], order[l])
                if best is None or key < best[0]:
                    best = (key, k, l)
        assert best is not None  # >= 3 Cartesian atoms are always placed
        return best[1], best[2]

    def place_all(self) -> list[tuple[int, int, int, int]]:
        """The rows (i, j, k, l) of every atom reachable from the Cartesian atoms, in BFS order
        (the unplaced neighbours of each visited atom heavy first, then by index)."""
        rows: list[tuple[int, int, int, int]] = []
        first_sibling: dict[tuple[int, int], int] = {}
        queue = list(self.cartesian)
        head = 0
        while head < len(queue):
            p = queue[head]
            head += 1
            for i in sorted(self.neighbours[p], key=lambda a: (not self.is_heavy[a], a)):
                if i in self.order:
                    continue
                rows.append(self.row(i, first_sibling))
                self.order[i] = len(self.order)
                queue.append(i)
        return rows

    def row(self, i: int, first_sibling: dict[tuple[int, int], int]) -> tuple[int, int, int, int]:
        """The row (i, j, k, l) of atom i; records i in `first_sibling` if it is the first atom
        placed on its (j, k)."""
        j = min((a for a in self.neighbours[i] if a in self.order), key=self.rank)
        k, l = self.references(i, j)
        # siblings (atoms on the same j, with the same k, e.g. the hydrogens of a methyl):
        # the later ones take the first as torsion reference, so their torsion is the
        # narrow offset about the j-k axis (~ +-120 deg) instead of another copy of the
        # wide, multimodal rotor angle
        first = first_sibling.setdefault((j, k), i)
        if first != i:
            l = first
        return (i, j, k, l)

    def unplaced(self) -> list[int]:
        """The atoms not placed (not connected to the Cartesian atoms), sorted."""
        return sorted(set(range(self.n)) - set(self.order))


def _check_placement_order(n: int, cart: np.ndarray, rows: np.ndarray) -> None:
    """ValueError unless every row places a new atom from four distinct atoms whose references
    are Cartesian or placed by an earlier row, and every one of the `n` atoms is placed."""
    placed = set(cart.tolist())
    for r, (i, j, k, l) in enumerate(rows.tolist()):
        if i in placed:
            where = "a Cartesian atom" if i in set(cart.tolist()) else "placed by an earlier row"
            raise ValueError(f"ZMatrix row {r}: atom {i} appears more than once (it is already {where})")
        if len({i, j, k, l}) != 4:
            raise ValueError(f"ZMatrix row {r}: atoms (i, j, k, l) = {(i, j, k, l)} must be distinct")
        later = [a for a in (j, k, l) if a not in placed]
        if later:
            raise ValueError(
                f"ZMatrix row {r} (atom {i}): reference atoms {later} are neither Cartesian nor placed "
                f"by an earlier row (references must be placed before the atom that uses them)"
            )
        placed.add(i)
    missing = sorted(set(range(n)) - placed)
    if missing:
        raise ValueError(
            f"ZMatrix does not cover every atom: {len(missing)} atom(s) are neither Cartesian nor placed "
            f"by a row: {missing[:20]}{' ...' if len(missing) > 20 else ''}"
        )


_BACKBONE_NAMES = {"ACE": ("CH3", "C"), "NME": ("N", "C", "CH3")}


def backbone_indices(topology: Any) -> np.ndarray:
    """Indices of the backbone atoms N, CA, C of every protein residue, in residue order (for the
    caps: ACE CH3, C and NME N, C/CH3), for an mdtraj.Topology or openmm.app.Topology."""
    top = _to_mdtraj_topology(topology)
    out: list[int] = []
    for residue in top.residues:
        names = _BACKBONE_NAMES.get(residue.name)
        if names is None:
            if not residue.is_protein:
                continue
            names = ("N", "CA", "C")
        by_name = {a.name: a.index for a in residue.atoms}
        out.extend(by_name[name] for name in names if name in by_name)
    return np.asarray(out, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# The flow
# --------------------------------------------------------------------------------------------


class MixedCoordinates(Flow):
    """Features f (3N - 6) <-> Cartesian x (3N) through whitened body coordinates and NeRF.

    `dim` = 3N - 6 is the feature (latent) side, `dim_out` = 3N the Cartesian side. `forward`
    returns configurations in the body frame of the first three Cartesian atoms; `inverse`
    accepts any pose (the rigid motion is discarded). `circular[d]` is True for torsion features;
    `slices` maps 'cartesian', 'bonds', 'angles', 'torsions' to feature slices. With
    `whiten=True`, `fit(xyz)` sets a PCA whitening of the Cartesian block (identity before).
    See the module docstring for the log-determinants.
    """

    def __init__(self, zmatrix: ZMatrix, whiten: bool = True):
        super().__init__()
        if not isinstance(zmatrix, ZMatrix):
            raise ValueError(f"MixedCoordinates expects a ZMatrix, got {type(zmatrix).__name__}")
        self.zmatrix = zmatrix
        self.whiten = bool(whiten)
        self.n_atoms = zmatrix.n_atoms
        self.n_cartesian = zmatrix.n_cartesian
        self.n_ic = zmatrix.n_ic
        self.dim = 3 * self.n_atoms - 6
        self.dim_out = 3 * self.n_atoms
        n_cb = 3 * self.n_cartesian - 6
        self.n_body = n_cb
        self.slices = {
            "cartesian": slice(0, n_cb),
            "bonds": slice(n_cb, n_cb + self.n_ic),
            "angles": slice(n_cb + self.n_ic, n_cb + 2 * self.n_ic),
            "torsions": slice(n_cb + 2 * self.n_ic, n_cb + 3 * self.n_ic),
        }
        circular = torch.zeros(self.dim, dtype=torch.bool)
        circular[self.slices["torsions"]] = True
        self.register_buffer("circular", circular)
        self.register_buffer("cartesian_atoms", torch.as_tensor(np.array(zmatrix.cartesian), dtype=torch.long))
        self.register_buffer("rows", torch.as_tensor(np.array(zmatrix.rows), dtype=torch.long).reshape(-1, 4))
        levels = zmatrix.levels()
        perm = np.concatenate(levels) if levels else np.zeros(0, dtype=np.int64)
        self.register_buffer("level_rows", torch.as_tensor(perm, dtype=torch.long))
        bounds = np.cumsum([0] + [len(g) for g in levels])
        self._level_bounds = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        # torsion features are t' = wrap(t - torsion_shift) in [-pi, pi): `fit` puts the cut of
        # each torsion (t' = +-pi) where the data are least dense; unit Jacobian
        self.register_buffer("torsion_shift", torch.zeros(self.n_ic, dtype=torch.float64))
        # whitening: body = mean + eigvecs @ (scale * w); identity until `fit`
        self.register_buffer("body_mean", torch.zeros(n_cb, dtype=torch.float64))
        self.register_buffer("body_eigvecs", torch.eye(n_cb, dtype=torch.float64))
        self.register_buffer("body_scale", torch.ones(n_cb, dtype=torch.float64))

    # ---------------------------------------------------------------- shape checks

    def _check(self, t: Tensor, width: int, name: str, what: str) -> None:
        if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[-1] != width:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"{type(self).__name__} expects {name} of shape [batch, {width}] ({what}), got {shape}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{type(self).__name__} expects floating-point {name}, got {t.dtype}")

    # ---------------------------------------------------------------- body frame

    def body_coordinates(self, x: Tensor) -> Tensor:
        """Cartesian x [batch, 3N] (or [batch, N, 3]) -> the 3 n_c - 6 body coordinates
        [r_ab, x_c, y_c, u_4 (3), ..., u_nc (3)] of the Cartesian atoms."""
        xyz = x.reshape(x.shape[0], self.n_atoms, 3)
        cart = xyz[:, self.cartesian_atoms]
        a, b, c = cart[:, 0], cart[:, 1], cart[:, 2]
        e1 = _normalize(b - a)
        v = c - a
        e2 = _normalize(v - _dot(v, e1).unsqueeze(-1) * e1)
        e3 = torch.linalg.cross(e1, e2)
        frame = torch.stack([e1, e2, e3], dim=-1)  # columns e1, e2, e3: [batch, 3, 3]
        rel = cart[:, 1:] - a.unsqueeze(1)
        body = rel @ frame  # [batch, n_c - 1, 3]: components along e1, e2, e3
        return torch.cat([body[:, 0, :1], body[:, 1, :2], body[:, 2:].reshape(x.shape[0], -1)], dim=-1)

    def _whiten_params(self, ref: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.body_mean.to(ref), self.body_eigvecs.to(ref), self.body_scale.to(ref)

    @torch.no_grad()
    def fit(self, xyz: Any, rel_floor: float = 1e-10) -> "MixedCoordinates":
        """Fit the PCA whitening of the Cartesian block to data xyz ([n, 3N] or [n, N, 3]), in
        float64: features = diag(1/sqrt(lambda)) V^T (body - mean). Eigenvalues below
        `rel_floor * max(lambda)` (rank-deficient data) are floored there, with a warning.
        With `whiten=False` this only validates the data. Returns self."""
        x = torch.as_tensor(np.asarray(xyz) if not isinstance(xyz, Tensor) else xyz)
        x = x.to(device=self.body_mean.device, dtype=torch.float64)
        if x.dim() == 3:
            x = x.reshape(x.shape[0], -1)
        self._check(x, self.dim_out, "data", "Cartesian coordinates")
        if x.shape[0] < 2:
            raise ValueError(f"MixedCoordinates.fit needs at least 2 configurations, got {x.shape[0]}")
        self._fit_torsion_cuts(x)
        if not self.whiten:
            return self
        body = self.body_coordinates(x)
        if not torch.isfinite(body).all():
            raise ValueError("MixedCoordinates.fit: non-finite body coordinates (degenerate frame atoms?)")
        mean = body.mean(0)
        cov = torch.atleast_2d(torch.cov(body.T))
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(0), evecs.flip(1)  # descending, PCA convention
        # deterministic signs: the largest-magnitude entry of every eigenvector is positive
        idx = evecs.abs().argmax(0)
        signs = torch.sign(evecs[idx, torch.arange(evecs.shape[1])])
        evecs = evecs * torch.where(signs == 0, torch.ones_like(signs), signs)
        floor = rel_floor * evals.max().clamp_min(torch.finfo(torch.float64).tiny)
        n_small = int((evals < floor).sum())
        if n_small:
            warnings.warn(
                f"MixedCoordinates.fit: {n_small} of {len(evals)} body-coordinate variances are below "
                f"{floor:.3g} (data rank deficient: {x.shape[0]} configurations for {len(evals)} "
                f"body coordinates?); they are floored at {floor:.3g}",
                RuntimeWarning,
                stacklevel=2,
            )
        evals = evals.clamp_min(floor)
        self.body_mean.copy_(mean.to(self.body_mean))
        self.body_eigvecs.copy_(evecs.to(self.body_eigvecs))
        self.body_scale.copy_(evals.sqrt().to(self.body_scale))
        return self

    def _fit_torsion_cuts(self, x: Tensor, n_bins: int = 36) -> None:
        """Place each torsion's cut at the centre of the least populated window of three
        adjacent bins (of `n_bins` on the circle), so that no mode of the data straddles +-pi."""
        if not self.n_ic:
            return
        xyz = x.reshape(x.shape[0], self.n_atoms, 3)
        i, j, k, l = self.rows.unbind(-1)
        t = dihedrals(xyz[:, i], xyz[:, j], xyz[:, k], xyz[:, l])  # [n, n_ic]
        edges = torch.linspace(-math.pi, math.pi, n_bins + 1, dtype=torch.float64)
        index = torch.bucketize(t.contiguous(), edges[1:-1])  # [n, n_ic] in 0..n_bins-1
        counts = torch.zeros(self.n_ic, n_bins, dtype=torch.float64)
        counts.scatter_add_(1, index.T, torch.ones_like(index.T, dtype=torch.float64))
        window = counts + counts.roll(1, 1) + counts.roll(-1, 1)
        centres = 0.5 * (edges[1:] + edges[:-1])
        cut = centres[window.argmin(1)]
        shift = torch.remainder(cut + math.pi + math.pi, 2 * math.pi) - math.pi
        self.torsion_shift.copy_(shift.to(self.torsion_shift))

    # ---------------------------------------------------------------- the bijection

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Features [batch, 3N-6] -> Cartesian [batch, 3N] in the body frame, log|det dx/df|."""
        self._check(z, self.dim, "features", "3N-6 mixed coordinates")
        batch = z.shape[0]
        mean, vecs, scale = self._whiten_params(z)
        w = z[:, self.slices["cartesian"]]
        body = mean + (w * scale) @ vecs.T
        logdet = torch.log(scale).sum().expand(batch)

        r, xc, yc = body[:, 0], body[:, 1], body[:, 2]
        zero = torch.zeros_like(r)
        cart = torch.cat(
            [
                torch.stack([zero, zero, zero, r, zero, zero, xc, yc, zero], -1),
                body[:, 3:],
            ],
            dim=-1,
        ).reshape(batch, self.n_cartesian, 3)
        logdet = logdet + 2 * torch.log(torch.abs(r)) + torch.log(torch.abs(yc))

        xyz = z.new_zeros(batch, self.n_atoms, 3).index_copy(1, self.cartesian_atoms, cart)
        if self.n_ic:
            bonds = z[:, self.slices["bonds"]]
            angles = z[:, self.slices["angles"]]
            torsions = z[:, self.slices["torsions"]] + self.torsion_shift.to(z)
            for start, stop in self._level_bounds:
                sel = self.level_rows[start:stop]
                i, j, k, l = self.rows[sel].unbind(-1)
                xi = place_atoms(xyz[:, j], xyz[:, k], xyz[:, l], bonds[:, sel], angles[:, sel], torsions[:, sel])
                xyz = xyz.index_copy(1, i, xi)
            logdet = logdet + (2 * torch.log(torch.abs(bonds)) + torch.log(torch.abs(torch.sin(angles)))).sum(-1)
        return xyz.reshape(batch, self.dim_out), logdet

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian [batch, 3N] (any pose) -> features [batch, 3N-6], log|det df/dx| (modulo
        rigid motion; the negative of the forward log-det at the corresponding point)."""
        self._check(x, self.dim_out, "x", "3N Cartesian coordinates, atom-major xyz")
        batch = x.shape[0]
        body = self.body_coordinates(x)
        mean, vecs, scale = self._whiten_params(x)
        w = ((body - mean) @ vecs) / scale
        logdet = -torch.log(scale).sum().expand(batch)
        logdet = logdet - 2 * torch.log(body[:, 0]) - torch.log(body[:, 2])
        feats = [w]
        if self.n_ic:
            xyz = x.reshape(batch, self.n_atoms, 3)
            i, j, k, l = self.rows.unbind(-1)
            xi, xj, xk, xl = xyz[:, i], xyz[:, j], xyz[:, k], xyz[:, l]
            bonds = bond_lengths(xi, xj)
            angles = bond_angles(xi, xj, xk)
            torsions = dihedrals(xi, xj, xk, xl) - self.torsion_shift.to(x)
            torsions = torch.remainder(torsions + math.pi, 2 * math.pi) - math.pi
            feats += [bonds, angles, torsions]
            logdet = logdet - (2 * torch.log(bonds) + torch.log(torch.sin(angles))).sum(-1)
        return torch.cat(feats, dim=-1), logdet

    def extra_repr(self) -> str:
        return (
            f"n_atoms={self.n_atoms}, n_cartesian={self.n_cartesian}, n_ic={self.n_ic}, "
            f"dim={self.dim}, dim_out={self.dim_out}, whiten={self.whiten}"
        )


class BoundedTorsions(Flow):
    """Map the real line onto the open interval (-pi, pi) on the torsion features, identity elsewhere:

        t = pi tanh(y / pi),    log|dt/dy| = log(1 - tanh(y / pi)^2)  (per torsion, summed).

    A flow on R whose torsion outputs are wrapped onto the circle is not a density on the
    circle: a configuration has one preimage per branch t + 2 pi k, and the log q of a sample
    from a branch outside [-pi, pi) is that branch's density only (too small), which inflates its
    importance weight. With this layer between the flow and `MixedCoordinates` every torsion
    has exactly one preimage, so log q is exact. It is close to the identity near the middle of
    the interval; `MixedCoordinates.fit` puts each torsion's cut where the data are sparsest, so
    the compressed ends hold little mass. `mask` marks the torsion features (`circular`).
    """

    def __init__(self, mask: Tensor):
        super().__init__()
        mask = torch.as_tensor(mask, dtype=torch.bool).reshape(-1)
        self.dim = int(mask.numel())
        self.register_buffer("mask", mask)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(z, "features")
        a = z / math.pi
        x = torch.where(self.mask, math.pi * torch.tanh(a), z)
        # log(1 - tanh(a)^2) = log sech(a)^2 = 2 (log 2 - |a| - softplus(-2 |a|)): finite with
        # finite gradients for every a (1 - tanh^2 underflows to 0 in float32 for |a| > 9)
        log_sech2 = 2.0 * (math.log(2.0) - a.abs() - torch.nn.functional.softplus(-2.0 * a.abs()))
        logdet = torch.where(self.mask, log_sech2, torch.zeros_like(z)).sum(-1)
        return x, logdet

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(x, "features")
        limit = 1.0 - torch.finfo(x.dtype).eps
        s = torch.where(self.mask, (x / math.pi).clamp(-limit, limit), torch.zeros_like(x))
        z = torch.where(self.mask, math.pi * torch.atanh(s), x)
        logdet = -torch.where(self.mask, torch.log1p(-s.square()), torch.zeros_like(x)).sum(-1)
        return z, logdet
