"""The one coupling layer of bgexp (Dinh et al., "Density estimation using Real NVP", ICLR 2017;
circular features as in Rezende et al., "Normalizing flows on tori and spheres", ICML 2020).

A coupling splits x into kept features x_a (`mask` True) and transformed features x_b, and maps
every transformed feature by an elementwise bijection whose parameters a conditioner computes from
the kept ones:

    y_a = x_a,    y_b,i = tau_i(x_b,i; theta_i(x_a)),    log|det dy/dx| = sum_i log|tau_i'(x_b,i)|,

(the Jacobian is triangular with identity blocks for x_a), and the inverse applies tau_i^{-1}
with the same theta, which the kept features determine on either side. Linear transformed
features go through `transform`, angle features (`circular`, or a Space's circular mask) through
`circular_transform`, a diffeomorphism of the circle. The conditioner sees the kept linear
features as they are and the kept angles as (cos, sin) (`bgexp.flows.nn.circular_embedding`), so
the coupling is 2 pi-periodic in them. The elementwise transforms follow the contract of
bgexp/flows/transforms.py; the presets (RealNVP, NeuralSpline, SmoothTorusFlow) are stacks of
this class with alternating masks.

Conditioner output layouts (fixed by the checkpoints of the families):
- "blocks": [linear block | circular block], each block [n, P] feature-major, or [P, n] when its
  transform is `param_major` (RealNVP: shifts, then log-scales);
- "rows": one block [n_changed, P] over all transformed features in index order, P the larger of
  the two transforms' n_params; each transform reads the first n_params of its rows (NeuralSpline).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from bgexp.flows._space import as_space
from bgexp.flows.base import Flow
from bgexp.flows.nn import circular_embedding, embedding_width
from bgexp.flows.transforms import ElementwiseTransform
from bgexp.spaces import Space, SpaceError

LAYOUTS = ("blocks", "rows")
# buffers of the per-family coupling classes before the one coupling; derived from mask and circular
_LEGACY_INDEX_BUFFERS = ("kept", "changed", "kept_linear", "kept_circular", "changed_linear", "changed_circular",
                         "rows_linear", "rows_circular")


def _bool_mask(mask, dim: int | None, name: str) -> Tensor:
    t = torch.as_tensor(mask, dtype=torch.bool)
    if t.dim() != 1 or (dim is not None and t.shape != (dim,)):
        raise ValueError(f"{name} must be a bool mask of length dim={dim}, got shape {tuple(t.shape)}")
    return t


class Coupling(Flow):
    """One coupling layer (module docstring); `mask[i]` is True where feature i conditions (is kept).

    conditioner: a builder `(n_in, n_out) -> nn.Module` (e.g. a partial of `bgexp.flows.nn.mlp`)
    or a module with those widths; its output must start at the raw = 0 parameters for the
    coupling to start at the transforms' raw = 0 map. The module is stored as `net`.
    """

    def __init__(
        self,
        mask: Tensor | Sequence[bool],
        conditioner: Callable[[int, int], nn.Module] | nn.Module,
        transform: ElementwiseTransform | None,
        circular: Tensor | Sequence[bool] | Space | None = None,
        circular_transform: ElementwiseTransform | None = None,
        layout: str = "blocks",
    ):
        super().__init__()
        mask = _bool_mask(mask, None, "coupling mask")
        if mask.all() or not mask.any():
            raise ValueError("coupling mask must be 1-D with both kept and transformed entries")
        self.dim = int(mask.numel())
        if isinstance(circular, Space):
            if circular.dim != self.dim:
                raise ValueError(f"the space has dim {circular.dim}, the coupling mask {self.dim}")
            circular = circular.circular_mask()
        circular = torch.zeros(self.dim, dtype=torch.bool) if circular is None else _bool_mask(circular, self.dim,
                                                                                              "circular")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        for name, t, want in (("transform", transform, False), ("circular_transform", circular_transform, True)):
            if t is not None and bool(t.circular) != want:
                raise ValueError(f"{name} must be {'a circular' if want else 'a non-circular'} elementwise transform, "
                                 f"got {type(t).__name__}")
        changed = ~mask
        if (changed & ~circular).any() and transform is None:
            raise ValueError("this coupling transforms linear features but has no `transform`")
        if (changed & circular).any() and circular_transform is None:
            raise ValueError("this coupling transforms circular features but has no `circular_transform` "
                             "(a map of the circle onto itself)")
        self.transform, self.circular_transform, self.layout = transform, circular_transform, layout
        self.register_buffer("mask", mask.clone())
        self.register_buffer("circular", circular.clone())
        self._index()
        n_in = embedding_width(len(self.kept_linear), len(self.kept_circular))
        if layout == "rows":
            self.row_width = max(t.n_params for t in (transform, circular_transform) if t is not None)
            n_out = self.n_changed * self.row_width
        else:
            n_out = sum(len(idx) * t.n_params for idx, t in ((self.changed_linear, transform),
                                                               (self.changed_circular, circular_transform))
                        if t is not None)
        self.n_in, self.n_out = n_in, n_out
        self.net = conditioner if isinstance(conditioner, nn.Module) else conditioner(n_in, n_out)

    def _index(self) -> None:
        """The index buffers derived from `mask` and `circular` (not saved: checkpoints hold the masks)."""
        mask, circular = self.mask, self.circular
        changed = torch.nonzero(~mask).flatten()
        changed_circular = circular[changed]
        for name, value in (("kept_linear", torch.nonzero(mask & ~circular).flatten()),
                            ("kept_circular", torch.nonzero(mask & circular).flatten()),
                            ("changed_linear", changed[~changed_circular]),
                            ("changed_circular", changed[changed_circular]),
                            # positions of those features among the transformed ones (the "rows" layout)
                            ("rows_linear", torch.nonzero(~changed_circular).flatten()),
                            ("rows_circular", torch.nonzero(changed_circular).flatten())):
            self.register_buffer(name, value, persistent=False)
        self.n_changed = int(changed.numel())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # checkpoints of AffineCoupling / SplineCoupling / SmoothCoupling saved their index buffers;
        # AffineCoupling's only as `kept` and `changed` (no circular features)
        if prefix + "mask" not in state_dict and prefix + "kept" in state_dict and prefix + "changed" in state_dict:
            kept, changed = state_dict[prefix + "kept"], state_dict[prefix + "changed"]
            mask = torch.zeros(kept.numel() + changed.numel(), dtype=torch.bool, device=kept.device)
            mask[kept] = True
            state_dict[prefix + "mask"] = mask
            state_dict.setdefault(prefix + "circular", torch.zeros_like(mask))
        for name in _LEGACY_INDEX_BUFFERS:
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._index()

    def conditioner_input(self, x: Tensor) -> Tensor:
        return circular_embedding(x, self.kept_linear, self.kept_circular)

    def parameters_of(self, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The conditioner's parameters for the linear [B, n_lin, P] and the circular [B, n_circ, P']
        transformed features (None where there are none)."""
        out = self.net(self.conditioner_input(x))
        b = x.shape[0]
        if self.layout == "rows":
            rows = out.reshape(b, self.n_changed, self.row_width)
            lin = rows[:, self.rows_linear] if len(self.changed_linear) else None
            circ = rows[:, self.rows_circular] if len(self.changed_circular) else None
            return lin, circ
        blocks: list[Tensor | None] = []
        start = 0
        for idx, t in ((self.changed_linear, self.transform), (self.changed_circular, self.circular_transform)):
            n = len(idx)
            if n == 0:
                blocks.append(None)
                continue
            block = out[:, start:start + n * t.n_params]
            start += n * t.n_params
            blocks.append(block.reshape(b, t.n_params, n).transpose(1, 2) if t.param_major
                          else block.reshape(b, n, t.n_params))
        return blocks[0], blocks[1]

    def _transform(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        lin, circ = self.parameters_of(x)
        y = x.clone()
        logdet = x.new_zeros(x.shape[0])
        for idx, t, params in ((self.changed_linear, self.transform, lin),
                               (self.changed_circular, self.circular_transform, circ)):
            if params is None:
                continue
            out, ld = (t.inverse if inverse else t.forward)(x[:, idx], params)
            y = y.index_copy(1, idx, out.to(y))
            logdet = logdet + ld.sum(-1)
        return y, logdet

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(z, "z")
        return self._transform(z, inverse=False)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(x, "x")
        return self._transform(x, inverse=True)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, kept={int(self.mask.sum())}, circular={int(self.circular.sum())}, "
                f"layout={self.layout}")


