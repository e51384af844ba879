"""Targeted free-energy perturbation with a learned map (Jarzynski, Phys. Rev. E 65, 046122, 2002;
Wirnsberger, Ballard, Papamakarios, Abercrombie, Racanière, Pritzel, Rezende, Blundell, "Targeted
free energy estimation via learned mappings", J. Chem. Phys. 153, 144112, 2020; with rigid-body
flows for molecular crystals, Köhler, Invernizzi, de Haan, Noé, ICML 2023).

Two thermodynamic states of one system that differ in temperature: u_A = U / kT_A and
u_B = U / kT_B, with U the potential of the target (the target is state B). A bijection F maps
configurations of A onto B. For x ~ A and y ~ B the generalised works are

    W_F(x) = u_B(F(x)) - u_A(x) - ln|det J_F(x)|,
    W_R(y) = u_A(F^-1(y)) - u_B(y) - ln|det J_F^-1(y)|,

and, with f = -ln Z in each state's own kT,

    LFEP:  Delta f = f_B - f_A = -ln < exp(-W_F) >_A               (Zwanzig with the map),
    LBAR:  Delta f from Bennett's acceptance ratio of {W_F} and {W_R}.

Both are exact for any bijection; the map only decides the variance. Training minimises the mean
forward work, <W_F>_A = Delta f + KL(F#p_A || p_B) >= Delta f, which is the reverse KL of the mapped
distribution against B (no samples of B are needed to train). Without a map (F = identity) the
works are the plain ones, W_F = u_B(x) - u_A(x) = U(x) (1/kT_B - 1/kT_A), the FEP/BAR baseline.
Samples of A come from MD (their energies U are stored, so u_A costs nothing); every u_B(F(x))
and u_A(F^-1(y)) is one energy evaluation of the target and is counted.

Global translations: when u is invariant under translating the whole system (a crystal in a
periodic box) but the MD keeps the centre of mass fixed (OpenMM's CMMotionRemover), the frames
sample the density conditioned on one overall position. A map that is not translation-equivariant
then learns, on that slice, to contract the overall position too (around the lattice, by
sqrt(T_B / T_A) per axis like every other displacement), and LFEP and LBAR from the slice are
biased by that spurious log-det, (3/2) ln(T_A / T_B): measured +1.53 / +1.40 kT at 250 -> 100 K
(predicted 1.37) and +2.47 / +2.11 kT at 250 -> 50 K (predicted 2.41) for ice. Two exact remedies:
a flow that is equivariant under global translations (`RigidBodyFlow(anchor=True)`: W is then the
same on every slice), or `random_translations`: every frame (in training and in evaluation)
shifted as a whole by an independent uniform vector in the box, which gives samples of the full
density (but leaves the flow to find the lattice by itself).

Error bars: bootstrap over the works, then widened by sqrt(g), g the statistical inefficiency of
the works in trajectory order (bgexp.estimators.correlation), since MD frames are correlated. The
map removes most of it: for ice16 at 250 -> 100 K the plain reverse works (the energies) have
g = 12.9 and the mapped ones g = 1.03.

Coordinates: the flow's. The target supplies `rigid_energy(x)` (rigid-body targets: reduced energy
at T_B of flattened rigid-body coordinates) or else `energy(x)`, `to_rigid(positions)` when MD
frames must be converted, and `kbt` (k_B T_B in kJ/mol).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from bgexp.estimators import (bar, bootstrap, bootstrap_independent, ess, fep, inflate_for_correlation,
                              statistical_inefficiency)
from bgexp.targets.dynamics import MDSettings, is_complete, load_md, run_md
from bgexp.targets.base import MissingAbilityError, RigidBodyTarget
from bgexp.targets.openmm import kbt_kj_per_mol
from bgexp.training.base_module import FlowModule

log = logging.getLogger(__name__)


class TargetedFEP(FlowModule):
    """Trains a map F from state A (temperature_a kelvin, MD samples) onto the target's state B by
    minimising the mean forward work <W_F>_A (module docstring). Batches are (x_A, U_A) with U_A the
    potential energies (kJ/mol) of the samples."""

    def __init__(self, flow: torch.nn.Module, target, temperature_a: float,
                 optimizer: Callable[..., torch.optim.Optimizer], scheduler: Callable[..., Any] | None = None,
                 max_consecutive_nonfinite: int = 50, random_translations: bool = False, seed: int = 0):
        super().__init__(optimizer, scheduler, seed=seed, max_consecutive_nonfinite=max_consecutive_nonfinite)
        if random_translations and not isinstance(target, RigidBodyTarget):
            raise MissingAbilityError(f"random_translations needs a rigid-body target with "
                                      f"random_translation(x, generator); {type(target).__name__} has none")
        self.random_translations = bool(random_translations)
        self.translation_generator = torch.Generator().manual_seed(int(seed))
        if not temperature_a > 0:
            raise ValueError(f"temperature_a must be positive (kelvin), got {temperature_a}")
        self.flow, self.target = flow, target
        self.kbt_a = kbt_kj_per_mol(temperature_a)
        self.kbt_b = float(target.kbt)
        self.temperature_a = float(temperature_a)

    def shifted(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x with every configuration translated as a whole by a uniform random vector, when
        `random_translations` is on (see the module docstring); else x."""
        if not self.random_translations:
            return x
        return self.target.random_translation(x, generator or self.translation_generator)

    # works -------------------------------------------------------------------------------------
    def energy_b(self, x: Tensor) -> Tensor:
        """u_B of flow coordinates; counted as training or evaluation energy calls."""
        self.count_energy(x.shape[0], "train" if self.training and torch.is_grad_enabled() else "eval")
        return (self.target.rigid_energy if isinstance(self.target, RigidBodyTarget) else self.target.energy)(x)

    def forward_work(self, x_a: Tensor, potential_a: Tensor) -> tuple[Tensor, Tensor]:
        """(W_F [B], F(x_A)) for samples of A with potential energies U_A (kJ/mol)."""
        y, logdet = self.flow(x_a)
        return self.energy_b(y) - potential_a.to(y) / self.kbt_a - logdet, y

    def reverse_work(self, x_b: Tensor, potential_b: Tensor) -> tuple[Tensor, Tensor]:
        """(W_R [B], F^-1(y_B)) for samples of B with potential energies U_B (kJ/mol); u_A = u_B kT_B / kT_A."""
        z, logdet = self.flow.inverse(x_b)
        u_a = self.energy_b(z) * (self.kbt_b / self.kbt_a)
        return u_a - potential_b.to(z) / self.kbt_b - logdet, z

    # Lightning hooks ---------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int):
        x_a, potential_a = batch
        work, _ = self.forward_work(self.shifted(x_a), potential_a)
        loss = work.mean()
        if self.skip_nonfinite(loss, what="mapped work"):
            return None
        self.log("train/work", loss, prog_bar=True, sync_dist=True)
        self.log("train/work_std", work.detach().std(), sync_dist=True)
        self.log("train/energy_evals", float(self.n_energy_evals_train), sync_dist=True, reduce_fx="sum")
        return loss

    def validation_step(self, batch, batch_idx: int):
        x_a, potential_a = batch
        generator = torch.Generator().manual_seed(batch_idx)  # the same shifts in every validation
        work, _ = self.forward_work(self.shifted(x_a, generator), potential_a)
        self.log("val/work", work.mean(), prog_bar=True, sync_dist=True)
        finite = work[torch.isfinite(work)].double().cpu().numpy()
        if finite.size:
            self.log("val/lfep", fep(finite)[0])
            self.log("val/ess", ess(-finite))
        return work.mean()


