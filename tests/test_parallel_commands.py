"""Dask in the commands: measure_sb_cut, data.generate and nnclr_test.py on a local cluster give
the single-process outputs, and none of them imports Dask without --dask."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import common
import parallel

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client():
    with parallel.dask_client("local:2") as client:
        yield client


def _shard_files(folder):
    return sorted(path.name for path in pathlib.Path(folder).iterdir() if path.suffix == ".h5")


# ----------------------------------------------------------------------------------------
# measure_sb_cut


@pytest.fixture(scope="module")
def sb_inputs(tmp_path_factory):
    from measure_sb_cut.validate import write_synthetic_shard

    folder = tmp_path_factory.mktemp("sb")
    write_synthetic_shard(folder / "a_mocks.h5", 5, seed=3)
    (folder / "b_broken.h5").write_bytes(b"not an HDF5 file")
    write_synthetic_shard(folder / "c_mocks.h5", 2, seed=4)
    return folder


def test_measure_sb_cut_on_a_local_cluster_writes_the_single_process_csv(sb_inputs, tmp_path):
    from measure_sb_cut.__main__ import main

    common_options = [str(sb_inputs), "--method", "improved", "--no-reestimates"]
    assert main([*common_options, "--out", str(tmp_path / "single.csv"), "--workers", "1"]) == 1
    assert main([*common_options, "--out", str(tmp_path / "dask.csv"), "--dask", "local:2", "--partition-size", "2"]) == 1
    single = (tmp_path / "single.csv").read_text()
    assert single.count("\n") == 1 + 8 and "b_broken.h5: cannot read HDF5 file" in single
    assert (tmp_path / "dask.csv").read_text() == single


def test_measure_refs_on_a_client_gives_the_rows_in_order(sb_inputs, client):
    import prep_data
    from measure_sb_cut.measure import measure_refs

    refs, _ = prep_data.index_cutouts([sb_inputs / "a_mocks.h5"])
    options = {"reestimate_box_sizes": ()}
    single = list(measure_refs(refs, options=options, progress=False))
    # A redshift out of range for one cutout: its row's error, not a lost partition.
    catalogue = {refs[1].id: 0.9}
    on_cluster = list(measure_refs(refs, catalogue=catalogue, options=options, progress=False, client=client,
                                   partition_size=2))
    assert [row["id"] for row in on_cluster] == [ref.id for ref in refs]
    assert on_cluster[1]["error"].endswith("z must be in [0.1, 0.5], got 0.9")
    for index in (0, 2, 3, 4):
        assert on_cluster[index] == single[index]


# ----------------------------------------------------------------------------------------
# data.generate


@pytest.mark.parametrize("kind, n", [("clusters", 6), ("tidal", 4)])
def test_generate_on_a_local_cluster_writes_the_single_process_files(kind, n, tmp_path):
    from data import generate

    options = [kind, "--n", str(n), "--seed", "1", "--shard-size", "2", "--keep-shards", "--quiet"]
    assert generate.main([*options, "--out", str(tmp_path / "single.h5"), "--workers", "1"]) == 0
    assert generate.main([*options, "--out", str(tmp_path / "dask.h5"), "--dask", "local:2"]) == 0
    assert (tmp_path / "dask.h5").read_bytes() == (tmp_path / "single.h5").read_bytes()
    names = _shard_files(tmp_path / "single.h5.shards")
    assert len(names) == (n + 1) // 2 and _shard_files(tmp_path / "dask.h5.shards") == names
    for name in names:
        assert (tmp_path / "dask.h5.shards" / name).read_bytes() == (tmp_path / "single.h5.shards" / name).read_bytes()


def test_generate_on_a_client_renders_only_the_missing_shards(client, tmp_path):
    from data import shards

    single = shards.generate_shards("backgrounds", 5, 2, tmp_path / "single", workers=1, shard_size=2, progress=False)
    folder = tmp_path / "resumed"
    folder.mkdir()
    kept = pathlib.Path(single[1])
    (folder / kept.name).write_bytes(kept.read_bytes())
    os.utime(folder / kept.name, (1, 1))
    paths = shards.generate_shards("backgrounds", 5, 2, folder, shard_size=2, progress=False, client=client)
    assert [pathlib.Path(path).name for path in paths] == [pathlib.Path(path).name for path in single]
    assert os.stat(folder / kept.name).st_mtime == 1  # kept as it was
    for path, reference in zip(paths, single):
        assert pathlib.Path(path).read_bytes() == pathlib.Path(reference).read_bytes()


def test_shard_bytes_do_not_depend_on_when_the_dataset_objects_are_freed(tmp_path, monkeypatch):
    # A Dask worker's sampling profiler holds the frames of a running task for a moment, so a
    # dataset object can outlive its line; the file written must not change with that.
    import h5py

    import data.files

    images = np.random.default_rng(0).normal(size=(3, 224, 224)).astype(np.float16)
    masks = np.zeros((3, 224, 224), np.int32)
    arguments = (images, masks, ["a", "b", "c"], {"z": [0.1, 0.2, 0.3], "params": ["{}", "{}", "{}"]})
    data.files.write_stacked_hdf5(tmp_path / "freed.h5", *arguments)
    held = []
    create_dataset = h5py.Group.create_dataset
    monkeypatch.setattr(h5py.Group, "create_dataset", lambda self, *a, **k: held.append(create_dataset(self, *a, **k)))
    data.files.write_stacked_hdf5(tmp_path / "held.h5", *arguments)
    assert len(held) == 5
    assert (tmp_path / "held.h5").read_bytes() == (tmp_path / "freed.h5").read_bytes()


# ----------------------------------------------------------------------------------------
# nnclr_test.py


@pytest.fixture(scope="module")
def nnclr_run(tmp_path_factory):
    """A tidal file of 40 galaxies and an untrained tiny NNCLR run folder for it."""
    import nnclr_model
    import tidal_data

    folder = tmp_path_factory.mktemp("nnclr")
    rng = np.random.default_rng(0)
    has_tidal = np.arange(40) % 2
    images = rng.normal(0, 0.02, (40, 24, 24, 5)).astype(np.float32)
    images[has_tidal == 1, 4:8] += 0.1
    tidal_data.write_tidal_hdf5(folder / "tidal.h5", images, [f"g{i}" for i in range(40)],
                                {"has_tidal": has_tidal, "feature_type": ["stream" if flag else "none" for flag in has_tidal]})
    config = nnclr_model.TINY_CONFIG
    encoder = nnclr_model.build_encoder(config)
    run_dir = folder / "run"
    run_dir.mkdir()
    nnclr_model.save_encoder(encoder, run_dir / "encoder.keras")
    classifier = nnclr_model.build_classifier(encoder, config, seed=0)
    dense = classifier.get_layer("tidal_probability")
    # Random weights, so that the scores differ from galaxy to galaxy (a fresh layer's do not).
    dense.set_weights([rng.normal(0, 1, weights.shape).astype(np.float32) for weights in dense.get_weights()])
    common.save_keras_model(classifier, run_dir / "classifier.keras")
    nnclr_model.save_config(config, run_dir / "config.json", band_scale=[0.02] * 5, softening=3.0, data="test",
                            settings={"split_sizes": [8, 2, 4], "seed": 0})
    return folder / "tidal.h5", run_dir


def test_nnclr_test_on_a_local_cluster_gives_the_single_process_outputs(nnclr_run, tmp_path):
    import nnclr_test

    tidal_file, run_dir = nnclr_run
    argv = [str(tidal_file), "--run-dir", str(run_dir), "--label-efficiency", "--label-counts", "4", "--label-seeds", "1",
            "--baseline-epochs", "1", "--similar-to", "g3", "--top-k", "5"]
    assert nnclr_test.main([*argv, "--out-dir", str(tmp_path / "single")]) == 0
    assert nnclr_test.main([*argv, "--out-dir", str(tmp_path / "dask"), "--dask", "local:2",
                            "--partition-size", "3"]) == 0
    single, dask = tmp_path / "single", tmp_path / "dask"
    # float32 scores through other batch compositions: equal within 1e-6.
    scores = np.load(single / "scores.npy")
    assert len(np.unique(scores)) == len(scores) == 8
    np.testing.assert_allclose(np.load(dask / "scores.npy"), scores, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.load(dask / "labels.npy"), np.load(single / "labels.npy"))
    metrics, reference = (json.loads((folder / "metrics.json").read_text()) for folder in (dask, single))
    for key in ("auc", "completeness_at_contamination_fpr", "completeness_at_contamination_one_minus_precision",
                "n_test", "n_test_tidal", "similarity_tidal_fraction_top_k"):
        assert metrics[key] == pytest.approx(reference[key], abs=1e-6), key
    efficiency, reference_efficiency = (json.loads((folder / "label_efficiency.json").read_text()) for folder in (dask, single))
    assert len(efficiency) == len(reference_efficiency) == 1
    for key, value in reference_efficiency[0].items():
        assert efficiency[0][key] == (pytest.approx(value, abs=1e-6) if not isinstance(value, dict) else value), key
    similar, reference_similar = (json.loads((folder / "similar_to_g3.json").read_text()) for folder in (dask, single))
    assert [row["id"] for row in similar["top"]] == [row["id"] for row in reference_similar["top"]]
    np.testing.assert_allclose([row["similarity"] for row in similar["top"]],
                               [row["similarity"] for row in reference_similar["top"]], atol=1e-5)
    assert (dask / "similar_to_g3.png").stat().st_size > 0


def test_score_on_cluster_matches_the_models_in_this_process(nnclr_run, client):
    import nnclr_model
    import tidal_data

    tidal_file, run_dir = nnclr_run
    source = tidal_data.tidal_source_from_hdf5([tidal_file])
    config, extra = nnclr_model.load_config(run_dir / "config.json")
    rows = np.array([7, 2, 30, 11, 5, 19, 0])  # any order, partitions of unequal sizes
    images = tidal_data.tidal_stretch(source.read_labelled(rows), np.asarray(extra["band_scale"], np.float32))
    classifier = nnclr_model.load_classifier(run_dir / "classifier.keras", config)
    encoder = nnclr_model.load_encoder(run_dir / "encoder.keras", config)
    computed = nnclr_model.score_on_cluster(client, source, rows, run_dir, partition_size=3, progress=False)
    np.testing.assert_allclose(computed["scores"], classifier.predict(images, verbose=0)[:, 0], atol=1e-6)
    np.testing.assert_allclose(computed["representations"], nnclr_model.representations(encoder, images, config),
                               rtol=1e-5, atol=1e-6)
    # A source held in memory (TFDS) sends the images with the tasks instead.
    in_memory = dataclasses.replace(source, catalogue=None)
    again = nnclr_model.score_on_cluster(client, in_memory, rows, run_dir, ("scores",), partition_size=4, progress=False)
    np.testing.assert_array_equal(again["scores"], computed["scores"])


# ----------------------------------------------------------------------------------------
# Without --dask


def test_no_command_imports_dask_without_the_flag(sb_inputs, nnclr_run, tmp_path):
    tidal_file, run_dir = nnclr_run
    code = f"""
