"""The generator command line: determinism across workers, resuming, layouts, errors, the tidal path."""

import json
import os
import sys
import types

import h5py
import numpy as np
import pytest

import prep_data
from data import generate, shards, tidal


def _shards(folder):
    return sorted(p for p in os.listdir(folder) if p.endswith(".h5"))


@pytest.fixture(scope="module")
def one_worker_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("one_worker") / "backgrounds"
    shards.generate_shards("backgrounds", 3, 5, folder, workers=1, shard_size=2, progress=False)
    return folder


def test_same_seed_gives_identical_files_with_one_and_two_workers(one_worker_run, tmp_path):
    two = tmp_path / "two"
    shards.generate_shards("backgrounds", 3, 5, two, workers=2, shard_size=2, progress=False)
    assert _shards(one_worker_run) == _shards(two) == ["backgrounds-00000-of-00002.h5", "backgrounds-00001-of-00002.h5"]
    for name in _shards(two):
        assert (one_worker_run / name).read_bytes() == (two / name).read_bytes()


def test_shard_layout_is_the_stacked_icl_layout(one_worker_run):
    with h5py.File(one_worker_run / "backgrounds-00000-of-00002.h5", "r") as f:
        assert f["image"].shape == (2, 224, 224) and f["image"].dtype == np.float16
        assert f["mask"].shape == (2, 224, 224) and f["mask"].dtype == np.int32
        assert [v.decode() for v in f["id"][()]] == ["backgrounds-s5-0000000", "backgrounds-s5-0000001"]
        assert set(f.keys()) == {"image", "mask", "id", "z", "f_icl_true", "f_icl_sb_ideal", "f_icl_sb_ideal_scene", "params"}
        np.testing.assert_array_equal(f["f_icl_true"][()], 0.0)
        assert json.loads(f["params"][0])["z"] == pytest.approx(f["z"][0])
        assert f.attrs["layout"] == "stacked" and f.attrs["seed"] == 5
    refs, errors = prep_data.index_cutouts(str(one_worker_run))
    assert len(refs) == 3 and not errors
    assert prep_data.load_prepared(refs[2]).shape == (224, 224, 1)


def test_rerun_fills_only_missing_shards(one_worker_run, tmp_path):
    folder = tmp_path / "resume"
    folder.mkdir()
    kept, missing = _shards(one_worker_run)
    (folder / kept).write_bytes((one_worker_run / kept).read_bytes())
    os.utime(folder / kept, (1, 1))
    # What an interrupted writer leaves behind never counts as a shard.
    (folder / f".{missing}.partial-12345").write_bytes(b"truncated")
    shards.generate_shards("backgrounds", 3, 5, folder, workers=1, shard_size=2, progress=False)
    assert sorted(os.listdir(folder)) == [kept, missing]
    assert os.stat(folder / kept).st_mtime == 1  # untouched
    assert (folder / missing).read_bytes() == (one_worker_run / missing).read_bytes()


