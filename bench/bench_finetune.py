"""Fine-tuning wall time: 5-fold cross-validation on 101 clusters, cached views against the full model.

Baseline: the original's way (``--method full``), augmenting and running the frozen encoder
at every step. Candidate: ``--method cached``, which encodes each cluster once per augmented
view and trains the dense head on the stored vectors. Each method runs as the command a user
types (``finetune.py``, so its start-up is included) on the same clusters from the same
starting checkpoint; the script prints the wall time of each and the cross-validated MAE and
Pearson r of each, so that speed and accuracy are compared together. The clusters are
synthetic (a smooth glow whose share of the light is the label).

    python bench/bench_finetune.py --clusters 101 --epochs 100
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import machine

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "tests"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clusters", type=int, default=101)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=1e-7, help="default 1e-7, the paper's")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["full", "cached"], choices=["full", "cached"])
    parser.add_argument("--checkpoint", help="trained weights to start from (default: a randomly initialised model)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model on 32x32 images")
    args = parser.parse_args(argv)

    import keras
    from synthetic import write_cluster_hdf5

    import model

    config = model.ARCHITECTURES["tiny" if args.tiny else "paper"]
    print(f"machine: {machine.machine_description()}")
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        checkpoint = args.checkpoint
        if checkpoint is None:
            keras.utils.set_random_seed(0)
            checkpoint = folder / "start.weights.h5"
            model.save_weights(model.build_icl_model(config), checkpoint, config)
        size = model.read_config(checkpoint).image_size
        clusters = folder / "clusters.h5"
        write_cluster_hdf5(clusters, args.clusters, size=2 * size, seed=1)
        print(f"{args.clusters} clusters, {size}x{size}, 5 folds, {args.epochs} epochs, learning rate {args.learning_rate}")
        times = {}
        for method in args.methods:
            command = [sys.executable, str(REPOSITORY / "finetune.py"), str(clusters), "--checkpoint", str(checkpoint),
                       "--epochs", str(args.epochs), "--learning-rate", str(args.learning_rate), "--method", method,
                       "--views", str(args.views), "--out-dir", str(folder / method)]
            start = time.perf_counter()
            result = subprocess.run(command, capture_output=True, text=True)
            times[method] = time.perf_counter() - start
            if result.returncode:
                print(f"finetune.py --method {method} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
                return result.returncode
            metrics = json.loads((folder / method / "metrics.json").read_text())["overall"]
            print(
                f"{method:>7}: {times[method]:8.1f} s   MAE {metrics['after']['mae']:.4f} (before {metrics['before']['mae']:.4f})"
                f"   Pearson r {metrics['after']['pearson_r']:.3f}"
            )
        if len(times) == 2:
            print(f"speed-up of cached over full: {times['full'] / times['cached']:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
