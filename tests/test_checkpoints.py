"""The model-card evaluation script, and the shipped checkpoints themselves."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from synthetic import write_cluster_hdf5

import model
import nnclr_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "checkpoints"
sys.path.insert(0, str(CHECKPOINTS))
import evaluate  # noqa: E402


def test_evaluate_reports_every_truth_column(tiny_checkpoint, tmp_path):
    labels = write_cluster_hdf5(tmp_path / "heldout.h5", 12, size=48, seed=5)
    result = evaluate.evaluate(tiny_checkpoint, [tmp_path / "heldout.h5"], tmp_path / "eval")
    assert result["n"] == 12 and list(result["columns"]) == ["f_icl_sb"]
    metrics = result["columns"]["f_icl_sb"]
    assert metrics["n"] == 12 and 0 <= metrics["coverage_15_85"] <= 1
    assert metrics["mae_of_constant_median"] == pytest.approx(np.abs(labels - np.median(labels)).mean(), rel=1e-5)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == result
    assert (tmp_path / "eval" / "binned_f_icl_sb.png").stat().st_size > 0
    assert "| `f_icl_sb` | 12 |" in evaluate.markdown_table(result)


def test_evaluate_without_truth_columns_says_so(tiny_checkpoint, tmp_path):
    import data.files

    images = np.ones((2, 48, 48), np.float32)
    data.files.write_stacked_hdf5(tmp_path / "plain.h5", images, np.zeros((2, 48, 48), np.int32), ids=["a", "b"],
                                 columns={"z": np.full(2, 0.3)})
    command = [sys.executable, str(CHECKPOINTS / "evaluate.py"), str(tiny_checkpoint), str(tmp_path / "plain.h5")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "none of the truth columns f_icl_sb_ideal, f_icl_sb_ideal_scene, f_icl_true, f_icl_sb is in" in result.stderr


def test_evaluate_generates_its_heldout_mocks(tiny_checkpoint, tmp_path):
    command = [sys.executable, str(CHECKPOINTS / "evaluate.py"), str(tiny_checkpoint), "--generate", "3", "7",
               "--out-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n"] == 3 and metrics["heldout_seed"] == 7
    assert set(metrics["columns"]) == {"f_icl_sb_ideal", "f_icl_sb_ideal_scene", "f_icl_true"}
    result = subprocess.run(command[:3], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "give either held-out cutout files or --generate N SEED" in result.stderr


@pytest.mark.parametrize("name", ["icl_trained", "icl_finetuned", "icl_randomised"])
def test_shipped_icl_checkpoint_loads_and_predicts(name):
    path = CHECKPOINTS / f"{name}.weights.h5"
    assert path.exists(), f"shipped checkpoint {path} is missing"
    icl_model = model.load_icl_model(path)
    size = icl_model.input_shape[1]
    image = np.random.default_rng(0).normal(0.0, 0.02, (1, size, size, 1)).astype(np.float32)
    summary = model.Predictor(icl_model)(image)
    assert 0 <= summary["p15"][0] <= summary["mode"][0] <= summary["p85"][0] <= 1


def test_shipped_nnclr_run_loads():
    run = CHECKPOINTS / "nnclr"
    config, _ = nnclr_model.load_config(run / "config.json")
    encoder = nnclr_model.load_encoder(run / "encoder.keras", config)
    classifier = nnclr_model.load_classifier(run / "classifier.keras", config)
    assert encoder.output_shape == (None, config.representation_dim)
    assert classifier.output_shape == (None, 1)


def test_model_card_numbers_are_reproduced(tmp_path):
    """Regenerate the card's held-out mocks, evaluate the shipped model, compare with the card's file."""
    card = json.loads((CHECKPOINTS / "icl_trained.metrics.json").read_text())
    command = [sys.executable, str(CHECKPOINTS / "evaluate.py"), str(CHECKPOINTS / "icl_trained.weights.h5"),
               "--generate", str(card["n"]), str(card["heldout_seed"]), "--out-dir", str(tmp_path)]
    subprocess.run(command, check=True, cwd=ROOT, timeout=900, capture_output=True)
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert set(result["columns"]) == set(card["columns"])
    for key, metrics in card["columns"].items():
        for name in ("mae", "bias", "scatter", "pearson_r", "coverage_15_85"):
            assert result["columns"][key][name] == pytest.approx(metrics[name], abs=2e-3), (key, name)
