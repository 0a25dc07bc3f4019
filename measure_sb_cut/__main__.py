"""Measure ICL fractions of cluster cutouts with the surface-brightness threshold method.

    python -m measure_sb_cut INPUT... --out OUT.csv [--z Z | --catalog CSV] [--plot-dir DIR] [--workers K]
    python -m measure_sb_cut INPUT... --out OUT.csv --dask ADDRESS|local:N [--partition-size K]
    python -m measure_sb_cut INPUT... --out OUT.csv --method improved

``--method canepa2025`` (the default) measures as the original code of Canepa et al. 2025 did,
step by step (``measure_sb_cut.canepa2025``), its three plain mistakes kept unless ``--fix``
names them; ``--method improved`` is this project's redesign (``measure_sb_cut.measure``).
Cutouts in native pixels are padded to a square, cropped to +-300 kpc and resized to 224 x 224
as the original resized them. The ``method`` column names the method (and fixes) of each row.

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

The rows are written to a hidden partial file next to ``--out`` as they are measured, which
replaces ``--out`` at the end. Ctrl-C stops the workers (or cancels the Dask tasks), keeps that
file and exits with status 130; ``--resume`` (the same command again, with ``--resume``) keeps
the rows measured already and measures the rest.

A measurement that would be physically meaningless is refused with its reason in ``error``
(canepa2025: no source above the threshold, or no light above the surface-brightness limit
inside the aperture; improved:
no positive light inside the aperture, an ICL fraction outside [0, 1] (negative light:
over-subtracted background or bad pixels), a non-finite surface-brightness limit or one
brighter than the threshold, or more than
``measure_sb_cut.measure.MAX_MASKED_FRACTION`` (50%) of the aperture masked or not finite).
"""

import common

if __name__ in common.MAIN_NAMES:
    common.quiet_interrupt()  # a Ctrl-C while the libraries load is one line, not a traceback

import argparse
import contextlib
import csv
import glob
import logging
import os
import pathlib
import sys

import numpy as np

import hsc
import parallel
from measure_sb_cut import measurement_helpers as helpers
from measure_sb_cut.canepa2025 import FIXES
from measure_sb_cut.measure import (
    CSV_COLUMNS,
    METHODS,
    REESTIMATE_BOX_SIZES,
    check_options,
    measure_refs,
    method_label,
)

# Defaults; each can be set on the command line.
WORKERS = os.cpu_count() or 1
THRESHOLD_SB = helpers.MEASUREMENT_SB
APERTURE_KPC = helpers.APERTURE_KPC
HALF_WIDTH_KPC = hsc.CUTOUT_HALF_WIDTH_KPC
BACKGROUND_BOX_PX = helpers.BACKGROUND_BOX_PX
METHOD = "canepa2025"


def read_catalogue(path):
    """Redshift by id from a CSV with columns ``id`` and ``z`` (other columns are ignored).

    Raises
    ------
    ValueError
        If the file lacks the columns, a z is not a number or an id is given twice.
    """
    try:
        return _read_catalogue(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{path}: not a readable CSV catalogue ({error})") from None


def _read_catalogue(path):
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip().lower() for name in (reader.fieldnames or [])]
        if "id" not in columns or "z" not in columns:
            raise ValueError(f"{path}: catalogue must have columns 'id' and 'z', found {columns}")
        redshifts, lines = {}, {}
        for line_number, row in enumerate(reader, start=2):
            row = {key.strip().lower(): value for key, value in row.items() if key is not None}
            identifier = (row["id"] or "").strip()
            if identifier in lines:
                raise ValueError(
                    f"{path}, lines {lines[identifier]} and {line_number}: id {identifier!r} is given twice"
                )
            try:
                redshifts[identifier] = float(row["z"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}, line {line_number}: z must be a number, got {row['z']!r}") from None
            lines[identifier] = line_number
    return redshifts


def _cell(value):
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.6g}"
    return value


def partial_pattern(out):
    """Glob of the hidden partial files of ``--out`` (:func:`common.atomic_path` with any process id)."""
    out = pathlib.Path(out)
    suffix = "".join(out.suffixes)
    stem = out.name[: len(out.name) - len(suffix)]
    return str(out.with_name(f".{stem}.partial-*{suffix}"))


def read_finished_rows(out, method=None):
    """Rows (as CSV field dicts) by source from the partial files of an interrupted run of ``out``.

    The newest file wins for a source; a torn last line (no newline: the run was killed while
    writing it), rows of another layout and, with ``method``, rows measured with another method
    (their ``method`` column) are dropped.
    """
    rows = {}
    for path in sorted(glob.glob(partial_pattern(out)), key=os.path.getmtime):
        with open(path, newline="") as handle:
            text = handle.read()
        if not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or list(reader.fieldnames) != list(CSV_COLUMNS):
            continue
        for row in reader:
            if None in row or any(value is None for value in row.values()) or not row["source"]:
                continue
            if method is not None and row["method"] != method:
                continue
            rows[row["source"]] = row
    return rows


