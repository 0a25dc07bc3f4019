"""The commands on the JAX backend, in processes where TensorFlow cannot be imported at all.

Each command runs in a subprocess with ``KERAS_BACKEND=jax`` and a ``sys.meta_path`` finder
(a ``sitecustomize`` module) that makes every import of ``tensorflow*`` (TensorFlow, TensorFlow
Probability, TensorFlow Datasets) or ``tf_keras`` fail, as on a machine where TensorFlow is not
installed. It logs each attempt made by the project's own code: a command must succeed and
make none. (Keras itself probes for TensorFlow, in ``keras.utils.set_random_seed`` and when it
serialises a model, and goes on without it when the probe fails, as it does here.) The weights
the JAX runs write are then read by this (TensorFlow) process, and predict what they
predicted there.
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest
from synthetic import write_cluster_hdf5

pytest.importorskip("jax", reason="JAX is not installed: the JAX backend cannot run")

import data.files
import model
import nnclr_model
import prep_data
import tidal_data

ROOT = pathlib.Path(__file__).resolve().parents[1]

BLOCKER = '''
import importlib.abc
import os
import sys

PROJECT = os.environ["PROJECT_ROOT"] + os.sep


class NoTensorFlow(importlib.abc.MetaPathFinder):
    """Every tensorflow* (or tf_keras) import fails, as where TensorFlow is not installed; an attempt
    made by the project's code (not by an installed package probing for it) is logged."""

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if not (top.startswith("tensorflow") or top == "tf_keras"):
            return None
        frame = sys._getframe(1)
        while frame is not None and ("importlib" in frame.f_code.co_filename
                                     or frame.f_code.co_filename.startswith("<frozen")):
            frame = frame.f_back
        origin = frame.f_code.co_filename if frame is not None else "?"
        if origin.startswith(PROJECT) and "site-packages" not in origin:
            with open(os.environ["BLOCKED_IMPORTS"], "a") as log:
                log.write(f"{name}@{origin}:{frame.f_lineno}\\n")
        raise ModuleNotFoundError(f"No module named {name!r} (blocked: the JAX backend must not import it)", name=name)


