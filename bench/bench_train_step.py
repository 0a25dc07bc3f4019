"""ICL training-step throughput (images/s): Keras ``fit`` steps with and without XLA.

Baseline: the training step as Keras runs it without XLA (``jit_compile=False``), fp32.
Candidates, measured in the same run: XLA (``jit_compile=True``) and, on a GPU, mixed
precision (``mixed_bfloat16``). Prints images/s and the ratio to the baseline for each.

    python bench/bench_train_step.py --batch-size 50 --steps 5
"""

import argparse
import time

import machine


def measure(config, batch_size, steps, jit_compile, policy):
    """Images per second of ``steps`` training steps after one warm-up step."""
    import keras
    import numpy as np
    import tensorflow as tf

    import model

    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        icl_model = model.build_icl_model(config, augment=True, seed=0)
        icl_model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=model.BetaMixtureNLL(), jit_compile=jit_compile)
        rng = np.random.default_rng(0)
        images = rng.normal(1, 1, (batch_size * (steps + 1), config.image_size, config.image_size, 1)).astype(np.float32)
        labels = rng.uniform(0.02, 0.45, len(images)).astype(np.float32)
        warmup = tf.data.Dataset.from_tensor_slices((images[:batch_size], labels[:batch_size])).batch(batch_size)
        icl_model.fit(warmup, epochs=1, verbose=0)
        timed = tf.data.Dataset.from_tensor_slices((images[batch_size:], labels[batch_size:])).batch(batch_size).cache()
        start = time.perf_counter()
        icl_model.fit(timed, epochs=1, verbose=0)
        return steps * batch_size / (time.perf_counter() - start)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=50, help="training batch (default 50, the paper's)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--tiny", action="store_true", help="the tiny testing model (to check the script quickly)")
    args = parser.parse_args(argv)

    import tensorflow as tf

    import model

    config = model.TINY if args.tiny else model.PAPER
    print(f"machine: {machine.machine_description()}")
    print(f"model: {config}; batch {args.batch_size}, {args.steps} timed steps")
    variants = [("fp32, no XLA (baseline)", False, "float32"), ("fp32, XLA", True, "float32")]
    if tf.config.list_logical_devices("GPU"):
        variants.append(("bfloat16 mixed, XLA", True, "mixed_bfloat16"))
    baseline = None
    for name, jit_compile, policy in variants:
        rate = measure(config, args.batch_size, args.steps, jit_compile, policy)
        baseline = baseline or rate
        print(f"{name:>26}: {rate:9.2f} images/s  ({rate / baseline:.2f}x)")


if __name__ == "__main__":
    main()