import sys

def no_dask(name):
    assert "dask" not in sys.modules and "distributed" not in sys.modules, name + " imported Dask"

from measure_sb_cut.__main__ import main as measure
assert measure([{str(sb_inputs / "c_mocks.h5")!r}, "--out", {str(tmp_path / "m.csv")!r}, "--workers", "1"]) == 0
no_dask("measure_sb_cut")
from data import generate
assert generate.main(["backgrounds", "--n", "2", "--shard-size", "1", "--workers", "1", "--quiet",
                      "--out", {str(tmp_path / "g.h5")!r}]) == 0
no_dask("data.generate")
import nnclr_test
assert nnclr_test.main([{str(tidal_file)!r}, "--run-dir", {str(run_dir)!r}, "--test-all",
                        "--out-dir", {str(tmp_path / "t")!r}]) == 0
no_dask("nnclr_test.py")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "m.csv").exists() and (tmp_path / "g.h5").exists() and (tmp_path / "t" / "metrics.json").exists()


def test_benchmark_smoke():
    command = [sys.executable, str(ROOT / "bench" / "bench_dask.py"), "--n", "4", "--partition-size", "2", "--tiny",
               "--noop-tasks", "5", "--workers", "1", "--machines", "10"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("machine: ")
    for line in ("predict, no Dask (one process): 4 cutouts", "measure_sb_cut, --dask local:1: 4 cutouts",
                 "ms per partition", "estimate for 500,000 clusters", "M =   10:"):
        assert line in result.stdout, line
