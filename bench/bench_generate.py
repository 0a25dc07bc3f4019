"""Throughput of the mock generator on this machine: clusters/s (and tidal galaxies/s) with one
process and with all cores, in the same run, through ``data.shards.generate_shards`` (rendering
and writing the HDF5 shards included).

``--compare-tensorflow`` also times the core of the cluster renderer (two full-frame Sersic
profiles, a few hundred point sources, an FFT convolution with a Moffat PSF, noise, and the
resize to 224) written once in NumPy/SciPy and once in TensorFlow ops, on the CPU.

Usage: python bench/bench_generate.py [--clusters 48] [--tidal 400] [--workers K] [--compare-tensorflow]
"""

import argparse
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# Defaults (each can be set on the command line).
CLUSTERS = 48
TIDAL = 400
SEED = 123
CORE_SIZES = (585, 1152)
CORE_REPEATS = 5


def time_generation(kind, n, workers, shard_size):
    """Seconds to generate ``n`` cutouts of ``kind`` with ``workers`` processes (into a temporary folder)."""
    from data import shards

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        shards.generate_shards(kind, n, SEED, pathlib.Path(folder) / kind, workers=workers, shard_size=shard_size,
                               progress=False)
        return time.perf_counter() - started


def cpu_seconds_per_cutout(kind, n):
    """Mean CPU seconds to render one cutout in this process (no writing): less sensitive than
    wall-clock rates to other jobs sharing the cores."""
    from data import shards

    shards.render_one(kind, SEED, n)  # imports and caches
    started = time.process_time()
    for index in range(n):
        shards.render_one(kind, SEED, index)
    return (time.process_time() - started) / n


def numpy_core(size, rng):
    """The renderer's heavy steps in NumPy/SciPy (as data.clusters does them)."""
    import prep_data
    from data import clusters, profiles

    canvas = np.zeros((size, size), np.float32)
    centre = (size - 1) / 2
    profiles.add_sersic(canvas, centre, centre, 5000.0, size / 20, 4.0, 0.8, 0.3)
    profiles.add_sersic(canvas, centre, centre, 2000.0, size / 6, 1.0, 0.7, 0.4)
    x, y = rng.uniform(0, size - 1, (2, 300))
    profiles.add_points(canvas, x, y, rng.uniform(1, 50, 300))
    (convolved,) = clusters.convolve_fft([canvas], profiles.moffat_psf(3.0, 3.0))
    convolved += rng.standard_normal(convolved.shape, dtype=np.float32) * np.float32(0.03)
    return prep_data.resize_image(convolved)


