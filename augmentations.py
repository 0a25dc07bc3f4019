"""Augmentations shared by the ICL regressor and the NNCLR tidal-feature detector.

All augmentations are Keras layers, so they can sit inside a model and act only when
``training=True``. Randomness comes from ``keras.random.SeedGenerator`` (one per layer),
so a seeded run is reproducible and no global random state is used.
"""

import keras
import tensorflow as tf
from keras import layers

import hsc

#: Standard deviation of the training noise in the arcsinh-scaled image (3 x the display scale).
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
        batch = tf.shape(images)[0]
        k = keras.random.randint((batch,), 0, 4, seed=self.seed_generator)
        # All four rotations of the batch, then pick one per image: vectorised, no map_fn.
        rotations = tf.stack([tf.image.rot90(images, k=i) for i in range(4)], axis=0)
        return tf.gather_nd(rotations, tf.stack([k, tf.range(batch)], axis=1))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def icl_normalisation(name="normalisation"):
    """Fixed standardisation of arcsinh-scaled images: (x - 0.948) / 1.108 (SPEC Part A)."""
    return layers.Normalization(mean=hsc.NORM_MEAN, variance=hsc.NORM_STD**2, name=name)


def icl_augmentation(seed=None, name="augmentation"):
    """Training augmentation of the ICL regressor: flips, Gaussian noise, random 90-degree rotation.

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
