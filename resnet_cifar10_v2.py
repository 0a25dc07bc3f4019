"""Pre-activation bottleneck ResNet v2 for CIFAR-sized inputs, as a Keras 3 functional builder.

Adapted in spirit from the keras-idiomatic-programmer ``resnet_cifar10_v2`` that both
original codebases used. Depth is 9 N + 2: a 3x3 stem, three stages of one projection
block and N - 1 identity blocks each, then (optionally) ReLU and global average pooling.

* ICL regressor (Canepa et al. 2025): N = 6 (depth 56), no batch normalisation, no weight decay.
* NNCLR tidal encoder (Desmons et al. 2023): N = 2 (depth 20), L2 weight decay 5e-4.
"""

import keras
from keras import layers

#: (bottleneck width, output width, stride of the projection block) for each of the three stages.
STAGES = ((16, 64, 1), (64, 128, 2), (128, 256, 2))


def build_resnet_v2(input_shape, n_blocks=6, weight_decay=0.0, batch_norm=False, pooling=True, name="resnet_v2",
                    final_activation=True, zero_gamma=False, kernel_initializer="glorot_uniform", batch_norm_decay=False):
    """Build the encoder: image -> 256-d vector (global average of the last feature map).

    Parameters
    ----------
    input_shape : tuple of int
        (height, width, channels) of the input images.
    n_blocks : int
        N, blocks per stage (one projection + N - 1 identity); depth = 9 N + 2.
    weight_decay : float
        L2 factor on every convolution kernel; 0 disables regularisation.
    batch_norm : bool
        Insert batch normalisation before every pre-activation ReLU.
    pooling : bool
        End with global average pooling (True) or return the last feature map itself, so that
        a model built around the encoder has the feature map as a tensor of its own graph.
    name : str
        Name of the returned model.
    final_activation : bool
        End the residual stages with (BN and) ReLU, as the ICL regressor does. The NNCLR encoder of
        Desmons et al. 2023 pools the last block's sum directly (False).
    zero_gamma : bool
        Start the scale (gamma) of the batch normalisation before the last convolution of every
        identity block at zero, so each identity block starts as the identity (as the tidal
        encoder's original did); needs ``batch_norm``.
    kernel_initializer : str
        Initialiser of the convolution kernels: Keras's default "glorot_uniform", which both
        originals used (they set none).
    batch_norm_decay : bool
        Also put the L2 factor ``weight_decay`` on the batch normalisation's gamma and beta (as the
        tidal encoder's original did).

    Returns
    -------
    keras.Model
        Functional model with output shape (batch, 256), or (batch, h, w, 256) without pooling
        (h, w = input size / 4).
    """
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if zero_gamma and not batch_norm:
        raise ValueError("zero_gamma needs batch_norm")
    builder = _Builder(weight_decay, batch_norm, kernel_initializer, batch_norm_decay)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = builder.conv(16, 3, name="stem_conv")(inputs)
    x = builder.activation(x, "stem")
    for stage, (width, out_width, stride) in enumerate(STAGES, start=1):
        x = builder.block(x, width, out_width, stride, projection=True, name=f"stage{stage}_block1")
        for block in range(2, n_blocks + 1):
            x = builder.block(x, width, out_width, 1, projection=False, name=f"stage{stage}_block{block}",
                              zero_gamma=zero_gamma)
    if final_activation:
        if batch_norm:
            x = layers.BatchNormalization(name="final_bn")(x)
        x = layers.ReLU(name="final_activation")(x)
    if pooling:
        x = layers.GlobalAveragePooling2D(name="global_pool")(x)
    return keras.Model(inputs, x, name=name)


class _Builder:
    """Holds the shared layer options so each block reads as its diagram."""

    def __init__(self, weight_decay, batch_norm, kernel_initializer="glorot_uniform", batch_norm_decay=False):
        self.regularizer = keras.regularizers.L2(weight_decay) if weight_decay else None
        self.batch_norm = batch_norm
        self.kernel_initializer = kernel_initializer
        self.batch_norm_regularizer = self.regularizer if batch_norm_decay else None

    def conv(self, filters, kernel_size, strides=1, name=None):
        return layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding="same",
            use_bias=False,
            kernel_initializer=self.kernel_initializer,
            kernel_regularizer=self.regularizer,
            name=name,
        )

    def activation(self, x, name, zero_gamma=False):
        if self.batch_norm:
            x = layers.BatchNormalization(
                gamma_initializer="zeros" if zero_gamma else "ones",
                gamma_regularizer=self.batch_norm_regularizer,
                beta_regularizer=self.batch_norm_regularizer,
                name=f"{name}_bn",
            )(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    def block(self, x, width, out_width, stride, projection, name, zero_gamma=False):
        """Pre-activation bottleneck: (BN) ReLU 1x1 -> (BN) ReLU 3x3 -> (BN) ReLU 1x1, plus shortcut.

        ``zero_gamma`` starts the last batch normalisation's scale at zero (identity blocks).
        """
        if projection:
            shortcut = self.conv(out_width, 1, strides=stride, name=f"{name}_shortcut")(x)
        else:
            shortcut = x
        y = self.activation(x, f"{name}_pre1")
        y = self.conv(width, 1, name=f"{name}_conv1")(y)
        y = self.activation(y, f"{name}_pre2")
        y = self.conv(width, 3, strides=stride, name=f"{name}_conv2")(y)
        y = self.activation(y, f"{name}_pre3", zero_gamma=zero_gamma)
        y = self.conv(out_width, 1, name=f"{name}_conv3")(y)
        return layers.Add(name=f"{name}_add")([shortcut, y])
