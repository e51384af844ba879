"""The Boltzmann generator as a LightningModule: prior + flow + target + loss.

A Boltzmann generator (Noe et al., Science 2019) samples x = F(z), z ~ p_Z, with density
log q(x) = log p_Z(z) - log|det dF/dz|, and reweights to the Boltzmann density
mu(x) ~ exp(-u(x)) with log w = -u(x) - log q(x).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from bgexp.flows.base import Flow, out_dim
from bgexp.spaces import Space
from bgexp.targets.base import Target
from bgexp.training.base_module import FlowModule, NonFiniteLossError
from bgexp.evaluation.metrics import force_matching_error
from bgexp.training.losses import JointLoss


class BoltzmannGenerator(FlowModule):
    def __init__(
        self,
        prior: torch.nn.Module,
        flow: Flow,
        target: Target,
        loss: JointLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        seed: int = 0,
        max_consecutive_nonfinite: int = 50,
        latent_space: Space | None = None,
        representation: Flow | None = None,
    ):
        super().__init__(optimizer, scheduler, seed=seed, max_consecutive_nonfinite=max_consecutive_nonfinite)
        if getattr(prior, "dim", flow.dim) != flow.dim:
            raise ValueError(f"prior dim {prior.dim} does not match flow dim {flow.dim}")
        if out_dim(flow) != target.dim:
            raise ValueError(f"flow output dim {out_dim(flow)} does not match target dim {target.dim}")
        self.prior, self.flow, self.target, self.loss = prior, flow, target, loss
        # where the prior lives (the space after the flow recipe's representation layers), and the
        # fixed representation alone (not a submodule: its buffers are the flow's own)
        self.latent_space = latent_space if latent_space is not None else Space(flow.dim)
        self.__dict__["representation"] = representation
        self.latent_generator: torch.Generator | None = None

    # density and sampling --------------------------------------------------------------------
    def log_prob(self, x: Tensor) -> Tensor:
        """log q(x) = log p_Z(F^-1(x)) + log|det dF^-1/dx|."""
        z, logdet = self.flow.inverse(x)
        return self.prior.log_prob(z) + logdet

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """x = F(z) and log q(x) = log p_Z(z) - log|det dF/dz|."""
        z = self.prior.sample(n, generator=generator)
        x, logdet = self.flow(z)
        return x, self.prior.log_prob(z) - logdet

    def energy(self, x: Tensor) -> Tensor:
        """The target's reduced energy; every call is counted (training or evaluation)."""
        self.count_energy(x.shape[0])
        return self.target.energy(x)

    # Lightning hooks -------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.latent_generator = self.make_generator()

    def training_step(self, batch, batch_idx: int):
        x = batch[0] if self.loss.needs_data else None
        forces = None
        if getattr(self.loss, "force_weight", 0.0) > 0:
            if len(batch) < 2:
                raise ValueError(
                    f"the loss has force_weight={self.loss.force_weight} (force matching) but the training "
                    "batches hold no forces: set data.forces=true (+data.forces=true on the command line "
                    "when the data config does not list it) so the data module provides reduced forces"
                )
            forces = batch[1]
        loss, metrics = self.loss(self, x, step=self.global_step, forces=forces)
        all_energies_bad = ("kl/nonfinite_energies" in metrics
                            and metrics["kl/nonfinite_energies"] >= self.loss.kl_batch_size)
        if self.skip_nonfinite(loss, what="loss (or every sampled energy)", bad=all_energies_bad, details=metrics):
            return None  # Lightning skips the optimiser step
        # per-rank means are averaged across DDP ranks; the energy-evaluation counter is summed,
        # so the logged number is global (no-ops in a single process)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        for key, value in metrics.items():
            self.log(f"train/{key}", value, sync_dist=True)
        self.log("train/energy_evals", float(self.n_energy_evals_train), sync_dist=True, reduce_fx="sum")
        return loss

    def validation_step(self, batch, batch_idx: int):
        nll = -self.log_prob(batch[0]).mean()
        self.log("val/nll", nll, prog_bar=True, sync_dist=True)
        if len(batch) > 1:  # (x, f): the score error against the reduced forces (needs autograd in x)
            error = force_matching_error(self, batch[0], batch[1])
            self.log("val/force_rmse", error["force_rmse"], sync_dist=True)
        return nll


__all__ = ["BoltzmannGenerator", "NonFiniteLossError"]
