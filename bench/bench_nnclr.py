"""Throughput of the NNCLR tidal-feature detector: training steps and classifier inference.

Times NNCLR training through Keras ``fit`` (two augmented views, encoder, projection head,
nearest-neighbour loss, queue update, Adam) on one batch given again at every step, and the
classifier's forward pass on the deterministic test-time view, on random stretched images of
the configured size. Runs on the Keras backend in use (``KERAS_BACKEND``: TensorFlow or JAX)
and on whatever device it sees. Compiling is a warm-up and is not timed. On a GPU the
training is also timed with ``mixed_bfloat16`` (``--policies`` chooses), beside the fp32
baseline in the same run.

Example::

    python bench/bench_nnclr.py                      # paper configuration, 128 px, batch 220
    python bench/bench_nnclr.py --batch-size 32 --steps 3 --out bench/nnclr_cpu.json
    KERAS_BACKEND=jax python bench/bench_nnclr.py --steps 50 --policies float32 mixed_bfloat16
"""

import pathlib
import sys

# Benchmarks run as scripts from anywhere (or are loaded from their file): the project's modules
# live one folder up, ``machine`` beside this file.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402

if __name__ in common.MAIN_NAMES:
    common.quiet_start()  # before TensorFlow loads: no start-up noise unless --verbose

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import machine  # noqa: E402

# Defaults; every one can be set from the command line.
BATCH_SIZE = 220  # images per NNCLR step (Desmons et al. 2023)
STEPS = 5  # timed NNCLR steps
INFERENCE_BATCH_SIZE = 256  # images per classifier forward pass
INFERENCE_BATCHES = 5  # timed classifier forward passes
SEED = 0


def repeated(batch, steps):
    """A ``keras.utils.PyDataset`` giving the same unlabelled batch ``steps`` times."""
    import keras

    class Repeated(keras.utils.PyDataset):
        def __len__(self):
            return steps

        def __getitem__(self, index):
            return batch

    return Repeated()


def training_rate(config, images, steps, seed, policy):
    """Images per second of ``steps`` NNCLR training steps through ``fit`` under a dtype policy."""
    import keras

    import nnclr_model

    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(seed)
        model = nnclr_model.NNCLR(config, seed=seed)
        model.compile(optimizer=keras.optimizers.Adam())
        model.fit(repeated(images, 2), epochs=1, verbose=0)  # compiles the step
        start = time.perf_counter()
        history = model.fit(repeated(images, steps), epochs=1, verbose=0)
        seconds = time.perf_counter() - start
        return len(images) * steps / seconds, float(history.history["loss"][-1]), model
    finally:
        keras.mixed_precision.set_global_policy("float32")


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
    parser.add_argument("--policies", nargs="+", metavar="POLICY",
                        help="Keras dtype policies of the timed training, the first the baseline "
                             "(default: float32, and mixed_bfloat16 too on a GPU)")
    parser.add_argument("--out", help="also write the results to this JSON file")
    common.add_verbose_argument(parser)
    args = parser.parse_args(argv)
    import keras
    import numpy as np

    import nnclr_model

    keras.utils.set_random_seed(args.seed)
    config = nnclr_model.TINY_CONFIG if args.tiny else nnclr_model.NNCLRConfig()
    if args.binning != 1:
        config = dataclasses.replace(config, binning=args.binning)
    on_gpu = bool(machine.accelerators())
    policies = args.policies or (["float32", "mixed_bfloat16"] if on_gpu else ["float32"])
    rng = np.random.default_rng(args.seed)
    images = rng.normal(size=(args.batch_size,) + config.input_shape).astype(np.float32)
    training = []
    for policy in policies:
        rate, loss, model = training_rate(config, images, args.steps, args.seed, policy)
        training.append({"policy": policy, "images_per_second": rate, "ratio": rate / training[0]["images_per_second"]
                         if training else 1.0, "final_loss": loss})

    classifier = nnclr_model.build_classifier(model.encoder, config)
    batch = rng.normal(size=(args.inference_batch_size,) + config.input_shape).astype(np.float32)
    classifier.predict(batch, batch_size=args.inference_batch_size, verbose=0)  # compiles the forward pass
    start = time.perf_counter()
    for _ in range(args.inference_batches):
        scores = classifier.predict_on_batch(batch)
    keras.ops.convert_to_numpy(scores)
    inference_seconds = time.perf_counter() - start

    results = {
        "machine": machine.machine_description(),
        "backend": keras.backend.backend(),
        "config": "tiny" if args.tiny else "paper",
        "binning": config.binning,
        "image_shape": list(config.input_shape),
        "train_batch_size": args.batch_size,
        "train_steps": args.steps,
        "train_images_per_second": training[0]["images_per_second"],
        "training": training,
        "inference_batch_size": args.inference_batch_size,
        "inference_batches": args.inference_batches,
        "inference_images_per_second": args.inference_batch_size * args.inference_batches / inference_seconds,
    }
    print(json.dumps(results, indent=2))
    if args.out:
        common.write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
