"""ICL augmentations: random 90-degree rotations per image, noise level, normalisation."""

import numpy as np

import augmentations
import hsc


def test_rot90_draws_each_image_its_own_rotation():
    images = np.random.default_rng(0).normal(size=(64, 8, 8, 1)).astype(np.float32)
    rotated = augmentations.RandomRot90(seed=3)(images, training=True).numpy()
    ks = []
    for original, out in zip(images, rotated):
        matches = [k for k in range(4) if np.array_equal(np.rot90(original, k, axes=(0, 1)), out)]
        assert len(matches) == 1
        ks.append(matches[0])
    assert set(ks) == {0, 1, 2, 3}


def test_rot90_is_identity_at_inference():
    images = np.arange(32, dtype=np.float32).reshape(2, 4, 4, 1)
    np.testing.assert_array_equal(augmentations.RandomRot90()(images, training=False), images)


def test_noise_has_three_times_display_scale():
    images = np.zeros((16, 32, 32, 1), np.float32)
    layer = augmentations.icl_augmentation(seed=1).get_layer("random_noise")
    noisy = layer(images, training=True).numpy()
    assert np.std(noisy) == np.float32(noisy.std())
    assert abs(noisy.std() - 3 * hsc.ARCSINH_SCALE) < 0.002


def test_normalisation_uses_published_constants():
    out = augmentations.icl_normalisation()(np.array([[hsc.NORM_MEAN + hsc.NORM_STD]], np.float32))
    np.testing.assert_allclose(out, [[1.0]], rtol=1e-5)


def test_rot90_config_round_trip():
    layer = augmentations.RandomRot90(seed=5, name="r")
    clone = augmentations.RandomRot90.from_config(layer.get_config())
    assert clone.seed == 5 and clone.name == "r"


def test_model_adds_the_noise_to_the_normalised_image_as_the_original():
    """Normalise first, then augment: the noise is 0.052 in normalised units (0.047 the other way round)."""
    import keras

    import model

    icl = model.build_icl_model(model.TINY, augment=True, seed=0)
    names = [layer.name for layer in icl.layers]
    assert names.index("normalisation") < names.index("augmentation")
    augmented = keras.Model(icl.input, icl.get_layer("augmentation").output)
    value = 2.0
    images = np.full((8, 32, 32, 1), value, np.float32)  # flips and rotations leave it unchanged
    noise = augmented(images, training=True).numpy() - (value - hsc.NORM_MEAN) / hsc.NORM_STD
    assert abs(noise.std() - 3 * hsc.ARCSINH_SCALE) < 0.0015
    np.testing.assert_allclose(augmented(images, training=False).numpy(), (value - hsc.NORM_MEAN) / hsc.NORM_STD, rtol=1e-5)


def test_encoder_kernels_start_glorot_uniform_as_the_original():
    import keras

    import resnet_cifar10_v2

    encoder = resnet_cifar10_v2.build_resnet_v2((16, 16, 1), n_blocks=1)
    convolutions = [layer for layer in encoder.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convolutions
    assert all(isinstance(layer.kernel_initializer, keras.initializers.GlorotUniform) for layer in convolutions)
