"""Evaluate a trained NNCLR tidal-feature classifier on the test set (Desmons et al. 2023).

Loads the encoder and the classifier of a ``nnclr_train.py`` run (``--run-dir``), rebuilds its
classifier sets from the same data (``INPUT...`` or ``--tfds-dir``) and seed, and applies the
classifier to the test set with the deterministic test-time view (centre crop, no noise, no
flip). Outputs in ``--out-dir`` (default: the run folder's ``test/``):

* ``roc.png``, ``fpr.npy``, ``tpr.npy``, ``thresholds.npy`` (sklearn ``roc_curve``) and
  ``scores.npy`` / ``labels.npy`` of the test galaxies;
* ``metrics.json``: AUC, and the completeness (true-positive rate) at 22% contamination with
  contamination read both as the false-positive rate and as 1 - precision (Desmons et al. 2023
  quote 96% completeness at 22% contamination; sources differ on the definition). When the
  data carry the mock truth (``feature_type``, ``feature_sb``), ``by_feature`` gives the AUC
  and completeness of each kind of feature and of each feature surface-brightness bin.

Options:

* ``--label-efficiency``: linear probes on the frozen encoder with 10, 25, 50, 100 and 300
  labelled galaxies per class (several seeds) against the same ResNet trained fully supervised
  from scratch on the same galaxies, and against the same linear probe on an *untrained*
  (randomly initialised) encoder of the same architecture: the control that says how much of
  the probe's score the self-supervision earned. ``label_efficiency.json`` and
  ``label_efficiency.png``.
* ``--test-data PATH``: the test set is every labelled galaxy of these (independent) files
  instead of the run's test split (50 per class, too few to tell AUCs 0.05 apart). The
  label-efficiency galaxies still come from the run's training split of the inputs.
* ``--test-all``: every labelled galaxy of the inputs is a test galaxy (independent data, such
  as a fresh mock set).
* ``--similar-to ID``: rank galaxies by the cosine similarity of their representations to one
  galaxy; ``similar_to_<ID>.png`` (gallery) and ``similar_to_<ID>.json`` (ranking, fraction of
  tidal galaxies in the top k).
* ``--dask ADDRESS`` (a scheduler, ``tcp://host:8786``) or ``--dask local:N`` (N local worker
  processes): the classifier scores of the test galaxies, and the encoder representations the
  label-efficiency study and the similarity search need, are computed on a Dask cluster in
  partitions of ``--partition-size`` galaxies, each worker loading the run's models once. The
  workers read the galaxies of HDF5 inputs themselves (every machine must see the files and the
  run folder). The outputs equal the single-process ones to float32 precision (scores within
  1e-6); the linear probes, the supervised baselines and the ROC stay in this process.

Example::

    python nnclr_test.py mocks/tidal.h5 --run-dir runs/nnclr --label-efficiency
    python nnclr_test.py mocks/tidal.h5 --run-dir runs/nnclr --test-data mocks/tidal_heldout.h5 --label-efficiency
    python nnclr_test.py mocks/tidal_heldout.h5 --run-dir runs/nnclr --test-all --out-dir runs/nnclr/heldout
    python nnclr_test.py /shared/tidal_survey.h5 --run-dir /shared/runs/nnclr --test-all --dask tcp://scheduler:8786
"""

import common

if __name__ in common.MAIN_NAMES:
    common.quiet_start()  # before TensorFlow loads: no start-up noise unless --verbose

import argparse
import json
import logging
import pathlib

import keras
import numpy as np

import nnclr_model
import parallel
import plots
import tidal_data
from nnclr_model import CONTAMINATION

# Defaults; every one can be set from the command line.
LABEL_COUNTS = (10, 25, 50, 100, 300)  # labelled galaxies per class in the label-efficiency study
LABEL_SEEDS = 3  # random draws of the labelled galaxies per count
PROBE_STRENGTHS = np.logspace(-4, 2, 13)  # inverse L2 strengths C tried by the label-efficiency probe
PROBE_FOLDS = 5  # cross-validation folds (at most) that choose C on the labelled galaxies
BASELINE_EPOCHS = 50  # epochs of the supervised ResNet trained from scratch (the classifier's epochs)
BATCH_SIZE = 24  # classifier batch size
TOP_K = 16  # galaxies shown and counted in a similarity search
SIMILARITY_POOL = 2000  # galaxies ranked in a similarity search (random, always with the query)
SB_BINS = 4  # feature surface-brightness bins (equal counts of tidal test galaxies) of the mock breakdown

