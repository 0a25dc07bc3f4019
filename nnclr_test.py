"""Evaluate a trained NNCLR tidal-feature classifier on the test set (Desmons et al. 2023).

Loads the encoder and the classifier of a ``nnclr_train.py`` run (``--run-dir``), rebuilds its
classifier sets from the same data (``INPUT...`` or ``--tfds-dir``) and seed, and applies the
classifier to the test set with the deterministic test-time view (centre crop, no noise, no
flip). Outputs in ``--out-dir`` (default: the run folder's ``test/``):

* ``roc.png`` (the classifier's ROC curve and its baselines'), ``fpr.npy``, ``tpr.npy``,
  ``thresholds.npy`` (sklearn ``roc_curve``), ``scores.npy`` / ``labels.npy`` of the test
  galaxies and ``baseline_<name>.npy``, the baselines' scores of the same galaxies;
* ``metrics.json``: AUC, and the completeness (true-positive rate) at 22% contamination with
  contamination read both as the false-positive rate and as 1 - precision (Desmons et al. 2023
  quote 96% completeness at 22% contamination; sources differ on the definition), each next
  to the same numbers of classical baselines on the same galaxies (``baselines``,
  :mod:`tidal_baselines`): ``host_flux``, the i-band light of the host's core, which sees
  only the host (what the detector would score if it had only learnt "bright host");
  ``rotation_residual``, the asymmetric faint light left after subtracting the image rotated
  about the host; and, when the run has a training split, ``boosting``, gradient-boosted trees
  on a dozen residual features trained on the classifier's training galaxies. When the data
  carry the mock truth (``feature_type``, ``feature_sb``, ``visible``), ``by_feature`` gives
  the AUC and completeness of the classifier and of the baselines for each kind of feature,
  each feature surface-brightness bin and visible / not visible features.

Host-matched pairs: a test file whose galaxies carry ``pair_id`` (``--test-data`` or
``--test-all``) holds each scene twice, with and without its tidal feature (same host,
neighbours, PSF and noise). Its pairs are checked (:func:`tidal_data.check_pairs`) and the
test galaxies are evaluated as pairs: any host-only statistic scores AUC 0.5 by
construction (a warning says so when the host flux departs from 0.5 by more than 0.05), the
negatives of every ``by_feature`` bin are the twins of its positives, and ``pair_win_rate``
is the fraction of pairs in which the twin with the feature scores higher. With a
``visible`` column, ``auc_all`` and ``auc_visible`` (visible features, and their twins or
all galaxies without features) are both given; ``--visible-only`` makes the latter the
headline (``auc``, the completeness, the ROC curve; ``headline.npy`` marks its galaxies).

Options:

* ``--label-efficiency``: with 10, 25, 50, 100 and 300 labelled galaxies per class (5 draws
  each), four classifiers on the same galaxies: the original's classifier (the NNCLR encoder
  plus Dense(1), every layer fine-tuned), the same ResNet trained fully supervised from
  scratch, a linear probe on the frozen encoder, and the same probe on an *untrained*
  (randomly initialised) encoder of the same architecture: the control that says how much of
  the probe's score the self-supervision earned. The fine-tuned and the from-scratch ResNets
  are trained alike, to convergence: at least ``--baseline-min-steps`` (3000) optimizer
  steps, then early stopping on the AUC of the run's validation galaxies (best weights
  restored), at most ``--baseline-max-steps`` (6000); ``--baseline-epochs N`` trains a fixed
  N epochs instead (quick checks). ``label_efficiency.json`` and ``label_efficiency.png``.
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
  1e-6); the linear probes, the supervised baselines, the classical baselines (which read the
  test galaxies a chunk at a time) and the ROC stay in this process.

Example::

    python nnclr_test.py mocks/tidal.h5 --run-dir runs/nnclr --label-efficiency
    python nnclr_test.py mocks/tidal.h5 --run-dir runs/nnclr --test-data mocks/tidal_heldout.h5 --label-efficiency
    python nnclr_test.py mocks/tidal_heldout.h5 --run-dir runs/nnclr --test-all --out-dir runs/nnclr/heldout
    python nnclr_test.py mocks/tidal.h5 --run-dir runs/nnclr --test-data mocks/tidal_pairs.h5 --visible-only
    python nnclr_test.py /shared/tidal_survey.h5 --run-dir /shared/runs/nnclr --test-all --dask tcp://scheduler:8786
"""

