"""The ICL model: architecture, the Beta mixture against scipy, save/load round trips."""

import keras
import numpy as np
import pytest
from scipy import stats

import augmentations
import common
import model
import resnet_cifar10_v2


def _scipy_mixture(params):
    logits, alpha, beta = (t.numpy().astype(np.float64) for t in model.mixture_parameters(params))
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True), alpha, beta


@pytest.fixture(scope="module")
def random_params():
    return np.random.default_rng(7).normal(0.0, 1.5, size=(12, 48)).astype(np.float32)


def test_full_size_model_has_published_size():
    icl_model = model.build_icl_model(model.PAPER)
    assert icl_model.count_params() == 2_269_120
    assert icl_model.output_shape == (None, 48)
    # The encoder ends at the 56x56 feature map; the ICL model pools it.
    assert icl_model.get_layer(model.ENCODER_NAME).output_shape == (None, 56, 56, 256)
    assert icl_model.get_layer(model.POOLING_NAME).output.shape == (None, 256)
    assert model.feature_map(icl_model).shape == (None, 56, 56, 256)


def test_testing_config_builds_small_model():
    icl_model = model.build_icl_model(model.TINY, augment=True, seed=1)
    out = icl_model(np.zeros((2, 32, 32, 1), np.float32))
    assert out.shape == (2, 3 * model.TINY.n_components)