#: Curves of the label-efficiency study: result key and legend.
LABEL_EFFICIENCY_CURVES = (
    ("nnclr_probe_auc", "NNCLR linear probe"),
    ("untrained_probe_auc", "linear probe, untrained encoder"),
    ("supervised_auc", "supervised from scratch"),
)

logger = logging.getLogger("nnclr_test")


def detection_by_feature(labels, scores, truth, contamination=CONTAMINATION, sb_bins=SB_BINS):
    """How well each kind of feature and each feature surface brightness is detected (mock truth).

    Every subset of tidal galaxies is scored against all the galaxies without features: its AUC,
    and its completeness at the threshold that gives ``contamination`` (as FPR) on the whole
    test set, so the completeness of the bins averages to the overall one.

    Parameters
    ----------
    labels, scores : arrays, shape (N,)
    truth : dict
        ``feature_type`` (str) and ``feature_sb`` (mag/arcsec^2, NaN when unknown) per galaxy.
    sb_bins : int
        Surface-brightness bins, with equal numbers of tidal galaxies.

    Returns
    -------
    dict
        ``threshold``, and lists ``feature_type`` and ``feature_sb`` of rows with ``n``,
        ``auc`` and ``completeness`` (SB rows also ``sb_min`` and ``sb_max``).
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    labels, scores = np.asarray(labels), np.asarray(scores)
    fpr, _, thresholds = roc_curve(labels, scores)
    threshold = float(thresholds[np.flatnonzero(fpr <= contamination + 1e-12).max()])
    negatives = labels == 0

    def row(members, **extra):
        chosen = members | negatives
        return {**extra, "n": int(members.sum()), "auc": float(roc_auc_score(labels[chosen], scores[chosen])),
                "completeness": float(np.mean(scores[members] >= threshold))}

    tidal = labels == 1
    kinds = np.asarray(truth["feature_type"]).astype(str)
    result = {"threshold": threshold, "contamination": contamination, "feature_type": [], "feature_sb": []}
    for kind in sorted(set(kinds[tidal])):
        result["feature_type"].append(row(tidal & (kinds == kind), feature_type=kind))
    sb = np.asarray(truth["feature_sb"], dtype=np.float64)
    known = tidal & np.isfinite(sb)
    if known.sum() >= sb_bins:
        edges = np.quantile(sb[known], np.linspace(0, 1, sb_bins + 1))
        for low, high in zip(edges[:-1], edges[1:]):
            members = known & (sb >= low) & ((sb < high) | (high == edges[-1]))
            if members.any():  # tied surface brightnesses can leave a bin empty
                result["feature_sb"].append(row(members, sb_min=round(float(low), 2), sb_max=round(float(high), 2)))
    return result


def plot_roc(fpr, tpr, auc, contamination, path):
    """The ROC curve of the test set, with chance and the quoted contamination marked."""
    figure, axes = plots.new_figure(figsize=(4.5, 4.5))
    axes.plot(fpr, tpr, label=f"NNCLR classifier (AUC {auc:.3f})")
    axes.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="chance")
    axes.axvline(contamination, color="0.4", linestyle="--", linewidth=0.8, label=f"FPR = {contamination:g}")
    axes.set(xlabel="false-positive rate (contamination)", ylabel="true-positive rate (completeness)",
             xlim=(0, 1), ylim=(0, 1.02))
    axes.legend(loc="lower right")
    plots.save_figure(figure, path)


def fit_linear_probe(train_features, train_labels, seed):
    """L2-regularised logistic regression on standardised representations, C chosen by cross-validation.

    With 10-50 galaxies per class and 128 weights the classes are separable and the fit's
    direction is set by its regularisation, whose strength is chosen here by stratified
    cross-validation (log loss) on the labelled galaxies themselves, never on the test set.
    It is deterministic for a seed and costs a second per fit.

    Returns
    -------
    sklearn Pipeline
        ``predict_proba(features)[:, 1]`` is the probability of tidal features.
    """
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = int(min(PROBE_FOLDS, np.bincount(np.asarray(train_labels, dtype=int)).min()))
    if folds < 2:
        raise ValueError("the linear probe needs at least 2 labelled galaxies of each class")
    search = LogisticRegressionCV(
        Cs=PROBE_STRENGTHS,
        cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
        scoring="neg_log_loss",
        l1_ratios=(0.0,),
        max_iter=5000,
        use_legacy_attributes=False,
    )
    return make_pipeline(StandardScaler(), search).fit(train_features, train_labels)


def train_supervised_baseline(config, train_images, train_labels, epochs, seed, batch_size=BATCH_SIZE):
    """The same encoder architecture plus Dense(1), all trained from scratch on the labels only."""
    keras.utils.set_random_seed(seed)
    classifier = nnclr_model.build_classifier(nnclr_model.build_encoder(config), config, fine_tune=True, seed=seed)
    classifier.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    classifier.fit(train_images, train_labels.astype(np.float32), epochs=epochs, batch_size=batch_size, verbose=0)
    return classifier


def label_efficiency(encoder, config, train_images, train_labels, test_images, test_labels, label_counts=LABEL_COUNTS,
                     label_seeds=LABEL_SEEDS, baseline_epochs=BASELINE_EPOCHS, contamination=CONTAMINATION,
                     trained_features=None):
    """AUC of the linear probe, its untrained-encoder control and the supervised baseline.

    For each labels-per-class count in ``label_counts`` (capped at the smaller class) and each
    of ``label_seeds`` seeds, the same galaxies train the probe on the trained encoder, the
    probe on an encoder of the same architecture left at its random initial weights (drawn from
    the seed) and the ResNet trained from scratch for ``baseline_epochs``.

    ``trained_features``, when given, are the trained encoder's representations of the train
    and test images, ``(train, test)``, already computed (on a Dask cluster).

    Returns
    -------
    list of dict
        One row per count and seed: ``labels_per_class``, ``seed``, and ``<model>_auc`` and
        ``<model>_completeness`` (at ``contamination``) for the models of
        :data:`LABEL_EFFICIENCY_CURVES`.
    """
    def features_of(model):
        return (nnclr_model.representations(model, train_images, config),
                nnclr_model.representations(model, test_images, config))

    def untrained_features_of(seed):
        keras.utils.set_random_seed(seed)
        return features_of(nnclr_model.build_encoder(config, name="untrained_encoder"))

    if trained_features is None:
        trained_features = features_of(encoder)
    untrained_features = {seed: untrained_features_of(seed) for seed in range(label_seeds)}
    available = int(min((train_labels == 0).sum(), (train_labels == 1).sum()))
    counts = sorted({min(count, available) for count in label_counts})
    results = []
    runs = [(count, seed) for count in counts for seed in range(label_seeds)]
    for count, seed in common.progress(runs, desc="label efficiency", unit="run"):
        rng = np.random.default_rng(seed)
        chosen = np.concatenate(
            [rng.choice(np.flatnonzero(train_labels == label), count, replace=False) for label in (0, 1)]
        )
        scores = {}
        for key, (train_features, test_features) in (("nnclr_probe", trained_features),
                                                     ("untrained_probe", untrained_features[seed])):
            probe = fit_linear_probe(train_features[chosen], train_labels[chosen], seed)
            scores[key] = probe.predict_proba(test_features)[:, 1]
        baseline = train_supervised_baseline(config, train_images[chosen], train_labels[chosen], baseline_epochs, seed)
        scores["supervised"] = baseline.predict(test_images, verbose=0)[:, 0]
        row = {"labels_per_class": count, "seed": seed}
        for key, values in scores.items():
            result = nnclr_model.evaluate_scores(test_labels, values, contamination)
            row[f"{key}_auc"] = result["auc"]
            row[f"{key}_completeness"] = result["completeness"]
        results.append(row)
    return results


def summarise_label_efficiency(results):
    """Mean and standard deviation over seeds of each AUC, per labels-per-class count."""
    summary = []
    for count in sorted({row["labels_per_class"] for row in results}):
        rows = [row for row in results if row["labels_per_class"] == count]
        entry = {"labels_per_class": count, "seeds": len(rows)}
        for key, _ in LABEL_EFFICIENCY_CURVES:
            values = [row[key] for row in rows]
            entry[key] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
        summary.append(entry)
    return summary


def plot_label_efficiency(results, path):
    """Test AUC of each model against the labelled galaxies per class (mean and std over seeds)."""
    summary = summarise_label_efficiency(results)
    counts = [entry["labels_per_class"] for entry in summary]
    figure, axes = plots.new_figure(figsize=(5, 3.5))
    for key, label in LABEL_EFFICIENCY_CURVES:
        means = np.array([entry[key]["mean"] for entry in summary])
        spreads = np.array([entry[key]["std"] for entry in summary])
        axes.errorbar(counts, means, yerr=spreads, marker="o", capsize=3, label=label)
    axes.axhline(0.5, color="0.6", linestyle=":", linewidth=0.8)
    axes.set_xscale("log")
    axes.set_xticks(counts, [str(count) for count in counts])
    axes.minorticks_off()
    axes.set(xlabel="labelled galaxies per class", ylabel="test AUC (mean and std over seeds)")
    axes.legend(loc="lower right")
    plots.save_figure(figure, path)


def similarity_pool(ids, query_id, size, seed):
    """Positions of the galaxies a similarity search ranks: all, or ``size`` drawn at random with the query.

    Returns None when no galaxy has the id ``query_id``.
    """
    query = np.flatnonzero(ids == query_id)
    if query.size == 0:
        return None
    pool = np.arange(len(ids))
    if len(pool) > size:
        pool = np.union1d(np.random.default_rng(seed).choice(pool, size - 1, replace=False), query[:1])
    return pool


def compute_on_cluster(address, run_dir, test_source, test_rows, source, train_rows=None, pool=None,
                     partition_size=parallel.PARTITION_SIZE, quiet=True):
    """What the evaluation computes with the run's models, computed on the Dask cluster ``address``.

    Returns
    -------
    dict
        ``scores`` of the test galaxies; with ``train_rows`` (the label-efficiency study) the
        representations ``test_features`` and ``train_features``; with ``pool`` (the similarity
        search) ``pool_features``. Each in the order of its galaxies.
    """
    computed = {}
    with parallel.dask_client(address, quiet=quiet) as client:
        def score(data, rows, outputs):
            return nnclr_model.score_on_cluster(client, data, rows, run_dir, outputs, partition_size, BATCH_SIZE)

        test = score(test_source, test_rows, ("scores", "representations") if train_rows is not None else ("scores",))
        computed["scores"] = test["scores"]
        if train_rows is not None:
            computed["test_features"] = test["representations"]
            computed["train_features"] = score(source, train_rows, ("representations",))["representations"]
        if pool is not None:
            computed["pool_features"] = score(source, pool, ("representations",))["representations"]
    return computed


def build_parser():
    parser = argparse.ArgumentParser(
        description="Evaluate a trained NNCLR tidal-feature classifier: ROC, AUC, completeness, "
        "label efficiency and similarity search.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    nnclr_model.add_source_arguments(parser)
    parser.add_argument("--run-dir", required=True, metavar="DIR", help="run folder of nnclr_train.py")
    parser.add_argument("--out-dir", metavar="DIR", help="output folder (default: RUN_DIR/test)")
    parser.add_argument("--contamination", type=float, default=CONTAMINATION, help="contamination of the quoted completeness")
    parser.add_argument("--label-efficiency", action="store_true", help="run the label-efficiency study")
    parser.add_argument("--label-counts", type=int, nargs="+", default=LABEL_COUNTS, help="labelled galaxies per class")
    parser.add_argument("--label-seeds", type=int, default=LABEL_SEEDS, help="random draws of the labels per count")
    parser.add_argument("--baseline-epochs", type=int, default=BASELINE_EPOCHS, help="epochs of each supervised baseline")
    parser.add_argument("--test-data", nargs="+", metavar="PATH",
                        help="independent tidal HDF5 files: every labelled galaxy in them is the test set")
    parser.add_argument("--test-all", action="store_true",
                        help="every labelled galaxy of the inputs is a test galaxy (independent data, e.g. a fresh mock set)")
    parser.add_argument("--similar-to", metavar="ID", help="similarity search around this galaxy id")
    parser.add_argument("--top-k", type=int, default=TOP_K, help="matches shown and counted")
    parser.add_argument("--similarity-pool", type=int, default=SIMILARITY_POOL, help="galaxies ranked (random subset)")
    parallel.add_dask_argument(parser)
    common.add_verbose_argument(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.test_all and args.label_efficiency:
        parser.error("--label-efficiency needs the run's training split; it cannot be combined with --test-all")
    if args.label_efficiency and (min(args.label_counts) < 2 or args.label_seeds < 1):
        parser.error("--label-counts must all be >= 2 (the probe cross-validates on them) and --label-seeds >= 1")
    if args.test_all and args.test_data:
        parser.error("--test-all makes the inputs the test set; it cannot be combined with --test-data")
    parallel.check_dask_arguments(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_dir = pathlib.Path(args.run_dir)
    out_dir = pathlib.Path(args.out_dir) if args.out_dir else run_dir / "test"
    try:
        common.check_output_dir(out_dir)
        config, extra = nnclr_model.load_config(run_dir / "config.json")
        band_scale = np.asarray(extra["band_scale"], dtype=np.float32)
        settings = extra.get("settings", {})
        seed = int(settings.get("seed", 0))
        encoder = nnclr_model.load_encoder(run_dir / "encoder.keras", config)
        classifier = nnclr_model.load_classifier(run_dir / "classifier.keras", config)
        source = nnclr_model.open_tidal_source(args.inputs, args.tfds_dir, args.tfds_unlabelled, args.tfds_labelled)
        test_source = tidal_data.tidal_source_from_hdf5(args.test_data) if args.test_data else source
        for data in (source,) if test_source is source else (source, test_source):
            tidal_data.check_tidal_shape(data.image_shape, config.min_image_size, config.n_bands)
            if tuple(data.image_shape) != config.input_shape:
                raise ValueError(
                    f"{data.description}: images are {tuple(data.image_shape)}, the run was trained on {config.input_shape}"
                )
        if args.test_data:
            tidal_data.check_tidal_labels(test_source.labels)
        if args.test_all:
            tidal_data.check_tidal_labels(source.labels)
            splits = {"test": np.arange(len(source.labels))}
        else:
            splits = tidal_data.tidal_source_splits(
                source, settings.get("split_sizes", tidal_data.TIDAL_SPLIT_SIZES), seed=seed
            )
            if args.test_data:
                shared = np.intersect1d(test_source.ids, source.ids[np.concatenate([splits["train"], splits["validation"]])])
                if shared.size:
                    raise ValueError(
                        f"--test-data shares {shared.size} galaxies (e.g. {shared[0]}) with the run's training and "
                        "validation sets: test on galaxies the classifier has not seen"
                    )
    except (ValueError, OSError) as error:
        parser.exit(2, f"error: {error}\n")
    saved_splits = run_dir / "splits.json"
    if saved_splits.is_file() and not args.test_all:
        expected = json.loads(saved_splits.read_text()).get("test")
        if expected is not None and sorted(expected) != sorted(str(i) for i in source.ids[splits["test"]]):
            logger.warning("the test set differs from the one recorded in %s: is this the training data?", saved_splits)
    out_dir.mkdir(parents=True, exist_ok=True)

    def stretched(indices, data=source):
        return tidal_data.tidal_stretch(data.read_labelled(indices), band_scale)

    test_rows = np.arange(len(test_source.labels)) if args.test_data else splits["test"]
    test_labels = test_source.labels[test_rows]
    pool = None
    if args.similar_to is not None:
        pool = similarity_pool(source.ids, args.similar_to, args.similarity_pool, seed)
        if pool is None:
            parser.exit(2, f"error: --similar-to: no galaxy with id {args.similar_to!r} in the data\n")
    computed = {}
    if args.dask:
        try:
            computed = compute_on_cluster(args.dask, run_dir, test_source, test_rows, source,
                                          splits["train"] if args.label_efficiency else None, pool, args.partition_size,
                                          quiet=not args.verbose)
        except (ValueError, OSError) as error:  # a scheduler that cannot be reached, files the workers cannot read
            parser.exit(2, f"error: {error}\n")
    # Without a cluster every test image is needed here; with one, only the label-efficiency study's.
    test_images = stretched(test_rows, test_source) if not computed or args.label_efficiency else None
    if "scores" in computed:
        scores = computed["scores"]
    else:
        scores = classifier.predict(test_images, batch_size=BATCH_SIZE, verbose=0)[:, 0]
    result = nnclr_model.evaluate_scores(test_labels, scores, args.contamination)
    arrays = {"fpr": result["fpr"], "tpr": result["tpr"], "thresholds": result["thresholds"], "scores": scores,
              "labels": test_labels}
    for name, values in arrays.items():
        common.save_array(out_dir / f"{name}.npy", values)
    plot_roc(result["fpr"], result["tpr"], result["auc"], args.contamination, out_dir / "roc.png")
    metrics = {
        "auc": result["auc"],
        "contamination": args.contamination,
        "completeness_at_contamination_fpr": result["completeness"]["fpr"],
        "completeness_at_contamination_one_minus_precision": result["completeness"]["one_minus_precision"],
        "n_test": int(len(test_labels)),
        "n_test_tidal": int(test_labels.sum()),
        "data": test_source.description,
        "run": str(run_dir),
    }
    if test_source.truth is not None:
        truth = {key: np.asarray(values)[test_rows] for key, values in test_source.truth.items()}
        metrics["by_feature"] = detection_by_feature(test_labels, scores, truth, args.contamination)
        for entry in metrics["by_feature"]["feature_type"] + metrics["by_feature"]["feature_sb"]:
            name = entry.get("feature_type") or f"SB {entry['sb_min']:.2f}-{entry['sb_max']:.2f}"
            print(f"{name:>17}: {entry['n']:4d} tidal, AUC {entry['auc']:.3f}, completeness {entry['completeness']:.2f}")
    if args.label_efficiency:
        train_images, train_labels = stretched(splits["train"]), source.labels[splits["train"]]
        trained_features = (computed["train_features"], computed["test_features"]) if computed else None
        rows = label_efficiency(encoder, config, train_images, train_labels, test_images, test_labels, args.label_counts,
                                args.label_seeds, args.baseline_epochs, args.contamination, trained_features)
        common.write_json(out_dir / "label_efficiency.json", rows)
        plot_label_efficiency(rows, out_dir / "label_efficiency.png")
        metrics["label_efficiency"] = str(out_dir / "label_efficiency.json")
        metrics["label_efficiency_summary"] = summarise_label_efficiency(rows)
        for entry in metrics["label_efficiency_summary"]:
            print(f"{entry['labels_per_class']:>4} labels per class, AUC over {entry['seeds']} seeds: " + ", ".join(
                f"{label} {entry[key]['mean']:.3f} +- {entry[key]['std']:.3f}" for key, label in LABEL_EFFICIENCY_CURVES
            ))
    if args.similar_to is not None:
        pool_images = None if computed else stretched(pool)
        found = nnclr_model.similarity_search(
            encoder, config, pool_images, source.ids[pool], source.labels[pool], args.similar_to, args.top_k,
            computed.get("pool_features"),
        )
        if pool_images is None:  # the gallery needs only the galaxies it shows
            shown = [found["query_index"]] + [row["index"] for row in found["top"]]
            pool_images = dict(zip(shown, stretched(pool[shown])))
        safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in args.similar_to)
        plots.plot_gallery(pool_images, found, out_dir / f"similar_to_{safe_id}.png")
        common.write_json(out_dir / f"similar_to_{safe_id}.json", {**found, "pool_size": int(len(pool))})
        metrics["similarity_tidal_fraction_top_k"] = found["tidal_fraction_top_k"]
    common.write_json(out_dir / "metrics.json", metrics)
    print(
        f"test AUC {metrics['auc']:.3f}; completeness at {args.contamination:.0%} contamination: "
        f"{metrics['completeness_at_contamination_fpr']:.3f} (FPR), "
        f"{metrics['completeness_at_contamination_one_minus_precision']:.3f} (1 - precision); outputs in {out_dir}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
