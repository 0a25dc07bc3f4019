"""Tests of GradCAM (model.gradcam_heatmaps, the Predictor's GradCAM pass), the overlays and
the batch loop of inference.py, and gradcam.py, on the tiny ICL architecture (32x32 images)."""

import re
import subprocess
import sys

import keras
import matplotlib.image
import numpy as np
import pytest
import tensorflow as tf
from synthetic import write_fits_cutout

import common
import gradcam
import inference
import model
import resnet_cifar10_v2

SIZE = model.TINY.image_size
#: The blob detector's feature map is the input sampled every 4 pixels (two stride-2 stages).
STRIDE = 4
BLOB_ROWS, BLOB_COLUMNS = slice(20, 24), slice(4, 8)


@pytest.fixture(scope="module")
def tiny_model():
    keras.utils.set_random_seed(3)
    return model.build_icl_model(model.TINY)


def _images(n, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 4.0, (n, SIZE, SIZE, 1)).astype(np.float32)


def _blob_detector():
    """A tiny ICL model whose predicted mean grows with the light of pixels brighter than the
    normalisation mean, set by hand: every residual branch is zero, the stem and the projection
    shortcuts pass channel 0 through, so the feature map's channel 0 is ReLU(normalised image)
    sampled every 4 pixels; the head turns its spatial mean into alpha of every component."""
    icl_model = model.build_icl_model(model.TINY)
    encoder = icl_model.get_layer(model.ENCODER_NAME)
    for layer in encoder.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel = np.zeros(layer.kernel.shape, np.float32)
            if layer.name == "stem_conv" or layer.name.endswith("_shortcut"):
                centre = kernel.shape[0] // 2
                kernel[centre, centre, 0, 0] = 1.0
            layer.kernel.assign(kernel)
    hidden = icl_model.get_layer("hidden")
    hidden_kernel = np.zeros(hidden.kernel.shape, np.float32)
    hidden_kernel[0, 0] = 1.0
    hidden.set_weights([hidden_kernel, np.zeros(hidden.bias.shape, np.float32)])
    head = icl_model.get_layer("mixture_params")
    n_components = model.TINY.n_components
    head_kernel = np.zeros(head.kernel.shape, np.float32)
    head_kernel[0, n_components : 2 * n_components] = 1.0
    head.set_weights([head_kernel, np.zeros(head.bias.shape, np.float32)])
    return icl_model


def _blob_image():
    image = np.zeros((SIZE, SIZE, 1), np.float32)
    image[BLOB_ROWS, BLOB_COLUMNS] = 5.0
    return image


def _bilinear_upsample(maps, size):
    """Bilinear resize of (B, h, w) maps to (B, size, size), half-pixel centres, edges clamped."""
    def weights(n_in):
        source = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
        lower = np.floor(source).astype(int)
        upper = np.minimum(lower + 1, n_in - 1)
        matrix = np.zeros((size, n_in))
        np.add.at(matrix, (np.arange(size), lower), 1 - (source - lower))
        np.add.at(matrix, (np.arange(size), upper), source - lower)
        return matrix

    rows, columns = weights(maps.shape[1]), weights(maps.shape[2])
    return np.einsum("ih,bhw,jw->bij", rows, maps, columns)


