"""Dask throughput: predict.py's and measure_sb_cut's cutouts/s without Dask and on local clusters.

    python bench/bench_dask.py [--n 96] [--workers 1 2] [--partition-size 16] [--tiny]

Writes N synthetic clusters (``measure_sb_cut.validate.write_synthetic_shard``, the stacked
HDF5 layout with a redshift per cutout) and, on these same cutouts, times in this one run:

* ``predict``: ``inference.run`` (the loop of ``predict.py``; the ICL model with random
  weights, full-size unless ``--tiny``) in this process, the single-process baseline, then on
  a ``LocalCluster`` of each ``--workers`` count (``parallel.dask_client("local:N")``);
* ``measure_sb_cut``: ``measure_sb_cut.measure.measure_refs`` in this process (``workers=1``),
  then on the same clusters;
* the scheduling overhead per partition: the wall time of ``--noop-tasks`` tasks that do
  nothing, submitted through ``parallel.map_in_order``, divided by their number;
* an estimate of the wall time for ``--survey`` clusters (500,000) on N machines like this
  one, from the measured costs; the formula is printed with the numbers.

The cluster's start (and each worker's first model load, which happens inside the timed run)
is reported apart. Nothing is written outside a temporary folder.
"""

import argparse
import os
import pathlib
import tempfile
import time

import machine
import common

if __name__ in common.MAIN_NAMES:
    common.quiet_start()  # before TensorFlow loads: no start-up noise

# Defaults; every one can be set from the command line.
N_CUTOUTS = 96  # synthetic clusters measured and predicted
WORKERS = (1, 2)  # LocalCluster sizes timed
PARTITION_SIZE = 16  # cutouts per Dask task in the timed runs
NOOP_TASKS = 200  # tasks of the scheduling-overhead measurement
SURVEY = 500_000  # clusters of the survey-scale estimate
MACHINES = (1, 10, 100)  # machine counts of the estimate
BATCH_SIZE = 32  # predict batch size


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n", type=int, default=N_CUTOUTS, help="synthetic clusters")
    parser.add_argument("--workers", type=int, nargs="+", default=WORKERS, help="LocalCluster sizes (local:N)")
    parser.add_argument("--partition-size", type=int, default=PARTITION_SIZE, help="cutouts per Dask task")
    parser.add_argument("--noop-tasks", type=int, default=NOOP_TASKS, help="tasks of the overhead measurement")
    parser.add_argument("--survey", type=int, default=SURVEY, help="clusters of the survey-scale estimate")
    parser.add_argument("--machines", type=int, nargs="+", default=MACHINES, help="machine counts of the estimate")
    parser.add_argument("--tiny", action="store_true", help="the tiny testing ICL model instead of the full-size one")
    parser.add_argument("--skip-predict", action="store_true", help="time measure_sb_cut only")
    return parser


