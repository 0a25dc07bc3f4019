"""Fine-tune the trained ICL regressor on real clusters with 5-fold cross-validation.

Starting from a trained checkpoint, the encoder is frozen and only the two dense layers are
trained (SPEC Part A). Since the frozen encoder maps an augmented image to the same vector
every time, the default ``--method cached`` encodes each cluster once per augmented view
(``--views``) and trains the head on those vectors, which takes seconds instead of running the
encoder at every step (``--method full``, the original's way). By default the clusters are split into 5 folds (NumPy
``default_rng(24)`` shuffling, as the original); each fold is predicted by a model fine-tuned
on the other four. ``--split K`` runs one fold only and ``--all`` fine-tunes once on every
cluster (the model to apply to new data).

The output directory receives ``fold{K}.weights.h5`` per fold (or ``final.weights.h5``),
``results.csv`` (one row per cluster: id, fold, label, mode, p15, p85, and the prediction
before fine-tuning), ``metrics.json`` (MAE and Pearson r per fold and overall, before and
after), ``scatter.png`` (15-85% error bars) and ``binned.png`` (5-bin medians). A rerun into
the same directory skips the folds already finished.

Example::

    python finetune.py real_clusters.h5 --label-key f_icl_sb --checkpoint runs/train/best.weights.h5
"""

import common

if __name__ in common.MAIN_NAMES:
    common.quiet_start()  # before TensorFlow loads: no start-up noise unless --verbose

import argparse
import dataclasses
import logging
import pathlib
import sys

import keras
import numpy as np
import pandas as pd

import backends
import loaders
import locks
import model
import plots
import prep_data

