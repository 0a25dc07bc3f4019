"""Train the NNCLR tidal-feature encoder, then the classifier on top (Desmons et al. 2023).

Two modes, the original ``Train_NNCLR`` switch:

* default: train the self-supervised encoder on the unlabelled stream, then the classifier;
* ``--load-encoder PATH``: load a trained encoder and train only the classifier.

Data come from tidal HDF5 files (``INPUT...``, the tidal stacked layout of ``tidal_data``) or
from the TFDS builders ``tidal_unlabelled`` / ``tidal_labelled`` (``--tfds-dir``). On the
TensorFlow backend (the default) they stream through tf.data; on another Keras backend
(``KERAS_BACKEND=jax``) through ``loaders``, which never import TensorFlow, so ``--tfds-dir``
and the ``mirrored`` and ``multiworker`` strategies, which are TensorFlow's, are refused there.

Outputs in ``--out-dir``: ``encoder.keras``, ``classifier.keras``, ``classifier_loss.png``,
``train_loss.npy`` and ``val_loss.npy`` (classifier binary cross-entropy per epoch),
``nnclr_history.json`` (encoder loss and accuracies per epoch), ``splits.json`` (ids of the
classifier sets) and ``config.json`` (the NNCLR config, the band scale and the training
settings that ``nnclr_test.py`` needs). A run stopped part-way resumes from its last finished
epoch when started again with the same ``--out-dir``.

``--strategy mirrored`` trains on every local GPU (``multiworker``: on several machines, see
the README): the models are built and compiled inside the ``tf.distribute`` strategy's scope,
``--batch-size`` is the global batch, the NNCLR loss and the support queue are those of the
global batch, and the batch normalisation uses the global batch's statistics
(``nnclr_model.synchronise_batch_norm``), so a step matches the one-device step. With
``multiworker`` only the chief writes ``--out-dir``; each other worker writes its own
``tmp-worker-<index>`` folder inside it, removed when the run ends.

Example::

    python nnclr_train.py mocks/tidal.h5 --out-dir runs/nnclr
    python nnclr_train.py mocks/tidal.h5 --labelled mocks/visible_pairs.h5 --out-dir runs/nnclr
    python nnclr_train.py mocks/tidal.h5 --out-dir runs/probe --load-encoder runs/nnclr/encoder.keras
    python nnclr_train.py mocks/tidal.h5 --out-dir runs/nnclr --strategy mirrored
    python nnclr_train.py mocks/tidal.h5 --out-dir runs/smoke --tiny    # minutes on a CPU
"""

import common

if __name__ in common.MAIN_NAMES:
    common.quiet_start()  # before TensorFlow loads: no start-up noise unless --verbose

import argparse
import contextlib
import dataclasses
import logging
import pathlib
import shutil

import keras
import numpy as np

import loaders
import locks
import nnclr_model
import plots
import tidal_data

logger = logging.getLogger("nnclr_train")


@dataclasses.dataclass(frozen=True)
class NNCLRTrainConfig:
    """Optimisation settings of one NNCLR run, encoder then classifier (defaults: Desmons et al. 2023)."""

    batch_size: int = 220  # unlabelled images per NNCLR step (the global batch under a strategy)
    epochs: int = 25  # NNCLR epochs
    steps_per_epoch: int = None  # NNCLR steps per epoch (None: one pass over the data)
    shuffle_buffer: int = 5000  # shuffle buffer of the unlabelled stream
    learning_rate: float = 1e-3  # Adam step of the encoder (Keras default, as the original)
    classifier_batch_size: int = 24  # labelled images per classifier step
    classifier_epochs: int = 50  # classifier epochs
    classifier_learning_rate: float = 1e-3  # Adam step of the classifier
    fine_tune: bool = True  # train the encoder with the classifier, as the original (False: linear probe)
    split_sizes: tuple = tidal_data.TIDAL_SPLIT_SIZES  # classifier galaxies per class: train, validation, test (HDF5 data)
    seed: int = 0  # seeds the splits, the shuffling, the augmentations and the initial weights
    strategy: str = "default"  # tf.distribute strategy: default (one device), mirrored or multiworker
    keep_epoch_encoders: bool = False  # also save the encoder after every NNCLR epoch (encoder_epochs/epoch-NNN.keras)

    def __post_init__(self):
        object.__setattr__(self, "split_sizes", tuple(int(size) for size in self.split_sizes))
        for name in ("batch_size", "epochs", "shuffle_buffer", "classifier_batch_size", "classifier_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1 or None, got {self.steps_per_epoch}")
        if self.strategy not in common.STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(common.STRATEGIES)}, got {self.strategy!r}")