def open_partial(out):
    """A new hidden partial file next to ``out`` for this run, opened for writing without
    following a symbolic link planted at its name."""
    path = common.atomic_path(out)
    return path, common.open_new_file(path)


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
    parser.add_argument("--method", choices=METHODS, default=METHOD,
                        help="canepa2025: the original code's measurement, step by step (default); improved: this "
                        "project's redesign (masked sky boxes, smoothed segments, S/N-cut hot mask, box-averaged "
                        "limit, background re-estimates in the error); see measure_sb_cut/VALIDATION.md")
    parser.add_argument("--fix", action="append", choices=FIXES, default=[], metavar="NAME",
                        help="with --method canepa2025, correct one of the original's mistakes (repeat for more): "
                        "sigma-region (noise from the edge band, as intended), limit-scale (the cutout's pixel "
                        "scale in the limit), edge-spline (the whole ring of mesh cells)")
    parser.add_argument("--threshold-sb", type=float, default=THRESHOLD_SB,
                        help=f"rest-frame threshold between galaxies and ICL, mag/arcsec^2 (default {THRESHOLD_SB:g})")
    parser.add_argument("--aperture-kpc", type=float,
                        help=f"--method improved: aperture radius, kpc (default {APERTURE_KPC:g}; canepa2025 "
                        "measures within the cutout's half-width)")
    parser.add_argument("--half-width-kpc", type=float, default=HALF_WIDTH_KPC,
                        help=f"half-width of the cutouts, kpc (default {HALF_WIDTH_KPC:g})")
    parser.add_argument("--background-box", type=int,
                        help=f"--method improved: Background2D box side, pixels of the 224-px image "
                        f"(default {BACKGROUND_BOX_PX})")
    parser.add_argument("--no-reestimates", action="store_true",
                        help="--method improved: skip the background re-estimates (faster; the error is then the "
                        "noise term only)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of an interrupted run of the same --out and measure only the rest")
    parallel.add_dask_argument(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    import prep_data

    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.method == "canepa2025":
        given = [name for name, value in (("--aperture-kpc", args.aperture_kpc), ("--background-box", args.background_box),
                                          ("--no-reestimates", args.no_reestimates or None)) if value is not None]
        if given:
            parser.error(f"{given[0]} applies to --method improved only")
    elif args.fix:
        parser.error("--fix applies to --method canepa2025 only")
    args.aperture_kpc = APERTURE_KPC if args.aperture_kpc is None else args.aperture_kpc
    args.background_box = BACKGROUND_BOX_PX if args.background_box is None else args.background_box
    try:
        check_options(args.threshold_sb, args.aperture_kpc, args.half_width_kpc, args.background_box)
    except ValueError as error:
        parser.error(str(error))
    parallel.check_dask_arguments(parser, args)
    if args.z is not None:
        try:
            helpers.check_redshift(args.z)
        except ValueError as error:
            parser.error(f"--z: {error}")
    try:
        common.check_output_file(args.out, "--out")
        if args.plot_dir:
            common.check_output_dir(args.plot_dir, "--plot-dir")
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
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
    label = method_label(args.method, args.fix)
    finished = read_finished_rows(args.out, label) if args.resume else {}
    options = {"method": args.method, "threshold_sb": args.threshold_sb, "half_width_kpc": args.half_width_kpc}
    if args.method == "canepa2025":
        options["fixes"] = tuple(sorted(set(args.fix)))
    else:
        options.update(
            aperture_kpc=args.aperture_kpc,
            background_box_size=args.background_box,
            reestimate_box_sizes=() if args.no_reestimates else REESTIMATE_BOX_SIZES,
        )

    from tqdm import tqdm

    # Files that could not even be listed take their place among the others, in input order:
    # each slot is a row already known (a file error, a row of the interrupted run) or a ref.
    file_order = {path: position for position, path in enumerate(prep_data.find_files(args.inputs))}
    slots = []
    for source, message in file_errors:
        row = {**{column: np.nan for column in CSV_COLUMNS}, "id": pathlib.Path(source).name, "source": source,
               "method": label}
        slots.append((file_order[source], 0, {**row, "error": message}))
    for position, ref in enumerate(refs):
        slots.append((file_order[ref.path], 1, finished.get(ref.source, ref)))
    slots = [item for _, _, item in sorted(slots, key=lambda slot: slot[:2])]
    todo = [ref for ref in refs if ref.source not in finished]
    if finished:
        print(f"resuming: {len(refs) - len(todo)} of {len(refs)} cutouts already measured")

    partial, handle = open_partial(args.out)
    writer = csv.DictWriter(handle, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    n_rows = n_failed = 0
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(handle.close)
            client = None
            if args.dask:
                try:
                    # The measurement needs no TensorFlow: the workers are not made to load it.
                    client = stack.enter_context(parallel.dask_client(args.dask, quiet=False))
                except ValueError as error:  # a scheduler that cannot be reached
                    handle.close()
                    partial.unlink(missing_ok=True)
                    parser.exit(2, f"error: {error}\n")
            measured = measure_refs(todo, args.z, catalogue, args.plot_dir, options, args.workers, client=client,
                                    partition_size=args.partition_size)
            # Closed before the cluster is shut down: its tasks are cancelled, its bar closed.
            stack.callback(measured.close)
            for item in slots:
                if isinstance(item, dict):
                    row = item
                    if row["error"] and row["source"] not in finished:
                        tqdm.write(f"error: {row['error']}", file=sys.stderr)
                else:
                    row = next(measured)
                    if row["error"]:
                        tqdm.write(f"error: {row['error']}", file=sys.stderr)
                writer.writerow({key: _cell(value) for key, value in row.items()})
                handle.flush()
                n_rows += 1
                n_failed += bool(row["error"])
            for _ in measured:  # runs the generator to its end (its progress bar closed)
                pass
    except KeyboardInterrupt:
        handle.close()
        print(f"\ninterrupted: {n_rows} of {len(slots)} rows kept in {partial}; run the same command with "
              "--resume to measure the rest", file=sys.stderr)
        return 130
    os.replace(partial, args.out)
    for stale in glob.glob(partial_pattern(args.out)):
        with contextlib.suppress(OSError):
            os.unlink(stale)
    print(f"measured {n_rows - n_failed} of {n_rows} cutouts; wrote {args.out}")
    return 1 if n_failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
