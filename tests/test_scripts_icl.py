"""Smoke and behaviour tests of train.py, finetune.py and predict.py on tiny models and data."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from synthetic import synthetic_clusters, write_cluster_hdf5, write_fits_cutout

import common
import data.files
import finetune
import inference
import model
import predict
import prep_data
import train

SCRIPTS = ["train.py", "finetune.py", "predict.py", "prep_data.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_works(script):
    result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage" in result.stdout
    if script == "predict.py":
        assert "--gradcam-dir" in result.stdout and "--verbose" in result.stdout


def _arrays_dataset(images, labels, batch_size):
    prepared = np.stack([prep_data.prepare_image(image, size=32) for image in images])
    return tf.data.Dataset.from_tensor_slices((prepared, labels)).batch(batch_size)


def test_tiny_training_lowers_validation_loss(tmp_path):
    images, labels = synthetic_clusters(96, size=32, seed=1)
    train_data = _arrays_dataset(images[:80], labels[:80], 16)
    validation_data = _arrays_dataset(images[80:], labels[80:], 16)
    config = train.TrainConfig(epochs=4, batch_size=16, validation_batch_size=16, seed=3)
    metrics = train.train(model.TINY, config, train_data, validation_data, tmp_path)
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["val_loss"].min() < history["val_loss"].iloc[0]
    for name in ("best.weights.h5", "best.config.json", "final.weights.h5", "binned_validation.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert metrics["validation"]["n"] == 16 and 0 <= metrics["validation"]["mae"] < 1


def test_train_cli_on_hdf5_with_real_set(tmp_path):
    write_cluster_hdf5(tmp_path / "train.h5", 24, size=48, seed=2)
    write_cluster_hdf5(tmp_path / "real.h5", 6, size=48, seed=3)
    out = tmp_path / "run"
    argv = [str(tmp_path / "train.h5"), "--real", str(tmp_path / "real.h5"), "--tiny", "--epochs", "1",
            "--batch-size", "8", "--validation-batch-size", "8", "--out-dir", str(out)]
    assert train.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["real_without_finetuning"]["n"] == 6
    assert (out / "binned_real.png").exists()
    # Rerunning with more epochs resumes from the backup instead of starting over.
    assert train.main(argv[:-4] + ["--epochs", "2", "--out-dir", str(out)]) == 0
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [0, 1]


def test_train_refuses_to_resume_a_run_of_another_architecture(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.config.json").write_text(model.ARCHITECTURES["compact"].to_json())
    write_cluster_hdf5(tmp_path / "train.h5", 8, size=32)
    assert train.main([str(tmp_path / "train.h5"), "--tiny", "--out-dir", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and "holds a run of another architecture" in error


def test_labels_outside_zero_one_are_refused(tmp_path):
    images = np.ones((3, 32, 32), np.float32)
    data.files.write_stacked_hdf5(tmp_path / "l.h5", images, ids=["a", "b", "c"], columns={"f_icl_sb": [0.1, 1.5, 0.2]})
    refs, _ = prep_data.index_cutouts([tmp_path / "l.h5"])
    with pytest.raises(prep_data.CutoutError, match=r"l.h5:1: label 'f_icl_sb' is 1.5, not a fraction in \[0, 1\]"):
        prep_data.read_labels(refs, "f_icl_sb")


def test_train_cli_reports_missing_label(tmp_path, capsys):
    write_cluster_hdf5(tmp_path / "train.h5", 8, size=32)
    assert train.main([str(tmp_path / "train.h5"), "--label-key", "nope", "--tiny", "--out-dir", str(tmp_path / "r")]) == 2
    assert "has no label 'nope'" in capsys.readouterr().err


def test_folds_follow_original_shuffle():
    folds = finetune.make_folds(101)
    expected = np.arange(101)
    np.random.default_rng(seed=24).shuffle(expected)
    np.testing.assert_array_equal(np.concatenate(folds), expected)
    assert [len(f) for f in folds] == [21, 20, 20, 20, 20]
    with pytest.raises(ValueError, match="need at least 5 clusters"):
        finetune.make_folds(3)


def test_clean_labels():
    np.testing.assert_allclose(finetune.clean_labels([0.0, 0.2]), [1e-5, 0.2])
    with pytest.raises(ValueError, match="finite and in"):
        finetune.clean_labels([0.2, 1.5])


def test_finetune_trains_only_the_head(tiny_checkpoint):
    images, labels = synthetic_clusters(10, size=32, seed=4)
    prepared = np.stack([prep_data.prepare_image(i, size=32) for i in images])
    config = finetune.FinetuneConfig(epochs=2, batch_size=5, learning_rate=1e-2)
    original = model.load_icl_model(tiny_checkpoint)
    tuned = finetune.finetune_split(tiny_checkpoint, prepared, labels, config)
    for name, changed in (("encoder", False), ("hidden", True), ("mixture_params", True)):
        before, after = original.get_layer(name).get_weights(), tuned.get_layer(name).get_weights()
        assert any(not np.allclose(a, b) for a, b in zip(before, after)) == changed


def test_finetune_cli_cross_validates_and_resumes(tmp_path, tiny_checkpoint):
    write_cluster_hdf5(tmp_path / "real.h5", 10, size=32, seed=5)
    out = tmp_path / "ft"
    argv = [str(tmp_path / "real.h5"), "--checkpoint", str(tiny_checkpoint), "--epochs", "1",
            "--batch-size", "4", "--out-dir", str(out)]
    assert finetune.main(argv) == 0
    results = pd.read_csv(out / "results.csv", dtype={"id": str})
    assert results["id"].tolist() == [f"c5_{i:03d}" for i in range(10)]
    assert sorted(results["fold"].unique()) == [0, 1, 2, 3, 4]
    # A skewed mixture may put its mode outside 15-85%, but the interval itself must be ordered.
    assert (results["p15"] < results["p85"]).all()
    assert results[["mode", "p15", "p85", "mode_before"]].apply(lambda c: c.between(0, 1)).all().all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"fold0", "fold1", "fold2", "fold3", "fold4", "overall"}
    for name in ("scatter.png", "binned.png", "fold4.weights.h5"):
        assert (out / name).exists()
    stamp = (out / "fold0.weights.h5").stat().st_mtime_ns
    assert finetune.main(argv) == 0
    assert (out / "fold0.weights.h5").stat().st_mtime_ns == stamp  # finished folds are skipped
    assert finetune.main(argv[:-2] + ["--all", "--out-dir", str(out)]) == 0
    assert (out / "final.weights.h5").exists()


def test_predict_directory_of_fits_with_nan_strips_and_stars(tmp_path, tiny_checkpoint):
    shapes = [(80, 64), (64, 64), (50, 90), (120, 100)]
    for i, shape in enumerate(shapes):
        write_fits_cutout(tmp_path / f"cl{i}.fits", shape, seed=i, nan_strip=i % 2 == 0, star=i > 1)
    out = tmp_path / "pred.csv"
    assert predict.main([str(tmp_path), "--out", str(out), "--checkpoint", str(tiny_checkpoint), "--batch-size", "3"]) == 0
    table = pd.read_csv(out)
    assert table["id"].tolist() == [f"cl{i}" for i in range(4)]
    assert list(table.columns) == list(inference.COLUMNS)
    values = table[["f_icl", "f_icl_p15", "f_icl_p85"]].to_numpy()
    assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()


def test_predict_reports_bad_files_and_keeps_good_rows(tmp_path, tiny_checkpoint, capsys, caplog):
    write_fits_cutout(tmp_path / "a.fits", seed=1)
    (tmp_path / "b.fits").write_text("broken")
    write_fits_cutout(tmp_path / "c.fits", seed=2)
    np.save(tmp_path / "d.npy", np.zeros((2, 5, 5), np.float32))
    out = tmp_path / "pred.csv"
    assert predict.main([str(tmp_path), "--out", str(out), "--checkpoint", str(tiny_checkpoint)]) == 1
    assert pd.read_csv(out)["id"].tolist() == ["a", "c"]
    err = capsys.readouterr().err
    assert "b.fits: cannot read FITS file" in caplog.text  # logged to stderr as it is met
    assert "d.npy:0: prepared image must be 32x32" in caplog.text
    assert "3 cutout(s) could not be predicted" in err and "Traceback" not in err
    strict_out = tmp_path / "strict.csv"
    assert predict.main([str(tmp_path), "--out", str(strict_out), "--checkpoint", str(tiny_checkpoint), "--strict"]) == 2
    assert not strict_out.exists()
    assert "rerun with --resume" in capsys.readouterr().err


def test_predict_without_checkpoint_says_what_to_do(tmp_path, monkeypatch, capsys):
    write_fits_cutout(tmp_path / "a.fits")
    monkeypatch.setattr(model, "CHECKPOINT_DIR", tmp_path / "none")
    assert predict.main([str(tmp_path / "a.fits"), "--out", str(tmp_path / "p.csv")]) == 2
    assert "train one with train.py and pass it with --checkpoint" in capsys.readouterr().err


def test_predict_rejects_checkpoint_of_other_architecture(tmp_path, tiny_checkpoint, capsys):
    write_fits_cutout(tmp_path / "a.fits")
    config_file = model.config_path_for(tiny_checkpoint)
    wrong = tmp_path / "wrong.weights.h5"
    wrong.write_bytes(tiny_checkpoint.read_bytes())
    model.config_path_for(wrong).write_text(config_file.read_text().replace('"n_blocks": 1', '"n_blocks": 2'))
    assert predict.main([str(tmp_path / "a.fits"), "--out", str(tmp_path / "p.csv"), "--checkpoint", str(wrong)]) == 2
    assert "does not match the ICL architecture" in capsys.readouterr().err


def test_predict_writes_gradcam_overlays(tmp_path, tiny_checkpoint):
    for i in range(3):
        write_fits_cutout(tmp_path / f"cl{i}.fits", seed=i)
    out, overlays, plain = tmp_path / "pred.csv", tmp_path / "gradcam", tmp_path / "plain.csv"
    argv = [str(tmp_path), "--checkpoint", str(tiny_checkpoint), "--batch-size", "2"]
    assert predict.main(argv + ["--out", str(out), "--gradcam-dir", str(overlays)]) == 0
    assert sorted(p.name for p in overlays.iterdir()) == [f"cl{i}_gradcam.png" for i in range(3)]
    # The rows are those of a run without GradCAM.
    assert predict.main(argv + ["--out", str(plain)]) == 0
    assert out.read_text() == plain.read_text()


def test_predict_resume_skips_finished_cutouts(tmp_path, tiny_checkpoint, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(5):
        write_fits_cutout(inputs / f"cl{i}.fits", seed=i)
    out = tmp_path / "pred.csv"
    full = tmp_path / "full.csv"
    assert predict.main([str(inputs), "--out", str(full), "--checkpoint", str(tiny_checkpoint)]) == 0
    # An interrupted run: its rows for the first two cutouts are in the partial file, no CSV yet.
    rows = full.read_text().splitlines()
    inference.partial_path(out).write_text("\n".join(rows[:3]) + "\n")
    seen = []
    original = prep_data.cutout_dataset
    monkeypatch.setattr(prep_data, "cutout_dataset", lambda refs, *a, **k: seen.extend(refs) or original(refs, *a, **k))
    assert predict.main([str(inputs), "--out", str(out), "--checkpoint", str(tiny_checkpoint), "--resume"]) == 0
    assert [ref.id for ref in seen] == ["cl2", "cl3", "cl4"]
    assert out.read_text() == full.read_text()
    assert not inference.partial_path(out).exists()
    seen.clear()
    assert predict.main([str(inputs), "--out", str(out), "--checkpoint", str(tiny_checkpoint), "--resume"]) == 0
    assert seen == [] and out.read_text() == full.read_text()


def test_cached_views_are_the_encoder_outputs(tiny_checkpoint):
    images, labels = synthetic_clusters(6, size=32, seed=6)
    prepared = np.stack([prep_data.prepare_image(i, size=32) for i in images])
    encoded = finetune.EncodedClusters(tiny_checkpoint, prepared, n_views=3, seed=1)
    icl_model = model.load_icl_model(tiny_checkpoint)
    encoder, pooling = icl_model.get_layer(model.ENCODER_NAME), icl_model.get_layer(model.POOLING_NAME)
    expected = pooling(encoder(icl_model.get_layer("normalisation")(prepared))).numpy()
    np.testing.assert_allclose(encoded.plain, expected, rtol=1e-4, atol=1e-5)
    assert encoded.views.shape == (6, 3, expected.shape[1])
    assert not np.allclose(encoded.views[:, 0], encoded.plain)  # augmented views differ from the image
    # The head on the plain representation reproduces the whole model's prediction.
    direct = model.summarise(icl_model(prepared))
    np.testing.assert_allclose(finetune._predict_encoded(icl_model, encoded.plain)["mode"], direct["mode"], atol=1e-3)


def test_cached_and_full_methods_change_only_the_head(tmp_path, tiny_checkpoint):
    images, labels = synthetic_clusters(10, size=32, seed=7)
    prepared = np.stack([prep_data.prepare_image(i, size=32) for i in images])
    ids = [f"c{i}" for i in range(10)]
    original = model.load_icl_model(tiny_checkpoint)
    for method in ("cached", "full"):
        config = finetune.FinetuneConfig(epochs=2, batch_size=4, learning_rate=1e-2, method=method, n_views=2)
        results = finetune.cross_validate(tiny_checkpoint, ids, prepared, labels, config, tmp_path / method, splits=[0])
        assert results["id"].tolist() == [ids[i] for i in sorted(finetune.make_folds(10)[0])]
        tuned = model.load_icl_model(tmp_path / method / "fold0.weights.h5")
        assert all(np.allclose(a, b) for a, b in zip(original.get_layer("encoder").get_weights(), tuned.get_layer("encoder").get_weights()))
        assert not np.allclose(original.get_layer("hidden").get_weights()[0], tuned.get_layer("hidden").get_weights()[0])
    with pytest.raises(ValueError, match="method must be 'cached' or 'full'"):
        finetune.FinetuneConfig(method="fast")


MIRRORED_STEP = """
import sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import common, model, train
config = train.TrainConfig(batch_size=8, learning_rate=1e-3, augment=False)
rng = np.random.default_rng(0)
images = rng.normal(1, 1, (8, 32, 32, 1)).astype("float32")
labels = rng.uniform(0.05, 0.4, 8).astype("float32")
results = []
for strategy in (common.make_strategy("default"), common.make_strategy("mirrored")):
    keras.utils.set_random_seed(0)
    icl_model = train.compiled_model(model.TINY, config, strategy)
    initial = icl_model.get_weights()
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    icl_model.fit(dataset, epochs=1, verbose=0)
    results.append(icl_model.get_weights())
print("moved", max(float(np.abs(a - b).max()) for a, b in zip(initial, results[-1])))
print("replicas", strategy.num_replicas_in_sync)
print("max difference", max(float(np.abs(a - b).max()) for a, b in zip(*results)))
"""


def test_mirrored_training_step_matches_single_device(tmp_path):
    result = subprocess.run([sys.executable, "-c", MIRRORED_STEP], capture_output=True, text=True, timeout=600,
                            cwd=pathlib.Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.rsplit(" ", 1) for line in result.stdout.splitlines() if line.startswith(("replicas", "max", "moved")))
    assert lines["replicas"] == "2"
    assert float(lines["moved"]) > 1e-4  # the step did train
    assert float(lines["max difference"]) < 1e-5


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="strategy must be one of default, mirrored, multiworker, got 'tpu'"):
        common.make_strategy("tpu")
