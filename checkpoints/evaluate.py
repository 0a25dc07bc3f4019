"""Measure a shipped ICL checkpoint on held-out mock clusters: the numbers of the model card.

The held-out clusters come from our generator with a seed the training never used; the script
can make them itself (``--generate N SEED``, the same as ``python -m data.generate clusters --n N
--seed SEED``) or read any cutout files with truth columns:

    python checkpoints/evaluate.py checkpoints/icl_trained.weights.h5 --generate 256 2000 --out-dir eval_trained
    python checkpoints/evaluate.py checkpoints/icl_trained.weights.h5 heldout.h5
    python checkpoints/evaluate.py checkpoints/icl_trained.weights.h5 galsim_clusters/ --truth galsim_clusters/truth.csv

For every truth column the file holds (``f_icl_sb_ideal``, ``f_icl_sb_ideal_scene``,
``f_icl_true`` and, when measured, ``f_icl_sb``) it reports the mean absolute error, bias,
scatter and Pearson r of the predicted mode, and the fraction of clusters whose label lies
inside the predicted 15-85% interval. It writes ``metrics.json`` and one binned plot per column.

The intervals are those ``predict.py`` gives: widened by the checkpoint's interval calibration
(``<stem>.calibration.json``, ``model.load_interval_scale``) when it has one; the coverage of the
raw mixture intervals is reported too. ``--calibrate KEY`` fits that calibration on these
clusters (split-conformal, ``model.fit_interval_scale``: the factor about the mode that makes
the interval hold label KEY 70% of the time) and writes it beside the checkpoint. Calibrate on
clusters the model was not trained on, and report the coverage on others.
"""

import argparse
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

if __name__ in common.MAIN_NAMES:
    common.quiet_start()  # before TensorFlow loads: no start-up noise unless --verbose

#: Truth columns of our mock files, in the order the card lists them.
LABEL_KEYS = ("f_icl_sb_ideal", "f_icl_sb_ideal_scene", "f_icl_true", "f_icl_sb")
BATCH_SIZE = 32


def read_truth_table(path):
    """Truth by cutout id from a CSV with an ``id`` column (``truth.csv`` of ``data.clusters_galsim``).

    Raises
    ------
    ValueError
        One line naming the file, for a file that cannot be read, has no ``id`` column or
        repeats an id.
    """
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if "id" not in (reader.fieldnames or []):
                raise ValueError(f"{path}: a truth table needs an 'id' column, found {reader.fieldnames}")
            table = {}
            for line, row in enumerate(reader, start=2):
                if row["id"] in table:
                    raise ValueError(f"{path}, line {line}: id {row['id']!r} is given twice")
                table[row["id"]] = row
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{path}: not a readable CSV truth table ({error})") from None
    return table


def available_labels(refs, keys=LABEL_KEYS, truth=None):
    """The truth columns present (and finite) for every cutout, as {key: (N,) array}.

    ``truth`` (:func:`read_truth_table`) supplies columns by cutout id, before the files' own.
    """
    import prep_data

    metas = []
    for ref in refs:
        meta = dict(prep_data.read_cutout(ref).meta)
        row = (truth or {}).get(str(ref.id), {})
        for key in keys:
            try:
                meta[key] = float(row[key])
            except (KeyError, TypeError, ValueError):
                pass
        metas.append(meta)
    labels = {}
    for key in keys:
        if all(key in meta for meta in metas):
            values = np.asarray([float(meta[key]) for meta in metas], dtype=np.float32)
            if np.isfinite(values).all():
                labels[key] = values
    return labels


