"""The backend shims (backends.py) and the ICL model on the JAX backend, without TensorFlow.

The shims are checked against SciPy on the backend of this process (TensorFlow). The JAX
backend runs in a child process (``KERAS_BACKEND=jax``) where an import hook refuses every
import of TensorFlow, TensorFlow Probability or TensorFlow Datasets, as on a machine that has
JAX but no TensorFlow: the child records every attempt with its call stack, and one made from
a project module, at module level or lazily inside a function, fails the test. There the
shipped checkpoint must give what it gives on TensorFlow (mixture parameters, summaries, NLL,
GradCAM heat maps), and the tiny model must train with ``fit``, in float32 and mixed bfloat16.
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
from keras import ops
from scipy import special, stats

import backends
import model

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKPOINT = model.CHECKPOINT_DIR / "icl_trained.weights.h5"
#: Largest error of the native float32 I_x(a, b) for a, b <= 1000 (TensorFlow's and JAX's
#: both about 4e-4 there: their prefactor subtracts log-gammas), and of the continued fraction.
BETAINC_ATOL, CONTINUED_FRACTION_ATOL = 1e-3, 5e-5
#: Labels of the NLL comparison, one per image.
LABELS = np.array([0.05, 0.12, 0.2, 0.35], np.float32)


def _images():
    """Four prepared-looking images at the shipped checkpoint's size (112 px)."""
    size = model.read_config(CHECKPOINT).image_size
    return np.random.default_rng(11).normal(1.0, 1.0, (len(LABELS), size, size, 1)).astype(np.float32)


def _shim_arguments():
    """Beta parameters from 1 to 1000 (the shipped heads predict 10 to 500) and points in [0, 1]."""
    rng = np.random.default_rng(0)
    a = np.exp(rng.uniform(0.0, np.log(1000.0), 300)).astype(np.float32)
    b = np.exp(rng.uniform(0.0, np.log(1000.0), 300)).astype(np.float32)
    x = rng.uniform(0.0, 1.0, 300).astype(np.float32)
    x[:4] = [0.0, 1.0, 1e-6, 1.0 - 1e-6]
    return a, b, x


# ----------------------------------------------------------------------------------------
# The shims, on this process's backend


def test_backend_name_and_device():
    assert backends.backend() == keras.backend.backend()
    assert isinstance(backends.has_gpu(), bool)
    assert model.default_micro_batch() == (None if backends.has_gpu() else 1)


