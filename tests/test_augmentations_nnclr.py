"""NNCLR views: jittered crops, the deterministic test-time view, noise on the stretched image as the original."""

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


def test_training_crops_are_windows_of_the_jitter_box_one_offset_per_batch():
    # Pixel values encode their position, so each crop reveals its offset.
    rows, columns = np.mgrid[:24, :24]
    images = np.repeat((rows * 100 + columns)[None, :, :, None], 4, axis=0).astype(np.float32)
    crop = augmentations.JitteredCrop(crop_size=16, jitter=4, seed=5)
    offsets = set()
    for _ in range(12):
        views = keras.ops.convert_to_numpy(crop(images, training=True))
        assert views.shape == (4, 16, 16, 1)
        top, left = int(views[0, 0, 0, 0] // 100), int(views[0, 0, 0, 0] % 100)
        # Centre box of side 16 + 4 starts at (24 - 20) // 2 = 2, so offsets 2..6 on both axes.
        assert 2 <= top <= 6 and 2 <= left <= 6
        # As the original's random crop of the batch tensor: the same window for every image.
        np.testing.assert_array_equal(views, images[:, top : top + 16, left : left + 16])
        offsets.add((top, left))
    assert len(offsets) > 1


def test_crop_rejects_images_smaller_than_crop_plus_jitter():
    crop = augmentations.JitteredCrop(crop_size=16, jitter=4)
    with pytest.raises(ValueError, match=r"images are 18x18 px, smaller than the crop: .* at least 20x20 \(crop 16 \+ jitter 4\)"):
        crop(_images((2, 18, 18, 5)), training=True)


def test_crop_rejects_images_without_a_batch_of_bands():
    crop = augmentations.JitteredCrop(crop_size=16, jitter=4)
    with pytest.raises(ValueError, match=r"images must be \(batch, H, W, bands\), got shape \(24, 24\)"):
        crop.build((24, 24))


def test_noise_is_added_to_the_stretched_image_at_one_to_three_band_scales():
    # As the original: sigma = f x scale (the band scale in counts) added to the stretched image,
    # one f ~ U(1, 3) per batch, shared by every image and band.
    band_scale = np.array([0.01, 0.02, 0.03, 0.04, 0.05], np.float32)
    stretched = _images((12, 64, 64, 5), seed=1)
    factors = []
    for seed in range(6):
        layer = augmentations.StretchedGaussianNoise((1.0, 3.0), band_scale=band_scale, seed=seed)
        added = keras.ops.convert_to_numpy(layer(stretched, training=True)).astype(np.float64) - stretched
        per_image_band = added.std(axis=(1, 2)) / band_scale  # (image, band)
        np.testing.assert_allclose(per_image_band, per_image_band.mean(), rtol=0.05)
        factors.append(per_image_band.mean())
    assert min(factors) > 0.95 and max(factors) < 3.05
    assert np.std(factors) > 0.1


def test_noise_is_small_next_to_the_stretched_sky_noise():
    # Sky noise of sigma = scale in counts is about 1/3 in stretched units; the added noise is
    # at most 3 x scale: in g, r, i a few hundredths, so the noise grows by at most a few per cent.
    band_scale = np.array([0.017, 0.020, 0.022, 0.061, 0.089], np.float32)
    sky = np.random.default_rng(2).normal(size=(4, 64, 64, 5)).astype(np.float32) * band_scale
    stretched = tidal_data.tidal_stretch(sky, band_scale)
    layer = augmentations.StretchedGaussianNoise((3.0, 3.0), band_scale=band_scale, seed=0)
    noisy = keras.ops.convert_to_numpy(layer(stretched, training=True))
    ratio = noisy.std(axis=(0, 1, 2)) / stretched.std(axis=(0, 1, 2))
    assert np.all(ratio[:3] < 1.05) and np.all(ratio > 1.0) and np.all(ratio < 1.35)


def test_noise_needs_one_positive_scale_per_band():
    with pytest.raises(ValueError, match=r"band_scale must be positive numbers"):
        augmentations.StretchedGaussianNoise(band_scale=(0.01, -1.0))
    with pytest.raises(ValueError, match=r"band_scale has 2 values for images of 5 bands"):
        augmentations.StretchedGaussianNoise(band_scale=(0.01, 0.02))(_images((1, 8, 8, 5)), training=True)


def test_noise_is_off_at_inference():
    images = _images((2, 24, 24, 5))
    layer = augmentations.StretchedGaussianNoise()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(images, training=False)), images)


@pytest.mark.parametrize(
    "layer",
    [augmentations.StretchedGaussianNoise((0.5, 2.0), band_scale=(0.1, 0.2), seed=4), augmentations.JitteredCrop(10, 3, seed=1)],
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
