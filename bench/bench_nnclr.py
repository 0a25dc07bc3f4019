"""Throughput of the NNCLR tidal-feature detector: training steps and classifier inference.

Times ``NNCLR.train_step`` (two augmented views, encoder, projection head, nearest-neighbour
loss, queue update, Adam) and the classifier's forward pass on the deterministic test-time
view, on random stretched images of the configured size. Runs on whatever device TensorFlow
sees (a GPU when there is one). The first step of each is a warm-up (tracing) and is not timed.

Example::

    python bench/bench_nnclr.py                      # paper configuration, 128 px, batch 220
    python bench/bench_nnclr.py --batch-size 32 --steps 3 --out bench/nnclr_cpu.json
"""

import pathlib
import sys

# Benchmarks run as scripts from anywhere; the project's modules live one folder up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import common  # noqa: E402

if __name__ in common.MAIN_NAMES:
    common.quiet_start()  # before TensorFlow loads: no start-up noise unless --verbose

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

# Defaults; every one can be set from the command line.
BATCH_SIZE = 220  # images per NNCLR step (Desmons et al. 2023)
STEPS = 5  # timed NNCLR steps
INFERENCE_BATCH_SIZE = 256  # images per classifier forward pass
INFERENCE_BATCHES = 5  # timed classifier forward passes
SEED = 0


def device_description():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"GPU: {details.get('device_name', gpus[0].name)}"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores visible"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny NNCLR configuration instead of the paper's")
    parser.add_argument("--binning", type=int, default=1,
                        help="pixels averaged per side before the encoder (1: the paper's; the CPU checkpoint uses 2)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--inference-batch-size", type=int, default=INFERENCE_BATCH_SIZE)
    parser.add_argument("--inference-batches", type=int, default=INFERENCE_BATCHES)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", help="also write the results to this JSON file")
    common.add_verbose_argument(parser)
    args = parser.parse_args(argv)
    import keras
    import numpy as np
    import tensorflow as tf

    import nnclr_model

    keras.utils.set_random_seed(args.seed)
    config = nnclr_model.TINY_CONFIG if args.tiny else nnclr_model.NNCLRConfig()
    if args.binning != 1:
        config = dataclasses.replace(config, binning=args.binning)
    rng = np.random.default_rng(args.seed)
    model = nnclr_model.NNCLR(config, seed=args.seed)
    model.compile(optimizer=keras.optimizers.Adam())
    images = tf.constant(rng.normal(size=(args.batch_size,) + config.input_shape).astype(np.float32))
    step = tf.function(model.train_step, reduce_retracing=True)
    keras.ops.convert_to_numpy(step(images)["loss"])
    start = time.perf_counter()
    for _ in range(args.steps):
        logs = step(images)
    keras.ops.convert_to_numpy(logs["loss"])
    train_seconds = time.perf_counter() - start

    classifier = nnclr_model.build_classifier(model.encoder, config)
    predict = tf.function(lambda batch: classifier(batch, training=False))
    batch = tf.constant(rng.normal(size=(args.inference_batch_size,) + config.input_shape).astype(np.float32))
    keras.ops.convert_to_numpy(predict(batch))
    start = time.perf_counter()
    for _ in range(args.inference_batches):
        scores = predict(batch)
    keras.ops.convert_to_numpy(scores)
    inference_seconds = time.perf_counter() - start

    results = {
        "device": device_description(),
        "config": "tiny" if args.tiny else "paper",
        "binning": config.binning,
        "image_shape": list(config.input_shape),
        "train_batch_size": args.batch_size,
        "train_steps": args.steps,
        "train_images_per_second": args.batch_size * args.steps / train_seconds,
        "inference_batch_size": args.inference_batch_size,
        "inference_batches": args.inference_batches,
        "inference_images_per_second": args.inference_batch_size * args.inference_batches / inference_seconds,
        "tensorflow": tf.__version__,
    }
    print(json.dumps(results, indent=2))
    if args.out:
        common.write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
