"""The ICL-fraction regressor of Canepa et al. 2025 (ApJ, arXiv:2501.08378) in Keras 3.

A ResNet v2 encoder reads a prepared 224x224 r-band cluster image (see ``prep_data``) and a
dense head turns its 256-d representation into the 3 K parameters of a mixture of K = 16
Beta distributions over the ICL fraction:

    logits = p[:K],  alpha = 1 + softplus(p[K:2K]),  beta = 1 + softplus(p[2K:])

The model's output is the raw parameter vector; the distribution, its negative
log-likelihood and its summaries (mode = the estimate, 15th and 85th percentiles = the
uncertainty, mean) are pure functions of that vector, vectorised over a batch and a grid.

Everything is written with ``keras.ops`` and Keras layers, so the model trains and predicts on
any Keras 3 backend (``KERAS_BACKEND``: TensorFlow by default, or JAX, where nothing imports
TensorFlow); the few operations ``keras.ops`` lacks (log-gamma, the incomplete Beta function,
gradients, compilation) are in :mod:`backends`. Weights saved on one backend load on another.

The encoder ends at its last convolutional feature map and the ICL model pools it with a layer
of its own, so the feature map is a tensor of the model's graph (:func:`feature_map`) and
GradCAM (:func:`gradcam_heatmaps`) needs no surgery on the network.
"""

import dataclasses
import json
import pathlib
import zipfile

import keras
import numpy as np
from keras import ops

import augmentations
import backends
import common
import hsc
import resnet_cifar10_v2

#: Label floor in training: a Beta density needs f > 0 (SPEC Part A).
LABEL_FLOOR = 1e-9
#: Label ceiling: 1 - 1e-9 rounds to 1 in float32, where log(1 - f) is -inf.
LABEL_CEILING = 1.0 - 1e-6
#: Default grid step of the summaries; results are exact to this step.
GRID_STEP = 1e-3
#: Percentiles reported as the uncertainty.
PERCENTILES = (0.15, 0.85)
#: Name of the nested encoder model inside the ICL model (freeze it by this structure); its
#: output is the last convolutional feature map.
ENCODER_NAME = "encoder"
#: Name of the global average pooling layer that reads the feature map (GradCAM finds the map here).
POOLING_NAME = "global_pool"
#: Folder of the shipped checkpoints.
CHECKPOINT_DIR = pathlib.Path(__file__).resolve().parent / "checkpoints"
#: Shipped ICL checkpoints, tried in this order by :func:`default_checkpoint`.
SHIPPED_CHECKPOINTS = ("icl_finetuned.weights.h5", "icl_trained.weights.h5")


@dataclasses.dataclass(frozen=True)
class ICLConfig:
    """Architecture of the ICL regressor; saved next to every checkpoint."""

    image_size: int = hsc.ICL_IMAGE_SIZE  # side of the square input image in pixels
    n_blocks: int = 6  # ResNet N: blocks per stage, depth 9 N + 2 (N = 6 is the paper's "ResNet-50")
    hidden_units: int = 2048  # width of the dense hidden layer of the head
    n_components: int = 16  # Beta components of the output mixture

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text):
        values = json.loads(text)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ICL config fields {sorted(unknown)}")
        return cls(**values)