# Defaults of SPEC Part A; every one can be set from the command line.
CHECKPOINT = str(pathlib.Path(__file__).resolve().parent / "checkpoints" / "icl_trained.weights.h5")
EPOCHS = 100
BATCH_SIZE = 32  # the original's (Keras's default)
LEARNING_RATE = 1e-7
N_FOLDS = 5
FOLD_SEED = 24
LABEL_KEY = "f_icl_sb"
ZERO_LABEL = 1e-5
METHOD = "cached"
N_VIEWS = 8
SEED = 0
OUT_DIR = "runs/finetune"

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Settings of fine-tuning the dense head."""

    epochs: int = EPOCHS  # passes over the fine-tuning clusters
    batch_size: int = BATCH_SIZE  # clusters per step
    learning_rate: float = LEARNING_RATE  # Adam step size
    n_folds: int = N_FOLDS  # cross-validation folds
    fold_seed: int = FOLD_SEED  # seed of the fold shuffling (the original's 24)
    seed: int = SEED  # seeds augmentation and batch order
    method: str = METHOD  # "cached": train the head on stored encoder outputs; "full": through the whole model
    n_views: int = N_VIEWS  # augmented views per cluster stored by the cached method

    def __post_init__(self):
        if self.n_folds < 2:
            raise ValueError(f"n_folds must be >= 2, got {self.n_folds}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if self.method not in ("cached", "full"):
            raise ValueError(f"method must be 'cached' or 'full', got {self.method!r}")
        if self.n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {self.n_views}")


def make_folds(n, n_folds=N_FOLDS, seed=FOLD_SEED):
    """Indices of each fold: ``arange(n)`` shuffled by ``default_rng(seed)``, split in ``n_folds``."""
    if n < n_folds:
        raise ValueError(f"need at least {n_folds} clusters for {n_folds}-fold cross-validation, got {n}")
    indices = np.arange(n)
    np.random.default_rng(seed=seed).shuffle(indices)
    return np.array_split(indices, n_folds)


def clean_labels(labels):
    """Labels for the Beta likelihood: zeros become 1e-5 (SPEC Part A); outside [0, 1] is an error."""
    labels = np.asarray(labels, dtype=np.float32)
    if not np.isfinite(labels).all() or labels.min() < 0 or labels.max() > 1:
        raise ValueError("ICL-fraction labels must be finite and in [0, 1]")
    return np.where(labels == 0, np.float32(ZERO_LABEL), labels)


def finetune_split(checkpoint, images, labels, config):
    """Fine-tune the dense head of ``checkpoint`` on ``images`` (N, S, S, 1) and ``labels`` (N,).

    Returns the fine-tuned model (with augmentation layers, acting in training only).
    """
    keras.utils.set_random_seed(config.seed)
    icl_model = model.freeze_encoder(model.load_icl_model(checkpoint, augment=True, seed=config.seed))
    icl_model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss=model.BetaMixtureNLL())
    icl_model.fit(
        images, clean_labels(labels), batch_size=config.batch_size, epochs=config.epochs, shuffle=True, verbose=0
    )
    return icl_model


def _predict(icl_model, images, batch_size=64):
    predictor = model.Predictor(icl_model)
    parts = [predictor(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


class EncodedClusters:
    """Encoder outputs of every cluster, computed once: the cached fine-tuning method.

    With the encoder frozen, an augmented image always gives the same representation, so
    fine-tuning the dense head needs the encoder only once per augmented view. Each epoch then
    draws one of the ``n_views`` stored views per cluster, as the full method draws one
    augmentation per cluster, and the head trains on 256-d vectors instead of images.

    Attributes
    ----------
    views : ndarray (N, n_views, D)
        Representations of augmented images.
    plain : ndarray (N, D)
        Representations of the images themselves (used for prediction).
    """

    def __init__(self, checkpoint, images, n_views, seed=SEED, batch_size=32):
        icl_model = model.load_icl_model(checkpoint, augment=True, seed=seed)
        augmentation = icl_model.get_layer("augmentation")
        normalisation = icl_model.get_layer("normalisation")
        encoder = icl_model.get_layer(model.ENCODER_NAME)
        pooling = icl_model.get_layer(model.POOLING_NAME)

        if keras.backend.backend() == "tensorflow":
            encode_all = self._tensorflow_encoder(normalisation, augmentation, encoder, pooling, images, batch_size)
        else:
            encode_all = self._compiled_encoder(normalisation, augmentation, encoder, pooling, images, batch_size)
        keras.utils.set_random_seed(seed)
        self.plain = encode_all(False)
        self.views = np.stack([encode_all(True) for _ in range(n_views)], axis=1)

    @staticmethod
    def _tensorflow_encoder(normalisation, augmentation, encoder, pooling, images, batch_size):
        """``encode_all(augment)`` on TensorFlow: one ``tf.function`` with the augmentation inside."""
        import tensorflow as tf

        @tf.function(reduce_retracing=True)
        def encode(batch, augment):
            batch = normalisation(batch)
            if augment:
                batch = augmentation(batch, training=True)
            return pooling(encoder(batch, training=False))

        def encode_all(augment):
            parts = [encode(tf.constant(images[i : i + batch_size]), augment) for i in range(0, len(images), batch_size)]
            return np.concatenate([p.numpy() for p in parts])

        return encode_all

    @staticmethod
    def _compiled_encoder(normalisation, augmentation, encoder, pooling, images, batch_size):
        """``encode_all(augment)`` on the other backends: the augmentation runs eagerly (its random
        state moves at every call, which a compiled stateless function would not do), the frozen
        encoder and pooling are compiled (``backends.compile_function``)."""
        frozen = encoder.variables + pooling.variables
        represent = backends.compile_function(lambda batch: pooling(encoder(batch, training=False)), variables=frozen)

        def encode_all(augment):
            parts = []
            for start in range(0, len(images), batch_size):
                batch = normalisation(keras.ops.convert_to_tensor(images[start : start + batch_size], "float32"))
                if augment:
                    batch = augmentation(batch, training=True)
                parts.append(keras.ops.convert_to_numpy(represent(batch)))
            return np.concatenate(parts)

        return encode_all


def _head(icl_model):
    """The dense head of an ICL model as its own model, sharing (not copying) its layers."""
    width = icl_model.get_layer(model.ENCODER_NAME).output.shape[-1]
    return keras.Sequential(
        [keras.Input((width,)), icl_model.get_layer("hidden"), icl_model.get_layer("mixture_params")], name="head"
    )


def finetune_cached(checkpoint, encoded, indices, labels, config):
    """Fine-tune the head of ``checkpoint`` on stored views of clusters ``indices``; returns the ICL model."""
    keras.utils.set_random_seed(config.seed)
    icl_model = model.load_icl_model(checkpoint)
    head = _head(icl_model)
    head.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss=model.BetaMixtureNLL())
    views = encoded.views[indices]
    if keras.backend.backend() == "tensorflow":
        dataset = _tensorflow_views(views, clean_labels(labels), config)
    else:
        dataset = loaders.ViewLoader(views, clean_labels(labels), config.batch_size, seed=config.seed)
    head.fit(dataset, epochs=config.epochs, verbose=0, shuffle=False)  # the dataset shuffles itself
    return icl_model


def _tensorflow_views(views, labels, config):
    """The tf.data form of :class:`loaders.ViewLoader`: clusters reshuffled every epoch, one
    random view of each."""
    import tensorflow as tf

    n_views = views.shape[1]
    return (
        tf.data.Dataset.from_tensor_slices((views, labels))
        .shuffle(len(labels), seed=config.seed, reshuffle_each_iteration=True)
        .map(lambda v, y: (v[tf.random.uniform((), 0, n_views, tf.int32)], y), num_parallel_calls=tf.data.AUTOTUNE)
        .batch(config.batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


def _predict_encoded(icl_model, representations):
    return model.summarise(_head(icl_model)(representations))


def cross_validate(checkpoint, ids, images, labels, config, out_dir, splits=None):
    """K-fold cross-validated fine-tuning; returns the per-cluster results table.

    Parameters
    ----------
    checkpoint : path
        Trained weights to start every fold from.
    ids : sequence of str
    images : ndarray (N, S, S, 1)
        Prepared images.
    labels : ndarray (N,)
    config : FinetuneConfig
    out_dir : path
    splits : sequence of int, optional
        Run only these folds (0-based); all by default.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folds = make_folds(len(labels), config.n_folds, config.fold_seed)
    encoded = EncodedClusters(checkpoint, images, config.n_views, config.seed) if config.method == "cached" else None
    if encoded is None:
        before = _predict(model.load_icl_model(checkpoint), images)
    else:
        before = _predict_encoded(model.load_icl_model(checkpoint), encoded.plain)
    splits = range(config.n_folds) if splits is None else splits
    tables = []
    for k in common.progress(splits, desc="folds", unit="fold"):
        if not 0 <= k < config.n_folds:
            raise ValueError(f"split must be in [0, {config.n_folds - 1}], got {k}")
        fold_table = out_dir / f"fold{k}.csv"
        if fold_table.exists() and (out_dir / f"fold{k}.weights.h5").exists():
            tables.append(pd.read_csv(fold_table, dtype={"id": str}))
            continue
        held_out = folds[k]
        training = np.setdiff1d(np.arange(len(labels)), held_out)
        if encoded is None:
            tuned = finetune_split(checkpoint, images[training], labels[training], config)
            after = _predict(tuned, images[held_out])
        else:
            tuned = finetune_cached(checkpoint, encoded, training, labels[training], config)
            after = _predict_encoded(tuned, encoded.plain[held_out])
        model.save_weights(tuned, out_dir / f"fold{k}.weights.h5", model.read_config(checkpoint))
        table = pd.DataFrame(
            {
                "id": [ids[i] for i in held_out],
                "fold": k,
                "label": labels[held_out],
                "mode": after["mode"],
                "p15": after["p15"],
                "p85": after["p85"],
                "mode_before": before["mode"][held_out],
                "p15_before": before["p15"][held_out],
                "p85_before": before["p85"][held_out],
            }
        )
        _write_csv(table, fold_table)
        tables.append(table)
    results = pd.concat(tables, ignore_index=True)
    order = {cluster_id: i for i, cluster_id in enumerate(ids)}
    return results.sort_values("id", key=lambda column: column.map(order)).reset_index(drop=True)


