"""Train the ICL regressor on artificial cluster images (Canepa et al. 2025, SPEC Part A).

Data come from the TFDS dataset ``icl_artificial`` (built by ``data/icl_datasets.py``) or
from HDF5/FITS cutouts with a per-cutout label column (HDF5 shards of ``python -m data.generate``,
prepared .npy files, FITS). On the TensorFlow backend (the default) the cutouts stream through
tf.data; on another Keras backend (``KERAS_BACKEND=jax``) through ``loaders``, which never
import TensorFlow, so the TFDS dataset and the ``mirrored`` and ``multiworker`` strategies,
which are TensorFlow's, are refused there. The run directory receives:

* ``best.weights.h5`` (lowest validation loss) and ``final.weights.h5``, each with its
  ``.config.json``;
* ``history.csv`` (one row per epoch) and ``backup/`` for resuming: rerunning the same
  command after an interruption continues from the last finished epoch, and rerunning a
  finished run with more ``--epochs`` extends it;
* ``binned_validation.png`` (median and 35/45-percentile bands of the predicted fraction in
  20 bins of the true one), ``metrics.json`` (MAE, bias, scatter, Pearson r) and, when a real
  cluster set is given, ``binned_real.png`` and its metrics, without fine-tuning.

With ``--strategy multiworker`` (several processes, ``TF_CONFIG``) only the chief writes the
run directory; each other worker writes its own ``tmp-worker-<index>`` folder inside it, which
is removed when the run ends.

Example::

    python train.py mocks/ --label-key f_icl_sb --epochs 90 --out-dir runs/train
"""

import common

if __name__ in common.MAIN_NAMES:
    common.quiet_start()  # before TensorFlow loads: no start-up noise unless --verbose

import argparse
import dataclasses
import json
import logging
import math
import pathlib
import sys

import keras
import numpy as np
import pandas as pd

import loaders
import locks
import model
import plots
import prep_data