#: The published architecture (about 2.27 M parameters).
PAPER = ICLConfig()
#: A smaller architecture that trains on a laptop CPU: half the resolution (1 px = 2.7 kpc), N = 2.
COMPACT = ICLConfig(image_size=112, n_blocks=2)
#: A tiny architecture for tests and quick CPU runs.
TINY = ICLConfig(image_size=32, n_blocks=1, hidden_units=32, n_components=16)
#: Architectures by name, for the command lines.
ARCHITECTURES = {"paper": PAPER, "compact": COMPACT, "tiny": TINY}


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not match the ICL architecture."""


# ----------------------------------------------------------------------------------------
# The model


def build_icl_model(config=PAPER, augment=False, seed=None):
    """Build the ICL regressor.

    Parameters
    ----------
    config : ICLConfig
    augment : bool
        Put the training augmentation (flips, noise, random 90-degree rotation) after the
        normalisation, as the original did; it acts only when ``training=True``. Inference
        models leave it out.
    seed : int or None
        Seed of the augmentation layers.

    Returns
    -------
    keras.Model
        Input (batch, S, S, 1) prepared images; output (batch, 3 K) mixture parameters. Layers:
        the encoder :data:`ENCODER_NAME` (feature map), the pooling :data:`POOLING_NAME`, then
        ``hidden`` and ``mixture_params``.
    """
    inputs = keras.Input((config.image_size, config.image_size, 1), name="image")
    # As the original: normalise, then flip, add noise and rotate in normalised units.
    x = augmentations.icl_normalisation()(inputs)
    x = augmentations.icl_augmentation(seed=seed)(x) if augment else x
    encoder = resnet_cifar10_v2.build_resnet_v2(
        (config.image_size, config.image_size, 1), n_blocks=config.n_blocks, pooling=False, name=ENCODER_NAME
    )
    # Pooling outside the encoder holds no weights, so checkpoints of the encoder that pooled
    # inside load unchanged, and the feature map stays a tensor of this graph.
    x = keras.layers.GlobalAveragePooling2D(name=POOLING_NAME)(encoder(x))
    x = keras.layers.Dense(config.hidden_units, activation="relu", name="hidden")(x)
    outputs = keras.layers.Dense(3 * config.n_components, name="mixture_params")(x)
    return keras.Model(inputs, outputs, name="icl_regressor")


def feature_map(icl_model):
    """The last convolutional feature map of an ICL model, a tensor of its graph, (B, h, w, C).

    It is the encoder's output, read by the pooling layer; ``keras.Model(icl_model.input,
    [feature_map(icl_model), icl_model.output])`` returns it with the model's output.

    Raises
    ------
    ValueError
        If the model has no layer :data:`POOLING_NAME` (a whole model saved before the pooling
        left the encoder: load it with :func:`load_icl_model`, which rebuilds the architecture).
    """
    try:
        return icl_model.get_layer(POOLING_NAME).input
    except ValueError:
        raise ValueError(
            f"icl_model has no layer '{POOLING_NAME}' reading the encoder's feature map; "
            "build it with model.build_icl_model or load it with model.load_icl_model"
        ) from None


def default_checkpoint(checkpoint_dir=None):
    """The first shipped checkpoint that exists (in :data:`CHECKPOINT_DIR` by default).

    Raises
    ------
    CheckpointError
        Saying what to do, when none of :data:`SHIPPED_CHECKPOINTS` is there.
    """
    checkpoint_dir = pathlib.Path(CHECKPOINT_DIR if checkpoint_dir is None else checkpoint_dir)
    for name in SHIPPED_CHECKPOINTS:
        if (checkpoint_dir / name).exists():
            return checkpoint_dir / name
    raise CheckpointError(
        f"no shipped ICL checkpoint in {checkpoint_dir} (looked for {', '.join(SHIPPED_CHECKPOINTS)}); "
        "train one with train.py and pass it with --checkpoint PATH"
    )


def freeze_encoder(model, frozen=True):
    """Freeze (or unfreeze) the encoder by structure, leaving the dense head trainable."""
    model.get_layer(ENCODER_NAME).trainable = not frozen
    return model


#: Fraction of labels the 15-85% interval should hold, the target of :func:`fit_interval_scale`.
INTERVAL_COVERAGE = 0.70


def calibration_path_for(checkpoint):
    """Path of the interval calibration saved beside a checkpoint (``<stem>.calibration.json``)."""
    checkpoint = str(checkpoint)
    for suffix in (".weights.h5", ".keras"):
        if checkpoint.endswith(suffix):
            checkpoint = checkpoint[: -len(suffix)]
            break
    return pathlib.Path(checkpoint + ".calibration.json")


def interval_scores(labels, summary):
    """How far out each label lies, in units of its own half-interval on its side of the mode.

    A label below the mode scores (mode - label) / (mode - p15), one above it (label - mode) /
    (p85 - mode): the 15-85% interval widened about the mode by a factor s holds every label
    scoring at most s.
    """
    labels = np.asarray(labels, dtype=np.float64)
    mode, p15, p85 = (np.asarray(summary[key], dtype=np.float64) for key in ("mode", "p15", "p85"))
    below = labels < mode
    distance = np.where(below, mode - labels, labels - mode)
    width = np.where(below, mode - p15, p85 - mode)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(distance == 0, 0.0, distance / np.where(width > 0, width, 0.0))


def fit_interval_scale(labels, summary, coverage=INTERVAL_COVERAGE):
    """The factor that widens (or narrows) the 15-85% intervals about the mode to hold ``coverage``.

    Split-conformal: the ceil((n + 1) coverage)-th smallest :func:`interval_scores` of a
    calibration set the model was not trained on. On clusters like those of the calibration set
    the scaled intervals then hold the label at least ``coverage`` of the time.
    """
    scores = np.sort(interval_scores(labels, summary))
    if scores.size == 0:
        raise ValueError("no calibration clusters")
    rank = min(int(np.ceil((scores.size + 1) * coverage)), scores.size)
    scale = float(scores[rank - 1])
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"calibration gave the interval scale {scale}: the intervals have no width")
    return scale


def scale_interval(summary, scale):
    """``summary`` with its p15 and p85 moved from the mode by ``scale`` times their distance, within [0, 1]."""
    if scale == 1.0:
        return summary
    mode, p15, p85 = (np.asarray(summary[key]) for key in ("mode", "p15", "p85"))
    result = dict(summary)
    result["p15"] = np.clip(mode - scale * (mode - p15), 0.0, 1.0).astype(p15.dtype)
    result["p85"] = np.clip(mode + scale * (p85 - mode), 0.0, 1.0).astype(p85.dtype)
    return result


def load_interval_scale(checkpoint):
    """The interval scale saved beside ``checkpoint`` (1.0 when there is none).

    Raises
    ------
    CheckpointError
        For a calibration file that cannot be read or holds no positive ``interval_scale``.
    """
    path = calibration_path_for(checkpoint)
    if not path.exists():
        return 1.0
    try:
        scale = float(json.loads(path.read_text())["interval_scale"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: not a readable interval calibration ({type(error).__name__}: {error})") from None
    if not (np.isfinite(scale) and scale > 0):
        raise CheckpointError(f"{path}: interval_scale must be a positive number, got {scale}")
    return scale


def config_path_for(weights_path):
    """Path of the JSON config saved beside a ``.weights.h5`` checkpoint."""
    weights_path = str(weights_path)
    stem = weights_path[: -len(".weights.h5")] if weights_path.endswith(".weights.h5") else weights_path
    return pathlib.Path(stem + ".config.json")


def save_weights(model, path, config):
    """Save weights and the config beside them, each written atomically.

    ``path`` must end with ``.weights.h5``; the config goes to ``<stem>.config.json``.
    """
    path = pathlib.Path(path)
    if not path.name.endswith(".weights.h5"):
        raise ValueError(f"weights path must end with '.weights.h5', got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with common.atomic_write(path) as temporary:
        model.save_weights(temporary)
    common.write_text(config_path_for(path), config.to_json())


def read_config(path):
    """The ICLConfig of a checkpoint (``.weights.h5`` with its JSON, or ``.keras``)."""
    path = pathlib.Path(path)
    if path.suffix == ".keras":
        model = _load_keras_file(path)
        try:
            _, size, _, _ = model.input_shape
            encoder = model.get_layer(ENCODER_NAME)
            n_blocks = sum(1 for layer in encoder.layers
                           if layer.name.startswith("stage1_block") and layer.name.endswith("_add"))
            hidden = model.get_layer("hidden").units
            return ICLConfig(size, n_blocks, hidden, model.get_layer("mixture_params").units // 3)
        except (ValueError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{path}: not an ICL model ({_first_line(error)})") from None
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (no such file)" if not path.exists() else f"{path}: not a checkpoint file")
    config_file = config_path_for(path)
    if not config_file.exists():
        raise CheckpointError(f"{path}: no config file {config_file.name} beside the weights")
    try:
        return ICLConfig.from_json(config_file.read_text())
    except (ValueError, TypeError, OSError, KeyError, AttributeError) as error:
        raise CheckpointError(f"{config_file}: not an ICL config ({error})") from None


def _first_line(error):
    """The first line of an exception's message (Keras puts whole layer dumps in some)."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text[:300] + ("..." if len(lines) > 1 or len(text) > 300 else "")


