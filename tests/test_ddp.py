"""Data parallel training on CPU (2 processes, gloo, ddp_spawn) and the multirun launch check.

The DDP tests train the real BoltzmannGenerator built from the Hydra config (tiny dimer) with two
spawned processes; a probe callback (top level, so that it pickles into the workers) writes what
each rank saw into files that the test reads back.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from bgexp.train import CONFIG_DIR
from bgexp.training.launch import check_parallel_launch, is_multirun, relaunches_script
from bgexp.training.assemble import build_datamodule, build_model, build_target

from helpers import TINY, run_cli

N_LATENT = 8


class RankProbe(pl.Callback):
    """Writes, per rank, the latent samples its generator gives first (gathered on rank zero),
    its last local (unsynchronised) loss and counter, the synchronised logged metrics and a
    parameter checksum."""

    def __init__(self, out_dir: str):
        self.out_dir = str(out_dir)
        self.local_loss: float | None = None
        self.local_evals = 0

    def on_train_start(self, trainer, pl_module) -> None:
        # draw from a copy of the rank's latent generator, so training sees the same stream
        g = torch.Generator(device=pl_module.device)
        g.set_state(pl_module.latent_generator.get_state())
        z = pl_module.prior.sample(N_LATENT, generator=g)
        gathered = pl_module.all_gather(z)  # [world_size, N_LATENT, dim]
        if trainer.is_global_zero:
            torch.save({"z": gathered.cpu(), "world_size": trainer.world_size},
                       Path(self.out_dir) / "latents.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.local_loss = float(outputs["loss"])
        self.local_evals = int(pl_module.n_energy_evals_train)

    def on_train_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        checksum = float(sum(p.detach().double().sum() for p in pl_module.parameters()))
        row = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "local_loss": self.local_loss,
            "local_energy_evals": self.local_evals,
            "logged_loss": float(metrics["train/loss"]),
            "logged_energy_evals": float(metrics["train/energy_evals"]),
            "logged_val_nll": float(metrics["val/nll"]),
            "checksum": checksum,
        }
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(row))


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def tiny_overrides(tmp: Path) -> list[str]:
    return [*TINY, f"paths.output_dir={tmp}", "logger=none", "trainer=ddp_spawn",
            "loss.nll_warmup_steps=1", "loss.kl_ramp_steps=2", "loss.kl_batch_size=32",
            "trainer.max_epochs=2", "+trainer.limit_train_batches=2", "+trainer.num_sanity_val_steps=0",
            "+trainer.enable_checkpointing=false", "+trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory) -> dict:
    """One 2-process ddp_spawn fit of the tiny dimer model (2 epochs x 2 steps), probed per rank."""
    tmp = tmp_path_factory.mktemp("ddp_fit")
    cfg = compose_cfg(tiny_overrides(tmp))
    target = build_target(cfg)
    datamodule = build_datamodule(cfg, target)
    datamodule.setup()
    model = build_model(cfg, target, data=datamodule.x_train)
    before = [p.detach().clone() for p in model.parameters()]
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[RankProbe(str(tmp))],
                                      default_root_dir=str(tmp))
    assert trainer.world_size == 2 and type(trainer.strategy).__name__ == "DDPStrategy"
    trainer.fit(model, datamodule=datamodule)
    rows = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    return {"tmp": tmp, "cfg": cfg, "model": model, "before": before, "rows": rows,
            "latents": torch.load(tmp / "latents.pt"), "trainer": trainer}


@pytest.mark.slow
def test_ddp_spawn_trains_the_dimer_on_two_processes(ddp_fit):
    rows = ddp_fit["rows"]
    assert [r["rank"] for r in rows] == [0, 1]
    assert all(r["world_size"] == 2 and r["global_step"] == 4 for r in rows)
    # DDP keeps the replicas identical: the same parameters on both ranks after training
    assert rows[0]["checksum"] == pytest.approx(rows[1]["checksum"], rel=1e-12)
    # the trained weights came back into the main process and differ from the initial ones
    model = ddp_fit["model"]
    changed = any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), ddp_fit["before"]))
    assert changed
    assert all(torch.isfinite(p).all() for p in model.parameters())
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    assert checksum == pytest.approx(rows[0]["checksum"], rel=1e-12)


@pytest.mark.slow
def test_each_rank_draws_its_own_latent_samples(ddp_fit):
    latents, model, seed = ddp_fit["latents"], ddp_fit["model"], int(ddp_fit["cfg"].seed)
    z = latents["z"]
    assert latents["world_size"] == 2 and z.shape == (2, N_LATENT, model.prior.dim)
    assert not torch.allclose(z[0], z[1])
    for rank in range(2):
        expected = model.prior.sample(N_LATENT, generator=torch.Generator().manual_seed(seed + rank))
        torch.testing.assert_close(z[rank], expected, rtol=0, atol=0)


@pytest.mark.slow
def test_logged_metrics_are_synchronised_across_ranks(ddp_fit):
    rows = ddp_fit["rows"]
    # the per-rank losses of the last step differ (own data shard, own latent samples) ...
    assert rows[0]["local_loss"] != rows[1]["local_loss"]
    # ... the logged loss is their mean, the same on both ranks
    mean = (rows[0]["local_loss"] + rows[1]["local_loss"]) / 2
    for row in rows:
        assert row["logged_loss"] == pytest.approx(mean, rel=1e-5)
        assert row["logged_val_nll"] == pytest.approx(rows[0]["logged_val_nll"], rel=1e-6)
    # the energy-evaluation counter is summed over ranks: the global number
    kl_batch = int(ddp_fit["cfg"].loss.kl_batch_size)
    assert rows[0]["local_energy_evals"] > 0 and rows[0]["local_energy_evals"] % kl_batch == 0
    total = rows[0]["local_energy_evals"] + rows[1]["local_energy_evals"]
    for row in rows:
        assert row["logged_energy_evals"] == total
    # the main process gets rank zero's (synchronised) metrics back
    assert float(ddp_fit["trainer"].callback_metrics["train/energy_evals"]) == total


@pytest.mark.slow
def test_cli_trains_with_trainer_ddp_spawn(ddp_fit, tmp_path):
    # reuse the MC data cached by the in-process fit (same data settings)
    cache = ddp_fit["tmp"] / "data"
    proc = run_cli("bgexp-train", [*TINY, "trainer=ddp_spawn", "trainer.max_epochs=2", "logger=csv",
                                   f"data.cache_dir={cache}"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_dir = next((tmp_path / "outputs" / "runs" / "dimer_realnvp").iterdir())
    results = json.loads((run_dir / "results.json").read_text())
    assert results["n_samples"] == 500 and 0.0 < results["ess"] <= 1.0
    # the workers' counters reach results.json: steps from the checkpoint, energy evaluations of both ranks
    import torch

    steps = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert results["training"]["steps"] == steps > 0
    assert results["n_energy_evals"]["training"] > 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "csv" / "metrics.csv").is_file()
    assert "results.json" in proc.stdout


@pytest.mark.slow
def test_cli_multirun_refuses_plain_ddp(tmp_path):
    proc = run_cli("bgexp-train", ["-m", "trainer=ddp", "trainer.accelerator=cpu", "logger=none", "seed=0"],
                   tmp_path, timeout=120)
    # the sweep stops at its first member with the reason, before any process is launched
    assert proc.returncode != 0
    assert "UnsupportedLaunchError" in proc.stderr and "trainer=ddp_spawn" in proc.stderr
    assert "launcher=slurm" in proc.stderr
    assert not list((tmp_path / "outputs").rglob("results.json"))


# the launch check ------------------------------------------------------------------------------

DDP_2 = {"accelerator": "gpu", "devices": 2, "strategy": "ddp"}


@pytest.fixture
def no_cluster(monkeypatch):
    for name in ("SLURM_NTASKS", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_multirun_with_plain_ddp_is_refused(no_cluster):
    with pytest.raises(ValueError, match="ddp_spawn") as err:
        check_parallel_launch(DDP_2, multirun=True)
    assert "launcher=slurm" in str(err.value) and "sweep" in str(err.value)
    for strategy in ("ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false"):
        with pytest.raises(ValueError, match="ddp_spawn"):
            check_parallel_launch({**DDP_2, "strategy": strategy}, multirun=True)
    # several devices with "auto": Lightning picks plain ddp
    with pytest.raises(ValueError, match="ddp_spawn"):
        check_parallel_launch({"accelerator": "cpu", "devices": 2}, multirun=True)
    # one device per node on several nodes is still a re-launch
    with pytest.raises(ValueError, match="ddp_spawn"):
        check_parallel_launch({**DDP_2, "devices": 1, "num_nodes": 2}, multirun=True)
    # a DDPStrategy node with the default (popen) start method
    node = {"_target_": "lightning.pytorch.strategies.DDPStrategy"}
    with pytest.raises(ValueError, match="ddp_spawn"):
        check_parallel_launch({**DDP_2, "strategy": node}, multirun=True)


def test_allowed_launches_pass(no_cluster):
    check_parallel_launch({**DDP_2, "accelerator": "cpu", "strategy": "ddp_spawn"}, multirun=True)
    for strategy in ("ddp_fork", "ddp_notebook", "ddp_spawn_find_unused_parameters_true"):
        check_parallel_launch({**DDP_2, "strategy": strategy}, multirun=True)
    check_parallel_launch({**DDP_2, "strategy": {"_target_": "lightning.pytorch.strategies.DDPStrategy",
                                                 "start_method": "spawn"}}, multirun=True)
    check_parallel_launch(DDP_2, multirun=False)  # a single run: Lightning re-launches this one run
    check_parallel_launch({**DDP_2, "devices": 1}, multirun=True)  # nothing to launch
    check_parallel_launch({**DDP_2, "devices": [0]}, multirun=True)
    check_parallel_launch({"accelerator": "cpu", "devices": 1, "max_epochs": 3}, multirun=True)
    assert not relaunches_script({"accelerator": "cpu", "devices": "auto", "strategy": "ddp"})
    assert relaunches_script({**DDP_2, "devices": "0,1"})


def test_multirun_under_slurm_tasks_passes(no_cluster, monkeypatch):
    # SLURM started one task per GPU: Lightning's SLURM environment launches nothing itself
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "bgexp")
    check_parallel_launch(DDP_2, multirun=True)


def test_configs_of_the_trainer_group():
    spawn = compose_cfg(["trainer=ddp_spawn"]).trainer
    assert (spawn.accelerator, spawn.devices, spawn.strategy) == ("cpu", 2, "ddp_spawn")
    check_parallel_launch(dict(spawn), multirun=True)
    ddp = compose_cfg(["trainer=ddp"]).trainer
    assert ddp.strategy == "ddp" and relaunches_script(dict(ddp))
    assert not is_multirun()  # outside Hydra
