"""Benchmark cosine-similarity search: exact NumPy scan against the approximate RaBitQ index.

Draws N random unit vectors in D dimensions (seeded), builds the index kinds of
``similarity.py``, and reports for each: build time, resident memory added, query latency
(one query at a time and in one batch) and, for RaBitQ, recall@k against the exact answer
along a sweep of its speed/recall knob ``refine_factor``, stopped at the first value that
reaches the target recall. The exact search of the same run is the baseline, so the ratios
survive a busy machine.

Uniform random directions (the default) are the hardest case for an approximate index:
in 128 dimensions the cosine between unrelated directions has standard deviation
1/sqrt(128) = 0.088, and a query's tenth neighbour among 10^6 is only about four of those
above zero (the script prints the mean k-th similarity), with no structure to exploit.
``--clusters`` draws points around random centres instead, closer to real representations.

Examples (the first is the issue's workload)::

    python bench/bench_similarity.py --n 1000000 --queries 1000
    python bench/bench_similarity.py --n 200000 --clusters 2000
"""

import argparse
import os
import pathlib
import platform
import sys
import time

import numpy as np
from tqdm import tqdm

# Benchmarks run as scripts from anywhere; the project's modules live one folder up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import machine  # noqa: E402

import common  # noqa: E402
import similarity  # noqa: E402

# Defaults; every one can be set from the command line.
N_VECTORS = 1_000_000
DIMENSION = 128
N_QUERIES = 1000
# Single-query latency is timed on the first this many queries (exact single queries are slow).
N_SINGLE_QUERIES = 50
K = 10
TARGET_RECALL = 0.95
# Swept in order until the target recall is met.
REFINE_FACTORS = (10, 30, 100, 300, 1000, 3000)
SEED = 0
# 0: uniform random directions (the workload). Otherwise points around this many centres.
N_CLUSTERS = 0
# Expected noise norm relative to the unit centre, for clustered catalogues.
CLUSTER_SPREAD = 0.7


def machine_description():
    """CPU model, core count, load average and library versions, in one line."""
    cpu = machine.cpu_name()
    import faiss

    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores (load average {load}); faiss {faiss.__version__} "
            f"({faiss.omp_get_max_threads()} threads), NumPy {np.__version__}, Python {platform.python_version()}")