sys.meta_path.insert(0, NoTensorFlow())
'''


@pytest.fixture(scope="module")
def jax_env(tmp_path_factory):
    """Environment of a JAX process without TensorFlow; ``BLOCKED_IMPORTS`` logs the imports refused."""
    folder = tmp_path_factory.mktemp("no_tensorflow")
    (folder / "sitecustomize.py").write_text(BLOCKER)
    env = {key: value for key, value in os.environ.items() if not key.startswith("TF_")}
    env.update(KERAS_BACKEND="jax", PYTHONPATH=str(folder), BLOCKED_IMPORTS=str(folder / "blocked.log"),
               PROJECT_ROOT=str(ROOT))
    return env


def run_jax(env, script, *arguments, status=0):
    """Run ``script`` on JAX; check its exit status and that it tried no TensorFlow import."""
    log = pathlib.Path(env["BLOCKED_IMPORTS"])
    log.unlink(missing_ok=True)
    result = subprocess.run([sys.executable, script, *map(str, arguments)], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=600, check=False)
    assert result.returncode == status, result.stderr[-3000:]
    blocked = log.read_text().split() if log.exists() else []
    assert not blocked, f"{script} tried to import {blocked}: {result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jax_data")
    write_cluster_hdf5(folder / "train.h5", 24, size=48, seed=2)
    write_cluster_hdf5(folder / "real.h5", 6, size=48, seed=3)
    rng = np.random.default_rng(0)
    rows, columns = np.mgrid[:24, :24]
    galaxy = np.exp(-((rows - 12) ** 2 + (columns - 12) ** 2) / 8.0)
    has_tidal = np.arange(40) % 2
    images = rng.normal(0, 0.02, (40, 24, 24, 5)) + galaxy[None, :, :, None]
    images[has_tidal == 1, 4:8] += 0.1
    tidal_data.write_tidal_hdf5(folder / "tidal.h5", images.astype(np.float32), [f"g{i}" for i in range(40)],
                                {"has_tidal": has_tidal})
    return folder


@pytest.fixture(scope="module")
def icl_run(jax_env, data_dir):
    """A tiny train.py run on JAX, with a real set evaluated."""
    out = data_dir / "icl_run"
    run_jax(jax_env, "train.py", data_dir / "train.h5", "--real", data_dir / "real.h5", "--tiny", "--epochs", "1",
            "--batch-size", "8", "--validation-batch-size", "8", "--out-dir", out)
    return out


def test_train_on_jax_writes_its_checkpoints(icl_run):
    for name in ("best.weights.h5", "best.config.json", "final.weights.h5", "history.csv", "binned_validation.png",
                 "binned_real.png"):
        assert (icl_run / name).stat().st_size > 0, name
    metrics = json.loads((icl_run / "metrics.json").read_text())
    assert metrics["validation"]["n"] == 2 and metrics["real_without_finetuning"]["n"] == 6
    assert len(pd.read_csv(icl_run / "history.csv")) == 1


def test_predict_on_jax_and_its_weights_predict_the_same_on_tensorflow(icl_run, jax_env, data_dir, tmp_path):
    (tmp_path / "broken.fits").write_text("not a FITS file")
    out, overlays = tmp_path / "pred.csv", tmp_path / "gradcam"
    result = run_jax(jax_env, "predict.py", data_dir / "real.h5", tmp_path / "broken.fits", "--checkpoint",
                     icl_run / "best.weights.h5", "--out", out, "--gradcam-dir", overlays, "--batch-size", "4", status=1)
    assert "broken.fits: cannot read FITS file" in result.stderr and "Traceback" not in result.stderr
    table = pd.read_csv(out)
    assert table["id"].tolist() == [f"c3_{i:03d}" for i in range(6)]
    assert len(list(overlays.glob("*_gradcam.png"))) == 6
    # The .weights.h5 written on JAX, read on TensorFlow: the same predictions.
    assert keras.backend.backend() == "tensorflow"
    refs, _ = prep_data.index_cutouts([data_dir / "real.h5"])
    images = np.stack([prep_data.load_prepared(ref, model.TINY.image_size) for ref in refs])
    summary = model.Predictor(model.load_icl_model(icl_run / "best.weights.h5"))(images)
    for column, key in (("f_icl", "mode"), ("f_icl_p15", "p15"), ("f_icl_p85", "p85"), ("f_icl_mean", "mean")):
        np.testing.assert_allclose(table[column], summary[key], atol=2e-4, err_msg=column)


def test_finetune_on_jax(icl_run, jax_env, data_dir, tmp_path):
    out = tmp_path / "finetune"
    run_jax(jax_env, "finetune.py", data_dir / "real.h5", data_dir / "train.h5", "--checkpoint",
            icl_run / "best.weights.h5", "--epochs", "2", "--batch-size", "4", "--views", "2", "--split", "0",
            "--learning-rate", "1e-2", "--out-dir", out)
    results = pd.read_csv(out / "results.csv", dtype={"id": str})
    assert len(results) == 6 and (results["fold"] == 0).all()
    assert results[["mode", "p15", "p85", "mode_before"]].apply(lambda c: c.between(0, 1)).all().all()
    tuned = model.load_icl_model(out / "fold0.weights.h5")
    trained = model.load_icl_model(icl_run / "best.weights.h5")
    # Only the head was fine-tuned.
    np.testing.assert_array_equal(tuned.get_layer("encoder").get_weights()[0], trained.get_layer("encoder").get_weights()[0])
    assert not np.allclose(tuned.get_layer("hidden").get_weights()[0], trained.get_layer("hidden").get_weights()[0])


@pytest.fixture(scope="module")
def nnclr_run(jax_env, data_dir):
    """A tiny nnclr_train.py run on JAX: one epoch of each stage."""
    run = data_dir / "nnclr_run"
    run_jax(jax_env, "nnclr_train.py", data_dir / "tidal.h5", "--tiny", "--epochs", "1", "--classifier-epochs", "1",
            "--out-dir", run)
    return run


def test_nnclr_train_on_jax_writes_its_models(nnclr_run, data_dir):
    run = nnclr_run
    for name in ("encoder.keras", "classifier.keras", "classifier_loss.png", "train_loss.npy", "val_loss.npy",
                 "nnclr_history.json", "splits.json", "config.json"):
        assert (run / name).stat().st_size > 0, name
    assert len(json.loads((run / "nnclr_history.json").read_text())["loss"]) == 1
    config, extra = nnclr_model.load_config(run / "config.json")
    source = tidal_data.tidal_source_from_hdf5(data_dir / "tidal.h5")
    images = tidal_data.tidal_stretch(source.read_labelled(np.arange(8)), extra["band_scale"])
    scores = nnclr_model.load_classifier(run / "classifier.keras", config).predict(images, verbose=0)
    assert scores.shape == (8, 1) and np.isfinite(scores).all()  # the JAX run's classifier, on TensorFlow


def test_nnclr_test_on_jax(nnclr_run, jax_env, data_dir, tmp_path):
    out = tmp_path / "test"
    run_jax(jax_env, "nnclr_test.py", data_dir / "tidal.h5", "--run-dir", nnclr_run, "--out-dir", out,
            "--label-efficiency", "--label-counts", "4", "--label-seeds", "1", "--baseline-min-steps", "4",
            "--baseline-max-steps", "8", "--similar-to", "g3", "--top-k", "5")
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["auc"] <= 1 and metrics["n_test"] == 8
    for name in ("roc.png", "scores.npy", "label_efficiency.json", "similar_to_g3.json"):
        assert (out / name).stat().st_size > 0, name


@pytest.mark.parametrize("script, arguments, message", [
    ("train.py", ["--tiny"], ("training without INPUT files reads the TFDS dataset icl_artificial, which needs the "
                              "TensorFlow backend (KERAS_BACKEND=tensorflow); this run uses jax")),
    ("train.py", ["train.h5", "--tfds-dir", "tfds"], "--tfds-dir needs the TensorFlow backend"),
    ("train.py", ["train.h5", "--strategy", "mirrored"], "--strategy mirrored needs the TensorFlow backend"),
    ("nnclr_train.py", ["--tfds-dir", "tfds", "--tiny"], "--tfds-dir (the TFDS tidal builders) needs the TensorFlow"),
    ("nnclr_train.py", ["tidal.h5", "--tiny", "--strategy", "multiworker"], "--strategy multiworker needs the TensorFlow"),
])
def test_tensorflow_only_options_are_refused_on_jax(jax_env, data_dir, tmp_path, script, arguments, message):
    arguments = [data_dir / argument if argument.endswith(".h5") else argument for argument in arguments]
    result = run_jax(jax_env, script, *arguments, "--out-dir", tmp_path / "out", status=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_bad_inputs_are_one_line_on_jax(jax_env, tmp_path):
    images = np.random.default_rng(0).uniform(0.1, 1, (4, 48, 48)).astype(np.float32)
    images[3, :, :40] = np.nan
    data.files.write_stacked_hdf5(tmp_path / "no_data.h5", images, ids=list("abcd"),
                                  columns={"f_icl_sb": [0.1, 0.2, 0.3, 0.4]})
    result = run_jax(jax_env, "train.py", tmp_path / "no_data.h5", "--tiny", "--batch-size", "4",
                     "--validation-fraction", "0.25", "--out-dir", tmp_path / "icl", status=2)
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'no_data.h5'}:3: 83% of the (padded) image is masked or non-finite (at most 70%)"]
    galaxies = np.random.default_rng(1).normal(1, 0.02, (40, 24, 24, 5)).astype(np.float32)
    galaxies[7] = 0.0
    tidal_data.write_tidal_hdf5(tmp_path / "constant.h5", galaxies, [f"g{i}" for i in range(40)],
                                {"has_tidal": np.arange(40) % 2})
    result = run_jax(jax_env, "nnclr_train.py", tmp_path / "constant.h5", "--tiny", "--out-dir", tmp_path / "nnclr",
                     status=2)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    expected = (f"error: {tmp_path / 'constant.h5'}: galaxy 'g7' (row 7): the image is constant (0 everywhere); "
                "not a sky cutout, leave it out")
    assert errors == [expected], result.stderr


def test_quiet_start_leaves_tensorflow_alone_on_jax(jax_env):
    pathlib.Path(jax_env["BLOCKED_IMPORTS"]).unlink(missing_ok=True)
    code = "import sys, common; common.quiet_start([]); import keras, loaders; print(keras.backend.backend())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=jax_env,
                            timeout=300, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "jax", result.stderr[-2000:]
    assert not pathlib.Path(jax_env["BLOCKED_IMPORTS"]).exists()


def test_the_guard_sees_a_tensorflow_import_of_the_project(jax_env):
    # What the other tests rely on: an import of TensorFlow by the project's code fails and is logged.
    pathlib.Path(jax_env["BLOCKED_IMPORTS"]).unlink(missing_ok=True)
    code = "import prep_data; prep_data.cutout_dataset([], 1)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=jax_env,
                            timeout=300, check=False)
    assert result.returncode == 1 and "No module named 'tensorflow' (blocked" in result.stderr
    assert pathlib.Path(jax_env["BLOCKED_IMPORTS"]).read_text().startswith(f"tensorflow@{ROOT / 'prep_data.py'}:")
