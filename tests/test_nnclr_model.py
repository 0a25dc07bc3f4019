"""NNCLR model: the loss against NumPy, the FIFO queue, straight-through gradients, learning,
save/load, the classifier and the errors users see."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import common
import nnclr_model
from nnclr_model import TINY_CONFIG


def _unit_rows(rng, shape):
    rows = rng.normal(size=shape)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def reference_nnclr_loss(projections_1, projections_2, queue, temperature):
    """NumPy transcription of Dwibedi et al. 2021 eq. 2, symmetrised over views and sides."""
    z1 = projections_1 / np.linalg.norm(projections_1, axis=1, keepdims=True)
    z2 = projections_2 / np.linalg.norm(projections_2, axis=1, keepdims=True)
    nn1 = queue[np.argmax(z1 @ queue.T, axis=1)]
    nn2 = queue[np.argmax(z2 @ queue.T, axis=1)]
    losses = []
    for logits in (nn1 @ z2.T, z2 @ nn1.T, nn2 @ z1.T, z1 @ nn2.T):
        losses.append(-np.diag(_log_softmax(logits / temperature)))
    return np.concatenate(losses).mean()


def test_loss_equals_numpy_reference():
    rng = np.random.default_rng(42)
    projections_1 = rng.normal(size=(6, 8)).astype(np.float32)
    projections_2 = (projections_1 + 0.3 * rng.normal(size=(6, 8))).astype(np.float32)
    queue = _unit_rows(rng, (20, 8))
    loss = nnclr_model.nnclr_loss(projections_1, projections_2, queue, temperature=0.1)
    expected = reference_nnclr_loss(projections_1.astype(np.float64), projections_2.astype(np.float64), queue.astype(np.float64), 0.1)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_nearest_neighbour_is_the_most_similar_queue_row():
    rng = np.random.default_rng(1)
    queue = _unit_rows(rng, (10, 4))
    projections = _unit_rows(rng, (5, 4))
    neighbours = nnclr_model.nearest_neighbour(projections, queue).numpy()
    expected = queue[np.argmax(projections @ queue.T, axis=1)]
    np.testing.assert_allclose(neighbours, expected, atol=1e-6)


def test_straight_through_neighbour_passes_gradients_to_the_projection():
    rng = np.random.default_rng(2)
    queue = tf.constant(_unit_rows(rng, (10, 4)))
    projections = tf.Variable(_unit_rows(rng, (5, 4)))
    weights = tf.constant(rng.normal(size=(5, 4)).astype(np.float32))
    with tf.GradientTape() as tape:
        objective = tf.reduce_sum(nnclr_model.nearest_neighbour(projections, queue) * weights)
    gradient = tape.gradient(objective, projections)
    # d(sum(NN(p) w))/dp = w exactly: the neighbour is the identity in the backward pass.
    np.testing.assert_allclose(gradient.numpy(), weights.numpy(), atol=1e-6)


def test_loss_gradient_reaches_both_views():
    rng = np.random.default_rng(3)
    queue = tf.constant(_unit_rows(rng, (16, 8)))
    projections_1 = tf.Variable(rng.normal(size=(4, 8)).astype(np.float32))
    projections_2 = tf.Variable(rng.normal(size=(4, 8)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = nnclr_model.nnclr_loss(projections_1, projections_2, queue, 0.1)
    gradients = tape.gradient(loss, [projections_1, projections_2])
    assert all(g is not None and np.abs(g.numpy()).sum() > 0 for g in gradients)


def test_queue_is_a_fifo_of_the_last_projections():
    model = nnclr_model.NNCLR(TINY_CONFIG, seed=0)
    rng = np.random.default_rng(4)
    initial = model.queue.numpy().copy()
    np.testing.assert_allclose(np.linalg.norm(initial, axis=1), 1.0, rtol=1e-5)
    first = _unit_rows(rng, (10, TINY_CONFIG.projection_dim))
    second = _unit_rows(rng, (5, TINY_CONFIG.projection_dim))
    model.push_to_queue(first)
    model.push_to_queue(second)
    queue = model.queue.numpy()
    assert queue.shape == (TINY_CONFIG.queue_size, TINY_CONFIG.projection_dim)
    np.testing.assert_array_equal(queue[:5], second)
    np.testing.assert_array_equal(queue[5:15], first)
    np.testing.assert_array_equal(queue[15:], initial[: TINY_CONFIG.queue_size - 15])


def _patterns(count, seed):
    """Distinct smooth 5-band patterns: easy to tell apart, so NNCLR can learn quickly."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[:24, :24] / 24.0
    angles = rng.uniform(0, np.pi, count)
    waves = np.stack(
        [
            np.sin(2 * np.pi * (rng.uniform(0.5, 2) * columns * np.cos(a) + rng.uniform(0.5, 2) * rows * np.sin(a)) + rng.uniform(0, 6))
            for a in angles
        ]
    )
    return (waves[..., None] * rng.uniform(0.5, 2, (count, 1, 1, 5))).astype(np.float32)