def _independent_heatmaps(icl_model, images):
    """GradCAM in float64 NumPy from the feature map and the head's weights: after global pooling,
    dmean/dA_ij^c = (1 / HW) dmean/dpooled_c, taken here by central finite differences."""
    features = keras.Model(icl_model.input, model.feature_map(icl_model))(images).numpy().astype(np.float64)
    hidden_kernel, hidden_bias = (w.astype(np.float64) for w in icl_model.get_layer("hidden").get_weights())
    head_kernel, head_bias = (w.astype(np.float64) for w in icl_model.get_layer("mixture_params").get_weights())

    def mean_of_head(pooled):
        params = np.maximum(pooled @ hidden_kernel + hidden_bias, 0.0) @ head_kernel + head_bias
        logits, raw_alpha, raw_beta = np.split(params, 3, axis=-1)
        weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        alpha, beta = 1 + np.logaddexp(0, raw_alpha), 1 + np.logaddexp(0, raw_beta)
        return (weights * alpha / (alpha + beta)).sum(axis=-1)

    pooled = features.mean(axis=(1, 2))
    step, n_pixels = 1e-4, features.shape[1] * features.shape[2]
    channel_weights = np.empty_like(pooled)
    for channel in range(pooled.shape[1]):
        shift = np.zeros(pooled.shape[1])
        shift[channel] = step
        channel_weights[:, channel] = (mean_of_head(pooled + shift) - mean_of_head(pooled - shift)) / (2 * step) / n_pixels
    raw = np.maximum(np.einsum("bhwc,bc->bhw", features, channel_weights), 0.0)
    upsampled = _bilinear_upsample(raw, images.shape[1])
    peaks = upsampled.max(axis=(1, 2), keepdims=True)
    return np.divide(upsampled, peaks, out=np.zeros_like(upsampled), where=peaks > 0), mean_of_head(pooled), raw


def test_heatmaps_have_image_shape_and_lie_in_unit_range(tiny_model):
    images = _images(3)
    original = images.copy()
    heatmaps, params = model.gradcam_heatmaps(tiny_model, images)
    assert heatmaps.shape == (3, SIZE, SIZE) and params.shape == (3, 3 * model.TINY.n_components)
    assert np.isfinite(heatmaps).all()
    assert heatmaps.min() >= 0.0
    # Each map is divided by its own peak; a map where no feature pushes the mean up is all zero.
    peaks = heatmaps.max(axis=(1, 2))
    assert (peaks > 0).any()
    np.testing.assert_allclose(peaks[peaks > 0], 1.0, rtol=1e-6)
    assert all(np.all(heatmaps[i] == 0) for i in np.flatnonzero(peaks == 0))
    np.testing.assert_array_equal(images, original)


def test_empty_batch_gives_empty_maps(tiny_model):
    heatmaps, params = model.gradcam_heatmaps(tiny_model, np.zeros((0, SIZE, SIZE, 1)))
    assert heatmaps.shape == (0, SIZE, SIZE) and params.shape == (0, 3 * model.TINY.n_components)