# data --------------------------------------------------------------------------------------------
@dataclass
class StateSamples:
    """Samples of one state in the flow's coordinates with their potential energies (kJ/mol)."""

    x: Tensor
    potential: Tensor
    source: str


def load_state(target, path: str | Path, md: dict[str, Any] | None = None, temperature: float | None = None,
               max_frames: int | None = None) -> StateSamples:
    """MD frames of one state as flow coordinates (`target.to_rigid` when the target has it) with their
    energies. A missing or incomplete folder is generated (or resumed) with the `md` settings at
    `temperature` kelvin (the target's own when None) through `run_md`."""
    path = Path(path)
    if not is_complete(path):
        if md is None:
            raise FileNotFoundError(f"no complete MD folder at {path} and no `md` settings to generate it")
        settings = MDSettings(**{**md, "temperature": temperature})
        log.info("generating MD at %s K into %s", temperature or target.temperature, path)
        run_md(target, path, settings)
    data = load_md(path, n_atoms=target.n_atoms)
    x = torch.as_tensor(np.asarray(data.x, dtype=np.float64))
    if max_frames is not None:
        x, energies = x[: int(max_frames)], data.energies[: int(max_frames)]
    else:
        energies = data.energies
    if isinstance(target, RigidBodyTarget):
        x = target.to_rigid(x)
    return StateSamples(x=x, potential=torch.as_tensor(np.asarray(energies, dtype=np.float64)), source=str(path))


