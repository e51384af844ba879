"""Bijections with log-determinants (one module per family) and priors."""

from bgexp.flows.base import AffineStandardization, Flow, InverseFlow, SequentialFlow
from bgexp.flows.coupling import Coupling
from bgexp.flows.priors import MeanFreeNormalPrior, NormalPrior, TorusPrior
from bgexp.flows.realnvp import AffineCoupling, RealNVP  # the preset `realnvp` stays in its module (it would shadow it)
from bgexp.flows.splines import CircularRQSpline, NeuralSpline, RQSpline, SplineCoupling, neural_spline
from bgexp.flows.torus import SmoothCoupling, SmoothRamps, SmoothTorusFlow, smooth_torus
from bgexp.flows.transforms import Affine, ElementwiseTransform, Inverse

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
    "Coupling",
    "ElementwiseTransform",
    "Affine",
    "Inverse",
    "RQSpline",
    "CircularRQSpline",
    "SmoothRamps",
    "neural_spline",
    "smooth_torus",
]
