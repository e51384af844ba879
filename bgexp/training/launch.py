"""Which parallel launches work with Hydra, and a check that refuses the ones that do not.

Lightning starts the processes of a data-parallel run in one of three ways:
- "ddp" (and "ddp_find_unused_parameters_*", and "auto" with several devices, and the FSDP and
  DeepSpeed strategies): the script is run again, once per extra process, with the same command
  line. Under a Hydra multirun (`-m`) every such child runs the whole sweep again.
- "ddp_spawn", "ddp_fork", "ddp_notebook" (and their `_find_unused_parameters_*` variants): the
  processes are started by torch.multiprocessing from inside the running job; fine in a multirun.
- a cluster environment that starts the processes itself (SLURM with one task per GPU, torchrun):
  Lightning detects it and launches nothing; fine in a multirun (e.g. `launcher=slurm`).

`check_parallel_launch` refuses the first kind in a multirun, before anything is built.
"""

from __future__ import annotations

from typing import Any

# strategies whose launcher runs the script again (Lightning's subprocess-script launcher)
RELAUNCHING_PREFIXES = ("ddp", "fsdp", "deepspeed")
# DDP variants that start their processes with torch.multiprocessing instead
IN_PROCESS_PREFIXES = ("ddp_spawn", "ddp_fork", "ddp_notebook")



class UnsupportedLaunchError(ValueError):
    """A combination of launcher and trainer that cannot work (it stops a whole sweep, not one member)."""

def is_multirun() -> bool:
    """True inside a Hydra multirun job (`-m`); False in a single run or outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _external_launch() -> bool:
    """The processes are started by the cluster (SLURM tasks, torchrun), not by Lightning."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return SLURMEnvironment.detect() or TorchElasticEnvironment.detect()


def _count_devices(devices: Any, accelerator: str) -> int:
    """How many processes per node `trainer.devices` asks for (a guess for "auto" and -1)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:  # "0,1": a list of device indices
            return len([d for d in text.split(",") if d.strip()])
        if text.lstrip("-").isdigit():
            devices = int(text)
        else:  # "auto"
            devices = -1
    if devices is None:
        devices = -1
    devices = int(devices)
    if devices != -1:
        return devices
    # "auto" / -1: every device of the accelerator
    if accelerator == "cpu":
        return 1  # Lightning's CPU "auto" is one process
    try:
        import torch

        return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    except Exception:  # pragma: no cover
        return 1


def _strategy_name(strategy: Any) -> str:
    """The registry name of `trainer.strategy`: a string, or a `_target_` node of a DDPStrategy
    (whose `start_method` decides how it launches)."""
    if strategy is None:
        return "auto"
    if isinstance(strategy, str):
        return strategy.strip().lower()
    if isinstance(strategy, dict):
        target = str(strategy.get("_target_", "")).rsplit(".", 1)[-1]
        if target == "DDPStrategy":
            method = str(strategy.get("start_method", "popen"))
            return "ddp" if method == "popen" else f"ddp_{method}"
        if target.startswith("FSDP"):
            return "fsdp"
        if target.startswith("DeepSpeed"):
            return "deepspeed"
        return target.lower() or "auto"
    return type(strategy).__name__.lower()


def relaunches_script(trainer_cfg: dict[str, Any]) -> bool:
    """Whether Lightning would start the extra processes of this trainer config by running the
    script again (the plain DDP launch)."""
    accelerator = str(trainer_cfg.get("accelerator", "auto") or "auto").lower()
    n_devices = _count_devices(trainer_cfg.get("devices", "auto"), accelerator)
    n_nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    if n_devices * n_nodes <= 1:
        return False
    strategy = _strategy_name(trainer_cfg.get("strategy", "auto"))
    if strategy == "auto":  # Lightning picks plain "ddp" for several devices (outside notebooks)
        return True
    if strategy.startswith(IN_PROCESS_PREFIXES):
        return False
    return strategy.startswith(RELAUNCHING_PREFIXES)


def check_parallel_launch(trainer_cfg: dict[str, Any], multirun: bool) -> None:
    """Refuse a Hydra multirun with a strategy that re-launches the script (plain DDP on several
    devices or nodes): every re-launched child would run the whole sweep again.

    Raises ValueError saying what to use instead. Single runs, single-device runs, spawn/fork
    strategies and cluster-launched processes (SLURM tasks, torchrun) pass."""
    if not multirun or not relaunches_script(trainer_cfg) or _external_launch():
        return
    strategy = trainer_cfg.get("strategy", "auto")
    raise UnsupportedLaunchError(
        f"trainer.strategy={strategy!r} with trainer.devices={trainer_cfg.get('devices')!r} "
        f"(num_nodes={trainer_cfg.get('num_nodes', 1)!r}) cannot run in a Hydra multirun (-m): plain DDP "
        "starts its extra processes by running the script again with the same command line, and "
        "each of those children would run the whole sweep again. Use trainer=ddp_spawn "
        "(strategy=ddp_spawn, processes started from inside the job) for a multirun on one machine, "
        "or the SLURM launcher (launcher=slurm, one task per GPU), where Lightning's SLURM "
        "environment detection starts the processes instead of re-launching the script; "
        "or run each configuration as a single run without -m."
    )
