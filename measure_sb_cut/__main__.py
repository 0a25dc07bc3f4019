"""Measure ICL fractions of cluster cutouts with the surface-brightness threshold method.

    python -m measure_sb_cut INPUT... --out OUT.csv [--z Z | --catalog CSV] [--plot-dir DIR] [--workers K]
    python -m measure_sb_cut INPUT... --out OUT.csv --dask ADDRESS|local:N [--partition-size K]

INPUT: FITS cutouts (image, mask and variance HDUs), HDF5 files in this project's layouts or
the original code's, or directories of them (see ``prep_data``). The redshift of each cutout
comes from ``--z``, else from the ``--catalog`` CSV (columns ``id``, ``z``; ``ra``, ``dec`` may
be present and are not needed), else from the cutout's own metadata (FITS keyword ``Z`` or
``REDSHIFT``, HDF5 attribute or column ``z``).

The CSV has one row per cutout, in input order, with the columns of
``measure_sb_cut.measure.CSV_COLUMNS``; a cutout that cannot be measured gets its message in
``error`` (and on the console) while the others are measured. The exit status is 1 when any
cutout failed.

The cutouts are measured by ``--workers`` processes of this machine, or, with ``--dask ADDRESS``
(a scheduler, ``tcp://host:8786``) or ``--dask local:N`` (N local worker processes), by the
workers of a Dask cluster, ``--partition-size`` cutouts per task; the workers read the cutouts
and write the plots themselves, so every machine must see the same files. The CSV is the same
either way.
"""

import argparse
import contextlib
import csv
import logging
import os
import pathlib
import sys

import numpy as np

import hsc
import parallel
from measure_sb_cut import measurement_helpers as helpers
from measure_sb_cut.measure import CSV_COLUMNS, REESTIMATE_BOX_SIZES, measure_refs, write_csv

# Defaults; each can be set on the command line.
WORKERS = os.cpu_count() or 1
THRESHOLD_SB = helpers.MEASUREMENT_SB
APERTURE_KPC = helpers.APERTURE_KPC
HALF_WIDTH_KPC = hsc.CUTOUT_HALF_WIDTH_KPC
BACKGROUND_BOX_PX = helpers.BACKGROUND_BOX_PX


def read_catalogue(path):
    """Redshift by id from a CSV with columns ``id`` and ``z`` (other columns are ignored).

    Raises
    ------
    ValueError
        If the file lacks the columns or a z is not a number.
    """
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip().lower() for name in (reader.fieldnames or [])]
        if "id" not in columns or "z" not in columns:
            raise ValueError(f"{path}: catalogue must have columns 'id' and 'z', found {columns}")
        redshifts = {}
        for line_number, row in enumerate(reader, start=2):
            row = {key.strip().lower(): value for key, value in row.items() if key is not None}
            try:
                redshifts[row["id"].strip()] = float(row["z"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}, line {line_number}: z must be a number, got {row['z']!r}") from None
    return redshifts


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m measure_sb_cut",
        description="Measure ICL fractions of cluster cutouts with the surface-brightness threshold method "
        "(Canepa et al. 2025).",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="FITS or HDF5 cutout files, or directories of them")
    parser.add_argument("--out", required=True, help="output CSV file")
    redshift = parser.add_mutually_exclusive_group()
    redshift.add_argument("--z", type=float, help="redshift of every cutout")
    redshift.add_argument("--catalog", help="CSV with columns id, z (optionally ra, dec): the redshift per cutout id")
    parser.add_argument("--plot-dir", metavar="DIR", help="write a diagnostic PNG per cutout into DIR")
    parser.add_argument("--workers", type=int, default=WORKERS, help=f"parallel processes of this machine (default {WORKERS}; not used with --dask)")
    parser.add_argument("--threshold-sb", type=float, default=THRESHOLD_SB,
                        help=f"rest-frame threshold between galaxies and ICL, mag/arcsec^2 (default {THRESHOLD_SB:g})")
    parser.add_argument("--aperture-kpc", type=float, default=APERTURE_KPC,
                        help=f"aperture radius, kpc (default {APERTURE_KPC:g})")
    parser.add_argument("--half-width-kpc", type=float, default=HALF_WIDTH_KPC,
                        help=f"half-width of the cutouts, kpc (default {HALF_WIDTH_KPC:g})")
    parser.add_argument("--background-box", type=int, default=BACKGROUND_BOX_PX,
                        help=f"Background2D box side, pixels of the 224-px image (default {BACKGROUND_BOX_PX})")
    parser.add_argument("--no-reestimates", action="store_true",
                        help="skip the background re-estimates (faster; the error is then the noise term only)")
    parallel.add_dask_argument(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    import prep_data

    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.partition_size < 1:
        parser.error(f"--partition-size must be at least 1, got {args.partition_size}")
    if args.dask:
        try:
            parallel.parse_address(args.dask)
        except ValueError as error:
            parser.error(str(error))
    if args.z is not None:
        try:
            helpers.check_redshift(args.z)
        except ValueError as error:
            parser.error(f"--z: {error}")
    catalogue = None
    if args.catalog:
        try:
            catalogue = read_catalogue(args.catalog)
        except (OSError, ValueError) as error:
            parser.exit(2, f"error: {error}\n")
    try:
        refs, file_errors = prep_data.index_cutouts(args.inputs)
    except prep_data.CutoutError as error:
        parser.exit(2, f"error: {error}\n")
    if args.plot_dir:
        pathlib.Path(args.plot_dir).mkdir(parents=True, exist_ok=True)
    options = {
        "threshold_sb": args.threshold_sb,
        "aperture_kpc": args.aperture_kpc,
        "half_width_kpc": args.half_width_kpc,
        "background_box_size": args.background_box,
        "reestimate_box_sizes": () if args.no_reestimates else REESTIMATE_BOX_SIZES,
    }

    from tqdm import tqdm

    # Files that could not even be listed take their place among the others, in input order.
    file_order = {path: position for position, path in enumerate(prep_data.find_files(args.inputs))}
    placed = []
    for source, message in file_errors:
        row = {**{column: np.nan for column in CSV_COLUMNS}, "id": pathlib.Path(source).name, "source": source}
        placed.append((file_order[source], {**row, "error": message}))
        tqdm.write(f"error: {message}", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        client = None
        if args.dask:
            try:
                # The measurement needs no TensorFlow: the workers are not made to load it.
                client = stack.enter_context(parallel.dask_client(args.dask, quiet=False))
            except ValueError as error:  # a scheduler that cannot be reached
                parser.exit(2, f"error: {error}\n")
        measured = measure_refs(refs, args.z, catalogue, args.plot_dir, options, args.workers, client=client,
                                partition_size=args.partition_size)
        # measured first: zip then runs it to its end, so that its tasks are all done (and its
        # progress bar closed) before the cluster is shut down.
        for row, ref in zip(measured, refs):
            if row["error"]:
                tqdm.write(f"error: {row['error']}", file=sys.stderr)
            placed.append((file_order[ref.path], row))
    rows = [row for _, row in sorted(placed, key=lambda item: item[0])]
    write_csv(rows, args.out)
    n_failed = sum(1 for row in rows if row["error"])
    print(f"measured {len(rows) - n_failed} of {len(rows)} cutouts; wrote {args.out}")
    return 1 if n_failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
