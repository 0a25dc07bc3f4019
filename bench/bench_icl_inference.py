"""ICL inference throughput: the model plus the mixture summary, against the original's way.

Baseline (as the original code did): ``model.predict`` in fp32, then the summary computed by
a Python loop over grid points, one ``prob`` call of the mixture per point. Fast path:
``model.Predictor``, the forward pass and the vectorised summary in one compiled function.
Both run in the same process on the same random images, so the ratio survives a noisy
machine. Prints images/s per batch size and the largest difference of the two modes.

    python bench/bench_icl_inference.py --batch-sizes 1 32 256
    KERAS_BACKEND=jax python bench/bench_icl_inference.py --batch-sizes 1 32 256 --json jax.json

``--json FILE`` also writes the rows. ``--no-baseline`` times the fast path alone (the
baseline's Python loop over 1001 grid points is slow at large batches).
"""

import argparse
import json

import machine
from baselines import original_summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--batches", type=int, default=2, help="batches timed per batch size (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats; the fastest counts (default 2)")
    parser.add_argument("--jit", action="store_true", help="XLA-compile the fast path")
    parser.add_argument("--tiny", action="store_true", help="the tiny testing model (to check the script quickly)")
    parser.add_argument("--no-baseline", action="store_true", help="time the fast path only")
    parser.add_argument("--json", metavar="FILE", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    import numpy as np

    import model

    config = model.TINY if args.tiny else model.PAPER
    icl_model = model.build_icl_model(config)
    predictor = model.Predictor(icl_model, jit_compile=args.jit)
    grid = model.summary_grid()
    description = machine.machine_description()
    print(f"machine: {description}")
    print(f"model: {icl_model.count_params():,} parameters, {config.image_size}x{config.image_size} input; grid of {grid.size} points")
    print(f"{'batch':>6} {'images':>7} {'baseline img/s':>15} {'fast img/s':>11} {'ratio':>6} {'max |mode diff|':>16}")
    rng = np.random.default_rng(0)
    rows = []
    for batch_size in args.batch_sizes:
        n = batch_size * args.batches
        images = rng.normal(1.0, 1.0, (n, config.image_size, config.image_size, 1)).astype(np.float32)

        def baseline():
            params = icl_model.predict(images, batch_size=batch_size, verbose=0)
            return np.concatenate([original_summary(params[i : i + batch_size], grid)["mode"] for i in range(0, n, batch_size)])

        def fast():
            return np.concatenate([predictor(images[i : i + batch_size])["mode"] for i in range(0, n, batch_size)])

        fast_time = machine.best_time(fast, repeats=args.repeats)
        row = {"batch_size": batch_size, "images": n, "fast_images_per_s": n / fast_time}
        if args.no_baseline:
            print(f"{batch_size:>6} {n:>7} {'-':>15} {n / fast_time:>11.2f} {'-':>6} {'-':>16}")
        else:
            baseline_time = machine.best_time(baseline, repeats=args.repeats)
            difference = float(np.abs(baseline() - fast()).max())
            row.update(baseline_images_per_s=n / baseline_time, ratio=baseline_time / fast_time, max_mode_difference=difference)
            print(
                f"{batch_size:>6} {n:>7} {n / baseline_time:>15.2f} {n / fast_time:>11.2f} "
                f"{baseline_time / fast_time:>6.2f} {difference:>16.4f}"
            )
        rows.append(row)
    if args.json:
        results = {"benchmark": "icl_inference", "machine": description, "parameters": icl_model.count_params(),
                   "image_size": config.image_size, "jit": args.jit, "rows": rows}
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