class StatePairData(pl.LightningDataModule):
    """Training batches (x_A, U_A) from state A with a random held-out fraction (validation and the
    final LFEP), and the samples of state B for LBAR."""

    def __init__(self, state_a: StateSamples, state_b: StateSamples | None, val_fraction: float = 0.2,
                 batch_size: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n = state_a.x.shape[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_val = max(1, int(round(val_fraction * n)))
        # held-out frames in trajectory order: their works are a time series whose correlation
        # (statistical inefficiency) widens the error bars of evaluate_tfep
        val, train = order[:n_val].sort().values, order[n_val:]
        if len(train) < 1:
            raise ValueError(f"state A has {n} samples: too few for a split with val_fraction={val_fraction}")
        self.x_train, self.u_train = state_a.x[train].to(dtype), state_a.potential[train]
        self.x_val, self.u_val = state_a.x[val].to(dtype), state_a.potential[val]
        self.state_b = state_b
        self.batch_size = int(batch_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x_train, self.u_train), batch_size=self.batch_size, shuffle=True,
                          drop_last=len(self.x_train) > self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x_val, self.u_val), batch_size=self.batch_size)


# evaluation --------------------------------------------------------------------------------------
def _in_batches(fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], x: Tensor, u: Tensor,
                batch_size: int, device, desc: str = "works", progress: bool = True) -> np.ndarray:
    from tqdm.auto import tqdm

    works = []
    with torch.no_grad(), tqdm(total=x.shape[0], desc=desc, unit="sample", disable=not progress,
                               mininterval=2.0) as bar:
        for start in range(0, x.shape[0], batch_size):
            w, _ = fn(x[start:start + batch_size].to(device), u[start:start + batch_size].to(device))
            works.append(w.double().cpu())
            bar.update(w.shape[0])
    return torch.cat(works).numpy()


def _estimate(name: str, works: tuple[np.ndarray, ...], n_boot: int, seed: int) -> dict[str, Any]:
    """FEP (one work array) or BAR (forward, reverse): value, the analytic std (pymbar), the bootstrap
    std as if the samples were independent (`std_iid`) and `std` = std_iid * sqrt(max g), g the
    statistical inefficiency of each work series in trajectory order (MD frames are correlated;
    bgexp.estimators.correlation); the 95% interval is the bootstrap's widened by the same factor
    about the value. Non-finite works count as +inf (zero weight)."""
    inefficiencies = [statistical_inefficiency(w) for w in works]
    cleaned = tuple(np.where(np.isfinite(w), w, np.inf) for w in works)
    if len(cleaned) == 1:
        value, std = fep(cleaned[0])
        boot = bootstrap(lambda w: fep(w)[0], cleaned[0], n_boot=n_boot, seed=seed)
    else:
        value, std = bar(*cleaned)
        boot = bootstrap_independent(lambda f, r: bar(f, r)[0], *cleaned, n_boot=n_boot, seed=seed)
    factor = inflate_for_correlation(1.0, inefficiencies)
    ci95 = [boot.ci_low, boot.ci_high]
    if math.isfinite(value):
        ci95 = [value + factor * (boot.ci_low - value), value + factor * (boot.ci_high - value)]
    return {"estimator": name, "value": value, "std_analytic": std, "std": boot.std * factor,
            "std_iid": boot.std, "statistical_inefficiency": inefficiencies, "ci95": ci95,
            "n_bootstrap_nonfinite": boot.n_nonfinite}


