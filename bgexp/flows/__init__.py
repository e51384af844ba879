"""Bijections with log-determinants (one module per family) and priors."""

from bgexp.flows.base import AffineStandardization, Flow, InverseFlow, SequentialFlow
from bgexp.flows.priors import MeanFreeNormalPrior, NormalPrior, TorusPrior
from bgexp.flows.realnvp import AffineCoupling, RealNVP
from bgexp.flows.splines import NeuralSpline, SplineCoupling
from bgexp.flows.torus import SmoothCoupling, SmoothTorusFlow

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
    "TorusPrior",
    "MeanFreeNormalPrior",
    "SmoothCoupling",
    "SmoothTorusFlow",
]
