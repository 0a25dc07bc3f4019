"""predict.py end to end: cutouts read from disk, prepared, predicted and written (images/s, peak memory).

Writes N synthetic 224x224 float16 cutouts to an HDF5 file (stacked layout), then runs
``predict.py`` on it in a child process and reports its wall time, images/s and peak
resident memory, sampled from ``/proc`` while it runs together with the number of rows
written so far, so the memory can be read at several points of one run.

With ``--interrupt-at F`` the first run is interrupted (Ctrl-C) once a fraction F of the rows
is written, and ``predict.py --resume`` finishes the job: the bench checks that the rerun
predicts only the cutouts left and that the CSV then holds every cutout exactly once. A last
``--resume`` rerun over the finished CSV measures how long skipping everything takes.

Baseline, in the same run on a subset: the original's way, every cutout prepared into
memory first, then ``model.predict`` and the per-grid-point summary loop. Streaming keeps
the memory flat however many cutouts there are; the baseline's grows with N.

The input is written without the mock generator: ``--distinct`` noisy cutouts with a
central glow, tiled to N (10 GB for 100,000). It is deleted at the end.

    python bench/bench_predict.py --n 10000
    nice -n 19 python bench/bench_predict.py --tiny --n 100000 --interrupt-at 0.5
"""

import argparse
import csv
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

import machine

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Defaults; every one can be set from the command line.
N_CUTOUTS = 10_000  # cutouts streamed through predict.py
BASELINE_N = 64  # cutouts for the in-memory baseline
BATCH_SIZE = 32  # predict.py --batch-size
DISTINCT = 256  # distinct cutouts tiled to N in the input file
CHUNK = 1000  # cutouts written per HDF5 write
SAMPLE_SECONDS = 1.0  # interval of the memory samples


def write_cutouts(path, n, distinct=DISTINCT, seed=0, chunk=CHUNK):
    """N noisy 224x224 float16 cutouts with a central glow, ``distinct`` of them tiled, written chunk by chunk.

    Never holds more than ``chunk`` cutouts in memory, so N is limited only by the disk
    (100 KB a cutout).
    """
    import h5py
    import numpy as np

    import prep_data

    if n < 1 or distinct < 1:
        raise ValueError(f"n and distinct must be >= 1, got n={n}, distinct={distinct}")
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:224, :224] - 111.5
    glow = (2.0 * np.exp(-np.hypot(x, y) / 20)).astype(np.float32)
    pool = (glow + rng.normal(0, 0.03, (min(distinct, n), 224, 224))).astype(np.float16)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = prep_data.HDF5_FORMAT
        f.attrs["layout"] = "stacked"
        images = f.create_dataset("image", (n, 224, 224), dtype=np.float16, chunks=(1, 224, 224))
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            images[start : start + count] = pool[np.arange(start, start + count) % len(pool)]