def resident_bytes():
    """Current resident set size of this process, in bytes (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def random_unit_vectors(count, dimension, rng, centres=None, spread=0.0):
    """Uniform random directions, or points around random ``centres`` (then normalised).

    With centres, each vector is a random centre plus Gaussian noise whose expected norm is
    ``spread`` times the centre's (unit) norm: a stand-in for representations, which group
    galaxies of similar appearance.
    """
    vectors = rng.standard_normal((count, dimension), dtype=np.float32)
    if centres is not None:
        vectors *= np.float32(spread / np.sqrt(dimension))
        vectors += centres[rng.integers(len(centres), size=count)]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def recall_at_k(found, truth):
    """Mean over queries of |found ∩ truth| / k, for (Q, k) arrays of positions."""
    hits = [np.intersect1d(row_found, row_truth).size for row_found, row_truth in zip(found, truth)]
    return float(np.mean(hits)) / truth.shape[1]


def single_query_latency(index, queries, k, **search_options):
    """Median and mean seconds per query, one query per call."""
    times = []
    for query in tqdm(queries, desc=f"single queries ({index.kind})", leave=False, disable=None):
        start = time.perf_counter()
        index.query(query, k, **search_options)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.mean(times))


def benchmark_approximate(kind, catalogue, queries, single, truth, k, target_recall, seed, sweep_values):
    """Build one approximate index, sweep its speed/recall knob until the target, time single queries."""
    knob = "refine_factor"
    before = resident_bytes()
    start = time.perf_counter()
    index = similarity.build_index(catalogue, kind=kind, seed=seed)
    figures = {"build_s": time.perf_counter() - start, "memory_mb": (resident_bytes() - before) / 2**20,
               "knob": knob}
    print(f"{kind}: build {figures['build_s']:.1f} s, +{figures['memory_mb']:.0f} MB", flush=True)
    sweep = []
    for value in sweep_values:
        start = time.perf_counter()
        found, _ = index.query(queries, k, **{knob: value})
        seconds_per_query = (time.perf_counter() - start) / len(queries)
        recall = recall_at_k(found, truth)
        sweep.append({knob: value, "recall": recall, "batch_s_per_query": seconds_per_query})
        print(f"{kind} {knob}={value}: recall@{k} {recall:.4f}, batched {1e3 * seconds_per_query:.2f} ms/query",
              flush=True)
        if recall >= target_recall:
            break
    figures["sweep"] = sweep
    figures["chosen"] = sweep[-1][knob]
    figures["recall"] = sweep[-1]["recall"]
    figures["target_recall_met"] = sweep[-1]["recall"] >= target_recall
    figures["batch_s_per_query"] = sweep[-1]["batch_s_per_query"]
    figures["single_s_per_query_median"], figures["single_s_per_query_mean"] = single_query_latency(
        index, single, k, **{knob: figures["chosen"]})
    print(f"{kind} {knob}={figures['chosen']}: recall@{k} {figures['recall']:.4f} "
          f"(target {target_recall}: {'met' if figures['target_recall_met'] else 'NOT met'}), "
          f"single {1e3 * figures['single_s_per_query_median']:.2f} ms/query (median)", flush=True)
    return figures


def run(n_vectors, dimension, n_queries, n_single_queries, k, target_recall, refine_factors, seed, n_clusters=0,
        cluster_spread=CLUSTER_SPREAD):
    """Run the benchmark and return its figures as a dictionary (also printed)."""
    rng = np.random.default_rng(seed)
    centres = random_unit_vectors(n_clusters, dimension, rng) if n_clusters else None
    catalogue = random_unit_vectors(n_vectors, dimension, rng, centres, cluster_spread)
    queries = random_unit_vectors(n_queries, dimension, rng, centres, cluster_spread)
    single = queries[:n_single_queries]
    results = {"machine": machine_description(), "n_vectors": n_vectors, "dimension": dimension,
               "n_clusters": n_clusters, "cluster_spread": cluster_spread if n_clusters else None,
               "n_queries": n_queries, "k": k, "seed": seed}
    print(results["machine"], flush=True)

    before = resident_bytes()
    start = time.perf_counter()
    exact = similarity.build_index(catalogue, kind="exact")
    results["exact_build_s"] = time.perf_counter() - start
    results["exact_memory_mb"] = (resident_bytes() - before) / 2**20
    start = time.perf_counter()
    truth, truth_similarities = exact.query(queries, k)
    results["exact_batch_s_per_query"] = (time.perf_counter() - start) / n_queries
    results["exact_kth_similarity_mean"] = float(truth_similarities[:, -1].mean())
    results["exact_single_s_per_query_median"], results["exact_single_s_per_query_mean"] = (
        single_query_latency(exact, single, k))
    print(f"exact: build {results['exact_build_s']:.1f} s, +{results['exact_memory_mb']:.0f} MB, "
          f"batched {1e3 * results['exact_batch_s_per_query']:.2f} ms/query, "
          f"single {1e3 * results['exact_single_s_per_query_median']:.2f} ms/query (median); "
          f"mean similarity of the {k}th neighbour {results['exact_kth_similarity_mean']:.3f}", flush=True)
    del exact

    for kind in ("rabitq",):
        results[kind] = benchmark_approximate(kind, catalogue, queries, single, truth, k, target_recall, seed,
                                              sweep_values=refine_factors)
        results[kind]["speedup_single"] = (results["exact_single_s_per_query_median"]
                                           / results[kind]["single_s_per_query_median"])
        results[kind]["speedup_batch"] = results["exact_batch_s_per_query"] / results[kind]["batch_s_per_query"]
        print(f"{kind}: speed-up over exact at {results[kind]['knob']}={results[kind]['chosen']}: "
              f"single x{results[kind]['speedup_single']:.1f}, batched x{results[kind]['speedup_batch']:.1f}",
              flush=True)
    results["load_average_end"] = os.getloadavg()
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=N_VECTORS, help=f"catalogue size (default: {N_VECTORS})")
    parser.add_argument("--dimension", type=int, default=DIMENSION, help=f"vector length (default: {DIMENSION})")
    parser.add_argument("--queries", type=int, default=N_QUERIES, help=f"queries for recall (default: {N_QUERIES})")
    parser.add_argument("--single-queries", type=int, default=N_SINGLE_QUERIES,
                        help=f"queries timed one at a time (default: {N_SINGLE_QUERIES})")
    parser.add_argument("--k", type=int, default=K, help=f"neighbours per query (default: {K})")
    parser.add_argument("--target-recall", type=float, default=TARGET_RECALL,
                        help=f"stop the refine_factor sweep at this recall@k (default: {TARGET_RECALL})")
    parser.add_argument("--refine-factor", type=lambda text: tuple(int(value) for value in text.split(",")),
                        default=REFINE_FACTORS,
                        help="comma-separated RaBitQ refine factors to sweep "
                             f"(default: {','.join(map(str, REFINE_FACTORS))})")
    parser.add_argument("--clusters", type=int, default=N_CLUSTERS,
                        help="0: uniform random directions; else points around this many centres "
                             f"(default: {N_CLUSTERS})")
    parser.add_argument("--cluster-spread", type=float, default=CLUSTER_SPREAD,
                        help=f"noise norm relative to the centre for --clusters (default: {CLUSTER_SPREAD})")
    parser.add_argument("--seed", type=int, default=SEED, help=f"random seed (default: {SEED})")
    parser.add_argument("--out", dest="out_path", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.n < args.k or args.queries < 1 or args.single_queries < 1:
        parser.error("need --n >= --k, --queries >= 1 and --single-queries >= 1")
    if args.clusters < 0 or args.cluster_spread < 0:
        parser.error("--clusters and --cluster-spread must be >= 0")
    args.single_queries = min(args.single_queries, args.queries)
    return args


def main(argv=None):
    args = parse_args(argv)
    command = "python bench/bench_similarity.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = run(args.n, args.dimension, args.queries, args.single_queries, args.k, args.target_recall,
                  args.refine_factor, args.seed, n_clusters=args.clusters, cluster_spread=args.cluster_spread)
    results["command"] = command
    if args.out_path:
        common.write_json(args.out_path, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