def _load_keras_file(path):
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found (no such file)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a Keras model file (a .keras file is a zip archive)")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - whatever a broken file raises, one line names it
        raise CheckpointError(f"{path}: cannot load the model ({error})") from None


def load_icl_model(path, config=None, augment=False, seed=None):
    """Build the ICL model and load a checkpoint into it.

    Parameters
    ----------
    path : str
        ``.weights.h5`` file (with its ``.config.json``) or ``.keras`` file.
    config : ICLConfig, optional
        Architecture to build; read from the checkpoint when omitted.
    augment : bool
        False (default) builds the inference model: normalisation only, no random augmentation.

    Raises
    ------
    CheckpointError
        If the file is missing or its weights do not fit the architecture.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found (no such file)")
    config = config or read_config(path)
    model = build_icl_model(config, augment=augment, seed=seed)
    if path.suffix == ".keras":
        source = _load_keras_file(path)
        try:
            for name in (ENCODER_NAME, "hidden", "mixture_params"):
                model.get_layer(name).set_weights(source.get_layer(name).get_weights())
        except (ValueError, KeyError, AttributeError) as error:
            raise CheckpointError(f"{path}: does not match the ICL architecture {config} ({_first_line(error)})") from None
        return model
    try:
        model.load_weights(path)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read the weights file ({_first_line(error)})") from None
    except Exception as error:  # noqa: BLE001 - a file of another model raises many kinds of error
        raise CheckpointError(f"{path}: does not match the ICL architecture {config} ({_first_line(error)})") from None
    return model


# ----------------------------------------------------------------------------------------
# The Beta mixture: pure functions of the parameter vector, in keras.ops (every backend)


def mixture_parameters(params):
    """Split raw outputs (..., 3 K) into (logits, alpha, beta), each (..., K).

    alpha = 1 + softplus, beta = 1 + softplus keep every component unimodal and finite at 0 and 1.
    """
    params = ops.convert_to_tensor(params)
    logits, raw_alpha, raw_beta = ops.split(params, 3, axis=-1)
    return logits, 1.0 + ops.softplus(raw_alpha), 1.0 + ops.softplus(raw_beta)


def beta_mixture(params):
    """The mixture as a ``tfp.distributions.MixtureSameFamily`` of batch shape (...), TensorFlow only.

    A convenience for comparisons with TensorFlow Probability (the original code's way); the
    project's own functions (:func:`negative_log_likelihood`, :func:`mixture_pdf`,
    :func:`mixture_summary`) compute in ``keras.ops`` and need no TensorFlow Probability.

    Raises
    ------
    RuntimeError
        Under a Keras backend other than TensorFlow.
    """
    if backends.backend() != "tensorflow":
        raise RuntimeError(f"model.beta_mixture needs the TensorFlow backend (TensorFlow Probability), not "
                           f"'{backends.backend()}'; use model.negative_log_likelihood, mixture_pdf or mixture_summary")
    import tensorflow_probability as tfp

    tfd = tfp.distributions
    logits, alpha, beta = mixture_parameters(params)
    return tfd.MixtureSameFamily(
        mixture_distribution=tfd.Categorical(logits=logits),
        components_distribution=tfd.Beta(alpha, beta),
    )


def _log_component_densities(logits, alpha, beta, x):
    """log w_k + log Beta(x; a_k, b_k) for every component k, broadcast over x.

    log Beta(x; a, b) = (a - 1) log x + (b - 1) log(1 - x) - [lgamma(a) + lgamma(b) - lgamma(a + b)]
    """
    log_norm = backends.log_beta_function(alpha, beta)
    log_pdf = (alpha - 1.0) * ops.log(x) + (beta - 1.0) * ops.log1p(-x) - log_norm
    return ops.log_softmax(logits, axis=-1) + log_pdf


def negative_log_likelihood(labels, params):
    """Per-example negative log-likelihood of ``labels`` (B,) or (B, 1) under the mixture, (B,).

    Computed directly: -logsumexp_k [log w_k + log Beta(f; a_k, b_k)], with log w_k the
    log-softmax of the logits and the Beta normaliser from log-gamma (:mod:`backends`).
    Labels are clamped to [LABEL_FLOOR, LABEL_CEILING] so a 0 or 1 label stays finite.
    """
    params = ops.convert_to_tensor(params)
    labels = ops.reshape(ops.cast(labels, params.dtype), (-1, 1))
    labels = ops.clip(labels, LABEL_FLOOR, LABEL_CEILING)
    logits, alpha, beta = mixture_parameters(params)
    return -ops.logsumexp(_log_component_densities(logits, alpha, beta, labels), axis=-1)


@keras.saving.register_keras_serializable(package="icl")
class BetaMixtureNLL(keras.losses.Loss):
    """Keras loss: mean negative log-likelihood of the label under the predicted Beta mixture.

    The parameters are cast to float32 first, so a head computing in bfloat16 (a
    ``mixed_bfloat16`` policy) gives the loss in float32.
    """

    def __init__(self, name="beta_mixture_nll", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        return negative_log_likelihood(y_true, ops.cast(y_pred, "float32"))


def mixture_mean(params):
    """Mean of each Beta mixture, sum_k w_k a_k / (a_k + b_k): (...) for params (..., 3 K)."""
    logits, alpha, beta = mixture_parameters(params)
    return ops.sum(ops.softmax(logits, axis=-1) * alpha / (alpha + beta), axis=-1)


def label_prior_bias(labels, n_components):
    """Output bias that makes an untrained head predict the distribution of ``labels``.

    Component k is a Beta distribution centred on the (k + 1/2) / K quantile of the labels, with
    a standard deviation of half the labels' spread, and the mixture weights start equal. The
    network then only has to learn which components fit an image (logits of order one) instead
    of growing the Beta parameters from about 1.7 to the hundreds a narrow label range needs,
    which takes hundreds of thousands of Adam steps at the paper's learning rate.

    Returns
    -------
    np.ndarray
        (3 K,) bias of the ``mixture_params`` layer: K zero logits, K raw alphas, K raw betas.
    """
    labels = np.clip(np.asarray(labels, dtype=np.float64).ravel(), LABEL_FLOOR, LABEL_CEILING)
    labels = labels[np.isfinite(labels)]
    if labels.size < 2:
        raise ValueError(f"need at least 2 finite labels to set the head's prior, got {labels.size}")
    if not n_components >= 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    means = np.quantile(labels, (np.arange(n_components) + 0.5) / n_components)
    means = np.clip(means, 1e-3, 1 - 1e-3)
    sigma = max(0.5 * labels.std(), 1e-3)
    concentration = np.maximum(means * (1 - means) / sigma**2 - 1, 2.0 + 1e-3)
    alpha = np.maximum(means * concentration, 1.0 + 1e-3)
    beta = np.maximum((1 - means) * concentration, 1.0 + 1e-3)
    # inverse of alpha = 1 + softplus(raw): raw = log(expm1(y)) with y = alpha - 1, written as
    # y + log(1 - exp(-y)) so that it stays finite for the large alphas of a narrow label range
    raw_alpha, raw_beta = ((value - 1.0) + np.log(-np.expm1(-(value - 1.0))) for value in (alpha, beta))
    return np.concatenate([np.zeros(n_components), raw_alpha, raw_beta]).astype(np.float32)


def set_label_prior(icl_model, labels):
    """Set the head's output bias with :func:`label_prior_bias`; returns the model."""
    layer = icl_model.get_layer("mixture_params")
    kernel, _ = layer.get_weights()
    layer.set_weights([kernel, label_prior_bias(labels, kernel.shape[1] // 3)])
    return icl_model


def summary_grid(step=GRID_STEP, lower=0.0, upper=1.0):
    """Grid of ICL fractions on which the summaries are evaluated (both ends included)."""
    if not 0 < step <= 0.1:
        raise ValueError(f"grid step must be in (0, 0.1], got {step}")
    if not 0 <= lower < upper <= 1:
        raise ValueError(f"grid bounds must satisfy 0 <= lower < upper <= 1, got ({lower}, {upper})")
    n = int(round((upper - lower) / step)) + 1
    return np.linspace(lower, upper, n, dtype=np.float32)


def mixture_pdf(params, grid):
    """Mixture density on a grid, computed in closed form: (B, G) for params (B, 3 K), grid (G,).

    log p(x) = logsumexp_k [log w_k + (a_k - 1) log x + (b_k - 1) log(1 - x) - log B(a_k, b_k)]
    """
    logits, alpha, beta = mixture_parameters(ops.cast(params, "float32"))
    grid = ops.convert_to_tensor(grid, "float32")
    x = ops.clip(grid, 1e-12, 1.0 - 1e-12)[None, :, None]
    log_terms = _log_component_densities(logits[:, None, :], alpha[:, None, :], beta[:, None, :], x)
    pdf = ops.exp(ops.logsumexp(log_terms, axis=-1))
    # alpha, beta > 1: the density vanishes at 0 and 1; the clip above only avoids log(0).
    at_edge = ops.logical_or(grid <= 0.0, grid >= 1.0)[None, :]
    return ops.where(at_edge, ops.zeros_like(pdf), pdf)


def mixture_summary(params, step=GRID_STEP, percentiles=PERCENTILES):
    """Mode, percentiles and mean of each predicted mixture, vectorised over batch and grid.

    The mode is the grid point of highest density (exact to ``step``). Percentiles come from
    the CDF, integrated exactly per component at the grid points with the regularised
    incomplete Beta function and interpolated linearly between them (exact to ``step``).
    The mean is analytic: sum_k w_k a_k / (a_k + b_k).

    Parameters
    ----------
    params : array-like, shape (B, 3 K)
    step : float
        Grid step on [0, 1].
    percentiles : tuple of float
        CDF levels to report, in (0, 1).

    Returns
    -------
    dict of str -> tensor, each (B,)
        ``mode``, ``mean`` and ``p15``, ``p85`` (named after the percentiles), tensors of the
        Keras backend (:func:`summarise` gives NumPy arrays).
    """
    grid = summary_grid(step)
    params = ops.cast(ops.convert_to_tensor(params), "float32")
    return _summary(params, ops.convert_to_tensor(grid), tuple(float(q) for q in percentiles))


def _summary(params, grid, percentiles):
    logits, alpha, beta = mixture_parameters(params)
    weights = ops.softmax(logits, axis=-1)
    pdf = mixture_pdf(params, grid)
    mode = ops.take(grid, ops.argmax(pdf, axis=-1))
    mean = mixture_mean(params)
    # (B, G, K) component CDFs at the grid points, weighted and summed over the components.
    cdf = ops.sum(weights[:, None, :] * backends.betainc(alpha[:, None, :], beta[:, None, :], grid[None, :, None]), axis=-1)
    result = {"mode": mode, "mean": mean}
    for q in percentiles:
        result[f"p{round(q * 100):d}"] = _interpolate_quantile(cdf, grid, q)
    return result


def _interpolate_quantile(cdf, grid, q):
    """First crossing of level q by each row of a monotone CDF (B, G), linearly interpolated."""
    size = ops.shape(grid)[0]
    # First grid index where the CDF reaches q (the last one if it never does): what a
    # left-sided search of a sorted row finds.
    index = ops.arange(size, dtype="int32")[None, :]
    upper = ops.min(ops.where(cdf >= q, index, size - 1), axis=-1)
    upper = ops.clip(upper, 1, size - 1)
    lower = upper - 1
    c0 = ops.take_along_axis(cdf, lower[:, None], axis=1)[:, 0]
    c1 = ops.take_along_axis(cdf, upper[:, None], axis=1)[:, 0]
    x0, x1 = ops.take(grid, lower), ops.take(grid, upper)
    t = ops.clip((q - c0) / ops.maximum(c1 - c0, 1e-12), 0.0, 1.0)
    return x0 + t * (x1 - x0)


def summarise(params, step=GRID_STEP):
    """:func:`mixture_summary` as NumPy arrays: dict with mode, mean, p15, p85, each (B,)."""
    return {key: ops.convert_to_numpy(value) for key, value in mixture_summary(params, step).items()}


# ----------------------------------------------------------------------------------------
# GradCAM and the compiled forward pass


def gradcam_model(icl_model):
    """The ICL model with two outputs, the feature map (B, h, w, C) and the mixture parameters
    (B, 3 K), sharing its layers (keras-io ``grad_cam`` style)."""
    return keras.Model(icl_model.input, [feature_map(icl_model), icl_model.output], name="icl_gradcam")


def split_at_feature_map(icl_model):
    """The ICL model cut at its feature map into two models that share its layers and weights.

    Returns
    -------
    features : keras.Model
        Images (B, S, S, 1) -> feature map (B, h, w, C): normalisation and encoder.
    head : keras.Model
        Feature map -> mixture parameters (B, 3 K): pooling and the dense head. GradCAM
        differentiates this part with respect to its input (:func:`backends.value_and_gradient`).

    Raises
    ------
    ValueError
        As :func:`feature_map`, for a model without the pooled feature map.
    """
    features = feature_map(icl_model)
    return (keras.Model(icl_model.input, features, name="icl_features"),
            keras.Model(features, icl_model.output, name="icl_head"))


def _gradcam(features_model, head_model, images):
    """Mixture parameters and GradCAM heat maps of one forward pass; see :func:`gradcam_heatmaps`."""
    features = features_model(images, training=False)

    def mean_of_head(features):
        params = ops.cast(head_model(features, training=False), "float32")
        return mixture_mean(params), params

    # Inference layers never mix the images of a batch, so the gradient of the batch's sum of
    # means is each image's own gradient.
    _, params, gradients = backends.value_and_gradient(mean_of_head, features)
    channel_weights = ops.mean(ops.cast(gradients, "float32"), axis=(1, 2))
    raw = ops.relu(ops.einsum("bhwc,bc->bhw", ops.cast(features, "float32"), channel_weights))
    size = (int(images.shape[1]), int(images.shape[2]))
    upsampled = ops.image.resize(raw[..., None], size, interpolation="bilinear")[..., 0]
    peaks = ops.max(upsampled, axis=(1, 2), keepdims=True)
    return params, ops.clip(ops.divide_no_nan(upsampled, peaks), 0.0, 1.0)


def gradcam_heatmaps(icl_model, images):
    """GradCAM heat maps of the predicted mean ICL fraction, from one forward pass.

    GradCAM (Selvaraju et al. 2017, arXiv:1610.02391, eqs. 1-2) weighs each channel c of the
    feature map A (:func:`feature_map`) by the spatial mean of the gradient of the mixture mean
    y = sum_k w_k a_k / (a_k + b_k) (:func:`mixture_mean`) and keeps the positive part:

        w_c = 1 / (H W) * sum_ij dy / dA_ij^c,      L = ReLU(sum_c w_c A^c)

    L is upsampled bilinearly to the input size and divided by its maximum. The gradient is
    that of the head part of the model (:func:`split_at_feature_map`) with respect to the
    feature map, taken the backend's way (:func:`backends.value_and_gradient`). For many
    batches use ``Predictor(icl_model, gradcam=True)``, which compiles the same computation once.

    Parameters
    ----------
    icl_model : keras.Model
        ICL regressor (augmentation layers, if any, are inactive here).
    images : array-like, shape (B, S, S, 1)
        Prepared images (``prep_data.prepare_image``), S the model's input size. Not modified.

    Returns
    -------
    heatmaps : ndarray (B, S, S), float32
        In [0, 1], each divided by its own maximum; all zero where no feature pushes the mean up.
    params : ndarray (B, 3 K), float32
        The model's output of the same pass.
    """
    size = int(icl_model.input_shape[1])
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:] != (size, size, 1):
        raise ValueError(f"images must have shape (B, {size}, {size}, 1), got {images.shape}")
    if not np.isfinite(images).all():
        raise ValueError("images must be finite (prepared images hold no NaN or inf)")
    features_model, head_model = split_at_feature_map(icl_model)
    if len(images) == 0:  # convolutions reject an empty batch
        return np.zeros((0, size, size), np.float32), np.zeros((0, icl_model.output_shape[-1]), np.float32)
    params, heatmaps = _gradcam(features_model, head_model, ops.convert_to_tensor(images))
    return ops.convert_to_numpy(heatmaps), ops.convert_to_numpy(params)


def default_micro_batch():
    """Images per forward call: the whole batch on a GPU, one image on a CPU.

    On a CPU the 224x224x64 activations of the first stage (12.8 MB per image) fall out of
    cache when many images go through together; one image at a time ran about 1.9x faster
    than batches of 32 on a 2-core Xeon (bench/RESULTS.md). The device is the Keras
    backend's (:func:`backends.has_gpu`).
    """
    return None if backends.has_gpu() else 1


class Predictor:
    """Compiled forward pass plus mixture summary, one call per batch of prepared images.

    The forward pass and the vectorised summary are compiled for the Keras backend
    (:func:`backends.compile_function`: ``tf.function``, optionally XLA, on TensorFlow;
    ``jax.jit`` on JAX; eager elsewhere), so the summary runs on the accelerator; on a CPU the
    batch goes through the network in micro-batches (see :func:`default_micro_batch`). With
    ``gradcam=True`` the forward pass also gives the GradCAM heat maps
    (:func:`gradcam_heatmaps`): the network still runs once. ``interval_scale`` widens the
    15-85% interval about the mode (:func:`scale_interval`; :func:`load_interval_scale` reads a
    checkpoint's calibration). The compiled functions read the model's current weights at
    every call.
    """

    def __init__(self, model, step=GRID_STEP, jit_compile=False, micro_batch="auto", gradcam=False, interval_scale=1.0):
        self.model = model
        self.gradcam = gradcam
        self.interval_scale = float(interval_scale)
        self.grid = ops.convert_to_tensor(summary_grid(step))
        self.micro_batch = default_micro_batch() if micro_batch == "auto" else micro_batch
        if gradcam:
            features_model, head_model = split_at_feature_map(model)

            def forward(images):
                return _gradcam(features_model, head_model, images)
        else:

            def forward(images):
                return (ops.cast(model(images, training=False), "float32"),)

        grid = self.grid
        self._forward = backends.compile_function(forward, jit_compile=jit_compile, variables=model.variables)
        self._summarise = backends.compile_function(lambda params: _summary(params, grid, PERCENTILES))

    def _run(self, images):
        """The forward pass's outputs (parameters, and heat maps with GradCAM), whole batch."""
        images = ops.convert_to_tensor(images, "float32")
        n = int(images.shape[0])
        size = self.micro_batch or n or 1
        chunks = [self._forward(images[i : i + size]) for i in range(0, n, size)]
        return [parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=0) for parts in zip(*chunks)]

    def parameters(self, images):
        """Raw mixture parameters (B, 3 K) for images (B, S, S, 1), a tensor of the Keras backend."""
        return self._run(images)[0]

    def __call__(self, images):
        """Summaries for images (B, S, S, 1): dict of NumPy arrays ``mode``, ``mean``, ``p15``,
        ``p85``, each (B,), and with GradCAM ``heatmaps`` (B, S, S)."""
        params, *heatmaps = self._run(images)
        result = {key: ops.convert_to_numpy(value) for key, value in self._summarise(params).items()}
        result = scale_interval(result, self.interval_scale)
        if heatmaps:
            result["heatmaps"] = ops.convert_to_numpy(heatmaps[0])
        return result


# ----------------------------------------------------------------------------------------
# Evaluation


def predict_dataset(predictor, dataset):
    """Run a :class:`Predictor` over a dataset of ``(image, label)`` batches.

    Returns
    -------
    labels : ndarray (N,)
    summary : dict of str -> ndarray (N,)
        mode, mean, p15, p85 per example, in dataset order.
    """
    labels, parts = [], []
    for images, batch_labels in dataset:
        labels.append(np.reshape(batch_labels, [-1]))
        parts.append(predictor(images))
    if not parts:
        raise ValueError("dataset is empty")
    summary = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    return np.concatenate(labels).astype(np.float32), summary


def regression_metrics(labels, estimates):
    """Mean absolute error, bias, scatter (std of residuals) and Pearson r of estimates against labels."""
    labels = np.asarray(labels, dtype=np.float64)
    estimates = np.asarray(estimates, dtype=np.float64)
    if labels.shape != estimates.shape or labels.size == 0:
        raise ValueError(f"labels and estimates must be non-empty and of one shape, got {labels.shape} and {estimates.shape}")
    residuals = estimates - labels
    if labels.size > 1 and labels.std() > 0 and estimates.std() > 0:
        pearson = float(np.corrcoef(labels, estimates)[0, 1])
    else:
        pearson = float("nan")
    return {
        "n": int(labels.size),
        "mae": float(np.abs(residuals).mean()),
        "bias": float(residuals.mean()),
        "scatter": float(residuals.std()),
        "pearson_r": pearson,
    }
