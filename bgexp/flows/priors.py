"""Priors: simple densities the flow pushes forward.

Contract: `sample(n, generator=None) -> [n, dim]` and `log_prob(z) -> [n]`. Every prior can be
built from the final `bgexp.spaces.Space` of a flow recipe (`space=`) as well as from its width
and options (`dim=` etc.): the torus prior takes its circular mask from the space, the mean-free
prior its particles and spatial dimension.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bgexp.flows._space import as_space, dim_from
from bgexp.spaces import Space, SpaceError


class NormalPrior(nn.Module):
    """Isotropic Gaussian N(0, T * I) with an optional temperature T (variance scaled by T).

    log p(z) = -|z|^2 / (2T) - (d/2) log(2 pi T).  T = 1 is the standard normal; T != 1 samples
    the prior at another temperature (Boltzmann Generators, 2019, Fig. 3). Given `space`, the width
    is the space's; a space with circular features or rigid bodies is a SpaceError (TorusPrior).
    """

    def __init__(self, dim: int | None = None, temperature: float = 1.0, space: Space | None = None):
        super().__init__()
        if space is not None:
            space = as_space(space, "NormalPrior")
            if space.has_circular or space.is_rigid_bodies:
                raise SpaceError(f"NormalPrior is a density on R^dim and expects a space without circular features "
                                 f"or rigid bodies, got {space.describe()}")
        dim = dim_from("NormalPrior", dim, space)
        if space is not None and space.has_circular:
            raise SpaceError(f"NormalPrior is a density on R^d, the space has {sum(space.circular)} circular "
                             f"features (use TorusPrior, or squeeze them with the bounded_torsions layer)")
        if dim < 1:
            raise ValueError(f"prior dim must be >= 1, got {dim}")
        if temperature <= 0:
            raise ValueError(f"prior temperature must be positive, got {temperature}")
        self.dim = int(dim)
        self.temperature = float(temperature)
        self.register_buffer("_anchor", torch.zeros(()))  # carries device and dtype

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else self._anchor.device
        z = torch.randn(n, self.dim, generator=generator, device=device, dtype=self._anchor.dtype)
        return (z * math.sqrt(self.temperature)).to(self._anchor.device)

    def log_prob(self, z: Tensor) -> Tensor:
        if z.shape[-1] != self.dim:
            raise ValueError(f"prior expects [..., {self.dim}], got {tuple(z.shape)}")
        t = self.temperature
        return -0.5 * (z**2).sum(-1) / t - 0.5 * self.dim * math.log(2 * math.pi * t)


class TorusPrior(nn.Module):
    """Uniform on the circle for angle features, standard normal for the others.

    For the d_c features marked in `circular` (default: all, the torus T^dim) z_i ~ U[-pi, pi);
    for the others z_i ~ N(0, 1):  log p(z) = -d_c log(2 pi) - |z_lin|^2 / 2 - (d_l / 2) log(2 pi).
    The uniform density ignores the value of an angle (it is periodic), so angles outside
    [-pi, pi) are accepted as their wrapped value. Given `space`, the width and the circular mask
    are the space's (a space without circular features gives the standard normal).
    """

    def __init__(self, dim: int | None = None, circular: Tensor | list[bool] | None = None,
                 space: Space | None = None):
        super().__init__()
        space = None if space is None else as_space(space, "TorusPrior")
        if space is not None and space.is_rigid_bodies:
            raise SpaceError(f"TorusPrior expects linear and circular features, got {space.describe()}")
        dim = dim_from("TorusPrior", dim, space)
        if space is not None:  # the space's circular features (a space without any: a normal prior)
            mask = space.circular_mask()
            if circular is not None and not torch.equal(torch.as_tensor(circular, dtype=torch.bool), mask):
                raise SpaceError(f"TorusPrior: `circular` does not match the space's circular features "
                                 f"({space.describe()})")
            circular = mask
        if dim < 1:
            raise ValueError(f"prior dim must be >= 1, got {dim}")
        self.dim = int(dim)
        mask = torch.ones(self.dim, dtype=torch.bool) if circular is None else torch.as_tensor(circular, dtype=torch.bool)
        if mask.shape != (self.dim,):
            raise ValueError(f"circular must be a bool mask of length dim={self.dim}, got shape {tuple(mask.shape)}")
        self.register_buffer("circular", mask.clone())
        self.register_buffer("_anchor", torch.zeros(()))
        self.n_circular = int(mask.sum())

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else self._anchor.device
        dtype = self._anchor.dtype
        uniform = (torch.rand(n, self.dim, generator=generator, device=device, dtype=dtype) * 2 - 1) * math.pi
        normal = torch.randn(n, self.dim, generator=generator, device=device, dtype=dtype)
        return torch.where(self.circular.to(device), uniform, normal).to(self._anchor.device)

    def log_prob(self, z: Tensor) -> Tensor:
        if z.shape[-1] != self.dim:
            raise ValueError(f"prior expects [..., {self.dim}], got {tuple(z.shape)}")
        linear = torch.where(self.circular, torch.zeros_like(z), z)
        n_linear = self.dim - self.n_circular
        return (-0.5 * (linear**2).sum(-1) - 0.5 * n_linear * math.log(2 * math.pi)
                - self.n_circular * math.log(2 * math.pi))


class MeanFreeNormalPrior(nn.Module):
    """Standard normal on the mean-free subspace of n particles in d dimensions (Köhler, Klein,
    Noé, "Equivariant Flows", ICML 2020): z in R^{n d} with sum_i z_i = 0 (centre of mass at the
    origin), a linear subspace of dimension (n - 1) d.

    Sampling projects an isotropic normal: z = x - mean_i(x_i), which is a standard normal on the
    subspace (the projector is the identity there). The density with respect to the Lebesgue
    measure of the subspace is log p(z) = -|z|^2 / 2 - ((n - 1) d / 2) log(2 pi); inputs are
    projected first, so the centre of mass of a configuration does not matter (translation
    invariance). `dim` is n d, the width of the flow's input. Given `space` (a particle space), n and
    d are the space's.
    """

    def __init__(self, n_particles: int | None = None, spatial_dim: int | None = None, dim: int | None = None,
                 space: Space | None = None):
        super().__init__()
        if space is not None:
            space = as_space(space, "MeanFreeNormalPrior")
            if not space.is_particles:
                raise SpaceError(f"MeanFreeNormalPrior expects a particle space (particles x spatial_dim), got "
                                 f"{space.describe()}")
            for name, given, actual in (("n_particles", n_particles, space.particles),
                                        ("spatial_dim", spatial_dim, space.spatial_dim), ("dim", dim, space.dim)):
                if given is not None and int(given) != actual:
                    raise SpaceError(f"MeanFreeNormalPrior expects {name}={given}, but the space has "
                                     f"{name}={actual} ({space.describe()})")
            n_particles, spatial_dim, dim = space.particles, space.spatial_dim, space.dim
        spatial_dim = 3 if spatial_dim is None else spatial_dim
        if n_particles is None and dim is not None and spatial_dim >= 1 and int(dim) % int(spatial_dim) == 0:
            n_particles = int(dim) // int(spatial_dim)  # from the flattened width n d
        if n_particles is None or n_particles < 2 or spatial_dim < 1:
            raise ValueError(f"need n_particles >= 2 (or dim = n x spatial_dim) and spatial_dim >= 1, got "
                             f"n_particles={n_particles}, spatial_dim={spatial_dim}, dim={dim}")
        self.n_particles, self.spatial_dim = int(n_particles), int(spatial_dim)
        self.dim = self.n_particles * self.spatial_dim
        if dim is not None and int(dim) != self.dim:
            raise ValueError(f"dim={dim} does not match {n_particles} particles x {spatial_dim} dimensions = {self.dim}")
        self.subspace_dim = (self.n_particles - 1) * self.spatial_dim
        self.register_buffer("_anchor", torch.zeros(()))

    def remove_mean(self, z: Tensor) -> Tensor:
        xyz = z.reshape(*z.shape[:-1], self.n_particles, self.spatial_dim)
        return (xyz - xyz.mean(-2, keepdim=True)).reshape(z.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else self._anchor.device
        z = torch.randn(n, self.dim, generator=generator, device=device, dtype=self._anchor.dtype)
        return self.remove_mean(z).to(self._anchor.device)

    def log_prob(self, z: Tensor) -> Tensor:
        if z.shape[-1] != self.dim:
            raise ValueError(f"prior expects [..., {self.dim}] ({self.n_particles} particles x "
                             f"{self.spatial_dim}), got {tuple(z.shape)}")
        z = self.remove_mean(z)
        return -0.5 * (z**2).sum(-1) - 0.5 * self.subspace_dim * math.log(2 * math.pi)