import common

if __name__ in common.MAIN_NAMES:
    common.quiet_start()  # before TensorFlow loads: no start-up noise unless --verbose

import argparse
import contextlib
import json
import logging
import pathlib

import keras
import numpy as np

import locks
import nnclr_model
import parallel
import plots
import tidal_baselines
import tidal_data
from nnclr_model import CONTAMINATION

# Defaults; every one can be set from the command line.
LABEL_COUNTS = (10, 25, 50, 100, 300)  # labelled galaxies per class in the label-efficiency study
LABEL_SEEDS = 5  # random draws of the labelled galaxies per count
PROBE_STRENGTHS = np.logspace(-4, 2, 13)  # inverse L2 strengths C tried by the label-efficiency probe
PROBE_FOLDS = 5  # cross-validation folds (at most) that choose C on the labelled galaxies
BASELINE_MIN_STEPS = 3000  # optimizer steps the supervised ResNet trained from scratch takes at least
BASELINE_MAX_STEPS = 6000  # ... and at most
BASELINE_CHECKS = 15  # validation AUC checks within the first BASELINE_MIN_STEPS (every 200 steps by default)
BASELINE_HOLDOUT = 0.25  # share of a draw's labelled galaxies held out for early stopping when no validation set is given
BATCH_SIZE = 24  # classifier batch size
TOP_K = 16  # galaxies shown and counted in a similarity search
SIMILARITY_POOL = 2000  # galaxies ranked in a similarity search (random, always with the query)
SB_BINS = 4  # feature surface-brightness bins (equal counts of tidal test galaxies) of the mock breakdown
HOST_MATCH_TOLERANCE = 0.05  # on host-matched pairs, a host-only AUC further than this from 0.5 is warned about
BASELINE_CHUNK = 256  # test galaxies read at a time for the classical baselines

#: Curves of the label-efficiency study: result key and legend.
LABEL_EFFICIENCY_CURVES = (
    ("nnclr_probe_auc", "NNCLR linear probe"),
    ("untrained_probe_auc", "linear probe, untrained encoder"),
    ("nnclr_finetuned_auc", "NNCLR fine-tuned (the original's classifier)"),
    ("supervised_auc", "supervised from scratch"),
)

logger = logging.getLogger("nnclr_test")


