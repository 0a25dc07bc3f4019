"""Generate mock HSC cutouts in parallel: ``python -m data.generate clusters|backgrounds|tidal``.

``--out FILE.h5`` writes one HDF5 file (its shards are built in ``FILE.h5.shards/`` and merged
at the end; ``--keep-shards`` keeps them); ``--out-dir DIR`` leaves the shards in DIR as
``KIND-00000-of-00012.h5``. A rerun of the same command keeps the complete shards and renders
only the missing ones. How the cutouts are made and stored: :mod:`data.shards`.

``--dask ADDRESS`` (a scheduler, ``tcp://host:8786``) or ``--dask local:N`` (N local worker
processes) renders the shards on a Dask cluster instead of ``--workers`` local processes, one
task per shard (``--shard-size`` sets the task's size); the output folder must be on a file
system every worker sees. The files are byte-identical to a single-process run's, and a rerun
still renders only the missing shards.

Ctrl-C cancels the queued shards, stops the running ones, keeps the finished shards (each is
written atomically) and exits with status 130; rerun the same command to render the rest.

Examples
--------
python -m data.generate clusters --n 64 --seed 1 --out clusters.h5 --preview clusters.png
python -m data.generate backgrounds --n 50000 --seed 2 --out-dir backgrounds/ --workers 16
python -m data.generate clusters --n 500000 --seed 3 --out-dir /shared/clusters/ --dask tcp://scheduler:8786
"""

import common

if __name__ in common.MAIN_NAMES:
    common.quiet_interrupt()  # a Ctrl-C while the libraries load is one line, not a traceback

import argparse
import contextlib
import logging
import sys
import time

import parallel
from data import shards

logger = logging.getLogger(__name__)

# Defaults of the command line (each can be set with the option of the same name).
N = 64
SEED = 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m data.generate",
        description="Generate mock HSC cutouts (clusters, ICL-free backgrounds, tidal galaxies) into HDF5 shards.",
    )
    parser.add_argument("kind", choices=shards.KINDS, help="what to generate")
    parser.add_argument("--n", type=int, default=N, help=f"number of cutouts (default {N})")
    parser.add_argument("--seed", type=int, default=SEED, help=f"random seed (default {SEED})")
    output = parser.add_mutually_exclusive_group(required=True)
    output.add_argument("--out", metavar="FILE", help="one output HDF5 file, FILE.h5 (the shards merged)")
    output.add_argument("--out-dir", metavar="DIR", help="output folder of HDF5 shards")
    parser.add_argument("--workers", type=int, default=shards.WORKERS,
                        help=f"worker processes of this machine (default: all {shards.WORKERS} cores; not used with --dask)")
    parser.add_argument("--shard-size", type=int, default=shards.SHARD_SIZE,
                        help=f"cutouts per shard (default {shards.SHARD_SIZE})")
    parser.add_argument("--distribution", default="training", choices=shards.DISTRIBUTIONS,
                        help="cluster parameter distribution (default training)")
    parser.add_argument("--preview", metavar="FILE", help="PNG grid of the first cutouts with their truth")
    parser.add_argument("--preview-count", type=int, default=shards.PREVIEW_COUNT,
                        help=f"cutouts in the preview (default {shards.PREVIEW_COUNT})")
    parser.add_argument("--measure-sb", action="store_true",
                        help="also measure the SB-method label f_icl_sb on each noisy cutout (needs measure_sb_cut)")
    parser.add_argument("--keep-shards", action="store_true", help="with --out FILE: keep FILE.shards/ after merging")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parallel.add_dask_argument(parser, partition_size=False)
    args = parser.parse_args(argv)
    if args.keep_shards and args.out_dir:
        parser.error("--keep-shards goes with --out FILE; with --out-dir the shards are the output")
    if args.preview_count < 1:
        parser.error(f"--preview-count must be at least 1, got {args.preview_count}")
    parallel.check_dask_arguments(parser, args)
    # --out and --out-dir are checked by data.shards before any rendering; the preview here.
    try:
        if args.preview:
            common.check_output_file(args.preview, "--preview")
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    options = dict(workers=args.workers, shard_size=args.shard_size, distribution=args.distribution,
                   progress=not args.quiet, measure_sb=args.measure_sb)
    with contextlib.ExitStack() as stack:
        client = None
        if args.dask:
            try:
                # The renderers need no TensorFlow: the workers are not made to load it.
                client = stack.enter_context(parallel.dask_client(args.dask, quiet=False))
            except ValueError as error:  # a scheduler that cannot be reached
                parser.exit(2, f"error: {error}\n")
        try:
            if args.out:
                paths = [shards.generate_file(args.kind, args.n, args.seed, args.out, keep_shards=args.keep_shards,
                                              client=client, **options)]
            else:
                paths = shards.generate_shards(args.kind, args.n, args.seed, args.out_dir, client=client, **options)
        except shards.GenerationError as error:
            parser.exit(2, f"error: {error}\n")
        except KeyboardInterrupt:
            folder = args.out_dir or f"{args.out}.shards"
            print(f"\ninterrupted: the finished shards are kept in {folder}; rerun the same command to render "
                  "the rest", file=sys.stderr)
            return 130
    try:
        if args.preview:
            shards.preview_shards(args.kind, paths, args.preview, args.preview_count)
    except shards.GenerationError as error:
        parser.exit(2, f"error: {error}\n")
    logger.info("wrote %d %s to %s in %.1f s", args.n, args.kind, args.out or args.out_dir, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
