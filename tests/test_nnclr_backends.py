"""NNCLR on the JAX backend, with no TensorFlow: the same representations and loss as on
TensorFlow, and training (NNCLR and the classifier) with ``fit``.

The TensorFlow side runs in this process (the suite's backend); the JAX side runs in a child
process with ``KERAS_BACKEND=jax`` in which importing TensorFlow fails, as on a machine that
has JAX alone. The child records every attempt to import TensorFlow, and the tests fail if
the project's code made one. A backend NNCLR cannot train on (NumPy) still builds and calls
the model, and training it is one clear error.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

import nnclr_model
from nnclr_model import TINY_CONFIG

requires_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                                  reason="JAX is not installed, so the JAX backend cannot be tested")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEMPERATURE = 0.1

# Run first in a child process: a sys.meta_path finder makes every import of tensorflow* (TensorFlow,
# TensorFlow Datasets, ...) or tf_keras fail (ModuleNotFoundError, as when it is not installed) and
# records who asked. An attempt made by a
# file of the project is a failure; Keras's own guarded probes (it asks whether TensorFlow is
# available) are only listed.
NO_TENSORFLOW = r'''
import json
import pathlib
import sys
import traceback

ROOT = pathlib.Path.cwd().resolve()
VENV = pathlib.Path(sys.prefix).resolve()
attempts = []


def is_tensorflow(name):
    top = name.split(".")[0]
    return top.startswith("tensorflow") or top == "tf_keras"


def _is_project_file(filename):
    path = pathlib.Path(filename).resolve()
    return path.is_relative_to(ROOT) and not path.is_relative_to(VENV) and not path.is_relative_to(ROOT / ".venv")


class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if not is_tensorflow(name):
            return None
        frame = sys._getframe(1)
        # The frame that asked: the first one outside the import machinery.
        while frame is not None and (frame.f_code.co_filename.startswith("<frozen importlib")
                                     or frame.f_code.co_filename.endswith(("importlib/__init__.py",))):
            frame = frame.f_back
        importer = frame.f_code.co_filename if frame is not None else "?"
        attempts.append({"module": name, "importer": importer, "project": _is_project_file(importer),
                         "stack": "".join(traceback.format_stack(limit=10))})
        raise ModuleNotFoundError(f"No module named {name!r} (blocked: this process stands for a machine "
                                  "without TensorFlow)", name=name)


sys.meta_path.insert(0, NoTensorFlow())
sys.path.insert(0, str(ROOT))


def tensorflow_report():
    return {
        "tensorflow_imports": [{key: attempt[key] for key in ("module", "importer", "project")} for attempt in attempts],
        "tensorflow_imports_by_project": [attempt["stack"] for attempt in attempts if attempt["project"]],
        "tensorflow_loaded": sorted(name for name in sys.modules if is_tensorflow(name)),
    }
'''

# The JAX side: the checks (a) to (d), results in WORK/results.json.
JAX_SIDE = NO_TENSORFLOW + r'''
work = pathlib.Path(sys.argv[1])
results = {}
try:
    import dataclasses

    import jax
    import keras
    import numpy as np

    import common
    import nnclr_model

    assert keras.backend.backend() == "jax", keras.backend.backend()
    config = nnclr_model.TINY_CONFIG
    inputs = np.load(work / "inputs.npz")

    # (a) The encoder saved on TensorFlow gives the same representations here.
    encoder = nnclr_model.load_encoder(work / "encoder_tf.keras", config)
    np.save(work / "representations_jax.npy", nnclr_model.representations(encoder, inputs["images"], config))

    # (b) The NNCLR loss of fixed projections and queue, and its gradients.
    def loss_of(projections_1, projections_2):
        return nnclr_model.nnclr_loss(projections_1, projections_2, inputs["queue"], float(inputs["temperature"]))

    loss, gradients = jax.value_and_grad(loss_of, argnums=(0, 1))(inputs["projections_1"], inputs["projections_2"])
    results["loss"] = float(loss)
    np.save(work / "loss_gradients_jax.npy", np.stack([np.asarray(gradient) for gradient in gradients]))

    # (c) A tiny NNCLR trains with fit: 2 epochs of 2 batches of 8.
    tiny = dataclasses.replace(config, queue_size=48)
    images = inputs["train_images"]
    keras.utils.set_random_seed(0)
    model = nnclr_model.NNCLR(tiny, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    queue_before = np.array(model.queue.numpy())
    trainable_before = [np.array(variable.numpy()) for variable in model.trainable_variables]
    statistics_before = [np.array(variable.numpy()) for variable in model.encoder.non_trainable_variables]
    history = model.fit(images, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    queue = np.array(model.queue.numpy())
    results["history"] = {name: [float(value) for value in values] for name, values in history.items()}
    results["pushed"] = 2 * len(images)
    results["queue_changed"] = float(np.abs(queue - queue_before).max())
    results["queue_shift_error"] = float(np.abs(queue[results["pushed"]:] - queue_before[: tiny.queue_size - results["pushed"]]).max())
    results["queue_norm_error"] = float(np.abs(np.linalg.norm(queue[: results["pushed"]], axis=1) - 1).max())
    results["weights_changed"] = max(float(np.abs(before - np.array(variable.numpy())).max())
                                     for before, variable in zip(trainable_before, model.trainable_variables))
    results["statistics_changed"] = max(float(np.abs(before - np.array(variable.numpy())).max())
                                        for before, variable in zip(statistics_before, model.encoder.non_trainable_variables))
    evaluation = model.evaluate(images, batch_size=8, verbose=0, return_dict=True)
    results["evaluation"] = {name: float(value) for name, value in evaluation.items()}
    results["queue_unchanged_by_evaluation"] = bool(np.array_equal(np.array(model.queue.numpy()), queue))

    # The trained encoder, for the TensorFlow side to load.
    nnclr_model.save_encoder(model.encoder, work / "encoder_jax.keras")
    np.save(work / "representations_trained_jax.npy", nnclr_model.representations(model.encoder, inputs["images"], config))

    # (d) A linear probe on the encoder trains and predicts; it saves and loads.
    encoder_before = [np.array(weight) for weight in model.encoder.get_weights()]
    classifier = nnclr_model.build_classifier(model.encoder, tiny, seed=0)
    classifier.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    dense_before = np.array(classifier.get_layer("tidal_probability").get_weights()[0])
    labels = np.array([0, 1] * (len(images) // 2), np.float32)
    classifier_history = classifier.fit(images, labels, batch_size=8, epochs=2, verbose=0).history
    scores = classifier.predict(inputs["images"], batch_size=4, verbose=0)
    results["classifier_losses"] = [float(value) for value in classifier_history["loss"]]
    results["scores_shape"] = list(scores.shape)
    results["scores_in_range"] = bool(np.all((scores >= 0) & (scores <= 1)))
    results["dense_changed"] = float(np.abs(np.array(classifier.get_layer("tidal_probability").get_weights()[0]) - dense_before).max())
    results["encoder_frozen"] = all(np.array_equal(before, np.array(after))
                                    for before, after in zip(encoder_before, model.encoder.get_weights()))
    common.save_keras_model(classifier, work / "classifier_jax.keras")
    loaded = nnclr_model.load_classifier(work / "classifier_jax.keras", tiny)
    results["loaded_classifier_error"] = float(np.abs(loaded.predict(inputs["images"], batch_size=4, verbose=0) - scores).max())
    original = nnclr_model.original_view_scores(classifier, tiny, inputs["images"], seed=0, batch_size=4)
    results["original_view_scores_shape"] = list(original.shape)
    ids = np.array([f"g{i}" for i in range(len(inputs["images"]))])
    search = nnclr_model.similarity_search(model.encoder, tiny, inputs["images"], ids, np.zeros(len(ids), int), "g0", 3)
    results["similar"] = [entry["id"] for entry in search["top"]]

    # The tf.distribute-only helpers are one clear error here.
    errors = []
    for helper in (lambda: nnclr_model.synchronise_batch_norm(model.encoder, True),
                   lambda: nnclr_model.replica_nnclr_loss(inputs["projections_1"], inputs["projections_2"], inputs["queue"], 0.1)):
        try:
            helper()
        except ValueError as error:
            errors.append(str(error))
    results["tensorflow_only_errors"] = errors
    results["unsynchronised"] = nnclr_model.synchronise_batch_norm(model.encoder, False)
finally:
    results.update(tensorflow_report())
    (work / "results.json").write_text(json.dumps(results))
'''

# A backend NNCLR does not train on: the model builds and gives representations; training is one line.
NUMPY_SIDE = NO_TENSORFLOW + r'''
import keras
import numpy as np

import nnclr_model

assert keras.backend.backend() == "numpy", keras.backend.backend()
model = nnclr_model.NNCLR(nnclr_model.TINY_CONFIG, seed=0)
results = {"shape": list(model(np.zeros((2, 24, 24, 5), np.float32)).shape)}
model.compile(optimizer=keras.optimizers.Adam())
try:
    model.train_step(np.zeros((8, 24, 24, 5), np.float32))
except ValueError as error:
    results["error"] = str(error)
results.update(tensorflow_report())
print(json.dumps(results))
'''


def _unit_rows(rng, shape):
    rows = rng.normal(size=shape)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _randomise_batch_norm(model, rng):
    """Give every BatchNormalization layer non-trivial scales, offsets and moving statistics."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
                rng.normal(0, 0.1, beta.shape).astype(np.float32),
                rng.normal(0, 0.1, mean.shape).astype(np.float32),
                rng.uniform(0.5, 2.0, variance.shape).astype(np.float32),
            ])
        elif isinstance(layer, keras.Model):
            _randomise_batch_norm(layer, rng)