#: A tiny run for tests: a few small batches, two epochs of each stage, 8/2/4 galaxies per class.
TINY_TRAIN_CONFIG = NNCLRTrainConfig(
    batch_size=16, epochs=2, shuffle_buffer=16, classifier_batch_size=8, classifier_epochs=2, split_sizes=(8, 2, 4)
)


def add_config_arguments(parser, group_title, config, tiny, skip=()):
    """One option per field of the config dataclass ``config`` (``queue_size`` -> ``--queue-size``).

    The options default to nothing, so that :func:`config_changes` finds only what the command
    line sets; the help gives the default of ``config`` and of ``tiny`` (``--tiny``).
    """
    group = parser.add_argument_group(group_title)
    for field in dataclasses.fields(config):
        if field.name in skip:
            continue
        default, tiny_default = getattr(config, field.name), getattr(tiny, field.name)
        options = {"dest": field.name, "default": argparse.SUPPRESS,
                   "help": f"default {default}" + (f", --tiny {tiny_default}" if tiny_default != default else "")}
        if field.type is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            options.update(type=type(default[0]), nargs=len(default))
        else:
            options["type"] = field.type
        if field.name == "strategy":
            options["choices"] = common.STRATEGIES
        group.add_argument("--" + field.name.replace("_", "-"), **options)
    return group


def config_changes(args, config_class):
    """The fields of ``config_class`` that the command line set, as a dict."""
    return {field.name: getattr(args, field.name) for field in dataclasses.fields(config_class) if hasattr(args, field.name)}


def model_config_from_arguments(args, image_shape):
    """NNCLRConfig from ``--tiny`` and the per-field options, sized to the data's images."""
    base = nnclr_model.TINY_CONFIG if args.tiny else nnclr_model.NNCLRConfig()
    changes = config_changes(args, nnclr_model.NNCLRConfig)
    minimum = changes.get("crop_size", base.crop_size) + changes.get("jitter", base.jitter)
    tidal_data.check_tidal_shape(image_shape, minimum, changes.get("n_bands", base.n_bands))
    height, width = image_shape[:2]
    if height != width:
        raise ValueError(f"images must be square, got {height}x{width} px")
    return dataclasses.replace(base, **changes, image_size=height)


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train the NNCLR tidal-feature encoder and its classifier (Desmons et al. 2023).",
    )
    nnclr_model.add_source_arguments(parser)
    parser.add_argument("--out-dir", required=True, metavar="DIR", help="run folder (created); rerun to resume")
    parser.add_argument("--load-encoder", metavar="PATH", help="train only the classifier on this trained encoder")
    parser.add_argument("--tiny", action="store_true",
                        help="start from the tiny architecture and training (24 px images, for tests and smoke runs)")
    add_config_arguments(parser, "NNCLR architecture (nnclr_model.NNCLRConfig)", nnclr_model.NNCLRConfig(),
                         nnclr_model.TINY_CONFIG, skip=("image_size",))  # image_size is set from the data
    training = add_config_arguments(parser, "training (NNCLRTrainConfig)", NNCLRTrainConfig(), TINY_TRAIN_CONFIG)
    training.add_argument("--linear-probe", dest="fine_tune", action="store_false", default=argparse.SUPPRESS,
                          help="keep the encoder frozen and train only the classifier's Dense layer (same as --no-fine-tune)")
    common.add_precision_argument(parser)
    common.add_verbose_argument(parser)
    return parser


def plot_classifier_loss(history, path):
    """Training and validation binary cross-entropy per epoch, as the original's plot."""
    figure, axes = plots.new_figure(figsize=(5, 3.5))
    epochs = np.arange(1, len(history["loss"]) + 1)
    axes.plot(epochs, history["loss"], label="train")
    axes.plot(epochs, history["val_loss"], label="validation")
    axes.set(xlabel="epoch", ylabel="binary cross-entropy", title="Classifier loss")
    axes.legend(loc="upper right")
    plots.save_figure(figure, path)


