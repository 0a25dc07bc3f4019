"""GradCAM heat maps of the ICL regressor: which pixels drive the predicted ICL fraction.

GradCAM (Selvaraju et al. 2017, arXiv:1610.02391) weighs each channel c of the encoder's
last convolutional feature map A (before global pooling) by the spatial mean of the gradient
of a scalar score y with respect to it (their eq. 1), and keeps the positive part of the
weighted sum of channels (their eq. 2):

    w_c = 1 / (H W) * sum_ij dy / dA_ij^c,      L = ReLU(sum_c w_c A^c)

Here y is the mean of the predicted Beta mixture, sum_k w_k a_k / (a_k + b_k) (SPEC Part A,
GradCAM). The map is upsampled bilinearly to the input size and divided by its maximum, so each
image's map lies in [0, 1]; a map with no positive evidence stays all zero. Because the encoder
ends with global average pooling, the gradient is the same at every position of a channel, so
w_c is the head's derivative by the pooled feature c divided by H W, and L is the class
activation map of Zhou et al. (2016, arXiv:1512.04150) with those derivatives as weights.

Each INPUT is a FITS cutout, an HDF5 file of cutouts, a .npy file of prepared images, or a
directory of them, read exactly as ``predict.py`` reads them. One PNG per cutout is written to
the output directory: the prepared image with the heat map over it, titled with the cutout id
and the predicted f_ICL (the mode) with its 15-85% range. Cutouts that cannot be read are
reported one line each and the exit status is 1; the others are still processed.

Example::

    python gradcam.py clusters/ --out-dir gradcam/
"""

import argparse
import hashlib
import logging
import os
import pathlib
import re
import sys

import keras
import numpy as np
import tensorflow as tf

import common
import model
import prep_data
import resnet_cifar10_v2

#: Cutouts per batch.
BATCH_SIZE = 16
#: Opacity of the heat map where it reaches 1 (it fades to transparent at 0).
OVERLAY_ALPHA = 0.6
#: Matplotlib colour map of the heat map.
HEATMAP_COLORMAP = "jet"
#: Percentiles of the prepared image mapped to black and white in the overlays.
DISPLAY_PERCENTILES = (1.0, 99.5)
#: Ending of every overlay file name.
OVERLAY_SUFFIX = "_gradcam.png"

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# Heat maps


def split_at_feature_map(icl_model, feature_layer_name=resnet_cifar10_v2.FEATURE_LAYER_NAME):
    """Split an ICL model at the encoder's feature map into two models that share its layers.

    The encoder is a functional model nested inside the ICL model, so its internal feature map
    is not a tensor of the outer graph. The two halves are views of the existing graphs: the ICL
    model's input through the layers before the encoder (augmentation, inactive outside
    training, and normalisation) and the encoder up to the feature map; then the rest of the
    encoder (global pooling) and the head. No layer is rebuilt and no weight copied.

    Parameters
    ----------
    icl_model : keras.Model
        ICL regressor from :func:`model.build_icl_model` or :func:`model.load_icl_model`.
    feature_layer_name : str
        Layer inside the encoder whose output is the feature map.

    Returns
    -------
    to_features : keras.Model
        Prepared images (B, S, S, 1) -> feature map (B, h, w, C).
    from_features : keras.Model
        Feature map (B, h, w, C) -> mixture parameters (B, 3 K).

    Raises
    ------
    ValueError
        If the model has no encoder named :data:`model.ENCODER_NAME` used exactly once, or the
        encoder has no layer ``feature_layer_name``.
    """
    try:
        encoder = icl_model.get_layer(model.ENCODER_NAME)
    except ValueError:
        raise ValueError(f"icl_model must contain a nested encoder model named '{model.ENCODER_NAME}'") from None
    try:
        feature_layer = encoder.get_layer(feature_layer_name)
    except ValueError:
        raise ValueError(f"encoder has no layer named '{feature_layer_name}'") from None
    # The encoder's own ``input``/``output`` are its inner tensors; the tensors that connect it
    # to the outer graph live on the node of its single call.
    nodes = encoder._inbound_nodes
    if len(nodes) != 1:
        raise ValueError(f"the encoder must be called exactly once in icl_model, found {len(nodes)} calls")
    (outer_input,) = nodes[0].input_tensors
    (outer_output,) = nodes[0].output_tensors

    before_encoder = keras.Model(icl_model.inputs, outer_input, name="gradcam_preprocessing")
    encoder_to_features = keras.Model(encoder.inputs, feature_layer.output, name="gradcam_encoder_to_features")
    encoder_from_features = keras.Model(feature_layer.output, encoder.outputs[0], name="gradcam_pooling")
    after_encoder = keras.Model(outer_output, icl_model.outputs[0], name="gradcam_head")

    images = keras.Input(icl_model.input_shape[1:], name="image")
    to_features = keras.Model(images, encoder_to_features(before_encoder(images)), name="gradcam_to_features")
    features = keras.Input(feature_layer.output.shape[1:], name="feature_map")
    from_features = keras.Model(features, after_encoder(encoder_from_features(features)), name="gradcam_from_features")
    return to_features, from_features