def evaluate(checkpoint, inputs, out_dir=None, batch_size=BATCH_SIZE, heldout_seed=None, icl_model=None,
             calibrate=None, truth=None):
    """Predict the held-out clusters and compare with each truth column.

    Parameters
    ----------
    checkpoint : path
        ICL checkpoint (``.weights.h5`` with its config, or ``.keras``); ``icl_model``, when
        given, is it already loaded.
    inputs : list of paths
        Cutout files or directories (any format ``prep_data`` reads) with truth columns.
    out_dir : path, optional
        Where ``metrics.json`` and the plots go.
    heldout_seed : int, optional
        Generator seed of the held-out mocks, recorded in the result.
    calibrate : str, optional
        Fit the interval calibration to this truth column and save it beside the checkpoint.
    truth : dict, optional
        Truth columns by cutout id (:func:`read_truth_table`), for files that do not hold them.

    Returns
    -------
    dict
        ``{"checkpoint", "n", "heldout_seed", "interval_scale", "columns": {key: metrics}}``.
    """
    import keras

    import loaders
    import model
    import plots
    import prep_data

    refs, errors = prep_data.index_cutouts(inputs)
    if errors:
        raise prep_data.CutoutError(errors[0][1])
    labels = available_labels(refs, truth=truth)
    if not labels:
        raise ValueError(f"none of the truth columns {', '.join(LABEL_KEYS)} is in {', '.join(map(str, inputs))}")
    predictor = model.Predictor(icl_model if icl_model is not None else model.load_icl_model(checkpoint))
    image_size = predictor.model.input_shape[1]
    if keras.backend.backend() == "tensorflow":
        batches = prep_data.cutout_dataset(refs, batch_size, image_size, strict=True)
    else:  # no tf.data without TensorFlow: the same batches from the backend-agnostic loader
        batches = loaders.iterate(loaders.CutoutLoader(refs, batch_size, image_size, strict=True))
    parts = [predictor(batch["image"]) for batch in batches]
    raw = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    if calibrate is not None:
        if calibrate not in labels:
            raise ValueError(f"--calibrate {calibrate}: no such truth column (have {', '.join(labels)})")
        scale = model.fit_interval_scale(labels[calibrate], raw)
        common.write_json(model.calibration_path_for(checkpoint), {
            "interval_scale": scale, "coverage": model.INTERVAL_COVERAGE, "label": calibrate, "n": len(refs),
            "inputs": [str(item) for item in inputs], "heldout_seed": heldout_seed,
        })
    scale = model.load_interval_scale(checkpoint)
    summary = model.scale_interval(raw, scale)
    columns = {}
    for key, values in labels.items():
        metrics = model.regression_metrics(values, summary["mode"])
        metrics["coverage_15_85"] = float(np.mean((values >= summary["p15"]) & (values <= summary["p85"])))
        metrics["coverage_15_85_uncalibrated"] = float(np.mean((values >= raw["p15"]) & (values <= raw["p85"])))
        metrics["mae_of_constant_median"] = float(np.abs(values - np.median(values)).mean())
        columns[key] = metrics
    result = {"checkpoint": str(checkpoint), "n": len(refs), "heldout_seed": heldout_seed, "interval_scale": scale,
              "columns": columns}
    if out_dir is not None:
        out_dir = pathlib.Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for key, values in labels.items():
            plots.plot_binned(values, summary["mode"], out_dir / f"binned_{key}.png", n_bins=10,
                              title=f"{pathlib.Path(checkpoint).name}: held-out mocks", label_name=key)
        common.write_json(out_dir / "metrics.json", result)
    return result


def markdown_table(result):
    """The card's table: one row per truth column."""
    lines = [
        "| label | n | MAE | MAE of a constant | bias | scatter | Pearson r | label in 15-85% | (uncalibrated) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, m in result["columns"].items():
        lines.append(
            f"| `{key}` | {m['n']} | {m['mae']:.4f} | {m['mae_of_constant_median']:.4f} | {m['bias']:+.4f} | "
            f"{m['scatter']:.4f} | {m['pearson_r']:.3f} | {m['coverage_15_85']:.0%} | "
            f"{m.get('coverage_15_85_uncalibrated', m['coverage_15_85']):.0%} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="ICL checkpoint (.weights.h5 with its .config.json, or .keras)")
    parser.add_argument("inputs", nargs="*", help="held-out cutout files or directories with truth columns")
    parser.add_argument("--generate", nargs=2, type=int, metavar=("N", "SEED"),
                        help="generate N held-out mock clusters with this seed instead of reading inputs")
    parser.add_argument("--out-dir", help="folder for metrics.json and the binned plots")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--truth", metavar="CSV",
                        help="truth columns by cutout id (e.g. truth.csv of python -m data.clusters_galsim)")
    parser.add_argument("--calibrate", metavar="KEY",
                        help="fit the interval calibration to truth column KEY on these clusters and save it beside "
                        "the checkpoint (<stem>.calibration.json)")
    common.add_verbose_argument(parser)
    args = parser.parse_args(argv)
    if bool(args.inputs) == bool(args.generate):
        parser.error("give either held-out cutout files or --generate N SEED")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")

    import model
    import prep_data

    try:
        if args.out_dir:
            common.check_output_dir(args.out_dir)
        # The checkpoint first: a wrong one fails before any cutout is read or generated.
        icl_model = model.load_icl_model(args.checkpoint)
        truth = read_truth_table(args.truth) if args.truth else None
        if args.generate:
            from data import shards

            n, seed = args.generate
            with tempfile.TemporaryDirectory() as folder:
                heldout = pathlib.Path(folder) / "heldout.h5"
                shards.generate_file("clusters", n, seed, heldout)
                result = evaluate(args.checkpoint, [heldout], args.out_dir, args.batch_size, heldout_seed=seed,
                                  icl_model=icl_model, calibrate=args.calibrate, truth=truth)
        else:
            result = evaluate(args.checkpoint, args.inputs, args.out_dir, args.batch_size, icl_model=icl_model,
                              calibrate=args.calibrate, truth=truth)
    except (ValueError, model.CheckpointError, prep_data.CutoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