# Defaults of SPEC Part A; every one can be set from the command line.
EPOCHS = 90
BATCH_SIZE = 50
VALIDATION_BATCH_SIZE = 100
LEARNING_RATE = 1e-4
VALIDATION_FRACTION = 0.1
LR_FACTOR = 0.1
LR_PATIENCE = 10
MIN_LEARNING_RATE = 1e-5
EARLY_STOPPING_PATIENCE = 25
DATASET = "icl_artificial"
LABEL_KEY = "f_icl_sb"
SEED = 0
OUT_DIR = "runs/train"
STRATEGY = "default"
#: Memory (GiB) for prepared cutouts kept by the loaders of backends other than TensorFlow.
CACHE_MEMORY_GB = 2.0

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one training run."""

    epochs: int = EPOCHS  # passes over the training split
    batch_size: int = BATCH_SIZE  # training batch
    validation_batch_size: int = VALIDATION_BATCH_SIZE  # validation batch
    learning_rate: float = LEARNING_RATE  # Adam step size
    lr_factor: float = LR_FACTOR  # ReduceLROnPlateau factor
    lr_patience: int = LR_PATIENCE  # epochs without improvement before reducing the step
    min_learning_rate: float = MIN_LEARNING_RATE  # floor of ReduceLROnPlateau
    early_stopping_patience: int = EARLY_STOPPING_PATIENCE  # epochs without improvement before stopping
    seed: int = SEED  # seeds weights, augmentation and shuffling
    augment: bool = True  # flips, noise and 90-degree rotations in training

    def __post_init__(self):
        for name in ("epochs", "batch_size", "validation_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


#: The tiny configuration of the tests: a couple of epochs on small batches.
TINY = TrainConfig(epochs=2, batch_size=8, validation_batch_size=8)


# ----------------------------------------------------------------------------------------
# Data


def split_indices(n, validation_fraction, seed):
    """Deterministic train/validation split of ``n`` examples: (train_indices, validation_indices)."""
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_validation = max(1, int(round(n * validation_fraction)))
    if n - n_validation < 1:
        raise ValueError(f"need at least 2 examples to split into training and validation, got {n}")
    return np.sort(order[n_validation:]), np.sort(order[:n_validation])


def labelled_stream(refs, labels, batch_size, image_size, shuffle_seed=None, cache_bytes=0):
    """``(image, label)`` batches of cutouts for training or evaluation, stopping at a bad cutout.

    A ``tf.data.Dataset`` (:func:`prep_data.cutout_dataset`) on the TensorFlow backend, a
    :class:`loaders.LabelledCutoutLoader` with the same batches on the others, which keeps up
    to ``cache_bytes`` of prepared cutouts in memory for the later epochs.
    """
    if keras.backend.backend() != "tensorflow":
        return loaders.LabelledCutoutLoader(refs, labels, batch_size, image_size, shuffle_seed=shuffle_seed, strict=True,
                                            cache_bytes=cache_bytes)
    dataset = prep_data.cutout_dataset(refs, batch_size, image_size, labels, shuffle_seed=shuffle_seed, strict=True)
    return dataset.map(lambda e: (e["image"], e["label"]))


def cutout_datasets(inputs, label_key, train_config, validation_fraction, image_size, cache_bytes=0):
    """Training and validation datasets of ``(image, label)`` streamed from cutout files
    (:func:`labelled_stream`; ``cache_bytes`` is each stream's memory cache off TensorFlow).

    Returns ``(train_data, validation_data, train_labels)``.
    """
    refs, errors = prep_data.index_cutouts(inputs)
    if errors:
        raise prep_data.CutoutError(errors[0][1])
    labels = prep_data.read_labels(refs, label_key)
    train_idx, val_idx = split_indices(len(refs), validation_fraction, train_config.seed)

    def stream(indices, batch_size, shuffle_seed):
        return labelled_stream([refs[i] for i in indices], labels[indices], batch_size, image_size, shuffle_seed,
                               cache_bytes)

    return (
        stream(train_idx, train_config.batch_size, train_config.seed),
        stream(val_idx, train_config.validation_batch_size, None),
        labels[train_idx],
    )


def tfds_datasets(name, data_dir, train_config, validation_fraction):
    """Training and validation datasets from a TFDS dataset with ``image`` and ``label`` features.

    TensorFlow backend only. Returns ``(train_data, validation_data, train_labels)``.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    import data.icl_datasets  # noqa: F401  (registers the project's builders)

    percent = int(round(100 * (1 - validation_fraction)))
    train_split, val_split = tfds.load(
        name, split=[f"train[:{percent}%]", f"train[{percent}%:]"], data_dir=data_dir, shuffle_files=True
    )

    def pairs(dataset, batch_size, shuffle):
        dataset = dataset.map(
            lambda e: (tf.cast(e["image"], tf.float32), tf.cast(e["label"], tf.float32)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        if shuffle:
            dataset = dataset.shuffle(5000, seed=train_config.seed)
        return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    labels_only = tfds.load(
        name, split=f"train[:{percent}%]", data_dir=data_dir, decoders={"image": tfds.decode.SkipDecoding()}
    ).map(lambda e: e["label"])
    train_labels = np.fromiter(labels_only.as_numpy_iterator(), dtype=np.float32)
    return (
        pairs(train_split, train_config.batch_size, True),
        pairs(val_split, train_config.validation_batch_size, False),
        train_labels,
    )


# ----------------------------------------------------------------------------------------
# Training


def compiled_model(model_config, train_config, strategy=None, initial_weights=None):
    """The ICL model built and compiled (Adam, Beta-mixture NLL) inside ``strategy``'s scope."""
    strategy = strategy or common.make_strategy()
    with strategy.scope():
        icl_model = model.build_icl_model(model_config, augment=train_config.augment, seed=train_config.seed)
        if initial_weights:
            source = model.load_icl_model(initial_weights, augment=train_config.augment)
            icl_model.set_weights(source.get_weights())
        icl_model.compile(optimizer=keras.optimizers.Adam(train_config.learning_rate), loss=model.BetaMixtureNLL())
    return icl_model


class AtomicBestCheckpoint(keras.callbacks.Callback):
    """Keep the weights of lowest validation loss, written through a temporary file.

    ``best`` starts from the history of an interrupted run, so a resumed run never
    overwrites a better checkpoint with a worse one.
    """

    def __init__(self, path, config, best=math.inf):
        super().__init__()
        self.path, self.config, self.best = path, config, best

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_loss")
        if value is not None and value < self.best:
            self.best = value
            model.save_weights(self.model, self.path, self.config)


def _best_so_far(history_path):
    if not history_path.exists():
        return math.inf
    history = pd.read_csv(history_path)
    return float(history["val_loss"].min()) if "val_loss" in history and len(history) else math.inf


def check_resumable(out_dir, model_config):
    """Refuse to resume into ``out_dir`` when it holds a run of another architecture.

    Keras would otherwise fail while restoring the backup, with a dump of every layer.
    """
    for name in ("best.config.json", "final.config.json"):
        path = pathlib.Path(out_dir) / name
        if not path.exists():
            continue
        try:
            previous = model.ICLConfig.from_json(path.read_text())
        except (ValueError, TypeError, KeyError):
            raise ValueError(f"{path}: not a checkpoint config of this project; give a new --out-dir") from None
        if previous != model_config:
            raise ValueError(f"{out_dir} holds a run of another architecture ({previous}, this run {model_config}); "
                             "give a new --out-dir, or the same architecture to resume")


def train(model_config, train_config, train_data, validation_data, out_dir, real_data=None, initial_weights=None,
          strategy=None, prior_labels=None):
    """Train, checkpoint and evaluate the ICL regressor.

    Parameters
    ----------
    model_config : model.ICLConfig
    train_config : TrainConfig
    train_data, validation_data : tf.data.Dataset or keras.utils.PyDataset
        Batches of ``(image (B, S, S, 1), label (B,))`` (:func:`labelled_stream`); under a
        multi-worker strategy every worker passes the same batches, B is the global batch and
        each worker trains on its share of it (:func:`common.split_batches_across_workers`).
    out_dir : path
        Run directory (created); rerunning into the same directory resumes. Under a
        multi-worker strategy only the chief writes it; the other workers write their own
        temporary folders (:func:`common.worker_folders`) and resume from the chief's backup.
    real_data : tf.data.Dataset or keras.utils.PyDataset, optional
        A set of real clusters evaluated with the trained model (no fine-tuning).
    initial_weights : path, optional
        Checkpoint to start from instead of random weights.
    strategy : tf.distribute.Strategy or common.OneDevice, optional
        Distribution strategy (see :func:`common.make_strategy`); one device by default.
    prior_labels : array, optional
        Training labels; when given (and no ``initial_weights``), the untrained head starts at
        their distribution (:func:`model.set_label_prior`).

    Returns
    -------
    dict or None
        The metrics written to ``metrics.json``; None on a worker other than the chief, which
        evaluates nothing (its folder is removed once training ends).
    """
    check_resumable(out_dir, model_config)
    strategy = strategy or common.make_strategy()
    folders = common.worker_folders(out_dir, strategy)
    out_dir = folders.own
    train_data = common.split_batches_across_workers(train_data)
    validation_data = common.split_batches_across_workers(validation_data)
    keras.utils.set_random_seed(train_config.seed)
    icl_model = compiled_model(model_config, train_config, strategy, initial_weights)
    if prior_labels is not None and not initial_weights:
        model.set_label_prior(icl_model, prior_labels)
    callbacks = [
        common.backup_and_restore(folders, "backup", delete_checkpoint=False),
        # The chief's history, so that every worker saves a best checkpoint at the same epochs.
        AtomicBestCheckpoint(out_dir / "best.weights.h5", model_config, _best_so_far(folders.run / "history.csv")),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss",
            factor=train_config.lr_factor,
            patience=train_config.lr_patience,
            min_lr=train_config.min_learning_rate,
        ),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=train_config.early_stopping_patience),
        keras.callbacks.CSVLogger(str(out_dir / "history.csv"), append=True),
    ]
    icl_model.fit(train_data, validation_data=validation_data, epochs=train_config.epochs, callbacks=callbacks, verbose=2,
                  shuffle=False)  # the dataset shuffles itself
    model.save_weights(icl_model, out_dir / "final.weights.h5", model_config)
    if not (out_dir / "best.weights.h5").exists():
        model.save_weights(icl_model, out_dir / "best.weights.h5", model_config)
    if not folders.chief:
        common.remove_worker_folder(folders)
        return None

    predictor = model.Predictor(model.load_icl_model(out_dir / "best.weights.h5"))
    labels, summary = model.predict_dataset(predictor, validation_data)
    metrics = {"validation": model.regression_metrics(labels, summary["mode"])}
    plots.plot_binned(labels, summary["mode"], out_dir / "binned_validation.png", title="validation set")
    if real_data is not None:
        labels, summary = model.predict_dataset(predictor, real_data)
        metrics["real_without_finetuning"] = model.regression_metrics(labels, summary["mode"])
        plots.plot_binned(labels, summary["mode"], out_dir / "binned_real.png", n_bins=5, title="real clusters, not fine-tuned")
    common.write_json(out_dir / "metrics.json", metrics)
    return metrics


# ----------------------------------------------------------------------------------------
# Command line


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="labelled cutouts (FITS, HDF5, or directories of them); without any, the TFDS dataset --tfds")
    parser.add_argument("--tfds", help=f"TFDS dataset name when no INPUT is given (default {DATASET}; TensorFlow "
                        "backend only)")
    parser.add_argument("--tfds-dir", help="TFDS data directory (TensorFlow backend only)")
    parser.add_argument("--label-key", default=LABEL_KEY, help=f"label column of the cutout files (default {LABEL_KEY})")
    parser.add_argument("--real", nargs="+", metavar="PATH", help="real clusters to evaluate without fine-tuning")
    parser.add_argument("--real-label-key", default=LABEL_KEY, help="label column of the real clusters")
    parser.add_argument("--out-dir", default=OUT_DIR, help=f"run directory (default {OUT_DIR}); rerun to resume")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--validation-batch-size", type=int, default=VALIDATION_BATCH_SIZE)
    parser.add_argument("--learning-rate", type=float, default=LEARNING_RATE)
    parser.add_argument("--validation-fraction", type=float, default=VALIDATION_FRACTION)
    parser.add_argument("--lr-factor", type=float, default=LR_FACTOR)
    parser.add_argument("--lr-patience", type=int, default=LR_PATIENCE)
    parser.add_argument("--min-learning-rate", type=float, default=MIN_LEARNING_RATE)
    parser.add_argument("--early-stopping-patience", type=int, default=EARLY_STOPPING_PATIENCE)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--no-augment", action="store_true",
                        help="train without the random flips, noise and rotations (e.g. to compare runs step by step)")
    parser.add_argument("--init", metavar="CHECKPOINT", help="start from these weights")
    parser.add_argument("--no-label-prior", action="store_true",
                        help="start the mixture head from zero bias (the original) instead of the training labels' distribution")
    parser.add_argument("--strategy", choices=common.STRATEGIES, default=STRATEGY,
                        help="tf.distribute strategy: one device, all local GPUs, or several machines (TF_CONFIG); "
                        "other backends than TensorFlow run on one device")
    parser.add_argument("--architecture", choices=sorted(model.ARCHITECTURES), default="paper",
                        help="paper (224 px, N = 6, the default), compact (112 px, N = 2, trainable on a CPU) "
                        "or tiny (32 px, N = 1, for smoke runs)")
    parser.add_argument("--tiny", action="store_true", help="same as --architecture tiny")
    parser.add_argument("--cache-memory", type=float, default=CACHE_MEMORY_GB, metavar="GIB",
                        help="backends other than TensorFlow: keep up to this many GiB of prepared cutouts in memory "
                             f"after their first read, for the later epochs (default {CACHE_MEMORY_GB:g}; 0: off)")
    common.add_precision_argument(parser)
    common.add_verbose_argument(parser)
    return parser