def test_lgamma_and_log_beta_match_scipy():
    a, b, _ = _shim_arguments()
    np.testing.assert_allclose(ops.convert_to_numpy(backends.lgamma(a)), special.gammaln(a.astype(np.float64)),
                               rtol=2e-6, atol=2e-6)
    # Stirling's cancellation keeps log B to float32 precision where subtracting log-gammas loses 1e-4.
    expected = special.betaln(a.astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(ops.convert_to_numpy(backends.log_beta_function(a, b)), expected, rtol=5e-6, atol=5e-6)


def test_log_beta_gradient_is_right_in_every_branch_and_at_their_edges():
    a = np.array([1.0, 3.0, 7.9, 8.0, 12.0, 30.0, 500.0], np.float32)
    for b in (8.0, 12.0):  # a = b and a = 8 are the edges of the branches
        _, _, gradient = backends.value_and_gradient(lambda a, b=b: (backends.log_beta_function(a, b * ops.ones_like(a)), a), a)
        expected = special.digamma(a.astype(np.float64)) - special.digamma(a.astype(np.float64) + b)
        np.testing.assert_allclose(ops.convert_to_numpy(gradient), expected, rtol=1e-3, atol=1e-5)


def test_betainc_broadcasts_and_matches_scipy():
    a, b, x = _shim_arguments()
    expected = special.betainc(a.astype(np.float64), b.astype(np.float64), x.astype(np.float64))
    np.testing.assert_allclose(ops.convert_to_numpy(backends.betainc(a, b, x)), expected, atol=BETAINC_ATOL)
    # (3, 1) against (4,): the result is (3, 4), as NumPy broadcasts.
    grid = np.linspace(0.0, 1.0, 4, dtype=np.float32)
    alpha = np.array([[2.0], [5.0], [40.0]], np.float32)
    result = ops.convert_to_numpy(backends.betainc(alpha, 3.0 * np.ones_like(alpha), grid))
    np.testing.assert_allclose(result, stats.beta.cdf(grid, alpha, 3.0), atol=1e-6)


def test_continued_fraction_fallback_matches_scipy():
    a, b, x = _shim_arguments()
    expected = special.betainc(a.astype(np.float64), b.astype(np.float64), x.astype(np.float64))
    result = ops.convert_to_numpy(backends.betainc_continued_fraction(a, b, x))
    np.testing.assert_allclose(result, expected, atol=CONTINUED_FRACTION_ATOL)
    assert result[0] == 0.0 and result[1] == 1.0


def test_value_and_gradient_of_a_sum_per_row():
    x = np.array([[1.0, 2.0], [3.0, -1.0]], np.float32)
    score, aux, gradient = backends.value_and_gradient(lambda x: (ops.sum(x**3, axis=-1), 2.0 * x), x)
    np.testing.assert_allclose(ops.convert_to_numpy(score), [9.0, 26.0])
    np.testing.assert_allclose(ops.convert_to_numpy(aux), 2.0 * x)
    np.testing.assert_allclose(ops.convert_to_numpy(gradient), 3.0 * x**2)


def test_compiled_function_reads_the_current_weights():
    layer = keras.layers.Dense(1, use_bias=False)
    layer.build((None, 2))
    layer.kernel.assign(np.ones((2, 1), np.float32))
    compiled = backends.compile_function(lambda x: layer(x), variables=layer.variables)
    x = np.array([[1.0, 2.0]], np.float32)
    assert float(ops.convert_to_numpy(compiled(x))[0, 0]) == 3.0
    layer.kernel.assign(np.full((2, 1), 2.0, np.float32))
    assert float(ops.convert_to_numpy(compiled(x))[0, 0]) == 6.0


#: The tests above, which hold on every backend: the JAX child runs them too.
SHIM_TESTS = [name for name in list(globals()) if name.startswith("test_")]


# ----------------------------------------------------------------------------------------
# The JAX backend in a process without TensorFlow

#: Run by the child process: argv[1] the output folder.
JAX_CHILD = r'''
import importlib.abc
import json
import pathlib
import sys
import traceback

BLOCKED = ("tensorflow", "tensorflow_probability", "tensorflow_datasets", "tf_keras")
attempts = []


class RefuseTensorFlow(importlib.abc.MetaPathFinder):
    """Refuses TensorFlow's packages, as if they were not installed, and records who asked."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            stack = [f"{frame.filename}:{frame.lineno}" for frame in traceback.extract_stack()[:-1]
                     if "importlib" not in frame.filename]
            attempts.append({"module": name, "stack": stack})
            raise ImportError(f"{name} is not available here (the JAX backend must not import it)")
        return None


sys.meta_path.insert(0, RefuseTensorFlow())
out = pathlib.Path(sys.argv[1])

import keras
import numpy as np

import backends
import model

results, report = {}, {"backend": keras.backend.backend()}
checkpoint, labels, images = sys.argv[2], np.array(json.loads(sys.argv[3]), np.float32), np.load(out / "images.npy")

# The shipped checkpoint: parameters, summaries and heat maps from the compiled Predictor and
# from the eager functions, the NLL.
icl_model = model.load_icl_model(checkpoint)
predictor = model.Predictor(icl_model, gradcam=True, micro_batch=None)
results["params"] = keras.ops.convert_to_numpy(predictor.parameters(images))
for key, value in predictor(images).items():
    results[f"predictor_{key}"] = value
heatmaps, params = model.gradcam_heatmaps(icl_model, images)
results["gradcam_heatmaps"], results["gradcam_params"] = heatmaps, params
for key, value in model.summarise(params).items():
    results[f"summary_{key}"] = value
results["nll"] = keras.ops.convert_to_numpy(model.negative_log_likelihood(labels, params))
plain = model.Predictor(icl_model, micro_batch=2)(images)
for key, value in plain.items():
    results[f"plain_{key}"] = value

# The shims' tests of this file, on JAX.
sys.path.insert(0, str(pathlib.Path(checkpoint).resolve().parents[1] / "tests"))
import test_backends

report["shim_tests"] = {}
for name in test_backends.SHIM_TESTS:
    try:
        getattr(test_backends, name)()
        report["shim_tests"][name] = "passed"
    except Exception:
        report["shim_tests"][name] = traceback.format_exc()
try:
    model.beta_mixture(params)
except RuntimeError as error:
    report["beta_mixture_error"] = str(error)

# The tiny model trains with fit and the Beta-mixture loss, in float32 and in mixed bfloat16.
rng = np.random.default_rng(0)
train_images = rng.normal(1.0, 1.0, (32, 32, 32, 1)).astype(np.float32)
train_labels = rng.uniform(0.05, 0.3, 32).astype(np.float32)
for policy in ("float32", "mixed_bfloat16"):
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    tiny = model.build_icl_model(model.TINY, augment=True, seed=0)
    tiny.compile(optimizer=keras.optimizers.Adam(1e-3), loss=model.BetaMixtureNLL())
    epochs = 4 if policy == "float32" else 1
    history = tiny.fit(train_images, train_labels, batch_size=8, epochs=epochs, verbose=0)
    report[policy] = {"losses": [float(loss) for loss in history.history["loss"]],
                      "output_dtype": str(keras.ops.convert_to_numpy(tiny(train_images[:1])).dtype)}
# The bfloat16 head's output goes through the summary and GradCAM in float32.
summary = model.Predictor(tiny, gradcam=True, micro_batch=None)(train_images[:2])
report["mixed_bfloat16"]["summary_dtypes"] = sorted({str(value.dtype) for value in summary.values()})
report["mixed_bfloat16"]["summary_finite"] = bool(all(np.isfinite(value).all() for value in summary.values()))
keras.mixed_precision.set_global_policy("float32")

report["attempts"] = attempts
report["loaded"] = sorted(name for name in sys.modules if name.partition(".")[0] in BLOCKED)
np.savez(out / "results.npz", **results)
(out / "report.json").write_text(json.dumps(report))
'''


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    """The child's results (arrays) and report (dict), run once for the tests below."""
    if importlib.util.find_spec("jax") is None:
        pytest.skip("JAX is not installed: the JAX backend cannot be checked")
    out = tmp_path_factory.mktemp("jax")
    np.save(out / "images.npy", _images())
    # CPU: the comparison with TensorFlow's float32 CPU kernels holds to 1e-4 there (a GPU may
    # multiply float32 matrices in TF32).
    environment = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    command = [sys.executable, "-c", JAX_CHILD, str(out), str(CHECKPOINT), json.dumps(LABELS.tolist())]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=environment, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    with np.load(out / "results.npz") as arrays:
        return dict(arrays), report


@pytest.fixture(scope="module")
def tensorflow_run():
    """The same quantities from this process's backend (TensorFlow)."""
    images = _images()
    icl_model = model.load_icl_model(CHECKPOINT)
    heatmaps, params = model.gradcam_heatmaps(icl_model, images)
    results = {"params": ops.convert_to_numpy(icl_model(images)), "gradcam_heatmaps": heatmaps,
               "nll": ops.convert_to_numpy(model.negative_log_likelihood(LABELS, params))}
    results.update({f"summary_{key}": value for key, value in model.summarise(params).items()})
    return results


def _from_the_project(attempt):
    """Whether a refused import was asked for by a project file (Keras probes for TensorFlow
    itself, as in ``keras.utils.set_random_seed``, and carries on without it)."""
    files = [frame.rpartition(":")[0] for frame in attempt["stack"]]
    return any(file.startswith(str(ROOT)) and ".venv" not in pathlib.Path(file).parts for file in files)


def test_jax_never_imports_tensorflow(jax_run):
    _, report = jax_run
    assert report["backend"] == "jax"
    assert report["loaded"] == []
    from_project = [attempt for attempt in report["attempts"] if _from_the_project(attempt)]
    assert from_project == [], json.dumps(from_project, indent=1)
    assert "needs the TensorFlow backend" in report["beta_mixture_error"]


def test_jax_gives_the_tensorflow_parameters_summaries_nll_and_heatmaps(jax_run, tensorflow_run):
    jax_results, _ = jax_run
    for params in (jax_results["params"], jax_results["gradcam_params"]):
        np.testing.assert_allclose(params, tensorflow_run["params"], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(jax_results["nll"], tensorflow_run["nll"], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(jax_results["gradcam_heatmaps"], tensorflow_run["gradcam_heatmaps"], atol=1e-4)
    np.testing.assert_allclose(jax_results["predictor_heatmaps"], tensorflow_run["gradcam_heatmaps"], atol=1e-4)
    for source in ("summary", "predictor", "plain"):
        for key in ("mean", "p15", "p85"):
            np.testing.assert_allclose(jax_results[f"{source}_{key}"], tensorflow_run[f"summary_{key}"], atol=1e-4)
        # The mode is a grid point: a near tie may move it by one step.
        np.testing.assert_allclose(jax_results[f"{source}_mode"], tensorflow_run["summary_mode"],
                                   atol=model.GRID_STEP + 1e-6)


@pytest.mark.parametrize("name", SHIM_TESTS)
def test_the_shim_tests_pass_on_jax(jax_run, name):
    _, report = jax_run
    assert report["shim_tests"][name] == "passed", report["shim_tests"][name]


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_tiny_model_trains_on_jax(jax_run, policy):
    _, report = jax_run
    run = report[policy]
    assert run["losses"] and np.isfinite(run["losses"]).all()
    if policy == "float32":
        assert run["output_dtype"] == "float32"
        assert run["losses"][-1] < run["losses"][0]
    else:
        assert run["output_dtype"] == "bfloat16"
        # The head's bfloat16 output is cast to float32 before the summary.
        assert run["summary_dtypes"] == ["float32"] and run["summary_finite"]
