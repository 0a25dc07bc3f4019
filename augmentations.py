"""Augmentations shared by the ICL regressor and the NNCLR tidal-feature detector.

All augmentations are Keras layers, so they can sit inside a model and act only when
``training=True``. Randomness comes from ``keras.random.SeedGenerator`` (one per layer),
so a seeded run is reproducible and no global random state is used.
"""

import keras
import numpy as np
from keras import layers, ops

import hsc

#: Standard deviation of the training noise, 3 x the display scale, added (as the original) to the
#: *normalised* image: 0.052 in units where the arcsinh-scaled sky has a standard deviation of 1.108.
ICL_NOISE_STD = 3.0 * hsc.ARCSINH_SCALE


@keras.saving.register_keras_serializable(package="icl")
class RandomRot90(layers.Layer):
    """Rotate each image by its own random multiple of 90 degrees (k drawn from {0, 1, 2, 3}).

    The original code meant to do this but rotated every image by exactly 90 degrees.
    Acts only in training; square images only (rotating changes height and width otherwise).
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training:
            return images
        k = keras.random.randint((ops.shape(images)[0],), 0, 4, seed=self.seed_generator)
        # All four rotations of the batch (counter-clockwise in the image plane), then pick one
        # per image: vectorised and exact on every backend.
        k = ops.reshape(k, (-1, 1, 1, 1))
        rotated = images
        for i in range(1, 4):
            rotated = ops.where(ops.equal(k, i), ops.rot90(images, k=i, axes=(1, 2)), rotated)
        return rotated

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def icl_normalisation(name="normalisation"):
    """Fixed standardisation of arcsinh-scaled images: (x - 0.948) / 1.108 (SPEC Part A)."""
    return layers.Normalization(mean=hsc.NORM_MEAN, variance=hsc.NORM_STD**2, name=name)


def icl_augmentation(seed=None, name="augmentation"):
    """Training augmentation of the ICL regressor: flips, Gaussian noise, random 90-degree rotation.

    It acts on normalised images (after :func:`icl_normalisation`), as the original's did.

    Parameters
    ----------
    seed : int or None
        Seed of the layers' random generators.
    """
    seeds = [None] * 3 if seed is None else [seed, seed + 1, seed + 2]
    return keras.Sequential(
        [
            layers.RandomFlip("horizontal_and_vertical", seed=seeds[0], name="random_flip"),
            layers.GaussianNoise(ICL_NOISE_STD, seed=seeds[1], name="random_noise"),
            RandomRot90(seed=seeds[2], name="random_rot90"),
        ],
        name=name,
    )


# ----------------------------------------------------------------------------------------
# NNCLR tidal-feature detector (Desmons et al. 2023)
#
# The views are taken from images already stretched by ``tidal_data.tidal_stretch``
# (arcsinh(x / scale / 3) per band), so the whole augmentation works in stretched units.

#: Side of the square views the NNCLR encoder sees, in pixels.
NNCLR_CROP_SIZE = 96
#: Largest shift of the random crop, in pixels: centre crop to 96 + 13, then a random 96 crop.
NNCLR_JITTER = 13
#: The noise sigma is drawn from U(low, high) in units of the per-band scale.
NNCLR_NOISE_RANGE = (1.0, 3.0)


@keras.saving.register_keras_serializable(package="nnclr")
class StretchedGaussianNoise(layers.Layer):
    """Add Gaussian noise of sigma = f x (per-band scale) to arcsinh-stretched images, as the original did.

    The images hold y = arcsinh(x / (3 s)) per band, with s the band's MAD-std scale in counts
    (``tidal_data.tidal_stretch``). Like the original code (Desmons et al. 2023), the noise is
    added to the *stretched* image with sigma = f s, f ~ U(noise_range) drawn once per batch: s
    is a few hundredths of a count, so in stretched units the added noise is a small fraction
    of the stretched sky noise (about 1 / 3): the views differ slightly in their noise, and
    faint features stay as visible as in the data. Acts only in training.

    Parameters
    ----------
    noise_range : (float, float)
        Lower and upper limits of the noise factor f.
    band_scale : sequence of float
        The per-band scale s of the stretch (counts), one per band.
    seed : int or None
        Seed of the layer's random generator.
    """

    def __init__(self, noise_range=NNCLR_NOISE_RANGE, band_scale=(1.0,), seed=None, **kwargs):
        super().__init__(**kwargs)
        low, high = (float(value) for value in noise_range)
        if not 0 <= low <= high:
            raise ValueError(f"noise_range must satisfy 0 <= low <= high, got {tuple(noise_range)}")
        band_scale = tuple(float(value) for value in np.ravel(band_scale))
        if not band_scale or not all(np.isfinite(value) and value > 0 for value in band_scale):
            raise ValueError(f"band_scale must be positive numbers, one per band, got {band_scale}")
        self.noise_range = (low, high)
        self.band_scale = band_scale
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        bands = input_shape[-1]
        if bands is not None and len(self.band_scale) not in (1, bands):
            raise ValueError(f"band_scale has {len(self.band_scale)} values for images of {bands} bands")

    def call(self, images, training=None):
        if not training:
            return images
        factor = keras.random.uniform((), *self.noise_range, dtype=images.dtype, seed=self.seed_generator)
        scale = ops.convert_to_tensor(self.band_scale, dtype=images.dtype)
        noise = keras.random.normal(ops.shape(images), dtype=images.dtype, seed=self.seed_generator)
        return images + factor * scale * noise

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "noise_range": self.noise_range, "band_scale": self.band_scale, "seed": self.seed}


@keras.saving.register_keras_serializable(package="nnclr")
class JitteredCrop(layers.Layer):
    """Crop square views: jittered around the centre in training, exactly centred otherwise.

    Training: centre crop to ``crop_size + jitter``, then a random ``crop_size`` crop inside it,
    one offset per batch, as the original. Inference: the
    deterministic test-time view, a centre crop to ``crop_size``.

    Parameters
    ----------
    crop_size : int
        Side of the output views in pixels.
    jitter : int
        Largest shift of the random crop in pixels.
    seed : int or None
        Seed of the layer's random generator.

    Raises
    ------
    ValueError
        When built on images that are not (batch, H, W, C) or smaller than crop_size + jitter.
    """

    def __init__(self, crop_size=NNCLR_CROP_SIZE, jitter=NNCLR_JITTER, seed=None, **kwargs):
        super().__init__(**kwargs)
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.crop_size = int(crop_size)
        self.jitter = int(jitter)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f"images must be (batch, H, W, bands), got shape {tuple(input_shape)}")
        height, width = input_shape[1], input_shape[2]
        needed = self.crop_size + self.jitter
        if height is not None and width is not None and (height < needed or width < needed):
            raise ValueError(
                f"images are {height}x{width} px, smaller than the crop: they must be at least "
                f"{needed}x{needed} (crop {self.crop_size} + jitter {self.jitter})"
            )

    def call(self, images, training=None):
        height, width = ops.shape(images)[1], ops.shape(images)[2]
        if not training:
            top = (height - self.crop_size) // 2
            left = (width - self.crop_size) // 2
            return images[:, top : top + self.crop_size, left : left + self.crop_size, :]
        # One offset for the whole batch, as the original's random crop of the batch tensor.
        offsets = keras.random.randint((2,), 0, self.jitter + 1, seed=self.seed_generator)
        top = (height - self.crop_size - self.jitter) // 2 + offsets[0]
        left = (width - self.crop_size - self.jitter) // 2 + offsets[1]
        return ops.slice(images, (0, top, left, 0), (ops.shape(images)[0], self.crop_size, self.crop_size, ops.shape(images)[3]))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.crop_size, self.crop_size, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "crop_size": self.crop_size, "jitter": self.jitter, "seed": self.seed}


def nnclr_augmentation(
    crop_size=NNCLR_CROP_SIZE, jitter=NNCLR_JITTER, noise_range=NNCLR_NOISE_RANGE, band_scale=(1.0,), seed=None,
    name="nnclr_augmentation",
):
    """Views of stretched tidal images for NNCLR (Desmons et al. 2023, section 3.2).

    Training (``training=True``): random horizontal and vertical flips, Gaussian noise of
    sigma = f x the per-band scale, f ~ U(noise_range), added to the stretched image
    (:class:`StretchedGaussianNoise`), centre crop
    to ``crop_size + jitter`` and a random ``crop_size`` crop. Inference: the deterministic
    test-time view, a centre crop to ``crop_size`` with no flip and no noise.

    Parameters
    ----------
    crop_size, jitter : int
        Output side and largest crop shift, in pixels.
    noise_range : (float, float)
        Range of the noise factor, in units of the per-band scale.
    band_scale : sequence of float
        The per-band scale of the stretch the images went through (counts).
    seed : int or None
        Seed of the layers' random generators.

    Returns
    -------
    keras.Sequential
        (batch, H, W, bands) -> (batch, crop_size, crop_size, bands).
    """
    seeds = [None] * 3 if seed is None else [seed, seed + 1, seed + 2]
    return keras.Sequential(
        [
            layers.RandomFlip("horizontal_and_vertical", seed=seeds[0], name="random_flip"),
            StretchedGaussianNoise(noise_range, band_scale, seed=seeds[1], name="random_noise"),
            JitteredCrop(crop_size, jitter, seed=seeds[2], name="jittered_crop"),
        ],
        name=name,
    )


def nnclr_test_view(images, crop_size=NNCLR_CROP_SIZE):
    """The deterministic test-time view: a centre crop to ``crop_size``, no flip, no noise.

    Parameters
    ----------
    images : array or tensor, shape (batch, H, W, bands)
        Stretched images, at least ``crop_size`` on each side.

    Returns
    -------
    array or tensor, shape (batch, crop_size, crop_size, bands)
        The same window as :class:`JitteredCrop` at inference.
    """
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(f"images must be (batch, H, W, bands), got shape {shape}")
    height, width = shape[1], shape[2]
    if height < crop_size or width < crop_size:
        raise ValueError(f"images are {height}x{width} px, smaller than the crop {crop_size}x{crop_size}")
    top, left = (height - crop_size) // 2, (width - crop_size) // 2
    return images[:, top : top + crop_size, left : left + crop_size, :]
