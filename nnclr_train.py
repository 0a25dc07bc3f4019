"""Train the NNCLR tidal-feature encoder, then the classifier on top (Desmons et al. 2023).

Two modes, the original ``Train_NNCLR`` switch:

* default: train the self-supervised encoder on the unlabelled stream, then the classifier;
* ``--load-encoder PATH``: load a trained encoder and train only the classifier.

Data come from tidal HDF5 files (``--data``, the tidal stacked layout of ``prep_data``) or
from the TFDS builders ``tidal_unlabelled`` / ``tidal_labelled`` (``--tfds-dir``).

Outputs in ``--out``: ``encoder.keras``, ``classifier.keras``, ``classifier_loss.png``,
``train_loss.npy`` and ``val_loss.npy`` (classifier binary cross-entropy per epoch),
``nnclr_history.json`` (encoder loss and accuracies per epoch), ``splits.json`` (ids of the
classifier sets) and ``config.json`` (the NNCLR config, the band scale and the settings that
``nnclr_test.py`` needs). A run stopped part-way resumes from its last finished epoch when
started again with the same ``--out``.

``--strategy mirrored`` trains on every local GPU (``multiworker``: on several machines, see
the README): the models are built and compiled inside the ``tf.distribute`` strategy's scope,
``--batch-size`` is the global batch, the NNCLR loss and the support queue are those of the
global batch, and the batch normalisation uses the global batch's statistics
(``nnclr_model.synchronise_batch_norm``), so a step matches the one-device step.

Example::

    python nnclr_train.py --data mocks/tidal.h5 --out runs/nnclr
    python nnclr_train.py --data mocks/tidal.h5 --out runs/probe --load-encoder runs/nnclr/encoder.keras
    python nnclr_train.py --data mocks/tidal.h5 --out runs/nnclr --strategy mirrored
"""

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import shutil

import numpy as np

# Defaults (Desmons et al. 2023); every one can be set from the command line.
BATCH_SIZE = 220  # unlabelled images per NNCLR step
EPOCHS = 25  # NNCLR epochs
SHUFFLE_BUFFER = 5000  # shuffle buffer of the unlabelled stream
LEARNING_RATE = 1e-3  # Adam, encoder (Keras default, as the original)
CLASSIFIER_BATCH_SIZE = 24  # labelled images per classifier step
CLASSIFIER_EPOCHS = 50  # classifier epochs
CLASSIFIER_LEARNING_RATE = 1e-3  # Adam, classifier
SPLIT_SIZES = (300, 30, 50)  # classifier train / validation / test galaxies per class
SEED = 0  # seeds the splits, the shuffling, the augmentations and the initial weights
TFDS_UNLABELLED = "tidal_unlabelled"  # TFDS builder of the unlabelled set (config as name/config)
TFDS_LABELLED = "tidal_labelled"  # TFDS builder of the labelled set
STRATEGY = "default"  # tf.distribute strategy: default (one device), mirrored or multiworker

logger = logging.getLogger("nnclr_train")


def add_data_arguments(parser):
    """Command-line options that choose the data (shared with nnclr_test.py)."""
    group = parser.add_argument_group("data (one of --data or --tfds-dir)")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+", metavar="PATH", help="tidal HDF5 files or directories of them")
    source.add_argument("--tfds-dir", metavar="DIR", help="TFDS data_dir holding the tidal builders")
    group.add_argument("--tfds-unlabelled", default=TFDS_UNLABELLED, help="unlabelled builder (default %(default)s)")
    group.add_argument("--tfds-labelled", default=TFDS_LABELLED, help="labelled builder (default %(default)s)")


def open_source(args):
    """The :class:`tidal_data.TidalSource` the data options name."""
    import data.tidal_datasets
    import tidal_data

    if args.data:
        return tidal_data.tidal_source_from_hdf5(args.data)
    return data.tidal_datasets.tidal_source_from_tfds(args.tfds_unlabelled, args.tfds_labelled, args.tfds_dir)