def test_feature_map_is_a_tensor_of_the_model_graph(tiny_model):
    features_and_output = model.gradcam_model(tiny_model)
    images = _images(2, seed=2)
    features, params = features_and_output(images)
    np.testing.assert_allclose(params, tiny_model(images), rtol=1e-5, atol=1e-6)
    assert features.shape == (2, SIZE // STRIDE, SIZE // STRIDE, resnet_cifar10_v2.STAGES[-1][1])
    # Global pooling of the feature map is what the head reads.
    pooled = keras.Model(tiny_model.input, tiny_model.get_layer(model.POOLING_NAME).output)(images)
    np.testing.assert_allclose(pooled, features.numpy().mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    assert {id(v) for v in features_and_output.weights} == {id(v) for v in tiny_model.weights}


def test_model_split_at_the_feature_map_composes_to_the_model(tiny_model):
    features_model, head_model = model.split_at_feature_map(tiny_model)
    images = _images(2, seed=3)
    np.testing.assert_allclose(head_model(features_model(images)), tiny_model(images), rtol=1e-5, atol=1e-6)
    assert {id(v) for v in features_model.weights} | {id(v) for v in head_model.weights} == {id(v) for v in tiny_model.weights}
    assert [layer.name for layer in head_model.layers[1:]] == [model.POOLING_NAME, "hidden", "mixture_params"]


def test_heatmaps_agree_with_an_independent_computation(tiny_model):
    images = _images(2, seed=4)
    heatmaps, params = model.gradcam_heatmaps(tiny_model, images)
    expected, expected_mean, raw = _independent_heatmaps(tiny_model, images)
    assert raw.max() > 0
    np.testing.assert_allclose(params, tiny_model(images), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.mixture_mean(params), expected_mean, rtol=1e-5)
    np.testing.assert_allclose(model.mixture_mean(params), model.summarise(params)["mean"], rtol=1e-6)
    np.testing.assert_allclose(heatmaps, expected, atol=2e-3)


def test_predictor_gradcam_gives_the_same_maps_and_summaries(tiny_model):
    images = _images(3, seed=5)
    heatmaps, params = model.gradcam_heatmaps(tiny_model, images)
    for micro_batch in (None, 2):
        result = model.Predictor(tiny_model, gradcam=True, micro_batch=micro_batch)(images)
        plain = model.Predictor(tiny_model, micro_batch=micro_batch)(images)
        np.testing.assert_allclose(result["heatmaps"], heatmaps, atol=1e-5)
        for key in ("mode", "p15", "p85", "mean"):
            np.testing.assert_allclose(result[key], plain[key], atol=1e-6)
    assert "heatmaps" not in plain


def test_heatmap_peaks_on_the_only_region_that_drives_the_mean():
    detector = _blob_detector()
    image = _blob_image()[None]
    # Only feature channel 0 carries light, and only where the blob is sampled.
    expected, _, raw = _independent_heatmaps(detector, image)
    assert np.count_nonzero(raw[0]) == 1 and raw[0, BLOB_ROWS.start // STRIDE, BLOB_COLUMNS.start // STRIDE] > 0
    heatmap = model.gradcam_heatmaps(detector, image)[0][0]
    np.testing.assert_allclose(heatmap, expected[0], atol=1e-5)
    row, column = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    assert BLOB_ROWS.start - 2 <= row < BLOB_ROWS.stop + 2
    assert BLOB_COLUMNS.start - 2 <= column < BLOB_COLUMNS.stop + 2
    assert heatmap.max() == 1.0
    assert heatmap[:12].max() == 0.0 and heatmap[:, 16:].max() == 0.0


def test_map_without_positive_evidence_stays_zero():
    detector = _blob_detector()
    # A blank image gives an all-zero feature map.
    blank = np.zeros((1, SIZE, SIZE, 1), np.float32)
    assert np.array_equal(model.gradcam_heatmaps(detector, blank)[0], np.zeros((1, SIZE, SIZE)))
    # A head that ignores the image gives an all-zero gradient.
    head = detector.get_layer("mixture_params")
    head.set_weights([np.zeros(w.shape, np.float32) for w in head.get_weights()])
    heatmaps, _ = model.gradcam_heatmaps(detector, np.stack([_blob_image(), _blob_image()]))
    assert np.isfinite(heatmaps).all() and not heatmaps.any()


def test_frozen_model_still_has_gradients(tiny_model):
    images = _images(2, seed=9)
    expected, _ = model.gradcam_heatmaps(tiny_model, images)
    tiny_model.trainable = False
    try:
        np.testing.assert_allclose(model.gradcam_heatmaps(tiny_model, images)[0], expected, atol=1e-6)
    finally:
        tiny_model.trainable = True


def test_augmented_model_gives_the_inference_heatmaps(tiny_model):
    augmented = model.build_icl_model(model.TINY, augment=True, seed=5)
    for name in (model.ENCODER_NAME, "hidden", "mixture_params"):
        augmented.get_layer(name).set_weights(tiny_model.get_layer(name).get_weights())
    images = _images(2, seed=6)
    np.testing.assert_allclose(model.gradcam_heatmaps(augmented, images)[0], model.gradcam_heatmaps(tiny_model, images)[0],
                               atol=1e-5)


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((2, SIZE, SIZE)), r"images must have shape \(B, 32, 32, 1\), got \(2, 32, 32\)"),
        (np.zeros((1, 16, 16, 1)), r"images must have shape \(B, 32, 32, 1\), got \(1, 16, 16, 1\)"),
        (np.full((1, SIZE, SIZE, 1), np.nan), "images must be finite"),
    ],
)
def test_rejects_bad_images(tiny_model, images, message):
    with pytest.raises(ValueError, match=message):
        model.gradcam_heatmaps(tiny_model, images)


