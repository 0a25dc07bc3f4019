"""predict.py end to end: cutouts read from disk, prepared, predicted and written (images/s, peak memory).

Writes N synthetic 224x224 cutouts to a temporary HDF5 file (stacked layout), then runs
``predict.py`` on it in a child process and reports its wall time, images/s and peak
resident memory. Baseline, in the same run on a subset: the original's way, every cutout
prepared into memory first, then ``model.predict`` and the per-grid-point summary loop.
Streaming keeps the memory flat however many cutouts there are; the baseline's grows with N.

    python bench/bench_predict.py --n 10000
"""

import argparse
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import common

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_cutouts(path, n, seed=0, chunk=1000):
    """N noisy 224x224 cutouts with a central glow, written chunk by chunk (never all in memory)."""
    import h5py
    import numpy as np

    import prep_data

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:224, :224] - 111.5
    glow = (2.0 * np.exp(-np.hypot(x, y) / 20)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = prep_data.HDF5_FORMAT
        f.attrs["layout"] = "stacked"
        images = f.create_dataset("image", (n, 224, 224), dtype=np.float16, chunks=(1, 224, 224))
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            images[start : start + count] = (glow + rng.normal(0, 0.03, (count, 224, 224))).astype(np.float16)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10000, help="cutouts streamed through predict.py (default 10000)")
    parser.add_argument("--baseline-n", type=int, default=64, help="cutouts for the in-memory baseline (default 64)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="the tiny testing model (to check the script quickly)")
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    import model
    import prep_data
    from bench_icl_inference import original_summary

    config = model.TESTING if args.tiny else model.PAPER
    print(f"machine: {common.machine_description()}")
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        keras.utils.set_random_seed(0)
        checkpoint = folder / "icl.weights.h5"
        icl_model = model.build_icl_model(config)
        model.save_weights(icl_model, checkpoint, config)
        data = folder / "cutouts.h5"
        write_cutouts(data, args.n)

        command = [sys.executable, str(ROOT / "predict.py"), str(data), "--out", str(folder / "out.csv"),
                   "--checkpoint", str(checkpoint), "--batch-size", str(args.batch_size)]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        elapsed = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"predict.py, {args.n} cutouts streamed: {elapsed:.1f} s, {args.n / elapsed:.2f} images/s "
              f"(process start and TensorFlow import included), peak memory {peak_mb:.0f} MB")

        refs, _ = prep_data.index_cutouts([data])
        refs = refs[: args.baseline_n]
        start = time.perf_counter()
        prepared = np.stack([prep_data.load_prepared(ref, config.image_size) for ref in refs])
        params = icl_model.predict(prepared, batch_size=args.batch_size, verbose=0)
        grid = model.summary_grid()
        for i in range(0, len(params), args.batch_size):
            original_summary(params[i : i + args.batch_size], grid)
        baseline = time.perf_counter() - start
        print(f"baseline (prepare all in memory, model.predict, per-grid-point summary), {len(refs)} cutouts: "
              f"{len(refs) / baseline:.2f} images/s, {prepared.nbytes / 2**20:.0f} MB of prepared images held")


if __name__ == "__main__":
    main()
