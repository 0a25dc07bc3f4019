"""NNCLR self-supervised encoder and linear classifier for tidal features (Desmons et al. 2023).

NNCLR (Dwibedi et al. 2021, "With a Little Help from My Friends") learns representations
without labels: two random views of each galaxy are encoded and projected; each view's
projection is replaced by its nearest neighbour in a support queue of past projections, and
a contrastive loss asks that neighbour to pick out the *other* view of the same galaxy among
the batch. The encoder's 128-d representation then feeds a linear classifier trained on a
few hundred labelled galaxies.

Adapted from the Keras example "Self-supervised contrastive learning with NNCLR" (Rishit
Dagli), as the original code was; ported to Keras 3.

Inputs are tidal cutouts already stretched with ``tidal_data.tidal_stretch`` (arcsinh(x /
scale / 3) per band); the models hold the augmentation, so they take the full cutouts.

The models are Keras 3 multi-backend models written with ``keras.ops``: they build, train,
save and load with the TensorFlow backend (the default) or the JAX one (``KERAS_BACKEND=jax``,
which needs no TensorFlow installed). Only the multi-device training of ``tf.distribute``
(:func:`replica_nnclr_loss`, :func:`synchronise_batch_norm`) is TensorFlow's, and imports it
when it runs.
"""

import dataclasses
import functools
import json
import pathlib
import zipfile

import keras
import numpy as np
from keras import layers, ops

import augmentations
import common
import parallel
import tidal_data
from resnet_cifar10_v2 import build_resnet_v2


