"""The demo runner and the script that made its example data."""

import dataclasses
import importlib.util
import json
import pathlib
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

import common
import prep_data
import tidal_data

ROOT = pathlib.Path(__file__).resolve().parents[1]
GALAXIES = ROOT / "demos" / "data" / "galaxies.h5"


def load_script(name):
    """Import a script of demos/ as a module."""
    spec = importlib.util.spec_from_file_location(f"demo_{name}", ROOT / "demos" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_nnclr_run(run_dir):
    """An untrained NNCLR run folder in nnclr_train.py's layout, for the 128 px example galaxies."""
    import nnclr_model

    config = dataclasses.replace(nnclr_model.TINY_CONFIG, image_size=128)
    encoder = nnclr_model.build_encoder(config)
    classifier = nnclr_model.build_classifier(encoder, config, seed=0)
    run_dir.mkdir(parents=True)
    nnclr_model.save_encoder(encoder, run_dir / "encoder.keras")
    common.save_keras_model(classifier, run_dir / "classifier.keras")
    nnclr_model.save_config(config, run_dir / "config.json", band_scale=[0.02, 0.026, 0.03, 0.075, 0.1], softening=3.0,
                            data="training galaxies", settings={"split_sizes": [300, 30, 50], "seed": 0})
    return run_dir


def test_example_clusters_are_readable_hsc_style_fits():
    refs, errors = prep_data.index_cutouts([ROOT / "demos" / "data" / "clusters"])
    truth = pd.read_csv(ROOT / "demos" / "data" / "clusters_truth.csv", dtype={"id": str})
    assert errors == [] and [ref.id for ref in refs] == truth["id"].tolist()
    cutout = prep_data.read_cutout(refs[0])
    assert cutout.meta["z"] == round(truth["z"][0], 4)
    assert prep_data.prepare_cutout(cutout).shape == (224, 224, 1)


def test_example_galaxies_are_balanced_and_reproducible():
    from data import shards

    make_example_data = load_script("make_example_data")
    catalogue = tidal_data.index_tidal_hdf5([GALAXIES])
    n_per_class = make_example_data.N_GALAXIES_PER_CLASS
    assert catalogue.image_shape == (128, 128, 5) and len(catalogue) == 2 * n_per_class
    assert catalogue.has_tidal.tolist() == [1, 0] * n_per_class
    assert ((catalogue.feature_type == "none") == (catalogue.has_tidal == 0)).all()
    with h5py.File(GALAXIES, "r") as f:
        assert f["image"].dtype == np.float16 and f.attrs["bands"] == "grizy"
    # Galaxies 2 and 3 are the generator's visible pair 1 of the seed: remade alone, they match to
    # float16 rounding, and the twins differ by the feature alone.
    stored = tidal_data.read_tidal_images(catalogue, [2, 3])
    twins = shards.render_cutouts("tidal_pairs", make_example_data.GALAXY_SEED, 1, "visible")
    for position, (image, _, truth, _) in enumerate(twins):
        np.testing.assert_allclose(stored[position], image, rtol=1e-3, atol=1e-4)
        assert truth["feature_type"] == catalogue.feature_type[2 + position]
    assert twins[0][2]["visible"] == 1
    with h5py.File(GALAXIES, "r") as f:
        pair_ids = [value.decode() for value in f["pair_id"][()]]
    assert pair_ids[2] == pair_ids[3] != pair_ids[0]


def test_finetune_clusters_have_labels_in_range():
    import finetune

    ids, images, labels = finetune.load_clusters([ROOT / "demos" / "data" / "finetune_clusters.h5"], "f_icl_sb", image_size=32)
    assert len(ids) == load_script("make_example_data").N_FINETUNE_CLUSTERS and images.shape[1:] == (32, 32, 1)
    assert ((labels > 0) & (labels < 1)).all()


def test_make_example_data_help():
    result = subprocess.run([sys.executable, str(ROOT / "demos" / "make_example_data.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--galaxies-per-class" in result.stdout


def test_make_example_data_writes_fits_and_truth(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "demos" / "make_example_data.py"), "--n", "1", "--galaxies-per-class", "1",
                             "--finetune-clusters", "1", "--workers", "1", "--out-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    with fits.open(tmp_path / "clusters" / "example00.fits.gz") as hdus:
        assert [hdu.name for hdu in hdus] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
        assert hdus["MASK"].header["MP_BRIGHT_OBJECT"] == 9
    truth = pd.read_csv(tmp_path / "clusters_truth.csv")
    assert 0 < truth["f_icl_sb_ideal"][0] < 1
    galaxies = tidal_data.index_tidal_hdf5([tmp_path / "galaxies.h5"])
    assert galaxies.ids.tolist() == ["galaxy00", "galaxy01"] and galaxies.has_tidal.tolist() == [1, 0]
    with h5py.File(tmp_path / "finetune_clusters.h5", "r") as f:
        assert f["image"].shape == (1, 224, 224) and np.isfinite(f["f_icl_sb"][()]).all()


def test_make_example_data_rejects_negative_counts(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "demos" / "make_example_data.py"), "--galaxies-per-class", "-1",
                             "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--galaxies-per-class must be >= 0" in result.stderr


def test_tidal_step_is_skipped_without_a_run(tmp_path):
    run_demo = load_script("run_demo")
    log = []
    assert run_demo.run_tidal(tmp_path / "results", log, run_dir=tmp_path / "no_run") is None
    assert log[0]["status"] == "skipped" and log[0]["step"] == "tidal features"
    assert str(tmp_path / "no_run" / "encoder.keras") in log[0]["output"]
    page = run_demo.write_index(tmp_path, log, None).read_text()
    assert "tidal features skipped" in page


def test_nnclr_test_all_scores_every_example_galaxy(tmp_path):
    run_dir = tiny_nnclr_run(tmp_path / "run")
    out = tmp_path / "test"
    command = [sys.executable, str(ROOT / "nnclr_test.py"), str(GALAXIES), "--run-dir", str(run_dir), "--test-all",
               "--out-dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_test"] == 32 and metrics["n_test_tidal"] == 16
    result = subprocess.run(command + ["--label-efficiency"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "cannot be combined with --test-all" in result.stderr


def test_tidal_step_writes_roc_metrics_and_gallery(tmp_path):
    run_demo = load_script("run_demo")
    run_dir = tiny_nnclr_run(tmp_path / "run")
    out_dir = tmp_path / "results"
    log = []
    metrics = run_demo.run_tidal(out_dir, log, run_dir=run_dir)
    assert log[0]["status"] == 0, log[0]["output"]
    assert metrics["n_test"] == 32 and metrics["n_test_tidal"] == 16 and 0 <= metrics["auc"] <= 1
    search = json.loads((out_dir / "tidal" / "similar_to_galaxy00.json").read_text())
    assert len(search["top"]) == run_demo.TOP_K and search["pool_size"] == 32
    assert metrics["similarity_tidal_fraction_top_k"] == pytest.approx(np.mean([row["has_tidal"] for row in search["top"]]))
    page = run_demo.write_index(out_dir, log, None, metrics).read_text()
    assert 'src="tidal/roc.png"' in page and 'src="tidal/similar_to_galaxy00.png"' in page
    assert (f"AUC {metrics['auc']:.3f} on 32 example galaxies in 16 host-matched pairs (16 with tidal features), next to "
            f"the classical baselines: host flux {metrics['baselines']['host_flux']['auc']:.3f}") in page
    assert metrics["baselines"]["host_flux"]["auc"] == pytest.approx(0.5, abs=0.05)  # twins share the host
    assert metrics["example_tidal_fraction"] == 0.5 and metrics["top_k"] == run_demo.TOP_K
    assert (f"{metrics['similarity_tidal_fraction_top_k']:.0%} of the {run_demo.TOP_K} galaxies most similar to the query "
            "have tidal features (50% of all example galaxies do)") in page


def test_demo_writes_results_page(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "demos" / "run_demo.py"), "--out-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"open {tmp_path / 'index.html'}" in result.stdout
    page = (tmp_path / "index.html").read_text()
    assert "icl_comparison.png" in page and "sb_plots/" in page
    if load_script("run_demo").missing_nnclr_files(ROOT / "checkpoints" / "nnclr"):
        assert "tidal features skipped" in page
    else:
        assert 'src="tidal/roc.png"' in page and (tmp_path / "tidal" / "metrics.json").is_file()
    table = pd.read_csv(tmp_path / "icl_comparison.csv")
    assert len(table) == 8 and table["f_icl_sb"].between(0, 1).all()
