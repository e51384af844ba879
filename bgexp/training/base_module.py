"""What every task's LightningModule shares: energy-evaluation counters, non-finite guards,
optimiser and scheduler set-up, per-rank generators and the DDP clean-up.

A task's module (the Boltzmann generator, the targeted-FEP map, later ones) subclasses
`FlowModule` and implements its own `training_step` / `validation_step`; it calls `count_energy`
for every configuration whose energy it evaluates and `skip_nonfinite` with its loss. The
counters are saved in checkpoints (`bgexp_counters`), so a resumed run keeps counting.
"""

from __future__ import annotations

import atexit
import logging
from contextlib import contextmanager
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch import Tensor

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
    """Training produced non-finite losses (or gradients) in too many consecutive steps."""


class FlowModule(pl.LightningModule):
    """Base of the task modules (module docstring). `optimizer` and `scheduler` are factories:
    `optimizer(params=...)`, `scheduler(optimizer=...)` (Hydra partials)."""

    # checkpointed counters (`bgexp_counters`)
    COUNTERS = ("n_energy_evals_train", "n_energy_evals_eval", "n_nonfinite_steps")

    def __init__(self, optimizer: Callable[..., torch.optim.Optimizer], scheduler: Callable[..., Any] | None = None,
                 seed: int = 0, max_consecutive_nonfinite: int = 50):
        super().__init__()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.seed = int(seed)
        self.max_consecutive_nonfinite = int(max_consecutive_nonfinite)
        self.consecutive_nonfinite = 0
        self.n_nonfinite_steps = 0
        self.n_energy_evals_train = 0
        self.n_energy_evals_eval = 0
        self._counting = "train"

    # energy-evaluation counters --------------------------------------------------------------
    def count_energy(self, n: int, phase: str | None = None) -> None:
        """Count `n` energy evaluations as `phase` ("train" or "eval"; default: the current one,
        see `counting_evaluation`)."""
        if (phase or self._counting) == "train":
            self.n_energy_evals_train += int(n)
        else:
            self.n_energy_evals_eval += int(n)

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

    # non-finite guards -----------------------------------------------------------------------
    def skip_nonfinite(self, loss: Tensor, what: str = "loss", bad: bool = False, details: Any = None) -> bool:
        """True when this step must be skipped: the loss is NaN/inf (or `bad`). Skips are counted and
        logged (`train/nonfinite_steps`); under DDP a step is skipped on every rank
        when it is non-finite on any (the decision is reduced over ranks, so the synced logs match); after `max_consecutive_nonfinite` in a
        row the run stops with `NonFiniteLossError`. A finite step resets the run of skips."""
        bad = bool(bad) or not bool(torch.isfinite(loss))
        if self._trainer is not None:  # every rank skips together (else DDP waits forever on the others)
            bad = bool(self.trainer.strategy.reduce_boolean_decision(bad, all=False))
        if not bad:
            self.consecutive_nonfinite = 0
            return False
        self._count_nonfinite(f"non-finite {what}")
        self.log("train/nonfinite_steps", float(self.n_nonfinite_steps), sync_dist=True, reduce_fx="max")
        if self.consecutive_nonfinite >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"the {what} was NaN or infinite in {self.consecutive_nonfinite} consecutive steps"
                + (f" (last metrics: {details})" if details is not None else "")
                + ". The flow or the target energy produces non-finite values: lower optim.lr, increase "
                "loss.nll_warmup_steps, or check the target.")
        return True

    def _count_nonfinite(self, what: str) -> None:
        self.consecutive_nonfinite += 1
        self.n_nonfinite_steps += 1
        log.warning("%s at step %d (%d in a row); step skipped", what, self.global_step, self.consecutive_nonfinite)

    def on_before_optimizer_step(self, optimizer) -> None:
        """A finite loss can still give NaN/inf gradients (0 * inf in a backward pass, a force
        overflow): drop such a step instead of writing NaN into every parameter."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads and not all(torch.isfinite(g).all() for g in grads):
            for p in self.parameters():
                p.grad = None
            self._count_nonfinite("non-finite gradient")
            if self.consecutive_nonfinite >= self.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"the gradients were NaN or infinite in {self.consecutive_nonfinite} consecutive steps: "
                    "lower optim.lr, clip gradients (trainer.gradient_clip_val) or check the flow's log-dets.")

    # Lightning hooks -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """In a process of a multi-process run: destroy the process group when the process exits.
        Lightning leaves it alive in spawned workers, and a gloo group torn down during interpreter
        shutdown can abort the worker ("terminate called without an active exception")."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            _destroy_process_group_at_exit()

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["bgexp_counters"] = {key: int(getattr(self, key)) for key in self.COUNTERS}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for key, value in checkpoint.get("bgexp_counters", {}).items():
            if key in self.COUNTERS:
                setattr(self, key, int(value))


__all__ = ["FlowModule", "NonFiniteLossError"]
