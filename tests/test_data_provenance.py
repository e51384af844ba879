"""Data provenance (issue 17, item 3 / Build 4): an MD folder or data cache made with other settings
than the requested ones is never used silently; a damaged MD chunk is a named error with its path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from bgexp.targets.dimer import DimerTarget
from bgexp.training.data import DataError, DataProvenanceError, TargetDataModule

# tiny Metropolis data for the dimer (a fraction of a second)
TINY_MC = {"states": ["closed", "open"], "n_chains": 4, "burn_in": 20, "n_steps": 20, "thin": 10,
           "step_size": 0.02, "seed": 0}
# tiny ALA2 MD (4 frames, no equilibration: well under a second)
TINY_MD = {"n_frames": 4, "report_interval": 5, "chunk_frames": 2, "equilibration_steps": 0, "seed": 2,
           "threads": 1}


# MD folders ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ala2():
    pytest.importorskip("openmm")
    from bgexp.targets.peptides import AlanineDipeptide

    with AlanineDipeptide(n_workers=0) as target:
        yield target


@pytest.fixture()
def md_folder(ala2, tmp_path) -> Path:
    """A complete 300 K MD folder of 4 frames, made through the data module."""
    folder = tmp_path / "md300"
    dm = TargetDataModule(ala2, path=str(folder), md=dict(TINY_MD), progress=False, val_fraction=0.25)
    dm.setup()
    assert dm.x_train.shape[0] + dm.x_val.shape[0] == 4
    return folder


def _data(ala2, folder: Path, md: dict | None) -> TargetDataModule:
    return TargetDataModule(ala2, path=str(folder), md=md, progress=False, val_fraction=0.25)


@pytest.mark.bad_input
def test_md_folder_at_another_temperature_is_refused_with_both_values(ala2, md_folder):
    before = sorted(p.name for p in (md_folder / "chunks").iterdir())
    with pytest.raises(DataProvenanceError) as info:
        _data(ala2, md_folder, {**TINY_MD, "temperature": 600.0}).setup()
    message = str(info.value)
    assert str(md_folder) in message
    assert "temperature_kelvin: requested 600.0, stored 300.0" in message
    assert "delete" in message and "data.path" in message
    # nothing was touched
    assert sorted(p.name for p in (md_folder / "chunks").iterdir()) == before
    assert json.loads((md_folder / "metadata.json").read_text())["temperature_kelvin"] == 300.0


@pytest.mark.bad_input
def test_md_folder_with_fewer_frames_is_refused_with_both_counts(ala2, md_folder):
    with pytest.raises(DataProvenanceError, match=r"settings\.n_frames: requested 40, stored 4"):
        _data(ala2, md_folder, {**TINY_MD, "n_frames": 40}).setup()
    # every differing setting is listed, one line each
    with pytest.raises(DataProvenanceError) as info:
        _data(ala2, md_folder, {**TINY_MD, "n_frames": 40, "seed": 7}).setup()
    assert "settings.n_frames: requested 40, stored 4" in str(info.value)
    assert "settings.seed: requested 7, stored 2" in str(info.value)


def test_md_folder_with_the_same_settings_is_reused(ala2, md_folder):
    mtime = (md_folder / "state.xml").stat().st_mtime_ns
    dm = _data(ala2, md_folder, dict(TINY_MD))  # threads and platform do not change the data
    dm.setup()
    assert dm.x_train.shape[0] + dm.x_val.shape[0] == 4
    assert (md_folder / "state.xml").stat().st_mtime_ns == mtime
    # the target's temperature asked explicitly is the same run as the default (None)
    _data(ala2, md_folder, {**TINY_MD, "temperature": 300.0}).setup()


@pytest.mark.bad_input
def test_old_format_md_folder_without_stored_settings_is_refused_with_md_and_used_without(ala2, md_folder, caplog):
    meta = json.loads((md_folder / "metadata.json").read_text())
    for key in ("settings", "temperature_kelvin"):
        meta.pop(key)
    (md_folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DataProvenanceError) as info:
        _data(ala2, md_folder, dict(TINY_MD)).setup()
    message = str(info.value)
    assert "does not store the settings" in message and "<not stored>" in message
    assert "data.md: null" in message
    # without data.md the folder is read as it is, and says so
    with caplog.at_level(logging.INFO, logger="bgexp.training.data"):
        dm = _data(ala2, md_folder, None)
        dm.setup()
    assert dm.x_train.shape[0] + dm.x_val.shape[0] == 4
    assert "used as it is" in caplog.text


@pytest.mark.bad_input
def test_chunks_without_metadata_are_never_overwritten(ala2, md_folder):
    (md_folder / "metadata.json").unlink()
    with pytest.raises(DataProvenanceError, match="no metadata.json"):
        _data(ala2, md_folder, dict(TINY_MD)).setup()
    assert (md_folder / "chunks" / "chunk_00000.npz").is_file()


@pytest.mark.bad_input
def test_generate_md_on_a_folder_with_other_settings_is_refused(ala2, md_folder):
    from bgexp.targets.dynamics import MDSettings, MDSettingsMismatch, run_md

    settings = MDSettings(**{k: v for k, v in TINY_MD.items() if k != "threads"})
    settings.n_frames = 6
    with pytest.raises(MDSettingsMismatch, match=r"settings\.n_frames: requested 6, stored 4"):
        run_md(ala2, md_folder, settings, threads=1, progress=False)


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_a_damaged_md_chunk_is_a_named_error_with_its_path(ala2, md_folder, damage):
    from bgexp.targets.dynamics import MDError, load_md

    chunk = md_folder / "chunks" / "chunk_00001.npz"
    if damage == "truncated":
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    elif damage == "garbage":
        chunk.write_bytes(b"not a zip file at all")
    else:
        chunk.unlink()
    with pytest.raises(MDError) as info:
        load_md(md_folder)
    assert str(chunk) in str(info.value) and "delete the MD folder" in str(info.value)
    # through the data module: a DataError with the same message
    with pytest.raises(DataError, match="chunk_00001.npz"):
        _data(ala2, md_folder, None).setup()


# the dimer MC cache -------------------------------------------------------------------------
def _dimer_data(tmp_path: Path, generate: dict, temperature: float = 1.0) -> TargetDataModule:
    target = DimerTarget(temperature=temperature)
    return TargetDataModule(target, target_config={"name": "dimer", "temperature": temperature},
                            cache_dir=str(tmp_path / "cache"), generate=generate, progress=False)


def test_dimer_cache_other_settings_get_their_own_keyed_file(tmp_path):
    first = _dimer_data(tmp_path, TINY_MC)
    x1 = first.load_all()
    more = _dimer_data(tmp_path, {**TINY_MC, "n_steps": 40})
    hotter = _dimer_data(tmp_path, TINY_MC, temperature=2.0)
    assert len({first.cache_path(), more.cache_path(), hotter.cache_path()}) == 3
    assert len(more.load_all()) == 2 * len(x1)  # twice the steps, twice the kept samples
    hotter.load_all()
    assert len(list((tmp_path / "cache").glob("dimer-*.npz"))) == 3
    # the first cache is unchanged and read back as it is
    np.testing.assert_array_equal(_dimer_data(tmp_path, TINY_MC).load_all(), x1)


@pytest.mark.bad_input
def test_dimer_cache_with_other_stored_settings_is_regenerated_with_the_fields_listed(tmp_path, caplog):
    dm = _dimer_data(tmp_path, TINY_MC)
    x = dm.load_all()
    path = dm.cache_path()
    # a file at the keyed path made with other settings (copied, or from an older bgexp)
    other = json.dumps({**dm.cache_settings(), "generate": {**TINY_MC, "n_steps": 400}}, sort_keys=True)
    np.savez(path, x=np.zeros_like(x), settings_json=np.array(other))
    with caplog.at_level(logging.WARNING, logger="bgexp.training.data"):
        regenerated = _dimer_data(tmp_path, TINY_MC).load_all()
    assert "other settings" in caplog.text and "generate.n_steps: requested 20, stored 400" in caplog.text
    np.testing.assert_array_equal(regenerated, x)


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["no_settings", "truncated"])
def test_dimer_cache_old_format_or_damaged_is_regenerated(tmp_path, caplog, damage):
    dm = _dimer_data(tmp_path, TINY_MC)
    x = dm.load_all()
    path = dm.cache_path()
    if damage == "no_settings":
        np.savez(path, x=np.zeros_like(x))
        expected = "stores no settings"
    else:
        path.write_bytes(path.read_bytes()[:100])
        expected = str(path)
    with caplog.at_level(logging.WARNING, logger="bgexp.training.data"):
        regenerated = _dimer_data(tmp_path, TINY_MC).load_all()
    assert expected in caplog.text and "regenerating" in caplog.text
    np.testing.assert_array_equal(regenerated, x)


@pytest.mark.bad_input
@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
def test_integer_or_boolean_data_are_named_errors(tmp_path, dtype):
    """Rounded (integer) or boolean coordinates: a DataError naming the file and the dtype, before training."""
    from bgexp.training.data import DataError, load_npz

    path = tmp_path / "bad.npz"
    np.savez(path, x=np.ones((10, 76), dtype=dtype))
    with pytest.raises(DataError, match=f"bad.npz.*{np.dtype(dtype).name}"):
        load_npz(path, 76)
