"""Predict the ICL fraction of cluster cutouts with a trained ICL regressor.

Each INPUT is a FITS cutout, an HDF5 file of cutouts, a .npy file of prepared images, or a
directory of them. The output CSV has one row per readable cutout, in input order:

    id, source, f_icl (the mode), f_icl_p15, f_icl_p85, f_icl_mean

Cutouts that cannot be read or prepared are reported on the console (one line each, naming
the file and the cutout); the other rows are still written and the exit status is 1.
``--strict`` stops at the first bad cutout. Rows go to a hidden ``.OUT.partial`` file, flushed
after every batch, which is renamed to OUT when every cutout is done: an interrupted run never
leaves a CSV that looks finished, and ``--resume`` skips the cutouts already predicted.
Memory stays bounded whatever the number of cutouts: they stream from disk in batches.

Example::

    python predict.py clusters/ --out predictions.csv
"""

import argparse
import csv
import logging
import os
import pathlib
import sys

import numpy as np

import common
import model
import prep_data

#: Shipped checkpoints, tried in this order when no --checkpoint is given.
SHIPPED_CHECKPOINTS = ("icl_finetuned.weights.h5", "icl_trained.weights.h5")
CHECKPOINT_DIR = pathlib.Path(__file__).resolve().parent / "checkpoints"
BATCH_SIZE = 32
COLUMNS = ("id", "source", "f_icl", "f_icl_p15", "f_icl_p85", "f_icl_mean")

logger = logging.getLogger(__name__)


def default_checkpoint(checkpoint_dir=CHECKPOINT_DIR):
    """The first shipped checkpoint that exists, or raise CheckpointError saying what to do."""
    for name in SHIPPED_CHECKPOINTS:
        path = pathlib.Path(checkpoint_dir) / name
        if path.exists():
            return path
    raise model.CheckpointError(
        f"no shipped ICL checkpoint in {checkpoint_dir} (looked for {', '.join(SHIPPED_CHECKPOINTS)}); "
        "train one with train.py and pass it with --checkpoint PATH"
    )


def partial_path(out_path):
    """The hidden file that holds the rows of an unfinished run of ``out_path``."""
    out_path = pathlib.Path(out_path)
    return out_path.with_name(f".{out_path.name}.partial")


def read_finished_rows(out_path, partial):
    """Rows already predicted by earlier runs (the finished CSV and an interrupted run's rows).

    Rows are keyed by ``source``; a file whose header is not this tool's is refused rather
    than mixed into the new output.
    """
    rows, seen = [], set()
    for path in (out_path, partial):
        if not path.exists():
            continue
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                continue
            if tuple(header) != COLUMNS:
                raise ValueError(f"{path}: cannot resume, its columns {header} are not {list(COLUMNS)}")
            for row in reader:
                if len(row) == len(COLUMNS) and row[1] not in seen:
                    seen.add(row[1])
                    rows.append(row)
    return rows


def predict(inputs, out_path, checkpoint=None, batch_size=BATCH_SIZE, strict=False, progress=True, gradcam_dir=None,
            resume=False):
    """Predict every cutout in ``inputs`` and write the CSV ``out_path``.

    With ``gradcam_dir``, also write a GradCAM overlay PNG per cutout there (see ``gradcam.py``).
    With ``resume``, cutouts already in ``out_path`` or in the rows of an interrupted run are
    skipped and their rows kept.

    Returns
    -------
    n_written : int
        Rows written.
    errors : list of str
        One message per cutout (or file) that could not be predicted.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    checkpoint = pathlib.Path(checkpoint) if checkpoint else default_checkpoint()
    config = model.read_config(checkpoint)
    refs, errors = prep_data.index_cutouts(inputs)
    errors = [message for _, message in errors]
    if errors and strict:
        raise prep_data.CutoutError(errors[0])
    icl_model = model.load_icl_model(checkpoint, config)
    predictor = model.Predictor(icl_model)
    heatmapper = None
    if gradcam_dir is not None:
        import gradcam

        heatmapper = gradcam.GradCAM(icl_model)

    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out_path)
    done_rows = read_finished_rows(out_path, partial) if resume else []
    done = {row[1] for row in done_rows}
    todo = [ref for ref in refs if ref.source not in done]
    if done_rows:
        logger.info("resuming: %d cutouts already predicted, %d to go", len(refs) - len(todo), len(todo))
    dataset = prep_data.cutout_dataset(todo, batch_size, config.image_size)
    n_written = 0
    # Rows go to a hidden partial file, flushed after every batch, and the CSV appears only
    # when every cutout is done: an interrupted run leaves no CSV that looks complete, and
    # --resume continues from the partial file.
    with open(partial, "w", newline="") as handle, tqdm(
        total=len(refs), initial=len(refs) - len(todo), unit="cutout", desc="predicting",
        disable=not progress or len(refs) < 2 * batch_size,
    ) as bar:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(done_rows)
        for batch in dataset:
            messages = [m.decode() for m in batch["error"].numpy()]
            good = np.array([not m for m in messages])
            for message in messages:
                if message:
                    if strict:
                        raise prep_data.CutoutError(message)
                    logger.error("%s", message)
                    errors.append(message)
            if good.any():
                images = batch["image"].numpy()[good]
                indices = batch["index"].numpy()[good]
                summary = predictor(images)
                if heatmapper is not None:
                    gradcam.write_gradcam_for_batch(heatmapper, images, [todo[i].id for i in indices], gradcam_dir, summary)
                for row, index in enumerate(indices):
                    ref = todo[index]
                    writer.writerow(
                        [ref.id, ref.source] + [f"{summary[key][row]:.5f}" for key in ("mode", "p15", "p85", "mean")]
                    )
                    n_written += 1
            handle.flush()
            bar.update(len(messages))
    os.replace(partial, out_path)
    return n_written, errors


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="FITS/HDF5/.npy files or directories of them")
    parser.add_argument("--out", required=True, help="output CSV")
    parser.add_argument("--checkpoint", help="weights (.weights.h5 with its .config.json, or .keras); default: the shipped one")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"cutouts per batch (default {BATCH_SIZE})")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad cutout")
    parser.add_argument("--gradcam", metavar="DIR", help="also write a GradCAM overlay PNG per cutout to DIR")
    parser.add_argument("--resume", action="store_true", help="skip cutouts already in OUT or in an interrupted run's rows")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        n_written, errors = predict(
            args.inputs, args.out, args.checkpoint, args.batch_size, args.strict, gradcam_dir=args.gradcam,
            resume=args.resume,
        )
    except (ValueError, model.CheckpointError, prep_data.CutoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        if partial_path(args.out).exists():
            print(f"rows predicted so far are kept in {partial_path(args.out)}; rerun with --resume to continue",
                  file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; rows predicted so far are kept in {partial_path(args.out)}; rerun with --resume to continue",
              file=sys.stderr)
        return 130
    print(f"wrote {n_written} predictions to {args.out}")
    return common.report_bad_cutouts(errors, "predicted")


if __name__ == "__main__":
    sys.exit(main())
