"""Rigid-body flows on (T^3 x S^3)^N (Köhler et al., ICML 2023), in three parts:

- `bgexp.flows.rigid.rotation`: the conditional convex-potential rotation of S^3/{+-1}
  (`ConvexRotation`, its potential, root finder and parameters);
- `bgexp.flows.nn.MoleculeTransformer`: the permutation-equivariant attention conditioner;
- `bgexp.flows.rigid.flow`: the couplings (`RotationCoupling`, `TranslationCoupling`), the preset
  `RigidBodyFlow` and the factory `rigid_body_flow(space, ...)`.

Everything that used to be imported from the single module bgexp/flows/rigid.py is re-exported here.
"""

from bgexp.flows.nn import MoleculeTransformer, _SelfAttentionLayer
from bgexp.flows.rigid.flow import (
    MOLECULE_FEATURES,
    UNIT_TOLERANCE,
    RigidBodyFlow,
    RotationCoupling,
    TranslationCoupling,
    rigid_body_flow,
    split_configuration,
)
from bgexp.flows.rigid.rotation import (
    ConvexRotation,
    ConvexRotationParams,
    RotationInversionError,
    convex_potential,
    n_rotation_params,
    solve_gradient_equation,
)
from bgexp.geometry import wrap_into_box

__all__ = ["MOLECULE_FEATURES", "UNIT_TOLERANCE", "ConvexRotation", "ConvexRotationParams", "MoleculeTransformer",
           "RigidBodyFlow", "RotationCoupling", "RotationInversionError", "TranslationCoupling", "_SelfAttentionLayer",
           "convex_potential", "n_rotation_params", "rigid_body_flow", "solve_gradient_equation", "split_configuration",
           "wrap_into_box"]