def summarise_results(results):
    """MAE and Pearson r per fold and overall, after and before fine-tuning."""
    metrics = {}
    groups = [(f"fold{k}", table) for k, table in results.groupby("fold")] + [("overall", results)]
    for name, table in groups:
        metrics[name] = {
            "after": model.regression_metrics(table["label"], table["mode"]),
            "before": model.regression_metrics(table["label"], table["mode_before"]),
        }
    return metrics


def write_outputs(results, out_dir):
    """results.csv, metrics.json, scatter.png and binned.png in ``out_dir``; returns the metrics."""
    out_dir = pathlib.Path(out_dir)
    _write_csv(results, out_dir / "results.csv")
    metrics = summarise_results(results)
    common.write_json(out_dir / "metrics.json", metrics)
    summary = {"mode": results["mode"].to_numpy(), "p15": results["p15"].to_numpy(), "p85": results["p85"].to_numpy()}
    plots.plot_scatter(results["label"].to_numpy(), summary, out_dir / "scatter.png", title="cross-validated fine-tuning")
    plots.plot_binned(results["label"].to_numpy(), results["mode"].to_numpy(), out_dir / "binned.png", n_bins=5, label_name="measured $f_{ICL}$")
    return metrics


def final_finetune(checkpoint, images, labels, config, out_dir):
    """Fine-tune on every cluster and save ``final.weights.h5``; returns its path."""
    out_dir = pathlib.Path(out_dir)
    if config.method == "cached":
        encoded = EncodedClusters(checkpoint, images, config.n_views, config.seed)
        tuned = finetune_cached(checkpoint, encoded, np.arange(len(labels)), labels, config)
    else:
        tuned = finetune_split(checkpoint, images, labels, config)
    path = out_dir / "final.weights.h5"
    model.save_weights(tuned, path, model.read_config(checkpoint))
    return path