@contextlib.contextmanager
def global_batch_norm(model, strategy):
    """Within the block, ``model``'s batch normalisation uses the global batch's statistics.

    Only with more than one replica; the saved files keep the plain layers, so they load and
    behave the same whatever strategy trained them.
    """
    if strategy.num_replicas_in_sync < 2:
        yield
        return
    nnclr_model.synchronise_batch_norm(model, True)
    try:
        yield
    finally:
        nnclr_model.synchronise_batch_norm(model, False)


def check_backend_options(args, train_config):
    """Refuse, on a Keras backend other than TensorFlow, the data and strategies only TensorFlow serves."""
    if keras.backend.backend() == "tensorflow":
        return
    if args.tfds_dir:
        common.require_tensorflow("--tfds-dir (the TFDS tidal builders)")
    if train_config.strategy != "default":
        common.require_tensorflow(f"--strategy {train_config.strategy}")


def first_unlabelled(source, count):
    """The first ``count`` images (counts) of the unlabelled stream of ``source``, unshuffled."""
    stream = source.unlabelled()
    if isinstance(stream, tidal_data.TidalStream):
        return stream.head(count)
    return np.stack(list(stream.take(count).as_numpy_iterator()))


def unlabelled_batches(source, config, train_config, band_scale):
    """The stream NNCLR trains on: stretched, shuffled, full batches of the unlabelled images.

    ``tidal_data.tidal_unlabelled_dataset`` (tf.data, each worker's share of the global batch)
    on the TensorFlow backend, a :class:`loaders.TidalUnlabelledLoader` with the same batches
    on the others; endless when ``steps_per_epoch`` sets the epochs.
    """
    repeat = bool(train_config.steps_per_epoch)
    if keras.backend.backend() != "tensorflow":
        stream = loaders.TidalUnlabelledLoader(
            source.unlabelled(), band_scale, train_config.batch_size, train_config.shuffle_buffer,
            seed=train_config.seed, min_size=config.min_image_size, repeat=repeat,
        )
        if len(stream) == 0:
            raise ValueError(f"the unlabelled stream gave no batch of {train_config.batch_size} images; lower --batch-size")
        return stream
    stream = tidal_data.tidal_unlabelled_dataset(
        source.unlabelled(), band_scale, train_config.batch_size, train_config.shuffle_buffer, seed=train_config.seed,
        min_size=config.min_image_size,
    )
    stream = common.split_batches_across_workers(stream)
    return stream.repeat() if repeat else stream


def labelled_batches(source, indices, config, train_config, band_scale, shuffle):
    """A classifier set of ``source`` as ``(stretched image, label)`` batches.

    ``tidal_data.tidal_labelled_dataset`` (tf.data) on the TensorFlow backend, a
    :class:`loaders.TidalLabelledLoader` with the same batches on the others.
    """
    arguments = (source.read_labelled(indices), source.labels[indices], band_scale, train_config.classifier_batch_size)
    options = {"shuffle": shuffle, "seed": train_config.seed, "min_size": config.min_image_size}
    if keras.backend.backend() != "tensorflow":
        return loaders.TidalLabelledLoader(*arguments, **options)
    return common.split_batches_across_workers(tidal_data.tidal_labelled_dataset(*arguments, **options))


