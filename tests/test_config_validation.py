"""Validate before work (issue 17, Build item 1; list item 10): `validate_config` refuses bad values,
unknown keys (also added with `+`), a bad `optimized_metric` and a flow that cannot act on the
target, with a ConfigError naming the key, before any data generation, MD or training."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import bgexp.evaluation.refinement  # noqa: F401 (imported by bgexp-train before the check, as here:
import bgexp.training.run  # noqa: F401  the time asserted below is the check's, not the imports')
from bgexp.train import CONFIG_DIR
from bgexp.training.allowlist import ForbiddenTargetError
from bgexp.training.errors import ConfigError
from bgexp.training.validation import validate_config
from helpers import run_cli

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
SEARCHES = sorted(p.stem for p in (Path(CONFIG_DIR) / "hparams_search").glob("*.yaml"))


def compose_cfg(overrides=(), config_name="config"):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def refused(overrides, mode="train", config_name="config") -> str:
    cfg = compose_cfg(overrides, config_name)
    start = time.time()
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, mode=mode)
    assert time.time() - start < 5
    return str(err.value)


# (overrides, the key named in the message, what the message says is allowed or suggested)
BAD_TRAIN = [
    (["evaluation.final_n_samples=0"], "evaluation.final_n_samples=0", "integer >= 1"),
    (["evaluation.confidence=1.5"], "evaluation.confidence=1.5", "in (0, 1)"),
    (["optimized_metric=bogus"], "optimized_metric='bogus'", "can exist in results.json"),
    (["+evaluation.final_n_sample=5000"], "evaluation.final_n_sample=5000", "did you mean evaluation.final_n_samples?"),
    (["+sed=5"], "sed=5", "did you mean seed?"),
    (["+logger.projetc=x"], "logger.projetc='x'", "did you mean logger.project?"),  # WandbLogger: wandb.init keys
    (["flow=smooth_torus"], "flow:", "flow for circular coordinates"),  # a torus flow on the dimer
    (["flow=spline_torus"], "flow:", "whose space has no angle"),
    (["flow.transform.n_couplings=0"], "flow.transform.n_couplings=0", "integer >= 1"),
    (["flow.transform.activation=swish"], "flow.transform.activation='swish'", "'tanh'"),
    (["flow.transform.hidden=[64,0]"], "flow.transform.hidden=[64, 0]", "widths >= 1"),
    (["+flow.transform.n_coupling=3"], "flow.transform.n_coupling=3", "did you mean flow.transform.n_couplings?"),
    (["+target.k_dimr=5"], "target.k_dimr=5", "did you mean target.k_dimer?"),
    (["evaluation.n_samples=0"], "evaluation.n_samples=0", "integer >= 1"),
    (["evaluation.batch_size=-1"], "evaluation.batch_size=-1", "integer >= 1"),
    (["evaluation.n_bootstrap=0"], "evaluation.n_bootstrap=0", "integer >= 1"),
    (["evaluation.final_n_bootstrap=0"], "evaluation.final_n_bootstrap=0", "integer >= 1"),
    (["evaluation.every_n_epochs=0"], "evaluation.every_n_epochs=0", "integer >= 1"),
    (["evaluation.final_n_samples=2.5"], "evaluation.final_n_samples=2.5", "integer >= 1"),
    (["data.batch_size=0"], "data.batch_size=0", "integer >= 1"),
    (["data.val_fraction=1.0"], "data.val_fraction=1.0", "in (0, 1)"),
    (["data.generate.n_chains=0"], "data.generate.n_chains=0", "integer >= 1"),
    (["+data.batch_sz=32"], "data.batch_sz=32", "did you mean data.batch_size?"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0", "integer >= 1 or -1"),
    (["target.temperature=-1"], "target.temperature=-1", "> 0"),
    (["optim.lr=0"], "optim.lr=0", "> 0"),
    (["loss.rc_weight=1.0"], "loss.rc_observable=None", "rc_weight=1.0 > 0"),
    (["smc=default", "smc.n_particles=0"], "smc.n_particles must be >= 2", "smc"),
    (["smc=default", "+smc.particles=10"], "smc.particles=10", "did you mean smc.n_particles?"),
    (["smc=default", "smc.reverse_steps=-1"], "smc.reverse_steps=-1", "integer >= 0"),
    (["smc=default", "smc.bidirectional=true", "smc.per_state=false"], "smc.bidirectional", "per_state"),
    (["experiment=dw4_ecnf", "smc=default", "smc.bidirectional=true"], "smc.bidirectional", "inverse pass"),
    (["optimized_metric=smc.flow.ess"], "optimized_metric='smc.flow.ess'", "smc=default"),
    (["experiment=dw4_ecnf", "smc.enabled=false", "optimized_metric=smc.flow.ess"], "optimized_metric=", "enabled"),
    (["smc=default", "smc.enabled=maybe"], "smc.enabled='maybe'", "true or false"),
    (["optimized_metric=abs:tfep.estimates.lfep.error"], "optimized_metric=", "only for task=tfep"),
    (["optimized_metric=es"], "optimized_metric='es'", "did you mean ess?"),
    (["+callbacks.lr={_target_:lightning.pytorch.callbacks.LearningRateMonitor}"], "callbacks.lr._target_",
     "must accept `run_dir`"),
    # a flow that cannot act on the target's space: found by building it on the dimer's space, no data
    (["+flow.transform.dim=10"], "flow: cannot act on target", "does not match the latent dimension 76"),
    (["experiment=ice16_rigid", "tfep.val_fraction=0"], "tfep.val_fraction=0", "in (0, 1)"),
    (["experiment=ice16_rigid", "tfep.data_a.md.n_frames=0"], "tfep.data_a.md.n_frames=0", "integer >= 1"),
    (["experiment=ala2_realnvp", "data.md=[{n_frames:10},{timestep_fs:0}]"], "data.md[1].timestep_fs=0", "> 0"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("overrides, key, allowed", BAD_TRAIN, ids=[" ".join(b[0]) for b in BAD_TRAIN])
def test_a_bad_training_config_is_refused_with_the_key_and_what_is_allowed(overrides, key, allowed):
    message = refused(overrides)
    assert key in message and allowed in message, message


BAD_EVAL = [
    (["n_samples=0"], "n_samples=0", "integer >= 1"),
    (["confidence=1.5"], "confidence=1.5", "in (0, 1)"),
    (["n_bootstrap=0"], "n_bootstrap=0", "integer >= 1"),
    (["+n_sample=5"], "n_sample=5", "did you mean n_samples?"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("overrides, key, allowed", BAD_EVAL, ids=[" ".join(b[0]) for b in BAD_EVAL])
def test_bad_eval_settings_are_refused(overrides, key, allowed):
    message = refused(["run_dir=/nowhere", *overrides], mode="eval", config_name="eval")
    assert key in message and allowed in message, message


@pytest.mark.bad_input
def test_every_problem_is_listed_in_one_error():
    message = refused(["evaluation.final_n_samples=0", "evaluation.confidence=1.5", "+sed=5"])
    assert "3 problems" in message
    for key in ("evaluation.final_n_samples=0", "evaluation.confidence=1.5", "sed=5"):
        assert key in message


@pytest.mark.bad_input
def test_a_forbidden_target_is_still_the_allow_list_error():
    cfg = compose_cfg(["+flow.transform.extra={_target_:builtins.print}"])
    with pytest.raises(ForbiddenTargetError, match=r"flow\.transform\.extra\._target_"):
        validate_config(cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_shipped_experiment_validates(experiment):
    start = time.time()
    validate_config(compose_cfg([f"experiment={experiment}"]))
    assert time.time() - start < 5


@pytest.mark.parametrize("search", SEARCHES)
def test_every_hparams_search_validates(search):
    validate_config(compose_cfg([f"hparams_search={search}"]))


@pytest.mark.parametrize("overrides", [
    ["+target.k_dimer=5", "+target.box_half_length=4"],  # constructor parameters of DimerTarget
    ["+flow.transform.dim=76"],
    ["+trainer.limit_train_batches=2", "+trainer.num_sanity_val_steps=0"],
    ["smc=default"],
    ["callbacks.step_timer=null", "logger=none", "loss=nll", "trainer.max_epochs=-1"],
    ["optimized_metric='abs:delta_f.closed->open.value'"],
    ["optimized_metric=abs_delta_f_error"],
    ["optimized_metric=metrics.kl_quadrature", "experiment=torus_smooth"],
    ["evaluation.final_n_data=null", "scheduler=null"],
])
def test_legitimate_overrides_validate(overrides):
    validate_config(compose_cfg(overrides))


def test_smc_enabled_false_switches_an_experiments_refinement_off():
    """dw4_ecnf refines by SMC by default; smc.enabled=false turns it off (no settings, no block)."""
    from bgexp.training.tasks.bg import smc_settings

    on = compose_cfg(["experiment=dw4_ecnf"])
    off = compose_cfg(["experiment=dw4_ecnf", "smc.enabled=false"])
    validate_config(off)
    assert smc_settings(on).n_particles == 1000 and smc_settings(on).resample_threshold == 0.95
    assert smc_settings(off) is None and smc_settings(compose_cfg([])) is None


def test_the_eval_config_validates():
    validate_config(compose_cfg(["run_dir=/some/run", "smc=default"], "eval"), mode="eval")


def test_a_resolved_stored_config_validates():
    """What a run folder stores (and `resume=` merges into): the resolved config as plain containers."""
    from omegaconf import OmegaConf

    cfg = compose_cfg(["logger=csv"])
    container = OmegaConf.to_container(cfg, resolve=False)
    container["logger"]["save_dir"] = "/runs/x"  # ${hydra:...} is resolved in a real run
    validate_config(OmegaConf.create(container))


# the real console scripts: refused before the run folder gets any data ----------------------------------
@pytest.mark.bad_input
@pytest.mark.parametrize("override, key", [("evaluation.final_n_samples=0", "evaluation.final_n_samples=0"),
                                           ("+evaluation.final_n_sample=5000", "evaluation.final_n_sample=5000"),
                                           ("+target.k_dimr=5", "target.k_dimr=5")])
def test_the_cli_refuses_before_any_data(override, key, tmp_path):
    start = time.time()
    proc = run_cli("bgexp-train", [override, "logger=none"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "ConfigError" in proc.stderr and key in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "outputs" / "data").exists()
    assert not list((tmp_path / "outputs").rglob("*.npz")) and not list((tmp_path / "outputs").rglob("*.ckpt"))
    assert time.time() - start < 60  # interpreter and imports included; the check itself is < 5 s (above)
    # the first, import-free pass found it: nothing heavier than Hydra was loaded (no Lightning banner)
    assert "the parameters of `_target_` nodes" in proc.stderr or "nothing was run" in proc.stderr


@pytest.mark.bad_input
def test_bgexp_eval_refuses_bad_settings_before_loading_the_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = run_cli("bgexp-eval", [f"run_dir={run_dir}", "confidence=1.5"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "ConfigError" in proc.stderr and "confidence=1.5" in proc.stderr, proc.stderr[-3000:]
    assert "not a bgexp run folder" not in proc.stderr  # refused before the (missing) run was looked at


def test_swept_keys_from_the_command_line():
    from bgexp.train import swept_keys

    assert swept_keys(["-m", "seed=0,1", "optim.lr=1e-3", "flow=realnvp,realnvp_pca",
                       "+loss.rc_weight=range(1,3)"]) == {"seed", "flow", "loss.rc_weight"}


@pytest.mark.bad_input
def test_a_config_error_outside_the_swept_keys_stops_the_sweep(tmp_path, monkeypatch):
    """optimized_metric=bogus in a sweep over seeds: the first member fails and the sweep stops
    (every member would fail alike), instead of failing each member after its own start-up."""
    import sys

    from bgexp.train import _fails_alike
    from bgexp.training.validation import InvalidConfigError

    err = InvalidConfigError("x", problems=["optimized_metric='bogus': is not a path ..."])
    monkeypatch.setattr(sys, "argv", ["bgexp-train", "-m", "seed=0,1"])
    assert _fails_alike(err)
    monkeypatch.setattr(sys, "argv", ["bgexp-train", "-m", "optimized_metric=ess,bogus"])
    assert not _fails_alike(err)  # the sweep varies it: the other members may work
    proc = run_cli("bgexp-train", ["-m", "seed=0,1", "optimized_metric=bogus", "logger=none"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "optimized_metric" in proc.stderr + proc.stdout
    members = list((tmp_path / "outputs" / "multiruns").rglob("failed.json"))
    assert len(members) <= 1  # at most the first member, never the second


def test_md_data_read_as_they_are_validate_and_bad_sweeps_do_not():
    """data.md: null (the data.path folders read as they are, as the data module's message
    advises) is a valid setting; a negative smc.final_sweeps is refused with its key."""
    validate_config(compose_cfg(["experiment=ala2_nsf", "data.md=null", "data.path=[a,b,c]"]))
    message = refused(["smc=default", "smc.final_sweeps=-2"])
    assert "smc.final_sweeps=-2" in message and "integer >= 0" in message, message
