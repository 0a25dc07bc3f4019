"""Throughput of the surface-brightness measurement: cutouts per second, parallel and single-process.

    python bench/bench_sb_cut.py [--n-cutouts N] [--workers K] [--shard FILE] [--out RESULT.json]

Measures the same 224 x 224 cutouts (synthetic clusters in the stacked HDF5 layout, read from
disk as the command line reads them) twice in one run: with the command line's process pool
over K workers, then with a plain loop over ``measure_sb_cut.measure.measure_ref`` in this
process. Both include reading the cutouts and the background re-estimates. Target: at least
10 cutouts/s on 2 cores.
"""

import argparse
import json
import os
import pathlib
import resource
import sys
import tempfile
import time

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

import common  # noqa: E402

# Defaults; each can be set on the command line.
N_CUTOUTS = 100
WORKERS = os.cpu_count() or 1
SEED = 0
TARGET_CUTOUTS_PER_S = 10.0


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cutouts", type=int, default=N_CUTOUTS, help=f"cutouts to measure (default {N_CUTOUTS})")
    parser.add_argument("--workers", type=int, default=WORKERS, help=f"processes of the parallel run (default {WORKERS})")
    parser.add_argument("--shard", help="stacked HDF5 file of cutouts to use (default: synthetic clusters in a temporary file)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed of the synthetic clusters (default {SEED})")
    parser.add_argument("--method", choices=("canepa2025", "improved"), default="canepa2025",
                        help="measurement method (default canepa2025, the command's default)")
    parser.add_argument("--out", help="also write the numbers to this JSON file")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    import prep_data
    from measure_sb_cut.measure import measure_ref, measure_refs
    from measure_sb_cut.validate import machine_description, write_synthetic_shard

    with tempfile.TemporaryDirectory() as directory:
        shard = args.shard
        if shard is None:
            shard = os.path.join(directory, "clusters.h5")
            print(f"writing {args.n_cutouts} synthetic clusters ...", flush=True)
            write_synthetic_shard(shard, args.n_cutouts, args.seed)
        refs, _ = prep_data.index_cutouts([shard])
        refs = refs[: args.n_cutouts]

        load_before = os.getloadavg()[0]
        # The pool forks first, before this process opens the HDF5 file for the plain loop.
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        options = {"method": args.method}
        parallel_rows = list(measure_refs(refs, workers=args.workers, progress=False, options=options))
        parallel_s = time.perf_counter() - start
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        parallel_cpu_s = (children_after.ru_utime + children_after.ru_stime) - (
            children_before.ru_utime + children_before.ru_stime
        )

        start, cpu_start = time.perf_counter(), time.process_time()
        single_rows = [measure_ref(ref, options=options) for ref in refs]
        single_s = time.perf_counter() - start
        single_cpu_s = time.process_time() - cpu_start
        load_after = os.getloadavg()[0]

    failures = sum(1 for row in parallel_rows + single_rows if row["error"])
    same = all(a["f_icl"] == b["f_icl"] for a, b in zip(parallel_rows, single_rows) if not a["error"])
    result = {
        "machine": machine_description(),
        "method": args.method,
        "n_cutouts": len(refs),
        "workers": args.workers,
        "parallel_s": parallel_s,
        "parallel_cutouts_per_s": len(refs) / parallel_s,
        "single_process_s": single_s,
        "single_process_cutouts_per_s": len(refs) / single_s,
        "speedup": single_s / parallel_s,
        # CPU time of the plain loop: what one free core would do, whatever else runs here.
        "single_process_cpu_ms_per_cutout": 1000 * single_cpu_s / len(refs),
        "parallel_workers_cpu_ms_per_cutout": 1000 * parallel_cpu_s / len(refs),
        "load_average_before_after": [load_before, load_after],
        "failures": failures,
        "identical_results": same,
    }
    print(f"machine: {result['machine']}")
    print(f"{len(refs)} cutouts of 224x224, background re-estimates included")
    print(f"parallel, {args.workers} workers: {result['parallel_cutouts_per_s']:.1f} cutouts/s ({parallel_s:.1f} s)")
    print(f"single process:       {result['single_process_cutouts_per_s']:.1f} cutouts/s ({single_s:.1f} s)")
    print(f"single process CPU time: {result['single_process_cpu_ms_per_cutout']:.0f} ms per cutout "
          f"(= {1000 / result['single_process_cpu_ms_per_cutout']:.1f} cutouts/s per free core)")
    print(f"parallel workers' CPU time: {result['parallel_workers_cpu_ms_per_cutout']:.0f} ms per cutout")
    print(f"1-min load average before/after: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} cores")
    print(f"speedup {result['speedup']:.2f}x; target {TARGET_CUTOUTS_PER_S:g} cutouts/s: "
          f"{'met' if result['parallel_cutouts_per_s'] >= TARGET_CUTOUTS_PER_S else 'not met'}")
    if args.out:
        common.write_text(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