def add_config_arguments(parser):
    """One option per NNCLRConfig field (``--queue-size 100``), plus ``--config testing``."""
    import nnclr_model

    group = parser.add_argument_group("NNCLR architecture (defaults: Desmons et al. 2023)")
    group.add_argument(
        "--config", choices=("paper", "testing"), default="paper",
        help="starting configuration: the paper's, or a tiny one for tests (default %(default)s)",
    )
    for field in dataclasses.fields(nnclr_model.NNCLRConfig):
        option = "--" + field.name.replace("_", "-")
        if field.name == "image_size":
            continue  # set from the data
        text = f"paper: {field.default}, testing: {getattr(nnclr_model.TESTING_CONFIG, field.name)}"
        if isinstance(field.default, bool):
            group.add_argument(option, dest=field.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        elif isinstance(field.default, tuple):
            group.add_argument(
                option, dest=field.name, type=float, nargs=2, metavar=("LOW", "HIGH"), default=argparse.SUPPRESS, help=text
            )
        else:
            group.add_argument(option, dest=field.name, type=type(field.default), default=argparse.SUPPRESS, help=text)


def config_from_arguments(args, image_shape):
    """NNCLRConfig from ``--config`` and the per-field options, sized to the data's images."""
    import nnclr_model
    import tidal_data

    base = nnclr_model.TESTING_CONFIG if args.config == "testing" else nnclr_model.NNCLRConfig()
    changes = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(base)
        if getattr(args, field.name, None) is not None
    }
    minimum = changes.get("crop_size", base.crop_size) + changes.get("jitter", base.jitter)
    tidal_data.check_tidal_shape(image_shape, minimum, changes.get("n_bands", base.n_bands))
    height, width = image_shape[:2]
    if height != width:
        raise ValueError(f"images must be square, got {height}x{width} px")
    return dataclasses.replace(base, **changes, image_size=height)


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train the NNCLR tidal-feature encoder and its classifier (Desmons et al. 2023).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--load-encoder", metavar="PATH", help="train only the classifier on this trained encoder")
    add_data_arguments(parser)
    add_config_arguments(parser)
    training = parser.add_argument_group("training")
    training.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="unlabelled images per NNCLR step")
    training.add_argument("--epochs", type=int, default=EPOCHS, help="NNCLR epochs")
    training.add_argument("--steps-per-epoch", type=int, help="NNCLR steps per epoch (None: one pass over the data)")
    training.add_argument("--shuffle-buffer", type=int, default=SHUFFLE_BUFFER, help="shuffle buffer of the unlabelled stream")
    training.add_argument("--learning-rate", type=float, default=LEARNING_RATE, help="Adam learning rate of NNCLR")
    training.add_argument("--classifier-batch-size", type=int, default=CLASSIFIER_BATCH_SIZE, help="labelled images per step")
    training.add_argument("--classifier-epochs", type=int, default=CLASSIFIER_EPOCHS, help="classifier epochs")
    training.add_argument("--classifier-learning-rate", type=float, default=CLASSIFIER_LEARNING_RATE, help="Adam learning rate of the classifier")
    training.add_argument("--fine-tune", action="store_true", help="train the encoder with the classifier (default: linear probe)")
    training.add_argument(
        "--split-sizes", type=int, nargs=3, default=SPLIT_SIZES, metavar=("TRAIN", "VAL", "TEST"),
        help="classifier galaxies per class (HDF5 data; the TFDS labelled builder has its own splits)",
    )
    training.add_argument("--seed", type=int, default=SEED, help="seeds splits, shuffling, augmentation and weights")
    training.add_argument(
        "--strategy", choices=("default", "mirrored", "multiworker"), default=STRATEGY,
        help="tf.distribute strategy: one device, all local GPUs, or several machines (TF_CONFIG)",
    )
    return parser


def save_array(path, array):
    """np.save, atomically."""
    import common

    temporary = common.atomic_path(path)
    with open(temporary, "wb") as handle:
        np.save(handle, np.asarray(array))
    os.replace(temporary, path)


def save_json(path, values):
    """JSON file, atomically."""
    import common

    temporary = common.atomic_path(path)
    temporary.write_text(json.dumps(values, indent=2))
    os.replace(temporary, path)