def _memory_kb(pid):
    """(VmRSS, VmHWM) of a running process in kB, or None once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            values = dict(line.split(":", 1) for line in handle if line.startswith(("VmRSS", "VmHWM")))
        return int(values["VmRSS"].split()[0]), int(values["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


class RowCounter:
    """Counts the rows of a growing CSV by reading only the bytes added since the last call."""

    def __init__(self, path):
        self.path, self.offset, self.lines = path, 0, 0

    def __call__(self):
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                added = handle.read()
        except OSError:
            return max(self.lines - 1, 0)
        self.offset += len(added)
        self.lines += added.count(b"\n")
        return max(self.lines - 1, 0)  # minus the header


def run_predict(command, partial, interrupt_rows=None, interval=SAMPLE_SECONDS):
    """Run predict.py, sampling (seconds, rows written, RSS MB) until it exits.

    With ``interrupt_rows``, send SIGINT once that many rows are in the partial file.

    Returns
    -------
    dict
        ``seconds``, ``returncode``, ``peak_mb`` (VmHWM, the kernel's peak RSS), ``samples``.
    """
    counter = RowCounter(partial)
    samples, peak = [], [0]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = []
    reader = threading.Thread(target=lambda: stderr.append(process.stderr.read()), daemon=True)
    reader.start()
    interrupted = False
    while process.poll() is None:
        memory = _memory_kb(process.pid)
        rows = counter()
        if memory is not None:
            samples.append((time.perf_counter() - start, rows, memory[0] / 1024))
            peak[0] = max(peak[0], memory[1] / 1024)
        if interrupt_rows is not None and not interrupted and rows >= interrupt_rows:
            process.send_signal(signal.SIGINT)
            interrupted = True
        time.sleep(interval)
    seconds = time.perf_counter() - start
    reader.join()
    return {"seconds": seconds, "returncode": process.returncode, "peak_mb": peak[0], "samples": samples,
            "stderr": b"".join(stderr).decode(errors="replace")}


def memory_at(samples, fractions, total):
    """RSS (MB) at the first sample where each fraction of ``total`` rows had been written."""
    found = {}
    for fraction in fractions:
        for _, rows, rss in samples:
            if rows >= fraction * total:
                found[fraction] = (rows, rss)
                break
    return found


def csv_sources(path):
    """The ``source`` column of a predict.py CSV."""
    with open(path, newline="") as handle:
        return [row["source"] for row in csv.DictReader(handle)]


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n", type=int, default=N_CUTOUTS, help="cutouts streamed through predict.py")
    parser.add_argument("--baseline-n", type=int, default=BASELINE_N, help="cutouts for the in-memory baseline")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="predict.py --batch-size")
    parser.add_argument("--tiny", action="store_true", help="the tiny testing model instead of the full-size one")
    parser.add_argument("--interrupt-at", type=float, metavar="F",
                        help="interrupt the first run after this fraction of the rows, then finish with --resume")
    parser.add_argument("--distinct", type=int, default=DISTINCT, help="distinct cutouts tiled to N in the input")
    parser.add_argument("--work-dir", help="folder for the temporary input and outputs (default: the system's)")
    parser.add_argument("--sample-seconds", type=float, default=SAMPLE_SECONDS, help="interval of the memory samples")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if args.interrupt_at is not None and not 0 < args.interrupt_at < 1:
        parser.error(f"--interrupt-at must be in (0, 1), got {args.interrupt_at}")

    import keras
    import numpy as np
    from baselines import original_summary

    import model
    import prep_data

    config = model.TINY if args.tiny else model.PAPER
    print(f"machine: {machine.machine_description()}")
    print(f"model: {'tiny testing' if args.tiny else 'full-size'} ({config.image_size} px); niceness {os.nice(0)}")
    with tempfile.TemporaryDirectory(dir=args.work_dir) as folder:
        folder = pathlib.Path(folder)
        keras.utils.set_random_seed(0)
        checkpoint = folder / "icl.weights.h5"
        icl_model = model.build_icl_model(config)
        model.save_weights(icl_model, checkpoint, config)
        data = folder / "cutouts.h5"
        start = time.perf_counter()
        write_cutouts(data, args.n, args.distinct)
        print(f"input: {args.n} cutouts of 224x224 float16, {data.stat().st_size / 2**30:.2f} GiB, "
              f"written in {time.perf_counter() - start:.0f} s")

        out = folder / "out.csv"
        partial = folder / ".out.csv.partial"
        command = [sys.executable, str(ROOT / "predict.py"), str(data), "--out", str(out),
                   "--checkpoint", str(checkpoint), "--batch-size", str(args.batch_size)]
        interrupt_rows = None if args.interrupt_at is None else int(args.interrupt_at * args.n)
        first = run_predict(command, partial, interrupt_rows, args.sample_seconds)
        done_first = RowCounter(partial)() if interrupt_rows is not None else args.n
        if interrupt_rows is None and first["returncode"] != 0:
            raise SystemExit(f"predict.py failed ({first['returncode']}):\n{first['stderr'][-2000:]}")
        label = f"{args.n} cutouts streamed" if interrupt_rows is None else f"interrupted after {done_first} of {args.n} cutouts"
        print(f"predict.py, {label}: {first['seconds']:.1f} s, "
              f"{done_first / first['seconds']:.2f} images/s (process start and TensorFlow import included), "
              f"peak memory {first['peak_mb']:.0f} MB, exit status {first['returncode']}")
        points = memory_at(first["samples"], (0.1, 0.25, 0.5, 0.75, 0.9), done_first)
        print("  memory while streaming: " + ", ".join(
            f"{rows} rows {rss:.0f} MB" for rows, rss in (points[f] for f in sorted(points))))

        runs = [first]
        if interrupt_rows is not None:
            second = run_predict(command + ["--resume"], partial, None, args.sample_seconds)
            runs.append(second)
            if second["returncode"] != 0:
                raise SystemExit(f"predict.py --resume failed ({second['returncode']}):\n{second['stderr'][-2000:]}")
            left = args.n - done_first
            print(f"predict.py --resume, the {left} cutouts left: {second['seconds']:.1f} s, "
                  f"{left / second['seconds']:.2f} images/s, peak memory {second['peak_mb']:.0f} MB")
        sources = csv_sources(out)
        print(f"output: {len(sources)} rows, {len(set(sources))} distinct cutouts "
              f"({'complete' if len(sources) == len(set(sources)) == args.n else 'INCOMPLETE OR DUPLICATED'})")
        rerun = run_predict(command + ["--resume"], partial, None, args.sample_seconds)
        if rerun["returncode"] != 0:
            raise SystemExit(f"predict.py --resume rerun failed ({rerun['returncode']}):\n{rerun['stderr'][-2000:]}")
        print(f"predict.py --resume over the finished CSV (all {args.n} skipped): {rerun['seconds']:.1f} s, "
              f"peak memory {rerun['peak_mb']:.0f} MB")

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