def train_encoder(source, config, train_config, band_scale, folders, strategy=None):
    """Train NNCLR on the unlabelled stream; returns the trained encoder (saved as ``encoder.keras``).

    Parameters
    ----------
    source : tidal_data.TidalSource
    config : nnclr_model.NNCLRConfig
    train_config : NNCLRTrainConfig
        Its ``batch_size`` is the global batch, split across the replicas of ``strategy``.
    band_scale : array of float, shape (bands,)
        Per-band scale of the stretch (``tidal_data.tidal_band_scale``).
    folders : common.WorkerFolders
        Where this process writes (:func:`common.worker_folders`): its own folder receives
        ``nnclr_history.json``, ``encoder.keras`` and, while training, ``backup_nnclr/`` (from
        which a stopped run resumes; every worker resumes from the chief's).
    strategy : tf.distribute.Strategy, optional
        The model is built and compiled inside its scope (default: one device).
    """
    strategy = strategy or common.make_strategy()
    stream = unlabelled_batches(source, config, train_config, band_scale)
    with strategy.scope():
        model = nnclr_model.NNCLR(config, seed=train_config.seed)
        model.compile(optimizer=keras.optimizers.Adam(train_config.learning_rate))
    callbacks = [common.backup_and_restore(folders, "backup_nnclr"), common.epoch_progress("NNCLR")]
    if train_config.keep_epoch_encoders:
        (folders.own / "encoder_epochs").mkdir(exist_ok=True)
        # The encoder at every budget: what the label-efficiency curve against training budget reads.
        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: nnclr_model.save_encoder(
            model.encoder, folders.own / "encoder_epochs" / f"epoch-{epoch + 1:03d}.keras")))
    with global_batch_norm(model.encoder, strategy):
        history = model.fit(
            stream,
            epochs=train_config.epochs,
            steps_per_epoch=train_config.steps_per_epoch,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
    if not history.history:
        raise ValueError(f"the unlabelled stream gave no batch of {train_config.batch_size} images; lower --batch-size")
    common.write_json(folders.own / "nnclr_history.json",
                      {key: [float(v) for v in values] for key, values in history.history.items()})
    nnclr_model.save_encoder(model.encoder, folders.own / "encoder.keras")
    return model.encoder


def train_classifier(encoder, source, splits, config, train_config, band_scale, folders, strategy=None):
    """Train the classifier on the train set, validating on the validation set; saves its outputs.

    ``splits`` holds the indices of the classifier sets in ``source`` (``tidal_data.tidal_source_splits``);
    the other parameters are those of :func:`train_encoder`. The classifier is built and compiled
    inside ``strategy``'s scope, where ``encoder`` must have been built or loaded too. Writes
    ``classifier.keras``, ``train_loss.npy``, ``val_loss.npy`` and ``classifier_loss.png`` to
    ``folders.own``; returns the classifier and its Keras history (a dict of lists).
    """
    strategy = strategy or common.make_strategy()

    def dataset(name, shuffle):
        return labelled_batches(source, splits[name], config, train_config, band_scale, shuffle)

    with strategy.scope():
        classifier = nnclr_model.build_classifier(encoder, config, fine_tune=train_config.fine_tune, seed=train_config.seed)
        classifier.compile(
            optimizer=keras.optimizers.Adam(train_config.classifier_learning_rate),
            loss=keras.losses.BinaryCrossentropy(),
            metrics=[keras.metrics.BinaryAccuracy(name="acc"), keras.metrics.AUC(name="auc")],
        )
    with global_batch_norm(encoder, strategy):
        history = classifier.fit(
            dataset("train", shuffle=True),
            validation_data=dataset("validation", shuffle=False),
            epochs=train_config.classifier_epochs,
            shuffle=False,
            verbose=0,
            callbacks=[common.backup_and_restore(folders, "backup_classifier"), common.epoch_progress("classifier")],
        )
    common.save_keras_model(classifier, folders.own / "classifier.keras")
    for name, key in (("train_loss", "loss"), ("val_loss", "val_loss")):
        common.save_array(folders.own / f"{name}.npy", np.asarray(history.history[key], dtype=np.float32))
    plot_classifier_loss(history.history, folders.own / "classifier_loss.png")
    return classifier, history.history


def load_trained_encoder(path, config, image_shape, strategy):
    """A trained encoder for ``--load-encoder``, with the config and band scale of its run.

    Returns ``(encoder, config, band_scale)``: the config and band scale of the run folder
    holding ``path`` when it has a ``config.json`` (the architecture and the stretch the encoder
    learnt with), else ``config`` and None.
    """
    band_scale = None
    encoder_run = pathlib.Path(path).with_name("config.json")
    if encoder_run.is_file():
        config, extra = nnclr_model.load_config(encoder_run)
        band_scale = np.asarray(extra["band_scale"], dtype=np.float32)
        logger.info("using the config and band scale of %s", encoder_run)
    if tuple(image_shape) != config.input_shape:
        raise ValueError(f"the data's images are {tuple(image_shape)}, the encoder's run used {config.input_shape}")
    with strategy.scope():
        return nnclr_model.load_encoder(path, config), config, band_scale


@common.interruptible(common.INTERRUPTED_TRAINING)
@common.data_errors_are_one_line(tidal_data.UnusableImageError)
def main(argv=None):
    with contextlib.ExitStack() as held:  # the output folder's lock, for the whole run
        return _main(argv, held)


def _main(argv, held):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        train_config = dataclasses.replace(TINY_TRAIN_CONFIG if args.tiny else NNCLRTrainConfig(),
                                           **config_changes(args, NNCLRTrainConfig))
    except ValueError as error:
        parser.error(str(error))
    try:
        check_backend_options(args, train_config)
        common.check_output_dir(args.out_dir)
        held.enter_context(locks.folder_lock(args.out_dir))  # a second run into the same folder is refused
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    # MultiWorkerMirroredStrategy must exist before any other TensorFlow work.
    strategy = common.make_strategy(train_config.strategy)
    logger.info("strategy %s: %d replicas in sync", train_config.strategy, strategy.num_replicas_in_sync)
    # The run folder holds the chief's files, from which every worker resumes; this process
    # writes its own folder (the run folder itself but on the non-chief workers).
    folders = common.worker_folders(args.out_dir, strategy)
    out_dir = folders.own
    common.set_precision(args.precision)
    keras.utils.set_random_seed(train_config.seed)
    try:
        source = nnclr_model.open_tidal_source(args.inputs, args.tfds_dir, args.tfds_unlabelled, args.tfds_labelled,
                                               args.labelled)
        config = model_config_from_arguments(args, source.image_shape)
        band_scale = None
        if args.load_encoder:
            encoder, config, band_scale = load_trained_encoder(args.load_encoder, config, source.image_shape, strategy)
        splits = tidal_data.tidal_source_splits(source, train_config.split_sizes, seed=train_config.seed)
        if band_scale is None:
            band_scale = tidal_data.tidal_band_scale(first_unlabelled(source, tidal_data.TIDAL_SCALE_IMAGES))
        # The augmentation's noise is in units of the band scale of the stretch, as the original's.
        config = dataclasses.replace(config, noise_scale=tuple(float(value) for value in band_scale))
    except (ValueError, OSError) as error:
        parser.exit(2, f"error: {error}\n")
    logger.info("data: %s; %d labelled galaxies; band scale %s", source.description, len(source.labels), band_scale)
    common.write_json(out_dir / "splits.json", {name: [str(i) for i in source.ids[indices]] for name, indices in splits.items()})
    nnclr_model.save_config(
        config, out_dir / "config.json", band_scale=[float(value) for value in band_scale],
        softening=tidal_data.TIDAL_STRETCH_SOFTENING, data=source.description,
        settings={**dataclasses.asdict(train_config), "load_encoder": args.load_encoder, "labelled": args.labelled},
    )

    if not args.load_encoder:
        # Decided from the chief's files, so that every worker takes the same path.
        encoder_path = folders.run / "encoder.keras"
        if encoder_path.is_file() and not (folders.run / "backup_nnclr").exists():
            logger.info("%s exists: the encoder stage of this run finished, loading it", encoder_path)
            with strategy.scope():
                encoder = nnclr_model.load_encoder(encoder_path, config)
        else:
            encoder = train_encoder(source, config, train_config, band_scale, folders, strategy)
    elif not (out_dir / "encoder.keras").exists():
        nnclr_model.save_encoder(encoder, out_dir / "encoder.keras")
    _, history = train_classifier(encoder, source, splits, config, train_config, band_scale, folders, strategy)
    for backup in ("backup_nnclr", "backup_classifier"):
        shutil.rmtree(out_dir / backup, ignore_errors=True)
    common.remove_worker_folder(folders)
    print(
        f"classifier: final train loss {history['loss'][-1]:.4f}, validation loss {history['val_loss'][-1]:.4f}; "
        f"outputs in {folders.run}" + ("" if folders.chief else " (written by the chief)")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