def feature_model(icl_model, feature_layer_name=resnet_cifar10_v2.FEATURE_LAYER_NAME):
    """A model sharing ``icl_model``'s layers that returns the feature map and the output.

    Input (B, S, S, 1) prepared images; outputs the feature map (B, h, w, C) and the mixture
    parameters (B, 3 K). See :func:`split_at_feature_map`.
    """
    to_features, from_features = split_at_feature_map(icl_model, feature_layer_name)
    images = keras.Input(icl_model.input_shape[1:], name="image")
    features = to_features(images)
    return keras.Model(images, [features, from_features(features)], name="gradcam_features")


def predicted_mean(params):
    """Mean of each predicted Beta mixture: sum_k w_k a_k / (a_k + b_k), shape (B,) for params (B, 3 K)."""
    logits, alpha, beta = model.mixture_parameters(params)
    return tf.reduce_sum(tf.nn.softmax(logits, axis=-1) * alpha / (alpha + beta), axis=-1)


def normalise_heatmaps(heatmaps):
    """Divide each map (B, H, W) by its maximum; an all-zero map stays zero (never NaN)."""
    heatmaps = np.maximum(np.asarray(heatmaps, dtype=np.float32), 0.0)
    peaks = heatmaps.max(axis=(1, 2), keepdims=True, initial=0.0)
    scale = np.divide(1.0, peaks, out=np.zeros_like(peaks), where=peaks > 0)
    return np.clip(heatmaps * scale, 0.0, 1.0)


class GradCAM:
    """GradCAM of an ICL model, built once and applied to many batches.

    Building the feature model and tracing the gradient function costs far more than one
    batch, so scripts that process many batches keep one instance.

    Parameters
    ----------
    icl_model : keras.Model
        ICL regressor (with or without augmentation layers; they are inactive here).
    feature_layer_name : str
        Layer inside the encoder whose output is the feature map.
    """

    def __init__(self, icl_model, feature_layer_name=resnet_cifar10_v2.FEATURE_LAYER_NAME):
        self.icl_model = icl_model
        self.image_size = int(icl_model.input_shape[1])
        self.to_features, self.from_features = split_at_feature_map(icl_model, feature_layer_name)
        self._gradients = tf.function(self._features_and_gradients, reduce_retracing=True)

    def _features_and_gradients(self, images):
        features = self.to_features(images, training=False)
        with tf.GradientTape() as tape:
            tape.watch(features)
            params = self.from_features(features, training=False)
            mean = predicted_mean(tf.cast(params, tf.float32))
            # Inference layers never mix the images of a batch, so the gradient of the batch's
            # sum is each image's own gradient.
            total = tf.reduce_sum(mean)
        gradients = tape.gradient(total, features)
        return features, gradients, params, mean

    def _check_images(self, images):
        images = np.asarray(images, dtype=np.float32)
        expected = (self.image_size, self.image_size, 1)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"images must have shape (B, {self.image_size}, {self.image_size}, 1), got {images.shape}")
        if not np.isfinite(images).all():
            raise ValueError("images must be finite (prepared images hold no NaN or inf)")
        return images

    def components(self, images):
        """GradCAM of a batch with its intermediate pieces.

        Parameters
        ----------
        images : array-like, shape (B, S, S, 1)
            Prepared model inputs (see ``prep_data.prepare_image``). Not modified.

        Returns
        -------
        dict of str -> ndarray
            ``features`` (B, h, w, C) feature map; ``gradients`` (B, h, w, C) gradient of the
            predicted mean with respect to it; ``channel_weights`` (B, C) their spatial mean;
            ``raw`` (B, h, w) ReLU of the weighted sum of channels; ``heatmaps`` (B, S, S) the raw
            map upsampled bilinearly and divided by its maximum; ``params`` (B, 3 K) the model's
            output, ``mean`` (B,) the predicted mixture mean.
        """
        images = self._check_images(images)
        if images.shape[0] == 0:
            # Convolutions reject an empty batch; answer with empty arrays of the right shapes.
            return self._empty_components()
        features, gradients, params, mean = (tensor.numpy() for tensor in self._gradients(images))
        channel_weights = gradients.mean(axis=(1, 2))
        raw = np.maximum(np.einsum("bhwc,bc->bhw", features, channel_weights), 0.0)
        upsampled = tf.image.resize(raw[..., None], (self.image_size, self.image_size), method="bilinear")
        return {
            "features": features,
            "gradients": gradients,
            "channel_weights": channel_weights,
            "raw": raw,
            "heatmaps": normalise_heatmaps(upsampled.numpy()[..., 0]),
            "params": params,
            "mean": mean,
        }

    def _empty_components(self):
        _, height, width, channels = self.to_features.output_shape
        feature_shape = (0, height, width, channels)
        return {
            "features": np.zeros(feature_shape, np.float32),
            "gradients": np.zeros(feature_shape, np.float32),
            "channel_weights": np.zeros((0, channels), np.float32),
            "raw": np.zeros((0, height, width), np.float32),
            "heatmaps": np.zeros((0, self.image_size, self.image_size), np.float32),
            "params": np.zeros((0, self.from_features.output_shape[-1]), np.float32),
            "mean": np.zeros(0, np.float32),
        }

    def __call__(self, images):
        """Heat maps (B, S, S) in [0, 1] for prepared images (B, S, S, 1); see :func:`gradcam_heatmaps`."""
        return self.components(images)["heatmaps"]