def check_backend_options(args):
    """Refuse, on a Keras backend other than TensorFlow, the data and strategies only TensorFlow serves."""
    if not args.cache_memory >= 0:
        raise ValueError(f"--cache-memory must be >= 0 GiB, got {args.cache_memory}")
    if keras.backend.backend() == "tensorflow":
        return
    for option, value in (("--tfds", args.tfds), ("--tfds-dir", args.tfds_dir)):
        if value is not None:
            common.require_tensorflow(option)
    if not args.inputs:
        raise ValueError(f"training without INPUT files reads the TFDS dataset {DATASET}, which needs the TensorFlow "
                         f"backend (KERAS_BACKEND=tensorflow); this run uses {keras.backend.backend()}: give labelled "
                         "cutout files as INPUT")
    if args.strategy != "default":
        common.require_tensorflow(f"--strategy {args.strategy}")


@common.interruptible(common.INTERRUPTED_TRAINING)
@common.data_errors_are_one_line()
def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        check_backend_options(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # First: MultiWorkerMirroredStrategy must exist before any other TensorFlow work (the
    # datasets below initialise TensorFlow).
    strategy = common.make_strategy(args.strategy)
    common.set_precision(args.precision)
    try:
        train_config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            validation_batch_size=args.validation_batch_size,
            learning_rate=args.learning_rate,
            lr_factor=args.lr_factor,
            lr_patience=args.lr_patience,
            min_learning_rate=args.min_learning_rate,
            early_stopping_patience=args.early_stopping_patience,
            seed=args.seed,
            augment=not args.no_augment,
        )
        model_config = model.ARCHITECTURES["tiny" if args.tiny else args.architecture]
        common.check_output_dir(args.out_dir)
        check_resumable(args.out_dir, model_config)
        if args.inputs:
            train_data, validation_data, train_labels = cutout_datasets(
                args.inputs, args.label_key, train_config, args.validation_fraction, model_config.image_size,
                int(args.cache_memory * 2**30)
            )
        else:
            train_data, validation_data, train_labels = tfds_datasets(args.tfds or DATASET, args.tfds_dir, train_config,
                                                                      args.validation_fraction)
        real_data = None
        if args.real:
            real_refs, errors = prep_data.index_cutouts(args.real)
            if errors:
                raise prep_data.CutoutError(errors[0][1])
            real_labels = prep_data.read_labels(real_refs, args.real_label_key)
            real_data = labelled_stream(real_refs, real_labels, train_config.validation_batch_size,
                                        model_config.image_size)
        prior_labels = None if args.no_label_prior else train_labels
        with locks.folder_lock(args.out_dir):  # a second run into the same folder is refused, not mixed in
            metrics = train(model_config, train_config, train_data, validation_data, args.out_dir, real_data, args.init,
                            strategy, prior_labels)
    except (ValueError, model.CheckpointError, prep_data.CutoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if metrics is None:
        print(f"worker {strategy.cluster_resolver.task_id} finished; the chief writes {args.out_dir}")
        return 0
    print(json.dumps(metrics, indent=2))
    print(f"checkpoints, history and plots are in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