def timed(function):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n < 1 or args.partition_size < 1 or args.noop_tasks < 1 or min(args.workers) < 1:
        parser.error("--n, --partition-size, --noop-tasks and --workers must be >= 1")

    import keras

    import inference
    import model
    import parallel
    import prep_data
    from measure_sb_cut.measure import REESTIMATE_BOX_SIZES, measure_refs
    from measure_sb_cut.validate import write_synthetic_shard

    print(f"machine: {machine.machine_description()}")
    print(f"load average before: {os.getloadavg()[0]:.2f}; niceness {os.nice(0)}")
    config = model.TINY if args.tiny else model.PAPER
    costs = {}  # command -> {"none": s/cutout, N: s/cutout}
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        shard = folder / "clusters.h5"
        _, seconds = timed(lambda: write_synthetic_shard(shard, args.n, seed=0))
        refs, _ = prep_data.index_cutouts([shard])
        print(f"input: {args.n} synthetic 224x224 clusters, written in {seconds:.1f} s; "
              f"partitions of {args.partition_size} ({-(-args.n // args.partition_size)} tasks)")
        checkpoint = folder / "icl.weights.h5"
        keras.utils.set_random_seed(0)
        model.save_weights(model.build_icl_model(config), checkpoint, config)

        def predict(client=None, out="p.csv"):
            count, _, _ = inference.run([shard], folder / out, checkpoint=checkpoint, batch_size=BATCH_SIZE,
                                        progress=False, client=client, partition_size=args.partition_size)
            return count

        def measure(client=None):
            rows = list(measure_refs(refs, options={"reestimate_box_sizes": REESTIMATE_BOX_SIZES}, workers=1,
                                     progress=False, client=client, partition_size=args.partition_size))
            return sum(1 for row in rows if not row["error"])

        commands = {"measure_sb_cut": measure} if args.skip_predict else {"predict": predict, "measure_sb_cut": measure}
        for name, run in commands.items():
            # In this process, twice (the first call also warms TensorFlow up), as the clusters below.
            count, seconds = timed(run)
            _, again_seconds = timed(run)
            costs[name] = {"none": min(seconds, again_seconds) / args.n}
            print(f"{name:>15}, no Dask (one process): {count} cutouts in {seconds:.2f} s "
                  f"({args.n / seconds:.2f} cutouts/s), again {again_seconds:.2f} s ({args.n / again_seconds:.2f} cutouts/s)")

        overhead = None
        for workers in args.workers:
            quiet = not args.skip_predict
            start = time.perf_counter()
            with parallel.dask_client(f"local:{workers}", quiet=quiet) as client:
                start_seconds = time.perf_counter() - start
                print(f"local:{workers}: cluster started in {start_seconds:.2f} s"
                      f"{' (workers import TensorFlow)' if quiet else ''}")
                for name, run in commands.items():
                    count, seconds = timed(lambda: run(client))
                    again, again_seconds = timed(lambda: run(client))
                    costs[name][workers] = min(seconds, again_seconds) / args.n
                    print(f"{name:>15}, --dask local:{workers}: {count} cutouts in {seconds:.2f} s "
                          f"({args.n / seconds:.2f} cutouts/s, first run: imports and model loads on the workers), "
                          f"again {again_seconds:.2f} s ({args.n / again_seconds:.2f} cutouts/s)")
                noop_parts = [[index] for index in range(args.noop_tasks)]
                list(parallel.map_in_order(client, len, noop_parts[:10]))  # warm the connections
                _, seconds = timed(lambda: list(parallel.map_in_order(client, len, noop_parts)))
                per_task = seconds / args.noop_tasks
                overhead = per_task if overhead is None else min(overhead, per_task)
                print(f"scheduling overhead, local:{workers}: {args.noop_tasks} no-op tasks in {seconds:.2f} s, "
                      f"{1e3 * per_task:.2f} ms per partition")
    print(f"load average after: {os.getloadavg()[0]:.2f}")

    # The estimate: the machine's throughput scales with the machines; the scheduler hands out
    # the tasks one after the other, so its overhead per task does not.
    workers = max(args.workers)
    cores = os.cpu_count() or 1
    tasks = -(-args.survey // parallel.PARTITION_SIZE)
    print(f"\nestimate for {args.survey:,} clusters, partitions of {parallel.PARTITION_SIZE} "
          f"({tasks:,} tasks per command), machines like this one ({cores} cores) each running local:{workers}:")
    print("  wall(M) = S * c / M + T * o,  c = measured seconds per cutout of one machine (local:"
          f"{workers}, warm), o = {1e3 * overhead:.2f} ms scheduling per task, T = {tasks:,} tasks, M machines")
    total = {machines: 0.0 for machines in args.machines}
    for name, cost in costs.items():
        machine_cost = cost[workers]
        print(f"  {name}: c = {1e3 * machine_cost:.1f} ms/cutout ({1 / machine_cost:.2f} cutouts/s per machine; "
              f"{1 / cost['none']:.2f} without Dask)")
        for machines in args.machines:
            wall = args.survey * machine_cost / machines + tasks * overhead
            total[machines] += wall
            print(f"    M = {machines:>4}: {args.survey:,} x {machine_cost:.4f} / {machines} + {tasks:,} x "
                  f"{overhead:.4f} = {wall:,.0f} s ({wall / 3600:.2f} h)")
    if len(costs) > 1:
        print("  both commands: " + ", ".join(f"M = {machines}: {wall / 3600:.2f} h" for machines, wall in total.items()))


if __name__ == "__main__":
    main()