def save_figure(figure, path):
    """PNG of a matplotlib figure, atomically; closes the figure."""
    import matplotlib.pyplot as plt

    import common

    temporary = common.atomic_path(path)
    figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    os.replace(temporary, path)


def plot_classifier_loss(history, path):
    """Training and validation binary cross-entropy per epoch, as the original's plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.5))
    epochs = np.arange(1, len(history["loss"]) + 1)
    axes.plot(epochs, history["loss"], label="train")
    axes.plot(epochs, history["val_loss"], label="validation")
    axes.set_xlabel("epoch")
    axes.set_ylabel("binary cross-entropy")
    axes.set_title("Classifier loss")
    axes.legend(loc="upper right")
    save_figure(figure, path)


def progress_callback(description):
    """A tqdm bar over epochs (Keras's own per-step log is switched off)."""
    import keras
    from tqdm.auto import tqdm

    class EpochBar(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.bar = tqdm(total=self.params.get("epochs"), desc=description, unit="epoch")

        def on_epoch_end(self, epoch, logs=None):
            self.bar.update(1)
            self.bar.set_postfix({key: f"{value:.3g}" for key, value in (logs or {}).items()})

        def on_train_end(self, logs=None):
            self.bar.close()

    return EpochBar()


@contextlib.contextmanager
def global_batch_norm(model, strategy):
    """Within the block, ``model``'s batch normalisation uses the global batch's statistics.

    Only with more than one replica; the saved files keep the plain layers, so they load and
    behave the same whatever strategy trained them.
    """
    import nnclr_model

    if strategy.num_replicas_in_sync < 2:
        yield
        return
    nnclr_model.synchronise_batch_norm(model, True)
    try:
        yield
    finally:
        nnclr_model.synchronise_batch_norm(model, False)


def train_encoder(source, config, band_scale, args, out, strategy):
    """Train NNCLR on the unlabelled stream; returns the trained encoder (saved to out/encoder.keras).

    The model is built and compiled inside ``strategy``'s scope; ``args.batch_size`` is the
    global batch, split across the replicas.
    """
    import keras

    import nnclr_model
    import tidal_data

    stream = tidal_data.tidal_unlabelled_dataset(
        source.unlabelled(), band_scale, args.batch_size, args.shuffle_buffer, seed=args.seed, min_size=config.min_image_size
    )
    if args.steps_per_epoch:
        stream = stream.repeat()
    with strategy.scope():
        model = nnclr_model.NNCLR(config, seed=args.seed)
        model.compile(optimizer=keras.optimizers.Adam(args.learning_rate))
    with global_batch_norm(model.encoder, strategy):
        history = model.fit(
            stream,
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
            shuffle=False,
            verbose=0,
            callbacks=[
                keras.callbacks.BackupAndRestore(str(out / "backup_nnclr")),
                progress_callback("NNCLR"),
            ],
        )
    if not history.history:
        raise ValueError(
            f"the unlabelled stream gave no batch of {args.batch_size} images; lower --batch-size"
        )
    save_json(out / "nnclr_history.json", {key: [float(v) for v in values] for key, values in history.history.items()})
    nnclr_model.save_encoder(model.encoder, out / "encoder.keras")
    return model.encoder


def train_classifier(encoder, source, splits, config, band_scale, args, out, strategy):
    """Train the classifier on the train set, validating on the validation set; saves its outputs.

    The classifier is built and compiled inside ``strategy``'s scope (where ``encoder`` must
    have been built or loaded too).
    """
    import keras

    import nnclr_model
    import tidal_data

    def dataset(name, shuffle):
        indices = splits[name]
        return tidal_data.tidal_labelled_dataset(
            source.read_labelled(indices), source.labels[indices], band_scale, args.classifier_batch_size,
            shuffle=shuffle, seed=args.seed, min_size=config.min_image_size,
        )

    with strategy.scope():
        classifier = nnclr_model.build_classifier(encoder, config, fine_tune=args.fine_tune, seed=args.seed)
        classifier.compile(
            optimizer=keras.optimizers.Adam(args.classifier_learning_rate),
            loss=keras.losses.BinaryCrossentropy(),
            metrics=[keras.metrics.BinaryAccuracy(name="acc"), keras.metrics.AUC(name="auc")],
        )
    with global_batch_norm(encoder, strategy):
        history = classifier.fit(
            dataset("train", shuffle=True),
            validation_data=dataset("validation", shuffle=False),
            epochs=args.classifier_epochs,
            shuffle=False,
            verbose=0,
            callbacks=[
                keras.callbacks.BackupAndRestore(str(out / "backup_classifier")),
                progress_callback("classifier"),
            ],
        )
    nnclr_model.save_model_file(classifier, out / "classifier.keras")
    save_array(out / "train_loss.npy", np.asarray(history.history["loss"], dtype=np.float32))
    save_array(out / "val_loss.npy", np.asarray(history.history["val_loss"], dtype=np.float32))
    plot_classifier_loss(history.history, out / "classifier_loss.png")
    return classifier, history.history


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import keras

    import nnclr_model
    import tidal_data
    import train

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # MultiWorkerMirroredStrategy must exist before any other TensorFlow work.
    strategy = train.make_strategy(args.strategy)
    logger.info("strategy %s: %d replicas in sync", args.strategy, strategy.num_replicas_in_sync)
    keras.utils.set_random_seed(args.seed)
    try:
        source = open_source(args)
        config = config_from_arguments(args, source.image_shape)
        band_scale = None
        if args.load_encoder:
            # A run directory's config.json fixes the architecture and the stretch the encoder learnt with.
            encoder_run = pathlib.Path(args.load_encoder).with_name("config.json")
            if encoder_run.is_file():
                config, extra = nnclr_model.load_config(encoder_run)
                band_scale = np.asarray(extra["band_scale"], dtype=np.float32)
                logger.info("using the config and band scale of %s", encoder_run)
            if tuple(source.image_shape) != config.input_shape:
                raise ValueError(
                    f"the data's images are {tuple(source.image_shape)}, the encoder's run used {config.input_shape}"
                )
            with strategy.scope():
                encoder = nnclr_model.load_encoder(args.load_encoder, config)
        splits = tidal_data.tidal_source_splits(source, args.split_sizes, seed=args.seed)
        if band_scale is None:
            first = list(source.unlabelled().take(tidal_data.TIDAL_SCALE_IMAGES).as_numpy_iterator())
            band_scale = tidal_data.tidal_band_scale(np.stack(first))
    except (ValueError, OSError) as error:
        parser.exit(2, f"error: {error}\n")
    logger.info("data: %s; %d labelled galaxies; band scale %s", source.description, len(source.labels), band_scale)
    save_json(out / "splits.json", {name: [str(i) for i in source.ids[indices]] for name, indices in splits.items()})
    settings = {key: value for key, value in vars(args).items() if key not in {f.name for f in dataclasses.fields(config)}}
    nnclr_model.save_config(
        config, out / "config.json", band_scale=[float(value) for value in band_scale],
        softening=tidal_data.TIDAL_STRETCH_SOFTENING, data=source.description, settings=settings,
    )

    if not args.load_encoder:
        encoder_path = out / "encoder.keras"
        if encoder_path.is_file() and not (out / "backup_nnclr").exists():
            logger.info("%s exists: the encoder stage of this run finished, loading it", encoder_path)
            with strategy.scope():
                encoder = nnclr_model.load_encoder(encoder_path, config)
        else:
            encoder = train_encoder(source, config, band_scale, args, out, strategy)
    elif not (out / "encoder.keras").exists():
        nnclr_model.save_encoder(encoder, out / "encoder.keras")
    _, history = train_classifier(encoder, source, splits, config, band_scale, args, out, strategy)
    for backup in ("backup_nnclr", "backup_classifier"):
        shutil.rmtree(out / backup, ignore_errors=True)
    print(
        f"classifier: final train loss {history['loss'][-1]:.4f}, validation loss {history['val_loss'][-1]:.4f}; "
        f"outputs in {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
