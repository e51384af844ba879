"""Gaps of issue 17 closed after the first pass: bgexp-sample validates its settings, an evaluation
of a resumed run reads the resume's config (same config hash as its results.json), `-m resume=` is
refused, bgexp.train's output-folder check is the CLI's, a flow that cannot act on an OpenMM target
fails before any MD, the `divergence:` block is in the schema, and a config-value error is found
before Lightning, torch and the flows are imported."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bgexp.train import CONFIG_DIR
from bgexp.training.errors import ConfigError
from helpers import REPO, ala2_tiny_md, cli_env, console_script, run_cli


def compose_cfg(overrides=(), config_name="config"):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


# 1. bgexp-sample checks the eval settings before the run is loaded ------------------------------------
@pytest.mark.bad_input
@pytest.mark.parametrize("override, key", [("confidence=1.5", "confidence=1.5"), ("+n_sampels=5", "n_sampels=5")])
def test_bgexp_sample_refuses_bad_settings_before_loading_the_run(tmp_path, override, key):
    run_dir = tmp_path / "run"  # no config.yaml: a check after loading would say "not a bgexp run folder"
    run_dir.mkdir()
    proc = run_cli("bgexp-sample", [f"run_dir={run_dir}", "n_samples=1e3", override], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "ConfigError" in proc.stderr and key in proc.stderr, proc.stderr[-3000:]
    assert "not a bgexp run folder" not in proc.stderr
    assert not list(run_dir.rglob("*.npz"))  # (Hydra made its eval/<stamp> folder; nothing was sampled)


# 2. an evaluation of a resumed run has the resumed run's config (and config hash) ----------------------
def test_load_run_config_prefers_the_latest_resume(tmp_path):
    from bgexp.training.artifacts import config_hash
    from bgexp.training.assemble import load_run_config
    from bgexp.training.resume import RESUMES_DIR, RESUMED_CONFIG, run_config_path

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    base = {"target": {"_target_": "bgexp.targets.DimerTarget"}, "trainer": {"max_epochs": 20}, "seed": 1}
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(base)))
    assert run_config_path(run_dir) == run_dir / "config.yaml"
    assert load_run_config(run_dir).trainer.max_epochs == 20
    for stamp, epochs in (("2024-01-01_00-00-00-000000", 30), ("2024-01-02_00-00-00-000000", 50)):
        folder = run_dir / RESUMES_DIR / stamp
        folder.mkdir(parents=True)
        resumed = {**base, "trainer": {"max_epochs": epochs}, "resume": str(run_dir), "ckpt_path": "x.ckpt"}
        (folder / RESUMED_CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create(resumed)))
    cfg = load_run_config(run_dir)
    assert cfg.trainer.max_epochs == 50  # the latest resume's overrides
    latest = OmegaConf.load(run_dir / RESUMES_DIR / "2024-01-02_00-00-00-000000" / RESUMED_CONFIG)
    assert config_hash(cfg) == config_hash(latest) != config_hash(OmegaConf.create(base))


# 3. resume= inside a multirun is refused ---------------------------------------------------------------
@pytest.mark.bad_input
def test_resume_in_a_multirun_is_refused(tmp_path):
    from bgexp.training.resume import ResumeError, check_not_multirun

    with pytest.raises(ResumeError, match="Resume each member on its own"):
        check_not_multirun(OmegaConf.create({"resume": "/a/run"}), multirun=True)
    check_not_multirun(OmegaConf.create({"resume": "/a/run"}), multirun=False)
    check_not_multirun(OmegaConf.create({"resume": None}), multirun=True)

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("seed: 1\n")
    before = sorted(p.name for p in run_dir.rglob("*"))
    proc = run_cli("bgexp-train", ["-m", f"resume={run_dir}", "trainer.max_epochs=5"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "ResumeError" in proc.stderr and "on its own" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "outputs" / "multiruns").exists()  # refused before the sweep made a folder
    assert sorted(p.name for p in run_dir.rglob("*")) == before


# 4. bgexp.train checks its output folder as bgexp-train does -------------------------------------------
@pytest.mark.bad_input
@pytest.mark.parametrize("value, message", [("", "is empty"), ("afile", "is a file")])
def test_api_train_refuses_an_unusable_output_dir(tmp_path, monkeypatch, value, message):
    import bgexp
    from bgexp.training.resume import OutputDirError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    cfg = bgexp.compose("dimer_realnvp", ["logger=none", f"paths.output_dir='{value}'", "paths.data_dir=data"])
    with pytest.raises(OutputDirError, match=message):
        bgexp.fit(cfg)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


# 5. a flow that cannot act on an OpenMM target fails before any MD -------------------------------------
@pytest.mark.bad_input
def test_a_flow_mismatch_on_ala2_fails_before_md(tmp_path):
    start = time.perf_counter()
    proc = run_cli("bgexp-train", ["experiment=ala2_realnvp", *ala2_tiny_md(tmp_path), "+flow.transform.dim=10",
                                   "logger=none", "target.n_workers=0"], tmp_path, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    assert "ConfigError" in proc.stderr and "flow: cannot act on target" in proc.stderr, proc.stderr[-3000:]
    assert "does not match the latent dimension" in proc.stderr
    assert not (tmp_path / "md300").exists() and not (tmp_path / "md600").exists()
    assert elapsed < 30, elapsed


def test_check_flow_on_target_accepts_a_fitting_flow_and_names_a_mismatch():
    from bgexp.training.assemble import build_target
    from bgexp.training.validation import InvalidConfigError, check_flow_on_target

    cfg = compose_cfg()
    target = build_target(cfg)
    check_flow_on_target(cfg, target)
    bad = compose_cfg(["+flow.transform.dim=10"])
    with pytest.raises(InvalidConfigError, match="flow: cannot act on target"):
        check_flow_on_target(bad, target)


# 6. the divergence: block in the schema -----------------------------------------------------------------
@pytest.mark.bad_input
@pytest.mark.parametrize("override, key, allowed", [
    ("divergence.window=0", "divergence.window=0", "integer >= 1"),
    ("divergence.min_steps=0", "divergence.min_steps=0", "integer >= 1"),
    ("divergence.growth=-1", "divergence.growth=-1", "> 0"),
    ("divergence.floor=0", "divergence.floor=0", "> 0"),
    ("divergence.zero_weight_evaluations=-1", "divergence.zero_weight_evaluations=-1", "integer >= 0"),
    ("divergence.enabled=maybe", "divergence.enabled='maybe'", "true or false"),
    ("+divergence.windw=3", "divergence.windw=3", "did you mean divergence.window?"),
])
def test_a_bad_divergence_setting_is_refused(override, key, allowed):
    from bgexp.training.validation import validate_config

    with pytest.raises(ConfigError) as err:
        validate_config(compose_cfg([override]))
    assert key in str(err.value) and allowed in str(err.value), str(err.value)


def test_divergence_null_and_defaults_validate():
    from bgexp.training.validation import validate_config

    validate_config(compose_cfg(["divergence=null"]), quick=True)
    validate_config(compose_cfg(["divergence.enabled=false", "divergence.zero_weight_evaluations=0"]), quick=True)


# 7. a config-value error before the heavy imports --------------------------------------------------------
@pytest.mark.bad_input
def test_a_value_error_is_found_without_importing_lightning_or_torch():
    code = ("import sys, time; from hydra import compose, initialize_config_dir; from bgexp.train import CONFIG_DIR\n"
            "from bgexp.training.validation import validate_config, InvalidConfigError\n"
            "with initialize_config_dir(config_dir=CONFIG_DIR, version_base='1.3'):\n"
            "    cfg = compose('config', overrides=['evaluation.confidence=1.5', 'divergence.window=0', '+sed=5'])\n"
            "start = time.perf_counter()\n"
            "try:\n    validate_config(cfg)\nexcept InvalidConfigError as err:\n    message = str(err)\n"
            "else:\n    raise SystemExit('not refused')\n"
            "assert time.perf_counter() - start < 1, time.perf_counter() - start\n"
            "assert '3 problems' in message, message\n"
            "heavy = [m for m in ('lightning', 'torch', 'bgexp.flows') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


@pytest.mark.bad_input
def test_the_cli_reports_a_value_error_before_the_heavy_imports(tmp_path):
    env = {**cli_env(tmp_path), "PYTHONPROFILEIMPORTTIME": "1"}  # every import listed on stderr
    proc = subprocess.run([console_script("bgexp-train"), "evaluation.confidence=1.5", "logger=none"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "InvalidConfigError" in proc.stderr and "evaluation.confidence=1.5" in proc.stderr, proc.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not {"lightning", "torch", "bgexp.training.run"} & imported
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.npz"))