def _write_csv(table, path):
    with common.atomic_write(path) as temporary:
        table.to_csv(temporary, index=False, float_format="%.6g")


def read_label_table(path, ids):
    """Labels of the clusters ``ids`` from a CSV with columns ``id`` and ``f_icl``.

    Each problem is one ValueError naming the file (and the line where there is one): a file
    that is missing or not a UTF-8 CSV, missing columns, an id given twice, a cluster without a
    label, a label that is not a number or not a fraction in [0, 1].
    """
    try:
        table = pd.read_csv(path, dtype={"id": str, "f_icl": str}, encoding="utf-8", keep_default_na=False,
                            na_values=[""])
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ValueError(f"{path}: not a readable CSV of labels ({error})") from None
    if not {"id", "f_icl"} <= set(table.columns):
        raise ValueError(f"{path}: needs the columns id and f_icl, found {list(table.columns)}")
    table["line"] = np.arange(len(table)) + 2  # line 1 is the header
    repeated = table["id"].duplicated(keep=False)
    if repeated.any():
        first = table["id"][repeated].iloc[0]
        where = table["line"][table["id"] == first].tolist()
        raise ValueError(f"{path}: id '{first}' is given {len(where)} times (lines {', '.join(map(str, where))})")
    missing = sorted(set(ids) - set(table["id"]))
    if missing:
        raise ValueError(f"{path}: no label for clusters {missing[:5]}{'...' if len(missing) > 5 else ''}")
    table = table.set_index("id")
    lines = table["line"]
    for identifier in ids:
        text = table.at[identifier, "f_icl"]
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not np.isfinite(value) or not 0 <= value <= 1:
            problem = "not a number" if value is None or np.isnan(value) else "not a fraction in [0, 1]"
            raise ValueError(f"{path}, line {lines[identifier]}: f_icl of cluster '{identifier}' is "
                             f"{'empty' if pd.isna(text) else repr(text)}, {problem}")
    return table.loc[ids, "f_icl"].astype(float).to_numpy(np.float32)