def _as_gradcam(icl_model):
    return icl_model if isinstance(icl_model, GradCAM) else GradCAM(icl_model)


def gradcam_heatmaps(icl_model, images):
    """GradCAM heat maps of the predicted mean ICL fraction for a batch of prepared images.

    Parameters
    ----------
    icl_model : keras.Model or GradCAM
        The ICL regressor; pass a :class:`GradCAM` to reuse its traced function across batches.
    images : array-like, shape (B, S, S, 1)
        Prepared model inputs (arcsinh-scaled counts, masked pixels 0; ``prep_data.prepare_image``),
        S the model's input size. Not modified.

    Returns
    -------
    ndarray, shape (B, S, S), float32
        Heat maps in [0, 1], each divided by its own maximum, in the pixel order of ``images``.
        An image whose weighted feature map has no positive value gets an all-zero map.
    """
    return _as_gradcam(icl_model)(images)


# ----------------------------------------------------------------------------------------
# Overlays


def overlay_filename(identifier):
    """File name of a cutout's overlay: the id with characters outside [A-Za-z0-9._-] replaced.

    An id that had to be changed (or would start with a dot) also gets a short hash of the
    original, so ids that differ only in replaced characters never share a file.
    """
    identifier = str(identifier)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", identifier).lstrip(".")[:100]
    if safe != identifier or not safe:
        digest = hashlib.sha1(identifier.encode()).hexdigest()[:8]
        safe = f"{safe}_{digest}" if safe else digest
    return safe + OVERLAY_SUFFIX


def _check_predictions(predictions, n):
    if predictions is None:
        return None
    missing = {"mode", "p15", "p85"} - set(predictions)
    if missing:
        raise ValueError(f"predictions must have keys 'mode', 'p15' and 'p85', missing {sorted(missing)}")
    checked = {key: np.asarray(predictions[key], dtype=float).reshape(-1) for key in ("mode", "p15", "p85")}
    for key, values in checked.items():
        if values.shape != (n,):
            raise ValueError(f"predictions['{key}'] must hold one value per image ({n}), got {values.shape[0]}")
    return checked


