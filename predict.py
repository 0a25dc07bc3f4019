"""Predict the ICL fraction of cluster cutouts with a trained ICL regressor.

Each INPUT is a FITS cutout, an HDF5 file of cutouts, a .npy file of prepared images, or a
directory of them. The output CSV has one row per readable cutout, in input order:

    id, source, f_icl (the mode), f_icl_p15, f_icl_p85, f_icl_mean

Cutouts that cannot be read or prepared are reported on the console (one line each, naming
the file and the cutout); the other rows are still written and the exit status is 1. Degenerate
cutouts (constant, too small, mostly padding or masked) and .npy arrays that are not prepared
images of the checkpoint's input size are refused that way, as are input paths that do not exist
and files of an unknown layout. A checkpoint or output problem is one ``error:`` line, exit 2,
before any work. A second run on the same OUT while one is running is refused (a lock file
``.OUT.lock`` holds the running process's id; one left by a dead process is taken over).
``--strict`` stops at the first bad cutout. Rows go to a hidden ``.OUT.partial`` file, flushed
after every batch, which is renamed to OUT when every cutout is done: an interrupted run never
leaves a CSV that looks finished, and ``--resume`` skips the cutouts already predicted (a torn
last row is dropped and redone; rows of another checkpoint or other inputs are refused, checked
against the sidecar ``.OUT.partial.json``, which stays beside the finished CSV as ``.OUT.run.json``
so that resuming from a finished CSV is checked too).
Memory stays bounded whatever the number of cutouts: they stream from disk in batches.
``--gradcam-dir DIR`` also writes a GradCAM overlay per cutout, from the same forward pass.
``--dask ADDRESS`` (or ``local:N``) spreads the cutouts over a Dask cluster, in partitions of
``--partition-size``; the CSV is the same as without it. It runs on any Keras backend: with
``KERAS_BACKEND=jax`` the cutouts stream through ``loaders`` and TensorFlow is never imported.

Example::

    python predict.py clusters/ --out predictions.csv --gradcam-dir gradcam/
"""

import common

if __name__ in common.MAIN_NAMES:
    common.quiet_start()  # before TensorFlow loads: no start-up noise unless --verbose

import argparse
import contextlib
import logging
import sys

import inference
import model
import parallel
import prep_data


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="FITS/HDF5/.npy files or directories of them")
    parser.add_argument("--out", required=True, help="output CSV")
    parser.add_argument("--gradcam-dir", metavar="DIR", help="also write a GradCAM overlay PNG per cutout to DIR")
    parser.add_argument("--checkpoint", help="weights (.weights.h5 with its .config.json, or .keras); default: the shipped one")
    parser.add_argument("--batch-size", type=int, default=inference.BATCH_SIZE,
                        help=f"cutouts per batch (default {inference.BATCH_SIZE})")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad cutout")
    parser.add_argument("--resume", action="store_true", help="skip cutouts already in OUT or in an interrupted run's rows")
    parallel.add_dask_argument(parser)
    common.add_verbose_argument(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    parallel.check_dask_arguments(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    summary = {}
    kept = f"rows predicted so far are kept in {inference.partial_path(args.out)}; rerun with --resume to continue"
    try:
        with parallel.dask_client(args.dask, quiet=not args.verbose) if args.dask else contextlib.nullcontext() as client:
            n_predicted, _, errors = inference.run(args.inputs, args.out, args.gradcam_dir, args.checkpoint,
                                                   args.batch_size, args.strict, args.resume, client=client,
                                                   partition_size=args.partition_size, summary=summary)
    except (ValueError, OSError, model.CheckpointError, prep_data.CutoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        if summary.get("started") and inference.partial_path(args.out).exists():
            print(kept, file=sys.stderr)  # only when this run wrote rows there
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; {kept}" if summary.get("started") else "interrupted before any prediction",
              file=sys.stderr)
        return 130
    if summary.get("kept"):
        print(f"{n_predicted} predicted now, {summary['kept']} kept from the earlier run, "
              f"{summary['rows']} rows in {args.out}")
    else:
        print(f"wrote {n_predicted} predictions to {args.out}")
    return common.report_bad_cutouts(errors, "predicted")


if __name__ == "__main__":
    sys.exit(main())
