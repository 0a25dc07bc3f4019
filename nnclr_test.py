"""Evaluate a trained NNCLR tidal-feature classifier on the test set (Desmons et al. 2023).

Loads the encoder and the classifier of a ``nnclr_train.py`` run, rebuilds its classifier
sets from the same data and seed, and applies the classifier to the test set with the
deterministic test-time view (centre crop, no noise, no flip). Outputs in ``--out``:

* ``roc.png``, ``fpr.npy``, ``tpr.npy``, ``thresholds.npy`` (sklearn ``roc_curve``) and
  ``scores.npy`` / ``labels.npy`` of the test galaxies;
* ``metrics.json``: AUC, and the completeness (true-positive rate) at 22% contamination with
  contamination read both as the false-positive rate and as 1 - precision (Desmons et al. 2023
  quote 96% completeness at 22% contamination; sources differ on the definition).

Options:

* ``--label-efficiency``: linear probes on the frozen encoder with 10, 25, 50, 100 and 300
  labelled galaxies per class (several seeds) against the same ResNet trained fully supervised
  from scratch on the same galaxies; ``label_efficiency.json`` and ``label_efficiency.png``.
* ``--similar-to ID``: rank galaxies by the cosine similarity of their representations to one
  galaxy; ``similar_to_<ID>.png`` (gallery) and ``similar_to_<ID>.json`` (ranking, fraction of
  tidal galaxies in the top k).

Example::

    python nnclr_test.py --run runs/nnclr --data mocks/tidal.h5 --out runs/nnclr/test --label-efficiency
"""

import argparse
import logging
import pathlib

import numpy as np

from nnclr_train import add_data_arguments, open_source, save_array, save_figure, save_json

# Defaults; every one can be set from the command line.
CONTAMINATION = 0.22  # contamination at which completeness is quoted (Desmons et al. 2023)
LABEL_COUNTS = (10, 25, 50, 100, 300)  # labelled galaxies per class in the label-efficiency study
LABEL_SEEDS = 3  # random draws of the labelled galaxies per count
PROBE_EPOCHS = 200  # epochs of the linear probe on fixed representations (cheap: one Dense layer)
BASELINE_EPOCHS = 50  # epochs of the supervised ResNet trained from scratch (the classifier's epochs)
BATCH_SIZE = 24  # classifier batch size
TOP_K = 16  # galaxies shown and counted in a similarity search
SIMILARITY_POOL = 2000  # galaxies ranked in a similarity search (random, always with the query)