def _run_child(script, backend, *arguments):
    environment = {**os.environ, "KERAS_BACKEND": backend, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", script, *arguments], check=False, capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=environment)


@pytest.fixture(scope="module")
def both_backends(tmp_path_factory):
    """Run the TensorFlow side here and the JAX side in a child process without TensorFlow."""
    import tensorflow as tf

    assert keras.backend.backend() == "tensorflow", "the suite runs on the TensorFlow backend"
    work = tmp_path_factory.mktemp("nnclr_backends")
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    encoder = nnclr_model.build_encoder(TINY_CONFIG)
    _randomise_batch_norm(encoder, rng)
    nnclr_model.save_encoder(encoder, work / "encoder_tf.keras")
    images = rng.normal(size=(6, *TINY_CONFIG.input_shape)).astype(np.float32)
    projections_1 = rng.normal(size=(8, TINY_CONFIG.projection_dim)).astype(np.float32)
    projections_2 = (projections_1 + 0.5 * rng.normal(size=projections_1.shape)).astype(np.float32)
    queue = _unit_rows(rng, (24, TINY_CONFIG.projection_dim))
    variables = [tf.Variable(projections_1), tf.Variable(projections_2)]
    with tf.GradientTape() as tape:
        loss = nnclr_model.nnclr_loss(*variables, queue, TEMPERATURE)
    gradients = np.stack([gradient.numpy() for gradient in tape.gradient(loss, variables)])
    np.savez(work / "inputs.npz", images=images, projections_1=projections_1, projections_2=projections_2, queue=queue,
             temperature=TEMPERATURE, train_images=rng.normal(size=(16, *TINY_CONFIG.input_shape)).astype(np.float32))
    child = _run_child(JAX_SIDE, "jax", str(work))
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    assert child.returncode == 0, f"the JAX side failed; TensorFlow imports {results.get('tensorflow_imports')}:\n" + child.stderr[-4000:]
    return {
        "work": work,
        "results": results,
        "representations_tf": nnclr_model.representations(encoder, images, TINY_CONFIG),
        "loss_tf": float(loss),
        "loss_gradients_tf": gradients,
        "images": images,
    }


@requires_jax
def test_the_jax_side_never_imports_tensorflow(both_backends):
    results = both_backends["results"]
    assert results["tensorflow_imports_by_project"] == []
    assert results["tensorflow_loaded"] == []


@requires_jax
def test_an_encoder_saved_on_tensorflow_gives_the_same_representations_on_jax(both_backends):
    on_jax = np.load(both_backends["work"] / "representations_jax.npy")
    on_tf = both_backends["representations_tf"]
    assert on_jax.shape == on_tf.shape == (6, TINY_CONFIG.representation_dim)
    assert np.abs(on_tf).max() > 0.1  # not a trivial output
    np.testing.assert_allclose(on_jax, on_tf, rtol=1e-4, atol=1e-4)


@requires_jax
def test_an_encoder_trained_on_jax_gives_the_same_representations_on_tensorflow(both_backends):
    encoder = nnclr_model.load_encoder(both_backends["work"] / "encoder_jax.keras", TINY_CONFIG)
    on_tf = nnclr_model.representations(encoder, both_backends["images"], TINY_CONFIG)
    np.testing.assert_allclose(np.load(both_backends["work"] / "representations_trained_jax.npy"), on_tf, rtol=1e-4, atol=1e-4)


@requires_jax
def test_the_nnclr_loss_and_its_gradients_are_the_same_on_both_backends(both_backends):
    np.testing.assert_allclose(both_backends["results"]["loss"], both_backends["loss_tf"], rtol=1e-5)
    np.testing.assert_allclose(np.load(both_backends["work"] / "loss_gradients_jax.npy"), both_backends["loss_gradients_tf"],
                               rtol=1e-4, atol=1e-6)


@requires_jax
def test_a_tiny_nnclr_trains_with_fit_on_jax(both_backends):
    results = both_backends["results"]
    history = results["history"]
    assert set(history) == {"loss", "c_loss", "c_acc", "r_acc"} and len(history["loss"]) == 2
    assert np.all(np.isfinite(history["loss"])) and history["loss"] == history["c_loss"]
    # Four steps pushed 32 unit rows at the front of the 48-row queue; the first 16 moved back.
    assert results["queue_changed"] > 0.1
    assert results["queue_shift_error"] == 0.0
    assert results["queue_norm_error"] < 1e-5
    assert results["weights_changed"] > 1e-4
    assert results["statistics_changed"] > 0  # the batch-normalisation moving statistics
    assert np.isfinite(results["evaluation"]["loss"]) and results["queue_unchanged_by_evaluation"]


@requires_jax
def test_a_classifier_on_the_encoder_trains_and_predicts_on_jax(both_backends):
    results = both_backends["results"]
    assert np.all(np.isfinite(results["classifier_losses"]))
    assert results["scores_shape"] == [6, 1] and results["scores_in_range"]
    assert results["dense_changed"] > 0 and results["encoder_frozen"]
    assert results["loaded_classifier_error"] < 1e-6
    assert results["original_view_scores_shape"] == [6]
    assert len(results["similar"]) == 3 and "g0" not in results["similar"]


@requires_jax
def test_the_tf_distribute_helpers_are_one_clear_error_on_jax(both_backends):
    results = both_backends["results"]
    needs = "needs the TensorFlow backend (KERAS_BACKEND=tensorflow); this run uses jax"
    assert results["tensorflow_only_errors"] == [f"synchronised batch normalisation {needs}",
                                                 f"the replica share of the NNCLR loss {needs}"]
    assert results["unsynchronised"] > 0


def test_another_backend_calls_the_model_and_refuses_training_in_one_line():
    child = _run_child(NUMPY_SIDE, "numpy")
    assert child.returncode == 0, child.stderr[-4000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    assert results["shape"] == [2, TINY_CONFIG.representation_dim]
    assert results["error"] == ("NNCLR training supports the Keras backends tensorflow, jax, not numpy; set KERAS_BACKEND "
                                "to one of them")
    assert results["tensorflow_imports_by_project"] == [] and results["tensorflow_loaded"] == []