def check_overlay_options(overlay_alpha=OVERLAY_ALPHA, colormap=HEATMAP_COLORMAP, display_percentiles=DISPLAY_PERCENTILES):
    """Raise ValueError naming the first overlay option of :func:`save_overlays` that is invalid."""
    import matplotlib

    if not 0 <= overlay_alpha <= 1:
        raise ValueError(f"overlay_alpha must be in [0, 1], got {overlay_alpha}")
    if colormap not in matplotlib.colormaps:
        raise ValueError(f"colormap must be a Matplotlib colour map name, got '{colormap}'")
    if len(display_percentiles) != 2 or not 0 <= display_percentiles[0] < display_percentiles[1] <= 100:
        raise ValueError(f"display_percentiles must be (low, high) with 0 <= low < high <= 100, got {tuple(display_percentiles)}")


def save_overlays(
    images,
    heatmaps,
    ids,
    out_dir,
    predictions=None,
    overlay_alpha=OVERLAY_ALPHA,
    colormap=HEATMAP_COLORMAP,
    display_percentiles=DISPLAY_PERCENTILES,
):
    """Write one PNG per image: the prepared image in grey with the heat map over it.

    Parameters
    ----------
    images : array-like, shape (B, S, S, 1) or (B, S, S)
        Prepared images, drawn with row 0 at the bottom (FITS convention).
    heatmaps : array-like, shape (B, S, S)
        Heat maps in [0, 1] (from :func:`gradcam_heatmaps`).
    ids : sequence of str
        One identifier per image, shown in the title and used for the file name
        (see :func:`overlay_filename`); a repeated id overwrites the earlier overlay.
    out_dir : str or path
        Output directory, created if missing.
    predictions : mapping, optional
        ``mode``, ``p15`` and ``p85`` (each (B,), as from ``model.summarise``); when given the
        title shows f_ICL = mode with its 15-85% range.
    overlay_alpha : float
        Opacity of the heat map where it is 1, in [0, 1]; it fades to transparent at 0.
    colormap : str
        Matplotlib colour map of the heat map.
    display_percentiles : (float, float)
        Percentiles of each image shown as black and white.

    Returns
    -------
    list of pathlib.Path
        The PNG files, in image order. Each is written to a temporary name and renamed.
    """
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    check_overlay_options(overlay_alpha, colormap, display_percentiles)
    low_percentile, high_percentile = display_percentiles
    heat_colormap = matplotlib.colormaps[colormap]
    norm = Normalize(0.0, 1.0)

    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    ids = [str(identifier) for identifier in ids]
    if images.ndim != 3:
        raise ValueError(f"images must have shape (B, S, S, 1) or (B, S, S), got {images.shape}")
    if heatmaps.shape != images.shape:
        raise ValueError(f"heatmaps must have the images' shape {images.shape}, got {heatmaps.shape}")
    if len(ids) != images.shape[0]:
        raise ValueError(f"ids must hold one id per image ({images.shape[0]}), got {len(ids)}")
    predictions = _check_predictions(predictions, images.shape[0])

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (image, heatmap, identifier) in enumerate(zip(images, heatmaps, ids)):
        low, high = np.percentile(image, (low_percentile, high_percentile))
        figure = Figure(figsize=(4.6, 4.2))
        axes = figure.add_subplot()
        axes.imshow(image, cmap="gray", origin="lower", vmin=low, vmax=max(high, low + 1e-6), interpolation="nearest")
        # Opacity grows with the heat, so the image stays visible where the map is zero.
        axes.imshow(heatmap, cmap=heat_colormap, norm=norm, origin="lower", alpha=overlay_alpha * np.clip(heatmap, 0.0, 1.0))
        figure.colorbar(ScalarMappable(norm, heat_colormap), ax=axes, fraction=0.046, pad=0.04, label="GradCAM (normalised)")
        axes.set_axis_off()
        title = identifier
        if predictions is not None:
            title += (
                f"\nf_ICL = {predictions['mode'][index]:.3f} "
                f"(15-85%: {predictions['p15'][index]:.3f}-{predictions['p85'][index]:.3f})"
            )
        axes.set_title(title, fontsize=9)
        path = out_dir / overlay_filename(identifier)
        temporary = common.atomic_path(path)
        try:
            figure.savefig(temporary, format="png", dpi=100, bbox_inches="tight")
            os.replace(temporary, path)
        finally:
            if temporary.exists():
                temporary.unlink()
        paths.append(path)
    return paths