def pair_win_rate(scores, twins, labels):
    """Fraction of host-matched pairs in which the twin with the feature scores higher (ties count half).

    Sensitive to any light the feature adds, however little: a statistic that the feature
    changes at all (even by its faint light in the host's core) wins nearly every pair.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    tidal = np.flatnonzero(labels == 1)
    if tidal.size == 0:
        return None
    with_feature, without = scores[tidal], scores[np.asarray(twins)[tidal]]
    return float(np.mean((with_feature > without) + 0.5 * (with_feature == without)))


def score_summary(labels, scores, contamination=CONTAMINATION, twins=None):
    """AUC and completeness at ``contamination`` (as FPR and as 1 - precision) of one scorer;
    with ``twins`` (host-matched pairs) also its :func:`pair_win_rate`."""
    result = nnclr_model.evaluate_scores(labels, scores, contamination)
    summary = {
        "auc": result["auc"],
        "completeness_at_contamination_fpr": result["completeness"]["fpr"],
        "completeness_at_contamination_one_minus_precision": result["completeness"]["one_minus_precision"],
    }
    if twins is not None:
        summary["pair_win_rate"] = pair_win_rate(scores, twins, labels)
    return summary


def _threshold_at(labels, scores, contamination):
    """The score threshold whose false-positive rate is the largest at most ``contamination``."""
    from sklearn.metrics import roc_curve

    fpr, _, thresholds = roc_curve(labels, scores)
    return float(thresholds[np.flatnonzero(fpr <= contamination + 1e-12).max()])


def detection_by_feature(labels, scores, truth, contamination=CONTAMINATION, sb_bins=SB_BINS, baselines=None,
                         twins=None):
    """How well each kind of feature, each feature surface brightness and each visibility is detected.

    Every subset of tidal galaxies is scored against galaxies without features: all of them,
    or with ``twins`` (host-matched pairs) only the twins of the subset's galaxies, so that a
    host-only statistic stays at AUC 0.5 in every bin. Each bin gives the AUC, and the
    completeness at the threshold that gives ``contamination`` (as FPR) on the whole test
    set, so the completeness of the bins averages to the overall one; for the classifier and
    for each of ``baselines``.

    Parameters
    ----------
    labels, scores : arrays, shape (N,)
        Labels and classifier scores of the test galaxies.
    truth : dict
        ``feature_type`` (str) and ``feature_sb`` (mag/arcsec^2, NaN when unknown) per galaxy,
        and optionally ``visible`` (1, 0, or -1 when unknown).
    sb_bins : int
        Surface-brightness bins, with equal numbers of tidal galaxies.
    baselines : dict of str -> array, optional
        Scores of other statistics on the same galaxies (``host_flux``, ``rotation_residual``).
    twins : array of int, optional
        Position of each galaxy's twin (:func:`tidal_data.check_pairs`).

    Returns
    -------
    dict
        ``threshold`` (the classifier's), ``contamination``, ``paired``, and lists
        ``feature_type``, ``feature_sb`` and ``visibility`` of rows with ``n`` (tidal galaxies),
        ``auc``, ``completeness`` and ``baselines`` (``{name: {auc, completeness}}``); SB rows
        also have ``sb_min`` and ``sb_max``, visibility rows ``visible`` (bool).
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    scorers = {"classifier": scores, **{name: np.asarray(values, dtype=np.float64)
                                        for name, values in (baselines or {}).items()}}
    thresholds = {name: _threshold_at(labels, values, contamination) for name, values in scorers.items()}
    negatives = labels == 0
    tidal = labels == 1

    def row(members, **extra):
        from sklearn.metrics import roc_auc_score

        if twins is not None:
            chosen = members.copy()
            chosen[np.asarray(twins)[members]] = True
        else:
            chosen = members | negatives
        measured = {name: {"auc": float(roc_auc_score(labels[chosen], values[chosen])),
                           "completeness": float(np.mean(values[members] >= thresholds[name]))}
                    for name, values in scorers.items()}
        classifier = measured.pop("classifier")
        return {**extra, "n": int(members.sum()), **classifier, "baselines": measured}

    kinds = np.asarray(truth["feature_type"]).astype(str)
    result = {"threshold": thresholds["classifier"], "contamination": contamination, "paired": twins is not None,
              "feature_type": [], "feature_sb": [], "visibility": []}
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
    if "visible" in truth:
        visible = np.asarray(truth["visible"])
        for flag in (1, 0):
            members = tidal & (visible == flag)
            if members.any():
                result["visibility"].append(row(members, visible=bool(flag)))
    return result


def bin_name(entry):
    """How a row of :func:`detection_by_feature` is named in the printed breakdown."""
    if "feature_type" in entry:
        return entry["feature_type"]
    if "visible" in entry:
        return "visible" if entry["visible"] else "not visible"
    return f"SB {entry['sb_min']:.2f}-{entry['sb_max']:.2f}"


def baseline_text(baselines, key="auc"):
    """``host flux alone 0.503, rotation residual 0.781``: the baselines' values of ``key``."""
    return ", ".join(f"{tidal_baselines.BASELINE_NAMES.get(name, name)} {values[key]:.3f}"
                     for name, values in baselines.items())


def plot_roc(curves, contamination, path):
    """ROC curves on the test set (the classifier's first, then the baselines'), with chance and
    the quoted contamination marked.

    ``curves`` is a list of ``(label, fpr, tpr, auc)``.
    """
    figure, axes = plots.new_figure(figsize=(4.8, 4.8))
    for position, (label, fpr, tpr, auc) in enumerate(curves):
        axes.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})", linewidth=1.6 if position == 0 else 1.0,
                  linestyle="-" if position == 0 else "-.")
    axes.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="chance")
    axes.axvline(contamination, color="0.4", linestyle="--", linewidth=0.8, label=f"FPR = {contamination:g}")
    axes.set(xlabel="false-positive rate (contamination)", ylabel="true-positive rate (completeness)",
             xlim=(0, 1), ylim=(0, 1.02))
    axes.legend(loc="lower right", fontsize="small")
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