def test_train_step_pushes_the_first_view_into_the_queue():
    keras.utils.set_random_seed(0)
    model = nnclr_model.NNCLR(TINY_CONFIG, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    before = model.queue.numpy().copy()
    logs = {name: float(value) for name, value in model.train_step(tf.constant(_patterns(8, 0))).items()}
    assert set(logs) == {"loss", "c_loss", "c_acc", "r_acc"}
    queue = model.queue.numpy()
    np.testing.assert_array_equal(queue[8:], before[:-8])
    np.testing.assert_allclose(np.linalg.norm(queue[:8], axis=1), 1.0, rtol=1e-5)
    # As the original's training step: the NNCLR loss alone, without the layers' weight decay.
    assert logs["loss"] == logs["c_loss"]
    assert model.encoder.losses


def test_tiny_model_contrastive_accuracy_rises():
    keras.utils.set_random_seed(0)
    model = nnclr_model.NNCLR(TINY_CONFIG, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    dataset = tf.data.Dataset.from_tensor_slices(_patterns(32, 0)).batch(16, drop_remainder=True)
    accuracy = model.fit(dataset, epochs=8, verbose=0, shuffle=False).history["c_acc"]
    # Chance is 1/16; the first epoch is close to it, the last ones well above.
    assert np.mean(accuracy[-2:]) > accuracy[0] + 0.15


def test_encoder_save_load_round_trip(tmp_path):
    encoder = nnclr_model.build_encoder(TINY_CONFIG)
    path = tmp_path / "encoder.keras"
    nnclr_model.save_encoder(encoder, path)
    loaded = nnclr_model.load_encoder(path, TINY_CONFIG)
    views = np.random.default_rng(0).normal(size=(3, 16, 16, 5)).astype(np.float32)
    np.testing.assert_allclose(loaded(views, training=False), encoder(views, training=False), rtol=1e-6)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_nnclr_weights_with_queue_round_trip(tmp_path):
    model = nnclr_model.NNCLR(TINY_CONFIG, seed=1)
    model.push_to_queue(_unit_rows(np.random.default_rng(0), (7, TINY_CONFIG.projection_dim)))
    model.save_weights(tmp_path / "nnclr.weights.h5")
    restored = nnclr_model.NNCLR(TINY_CONFIG, seed=2)
    restored.load_weights(tmp_path / "nnclr.weights.h5")
    np.testing.assert_array_equal(restored.queue.numpy(), model.queue.numpy())


def test_classifier_save_load_round_trip(tmp_path):
    classifier = nnclr_model.build_classifier(nnclr_model.build_encoder(TINY_CONFIG), TINY_CONFIG)
    path = tmp_path / "classifier.keras"
    common.save_keras_model(classifier, path)
    loaded = nnclr_model.load_classifier(path, TINY_CONFIG)
    images = np.random.default_rng(0).normal(size=(4, 24, 24, 5)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), classifier.predict(images, verbose=0), rtol=1e-6)
    assert loaded.output_shape == (None, 1)


def test_encoder_file_of_a_different_architecture_is_rejected(tmp_path):
    other = dataclasses.replace(TINY_CONFIG, representation_dim=8)
    path = tmp_path / "encoder.keras"
    nnclr_model.save_encoder(nnclr_model.build_encoder(other), path)
    with pytest.raises(ValueError, match=r"encoder\.keras has a different architecture from the NNCLR config: weighted layer .* should be Dense \(\(.*, 16\),\) but is Dense \(\(.*, 8\),\)"):
        nnclr_model.load_encoder(path, TINY_CONFIG)


def test_encoder_file_with_another_input_is_rejected(tmp_path):
    other = dataclasses.replace(TINY_CONFIG, crop_size=12)
    path = tmp_path / "encoder.keras"
    nnclr_model.save_encoder(nnclr_model.build_encoder(other), path)
    with pytest.raises(ValueError, match=r"input shape should be input \(16, 16, 5\) but is input \(12, 12, 5\)"):
        nnclr_model.load_encoder(path, TINY_CONFIG)


def test_encoder_file_that_is_not_a_model_is_rejected(tmp_path):
    path = tmp_path / "encoder.keras"
    path.write_text("not a model")
    with pytest.raises(ValueError, match=r"cannot read encoder file .*encoder\.keras as a Keras model"):
        nnclr_model.load_encoder(path, TINY_CONFIG)
    with pytest.raises(FileNotFoundError, match=r"encoder file .*missing\.keras does not exist"):
        nnclr_model.load_encoder(tmp_path / "missing.keras", TINY_CONFIG)


def test_linear_probe_trains_only_the_dense_layer():
    encoder = nnclr_model.build_encoder(TINY_CONFIG)
    classifier = nnclr_model.build_classifier(encoder, TINY_CONFIG, fine_tune=False)
    assert [tuple(w.shape) for w in classifier.trainable_weights] == [(TINY_CONFIG.representation_dim, 1), (1,)]
    before = [w.copy() for w in encoder.get_weights()]
    classifier.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    images = np.random.default_rng(0).normal(size=(8, 24, 24, 5)).astype(np.float32)
    classifier.fit(images, np.array([0, 1] * 4, np.float32), epochs=1, batch_size=4, verbose=0)
    for old, new in zip(before, encoder.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_fine_tuning_trains_the_encoder_too():
    encoder = nnclr_model.build_encoder(TINY_CONFIG)
    classifier = nnclr_model.build_classifier(encoder, TINY_CONFIG, fine_tune=True)
    assert len(classifier.trainable_weights) == len(encoder.trainable_weights) + 2


def test_paper_configuration_shapes():
    config = nnclr_model.NNCLRConfig()
    encoder = nnclr_model.build_encoder(config)
    assert encoder.input_shape == (None, 96, 96, 5)
    assert encoder.output_shape == (None, 128)
    assert nnclr_model.build_projection_head(config).output_shape == (None, 128)
    assert config.min_image_size == 109 and config.input_shape == (128, 128, 5)


def test_binned_encoder_reads_full_resolution_views_and_averages_pixels(tmp_path):
    binned = dataclasses.replace(TINY_CONFIG, binning=2)
    encoder = nnclr_model.build_encoder(binned)
    assert encoder.input_shape == (None, 16, 16, 5) and encoder.output_shape == (None, 16)
    backbone = encoder.get_layer("resnet")
    assert backbone.input_shape == (None, 8, 8, 5)
    views = np.random.default_rng(0).normal(size=(2, 16, 16, 5)).astype(np.float32)
    averaged = views.reshape(2, 8, 2, 8, 2, 5).mean(axis=(2, 4))
    np.testing.assert_allclose(encoder.get_layer("binning")(views).numpy(), averaged, rtol=1e-5, atol=1e-6)
    path = tmp_path / "encoder.keras"
    nnclr_model.save_encoder(encoder, path)
    with pytest.raises(ValueError, match="different architecture from the NNCLR config"):
        nnclr_model.load_encoder(path, TINY_CONFIG)
    with pytest.raises(ValueError, match="crop_size 16 must be a multiple of binning 3"):
        dataclasses.replace(TINY_CONFIG, binning=3)


def test_config_rejects_images_smaller_than_the_crop():
    with pytest.raises(ValueError, match=r"image_size 100 is smaller than the crop: .* crop_size \+ jitter = 109"):
        nnclr_model.NNCLRConfig(image_size=100)


def test_config_json_round_trip(tmp_path):
    nnclr_model.save_config(TINY_CONFIG, tmp_path / "config.json", band_scale=[1.0, 2.0, 3.0, 4.0, 5.0])
    config, extra = nnclr_model.load_config(tmp_path / "config.json")
    assert config == TINY_CONFIG and extra == {"band_scale": [1.0, 2.0, 3.0, 4.0, 5.0]}


def test_model_names_the_expected_image_shape():
    model = nnclr_model.NNCLR(TINY_CONFIG, seed=0)
    model.compile(optimizer=keras.optimizers.Adam())
    with pytest.raises(ValueError, match=r"images must be \(batch, 24, 24, 5\) as the NNCLR config gives \(H, W, bands\), got shape \(2, 24, 24, 3\)"):
        model.train_step(tf.zeros((2, 24, 24, 3)))


def test_replica_share_on_one_device_is_the_whole_loss():
    rng = np.random.default_rng(3)
    projections_1, projections_2 = rng.normal(size=(2, 6, 8)).astype(np.float32)
    queue = _unit_rows(rng, (10, 8))
    share, gathered = nnclr_model.replica_nnclr_loss(projections_1, projections_2, queue, 0.1)
    np.testing.assert_allclose(share.numpy(), nnclr_model.nnclr_loss(projections_1, projections_2, queue, 0.1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(gathered.numpy(), projections_1 / np.linalg.norm(projections_1, axis=1, keepdims=True), atol=1e-6)


def test_synchronise_batch_norm_switches_every_layer_and_keeps_the_weights():
    encoder = nnclr_model.build_encoder(TINY_CONFIG)
    weights = encoder.get_weights()
    norms = [layer for layer in encoder.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert nnclr_model.synchronise_batch_norm(encoder) == len(norms) > 0
    assert all(layer.synchronized for layer in norms)
    assert nnclr_model.synchronise_batch_norm(encoder, False) == len(norms)
    assert not any(layer.synchronized for layer in norms)
    for before, after in zip(weights, encoder.get_weights()):
        np.testing.assert_array_equal(before, after)


# Two NNCLR steps on one device and under MirroredStrategy on two logical CPU devices, with the
# same seed (so the same random views), the batch normalisation synchronised across replicas
# as nnclr_train.py does it, and float64 arithmetic: in float32 the weights differ by
# ~2e-3 after two steps (Adam or SGD), from rounding alone: the synchronised batch variance
# E[x^2] - E[x]^2 of the tiny batch is summed in another order, and its gradient amplifies the
# difference. In float64 the same steps agree to ~1e-13.
MIRRORED_NNCLR_STEPS = """
import sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import common, nnclr_model
keras.config.set_floatx("float64")
config = nnclr_model.TINY_CONFIG
images = np.random.default_rng(0).normal(0, 1, (16, 24, 24, 5))
runs = {}
for name, strategy_name in (("one", "default"), ("mirrored", "mirrored")):
    strategy = common.make_strategy(strategy_name)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = nnclr_model.NNCLR(config, seed=0)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
    nnclr_model.synchronise_batch_norm(model.encoder, strategy.num_replicas_in_sync > 1)
    initial = [variable.numpy().copy() for variable in model.trainable_weights]
    history = model.fit(tf.data.Dataset.from_tensor_slices(images).batch(8), epochs=1, verbose=0)
    runs[name] = {variable.path: variable.numpy() for variable in model.weights if "seed_generator" not in variable.path}
    print(name, "replicas", strategy.num_replicas_in_sync)
    print(name, "moved", max(float(np.abs(a - b.numpy()).max()) for a, b in zip(initial, model.trainable_weights)))
queues = [next(value for path, value in runs[run].items() if path.endswith("support_queue")) for run in runs]
print("mirrored queue", float(np.abs(queues[0] - queues[1]).max()))
print("mirrored weights", max(float(np.abs(a - b).max()) for a, b in zip(*(run.values() for run in runs.values()))))
"""


def test_mirrored_nnclr_steps_match_one_device(tmp_path):
    result = subprocess.run([sys.executable, "-c", MIRRORED_NNCLR_STEPS], capture_output=True, text=True, timeout=600,
                            cwd=pathlib.Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    figures = {tuple(line.split()[:2]): line.split()[2] for line in result.stdout.splitlines() if len(line.split()) == 3}
    assert figures["one", "replicas"] == "1" and figures["mirrored", "replicas"] == "2"
    assert float(figures["one", "moved"]) > 1e-4  # the steps did train
    # The queue holds both steps' gathered projections in batch order, and the weights (with
    # the batch-normalisation moving statistics) are the one-device ones.
    assert float(figures["mirrored", "queue"]) < 1e-5
    assert float(figures["mirrored", "weights"]) < 1e-5


def test_a_run_config_that_is_missing_or_not_json_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="config.json: missing; the run folder must be an nnclr_train.py --out-dir"):
        nnclr_model.load_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: not an NNCLR run configuration \(not JSON"):
        nnclr_model.load_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="no 'nnclr' entry"):
        nnclr_model.load_config(tmp_path / "config.json")
    nnclr_model.save_config(TINY_CONFIG, tmp_path / "config.json")
    with pytest.raises(ValueError, match="no 'band_scale' entry"):
        nnclr_model.load_config(tmp_path / "config.json")
    for scale in ([1.0, 2.0], [1.0, 2.0, 3.0, 4.0, -5.0], "x", [1.0, 2.0, 3.0, 4.0, None]):
        nnclr_model.save_config(TINY_CONFIG, tmp_path / "config.json", band_scale=scale)
        with pytest.raises(ValueError, match="band_scale must be 5 finite positive numbers"):
            nnclr_model.load_config(tmp_path / "config.json")
    values = {"nnclr": {**TINY_CONFIG.to_dict(), "crop_size": "big"}, "band_scale": [1.0] * 5}
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match="config.json: not an NNCLR run configuration"):
        nnclr_model.load_config(tmp_path / "config.json")