def dim_and_circular(family: str, dim, circular, space: Space | None, default_circular: bool):
    """(dim, circular mask) from `dim` and `circular`, or from a space (SpaceError where the
    family cannot act on it: rigid bodies, or a mismatching dim/circular)."""
    if space is None:
        if dim is None:
            raise ValueError(f"{family} needs `dim` or `space`")
        dim = int(dim)
        if circular is None:
            return dim, torch.full((dim,), bool(default_circular))
        circular = torch.as_tensor(circular, dtype=torch.bool)
        if circular.shape != (dim,):
            raise ValueError(f"circular must be a bool mask of length dim={dim}, got shape {tuple(circular.shape)}")
        return dim, circular
    space = as_space(space, family)
    if space.is_rigid_bodies:
        raise SpaceError(f"{family} expects a space of linear and circular features, got rigid bodies "
                         f"({space.describe()}); use bgexp.flows.rigid.rigid_body_flow")
    if dim is not None and int(dim) != space.dim:
        raise SpaceError(f"{family}: dim={dim} does not match the space ({space.describe()})")
    mask = space.circular_mask()
    if circular is not None and not torch.equal(torch.as_tensor(circular, dtype=torch.bool), mask):
        raise SpaceError(f"{family}: `circular` does not match the space's circular features ({space.describe()})")
    return space.dim, mask


__all__ = ["Coupling", "LAYOUTS", "dim_and_circular"]