logger = logging.getLogger("nnclr_test")


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
    """AUC, ROC arrays and completeness at the contamination, for 0/1 labels and scores."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, thresholds = roc_curve(labels, scores)
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "completeness": completeness_at_contamination(labels, scores, contamination),
        "fpr": fpr,
        "tpr": tpr,
        "thresholds": thresholds,
    }


def plot_roc(fpr, tpr, auc, contamination, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.plot(fpr, tpr, label=f"NNCLR classifier (AUC {auc:.3f})")
    axes.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="chance")
    axes.axvline(contamination, color="0.4", linestyle="--", linewidth=0.8, label=f"FPR = {contamination:g}")
    axes.set_xlabel("false-positive rate (contamination)")
    axes.set_ylabel("true-positive rate (completeness)")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.legend(loc="lower right")
    save_figure(figure, path)


def train_linear_probe(train_features, train_labels, epochs, seed, batch_size=BATCH_SIZE):
    """Dense(1, sigmoid) on fixed representations, Adam and binary cross-entropy."""
    import keras

    keras.utils.set_random_seed(seed)
    probe = keras.Sequential([keras.Input((train_features.shape[1],)), keras.layers.Dense(1, activation="sigmoid")])
    probe.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    probe.fit(train_features, train_labels.astype(np.float32), epochs=epochs, batch_size=batch_size, verbose=0)
    return probe


def train_supervised_baseline(config, train_images, train_labels, epochs, seed, batch_size=BATCH_SIZE):
    """The same encoder architecture plus Dense(1), all trained from scratch on the labels only."""
    import keras

    import nnclr_model

    keras.utils.set_random_seed(seed)
    classifier = nnclr_model.build_classifier(nnclr_model.build_encoder(config), config, fine_tune=True, seed=seed)
    classifier.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    classifier.fit(train_images, train_labels.astype(np.float32), epochs=epochs, batch_size=batch_size, verbose=0)
    return classifier


def label_efficiency(encoder, config, train_images, train_labels, test_images, test_labels, args):
    """AUC of linear probe and supervised baseline for each labels-per-class count and seed."""
    from sklearn.metrics import roc_auc_score
    from tqdm.auto import tqdm

    import nnclr_model

    train_features = nnclr_model.representations(encoder, train_images, config)
    test_features = nnclr_model.representations(encoder, test_images, config)
    available = int(min((train_labels == 0).sum(), (train_labels == 1).sum()))
    counts = sorted({min(count, available) for count in args.label_counts})
    results = []
    runs = [(count, seed) for count in counts for seed in range(args.label_seeds)]
    for count, seed in tqdm(runs, desc="label efficiency", unit="run"):
        rng = np.random.default_rng(seed)
        chosen = np.concatenate(
            [rng.choice(np.flatnonzero(train_labels == label), count, replace=False) for label in (0, 1)]
        )
        probe = train_linear_probe(train_features[chosen], train_labels[chosen], args.probe_epochs, seed)
        probe_scores = probe.predict(test_features, verbose=0)[:, 0]
        baseline = train_supervised_baseline(config, train_images[chosen], train_labels[chosen], args.baseline_epochs, seed)
        baseline_scores = baseline.predict(test_images, verbose=0)[:, 0]
        results.append(
            {
                "labels_per_class": count,
                "seed": seed,
                "nnclr_probe_auc": float(roc_auc_score(test_labels, probe_scores)),
                "supervised_auc": float(roc_auc_score(test_labels, baseline_scores)),
                "nnclr_probe_completeness": completeness_at_contamination(test_labels, probe_scores, args.contamination),
                "supervised_completeness": completeness_at_contamination(test_labels, baseline_scores, args.contamination),
            }
        )
    return results


def plot_label_efficiency(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({row["labels_per_class"] for row in results})
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for key, label in (("nnclr_probe_auc", "NNCLR linear probe"), ("supervised_auc", "supervised from scratch")):
        values = [[row[key] for row in results if row["labels_per_class"] == count] for count in counts]
        means = np.array([np.mean(v) for v in values])
        spreads = np.array([np.std(v) for v in values])
        axes.errorbar(counts, means, yerr=spreads, marker="o", capsize=3, label=label)
    axes.set_xscale("log")
    axes.set_xticks(counts, [str(count) for count in counts])
    axes.minorticks_off()
    axes.set_xlabel("labelled galaxies per class")
    axes.set_ylabel("test AUC (mean and std over seeds)")
    axes.legend(loc="lower right")
    save_figure(figure, path)


def display_rgb(image):
    """RGB (i, r, g) of a stretched 5-band cutout, each band scaled to its 99.5th percentile."""
    rgb = np.stack([image[..., 2], image[..., 1], image[..., 0]], axis=-1)
    rgb = rgb - np.percentile(rgb, 1, axis=(0, 1))
    return np.clip(rgb / np.maximum(np.percentile(rgb, 99.5, axis=(0, 1)), 1e-6), 0, 1)


def similarity_search(encoder, config, images, ids, labels, query_id, top_k):
    """Galaxies ranked by cosine similarity of their representations to the query galaxy.

    Returns
    -------
    dict
        ``query``, ``top`` (list of {id, similarity, has_tidal} for the top k, query excluded)
        and ``tidal_fraction_top_k``.
    """
    import nnclr_model
    import similarity

    matches = np.flatnonzero(ids == query_id)
    if matches.size == 0:
        raise ValueError(f"--similar-to: no galaxy with id {query_id!r} in the data")
    query = matches[0]
    features = nnclr_model.representations(encoder, images, config)
    # Exact search for catalogues up to 100,000 galaxies, an approximate index above (similarity.py).
    index = similarity.build_index(features)
    positions, similarities = index.query(features[query], k=min(top_k + 1, len(features)))
    ranked = [(int(i), float(s)) for i, s in zip(positions, similarities) if i != query][:top_k]
    order = [i for i, _ in ranked]
    return {
        "query": {"id": str(ids[query]), "has_tidal": int(labels[query])},
        "top": [
            {"id": str(ids[i]), "similarity": value, "has_tidal": int(labels[i]), "index": i}
            for i, value in ranked
        ],
        "tidal_fraction_top_k": float(np.mean([labels[i] for i in order])) if order else float("nan"),
        "query_index": int(query),
    }


def plot_gallery(images, result, path, columns=6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(result["query_index"], f"query {result['query']['id']}", result["query"]["has_tidal"])]
    panels += [(row["index"], f"{row['id']}\ncos {row['similarity']:.3f}", row["has_tidal"]) for row in result["top"]]
    rows = int(np.ceil(len(panels) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.8 * columns, 2.0 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, (index, title, tidal) in zip(axes.ravel(), panels):
        axis.imshow(display_rgb(images[index]), origin="lower")
        axis.set_title(title + ("\ntidal" if tidal else ""), fontsize=7, color="C3" if tidal else "k")
    save_figure(figure, path)


def build_parser():
    parser = argparse.ArgumentParser(
        description="Evaluate a trained NNCLR tidal-feature classifier: ROC, AUC, completeness, "
        "label efficiency and similarity search.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--run", required=True, help="output directory of nnclr_train.py")
    parser.add_argument("--out", help="output directory (default: RUN/test)")
    add_data_arguments(parser)
    parser.add_argument("--contamination", type=float, default=CONTAMINATION, help="contamination of the quoted completeness")
    parser.add_argument("--label-efficiency", action="store_true", help="run the label-efficiency study")
    parser.add_argument("--label-counts", type=int, nargs="+", default=LABEL_COUNTS, help="labelled galaxies per class")
    parser.add_argument("--label-seeds", type=int, default=LABEL_SEEDS, help="random draws of the labels per count")
    parser.add_argument("--probe-epochs", type=int, default=PROBE_EPOCHS, help="epochs of each linear probe")
    parser.add_argument("--baseline-epochs", type=int, default=BASELINE_EPOCHS, help="epochs of each supervised baseline")
    parser.add_argument("--test-all", action="store_true",
                        help="every labelled galaxy in the data is a test galaxy (independent data, e.g. a fresh mock set)")
    parser.add_argument("--similar-to", metavar="ID", help="similarity search around this galaxy id")
    parser.add_argument("--top-k", type=int, default=TOP_K, help="matches shown and counted")
    parser.add_argument("--similarity-pool", type=int, default=SIMILARITY_POOL, help="galaxies ranked (random subset)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.test_all and args.label_efficiency:
        parser.error("--label-efficiency needs the run's training split; it cannot be combined with --test-all")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import nnclr_model
    import prep_data

    run = pathlib.Path(args.run)
    out = pathlib.Path(args.out) if args.out else run / "test"
    try:
        config, extra = nnclr_model.load_config(run / "config.json")
        band_scale = np.asarray(extra["band_scale"], dtype=np.float32)
        settings = extra.get("settings", {})
        seed = int(settings.get("seed", 0))
        encoder = nnclr_model.load_encoder(run / "encoder.keras", config)
        classifier = nnclr_model.load_classifier(run / "classifier.keras", config)
        source = open_source(args)
        prep_data.check_tidal_shape(source.image_shape, config.min_image_size, config.n_bands)
        if tuple(source.image_shape) != config.input_shape:
            raise ValueError(f"the data's images are {tuple(source.image_shape)}, the run was trained on {config.input_shape}")
        if args.test_all:
            prep_data.check_tidal_labels(source.labels)
            splits = {"test": np.arange(len(source.labels))}
        else:
            splits = prep_data.tidal_source_splits(
                source, settings.get("split_sizes", prep_data.TIDAL_SPLIT_SIZES), seed=seed
            )
    except (ValueError, OSError) as error:
        parser.exit(2, f"error: {error}\n")
    saved_splits = run / "splits.json"
    if saved_splits.is_file() and not args.test_all:
        import json

        expected = json.loads(saved_splits.read_text()).get("test")
        if expected is not None and sorted(expected) != sorted(str(i) for i in source.ids[splits["test"]]):
            logger.warning("the test set differs from the one recorded in %s: is this the training data?", saved_splits)
    out.mkdir(parents=True, exist_ok=True)

    def stretched(indices):
        return prep_data.tidal_stretch(source.read_labelled(indices), band_scale)

    test_images, test_labels = stretched(splits["test"]), source.labels[splits["test"]]
    scores = classifier.predict(test_images, batch_size=BATCH_SIZE, verbose=0)[:, 0]
    result = evaluate_scores(test_labels, scores, args.contamination)
    for name in ("fpr", "tpr", "thresholds"):
        save_array(out / f"{name}.npy", result[name])
    save_array(out / "scores.npy", scores)
    save_array(out / "labels.npy", test_labels)
    plot_roc(result["fpr"], result["tpr"], result["auc"], args.contamination, out / "roc.png")
    metrics = {
        "auc": result["auc"],
        "contamination": args.contamination,
        "completeness_at_contamination_fpr": result["completeness"]["fpr"],
        "completeness_at_contamination_one_minus_precision": result["completeness"]["one_minus_precision"],
        "n_test": int(len(test_labels)),
        "n_test_tidal": int(test_labels.sum()),
        "data": source.description,
        "run": str(run),
    }
    if args.label_efficiency:
        train_images, train_labels = stretched(splits["train"]), source.labels[splits["train"]]
        rows = label_efficiency(encoder, config, train_images, train_labels, test_images, test_labels, args)
        save_json(out / "label_efficiency.json", rows)
        plot_label_efficiency(rows, out / "label_efficiency.png")
        metrics["label_efficiency"] = str(out / "label_efficiency.json")
    if args.similar_to is not None:
        rng = np.random.default_rng(seed)
        pool = np.arange(len(source.ids))
        query = np.flatnonzero(source.ids == args.similar_to)
        if query.size == 0:
            parser.exit(2, f"error: --similar-to: no galaxy with id {args.similar_to!r} in the data\n")
        if len(pool) > args.similarity_pool:
            pool = np.union1d(rng.choice(pool, args.similarity_pool - 1, replace=False), query[:1])
        pool_images = stretched(pool)
        found = similarity_search(
            encoder, config, pool_images, source.ids[pool], source.labels[pool], args.similar_to, args.top_k
        )
        safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in args.similar_to)
        plot_gallery(pool_images, found, out / f"similar_to_{safe_id}.png")
        save_json(out / f"similar_to_{safe_id}.json", {**found, "pool_size": int(len(pool))})
        metrics["similarity_tidal_fraction_top_k"] = found["tidal_fraction_top_k"]
    save_json(out / "metrics.json", metrics)
    print(
        f"test AUC {metrics['auc']:.3f}; completeness at {args.contamination:.0%} contamination: "
        f"{metrics['completeness_at_contamination_fpr']:.3f} (FPR), "
        f"{metrics['completeness_at_contamination_one_minus_precision']:.3f} (1 - precision); outputs in {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