def tensorflow_core(size, seed):
    """The same steps in TensorFlow ops (a prototype of a TF renderer)."""
    import tensorflow as tf

    coords = tf.range(size, dtype=tf.float32) - (size - 1) / 2

    def sersic(flux, r_eff, n, q, angle):
        dx, dy = coords[None, :], coords[:, None]
        major = dx * tf.cos(angle) + dy * tf.sin(angle)
        minor = (-dx * tf.sin(angle) + dy * tf.cos(angle)) / q
        radius = tf.sqrt(major**2 + minor**2) / r_eff
        b = 2.0 * n - 1.0 / 3.0
        profile = tf.exp(-b * (radius ** (1.0 / n) - 1.0))
        return flux * profile / tf.reduce_sum(profile)

    seeds = [tf.stack([seed, tf.constant(stream, tf.int64)]) for stream in range(3)]
    image = sersic(5000.0, size / 20, 4.0, 0.8, 0.3) + sersic(2000.0, size / 6, 1.0, 0.7, 0.4)
    positions = tf.cast(tf.random.stateless_uniform((300, 2), seeds[0], 0, size - 1), tf.int32)
    image = tf.tensor_scatter_nd_add(image, positions, tf.random.stateless_uniform((300,), seeds[1], 1.0, 50.0))
    radius = tf.sqrt(coords[None, :] ** 2 + coords[:, None] ** 2)
    psf = tf.roll((1.0 + (radius / 2.0) ** 2) ** -3.0, (-(size // 2), -(size // 2)), (0, 1))
    psf = psf / tf.reduce_sum(psf)
    convolved = tf.signal.irfft2d(tf.signal.rfft2d(image) * tf.signal.rfft2d(psf), fft_length=(size, size))
    convolved += 0.03 * tf.random.stateless_normal((size, size), seeds[2])
    return tf.image.resize(convolved[None, :, :, None], (224, 224), antialias=True)[0, :, :, 0]


def compare_tensorflow(sizes=CORE_SIZES, repeats=CORE_REPEATS):
    import tensorflow as tf

    # One thread, like one NumPy worker process: the comparison is per core.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    rng = np.random.default_rng(0)
    results = []
    compiled = tf.function(tensorflow_core, reduce_retracing=True)
    for size in sizes:
        numpy_core(size, rng)
        started = time.perf_counter()
        for _ in range(repeats):
            numpy_core(size, rng)
        numpy_seconds = (time.perf_counter() - started) / repeats
        compiled(size, tf.constant(0, tf.int64)).numpy()
        started = time.perf_counter()
        for seed in range(repeats):
            compiled(size, tf.constant(seed + 1, tf.int64)).numpy()
        tensorflow_seconds = (time.perf_counter() - started) / repeats
        results.append((size, numpy_seconds, tensorflow_seconds, tf.config.list_physical_devices("GPU") != []))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=CLUSTERS, help=f"clusters per timing (default {CLUSTERS})")
    parser.add_argument("--tidal", type=int, default=TIDAL, help=f"tidal galaxies per timing (default {TIDAL})")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes of the parallel run (default: all cores)")
    parser.add_argument("--compare-tensorflow", action="store_true", help="also time the renderer core in NumPy and in TensorFlow")
    args = parser.parse_args(argv)
    if args.clusters < 1 or args.workers < 1:
        parser.error("--clusters and --workers must be at least 1")
    print(f"machine: {os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.2f}")
    shard = max(1, args.clusters // (2 * args.workers))
    single = time_generation("clusters", args.clusters, 1, shard)
    parallel = time_generation("clusters", args.clusters, args.workers, shard)
    print(f"clusters: 1 process {args.clusters / single:.2f}/s; {args.workers} processes {args.clusters / parallel:.2f}/s "
          f"(x{single / parallel:.2f}; {args.clusters} clusters each, HDF5 writing included)")
    cpu = cpu_seconds_per_cutout("clusters", args.clusters)
    print(f"clusters: {cpu:.3f} CPU s each; {os.cpu_count()} idle cores would make about {os.cpu_count() / cpu:.1f}/s")
    try:
        import data.tidal  # noqa: F401

        have_tidal = True
    except ImportError:
        have_tidal = False
        print("tidal: data.tidal is not importable here; skipped")
    if have_tidal and args.tidal > 0:
        shard = max(1, args.tidal // (2 * args.workers))
        single = time_generation("tidal", args.tidal, 1, shard)
        parallel = time_generation("tidal", args.tidal, args.workers, shard)
        print(f"tidal: 1 process {args.tidal / single:.1f}/s; {args.workers} processes {args.tidal / parallel:.1f}/s (x{single / parallel:.2f})")
        cpu = cpu_seconds_per_cutout("tidal", args.tidal)
        print(f"tidal: {1000 * cpu:.1f} CPU ms each; {os.cpu_count()} idle cores would make about {os.cpu_count() / cpu:.0f}/s")
    if args.compare_tensorflow:
        for size, numpy_seconds, tensorflow_seconds, on_gpu in compare_tensorflow():
            device = "GPU" if on_gpu else "CPU"
            print(f"renderer core {size}x{size}: NumPy/SciPy {1000 * numpy_seconds:.0f} ms, "
                  f"TensorFlow ({device}) {1000 * tensorflow_seconds:.0f} ms")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
