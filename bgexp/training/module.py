"""The Boltzmann generator as a LightningModule: prior + flow + target + loss.

A Boltzmann generator (Noe et al., Science 2019) samples x = F(z), z ~ p_Z, with density
log q(x) = log p_Z(z) - log|det dF/dz|, and reweights to the Boltzmann density
mu(x) ~ exp(-u(x)) with log w = -u(x) - log q(x).
"""

from __future__ import annotations

import atexit
import logging
from contextlib import contextmanager
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch import Tensor

from bgexp.flows.base import Flow, out_dim
from bgexp.targets.base import Target
from bgexp.training.losses import JointLoss, force_matching_error

log = logging.getLogger(__name__)


_EXIT_HOOK_REGISTERED = False


def _destroy_process_group_at_exit() -> None:
    global _EXIT_HOOK_REGISTERED
    if _EXIT_HOOK_REGISTERED:
        return
    _EXIT_HOOK_REGISTERED = True

    def destroy() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(destroy)


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses in too many consecutive steps."""


class BoltzmannGenerator(pl.LightningModule):
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
    ):
        super().__init__()
        if getattr(prior, "dim", flow.dim) != flow.dim:
            raise ValueError(f"prior dim {prior.dim} does not match flow dim {flow.dim}")
        if out_dim(flow) != target.dim:
            raise ValueError(f"flow output dim {out_dim(flow)} does not match target dim {target.dim}")
        self.prior, self.flow, self.target, self.loss = prior, flow, target, loss
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.seed = int(seed)
        self.max_consecutive_nonfinite = int(max_consecutive_nonfinite)
        self.consecutive_nonfinite = 0
        self.n_nonfinite_steps = 0
        self.n_energy_evals_train = 0
        self.n_energy_evals_eval = 0
        self._counting = "train"
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
        if self._counting == "train":
            self.n_energy_evals_train += x.shape[0]
        else:
            self.n_energy_evals_eval += x.shape[0]
        return self.target.energy(x)

    @contextmanager
    def counting_evaluation(self):
        """Within this block, energy calls count as evaluation, not training."""
        previous, self._counting = self._counting, "eval"
        try:
            yield
        finally:
            self._counting = previous

    def make_generator(self, offset: int = 0) -> torch.Generator:
        """A generator on this module's device seeded with seed + rank + offset (one per DDP rank)."""
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed + self.global_rank + offset)
        return g

    # Lightning hooks -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """In a process of a multi-process run: destroy the process group when the process exits.
        Lightning leaves it alive in spawned workers, and a gloo group torn down during interpreter
        shutdown can abort the worker ("terminate called without an active exception")."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            _destroy_process_group_at_exit()

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
        if not torch.isfinite(loss) or all_energies_bad:
            self.consecutive_nonfinite += 1
            self.n_nonfinite_steps += 1
            self.log("train/nonfinite_steps", float(self.n_nonfinite_steps))
            log.warning("non-finite loss at step %d (%d in a row); step skipped",
                        self.global_step, self.consecutive_nonfinite)
            if self.consecutive_nonfinite >= self.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"the loss (or every sampled energy) was NaN or infinite in "
                    f"{self.consecutive_nonfinite} consecutive steps "
                    f"(last metrics: {metrics}). The flow or the target energy produces non-finite "
                    "values: lower optim.lr, increase loss.nll_warmup_steps, or check the target."
                )
            return None  # Lightning skips the optimiser step
        self.consecutive_nonfinite = 0
        # per-rank means are averaged across DDP ranks; the energy-evaluation counter is summed,
        # so the logged number is global (no-ops in a single process)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        for key, value in metrics.items():
            self.log(f"train/{key}", value, sync_dist=True)
        self.log("train/energy_evals", float(self.n_energy_evals_train), sync_dist=True, reduce_fx="sum")
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """A finite loss can still give NaN/inf gradients (0 * inf in a backward pass, a force
        overflow): drop such a step instead of writing NaN into every parameter."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads and not all(torch.isfinite(g).all() for g in grads):
            for p in self.parameters():
                p.grad = None
            self.n_nonfinite_steps += 1
            self.consecutive_nonfinite += 1
            log.warning("non-finite gradient at step %d; step skipped", self.global_step)
            if self.consecutive_nonfinite >= self.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"the gradients were NaN or infinite in {self.consecutive_nonfinite} consecutive steps: "
                    "lower optim.lr, clip gradients (trainer.gradient_clip_val) or check the flow's log-dets."
                )

    def validation_step(self, batch, batch_idx: int):
        nll = -self.log_prob(batch[0]).mean()
        self.log("val/nll", nll, prog_bar=True, sync_dist=True)
        if len(batch) > 1:  # (x, f): the score error against the reduced forces (needs autograd in x)
            error = force_matching_error(self, batch[0], batch[1])
            self.log("val/force_rmse", error["force_rmse"], sync_dist=True)
        return nll

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["bgexp_counters"] = {
            "n_energy_evals_train": self.n_energy_evals_train,
            "n_energy_evals_eval": self.n_energy_evals_eval,
            "n_nonfinite_steps": self.n_nonfinite_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for key, value in checkpoint.get("bgexp_counters", {}).items():
            setattr(self, key, int(value))