def _holdout(labels, fraction, seed):
    """Stratified split of positions into (train, held out), at least one of each class on each side."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for label in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == label))
        if members.size < 2:
            raise ValueError("the supervised baseline needs at least 2 labelled galaxies of each class")
        count = int(np.clip(round(fraction * members.size), 1, members.size - 1))
        held.append(members[:count])
        train.append(members[count:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def train_supervised_baseline(config, train_images, train_labels, seed, validation=None, min_steps=BASELINE_MIN_STEPS,
                              max_steps=BASELINE_MAX_STEPS, epochs=None, batch_size=BATCH_SIZE, initial_encoder=None):
    """The same encoder architecture plus Dense(1), all trained from scratch on the labels only.

    With ``initial_encoder`` (a trained encoder) the classifier starts from a copy of its
    weights instead (the encoder given is left untouched) and still trains every layer: the
    original's classifier, fine-tuned under the same schedule as the baseline.

    Trained to convergence: at least ``min_steps`` optimizer steps (batches of ``batch_size``
    drawn from the reshuffled labelled galaxies), at most ``max_steps``, checking the AUC on
    ``validation`` every ``min_steps / BASELINE_CHECKS`` steps (at least 1). After
    ``min_steps``, training stops once the validation AUC has not improved for a third of
    ``min_steps``; the weights of the best check are restored. ``validation`` is
    ``(images, labels)`` (the run's validation galaxies); without it a stratified
    :data:`BASELINE_HOLDOUT` of the labelled galaxies is held out (and not trained on).
    ``epochs`` (a fixed schedule instead: that many passes over the labelled galaxies, no
    early stopping) is for quick checks. Deterministic for a seed.

    Returns
    -------
    classifier : keras.Model
    record : dict
        ``steps`` trained, ``best_step`` and ``validation_auc`` (None with ``epochs``).
    """
    from sklearn.metrics import roc_auc_score

    keras.utils.set_random_seed(seed)
    train_labels = np.asarray(train_labels)
    encoder = nnclr_model.build_encoder(config)
    if initial_encoder is not None:
        encoder.set_weights(initial_encoder.get_weights())
    classifier = nnclr_model.build_classifier(encoder, config, fine_tune=True, seed=seed)
    classifier.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    if epochs is not None:
        classifier.fit(train_images, train_labels.astype(np.float32), epochs=epochs, batch_size=batch_size, verbose=0,
                       shuffle=True)
        steps = int(epochs * np.ceil(len(train_labels) / batch_size))
        return classifier, {"steps": steps, "best_step": steps, "validation_auc": None}
    if min_steps < 1 or max_steps < min_steps:
        raise ValueError(f"the baseline needs 1 <= min_steps <= max_steps, got {min_steps} and {max_steps}")
    if validation is None:
        kept, held = _holdout(train_labels, BASELINE_HOLDOUT, seed)
        validation = (train_images[held], train_labels[held])
        train_images, train_labels = train_images[kept], train_labels[kept]
    validation_images, validation_labels = validation
    every = max(1, min_steps // BASELINE_CHECKS)
    patience = max(every, min_steps // 3)
    dataset = _reshuffled_batches(np.asarray(train_images, np.float32), train_labels.astype(np.float32), batch_size, seed)

    class Convergence(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best = (-np.inf, 0, None)  # AUC, step, weights

        def on_epoch_end(self, epoch, logs=None):
            step = (epoch + 1) * every
            scores = self.model.predict(validation_images, batch_size=batch_size, verbose=0)[:, 0]
            auc = float(roc_auc_score(validation_labels, scores))
            if auc > self.best[0]:
                self.best = (auc, step, self.model.get_weights())
            if step >= max_steps or (step >= min_steps and step - self.best[1] >= patience):
                self.model.stop_training = True
            self.steps = step

    convergence = Convergence()
    classifier.fit(dataset, steps_per_epoch=every, epochs=-(-max_steps // every), verbose=0, shuffle=False,
                   callbacks=[convergence])
    auc, best_step, weights = convergence.best
    classifier.set_weights(weights)
    return classifier, {"steps": int(convergence.steps), "best_step": int(best_step), "validation_auc": auc}


def _reshuffled_batches(images, labels, batch_size, seed):
    """Endless batches of the galaxies, reshuffled at every pass (a whole-set shuffle, then batches
    that run on across passes): ``tf.data`` on TensorFlow, a NumPy generator on other backends."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return (tf.data.Dataset.from_tensor_slices((images, labels))
                .shuffle(len(labels), seed=seed, reshuffle_each_iteration=True).repeat().batch(batch_size))

    def batches():
        rng = np.random.default_rng(seed)
        order = np.empty(0, dtype=np.int64)
        while True:
            while len(order) < batch_size:
                order = np.concatenate([order, rng.permutation(len(labels))])
            chosen, order = order[:batch_size], order[batch_size:]
            yield images[chosen], labels[chosen]

    return batches()


