"""Bijections with log-determinants (one module per family) and priors."""

from bgexp.flows.base import AffineStandardization, Flow, InverseFlow, SequentialFlow
from bgexp.flows.priors import NormalPrior
from bgexp.flows.realnvp import AffineCoupling, RealNVP
from bgexp.flows.splines import NeuralSpline, SplineCoupling

__all__ = [
    "Flow",
    "SequentialFlow",
    "InverseFlow",
    "AffineStandardization",
    "AffineCoupling",
    "RealNVP",
    "SplineCoupling",
    "NeuralSpline",
    "NormalPrior",
]