def write_gradcam_for_batch(icl_model, images, ids, out_dir, predictions=None, **overlay_options):
    """Heat maps and overlay PNGs for one batch of prepared images.

    Parameters
    ----------
    icl_model : keras.Model or GradCAM
        The ICL regressor; pass one :class:`GradCAM` for all batches of a run.
    images : array-like, shape (B, S, S, 1)
    ids : sequence of str
    out_dir : str or path
    predictions : mapping, optional
        ``mode``, ``p15``, ``p85`` per image (``model.Predictor`` output) for the titles.
    **overlay_options
        ``overlay_alpha``, ``colormap``, ``display_percentiles`` of :func:`save_overlays`.

    Returns
    -------
    heatmaps : ndarray (B, S, S)
    paths : list of pathlib.Path
    """
    heatmaps = gradcam_heatmaps(icl_model, images)
    return heatmaps, save_overlays(images, heatmaps, ids, out_dir, predictions, **overlay_options)


# ----------------------------------------------------------------------------------------
# Script


def run(inputs, out_dir, checkpoint=None, batch_size=BATCH_SIZE, progress=True, **overlay_options):
    """GradCAM overlays for every cutout in ``inputs``, written to ``out_dir``.

    ``overlay_options`` go to :func:`save_overlays`.

    Returns
    -------
    paths : list of pathlib.Path
        Overlays written, in input order (cutouts with a repeated id share one file, the last
        one's, and a warning names them).
    errors : list of str
        One message per cutout (or file) that could not be processed.
    """
    from tqdm import tqdm

    import predict

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    check_overlay_options(**overlay_options)
    checkpoint = pathlib.Path(checkpoint) if checkpoint else predict.default_checkpoint()
    config = model.read_config(checkpoint)
    refs, file_errors = prep_data.index_cutouts(inputs)
    errors = [message for _, message in file_errors]
    for message in errors:
        logger.error("%s", message)
    icl_model = model.load_icl_model(checkpoint, config)
    gradcam = GradCAM(icl_model)
    dataset = prep_data.cutout_dataset(refs, batch_size, config.image_size)
    paths, seen = [], set()  # one overlay per distinct id, in input order
    with tqdm(total=len(refs), unit="cutout", desc="gradcam", disable=not progress) as bar:
        for batch in dataset:
            messages = [message.decode() for message in batch["error"].numpy()]
            for message in messages:
                if message:
                    logger.error("%s", message)
                    errors.append(message)
            good = np.array([not message for message in messages])
            if good.any():
                images = batch["image"].numpy()[good]
                indices = batch["index"].numpy()[good]
                ids = [refs[index].id for index in indices]
                # The gradient pass already ran the model: its output gives the titles' summaries.
                parts = gradcam.components(images)
                summary = model.summarise(parts["params"])
                written = save_overlays(images, parts["heatmaps"], ids, out_dir, summary, **overlay_options)
                for index, path in zip(indices, written):
                    if path in seen:
                        ref = refs[index]
                        logger.warning(
                            "%s: id '%s' repeats an earlier cutout's; %s was overwritten", ref.source, ref.id, path.name
                        )
                    else:
                        seen.add(path)
                        paths.append(path)
            bar.update(len(messages))
    return paths, errors


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="FITS/HDF5/.npy files or directories of them")
    parser.add_argument("--out-dir", required=True, help="directory for the overlay PNGs")
    parser.add_argument("--checkpoint", help="weights (.weights.h5 with its .config.json, or .keras); default: the shipped one")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"cutouts per batch (default {BATCH_SIZE})")
    parser.add_argument(
        "--overlay-alpha", type=float, default=OVERLAY_ALPHA, help=f"heat-map opacity where it is 1 (default {OVERLAY_ALPHA})"
    )
    parser.add_argument(
        "--colormap", default=HEATMAP_COLORMAP, help=f"Matplotlib colour map of the heat map (default {HEATMAP_COLORMAP})"
    )
    parser.add_argument(
        "--display-percentiles",
        type=float,
        nargs=2,
        default=DISPLAY_PERCENTILES,
        metavar=("LOW", "HIGH"),
        help="image percentiles shown as black and white (default %(default)s)",
    )
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        paths, errors = run(
            args.inputs,
            args.out_dir,
            args.checkpoint,
            args.batch_size,
            overlay_alpha=args.overlay_alpha,
            colormap=args.colormap,
            display_percentiles=tuple(args.display_percentiles),
        )
    except (ValueError, model.CheckpointError, prep_data.CutoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} GradCAM overlays to {args.out_dir}")
    return common.report_bad_cutouts(errors, "processed")


if __name__ == "__main__":
    sys.exit(main())