@dataclasses.dataclass(frozen=True)
class NNCLRConfig:
    """Everything that fixes the NNCLR architecture and its views (defaults: Desmons et al. 2023)."""

    # Side of the square input cutouts in pixels.
    image_size: int = 128
    # Number of bands in the last image axis (g, r, i, z, y).
    n_bands: int = len(tidal_data.TIDAL_BANDS)
    # Side of the augmented views the encoder reads, in pixels.
    crop_size: int = augmentations.NNCLR_CROP_SIZE
    # Largest shift of the random crop in pixels; inputs must be at least crop_size + jitter.
    jitter: int = augmentations.NNCLR_JITTER
    # Noise sigma = f x noise_scale, f ~ U(low, high), added to the stretched views.
    noise_range: tuple = augmentations.NNCLR_NOISE_RANGE
    # Per-band unit of the noise: the band scale of the stretch (counts; nnclr_train.py sets it
    # from the data, the default is the mocks' Ultradeep sky noise in g, r, i, z, y).
    noise_scale: tuple = (0.017, 0.020, 0.022, 0.061, 0.089)
    # Blocks per ResNet v2 stage (depth 9 N + 2; N = 2 gives depth 20).
    n_blocks: int = 2
    # The encoder first averages binning x binning pixels (1: the paper's full resolution; 2 costs
    # a quarter of the arithmetic, for CPU training). crop_size must be a multiple of it.
    binning: int = 1
    # L2 factor on the ResNet convolution kernels.
    weight_decay: float = 5e-4
    # Batch normalisation inside the ResNet (the keras-idiomatic ResNet v2 the original used has it).
    batch_norm: bool = True
    # End the ResNet with BN + ReLU before the pooling (the original encoder pools the last sum: False).
    final_activation: bool = False
    # Start the scale of the last BN of every identity block at zero (as the original).
    zero_gamma: bool = True
    # Initialiser of the convolution and Dense kernels (the original: Keras's default glorot_uniform).
    initializer: str = "glorot_uniform"
    # Width of the representation (encoder output).
    representation_dim: int = 128
    # Width of the projection-head output, the space of the contrastive loss and the queue.
    projection_dim: int = 128
    # Number of past projections kept in the support queue.
    queue_size: int = 10_000
    # Temperature of the softmax over similarities.
    temperature: float = 0.1

    def __post_init__(self):
        for name in ("image_size", "n_bands", "crop_size", "n_blocks", "binning", "representation_dim", "projection_dim",
                     "queue_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {self.jitter}")
        if self.image_size < self.crop_size + self.jitter:
            raise ValueError(
                f"image_size {self.image_size} is smaller than the crop: it must be at least "
                f"crop_size + jitter = {self.crop_size + self.jitter}"
            )
        if self.crop_size % self.binning:
            raise ValueError(f"crop_size {self.crop_size} must be a multiple of binning {self.binning}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        object.__setattr__(self, "noise_range", tuple(float(value) for value in self.noise_range))
        object.__setattr__(self, "noise_scale", tuple(float(value) for value in self.noise_scale))
        low, high = self.noise_range
        if not 0 <= low <= high:
            raise ValueError(f"noise_range must satisfy 0 <= low <= high, got {self.noise_range}")
        if len(self.noise_scale) != self.n_bands or not all(value > 0 for value in self.noise_scale):
            raise ValueError(f"noise_scale must hold {self.n_bands} positive values (one per band), got {self.noise_scale}")
        if self.zero_gamma and not self.batch_norm:
            raise ValueError("zero_gamma needs batch_norm")

    @property
    def input_shape(self):
        """(H, W, bands) of the cutouts the NNCLR model and the classifier take."""
        return (self.image_size, self.image_size, self.n_bands)

    @property
    def encoder_input_shape(self):
        """(crop, crop, bands) of the views the encoder reads."""
        return (self.crop_size, self.crop_size, self.n_bands)

    @property
    def min_image_size(self):
        """Smallest image side the augmentation can crop from."""
        return self.crop_size + self.jitter

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Config from :meth:`to_dict` output (unknown keys are an error)."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown NNCLR config keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)


#: A tiny configuration for tests and quick CPU runs: 24 px images, N = 1, a 64-entry queue.
TINY_CONFIG = NNCLRConfig(
    image_size=24, crop_size=16, jitter=4, n_blocks=1, representation_dim=16, projection_dim=16, queue_size=64
)


# ----------------------------------------------------------------------------------------
# Building blocks


def build_encoder(config, name="nnclr_encoder"):
    """Encoder: ResNet v2 (N = config.n_blocks) -> global pool -> Dense-BN-ReLU-Dense-BN -> representation.

    As the original: the ResNet's last block feeds the pooling directly (no final BN + ReLU), the
    last BN of each identity block starts with zero scale, kernels start glorot-uniform, and
    the L2 factor ``weight_decay`` sits on the convolution and Dense kernels and the BN
    parameters. (The NNCLR loss does not include it, as the original's training step did not;
    the classifier's training does.)

    Parameters
    ----------
    config : NNCLRConfig

    Returns
    -------
    keras.Model
        (batch, crop, crop, bands) stretched views -> (batch, representation_dim).
    """
    binned = config.crop_size // config.binning
    backbone = build_resnet_v2(
        (binned, binned, config.n_bands),
        n_blocks=config.n_blocks,
        weight_decay=config.weight_decay,
        batch_norm=config.batch_norm,
        name="resnet",
        final_activation=config.final_activation,
        zero_gamma=config.zero_gamma,
        kernel_initializer=config.initializer,
        batch_norm_decay=True,
    )
    if config.binning == 1:
        inputs, x = backbone.input, backbone.output
    else:
        inputs = keras.Input(config.encoder_input_shape, name="view")
        x = backbone(layers.AveragePooling2D(config.binning, name="binning")(inputs))
    regularizer = keras.regularizers.L2(config.weight_decay) if config.weight_decay else None
    dense = dict(use_bias=False, kernel_initializer=config.initializer, kernel_regularizer=regularizer)
    x = layers.Dense(config.representation_dim, name="representation_dense1", **dense)(x)
    x = layers.BatchNormalization(name="representation_bn1")(x)
    x = layers.ReLU(name="representation_relu")(x)
    x = layers.Dense(config.representation_dim, name="representation_dense2", **dense)(x)
    outputs = layers.BatchNormalization(name="representation_bn2")(x)
    return keras.Model(inputs, outputs, name=name)


def output_dtype():
    """The dtype of the model's last layers: the variables' dtype of the global policy
    (float32 under ``mixed_bfloat16``; the policy's own dtype under a plain policy)."""
    return keras.mixed_precision.dtype_policy().variable_dtype


def build_projection_head(config, name="projection_head"):
    """Projection head: Dense(projection_dim, ReLU) -> Dense(projection_dim).

    The last layer computes in the dtype of the variables (:func:`output_dtype`), so that under
    mixed precision (``mixed_bfloat16``) the loss, the support queue and the nearest neighbours
    stay float32; under a plain policy (float32, float64) this changes nothing.
    """
    inputs = keras.Input((config.representation_dim,), name="representation")
    x = layers.Dense(config.projection_dim, activation="relu", name="projection_dense1")(inputs)
    outputs = layers.Dense(config.projection_dim, dtype=output_dtype(), name="projection_dense2")(x)
    return keras.Model(inputs, outputs, name=name)


def build_augmenter(config, seed=None):
    """The NNCLR views for this config (random in training, centre crop otherwise)."""
    return augmentations.nnclr_augmentation(
        crop_size=config.crop_size,
        jitter=config.jitter,
        noise_range=config.noise_range,
        band_scale=config.noise_scale,
        seed=seed,
    )


#: Keras backends whose training steps :class:`NNCLR` implements.
TRAINING_BACKENDS = ("tensorflow", "jax")


def _backend():
    """The name of the Keras backend in use (``tensorflow``, ``jax``, ...)."""
    return keras.backend.backend()


def _require_tensorflow(what):
    """Import TensorFlow for ``what``, a ``tf.distribute`` feature; one clear error on another backend
    (:func:`common.require_tensorflow`)."""
    common.require_tensorflow(what)
    import tensorflow as tf

    return tf


def l2_normalise(vectors):
    """Rows scaled to unit length.

    As ``tf.math.l2_normalize(vectors, axis=1)``: rows times ``rsqrt(max(sum of squares, 1e-12))``.
    """
    square_sum = ops.sum(ops.square(vectors), axis=1, keepdims=True)
    return vectors * ops.rsqrt(ops.maximum(square_sum, 1e-12))


def nearest_neighbour(projections, queue):
    """Nearest neighbour of each projection in the support queue, straight-through.

    Parameters
    ----------
    projections : tensor, shape (B, D)
        L2-normalised projections.
    queue : tensor, shape (Q, D)
        L2-normalised support set.

    Returns
    -------
    tensor, shape (B, D)
        The neighbour (largest cosine similarity) in the forward pass; in the backward pass the
        gradient goes to ``projections`` unchanged (the neighbour lookup is not differentiable).
    """
    similarities = ops.matmul(projections, ops.transpose(queue))
    neighbours = ops.take(queue, ops.argmax(similarities, axis=1), axis=0)
    return projections + ops.stop_gradient(neighbours - projections)


def nnclr_loss(projections_1, projections_2, queue, temperature):
    """The symmetric NNCLR loss of Dwibedi et al. 2021 (eq. 2), as in the original code.

    With z1, z2 the L2-normalised projections of the two views and NN(.) the straight-through
    nearest neighbour in the queue, the loss is the mean softmax cross-entropy, with the
    matching galaxy (the diagonal) as the target, over the rows of the four logit matrices
    NN(z1) z2^T, z2 NN(z1)^T, NN(z2) z1^T and z1 NN(z2)^T, each divided by the temperature.

    Parameters
    ----------
    projections_1, projections_2 : tensor, shape (B, D)
        Projections of the two views (normalised here).
    queue : tensor, shape (Q, D)
        L2-normalised support set.
    temperature : float

    Returns
    -------
    scalar tensor
    """
    z1 = l2_normalise(projections_1)
    z2 = l2_normalise(projections_2)
    neighbours_1 = nearest_neighbour(z1, queue)
    neighbours_2 = nearest_neighbour(z2, queue)
    logits = _four_logits((z1, z2, neighbours_1, neighbours_2), (z1, z2, neighbours_1, neighbours_2), temperature)
    targets = ops.tile(ops.arange(ops.shape(z1)[0]), [4])
    return ops.mean(keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True))


def _four_logits(rows, columns, temperature):
    """Rows of the four logit matrices NN(z1) z2^T, z2 NN(z1)^T, NN(z2) z1^T and z1 NN(z2)^T.

    ``rows`` and ``columns`` are each ``(z1, z2, NN(z1), NN(z2))``: the rows this device
    scores, and the batch it scores them against (the same tensors on one device).
    """
    z1, z2, neighbours_1, neighbours_2 = rows
    all_z1, all_z2, all_neighbours_1, all_neighbours_2 = columns
    return ops.concatenate(
        [
            ops.matmul(neighbours_1, ops.transpose(all_z2)),
            ops.matmul(z2, ops.transpose(all_neighbours_1)),
            ops.matmul(neighbours_2, ops.transpose(all_z1)),
            ops.matmul(z1, ops.transpose(all_neighbours_2)),
        ],
        axis=0,
    ) / temperature