def test_density_matches_scipy(random_params):
    grid = np.linspace(0.01, 0.99, 41)
    weights, alpha, beta = _scipy_mixture(random_params)
    expected = (weights[:, None, :] * stats.beta.pdf(grid[None, :, None], alpha[:, None, :], beta[:, None, :])).sum(-1)
    closed_form = model.mixture_pdf(random_params, grid).numpy()
    via_tfp = np.exp(model.beta_mixture(random_params[:, None, :]).log_prob(grid[None, :].astype(np.float32)).numpy())
    np.testing.assert_allclose(closed_form, expected, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(via_tfp, expected, rtol=2e-4, atol=1e-5)


def test_summary_matches_scipy_to_grid_step(random_params):
    step = 1e-3
    summary = model.summarise(random_params, step=step)
    weights, alpha, beta = _scipy_mixture(random_params)
    fine = np.linspace(0, 1, 200_001)
    for i in range(len(random_params)):
        components = stats.beta(alpha[i][:, None], beta[i][:, None])
        pdf = (weights[i][:, None] * components.pdf(fine[None, :])).sum(0)
        cdf = (weights[i][:, None] * components.cdf(fine[None, :])).sum(0)
        assert abs(summary["mode"][i] - fine[pdf.argmax()]) <= step
        assert abs(summary["p15"][i] - fine[np.searchsorted(cdf, 0.15)]) <= step
        assert abs(summary["p85"][i] - fine[np.searchsorted(cdf, 0.85)]) <= step
        assert summary["mean"][i] == pytest.approx((weights[i] * alpha[i] / (alpha[i] + beta[i])).sum(), abs=1e-6)
        assert summary["p15"][i] < summary["p85"][i]


def test_known_mode_of_single_dominant_component():
    # One component with weight ~1, alpha = 3, beta = 9: mode (a - 1) / (a + b - 2) = 0.2.
    raw = lambda value: np.log(np.expm1(value - 1.0))  # inverse of 1 + softplus
    params = np.zeros((1, 48), np.float32)
    params[0, :16] = -50.0
    params[0, 0] = 50.0
    params[0, 16] = raw(3.0)
    params[0, 32] = raw(9.0)
    summary = model.summarise(params, step=1e-4)
    # One grid step plus float32 rounding of the flat top.
    assert summary["mode"][0] == pytest.approx(0.2, abs=1.01e-4)
    assert summary["mean"][0] == pytest.approx(0.25, abs=1e-6)


def test_negative_log_likelihood_matches_scipy_and_clamps(random_params):
    labels = np.linspace(0.05, 0.9, len(random_params))
    weights, alpha, beta = _scipy_mixture(random_params)
    expected = -np.log((weights * stats.beta.pdf(labels[:, None], alpha, beta)).sum(-1))
    nll = model.negative_log_likelihood(labels, random_params).numpy()
    np.testing.assert_allclose(nll, expected, rtol=1e-4)
    edge = model.negative_log_likelihood(np.array([0.0, 1.0]), random_params[:2]).numpy()
    assert np.isfinite(edge).all()


def test_negative_log_likelihood_matches_tensorflow_probability():
    """The direct NLL (log-sum-exp of log w_k plus the Beta log-density) against TFP's mixture,
    up to the Beta parameters of a narrow predicted distribution (the shipped heads reach 500)."""
    rng = np.random.default_rng(8)
    params = np.concatenate([rng.normal(0.0, 2.0, (500, 16)), rng.uniform(-3.0, 800.0, (500, 32))], axis=1)
    params = params.astype(np.float32)
    labels = rng.uniform(0.0, 1.0, 500).astype(np.float32)
    labels[:2] = 0.0, 1.0
    direct = model.negative_log_likelihood(labels, params).numpy()
    clamped = np.clip(labels, model.LABEL_FLOOR, model.LABEL_CEILING).astype(np.float32)
    via_tfp = -model.beta_mixture(params).log_prob(clamped).numpy()
    assert np.isfinite(direct).all()
    np.testing.assert_allclose(direct, via_tfp, rtol=1e-5, atol=1e-4)


def test_loss_is_float32_for_a_bfloat16_head(random_params):
    labels = np.linspace(0.05, 0.9, len(random_params)).astype(np.float32)
    loss = model.BetaMixtureNLL()(labels, keras.ops.cast(random_params, "bfloat16"))
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"
    rounded = keras.ops.cast(keras.ops.cast(random_params, "bfloat16"), "float32")
    assert float(loss) == pytest.approx(float(np.mean(model.negative_log_likelihood(labels, rounded))), rel=1e-6)


def test_summary_rejects_bad_grid():
    with pytest.raises(ValueError, match="grid step must be in"):
        model.summary_grid(0.0)


def test_predictor_equals_model_then_summary():
    icl_model = model.build_icl_model(model.TINY)
    images = np.random.default_rng(0).normal(1.0, 1.0, (3, 32, 32, 1)).astype(np.float32)
    direct = model.summarise(icl_model.predict(images, verbose=0))
    compiled = model.Predictor(icl_model)(images)
    for key in ("mode", "p15", "p85", "mean"):
        np.testing.assert_allclose(compiled[key], direct[key], atol=1e-5)


def test_weights_round_trip(tmp_path):
    icl_model = model.build_icl_model(model.TINY, augment=True, seed=0)
    path = tmp_path / "tiny.weights.h5"
    model.save_weights(icl_model, path, model.TINY)
    loaded = model.load_icl_model(path)
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(loaded(images), icl_model(images, training=False), atol=1e-6)
    assert not any("augmentation" in layer.name for layer in loaded.layers)
    assert not list(tmp_path.glob(".*partial*"))


def test_whole_model_round_trip(tmp_path):
    icl_model = model.build_icl_model(model.TINY, augment=True, seed=0)
    path = tmp_path / "tiny.keras"
    common.save_keras_model(icl_model, path)
    assert model.read_config(path) == model.TINY
    loaded = model.load_icl_model(path)
    images = np.random.default_rng(2).normal(size=(2, 32, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(loaded(images), icl_model(images, training=False), atol=1e-6)


def _model_with_pooling_in_the_encoder(config):
    """The ICL model as built before the pooling left the encoder (the shipped checkpoints')."""
    inputs = keras.Input((config.image_size, config.image_size, 1), name="image")
    x = augmentations.icl_normalisation()(inputs)
    size = (config.image_size, config.image_size, 1)
    x = resnet_cifar10_v2.build_resnet_v2(size, n_blocks=config.n_blocks, name=model.ENCODER_NAME)(x)
    x = keras.layers.Dense(config.hidden_units, activation="relu", name="hidden")(x)
    return keras.Model(inputs, keras.layers.Dense(3 * config.n_components, name="mixture_params")(x))


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_checkpoints_of_the_encoder_that_pooled_inside_load_unchanged(tmp_path, suffix):
    keras.utils.set_random_seed(4)
    old = _model_with_pooling_in_the_encoder(model.TINY)
    path = tmp_path / f"old{suffix}"
    if suffix == ".keras":
        common.save_keras_model(old, path)
    else:
        model.save_weights(old, path, model.TINY)
    loaded = model.load_icl_model(path)
    images = np.random.default_rng(5).normal(1.0, 1.0, (2, 32, 32, 1)).astype(np.float32)
    np.testing.assert_array_equal(loaded(images), old(images))
    assert model.read_config(path) == model.TINY


def test_default_checkpoint_prefers_the_finetuned_one(tmp_path):
    with pytest.raises(model.CheckpointError, match="train one with train.py and pass it with --checkpoint PATH"):
        model.default_checkpoint(tmp_path)
    for name in reversed(model.SHIPPED_CHECKPOINTS):
        (tmp_path / name).touch()
        assert model.default_checkpoint(tmp_path) == tmp_path / name
    assert model.default_checkpoint().parent == model.CHECKPOINT_DIR


def test_mismatched_checkpoint_is_reported(tmp_path):
    path = tmp_path / "tiny.weights.h5"
    model.save_weights(model.build_icl_model(model.TINY), path, model.TINY)
    other = model.ICLConfig(image_size=32, n_blocks=2, hidden_units=32, n_components=16)
    with pytest.raises(model.CheckpointError, match="does not match the ICL architecture"):
        model.load_icl_model(path, config=other)
    with pytest.raises(model.CheckpointError, match="checkpoint not found"):
        model.load_icl_model(tmp_path / "missing.weights.h5")


def test_freeze_encoder_leaves_head_trainable():
    icl_model = model.freeze_encoder(model.build_icl_model(model.TINY))
    trainable = {v.path.split("/")[0] for v in icl_model.trainable_variables}
    assert trainable == {"hidden", "mixture_params"}


def test_compact_architecture_reads_112_pixel_images():
    compact = model.build_icl_model(model.ARCHITECTURES["compact"])
    assert compact.input_shape == (None, 112, 112, 1)
    # Encoder with N = 2 (562,064) plus the paper's dense head (624,688).
    assert compact.count_params() == 1_186_752


def test_label_prior_head_predicts_the_label_distribution():
    labels = np.random.default_rng(3).normal(0.07, 0.028, 500).clip(0.01, 0.3)
    icl_model = model.build_icl_model(model.TINY)
    images = np.random.default_rng(4).normal(1.0, 0.1, (8, 32, 32, 1)).astype(np.float32)
    before = model.negative_log_likelihood(labels[:8], icl_model(images)).numpy().mean()
    model.set_label_prior(icl_model, labels)
    params = icl_model(images).numpy()
    mean = model.beta_mixture(params).mean().numpy()
    assert np.all(np.abs(mean - labels.mean()) < 0.02)
    after = model.negative_log_likelihood(labels[:8], params).numpy().mean()
    assert after < before - 1.0


def test_label_prior_needs_labels():
    with pytest.raises(ValueError, match="at least 2 finite labels"):
        model.label_prior_bias([0.1], 16)


def test_label_prior_of_identical_labels_is_finite_and_centred():
    """All labels equal (a narrow or degenerate training set): the head starts as a narrow
    distribution at that value, not an overflow to infinite Beta parameters."""
    bias = model.label_prior_bias(np.full(20, 0.1), 16)
    assert np.isfinite(bias).all()
    alpha, beta = 1 + np.logaddexp(0, bias[16:32]), 1 + np.logaddexp(0, bias[32:])
    np.testing.assert_allclose(alpha / (alpha + beta), 0.1, rtol=1e-3)
    # The stable inverse agrees with log(expm1(y)) where that one does not overflow.
    moderate = model.label_prior_bias(np.random.default_rng(0).uniform(0.05, 0.3, 50), 4)
    alpha = 1 + np.logaddexp(0, moderate[4:8])
    np.testing.assert_allclose(np.log(np.expm1(alpha - 1)), moderate[4:8], rtol=1e-5)
