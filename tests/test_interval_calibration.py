"""Interval calibration: the 15-85% interval widened about the mode to hold 70% of the labels."""

import json

import numpy as np
import pytest

import model


def _summary(mode, p15, p85):
    return {"mode": np.asarray(mode, float), "p15": np.asarray(p15, float), "p85": np.asarray(p85, float)}


def test_scores_are_distances_in_units_of_the_half_interval_on_the_label_side():
    summary = _summary([0.2, 0.2, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1], [0.4, 0.4, 0.4, 0.4])
    scores = model.interval_scores([0.15, 0.5, 0.2, 0.0], summary)
    np.testing.assert_allclose(scores, [0.5, 1.5, 0.0, 2.0])


def test_fitted_scale_is_the_conformal_quantile_and_reaches_the_coverage():
    rng = np.random.default_rng(0)
    n = 99
    mode = rng.uniform(0.1, 0.3, n)
    summary = _summary(mode, mode - 0.01, mode + 0.01)  # intervals three times too narrow
    labels = mode + rng.normal(0, 0.03, n)
    scale = model.fit_interval_scale(labels, summary)
    scores = np.sort(model.interval_scores(labels, summary))
    assert scale == scores[int(np.ceil(0.7 * (n + 1))) - 1]  # the 70th of 99
    widened = model.scale_interval(summary, scale)
    coverage = np.mean((labels >= widened["p15"]) & (labels <= widened["p85"]))
    assert 0.70 <= coverage <= 0.72
    assert 2.0 < scale < 5.0


def test_scaled_interval_stays_in_the_unit_range_and_scale_one_changes_nothing():
    summary = _summary([0.05, 0.9], [0.02, 0.8], [0.1, 0.97])
    widened = model.scale_interval(summary, 3.0)
    np.testing.assert_allclose(widened["p15"], [0.0, 0.6], atol=1e-7)
    np.testing.assert_allclose(widened["p85"], [0.2, 1.0], atol=1e-7)
    assert model.scale_interval(summary, 1.0) is summary


def test_calibration_file_beside_the_checkpoint(tmp_path):
    checkpoint = tmp_path / "icl.weights.h5"
    assert model.calibration_path_for(checkpoint) == tmp_path / "icl.calibration.json"
    assert model.calibration_path_for(tmp_path / "m.keras") == tmp_path / "m.calibration.json"
    assert model.load_interval_scale(checkpoint) == 1.0
    model.calibration_path_for(checkpoint).write_text(json.dumps({"interval_scale": 2.5}))
    assert model.load_interval_scale(checkpoint) == 2.5
    model.calibration_path_for(checkpoint).write_text("{not json")
    with pytest.raises(model.CheckpointError, match="icl.calibration.json: not a readable interval calibration"):
        model.load_interval_scale(checkpoint)
    model.calibration_path_for(checkpoint).write_text(json.dumps({"interval_scale": -1}))
    with pytest.raises(model.CheckpointError, match="interval_scale must be a positive number"):
        model.load_interval_scale(checkpoint)


def test_predictor_widens_its_intervals_by_the_scale():
    import keras

    keras.utils.set_random_seed(1)
    icl = model.build_icl_model(model.TINY)
    images = np.random.default_rng(2).uniform(0, 3, (4, 32, 32, 1)).astype(np.float32)
    plain = model.Predictor(icl)(images)
    wide = model.Predictor(icl, interval_scale=2.0)(images)
    np.testing.assert_allclose(wide["mode"], plain["mode"])
    expected = model.scale_interval(plain, 2.0)
    np.testing.assert_allclose(wide["p15"], expected["p15"], atol=1e-6)
    np.testing.assert_allclose(wide["p85"], expected["p85"], atol=1e-6)
    assert (wide["p85"] - wide["p15"] >= plain["p85"] - plain["p15"] - 1e-6).all()


def test_evaluate_fits_and_then_applies_the_calibration(tmp_path):
    import shutil
    import subprocess
    import sys

    from data import shards

    root = model.CHECKPOINT_DIR.parent
    for suffix in (".weights.h5", ".config.json"):
        shutil.copy(model.CHECKPOINT_DIR / f"icl_trained{suffix}", tmp_path / f"icl{suffix}")
    heldout = tmp_path / "heldout.h5"
    shards.generate_file("clusters", 12, 4321, heldout)
    command = [sys.executable, str(root / "checkpoints" / "evaluate.py"), str(tmp_path / "icl.weights.h5"), str(heldout),
               "--out-dir", str(tmp_path / "out")]
    subprocess.run([*command, "--calibrate", "f_icl_sb_ideal"], check=True, cwd=root, timeout=600, capture_output=True)
    saved = json.loads((tmp_path / "icl.calibration.json").read_text())
    assert saved["label"] == "f_icl_sb_ideal" and saved["n"] == 12 and saved["interval_scale"] > 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["interval_scale"] == saved["interval_scale"]
    assert metrics["columns"]["f_icl_sb_ideal"]["coverage_15_85"] >= 0.7
    result = subprocess.run([*command, "--calibrate", "f_icl_nothing"], cwd=root, timeout=600, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 2 and "--calibrate f_icl_nothing: no such truth column" in result.stderr