def replica_nnclr_loss(projections_1, projections_2, queue, temperature):
    """This replica's share of the global-batch NNCLR loss, under any ``tf.distribute`` strategy.

    Under a multi-device strategy each replica holds a slice of the batch, but the NNCLR loss
    contrasts every galaxy with the whole batch. The projections and their neighbours are
    gathered from all replicas (``ReplicaContext.all_gather``, whose gradient returns each
    replica its own slice), each replica computes the cross-entropy of its own rows of the
    four logit matrices of :func:`nnclr_loss` against the gathered batch, and divides their
    sum by the global number of rows. The shares summed over replicas (as the optimizer sums
    the replicas' gradients) are the loss :func:`nnclr_loss` gives on the whole batch on one
    device. With one replica the share is that loss. TensorFlow backend only.

    Parameters
    ----------
    projections_1, projections_2 : tensor, shape (B_replica, D)
        This replica's projections of the two views (normalised here).
    queue : tensor, shape (Q, D)
        L2-normalised support set, the same on every replica.
    temperature : float

    Returns
    -------
    share : scalar tensor
        This replica's share of the global-batch loss.
    gathered_1 : tensor, shape (B, D)
        The L2-normalised projections of the first view of the whole batch, in batch order
        (replica 0's slice first), as the queue takes them.

    Raises
    ------
    ValueError
        On a Keras backend other than TensorFlow.
    """
    tf = _require_tensorflow("the replica share of the NNCLR loss")
    replica = tf.distribute.get_replica_context()
    z1 = l2_normalise(projections_1)
    z2 = l2_normalise(projections_2)
    neighbours_1 = nearest_neighbour(z1, queue)
    neighbours_2 = nearest_neighbour(z2, queue)
    all_z1, all_z2, all_neighbours_1, all_neighbours_2 = replica.all_gather([z1, z2, neighbours_1, neighbours_2], axis=0)
    local = tf.shape(z1)[0]
    offset = _replica_offset(replica, local)
    logits = _four_logits(
        (z1, z2, neighbours_1, neighbours_2), (all_z1, all_z2, all_neighbours_1, all_neighbours_2), temperature
    )
    targets = tf.tile(offset + tf.range(local), [4])
    cross_entropy = keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
    global_rows = tf.cast(4 * tf.shape(all_z1)[0], cross_entropy.dtype)
    return tf.reduce_sum(cross_entropy) / global_rows, all_z1


def _replica_offset(replica, local):
    """Position of this replica's first row in the gathered batch.

    Replicas may hold unequal slices (the last batch of an epoch), so it is the sum of the
    slices of the replicas before this one.
    """
    import tensorflow as tf

    sizes = replica.all_gather(tf.reshape(local, [1]), axis=0)
    return tf.reduce_sum(sizes[: replica.replica_id_in_sync_group])


def synchronise_batch_norm(model, synchronised=True):
    """Switch every BatchNormalization layer of ``model`` to (or from) cross-replica batch statistics.

    Under MirroredStrategy each replica sees only its slice of the batch; synchronised layers
    normalise with the mean and variance of the global batch (Keras's ``synchronized=True``),
    as one device would. The weights and architecture are unchanged. Nested models are included.
    Switching to synchronised layers needs the TensorFlow backend; switching back works on any.

    Returns
    -------
    int
        The number of BatchNormalization layers switched.

    Raises
    ------
    ValueError
        When ``synchronised`` is true on a Keras backend other than TensorFlow.
    """
    if synchronised:
        _require_tensorflow("synchronised batch normalisation")
    switched = 0
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.synchronized = bool(synchronised)
            switched += 1
        elif isinstance(layer, keras.Model):
            switched += synchronise_batch_norm(layer, synchronised)
    return switched


@keras.saving.register_keras_serializable(package="nnclr")
class UnitRowsInitializer(keras.initializers.Initializer):
    """Random Gaussian rows scaled to unit length: the starting support queue."""

    def __init__(self, seed=None):
        self.seed = seed

    def __call__(self, shape, dtype=None):
        rows = keras.random.normal(shape, dtype=dtype, seed=self.seed)
        return rows / keras.ops.norm(rows, axis=-1, keepdims=True)

    def get_config(self):
        return {"seed": self.seed}


# ----------------------------------------------------------------------------------------
# The self-supervised model


