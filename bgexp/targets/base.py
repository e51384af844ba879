"""The target contract: what a Boltzmann generator samples.

A target has a dimension `dim`, a reduced energy `energy(x) -> [batch]` in units of kT
(u = U / kT, differentiable in x), named `observables` (x -> [batch] float), named `states`
(x -> [batch] bool) between which free-energy differences are reported, optional `reference`
values with their source, and the means to make sampling data (`initial_configurations`, used by
the samplers in `bgexp.targets.md`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable

import torch
from torch import Tensor, nn

Observable = Callable[[Tensor], Tensor]


@dataclass
class ReferenceValue:
    """A reference number with its uncertainty and where it comes from."""

    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    source: str = ""


@dataclass
class Reference:
    """Reference results for a target at one temperature."""

    delta_f: dict[str, ReferenceValue] = field(default_factory=dict)
    profiles: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    source: str = ""
    # 2-D histograms: name -> {"observables": [a, b], "x_edges", "y_edges", "p" (probabilities)}
    surfaces: dict[str, dict] = field(default_factory=dict)


def load_reference_file(name: str) -> dict | None:
    """Read `bgexp/targets/references/<name>` shipped with the package; None when absent."""
    path = resources.files("bgexp.targets") / "references" / name
    if not path.is_file():
        return None
    return json.loads(path.read_text())


class Target(nn.Module):
    """Base class of all targets; subclasses implement `energy` and fill the dictionaries."""

    dim: int
    temperature: float

    def __init__(self) -> None:
        super().__init__()
        self.observables: dict[str, Observable] = {}
        self.states: dict[str, Observable] = {}
        self.reference: Reference | None = None

    def energy(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def check_input(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects configurations of shape [batch, {self.dim}], "
                f"got {tuple(x.shape)}"
            )

    def initial_configurations(
        self, state: str, n: int, generator: torch.Generator | None = None
    ) -> Tensor:  # pragma: no cover - interface
        """n starting configurations inside `state` for MC/MD data generation."""
        raise NotImplementedError(f"{type(self).__name__} cannot generate its own data")

    def state_of(self, x: Tensor) -> Tensor:
        """Index of the state each configuration is in (-1 where none), following `states` order."""
        out = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        for k, fn in enumerate(self.states.values()):
            out = torch.where((out < 0) & fn(x), torch.full_like(out, k), out)
        return out