def evaluate_tfep(module: TargetedFEP, state_a: StateSamples, state_b: StateSamples | None,
                  batch_size: int = 256, n_boot: int = 200, seed: int = 0,
                  reference: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """LFEP on the held-out samples of A, LBAR with the samples of B, and the plain FEP/BAR baselines
    (no map), each with bootstrap error bars widened by the works' statistical inefficiency (samples
    given in trajectory order); ESS of the mapped samples (Kish, of exp(-W_F)); the
    work statistics; errors against `reference` {value, std, source} with `covered` = |error| <= 2 std
    of the estimate."""
    was_training = module.training
    module.eval()
    device = module.device
    dtype = next((p.dtype for p in module.flow.parameters()), torch.get_default_dtype())  # the flow's precision
    generator = torch.Generator().manual_seed(seed)
    x_a = module.shifted(state_a.x.to(dtype), generator)
    w_f = _in_batches(module.forward_work, x_a, state_a.potential, batch_size, device, "forward works (A -> B)",
                      progress)
    beta_difference = 1.0 / module.kbt_b - 1.0 / module.kbt_a
    plain_f = state_a.potential.double().numpy() * beta_difference
    results: dict[str, Any] = {
        "n_samples_a": int(state_a.x.shape[0]),
        "ess_mapped": ess(-np.where(np.isfinite(w_f), w_f, np.inf)),
        "ess_plain": ess(-plain_f),
        "work_forward": {"mean": float(np.mean(w_f[np.isfinite(w_f)])), "std": float(np.std(w_f[np.isfinite(w_f)])),
                         "n_nonfinite": int((~np.isfinite(w_f)).sum())},
        "work_forward_plain": {"mean": float(plain_f.mean()), "std": float(plain_f.std())},
        "estimates": {"lfep": _estimate("LFEP", (w_f,), n_boot, seed),
                      "fep": _estimate("FEP", (plain_f,), n_boot, seed)},
    }
    if state_b is not None:
        x_b = module.shifted(state_b.x.to(dtype), generator)
        w_r = _in_batches(module.reverse_work, x_b, state_b.potential, batch_size, device,
                          "reverse works (B -> A)", progress)
        plain_r = -state_b.potential.double().numpy() * beta_difference
        results["n_samples_b"] = int(state_b.x.shape[0])
        results["work_reverse"] = {"mean": float(np.mean(w_r[np.isfinite(w_r)])),
                                   "std": float(np.std(w_r[np.isfinite(w_r)])),
                                   "n_nonfinite": int((~np.isfinite(w_r)).sum())}
        results["estimates"]["lbar"] = _estimate("LBAR", (w_f, w_r), n_boot, seed)
        results["estimates"]["bar"] = _estimate("BAR", (plain_f, plain_r), n_boot, seed)
        results["works"] = {"reverse": w_r}
    results.setdefault("works", {})["forward"] = w_f
    if reference is not None:
        for entry in results["estimates"].values():
            if entry["value"] is not None and math.isfinite(entry["value"]):
                entry["error"] = entry["value"] - float(reference["value"])
                entry["covered_2sigma"] = bool(abs(entry["error"]) <= 2 * entry["std"]) \
                    if math.isfinite(entry["std"]) else False
        results["reference"] = dict(reference)
    module.train(was_training)
    return results


__all__ = ["TargetedFEP", "StateSamples", "StatePairData", "load_state", "evaluate_tfep"]