class NNCLR(keras.Model):
    """NNCLR model: augmenter, encoder, projection head and the support queue.

    ``fit`` takes unbatched-then-batched stretched images (a tensor or a dict with ``image``,
    as from ``tidal_data.tidal_unlabelled_dataset``); labels are ignored. Calling the model
    returns the representations of the deterministic test-time view.

    Parameters
    ----------
    config : NNCLRConfig
    seed : int or None
        Seeds the augmentations and the initial queue.
    encoder : keras.Model, optional
        A trained encoder to continue from; it must match ``config`` (see :func:`check_encoder`).

    Notes
    -----
    The queue is a non-trainable variable, so it is saved with the weights and restored on
    resume. After each step the L2-normalised projections of the first view enter at the
    front and the oldest leave at the back (a FIFO of the last ``queue_size`` projections).
    The loss is the NNCLR loss alone: the encoder's L2 weight decay is not added, as the
    original's training step did not add it (its layers carried the regularisers, which only
    the classifier's training applied).

    Under a ``tf.distribute`` strategy (build and compile the model inside its scope) the
    loss is that of the global batch (:func:`replica_nnclr_loss`), and the projections are
    gathered from every replica before they enter the queue, so every replica's queue holds
    the same rows in the same order as one device's would. The random views are drawn for the
    gathered batch, the same on every replica, and each replica keeps its slice: the views are
    those one device draws from the same seed (each replica drawing for its own slice would
    give every slice the same flips, noise and crops). The queue variable is written with
    ``only_first_replica`` aggregation: all replicas compute the same new queue and the
    first one's is kept. The batch-normalisation statistics stay per replica unless the
    encoder's layers are synchronised (:func:`synchronise_batch_norm`).

    With the JAX backend the steps are pure functions of the model's state, as Keras's JAX
    trainer asks: the step of one device with the same loss, the queue update coming out with
    the other non-trainable variables (batch-normalisation statistics, random-generator
    states). Other backends can build and call the model but not train it.
    """

    def __init__(self, config=NNCLRConfig(), seed=None, encoder=None, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.augmenter = build_augmenter(config, seed)
        if encoder is None:
            encoder = build_encoder(config)
        else:
            check_encoder(encoder, config)
        self.encoder = encoder
        self.projection_head = build_projection_head(config)
        self.queue = self.add_weight(
            shape=(config.queue_size, config.projection_dim),
            initializer=UnitRowsInitializer(seed),
            trainable=False,
            # Every replica assigns the same gathered queue; keeping the first one's makes the
            # assignment legal in a replica context and costs no reduction.
            aggregation="only_first_replica",
            name="support_queue",
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.contrastive_loss_tracker = keras.metrics.Mean(name="c_loss")
        self.contrastive_accuracy = keras.metrics.SparseCategoricalAccuracy(name="c_acc")
        self.correlation_accuracy = keras.metrics.SparseCategoricalAccuracy(name="r_acc")
        self.build((None,) + config.input_shape)

    def build(self, input_shape):
        self.augmenter.build(input_shape)
        super().build(input_shape)

    @property
    def metrics(self):
        return [self.loss_tracker, self.contrastive_loss_tracker, self.contrastive_accuracy, self.correlation_accuracy]

    def check_images(self, images):
        """Raise ValueError unless a batch of images has the shape the config gives."""
        if len(images.shape) != 4 or any(
            got is not None and got != want for got, want in zip(images.shape[1:], self.config.input_shape)
        ):
            raise ValueError(
                f"images must be (batch, {', '.join(map(str, self.config.input_shape))}) as the NNCLR config "
                f"gives (H, W, bands), got shape {tuple(images.shape)}"
            )

    def call(self, images, training=False):
        self.check_images(images)
        return self.encoder(self.augmenter(images, training=training), training=training)

    def push_to_queue(self, projections):
        """Put L2-normalised projections at the front of the queue; the oldest rows drop out."""
        batch = ops.shape(projections)[0]
        projections = ops.cast(projections, self.queue.dtype)
        self.queue.assign(ops.concatenate([projections, self.queue[: self.config.queue_size - batch]], axis=0))

    def update_contrastive_accuracy(self, features_1, features_2):
        """Top-1 retrieval of the other view of the same galaxy among the batch (both ways)."""
        self.contrastive_accuracy.update_state(*contrastive_accuracy_inputs(features_1, features_2))

    def update_correlation_accuracy(self, features_1, features_2):
        """Fraction of feature dimensions most correlated with themselves across the two views."""
        self.correlation_accuracy.update_state(*correlation_accuracy_inputs(features_1, features_2))

    def train_step(self, *arguments):
        """One NNCLR step on a batch of stretched images.

        Parameters
        ----------
        *arguments
            ``data`` with the TensorFlow backend; ``state, data`` with the JAX backend, where
            ``state`` is ``(trainable_variables, non_trainable_variables, optimizer_variables,
            metrics_variables)``, as the backend's trainer calls it.

        Returns
        -------
        dict or (dict, tuple)
            The metrics (``loss``, ``c_loss``, ``c_acc``, ``r_acc``); with JAX, also the new state.
        """
        backend = _backend()
        if backend == "tensorflow":
            return self._tensorflow_train_step(*arguments)
        if backend == "jax":
            return self._jax_train_step(*arguments)
        raise ValueError(_unsupported_training(backend))

    def test_step(self, *arguments):
        """The metrics of a batch without training (random views, inference-mode encoder).

        ``data`` with the TensorFlow backend; ``state, data`` with the JAX backend, where
        ``state`` is ``(trainable_variables, non_trainable_variables, metrics_variables)``.
        """
        backend = _backend()
        if backend == "tensorflow":
            return self._tensorflow_test_step(*arguments)
        if backend == "jax":
            return self._jax_test_step(*arguments)
        raise ValueError(_unsupported_training(backend))

    # TensorFlow: a gradient tape in a tf.distribute replica context (one replica or many).

    def _tensorflow_train_step(self, data):
        import tensorflow as tf

        images = _images_of(data)
        self.check_images(images)
        replica = tf.distribute.get_replica_context()
        view_1, view_2 = self.replica_views(replica, images)
        with tf.GradientTape() as tape:
            features_1 = self.encoder(view_1, training=True)
            features_2 = self.encoder(view_2, training=True)
            projections_1 = self.projection_head(features_1, training=True)
            projections_2 = self.projection_head(features_2, training=True)
            contrastive_share, gathered_1 = replica_nnclr_loss(
                projections_1, projections_2, self.queue, self.config.temperature
            )
        gradients = tape.gradient(contrastive_share, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        self.push_to_queue(tf.stop_gradient(gathered_1))
        self.update_step_metrics(replica, contrastive_share, features_1, features_2)
        return {metric.name: metric.result() for metric in self.metrics}

    def replica_views(self, replica, images):
        """This replica's slice of two random views of the global batch (see the class notes).

        TensorFlow backend only: ``replica`` is the ``tf.distribute`` replica context.
        """
        import tensorflow as tf

        if replica.num_replicas_in_sync == 1:
            return self.augmenter(images, training=True), self.augmenter(images, training=True)
        local = tf.shape(images)[0]
        offset = _replica_offset(replica, local)
        # tf.identity places the batch on this replica's device: the batch comes from outside the
        # replica function without a device, and with one replica per worker
        # (MultiWorkerMirroredStrategy) all_gather takes its destination from the tensor's
        # device ("destinations can not be empty" otherwise).
        gathered = replica.all_gather(tf.identity(images), axis=0)
        return tuple(self.augmenter(gathered, training=True)[offset : offset + local] for _ in range(2))

    def update_step_metrics(self, replica, contrastive_share, features_1, features_2):
        """Update the metrics with global-batch values (the same on every replica).

        TensorFlow backend only: ``replica`` is the ``tf.distribute`` replica context.
        """
        import tensorflow as tf

        contrastive_loss = replica.all_reduce("sum", tf.stop_gradient(contrastive_share))
        features_1, features_2 = replica.all_gather([tf.stop_gradient(features_1), tf.stop_gradient(features_2)], axis=0)
        self.loss_tracker.update_state(contrastive_loss)
        self.contrastive_loss_tracker.update_state(contrastive_loss)
        self.update_contrastive_accuracy(features_1, features_2)
        self.update_correlation_accuracy(features_1, features_2)

    def _tensorflow_test_step(self, data):
        import tensorflow as tf

        images = _images_of(data)
        self.check_images(images)
        replica = tf.distribute.get_replica_context()
        view_1, view_2 = self.replica_views(replica, images)
        features_1 = self.encoder(view_1, training=False)
        features_2 = self.encoder(view_2, training=False)
        contrastive_share, _ = replica_nnclr_loss(
            self.projection_head(features_1), self.projection_head(features_2), self.queue, self.config.temperature
        )
        self.update_step_metrics(replica, contrastive_share, features_1, features_2)
        return {metric.name: metric.result() for metric in self.metrics}

    # JAX: pure functions of the state, differentiated with jax.value_and_grad.

    def _one_device_loss(self, trainable_variables, non_trainable_variables, images, training):
        """The NNCLR loss of one device as a pure function of the model's variables.

        The forward pass of :meth:`_tensorflow_train_step` with one replica (two random views,
        encoder, projection head, :func:`nnclr_loss`, and in training the first view's
        projections pushed into the queue), run in a ``keras.StatelessScope`` as
        ``Layer.stateless_call`` runs ``call``: the variables read the values given, and their
        updates are returned instead of assigned.

        Returns
        -------
        loss : scalar tensor
        (features_1, features_2, non_trainable_variables)
            The representations of the two views, and the non-trainable variables after the
            pass (queue, batch-normalisation statistics, random-generator states).
        """
        mapping = list(zip(self.trainable_variables, trainable_variables))
        mapping += list(zip(self.non_trainable_variables, non_trainable_variables))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            view_1 = self.augmenter(images, training=True)
            view_2 = self.augmenter(images, training=True)
            features_1 = self.encoder(view_1, training=training)
            features_2 = self.encoder(view_2, training=training)
            projections_1 = self.projection_head(features_1, training=training)
            projections_2 = self.projection_head(features_2, training=training)
            loss = nnclr_loss(projections_1, projections_2, self.queue, self.config.temperature)
            if training:
                self.push_to_queue(ops.stop_gradient(l2_normalise(projections_1)))
        updated = [scope.get_current_value(variable) for variable in self.non_trainable_variables]
        return loss, (ops.stop_gradient(features_1), ops.stop_gradient(features_2), updated)

    def _stateless_metrics(self, metrics_variables, loss, features_1, features_2):
        """The metrics' new variables and results after this step (see :meth:`update_step_metrics`)."""
        inputs = ((loss,), (loss,), contrastive_accuracy_inputs(features_1, features_2),
                  correlation_accuracy_inputs(features_1, features_2))
        logs, updated, position = {}, [], 0
        for metric, metric_inputs in zip(self.metrics, inputs):
            count = len(metric.variables)
            values = metric.stateless_update_state(metrics_variables[position : position + count], *metric_inputs)
            logs[metric.name] = metric.stateless_result(values)
            updated.extend(values)
            position += count
        return logs, updated

    def _jax_train_step(self, state, data):
        import jax

        trainable_variables, non_trainable_variables, optimizer_variables, metrics_variables = state
        images = _images_of(data)
        self.check_images(images)
        gradient_function = jax.value_and_grad(self._one_device_loss, has_aux=True)
        (loss, (features_1, features_2, non_trainable_variables)), gradients = gradient_function(
            trainable_variables, non_trainable_variables, images, True
        )
        trainable_variables, optimizer_variables = self.optimizer.stateless_apply(
            optimizer_variables, gradients, trainable_variables
        )
        logs, metrics_variables = self._stateless_metrics(metrics_variables, loss, features_1, features_2)
        return logs, (trainable_variables, non_trainable_variables, optimizer_variables, metrics_variables)

    def _jax_test_step(self, state, data):
        trainable_variables, non_trainable_variables, metrics_variables = state
        images = _images_of(data)
        self.check_images(images)
        loss, (features_1, features_2, non_trainable_variables) = self._one_device_loss(
            trainable_variables, non_trainable_variables, images, False
        )
        logs, metrics_variables = self._stateless_metrics(metrics_variables, loss, features_1, features_2)
        return logs, (trainable_variables, non_trainable_variables, metrics_variables)


def _unsupported_training(backend):
    return (f"NNCLR training supports the Keras backends {', '.join(TRAINING_BACKENDS)}, not {backend}; "
            "set KERAS_BACKEND to one of them")


def contrastive_accuracy_inputs(features_1, features_2):
    """``(targets, scores)`` of the contrastive accuracy: top-1 retrieval of the other view among the batch.

    Row i of the cosine similarities of the first views with the second ones scores the
    batch for galaxy i (target i), and so does row i of their transpose (the other way).
    """
    features_1, features_2 = ops.cast(features_1, output_dtype()), ops.cast(features_2, output_dtype())
    similarities = ops.matmul(l2_normalise(features_1), ops.transpose(l2_normalise(features_2)))
    targets = ops.arange(ops.shape(features_1)[0])
    return ops.concatenate([targets, targets], axis=0), ops.concatenate([similarities, ops.transpose(similarities)], axis=0)


def correlation_accuracy_inputs(features_1, features_2):
    """``(targets, scores)`` of the correlation accuracy: each feature dimension should be the
    one most correlated with itself across the two views (rows of the cross-correlation both ways)."""
    features_1, features_2 = ops.cast(features_1, output_dtype()), ops.cast(features_2, output_dtype())
    features_1 = (features_1 - ops.mean(features_1, axis=0)) / (ops.std(features_1, axis=0) + 1e-6)
    features_2 = (features_2 - ops.mean(features_2, axis=0)) / (ops.std(features_2, axis=0) + 1e-6)
    batch = ops.cast(ops.shape(features_1)[0], features_1.dtype)
    cross_correlation = ops.matmul(ops.transpose(features_1), features_2) / batch
    targets = ops.arange(ops.shape(features_1)[1])
    return (ops.concatenate([targets, targets], axis=0),
            ops.concatenate([cross_correlation, ops.transpose(cross_correlation)], axis=0))


def _images_of(data):
    if isinstance(data, dict):
        return data["image"]
    if isinstance(data, (tuple, list)):
        return data[0]
    return data


# ----------------------------------------------------------------------------------------
# Saving and loading


def architecture_signature(model):
    """(layer class, weight shapes) of every layer with weights, in order, plus the input shape."""
    signature = [("input", tuple(model.input_shape[1:]))]
    for layer in model.layers:
        if layer.weights:
            signature.append((type(layer).__name__, tuple(tuple(weight.shape) for weight in layer.weights)))
    return signature


def check_encoder(encoder, config, source="encoder"):
    """Raise ValueError when ``encoder`` does not have the architecture ``config`` describes.

    The message names the first difference (input shape, a layer, or the number of layers).
    """
    expected = architecture_signature(build_encoder(config))
    found = architecture_signature(encoder)
    for position, (want, got) in enumerate(zip(expected, found)):
        if want != got:
            what = "input shape" if position == 0 else f"weighted layer {position}"
            raise ValueError(
                f"{source} has a different architecture from the NNCLR config: {what} should be "
                f"{want[0]} {want[1]} but is {got[0]} {got[1]}"
            )
    if len(expected) != len(found):
        raise ValueError(
            f"{source} has a different architecture from the NNCLR config: it has {len(found) - 1} "
            f"weighted layers, the config gives {len(expected) - 1}"
        )


def _read_keras_model(path, what):
    """Load the ``.keras`` file of an encoder or classifier (``what``), with errors that name it."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} {'is a folder' if path.is_dir() else 'does not exist'}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"cannot read {what} file {path} as a Keras model (a .keras file is a zip archive; this is not)")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for unreadable files
        raise ValueError(f"cannot read {what} file {path} as a Keras model ({type(error).__name__}: {error})") from None


def save_encoder(encoder, path):
    """Save the encoder to a ``.keras`` file, atomically."""
    common.save_keras_model(encoder, path)


def load_encoder(path, config):
    """Load an encoder saved by :func:`save_encoder` and check it matches ``config``.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If the file is not a Keras model, or its architecture differs from ``config``'s
        (the message names the first difference).
    """
    path = pathlib.Path(path)
    encoder = _read_keras_model(path, "encoder")
    check_encoder(encoder, config, source=f"encoder file {path}")
    return encoder


# ----------------------------------------------------------------------------------------
# The classifier


def build_classifier(encoder, config, fine_tune=False, seed=None, name="tidal_classifier"):
    """Classifier: NNCLR views -> encoder -> Dense(1, sigmoid), the probability of tidal features.

    Parameters
    ----------
    encoder : keras.Model
        The (trained) encoder. It is shared, not copied: its ``trainable`` flag is set to
        ``fine_tune``, which freezes it by structure for the linear probe.
    config : NNCLRConfig
    fine_tune : bool
        Also train the encoder (False: linear probe, only the Dense layer learns).
    seed : int or None
        Seeds the training augmentation.

    Returns
    -------
    keras.Model
        (batch, H, W, bands) stretched cutouts -> (batch, 1). In training the input is
        augmented as for NNCLR; at inference the deterministic centre view is used.
    """
    check_encoder(encoder, config)
    encoder.trainable = bool(fine_tune)
    inputs = keras.Input(config.input_shape, name="image")
    views = build_augmenter(config, seed)(inputs)
    representations = encoder(views)
    # float32 output under mixed precision too (the binary cross-entropy of a bfloat16 sigmoid saturates).
    outputs = layers.Dense(1, activation="sigmoid", dtype=output_dtype(), name="tidal_probability")(representations)
    return keras.Model(inputs, outputs, name=name)


def original_view_scores(classifier, config, images, seed=0, batch_size=24):
    """Classifier scores with the original code's test-time view: its augmenter ran at test time
    too, so each batch got the training noise and one random crop (its flips act only in training).

    Parameters
    ----------
    classifier : keras.Model
        Built by :func:`build_classifier` (its ``nnclr_encoder`` and ``tidal_probability`` layers are used).
    config : NNCLRConfig
    images : ndarray, shape (N, H, W, bands)
        Stretched cutouts.
    seed : int
        Seeds the noise and the crops, so the scores are reproducible.

    Returns
    -------
    ndarray of float, shape (N,)
    """
    noise = augmentations.StretchedGaussianNoise(config.noise_range, config.noise_scale, seed=seed)
    crop = augmentations.JitteredCrop(config.crop_size, config.jitter, seed=seed + 1)
    # The classifier's layers: the input, the augmenter (a Sequential), the encoder, the Dense layer.
    encoder = next(layer for layer in classifier.layers
                   if isinstance(layer, keras.Model) and not isinstance(layer, keras.Sequential))
    dense = classifier.get_layer("tidal_probability")
    scores = []
    for start in range(0, len(images), batch_size):
        views = crop(noise(images[start : start + batch_size], training=True), training=True)
        scores.append(keras.ops.convert_to_numpy(dense(encoder(views, training=False)))[:, 0])
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


def load_classifier(path, config):
    """Load a classifier saved with :func:`common.save_keras_model` and check its input and output shapes.

    Raises
    ------
    FileNotFoundError, ValueError
        Missing file, unreadable file, or shapes that do not match ``config``.
    """
    path = pathlib.Path(path)
    classifier = _read_keras_model(path, "classifier")
    if tuple(classifier.input_shape[1:]) != config.input_shape:
        raise ValueError(
            f"classifier file {path} takes images of shape {tuple(classifier.input_shape[1:])}, "
            f"the NNCLR config gives {config.input_shape}"
        )
    if tuple(classifier.output_shape[1:]) != (1,):
        raise ValueError(f"classifier file {path} outputs shape {classifier.output_shape[1:]}, expected (1,)")
    return classifier


def representations(encoder, images, config, batch_size=64):
    """Representations of stretched images through the deterministic test-time view.

    Parameters
    ----------
    encoder : keras.Model
    images : ndarray, shape (N, H, W, bands)
        Stretched cutouts.
    config : NNCLRConfig
    batch_size : int

    Returns
    -------
    ndarray of float32, shape (N, representation_dim)
    """
    tidal_data.check_tidal_shape(np.shape(images), config.crop_size, config.n_bands)
    outputs = []
    for start in range(0, len(images), batch_size):
        views = augmentations.nnclr_test_view(images[start : start + batch_size], config.crop_size)
        outputs.append(keras.ops.convert_to_numpy(encoder(views, training=False)))
    return np.concatenate(outputs) if outputs else np.zeros((0, config.representation_dim), np.float32)


# ----------------------------------------------------------------------------------------
# Scoring on a Dask cluster

#: What :func:`score_partition` can compute: classifier scores and encoder representations.
SCORE_OUTPUTS = ("scores", "representations")
#: Galaxies per classifier batch when scoring.
SCORE_BATCH_SIZE = 24


@functools.lru_cache(maxsize=2)
def _worker_run(run_dir):
    # One copy of a run's models per worker process, kept for the worker's later partitions.
    run_dir = pathlib.Path(run_dir)
    config, extra = load_config(run_dir / "config.json")
    band_scale = np.asarray(extra["band_scale"], dtype=np.float32)
    return (config, band_scale, load_encoder(run_dir / "encoder.keras", config),
            load_classifier(run_dir / "classifier.keras", config))


def galaxy_partitions(source, indices, size=parallel.PARTITION_SIZE):
    """The galaxies ``indices`` of a :class:`tidal_data.TidalSource` cut into tasks of ``size``.

    A partition of an HDF5 source is a small catalogue (``tidal_data.catalogue_subset``): the
    worker reads the pixels itself from the shared files. Other sources (TFDS, held in memory)
    send the partition's counts images with the task.
    """
    parts = parallel.partitions(np.asarray(indices, dtype=np.int64), size)
    if source.catalogue is not None:
        # Absolute paths: a worker of a remote cluster does not share this process's folder.
        catalogue = dataclasses.replace(source.catalogue,
                                        paths=tuple(str(pathlib.Path(path).resolve()) for path in source.catalogue.paths))
        return [tidal_data.catalogue_subset(catalogue, part) for part in parts]
    return [source.read_labelled(np.asarray(part)) for part in parts]


def score_partition(part, run_dir, outputs=SCORE_OUTPUTS, batch_size=SCORE_BATCH_SIZE):
    """The Dask task of :func:`score_on_cluster`: score one partition of galaxies on a worker.

    Parameters
    ----------
    part : tidal_data.TidalCatalogue or ndarray
        A partition of :func:`galaxy_partitions`: the galaxies' catalogue, or their counts images.
    run_dir : str
        The ``nnclr_train.py`` run whose encoder, classifier and band scale are used (loaded
        once per worker process).
    outputs : sequence of str
        Among :data:`SCORE_OUTPUTS`.
    batch_size : int
        Galaxies per classifier batch.

    Returns
    -------
    dict of str -> ndarray
        ``scores`` (n,) classifier outputs and ``representations`` (n, representation_dim),
        as asked, in the partition's order; the same as the single-process computation.
    """
    parallel.quiet_worker()
    config, band_scale, encoder, classifier = _worker_run(str(run_dir))
    if isinstance(part, tidal_data.TidalCatalogue):
        part = tidal_data.read_tidal_images(part, np.arange(len(part)))
    images = tidal_data.tidal_stretch(part, band_scale)
    result = {}
    if "scores" in outputs:
        result["scores"] = classifier.predict(images, batch_size=batch_size, verbose=0)[:, 0]
    if "representations" in outputs:
        result["representations"] = representations(encoder, images, config)
    return result


def score_on_cluster(client, source, indices, run_dir, outputs=SCORE_OUTPUTS, partition_size=parallel.PARTITION_SIZE,
                     batch_size=SCORE_BATCH_SIZE, progress=True):
    """Scores and representations of the galaxies ``indices`` of ``source``, computed on a Dask cluster.

    One task per partition of ``partition_size`` galaxies (:func:`score_partition`); the
    results are gathered in the order of ``indices``.

    Parameters
    ----------
    client : dask.distributed.Client
    source : tidal_data.TidalSource
    indices : array of int
        Galaxies of ``source`` (positions in ``source.ids``).
    run_dir : path
        The run folder (on a file system every worker sees).
    outputs : sequence of str
        Among :data:`SCORE_OUTPUTS`.
    partition_size, batch_size : int
    progress : bool
        Show a progress bar.

    Returns
    -------
    dict of str -> ndarray
        ``scores`` (N,) float32 and/or ``representations`` (N, representation_dim) float32.
    """
    unknown = set(outputs) - set(SCORE_OUTPUTS)
    if unknown or not outputs:
        raise ValueError(f"outputs must be among {SCORE_OUTPUTS}, got {sorted(outputs)}")
    if len(indices) == 0:
        raise ValueError("no galaxies to score")
    parts = galaxy_partitions(source, indices, partition_size)
    bar = common.progress(total=len(indices), desc="scoring", unit="galaxy", disable=not progress)
    try:
        results = list(parallel.map_in_order(client, score_partition, parts, str(pathlib.Path(run_dir).resolve()),
                                             tuple(outputs), batch_size,
                                             progress=lambda position: bar.update(len(parts[position]))))
    finally:
        bar.close()
    return {name: np.concatenate([result[name] for result in results]) for name in outputs}


def save_config(config, path, **extra):
    """Write the config (and extra JSON-able entries such as the band scale) as JSON, atomically."""
    common.write_json(path, {"nnclr": config.to_dict(), **extra})


def load_config(path):
    """Read a file written by :func:`save_config`: returns ``(config, extra)``.

    Its ``band_scale`` entry (every run has one) must hold one finite positive scale per band.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: missing; the run folder must be an nnclr_train.py --out-dir")
    try:
        values = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not an NNCLR run configuration (not JSON: {error})") from None
    if not isinstance(values, dict) or "nnclr" not in values:
        raise ValueError(f"{path}: not an NNCLR run configuration (no 'nnclr' entry)")
    try:
        config = NNCLRConfig.from_dict(values.pop("nnclr"))
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise ValueError(f"{path}: not an NNCLR run configuration ({error})") from None
    if "band_scale" not in values:
        raise ValueError(f"{path}: not an NNCLR run configuration (no 'band_scale' entry)")
    try:
        scale = np.asarray(values["band_scale"], dtype=np.float64)
    except (TypeError, ValueError):
        scale = None
    if scale is None or scale.shape != (config.n_bands,) or not (np.isfinite(scale) & (scale > 0)).all():
        raise ValueError(f"{path}: band_scale must be {config.n_bands} finite positive numbers, one per band, "
                         f"got {values['band_scale']!r}")
    return config, values


# ----------------------------------------------------------------------------------------
# The data the NNCLR commands read

#: TFDS builders of the unlabelled and labelled tidal sets (a config as "name/config").
TFDS_UNLABELLED = "tidal_unlabelled"
TFDS_LABELLED = "tidal_labelled"


def add_source_arguments(parser):
    """The command-line options that name the tidal data: ``INPUT...`` or ``--tfds-dir DIR``."""
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="tidal HDF5 files or folders of them")
    group = parser.add_argument_group("TFDS data (instead of INPUT files)")
    group.add_argument("--tfds-dir", metavar="DIR", help="TFDS data_dir holding the tidal builders")
    group.add_argument("--tfds-unlabelled", default=TFDS_UNLABELLED, help="unlabelled builder (default %(default)s)")
    group.add_argument("--tfds-labelled", default=TFDS_LABELLED, help="labelled builder (default %(default)s)")
    parser.add_argument("--labelled", nargs="+", metavar="PATH",
                        help="tidal HDF5 files whose galaxies alone form the classifier's labelled sets (for example "
                        "host-matched pairs of visible features, python -m data.generate tidal_pairs); they also join "
                        "the unlabelled stream")
    return parser


def open_tidal_source(inputs=(), tfds_dir=None, unlabelled=TFDS_UNLABELLED, labelled=TFDS_LABELLED, labelled_files=()):
    """The :class:`tidal_data.TidalSource` of tidal HDF5 ``inputs`` or of the TFDS builders in ``tfds_dir``.

    With ``labelled_files``, the labelled pool (and the classifier sets drawn from it) is every
    galaxy of those tidal HDF5 files, and the unlabelled stream is that of ``inputs`` (or the
    TFDS builder) followed by them, as the original joined its tidal set to the unlabelled one.

    Raises
    ------
    ValueError
        Unless exactly one of ``inputs`` and ``tfds_dir`` is given.
    """
    if bool(inputs) == bool(tfds_dir):
        raise ValueError("give the tidal data either as INPUT files or folders, or as --tfds-dir, not both or neither")
    if inputs:
        source = tidal_data.tidal_source_from_hdf5(inputs)
    else:
        # Imported here: the TFDS builders are heavy and only this branch needs them.
        import data.tidal_datasets

        source = data.tidal_datasets.tidal_source_from_tfds(unlabelled, labelled, tfds_dir)
    if not labelled_files:
        return source
    pool = tidal_data.tidal_source_from_hdf5(labelled_files)
    if tuple(pool.image_shape) != tuple(source.image_shape):
        raise ValueError(f"--labelled {pool.description}: images are {tuple(pool.image_shape)}, "
                         f"the unlabelled data's are {tuple(source.image_shape)}")
    return dataclasses.replace(
        pool,
        description=f"{source.description} (unlabelled) + {pool.description} (labelled)",
        unlabelled=lambda: source.unlabelled().concatenate(pool.unlabelled()),
    )


# ----------------------------------------------------------------------------------------
# Evaluation

#: Contamination at which completeness is quoted (Desmons et al. 2023).
CONTAMINATION = 0.22


def completeness_at_contamination(labels, scores, contamination=CONTAMINATION):
    """Highest completeness (TPR) reachable with contamination at most ``contamination``.

    Parameters
    ----------
    labels : array of int, shape (N,)
        1 for galaxies with tidal features.
    scores : array of float, shape (N,)
        Classifier outputs; a galaxy is called tidal when its score is >= the threshold.
    contamination : float
        In [0, 1].

    Returns
    -------
    dict
        ``fpr``: completeness with contamination = false-positive rate FP / (FP + TN);
        ``one_minus_precision``: completeness with contamination = FP / (TP + FP), which
        depends on the fraction of tidal galaxies in the test set (balanced here).
    """
    from sklearn.metrics import precision_recall_curve, roc_curve

    if not 0 <= contamination <= 1:
        raise ValueError(f"contamination must be in [0, 1], got {contamination}")
    labels = np.asarray(labels)
    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    allowed = (1 - precision) <= contamination + 1e-12
    return {
        "fpr": float(tpr[fpr <= contamination + 1e-12].max()),
        "one_minus_precision": float(recall[allowed].max()) if allowed.any() else 0.0,
    }


def evaluate_scores(labels, scores, contamination=CONTAMINATION):
    """AUC, ROC arrays (``fpr``, ``tpr``, ``thresholds``) and completeness at the contamination."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, thresholds = roc_curve(labels, scores)
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "completeness": completeness_at_contamination(labels, scores, contamination),
        "fpr": fpr,
        "tpr": tpr,
        "thresholds": thresholds,
    }


def similarity_search(encoder, config, images, ids, labels, query_id, top_k, features=None):
    """Galaxies ranked by cosine similarity of their representations to the query galaxy.

    ``features``, when given, are the representations of ``images`` already computed (on a
    Dask cluster, :func:`score_on_cluster`); ``images`` and ``encoder`` are then not used.

    Returns
    -------
    dict
        ``query``, ``top`` (list of {id, similarity, has_tidal, index} for the top k, query
        excluded), ``tidal_fraction_top_k`` and ``query_index``.
    """
    import similarity

    matches = np.flatnonzero(ids == query_id)
    if matches.size == 0:
        raise ValueError(f"--similar-to: no galaxy with id {query_id!r} in the data")
    query = matches[0]
    if features is None:
        features = representations(encoder, images, config)
    # Exact search for catalogues up to 100,000 galaxies, an approximate index above (similarity.py).
    positions, similarities = similarity.build_index(features).query(features[query], k=min(top_k + 1, len(features)))
    ranked = [(int(i), float(s)) for i, s in zip(positions, similarities) if i != query][:top_k]
    return {
        "query": {"id": str(ids[query]), "has_tidal": int(labels[query])},
        "top": [
            {"id": str(ids[i]), "similarity": value, "has_tidal": int(labels[i]), "index": i} for i, value in ranked
        ],
        "tidal_fraction_top_k": float(np.mean([labels[i] for i, _ in ranked])) if ranked else float("nan"),
        "query_index": int(query),
    }