def test_rerun_with_other_settings_is_refused(one_worker_run, tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    name = _shards(one_worker_run)[0]
    (folder / name).write_bytes((one_worker_run / name).read_bytes())
    with pytest.raises(shards.GenerationError, match="was made with seed=5, not 6"):
        shards.generate_shards("backgrounds", 3, 6, folder, workers=1, shard_size=2, progress=False)
    with pytest.raises(shards.GenerationError, match="holds shards of another run"):
        shards.generate_shards("backgrounds", 5, 5, folder, workers=1, shard_size=2, progress=False)


def test_command_line_merges_into_one_file_and_draws_a_preview(tmp_path):
    out, preview = tmp_path / "clusters.h5", tmp_path / "clusters.png"
    code = generate.main(["clusters", "--n", "2", "--seed", "1", "--out", str(out), "--shard-size", "1",
                          "--preview", str(preview), "--quiet"])
    assert code == 0
    assert sorted(os.listdir(tmp_path)) == ["clusters.h5", "clusters.png"]
    with h5py.File(out, "r") as f:
        assert f["image"].shape == (2, 224, 224)
        assert [v.decode() for v in f["id"][()]] == ["clusters-s1-0000000", "clusters-s1-0000001"]
        assert ((f["f_icl_true"][()] >= 0.02) & (f["f_icl_true"][()] <= 0.45)).all()
        assert "first_index" not in f.attrs
    assert preview.read_bytes()[:4] == b"\x89PNG"
    # A second run finds the file complete and does nothing.
    assert generate.main(["clusters", "--n", "2", "--seed", "1", "--out", str(out), "--shard-size", "1", "--quiet"]) == 0


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["clusters", "--n", "-3"], "error: --n must be a positive number of cutouts, got -3"),
        (["clusters", "--workers", "0"], "error: --workers must be at least 1, got 0"),
        (["clusters", "--shard-size", "0"], "error: --shard-size must be at least 1, got 0"),
        (["clusters", "--seed", "-1"], "error: --seed must be a non-negative integer, got -1"),
    ],
)
def test_impossible_arguments_get_a_one_line_error(arguments, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(arguments + ["--out-dir", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == message + "\n"


def test_unwritable_output_gets_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        generate.main(["clusters", "--n", "1", "--out", str(blocker / "x.h5")])
    error = capsys.readouterr().err
    assert error.startswith(f"error: --out {blocker / 'x.h5'}: cannot write there") and error.count("\n") == 1
    with pytest.raises(SystemExit):
        generate.main(["clusters", "--n", "1", "--out-dir", str(blocker / "x")])
    error = capsys.readouterr().err
    assert error.startswith(f"error: --out-dir {blocker / 'x'}: cannot write there") and error.count("\n") == 1


@pytest.mark.parametrize(
    "options, message",
    [
        ([], "one of the arguments --out --out-dir is required"),
        (["--out", "a.h5", "--out-dir", "b"], "argument --out-dir: not allowed with argument --out"),
        (["--out-dir", "b", "--keep-shards"], "--keep-shards goes with --out FILE; with --out-dir the shards are the output"),
        (["--out", "a.h5", "--preview-count", "0"], "--preview-count must be at least 1, got 0"),
    ],
)
def test_wrong_output_options_are_refused_by_the_parser(options, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["clusters", "--n", "1", *options])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(message)


def test_out_names_one_hdf5_file(tmp_path, capsys):
    for out in (tmp_path, tmp_path / "clusters"):
        with pytest.raises(SystemExit) as exit_info:
            generate.main(["clusters", "--n", "1", "--out", str(out)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == (f"error: --out {out}: --out names one HDF5 file (FILE.h5); "
                                           "a folder of shards is --out-dir DIR\n")
    assert list(tmp_path.iterdir()) == []


def test_out_dir_keeps_the_shards(one_worker_run, tmp_path):
    folder = tmp_path / "shards"
    assert generate.main(["backgrounds", "--n", "3", "--seed", "5", "--shard-size", "2", "--workers", "1",
                          "--out-dir", str(folder), "--quiet"]) == 0
    assert _shards(folder) == _shards(one_worker_run)
    for name in _shards(folder):
        assert (folder / name).read_bytes() == (one_worker_run / name).read_bytes()


def test_help():
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--help"])
    assert exit_info.value.code == 0


def test_cutout_streams_depend_on_kind_seed_and_index_only():
    first = shards.cutout_rng("clusters", 3, 10).uniform(size=4)
    np.testing.assert_array_equal(first, shards.cutout_rng("clusters", 3, 10).uniform(size=4))
    assert not np.array_equal(first, shards.cutout_rng("backgrounds", 3, 10).uniform(size=4))
    assert not np.array_equal(first, shards.cutout_rng("clusters", 3, 11).uniform(size=4))


# ----------------------------------------------------------------------------------------
# The tidal kind, through a small stand-in for data.tidal (the real renderer lives elsewhere)


@pytest.fixture
def stand_in_tidal(monkeypatch):
    module = types.ModuleType("data.tidal")

    def render_tidal_galaxy(rng, has_tidal=None):
        has_tidal = bool(rng.uniform() < 0.5) if has_tidal is None else has_tidal
        image = rng.normal(0.0, 0.02, (128, 128, 5)).astype(np.float32)
        truth = dict(has_tidal=int(has_tidal), feature_type="shell" if has_tidal else "none",
                     feature_sb=26.0 if has_tidal else float("nan"), params={"seed_draw": float(image[0, 0, 0])})
        return image, truth

    def preview_panel(image, truth):
        module.panels += 1
        return np.zeros((128, 128, 3)), truth["feature_type"], "black"

    module.render_tidal_galaxy = render_tidal_galaxy
    module.preview_panel = preview_panel
    module.truth_columns = tidal.truth_columns
    module.panels = 0
    module.PREVIEW_TITLE = "stand-in"
    monkeypatch.setitem(sys.modules, "data.tidal", module)
    import data

    monkeypatch.setattr(data, "tidal", module, raising=False)
    return module


def test_tidal_kind_writes_the_tidal_layout(stand_in_tidal, tmp_path):
    out, preview = tmp_path / "tidal.h5", tmp_path / "tidal.png"
    # fork, so that the workers see the stand-in module.
    path = shards.generate_file("tidal", 5, 2, out, workers=2, shard_size=2, progress=False, start_method="fork")
    shards.preview_shards("tidal", [path], str(preview))
    with h5py.File(out, "r") as f:
        assert f["image"].shape == (5, 128, 128, 5) and f["image"].dtype == np.float32
        assert f.attrs["bands"] == "grizy"
        assert set(f.keys()) == {"image", "id", "has_tidal", "feature_type", "feature_sb", "params", "pair_id", "visible",
                                 "feature_light_fraction", "feature_snr", "feature_contrast"}
        has_tidal = f["has_tidal"][()]
        types_ = [v.decode() for v in f["feature_type"][()]]
        assert [t != "none" for t in types_] == [bool(h) for h in has_tidal]
        assert np.isnan(f["feature_sb"][()][has_tidal == 0]).all()
        single = shards.render_one("tidal", 2, 3)[0]
        np.testing.assert_array_equal(f["image"][3], single)
    assert preview.read_bytes()[:4] == b"\x89PNG" and stand_in_tidal.panels == 5


def test_tidal_kind_through_the_command_line(stand_in_tidal, tmp_path):
    out = tmp_path / "tidal.h5"
    assert generate.main(["tidal", "--n", "2", "--seed", "2", "--out", str(out), "--workers", "1", "--quiet"]) == 0
    with h5py.File(out, "r") as f:
        assert f["image"].shape == (2, 128, 128, 5)


def test_measure_sb_stores_the_label_of_measure_sb_cut(tmp_path, monkeypatch):
    module = types.ModuleType("measure_sb_cut")
    calls = []

    def measure_icl_fraction_canepa2025(image, z, mask=None, mask_bits=None, **options):
        calls.append((image.shape, mask.shape, z))
        return types.SimpleNamespace(f_icl=0.125 + z, f_icl_err=0.01)

    # The label is the paper's: the original code's measurement.
    module.measure_icl_fraction_canepa2025 = measure_icl_fraction_canepa2025
    monkeypatch.setitem(sys.modules, "measure_sb_cut", module)
    paths = shards.generate_shards("clusters", 1, 4, tmp_path / "sb", workers=1, progress=False, measure_sb=True)
    with h5py.File(paths[0], "r") as f:
        assert f["f_icl_sb"][0] == pytest.approx(0.125 + f["z"][0])
        assert f.attrs["sb_method"] == "canepa2025"
    assert calls[0][:2] == ((224, 224), (224, 224))


def test_benchmark_script_runs(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--clusters", "1", "--tidal", "0", "--workers", "1"]) == 0
    output = capsys.readouterr().out
    assert "clusters: 1 process" in output and "CPU s each" in output


def test_measure_sb_label_is_the_measurement_of_the_stored_cutout(tmp_path):
    import measure_sb_cut

    paths = shards.generate_shards("clusters", 1, 8, tmp_path / "sb", workers=1, progress=False, measure_sb=True)
    with h5py.File(paths[0], "r") as f:
        image, mask, z, label = f["image"][0].astype(np.float32), f["mask"][0], f["z"][0], f["f_icl_sb"][0]
    direct = measure_sb_cut.measure_icl_fraction_canepa2025(image, z, mask=mask).f_icl
    # The label is measured before the float16 storage; the rounding moves it by far less than its error.
    assert label == pytest.approx(direct, abs=2e-3)


def test_unmeasurable_cutout_gets_nan_label_that_training_refuses(tmp_path, monkeypatch):
    module = types.ModuleType("measure_sb_cut")

    def measure_icl_fraction_canepa2025(image, z, mask=None, mask_bits=None, **options):
        raise ValueError("aperture is entirely masked")

    module.measure_icl_fraction_canepa2025 = measure_icl_fraction_canepa2025
    monkeypatch.setitem(sys.modules, "measure_sb_cut", module)
    paths = shards.generate_shards("clusters", 1, 9, tmp_path / "nan", workers=1, progress=False, measure_sb=True)
    refs, _ = prep_data.index_cutouts(paths)
    with pytest.raises(prep_data.CutoutError, match="label 'f_icl_sb' is nan"):
        prep_data.read_labels(refs, "f_icl_sb")


def test_tidal_pairs_kind_writes_host_matched_twins(tmp_path):
    out = tmp_path / "pairs.h5"
    assert generate.main(["tidal_pairs", "--n", "2", "--seed", "5", "--distribution", "visible", "--out", str(out),
                          "--workers", "1", "--quiet"]) == 0
    with h5py.File(out, "r") as f:
        assert f["image"].shape == (4, 128, 128, 5)
        assert list(f["has_tidal"][()]) == [1, 0, 1, 0] and list(f["visible"][()]) == [1, 0, 1, 0]
        pair_ids = [value.decode() for value in f["pair_id"][()]]
        assert pair_ids[0] == pair_ids[1] != pair_ids[2] == pair_ids[3]
        images = f["image"][()]
    # The twins share the scene and the noise: far from the centre (no feature there) they agree.
    np.testing.assert_allclose(images[0, :4, :4], images[1, :4, :4], atol=1e-5)


def test_visible_distribution_is_for_tidal_pairs_only(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        generate.main(["tidal", "--n", "2", "--distribution", "visible", "--out", str(tmp_path / "t.h5"), "--quiet"])
    assert stopped.value.code == 2
    assert "--distribution visible applies to tidal_pairs only" in capsys.readouterr().err