def label_efficiency(encoder, config, train_images, train_labels, test_images, test_labels, label_counts=LABEL_COUNTS,
                     label_seeds=LABEL_SEEDS, contamination=CONTAMINATION, trained_features=None, validation=None,
                     baseline_min_steps=BASELINE_MIN_STEPS, baseline_max_steps=BASELINE_MAX_STEPS, baseline_epochs=None):
    """AUC of the fine-tuned NNCLR classifier, the supervised baseline, the linear probe and its
    untrained-encoder control.

    For each labels-per-class count in ``label_counts`` (capped at the smaller class) and each
    of ``label_seeds`` seeds, the same galaxies train the probe on the trained encoder, the
    probe on an encoder of the same architecture left at its random initial weights (drawn from
    the seed), the classifier started from the trained encoder with every layer fine-tuned (the
    original's classifier) and the ResNet trained from scratch; the last two alike
    (:func:`train_supervised_baseline`, to convergence on ``validation`` between
    ``baseline_min_steps`` and ``baseline_max_steps`` steps, or for ``baseline_epochs`` epochs
    when given). Each draw's AUCs are logged as it finishes.

    ``trained_features``, when given, are the trained encoder's representations of the train
    and test images, ``(train, test)``, already computed (on a Dask cluster).

    Returns
    -------
    list of dict
        One row per count and seed: ``labels_per_class``, ``seed``, ``<model>_auc`` and
        ``<model>_completeness`` (at ``contamination``) for the models of
        :data:`LABEL_EFFICIENCY_CURVES`, and for ``nnclr_finetuned`` and ``supervised`` the
        ``<model>_steps``, ``<model>_best_step`` and ``<model>_validation_auc`` of their training.
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
        records = {}
        for key, start in (("nnclr_finetuned", encoder), ("supervised", None)):
            classifier, records[key] = train_supervised_baseline(
                config, train_images[chosen], train_labels[chosen], seed, validation, baseline_min_steps,
                baseline_max_steps, baseline_epochs, initial_encoder=start)
            scores[key] = classifier.predict(test_images, verbose=0)[:, 0]
        row = {"labels_per_class": count, "seed": seed}
        for key, values in scores.items():
            result = nnclr_model.evaluate_scores(test_labels, values, contamination)
            row[f"{key}_auc"] = result["auc"]
            row[f"{key}_completeness"] = result["completeness"]
        for key, record in records.items():
            row.update({f"{key}_{name}": value for name, value in record.items()})
        logger.info("%d labels per class, draw %d: %s", count, seed,
                    ", ".join(f"{label} {row[key]:.3f}" for key, label in LABEL_EFFICIENCY_CURVES))
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
    parser.add_argument("--baseline-min-steps", type=int, default=BASELINE_MIN_STEPS,
                        help="optimizer steps each supervised baseline takes at least (then early stopping on validation AUC)")
    parser.add_argument("--baseline-max-steps", type=int, default=BASELINE_MAX_STEPS,
                        help="optimizer steps each supervised baseline takes at most")
    parser.add_argument("--baseline-epochs", type=int, metavar="N",
                        help="a fixed schedule of N epochs for the supervised baselines instead of training to convergence "
                        "(quick checks)")
    parser.add_argument("--test-data", nargs="+", metavar="PATH",
                        help="independent tidal HDF5 files: every labelled galaxy in them is the test set")
    parser.add_argument("--test-all", action="store_true",
                        help="every labelled galaxy of the inputs is a test galaxy (independent data, e.g. a fresh mock set)")
    parser.add_argument("--visible-only", action="store_true",
                        help="headline metric on the visible features only (and, on host-matched pairs, their twins); "
                        "needs the 'visible' column")
    parser.add_argument("--test-view", choices=("centre", "original"), default="centre",
                        help="the classifier's view of the test galaxies: the deterministic centre crop (default), or "
                        "the original code's test-time view (the training noise and a random crop, seeded by the run)")
    parser.add_argument("--similar-to", metavar="ID", help="similarity search around this galaxy id")
    parser.add_argument("--top-k", type=int, default=TOP_K, help="matches shown and counted")
    parser.add_argument("--similarity-pool", type=int, default=SIMILARITY_POOL, help="galaxies ranked (random subset)")
    parallel.add_dask_argument(parser)
    common.add_verbose_argument(parser)
    return parser


def select_headline(labels, truth, twins, visible_only):
    """The test galaxies of the metrics: ``{"all": mask}``, plus ``"visible"`` when visibility is known.

    The visible set is the tidal galaxies whose feature is visible, with (on host-matched pairs)
    their twins or (otherwise) every galaxy without a feature. Returns the masks and the name
    of the headline one (``visible`` with ``visible_only``).

    Raises
    ------
    ValueError
        ``visible_only`` without visibility, or without a visible feature.
    """
    labels = np.asarray(labels)
    selections = {"all": np.ones(len(labels), bool)}
    visible = np.asarray(truth["visible"]) if truth is not None and "visible" in truth else None
    if visible is not None and (visible[labels == 1] != tidal_data.VISIBLE_UNKNOWN).any():
        members = (labels == 1) & (visible == 1)
        if members.any():
            chosen = members.copy()
            if twins is not None:
                chosen[twins[members]] = True
            else:
                chosen |= labels == 0
            selections["visible"] = chosen
    if visible_only and "visible" not in selections:
        reason = ("no tidal test galaxy has a visible feature" if visible is not None
                  and (visible[labels == 1] != tidal_data.VISIBLE_UNKNOWN).any()
                  else "the test galaxies have no 'visible' column")
        raise ValueError(f"--visible-only: {reason}")
    return selections, "visible" if visible_only else "all"


@common.interruptible("interrupted: metrics.json was not written (it is the last output); rerun the same "
                      "command")
@common.data_errors_are_one_line(tidal_data.UnusableImageError)
def main(argv=None):
    with contextlib.ExitStack() as held:  # the output folder's lock, for the whole run
        return _main(argv, held)


def _main(argv, held):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.test_all and args.label_efficiency:
        parser.error("--label-efficiency needs the run's training split; it cannot be combined with --test-all")
    if args.label_efficiency and (min(args.label_counts) < 2 or args.label_seeds < 1):
        parser.error("--label-counts must all be >= 2 (the probe cross-validates on them) and --label-seeds >= 1")
    if args.test_all and args.test_data:
        parser.error("--test-all makes the inputs the test set; it cannot be combined with --test-data")
    if not 1 <= args.baseline_min_steps <= args.baseline_max_steps:
        parser.exit(2, f"error: --baseline-min-steps ({args.baseline_min_steps}) must be >= 1 and at most "
                       f"--baseline-max-steps ({args.baseline_max_steps})\n")
    if args.baseline_epochs is not None and args.baseline_epochs < 1:
        parser.exit(2, f"error: --baseline-epochs must be >= 1, got {args.baseline_epochs}\n")
    if not 0 < args.contamination < 1:
        parser.exit(2, f"error: --contamination must be between 0 and 1, got {args.contamination}\n")
    if args.top_k < 1 or args.similarity_pool <= args.top_k:
        parser.exit(2, f"error: --top-k ({args.top_k}) must be >= 1 and less than --similarity-pool "
                       f"({args.similarity_pool})\n")
    if args.test_view == "original" and args.dask:
        parser.error("--test-view original is computed in this process; it cannot be combined with --dask")
    parallel.check_dask_arguments(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_dir = pathlib.Path(args.run_dir)
    out_dir = pathlib.Path(args.out_dir) if args.out_dir else run_dir / "test"
    try:
        common.check_output_dir(out_dir)
        held.enter_context(locks.folder_lock(out_dir))  # a second run into the same folder is refused
        config, extra = nnclr_model.load_config(run_dir / "config.json")
        band_scale = np.asarray(extra["band_scale"], dtype=np.float32)
        settings = extra.get("settings", {})
        seed = int(settings.get("seed", 0))
        encoder = nnclr_model.load_encoder(run_dir / "encoder.keras", config)
        classifier = nnclr_model.load_classifier(run_dir / "classifier.keras", config)
        # The labelled pool of the run (its --labelled files) unless the inputs are the test set.
        labelled = args.labelled or (None if args.test_all else settings.get("labelled"))
        source = nnclr_model.open_tidal_source(args.inputs, args.tfds_dir, args.tfds_unlabelled, args.tfds_labelled,
                                               labelled)
        test_source = tidal_data.tidal_source_from_hdf5(args.test_data) if args.test_data else source
        for data in (source,) if test_source is source else (source, test_source):
            tidal_data.check_tidal_shape(data.image_shape, config.min_image_size, config.n_bands)
            if tuple(data.image_shape) != config.input_shape:
                raise ValueError(
                    f"{data.description}: images are {tuple(data.image_shape)}, the run was trained on {config.input_shape}"
                )
        if args.test_data or args.test_all:
            try:
                tidal_data.check_tidal_labels(test_source.labels)
            except ValueError as error:
                raise ValueError(f"{test_source.description}: {error}") from None
        if args.test_all:
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
        test_rows = np.arange(len(test_source.labels)) if args.test_data else splits["test"]
        test_labels = test_source.labels[test_rows]
        truth = None
        if test_source.truth is not None:
            truth = {key: np.asarray(values)[test_rows] for key, values in test_source.truth.items()}
        twins = None
        if truth is not None and "pair_id" in truth:
            # A whole file has whole pairs, and so has the run's test split of a pair pool (split by pairs).
            whole = args.test_data or args.test_all or (np.asarray(truth["pair_id"]) != "").all()
            if whole:
                twins = tidal_data.check_pairs(truth["pair_id"], test_labels, test_source.description,
                                               ids=test_source.ids[test_rows])
            else:
                logger.warning("the run's test split of a file of host-matched pairs does not keep the twins together: "
                               "evaluated as single galaxies (test on a pair file with --test-data or --test-all)")
        selections, headline = select_headline(test_labels, truth, twins, args.visible_only)
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
    # The classical baselines read the counts of the test galaxies themselves, a chunk at a time.
    # The boosted trees learn from the classifier's training galaxies: there are none with --test-all.
    boosting = "train" in splits and np.bincount(source.labels[splits["train"]], minlength=2).min() >= 2
    statistics = ("features",) if boosting else ("host_flux", "rotation_residual")
    counts, test_images = None, None
    if not computed or args.label_efficiency:
        counts = test_source.read_labelled(test_rows)
        test_images = tidal_data.tidal_stretch(counts, band_scale)

    def read_counts(positions):
        return counts[positions] if counts is not None else test_source.read_labelled(test_rows[positions])

    measured = tidal_baselines.baseline_scores(read_counts, np.arange(len(test_rows)), statistics, BASELINE_CHUNK,
                                               lambda starts: common.progress(starts, desc="baselines", unit="chunk"))
    counts = None
    if boosting:
        features = measured.pop("features")
        names = tidal_baselines.RESIDUAL_FEATURE_NAMES
        measured = {"host_flux": features[:, names.index("host_flux_i")],
                    "rotation_residual": features[:, names.index("rotation_residual")]}
        train_features = tidal_baselines.baseline_scores(source.read_labelled, splits["train"], ("features",),
                                                         BASELINE_CHUNK)["features"]
        model = tidal_baselines.fit_boosting_baseline(train_features, source.labels[splits["train"]], seed)
        measured["boosting"] = model.predict_proba(features)[:, 1]
    if args.test_view == "original":
        scores = nnclr_model.original_view_scores(classifier, config, test_images, seed, BATCH_SIZE)
    elif "scores" in computed:
        scores = computed["scores"]
    else:
        scores = classifier.predict(test_images, batch_size=BATCH_SIZE, verbose=0)[:, 0]

    chosen = selections[headline]
    result = nnclr_model.evaluate_scores(test_labels[chosen], scores[chosen], args.contamination)
    summaries = {name: {key: score_summary(test_labels[mask], values[mask], args.contamination,
                                           None if twins is None else _twins_within(twins, mask))
                        for key, mask in selections.items()}
                 for name, values in {"classifier": scores, **measured}.items()}
    arrays = {"fpr": result["fpr"], "tpr": result["tpr"], "thresholds": result["thresholds"], "scores": scores,
              "labels": test_labels, **{f"baseline_{name}": values for name, values in measured.items()}}
    if args.visible_only:
        arrays["headline"] = chosen
    for name, values in arrays.items():
        common.save_array(out_dir / f"{name}.npy", values)
    curves = [("NNCLR classifier", result["fpr"], result["tpr"], result["auc"])]
    for name, values in measured.items():
        baseline = nnclr_model.evaluate_scores(test_labels[chosen], values[chosen], args.contamination)
        curves.append((tidal_baselines.BASELINE_NAMES[name], baseline["fpr"], baseline["tpr"], baseline["auc"]))
    plot_roc(curves, args.contamination, out_dir / "roc.png")
    classifier_summary = summaries.pop("classifier")
    metrics = {
        "auc": result["auc"],
        "headline": headline,
        **{f"auc_{key}": values["auc"] for key, values in classifier_summary.items()},
        "contamination": args.contamination,
        "completeness_at_contamination_fpr": result["completeness"]["fpr"],
        "completeness_at_contamination_one_minus_precision": result["completeness"]["one_minus_precision"],
        "n_test": int(len(test_labels)),
        "n_test_tidal": int(test_labels.sum()),
        "n_headline": int(chosen.sum()),
        "n_headline_tidal": int(test_labels[chosen].sum()),
        "paired": twins is not None,
        "data": test_source.description,
        "run": str(run_dir),
        "by_selection": classifier_summary,
        "baselines": {name: {**values[headline], **{f"auc_{key}": entry["auc"] for key, entry in values.items()},
                             "by_selection": values} for name, values in summaries.items()},
    }
    if twins is not None:
        metrics["n_pairs"] = int(test_labels.sum())
        metrics["pair_win_rate"] = classifier_summary[headline]["pair_win_rate"]
        host = summaries["host_flux"]["all"]["auc"]
        if abs(host - 0.5) > HOST_MATCH_TOLERANCE:
            warning = (f"host flux alone scores AUC {host:.3f} on the host-matched pairs, not 0.5 +- "
                       f"{HOST_MATCH_TOLERANCE}: the twins differ in more than their tidal feature")
            logger.warning("warning: %s", warning)
            metrics["warnings"] = [warning]
    if truth is not None:
        metrics["by_feature"] = detection_by_feature(test_labels, scores, truth, args.contamination, baselines=measured,
                                                     twins=twins)
        for entry in (metrics["by_feature"]["feature_type"] + metrics["by_feature"]["feature_sb"]
                      + metrics["by_feature"]["visibility"]):
            print(f"{bin_name(entry):>17}: {entry['n']:4d} tidal, AUC {entry['auc']:.3f}, completeness "
                  f"{entry['completeness']:.2f} ({baseline_text(entry['baselines'])})")
    if args.label_efficiency:
        train_images, train_labels = stretched(splits["train"]), source.labels[splits["train"]]
        validation = (stretched(splits["validation"]), source.labels[splits["validation"]])
        trained_features = (computed["train_features"], computed["test_features"]) if computed else None
        rows = label_efficiency(encoder, config, train_images, train_labels, test_images, test_labels, args.label_counts,
                                args.label_seeds, args.contamination, trained_features, validation,
                                args.baseline_min_steps, args.baseline_max_steps, args.baseline_epochs)
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
    def on(key):
        return f" on {int(test_labels[selections[key]].sum())} host-matched pairs" if twins is not None else ""

    for key in sorted(selections, key=lambda key: key != headline)[1:]:
        print(f"{'visible features only' if key == 'visible' else 'all features'}: AUC {classifier_summary[key]['auc']:.3f} "
              f"({baseline_text({name: values[key] for name, values in summaries.items()})}){on(key)}")
    print(
        f"test AUC{' (visible features)' if headline == 'visible' else ''} {metrics['auc']:.3f} "
        f"({baseline_text(metrics['baselines'])}){on(headline)}; completeness at {args.contamination:.0%} contamination: "
        f"{metrics['completeness_at_contamination_fpr']:.3f} (FPR), "
        f"{metrics['completeness_at_contamination_one_minus_precision']:.3f} (1 - precision); outputs in {out_dir}"
    )
    return 0


def _twins_within(twins, mask):
    """The twins of a pair-closed subset (``mask``), as positions within the subset."""
    positions = np.full(len(twins), -1)
    positions[mask] = np.arange(mask.sum())
    return positions[twins[mask]]


if __name__ == "__main__":
    raise SystemExit(main())
