"""NNCLR views: jittered crops, the deterministic test-time view, noise in counts units."""

import keras
import numpy as np
import pytest

import augmentations
import tidal_data


def _images(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_test_time_view_is_the_exact_centre_crop():
    images = _images((3, 24, 24, 5))
    view = keras.ops.convert_to_numpy(augmentations.nnclr_test_view(images, crop_size=16))
    np.testing.assert_array_equal(view, images[:, 4:20, 4:20, :])


def test_augmenter_in_inference_is_the_test_time_view():
    images = _images((2, 24, 24, 5))
    augmenter = augmentations.nnclr_augmentation(crop_size=16, jitter=4, seed=3)
    view = keras.ops.convert_to_numpy(augmenter(images, training=False))
    np.testing.assert_array_equal(view, images[:, 4:20, 4:20, :])


def test_training_crops_are_windows_of_the_jitter_box_with_their_own_offsets():
    # Pixel values encode their position, so each crop reveals its offset.
    rows, columns = np.mgrid[:24, :24]
    images = np.repeat((rows * 100 + columns)[None, :, :, None], 16, axis=0).astype(np.float32)
    crop = augmentations.JitteredCrop(crop_size=16, jitter=4, seed=5)
    views = keras.ops.convert_to_numpy(crop(images, training=True))
    assert views.shape == (16, 16, 16, 1)
    tops = views[:, 0, 0, 0] // 100
    lefts = views[:, 0, 0, 0] % 100
    # Centre box of side 16 + 4 starts at (24 - 20) // 2 = 2, so offsets 2..6 on both axes.
    assert tops.min() >= 2 and tops.max() <= 6 and lefts.min() >= 2 and lefts.max() <= 6
    expected = np.stack([images[i, t : t + 16, l : l + 16] for i, (t, l) in enumerate(zip(tops.astype(int), lefts.astype(int)))])
    np.testing.assert_array_equal(views, expected)
    assert len(set(zip(tops, lefts))) > 1


def test_crop_rejects_images_smaller_than_crop_plus_jitter():
    crop = augmentations.JitteredCrop(crop_size=16, jitter=4)
    with pytest.raises(ValueError, match=r"images are 18x18 px, smaller than the crop: .* at least 20x20 \(crop 16 \+ jitter 4\)"):
        crop(_images((2, 18, 18, 5)), training=True)


def test_crop_rejects_images_without_a_batch_of_bands():
    crop = augmentations.JitteredCrop(crop_size=16, jitter=4)
    with pytest.raises(ValueError, match=r"images must be \(batch, H, W, bands\), got shape \(24, 24\)"):
        crop.build((24, 24))


def test_noise_is_one_to_three_band_scales_in_counts():
    # Stretch counts with per-band scales, add the noise, undo the stretch: the added counts
    # must have a standard deviation of f x scale with f in [1, 3], f drawn per image.
    band_scale = np.array([0.01, 0.02, 0.03, 0.04, 0.05], np.float32)
    counts = np.abs(_images((12, 64, 64, 5), seed=1)) * band_scale
    stretched = tidal_data.tidal_stretch(counts, band_scale)
    layer = augmentations.StretchedGaussianNoise((1.0, 3.0), softening=tidal_data.TIDAL_STRETCH_SOFTENING, seed=7)
    noisy = keras.ops.convert_to_numpy(layer(stretched, training=True)).astype(np.float64)
    noisy_counts = np.sinh(noisy) * band_scale * tidal_data.TIDAL_STRETCH_SOFTENING
    factors = (noisy_counts - counts).std(axis=(1, 2)) / band_scale  # (image, band)
    # One factor per image, shared by its bands (4096 pixels per band: std good to ~2%).
    np.testing.assert_allclose(factors, np.broadcast_to(factors.mean(axis=1, keepdims=True), factors.shape), rtol=0.05)
    assert factors.min() > 0.95 and factors.max() < 3.1
    assert factors.mean(axis=1).std() > 0.1


def test_noise_is_off_at_inference():
    images = _images((2, 24, 24, 5))
    layer = augmentations.StretchedGaussianNoise()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(images, training=False)), images)


@pytest.mark.parametrize(
    "layer",
    [augmentations.StretchedGaussianNoise((0.5, 2.0), softening=2.0, seed=4), augmentations.JitteredCrop(10, 3, seed=1)],
)
def test_layers_rebuild_from_their_config(layer):
    rebuilt = type(layer).from_config(layer.get_config())
    assert rebuilt.get_config() == layer.get_config()


def test_noise_range_must_be_ordered():
    with pytest.raises(ValueError, match=r"noise_range must satisfy 0 <= low <= high, got \(3, 1\)"):
        augmentations.StretchedGaussianNoise((3, 1))


def test_augmenter_survives_a_save_load_round_trip(tmp_path):
    inputs = keras.Input((24, 24, 5))
    model = keras.Model(inputs, augmentations.nnclr_augmentation(crop_size=16, jitter=4, seed=2)(inputs))
    model.save(tmp_path / "augmenter.keras")
    loaded = keras.saving.load_model(tmp_path / "augmenter.keras")
    images = _images((2, 24, 24, 5))
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))


def test_test_time_view_rejects_images_smaller_than_the_crop():
    with pytest.raises(ValueError, match=r"images are 12x12 px, smaller than the crop 16x16"):
        augmentations.nnclr_test_view(_images((1, 12, 12, 5)), crop_size=16)