def test_rejects_a_model_without_the_pooled_feature_map():
    inputs = keras.Input((SIZE, SIZE, 1))
    other = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
    with pytest.raises(ValueError, match="icl_model has no layer 'global_pool' reading the encoder's feature map"):
        model.gradcam_heatmaps(other, _images(1))


def test_overlay_filenames_are_safe_and_distinct():
    assert inference.overlay_filename("cl0") == "cl0_gradcam.png"
    names = {inference.overlay_filename(identifier) for identifier in ["a/b", "a_b", "a:b", "../a_b", ""]}
    assert len(names) == 5
    for name in names:
        assert "/" not in name and ":" not in name and not name.startswith(".")


def test_save_overlays_writes_valid_pngs(tmp_path):
    images = np.stack([_blob_image(), _blob_image()])
    heatmaps = np.zeros((2, SIZE, SIZE), np.float32)
    heatmaps[0, BLOB_ROWS, BLOB_COLUMNS] = 1.0
    predictions = {"mode": np.array([0.12, 0.3]), "p15": np.array([0.1, 0.2]), "p85": np.array([0.15, 0.4]), "mean": np.zeros(2)}
    paths = inference.save_overlays(images, heatmaps, ["cluster 1", "file.h5:c2"], tmp_path / "out", predictions)
    assert [path.parent for path in paths] == [tmp_path / "out"] * 2
    assert paths[0].name.startswith("cluster_1_") and paths[1].name.startswith("file.h5_c2_")
    for path in paths:
        pixels = matplotlib.image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)


def test_save_overlays_checks_its_arguments(tmp_path):
    images = np.zeros((2, SIZE, SIZE, 1), np.float32)
    heatmaps = np.zeros((2, SIZE, SIZE), np.float32)
    with pytest.raises(ValueError, match="ids must hold one id per image"):
        inference.save_overlays(images, heatmaps, ["a"], tmp_path)
    with pytest.raises(ValueError, match=r"heatmaps must have the images' shape \(2, 32, 32\), got \(2, 16, 16\)"):
        inference.save_overlays(images, heatmaps[:, :16, :16], ["a", "b"], tmp_path)
    with pytest.raises(ValueError, match=r"predictions must have keys 'mode', 'p15' and 'p85', missing \['p85'\]"):
        inference.save_overlays(images, heatmaps, ["a", "b"], tmp_path, {"mode": [0, 0], "p15": [0, 0]})


def test_one_forward_pass_per_batch_with_gradcam(tmp_path, tiny_checkpoint, monkeypatch):
    """CSV rows and overlays of a batch come from one run of the network: the encoder runs once
    per batch (eagerly here, so that every run is a Python call that can be counted)."""
    for i in range(5):
        write_fits_cutout(tmp_path / f"cl{i}.fits", seed=i)
    calls = []
    load = model.load_icl_model

    def counted(*args, **kwargs):
        icl_model = load(*args, **kwargs)
        encoder = icl_model.get_layer(model.ENCODER_NAME)
        call = encoder.call
        encoder.call = lambda *a, **k: calls.append(1) or call(*a, **k)
        return icl_model

    monkeypatch.setattr(model, "load_icl_model", counted)
    monkeypatch.setattr(model, "default_micro_batch", lambda: None)
    tf.config.run_functions_eagerly(True)
    try:
        n, paths, errors = inference.run([tmp_path], tmp_path / "out" / "p.csv", tmp_path / "maps", tiny_checkpoint,
                                         batch_size=2, progress=False)
    finally:
        tf.config.run_functions_eagerly(False)
    assert (n, errors, len(paths)) == (5, [], 5)
    assert len(calls) == 3  # batches of 2, 2 and 1
    assert len((tmp_path / "out" / "p.csv").read_text().splitlines()) == 6


