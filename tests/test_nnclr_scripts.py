"""Tidal data preparation and smoke tests of nnclr_train.py and nnclr_test.py on a tiny HDF5 file."""

import dataclasses
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from astropy.stats import mad_std

import common
import data.tidal_datasets
import nnclr_model
import nnclr_test
import nnclr_train
import prep_data
import tidal_data



def _tidal_images(count, size=24, bands=5, seed=0):
    """A bright galaxy with sky noise; tidal galaxies get a faint band across the image."""
    rng = np.random.default_rng(seed)
    has_tidal = np.arange(count) % 2
    rows, columns = np.mgrid[:size, :size]
    galaxy = np.exp(-((rows - size / 2) ** 2 + (columns - size / 2) ** 2) / 8.0)
    images = rng.normal(0, 0.02, (count, size, size, bands)) + galaxy[None, :, :, None]
    images[has_tidal == 1, size // 6 : size // 3] += 0.1
    return images.astype(np.float32), has_tidal


def _write(path, count=40, size=24, bands=5, has_tidal=None, id_prefix="g"):
    images, truth = _tidal_images(count, size, bands)
    has_tidal = truth if has_tidal is None else has_tidal
    ids = [f"{id_prefix}{i}" for i in range(count)]
    kinds = ["stream" if flag else "none" for flag in has_tidal]
    if bands == 5:
        tidal_data.write_tidal_hdf5(path, images, ids, {"has_tidal": has_tidal, "feature_type": kinds})
    else:
        import h5py

        with h5py.File(path, "w") as f:
            f["image"] = images
            f["has_tidal"] = has_tidal
    return path


def _write_pairs(path, pairs=12, size=24, seed=1, visible=True, drop=None, host_boost=1.0):
    """A file of host-matched pairs: each scene (a host of its own brightness, its own noise)
    written twice, once plus a faint band far from the core (has_tidal 1) and once without (0).
    ``host_boost`` brightens the host of the twin with the feature (twins that are not host-matched)."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[:size, :size]
    galaxy = np.exp(-((rows - (size - 1) / 2) ** 2 + (columns - (size - 1) / 2) ** 2) / 8.0)
    feature = np.zeros((size, size))
    feature[1:4, 4:-4] = 1.0  # >= 7.5 px from the centre: outside the host-flux aperture
    images, has_tidal, pair_ids, kinds, sb, flags = [], [], [], [], [], []
    for pair in range(pairs):
        scene = rng.uniform(0.5, 3.0) * galaxy[..., None] + rng.normal(0, 0.02, (size, size, 5))
        amplitude = rng.uniform(0.03, 0.2)
        for label in (1, 0):
            boost = host_boost if label else 1.0
            images.append(scene + (boost - 1) * galaxy[..., None] + label * amplitude * feature[..., None])
            has_tidal.append(label)
            pair_ids.append(f"pair{pair}")
            kinds.append(("shell", "stream")[pair % 2] if label else "none")
            sb.append(27.0 - 5 * amplitude if label else np.nan)
            flags.append(int(label and amplitude > 0.1))
    columns = {"has_tidal": np.array(has_tidal), "feature_type": kinds, "feature_sb": np.array(sb), "pair_id": pair_ids}
    if visible:
        columns["visible"] = np.array(flags)
    ids = [f"{pair}_{'with' if label else 'without'}" for pair, label in zip(pair_ids, has_tidal)]
    keep = np.ones(len(ids), bool) if drop is None else ~np.isin(np.arange(len(ids)), drop)
    columns = {name: np.asarray(values)[keep] if not isinstance(values, list) else [v for v, k in zip(values, keep) if k]
               for name, values in columns.items()}
    tidal_data.write_tidal_hdf5(path, np.asarray(images, np.float32)[keep], [i for i, k in zip(ids, keep) if k], columns)
    return path


@pytest.fixture(scope="module")
def tidal_file(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("data") / "tidal.h5")


class _Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def trained_run(tidal_file, tmp_path_factory):
    """A run stopped after its first NNCLR epoch, then started again and finished."""
    import keras

    out = tmp_path_factory.mktemp("run")
    argv = [str(tidal_file), "--out-dir", str(out), "--tiny"]

    class StopAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise _Interrupted()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "epoch_progress", lambda description: StopAfterFirstEpoch())
        with pytest.raises(_Interrupted):
            nnclr_train.main(argv)
    assert (out / "backup_nnclr").is_dir() and not (out / "encoder.keras").exists()
    assert nnclr_train.main(argv) == 0
    return out


# ----------------------------------------------------------------------------------------
# Data preparation


def test_band_scale_is_mad_std_of_the_first_images_per_band():
    rng = np.random.default_rng(0)
    sigmas = np.array([0.01, 0.02, 0.03, 0.04, 0.05])
    images = rng.normal(0, 1, (30, 16, 16, 5)) * sigmas
    images[20:] *= 100  # beyond the first n_images: must not count
    scale = tidal_data.tidal_band_scale(images, n_images=20)
    np.testing.assert_allclose(scale, mad_std(images[:20].reshape(-1, 5), axis=0), rtol=1e-6)
    np.testing.assert_allclose(scale, sigmas, rtol=0.05)


def test_band_scale_rejects_a_constant_band():
    images = np.random.default_rng(0).normal(size=(4, 8, 8, 5))
    images[..., 3] = 1.0
    with pytest.raises(ValueError, match=r"band 3 has MAD-std 0.0 over the first 4 images; the scale must be finite and > 0"):
        tidal_data.tidal_band_scale(images)


def test_stretch_is_arcsinh_of_counts_over_three_scales_and_keeps_its_input():
    images = np.random.default_rng(1).normal(size=(2, 4, 4, 5)).astype(np.float32)
    original = images.copy()
    scale = np.array([0.5, 1, 2, 3, 4], np.float32)
    np.testing.assert_allclose(tidal_data.tidal_stretch(images, scale), np.arcsinh(images / scale / 3), rtol=1e-6)
    np.testing.assert_array_equal(images, original)


def test_splits_are_balanced_disjoint_and_reproducible():
    labels = np.array([0] * 50 + [1] * 20)
    splits = tidal_data.tidal_classifier_splits(labels, (10, 3, 5), seed=3)
    for name, size in zip(tidal_data.TIDAL_SPLITS, (10, 3, 5)):
        assert (labels[splits[name]] == 0).sum() == size and (labels[splits[name]] == 1).sum() == size
    together = np.concatenate(list(splits.values()))
    assert len(np.unique(together)) == len(together)
    again = tidal_data.tidal_classifier_splits(labels, (10, 3, 5), seed=3)
    assert all(np.array_equal(splits[name], again[name]) for name in splits)
    other = tidal_data.tidal_classifier_splits(labels, (10, 3, 5), seed=4)
    assert not np.array_equal(splits["train"], other["train"])


def test_splits_need_both_classes():
    with pytest.raises(ValueError, match=r"the labelled set has one class only \(label 1 for all 12 galaxies\)"):
        tidal_data.tidal_classifier_splits(np.ones(12, int), (2, 1, 1))


def test_splits_need_enough_galaxies_per_class():
    with pytest.raises(ValueError, match=r"class 1 has 5 galaxies, the splits need 6 per class \(train 3 \+ validation 1 \+ test 2\)"):
        tidal_data.tidal_classifier_splits(np.array([0] * 10 + [1] * 5), (3, 1, 2))


@pytest.mark.parametrize(
    "shape, message",
    [
        ((24, 24), r"images must be \(H, W, 5\) images, got shape \(24, 24\)"),
        ((2, 24, 24, 3), r"images must have 5 bands \(grizy\) in the last axis, got shape \(2, 24, 24, 3\)"),
        ((2, 18, 18, 5), r"images are 18x18 px, smaller than the crop: need at least 20x20"),
    ],
)
def test_bad_image_shapes_are_named(shape, message):
    with pytest.raises(ValueError, match=message):
        tidal_data.check_tidal_shape(shape, min_size=20)


def test_hdf5_round_trip_keeps_order(tmp_path):
    path = _write(tmp_path / "tidal.h5", count=10)
    catalogue = tidal_data.index_tidal_hdf5(path)
    assert len(catalogue) == 10 and catalogue.image_shape == (24, 24, 5)
    images, has_tidal = _tidal_images(10)
    np.testing.assert_array_equal(catalogue.has_tidal, has_tidal)
    np.testing.assert_array_equal(tidal_data.read_tidal_images(catalogue, [7, 2, 5]), images[[7, 2, 5]])


def test_hdf5_with_three_bands_is_rejected(tmp_path):
    path = _write(tmp_path / "rgb.h5", count=4, bands=3)
    with pytest.raises(prep_data.CutoutError, match=r"images must have 5 bands \(grizy\)"):
        tidal_data.index_tidal_hdf5(path)


def test_unlabelled_stream_is_stretched_and_batched(tmp_path):
    path = _write(tmp_path / "tidal.h5", count=10)
    source = tidal_data.tidal_source_from_hdf5(path)
    scale = np.full(5, 0.02, np.float32)
    batches = list(tidal_data.tidal_unlabelled_dataset(source.unlabelled(), scale, 4, shuffle_buffer=1).as_numpy_iterator())
    assert [batch.shape for batch in batches] == [(4, 24, 24, 5)] * 2
    images, _ = _tidal_images(10)
    np.testing.assert_allclose(batches[0], tidal_data.tidal_stretch(images[:4], scale), rtol=1e-5)


def test_pair_and_visibility_columns_are_read_or_default(tmp_path):
    paired = tidal_data.index_tidal_hdf5(_write_pairs(tmp_path / "pairs.h5", pairs=4))
    assert list(paired.pair_id) == [f"pair{i // 2}" for i in range(8)]
    assert list(paired.has_tidal) == [1, 0] * 4 and set(paired.visible[1::2]) == {0}
    assert np.isnan(paired.feature_snr).all() and np.isnan(paired.feature_light_fraction).all()
    subset = tidal_data.catalogue_subset(paired, [3, 0])
    assert list(subset.pair_id) == ["pair1", "pair0"] and list(subset.visible) == [0, paired.visible[0]]
    source = tidal_data.tidal_source_from_hdf5(tmp_path / "pairs.h5")
    assert {"pair_id", "visible"} <= set(source.truth) and "feature_snr" not in source.truth
    plain = tidal_data.index_tidal_hdf5(_write(tmp_path / "plain.h5", count=6))
    assert list(plain.pair_id) == [""] * 6 and list(plain.visible) == [-1] * 6
    assert np.isnan(plain.feature_contrast).all()
    assert set(tidal_data.tidal_source_from_hdf5(tmp_path / "plain.h5").truth) == {"feature_type", "feature_sb"}

    import h5py

    with h5py.File(tmp_path / "pairs.h5", "a") as f:  # the generator's float columns
        f["feature_snr"] = np.where(paired.has_tidal == 1, 12.5, np.nan)
    source = tidal_data.tidal_source_from_hdf5(tmp_path / "pairs.h5")
    np.testing.assert_array_equal(source.truth["feature_snr"][:2], [12.5, np.nan])


def test_check_pairs_finds_each_twin_and_names_the_first_bad_pair():
    twins = tidal_data.check_pairs(["b", "a", "a", "b"], [0, 1, 0, 1], "pairs.h5")
    assert list(twins) == [3, 2, 1, 0]
    cases = [
        (["a", "b", "a", "c"], [1, 1, 0, 0], "pairs.h5: pair_id 'b' appears once, not twice"),
        (["a", "a", "a", "b", "b"], [1, 0, 0, 1, 0], "pairs.h5: pair_id 'a' appears 3 times, not twice"),
        (["a", "a", "b", "b"], [1, 0, 0, 0], "pairs.h5: pair_id 'b' has both twins with has_tidal=0"),
        (["a", "a", ""], [1, 0, 1], "pairs.h5: 1 of 3 galaxies have no pair_id (e.g. galaxy g2)"),
    ]
    for pair_ids, labels, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)) as error:
            tidal_data.check_pairs(pair_ids, labels, "pairs.h5", ids=np.array(["g0", "g1", "g2", "g3", "g4"][:len(labels)]))
        assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------
# Completeness at fixed contamination


def test_completeness_under_both_contamination_definitions():
    # Scores in decreasing order: T T F T F F T F (T = tidal).
    labels = np.array([1, 1, 0, 1, 0, 0, 1, 0])
    scores = np.linspace(1, 0.1, 8)
    result = nnclr_model.completeness_at_contamination(labels, scores, 0.25)
    # FPR <= 0.25 allows one false positive of four: the top 4 -> 3 of 4 tidal found.
    assert result["fpr"] == pytest.approx(0.75)
    # 1 - precision <= 0.25: the top 4 hold 3 tidal and 1 false (exactly 0.25).
    assert result["one_minus_precision"] == pytest.approx(0.75)
    strict = nnclr_model.completeness_at_contamination(labels, scores, 0.1)
    assert strict["fpr"] == pytest.approx(0.5) and strict["one_minus_precision"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------
# Scripts


@pytest.mark.parametrize("script", [nnclr_train, nnclr_test])
def test_help(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "INPUT" in out and "--tfds-dir" in out and "--out-dir" in out and "--verbose" in out


def test_train_writes_every_promised_file(trained_run):
    for name in ("encoder.keras", "classifier.keras", "classifier_loss.png", "train_loss.npy", "val_loss.npy",
                 "nnclr_history.json", "splits.json", "config.json"):
        assert (trained_run / name).stat().st_size > 0, name
    for name in ("train_loss.npy", "val_loss.npy"):
        loss = np.load(trained_run / name)
        assert loss.shape == (2,) and np.isfinite(loss).all() and (loss > 0).all()
    # The run resumed after its first epoch, so the second start trained the second epoch only.
    history = json.loads((trained_run / "nnclr_history.json").read_text())
    assert len(history["c_loss"]) == 1
    config, extra = nnclr_model.load_config(trained_run / "config.json")
    assert config.input_shape == (24, 24, 5)
    assert len(extra["band_scale"]) == 5 and min(extra["band_scale"]) > 0
    splits = json.loads((trained_run / "splits.json").read_text())
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [16, 4, 8]
    assert not list(trained_run.glob("backup_*")) and not list(trained_run.glob(".*partial*"))


def test_evaluation_writes_every_promised_file(trained_run, tidal_file, tmp_path):
    out = tmp_path / "test"
    argv = [str(tidal_file), "--run-dir", str(trained_run), "--out-dir", str(out), "--label-efficiency",
            "--label-counts", "4", "--label-seeds", "1", "--baseline-min-steps", "4", "--baseline-max-steps", "8",
            "--similar-to", "g3", "--top-k", "5"]
    assert nnclr_test.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["auc"] <= 1 and metrics["n_test"] == 8 and metrics["n_test_tidal"] == 4
    assert not metrics["paired"] and metrics["auc"] == metrics["auc_all"] and "auc_visible" not in metrics
    assert set(metrics["baselines"]) == {"host_flux", "rotation_residual", "boosting"}
    for name, entry in metrics["baselines"].items():
        assert 0 <= entry["auc"] <= 1 and len(np.load(out / f"baseline_{name}.npy")) == 8
    for key in ("completeness_at_contamination_fpr", "completeness_at_contamination_one_minus_precision"):
        assert 0 <= metrics[key] <= 1
    fpr, tpr = np.load(out / "fpr.npy"), np.load(out / "tpr.npy")
    assert fpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1 and (np.diff(fpr) >= 0).all()
    assert len(np.load(out / "thresholds.npy")) == len(fpr)
    for name in ("roc.png", "label_efficiency.png", "similar_to_g3.png"):
        assert (out / name).stat().st_size > 0
    rows = json.loads((out / "label_efficiency.json").read_text())
    assert [(row["labels_per_class"], row["seed"]) for row in rows] == [(4, 0)]
    assert all(0 <= row[f"{key}_auc"] <= 1 for row in rows
               for key in ("nnclr_probe", "untrained_probe", "nnclr_finetuned", "supervised"))
    assert all(4 <= row[f"{key}_steps"] <= 8 and 1 <= row[f"{key}_best_step"] <= row[f"{key}_steps"]
               for row in rows for key in ("nnclr_finetuned", "supervised"))
    [summary] = metrics["label_efficiency_summary"]
    assert summary["labels_per_class"] == 4 and summary["nnclr_probe_auc"]["mean"] == rows[0]["nnclr_probe_auc"]
    similar = json.loads((out / "similar_to_g3.json").read_text())
    assert len(similar["top"]) == 5 and "g3" not in [row["id"] for row in similar["top"]]
    similarities = [row["similarity"] for row in similar["top"]]
    assert similarities == sorted(similarities, reverse=True)
    assert similar["tidal_fraction_top_k"] == pytest.approx(np.mean([row["has_tidal"] for row in similar["top"]]))


def test_independent_test_data_is_the_whole_test_set(trained_run, tidal_file, tmp_path):
    independent = _write(tmp_path / "independent.h5", count=12, id_prefix="new")
    out = tmp_path / "test"
    argv = [str(tidal_file), "--run-dir", str(trained_run), "--test-data", str(independent), "--out-dir", str(out),
            "--label-efficiency", "--label-counts", "3", "--label-seeds", "1", "--baseline-epochs", "1"]
    assert nnclr_test.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_test"] == 12 and metrics["n_test_tidal"] == 6 and "independent.h5" in metrics["data"]
    assert len(np.load(out / "scores.npy")) == 12
    [stream] = metrics["by_feature"]["feature_type"]
    assert stream["feature_type"] == "stream" and stream["n"] == 6
    assert metrics["by_feature"]["feature_sb"] == []  # the file has no feature_sb column

    import h5py

    images, has_tidal = _tidal_images(12)
    with h5py.File(tmp_path / "no_truth.h5", "w") as f:  # labels by eye: no mock truth to break down by
        f["image"], f["has_tidal"], f["id"] = images, has_tidal, np.array([f"eye{i}" for i in range(12)], dtype="S")
    argv[argv.index(str(independent))] = str(tmp_path / "no_truth.h5")
    argv.remove("--label-efficiency")
    assert nnclr_test.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_test"] == 12 and "by_feature" not in metrics


def test_pair_file_is_evaluated_as_pairs_next_to_the_baselines(trained_run, tmp_path, capsys):
    pairs = _write_pairs(tmp_path / "pairs.h5", pairs=12)
    out = tmp_path / "pairs"
    argv = [str(pairs), "--run-dir", str(trained_run), "--test-all", "--out-dir", str(out)]
    assert nnclr_test.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["paired"] and metrics["n_pairs"] == 12 and metrics["headline"] == "all"
    assert set(metrics["baselines"]) == {"host_flux", "rotation_residual"}  # no training split: no boosted trees
    host = metrics["baselines"]["host_flux"]
    assert abs(host["auc"] - 0.5) <= 0.05 and abs(host["auc_visible"] - 0.5) <= 0.05 and "warnings" not in metrics
    for entry in metrics["baselines"].values():
        assert 0 <= entry["auc"] <= 1 and 0 <= entry["completeness_at_contamination_fpr"] <= 1
    assert metrics["auc"] == metrics["auc_all"] and 0 <= metrics["auc_visible"] <= 1
    rows = sum((metrics["by_feature"][key] for key in ("feature_type", "feature_sb", "visibility")), [])
    assert all(abs(row["baselines"]["host_flux"]["auc"] - 0.5) <= 0.05 for row in rows)
    assert [row["visible"] for row in metrics["by_feature"]["visibility"]] == [True, False]
    printed = capsys.readouterr().out
    assert re.search(r"test AUC \d\.\d{3} \(host flux alone 0\.5\d\d, rotation residual \d\.\d{3}\) on 12 host-matched pairs",
                     printed)
    assert re.search(r"visible: +\d+ tidal, AUC .* \(host flux alone 0\.500, rotation residual", printed)
    np.testing.assert_array_equal(np.load(out / "baseline_host_flux.npy")[0::2], np.load(out / "baseline_host_flux.npy")[1::2])

    assert nnclr_test.main([*argv, "--visible-only"]) == 0
    visible = json.loads((out / "metrics.json").read_text())
    shown = np.load(out / "headline.npy")
    assert visible["headline"] == "visible" and visible["auc"] == visible["auc_visible"] == metrics["auc_visible"]
    assert visible["n_headline"] == 2 * visible["n_headline_tidal"] == shown.sum() and 0 < shown.sum() < 24
    assert visible["auc_all"] == metrics["auc_all"]

    unmatched = _write_pairs(tmp_path / "unmatched.h5", pairs=12, host_boost=1.5)
    assert nnclr_test.main([str(unmatched), *argv[1:]]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["baselines"]["host_flux"]["auc"] > 0.55
    assert "the twins differ in more than their tidal feature" in metrics["warnings"][0]


@pytest.mark.parametrize("case, message", [
    ("one_twin_missing", "pairs.h5: pair_id 'pair2' appears once, not twice"),
    ("one_class", "one_class.h5: the labelled set has one class only (label 1 for all 40 galaxies)"),
    ("visible_only_without_visibility", "--visible-only: the test galaxies have no 'visible' column"),
])
def test_bad_test_files_are_one_line(trained_run, tmp_path, capsys, case, message):
    if case == "one_twin_missing":
        path = _write_pairs(tmp_path / "pairs.h5", pairs=6, drop=[5])
    elif case == "one_class":
        path = _write(tmp_path / "one_class.h5", has_tidal=np.ones(40, int))
    else:
        path = _write_pairs(tmp_path / "pairs.h5", pairs=6, visible=False)
    argv = [str(path), "--run-dir", str(trained_run), "--test-all", "--out-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        nnclr_test.main(argv + (["--visible-only"] if case.startswith("visible") else []))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_detection_by_feature_separates_bright_from_faint_features():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], [400, 200])
    sb = np.concatenate([np.full(400, np.nan), np.tile([25.0, 27.0], 100)])
    kinds = np.concatenate([np.full(400, "none"), np.tile(["shell", "stream"], 100)])
    scores = rng.uniform(0, 1, 600)
    scores[sb == 25.0] += 1  # bright features are found, faint ones score like galaxies without
    result = nnclr_test.detection_by_feature(labels, scores, {"feature_type": kinds, "feature_sb": sb}, sb_bins=2)
    bright, faint = result["feature_sb"]
    assert (bright["sb_min"], faint["sb_max"]) == (25.0, 27.0) and bright["n"] == faint["n"] == 100
    assert bright["auc"] == 1.0 and bright["completeness"] == 1.0
    assert abs(faint["auc"] - 0.5) < 0.1 and faint["completeness"] < 0.4
    assert [row["feature_type"] for row in result["feature_type"]] == ["shell", "stream"]
    assert result["feature_type"][0]["auc"] == 1.0


def test_on_pairs_every_bin_is_scored_against_the_twins_of_its_galaxies():
    rng = np.random.default_rng(2)
    host = np.repeat(rng.uniform(0, 1, 50), 2)  # a host-only statistic: the same for both twins
    labels = np.tile([1, 0], 50)
    twins = tidal_data.check_pairs(np.repeat([f"p{i}" for i in range(50)], 2), labels, "pairs")
    sb = np.where(labels == 1, np.repeat(rng.uniform(24, 28, 50), 2), np.nan)
    truth = {"feature_type": np.where(labels == 1, np.tile(["shell", "stream"], 50), "none"), "feature_sb": sb,
             "visible": np.where(labels == 1, (sb < 26).astype(int), 0)}
    scores = host + labels * (sb < 26)  # the detector sees the bright features only
    result = nnclr_test.detection_by_feature(labels, scores, truth, sb_bins=2, baselines={"host_flux": host}, twins=twins)
    assert result["paired"]
    rows = result["feature_type"] + result["feature_sb"] + result["visibility"]
    assert all(row["baselines"]["host_flux"]["auc"] == 0.5 for row in rows)
    visible, hidden = result["visibility"]
    assert visible["visible"] and not hidden["visible"] and visible["n"] + hidden["n"] == 50
    assert visible["auc"] > 0.8 and hidden["auc"] == 0.5


def test_test_data_overlapping_the_training_set_is_refused(trained_run, tidal_file, tmp_path, capsys):
    argv = [str(tidal_file), "--run-dir", str(trained_run), "--test-data", str(tidal_file), "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        nnclr_test.main(argv)
    assert exit_info.value.code == 2 and "shares" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        nnclr_test.main([str(tidal_file), "--run-dir", str(trained_run), "--label-efficiency", "--label-counts", "1"])
    assert exit_info.value.code == 2 and "--label-counts must all be >= 2" in capsys.readouterr().err


def test_linear_probe_finds_a_signal_spread_over_the_representation():
    """20 galaxies per class; the classes differ by 0.5 sigma in 16 of 128 dimensions."""
    from sklearn.metrics import roc_auc_score

    def draw(rng, labels):
        features = rng.normal(size=(len(labels), 128))
        features[:, :16] += 0.5 * labels[:, None]
        return features

    labels, test_labels = np.repeat([0, 1], 20), np.repeat([0, 1], 500)
    aucs = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        probe = nnclr_test.fit_linear_probe(draw(rng, labels), labels, seed=seed)
        aucs.append(roc_auc_score(test_labels, probe.predict_proba(draw(rng, test_labels))[:, 1]))
    assert np.mean(aucs) > 0.7
    with pytest.raises(ValueError, match="at least 2"):
        nnclr_test.fit_linear_probe(draw(rng, labels)[:21], labels[:21], seed=0)


def test_fine_tuned_arm_starts_from_the_trained_encoder_and_leaves_it_untouched(trained_run, tidal_file):
    """The label-efficiency study's fine-tuned classifier starts from the NNCLR weights, and
    training it changes a copy: the encoder the probes use is the same after."""
    config, extra = nnclr_model.load_config(trained_run / "config.json")
    encoder = nnclr_model.load_encoder(trained_run / "encoder.keras", config)
    before = [weight.copy() for weight in encoder.get_weights()]
    source = tidal_data.tidal_source_from_hdf5([tidal_file])
    images = tidal_data.tidal_stretch(source.read_labelled(np.arange(8)), np.asarray(extra["band_scale"], np.float32))
    labels = source.labels[:8]

    def encoder_weights(classifier):
        return classifier.get_layer(encoder.name).get_weights()

    untrained, _ = nnclr_test.train_supervised_baseline(config, images, labels, seed=0, epochs=0,
                                                        initial_encoder=encoder)
    assert all(np.array_equal(a, b) for a, b in zip(encoder_weights(untrained), before))
    tuned, record = nnclr_test.train_supervised_baseline(config, images, labels, seed=0, epochs=2,
                                                         initial_encoder=encoder)
    assert record["steps"] == 2 and any(not np.array_equal(a, b) for a, b in zip(encoder_weights(tuned), before))
    assert all(np.array_equal(a, b) for a, b in zip(encoder.get_weights(), before))
    scratch, _ = nnclr_test.train_supervised_baseline(config, images, labels, seed=0, epochs=0)
    assert not all(np.array_equal(a, b) for a, b in zip(encoder_weights(scratch), before))


def test_classifier_only_from_a_trained_encoder(trained_run, tidal_file, tmp_path):
    out = tmp_path / "probe"
    argv = [str(tidal_file), "--out-dir", str(out), "--load-encoder", str(trained_run / "encoder.keras"), "--tiny",
            "--classifier-epochs", "1"]
    assert nnclr_train.main(argv) == 0
    assert (out / "classifier.keras").is_file() and np.load(out / "train_loss.npy").shape == (1,)
    assert not (out / "nnclr_history.json").exists()
    _, extra = nnclr_model.load_config(out / "config.json")
    _, trained_extra = nnclr_model.load_config(trained_run / "config.json")
    assert extra["band_scale"] == trained_extra["band_scale"]


def test_encoder_of_another_architecture_is_refused(tidal_file, tmp_path, capsys):
    encoder_path = tmp_path / "other" / "encoder.keras"
    encoder_path.parent.mkdir()
    deeper = dataclasses.replace(nnclr_model.TINY_CONFIG, n_blocks=2)
    nnclr_model.save_encoder(nnclr_model.build_encoder(deeper), encoder_path)
    with pytest.raises(SystemExit) as exit_info:
        nnclr_train.main([str(tidal_file), "--out-dir", str(tmp_path / "out"), "--load-encoder", str(encoder_path), "--tiny"])
    assert exit_info.value.code == 2
    assert "has a different architecture from the NNCLR config" in capsys.readouterr().err


@pytest.mark.parametrize(
    "size, has_tidal, message",
    [
        (24, np.ones(40, int), "the labelled set has one class only"),
        (16, None, "images are 16x16 px, smaller than the crop: need at least 20x20"),
    ],
)
def test_train_refuses_bad_data(tmp_path, capsys, size, has_tidal, message):
    path = _write(tmp_path / "bad.h5", size=size, has_tidal=has_tidal)
    with pytest.raises(SystemExit) as exit_info:
        nnclr_train.main([str(path), "--out-dir", str(tmp_path / "out"), "--tiny"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_tfds_source_joins_the_tidal_galaxies_to_the_unlabelled_stream(monkeypatch):
    import tensorflow as tf

    images, has_tidal = _tidal_images(6)
    labelled = {"image": images, "id": np.array([f"l{i}".encode() for i in range(6)]), "label": has_tidal}
    parts = {"train": slice(0, 2), "validation": slice(2, 4), "test": slice(4, 6)}
    stored = {("tidal_unlabelled", "all"): {"image": images[:4], "id": np.array([b"u0", b"u1", b"u2", b"u3"])}}
    stored.update({("tidal_labelled", name): {k: v[part] for k, v in labelled.items()} for name, part in parts.items()})

    def load(name, data_dir, split="all"):
        return tf.data.Dataset.from_tensor_slices(stored[name, split])

    monkeypatch.setattr(data.tidal_datasets, "_load_tfds", load)
    source = data.tidal_datasets.tidal_source_from_tfds(data_dir="unused")
    assert list(source.ids) == [f"l{i}" for i in range(6)] and list(source.labels) == list(has_tidal)
    np.testing.assert_array_equal(source.read_labelled([4, 1]), images[[4, 1]])
    # The builder's own splits are the classifier sets.
    splits = tidal_data.tidal_source_splits(source)
    assert {name: list(indices) for name, indices in splits.items()} == {"train": [0, 1], "validation": [2, 3], "test": [4, 5]}
    stream = np.stack(list(source.unlabelled().as_numpy_iterator()))
    np.testing.assert_array_equal(stream, np.concatenate([images[:4], images[has_tidal == 1]]))


def test_bench_smoke(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_nnclr", pathlib.Path(__file__).parent.parent / "bench" / "bench_nnclr.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--batch-size", "4", "--steps", "1", "--inference-batch-size", "4",
                       "--inference-batches", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["train_images_per_second"] > 0 and results["inference_images_per_second"] > 0


MIRRORED_TRAINING = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import nnclr_train
sys.exit(nnclr_train.main(sys.argv[1:]))
"""


def test_train_with_mirrored_strategy_on_two_devices(tidal_file, tmp_path):
    import keras

    out = tmp_path / "mirrored"
    argv = [str(tidal_file), "--out-dir", str(out), "--tiny", "--epochs", "1", "--classifier-epochs", "1",
            "--strategy", "mirrored"]
    result = subprocess.run([sys.executable, "-c", MIRRORED_TRAINING, *argv], capture_output=True, text=True, timeout=600,
                            cwd=pathlib.Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "strategy mirrored: 2 replicas in sync" in result.stderr
    history = json.loads((out / "nnclr_history.json").read_text())
    assert len(history["loss"]) == 1 and np.isfinite(history["loss"]).all()
    assert np.load(out / "val_loss.npy").shape == (1,)
    # The batch normalisation was synchronised for training only: the saved encoder has plain layers.
    encoder = nnclr_model.load_encoder(out / "encoder.keras", nnclr_model.load_config(out / "config.json")[0])
    norms = [layer for layer in encoder.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and not any(layer.synchronized for layer in norms)


def test_unknown_strategy_is_refused(capsys):
    with pytest.raises(SystemExit):
        nnclr_train.main(["x.h5", "--out-dir", "o", "--strategy", "tpu"])
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


def test_data_come_from_inputs_or_tfds_and_settings_are_checked(tmp_path, capsys):
    for inputs in ([], ["x.h5", "--tfds-dir", str(tmp_path)]):
        with pytest.raises(SystemExit) as exit_info:
            nnclr_train.main([*inputs, "--out-dir", str(tmp_path / "out"), "--tiny"])
        assert exit_info.value.code == 2
        assert "either as INPUT files or folders, or as --tfds-dir, not both or neither" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        nnclr_train.main(["x.h5", "--out-dir", str(tmp_path / "out"), "--batch-size", "0"])
    assert "batch_size must be >= 1, got 0" in capsys.readouterr().err


def test_a_pair_pool_is_split_by_whole_pairs(tmp_path):
    source = tidal_data.tidal_source_from_hdf5([_write_pairs(tmp_path / "pairs.h5", pairs=12)])
    splits = tidal_data.tidal_source_splits(source, (6, 2, 3), seed=4)
    pair_ids = source.truth["pair_id"]
    seen = set()
    for name, rows in splits.items():
        assert np.bincount(source.labels[rows]).tolist() == [len(rows) // 2] * 2
        pairs = set(pair_ids[rows])
        assert len(pairs) == len(rows) // 2 and not pairs & seen  # both twins, never in two sets
        seen |= pairs
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [12, 4, 6]
    with pytest.raises(ValueError, match="the pair file has 12 pairs, the splits need 13"):
        tidal_data.tidal_source_splits(source, (8, 2, 3), seed=4)


def test_classifier_on_labelled_pairs_with_the_original_test_view(trained_run, tidal_file, tmp_path, capsys):
    pairs = _write_pairs(tmp_path / "pairs.h5", pairs=14)
    out = tmp_path / "paired_run"
    argv = [str(tidal_file), "--labelled", str(pairs), "--out-dir", str(out), "--load-encoder",
            str(trained_run / "encoder.keras"), "--tiny", "--classifier-epochs", "1", "--split-sizes", "8", "2", "4"]
    assert nnclr_train.main(argv) == 0
    splits = json.loads((out / "splits.json").read_text())
    assert all(galaxy.startswith("pair") for rows in splits.values() for galaxy in rows)
    _, extra = nnclr_model.load_config(out / "config.json")
    assert extra["settings"]["labelled"] == [str(pairs)] and extra["settings"]["fine_tune"] is True
    # nnclr_test rebuilds the run's sets from its --labelled files: the test split is whole pairs.
    capsys.readouterr()
    assert nnclr_test.main([str(tidal_file), "--run-dir", str(out), "--out-dir", str(tmp_path / "t1")]) == 0
    metrics = json.loads((tmp_path / "t1" / "metrics.json").read_text())
    assert metrics["paired"] and metrics["n_pairs"] == 4
    for name in ("t2", "t3"):
        assert nnclr_test.main([str(tidal_file), "--run-dir", str(out), "--out-dir", str(tmp_path / name),
                                "--test-view", "original"]) == 0
    first = np.load(tmp_path / "t2" / "scores.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "t3" / "scores.npy"), first)  # seeded: reproducible
    assert not np.allclose(first, np.load(tmp_path / "t1" / "scores.npy"))  # noise and crops change the scores