def load_clusters(inputs, label_key, labels_csv=None, image_size=None):
    """Ids, prepared images and labels of the fine-tuning clusters.

    Labels come from the cutouts' ``label_key`` metadata, or from ``labels_csv`` (columns
    ``id`` and ``f_icl``), which must name every cluster.
    """
    refs, errors = prep_data.index_cutouts(inputs)
    if errors:
        raise prep_data.CutoutError(errors[0][1])
    if not refs:
        raise ValueError("no clusters found in the inputs")
    size = image_size or model.PAPER.image_size
    images = np.stack([prep_data.load_prepared(ref, size) for ref in refs])
    ids = [ref.id for ref in refs]
    if labels_csv:
        seen = {}
        for ref in refs:
            if ref.id in seen:
                raise ValueError(f"cluster id '{ref.id}' is both {seen[ref.id]} and {ref.source}; labels from "
                                 f"{labels_csv} are matched by id, so the ids must be unique")
            seen[ref.id] = ref.source
        labels = read_label_table(labels_csv, ids)
    else:
        labels = prep_data.read_labels(refs, label_key)
    return ids, images, labels


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="cluster cutouts (FITS, HDF5, or directories of them)")
    parser.add_argument("--label-key", default=LABEL_KEY, help=f"label column of the cutouts (default {LABEL_KEY})")
    parser.add_argument("--labels", metavar="CSV", help="labels from a CSV with columns id,f_icl instead")
    parser.add_argument("--checkpoint", default=CHECKPOINT, help="trained weights (default: the shipped checkpoints/icl_trained.weights.h5)")
    parser.add_argument("--out-dir", default=OUT_DIR, help=f"output directory (default {OUT_DIR}); rerun to resume")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--learning-rate", type=float, default=LEARNING_RATE)
    parser.add_argument("--folds", type=int, default=N_FOLDS)
    parser.add_argument("--fold-seed", type=int, default=FOLD_SEED)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--method", choices=("cached", "full"), default=METHOD,
                        help="cached (default): encode each cluster once per augmented view and train the head on "
                        "those; full: augment and run the frozen encoder at every step, as the original")
    parser.add_argument("--views", type=int, default=N_VIEWS, help=f"augmented views per cluster for --method cached (default {N_VIEWS})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--split", type=int, metavar="K", help="fine-tune and evaluate fold K only (0-based)")
    mode.add_argument("--all", action="store_true", help="fine-tune once on all clusters (no evaluation)")
    common.add_verbose_argument(parser)
    return parser


@common.interruptible(common.INTERRUPTED_TRAINING)
def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = FinetuneConfig(
            args.epochs, args.batch_size, args.learning_rate, args.folds, args.fold_seed, args.seed, args.method, args.views
        )
        out_dir = common.check_output_dir(args.out_dir)
        checkpoint_config = model.read_config(args.checkpoint) if pathlib.Path(args.checkpoint).exists() else None
        if checkpoint_config is None:
            raise model.CheckpointError(f"{args.checkpoint}: checkpoint not found; train one with train.py or pass --checkpoint")
        ids, images, labels = load_clusters(args.inputs, args.label_key, args.labels, checkpoint_config.image_size)
        with locks.folder_lock(out_dir):  # a second run into the same folder is refused, not mixed in
            if args.all:
                path = final_finetune(args.checkpoint, images, labels, config, out_dir)
                print(f"fine-tuned on all {len(ids)} clusters: {path}")
                return 0
            splits = None if args.split is None else [args.split]
            results = cross_validate(args.checkpoint, ids, images, labels, config, out_dir, splits)
            metrics = write_outputs(results, out_dir)
    except (ValueError, model.CheckpointError, prep_data.CutoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    overall = metrics["overall"]
    print(
        f"{len(results)} clusters: MAE {overall['after']['mae']:.4f} (before {overall['before']['mae']:.4f}), "
        f"Pearson r {overall['after']['pearson_r']:.3f} (before {overall['before']['pearson_r']:.3f})"
    )
    print(f"results, plots and fold checkpoints are in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