def test_help_works():
    result = subprocess.run([sys.executable, "gradcam.py", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--out-dir" in result.stdout and "--verbose" in result.stdout


def test_cli_writes_overlays_and_reports_bad_files(tmp_path, tiny_checkpoint, capsys, caplog):
    inputs, more_inputs = tmp_path / "inputs", tmp_path / "more"
    inputs.mkdir()
    more_inputs.mkdir()
    write_fits_cutout(inputs / "a.fits", seed=1)
    (inputs / "b.fits").write_text("broken")
    write_fits_cutout(inputs / "c.fits", (50, 90), seed=2, star=True)
    write_fits_cutout(more_inputs / "a.fits", seed=3)
    out_dir = tmp_path / "overlays"
    argv = [str(inputs), str(more_inputs), "--out-dir", str(out_dir), "--checkpoint", str(tiny_checkpoint)]
    assert gradcam.main(argv + ["--batch-size", "2", "--overlay-alpha", "0.3"]) == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["a_gradcam.png", "c_gradcam.png"]
    assert matplotlib.image.imread(out_dir / "a_gradcam.png").ndim == 3
    captured = capsys.readouterr()
    assert "wrote 2 GradCAM overlays" in captured.out
    assert "b.fits: cannot read FITS file" in caplog.text  # logged to stderr as it is met
    assert "1 cutout(s) could not be processed" in captured.err
    assert "Traceback" not in captured.err
    assert f"{more_inputs / 'a.fits'}: id 'a' repeats an earlier cutout's; a_gradcam.png was overwritten" in caplog.text


@pytest.mark.parametrize(
    "option, message",
    [
        (["--overlay-alpha", "1.5"], r"overlay_alpha must be in \[0, 1\], got 1.5"),
        (["--colormap", "no_such_map"], "colormap must be a Matplotlib colour map name, got 'no_such_map'"),
        (["--display-percentiles", "90", "10"], r"display_percentiles must be \(low, high\) with 0 <= low < high <= 100"),
    ],
)
def test_cli_rejects_bad_overlay_options(tmp_path, tiny_checkpoint, capsys, option, message):
    write_fits_cutout(tmp_path / "a.fits")
    argv = [str(tmp_path / "a.fits"), "--out-dir", str(tmp_path / "out"), "--checkpoint", str(tiny_checkpoint)]
    assert gradcam.main(argv + option) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_cli_without_checkpoint_says_what_to_do(tmp_path, monkeypatch, capsys):
    write_fits_cutout(tmp_path / "a.fits")
    monkeypatch.setattr(model, "CHECKPOINT_DIR", tmp_path / "none")
    assert gradcam.main([str(tmp_path / "a.fits"), "--out-dir", str(tmp_path / "out")]) == 2
    assert "train one with train.py and pass it with --checkpoint" in capsys.readouterr().err


def test_cli_rejects_bad_batch_size(tmp_path, tiny_checkpoint, capsys):
    write_fits_cutout(tmp_path / "a.fits")
    argv = [str(tmp_path / "a.fits"), "--out-dir", str(tmp_path), "--checkpoint", str(tiny_checkpoint), "--batch-size", "0"]
    assert gradcam.main(argv) == 2
    assert "batch size must be >= 1, got 0" in capsys.readouterr().err


def test_works_on_a_whole_model_loaded_from_a_keras_file(tmp_path, tiny_model):
    path = tmp_path / "tiny.keras"
    common.save_keras_model(tiny_model, path)
    loaded = keras.saving.load_model(path, compile=False)
    images = _images(2, seed=8)
    np.testing.assert_allclose(model.gradcam_heatmaps(loaded, images)[0], model.gradcam_heatmaps(tiny_model, images)[0],
                               atol=1e-5)
