"""ICL training-step throughput (images/s) of Keras ``fit``, on the Keras backend in use.

Baseline: the training step as Keras runs it by default on the backend, in fp32: without
XLA on TensorFlow, compiled by XLA on JAX (JAX always compiles). Candidates, measured in the
same run: on TensorFlow XLA (``jit_compile=True``), and on a GPU mixed precision
(``mixed_bfloat16``). Prints images/s and the ratio to the baseline for each; ``--json FILE``
also writes them.

    python bench/bench_train_step.py --batch-size 50 --steps 5
    KERAS_BACKEND=jax python bench/bench_train_step.py --batch-size 50 --steps 50
"""

import argparse
import json
import time

import machine


def repeated_batch(images, labels, steps):
    """A ``keras.utils.PyDataset`` that gives the same batch ``steps`` times (data loading is not timed)."""
    import keras

    class Repeated(keras.utils.PyDataset):
        def __len__(self):
            return steps

        def __getitem__(self, index):
            return images, labels

    return Repeated()


def measure(config, batch_size, steps, jit_compile, policy):
    """Images per second of ``steps`` training steps after one warm-up epoch of two steps."""
    import keras
    import numpy as np

    import model

    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        icl_model = model.build_icl_model(config, augment=True, seed=0)
        icl_model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=model.BetaMixtureNLL(), jit_compile=jit_compile)
        rng = np.random.default_rng(0)
        images = rng.normal(1, 1, (batch_size, config.image_size, config.image_size, 1)).astype(np.float32)
        labels = rng.uniform(0.02, 0.45, batch_size).astype(np.float32)
        icl_model.fit(repeated_batch(images, labels, 2), epochs=1, verbose=0)  # compiles the step
        start = time.perf_counter()
        icl_model.fit(repeated_batch(images, labels, steps), epochs=1, verbose=0)
        return steps * batch_size / (time.perf_counter() - start)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def variants(backend, on_gpu):
    """(name, jit_compile, policy) of the baseline and the candidates for this backend and machine."""
    if backend == "tensorflow":
        rows = [("fp32, no XLA (baseline)", False, "float32"), ("fp32, XLA", True, "float32")]
    else:
        rows = [("fp32 (baseline)", "auto", "float32")]
    if on_gpu:
        rows.append(("bfloat16 mixed, XLA", True if backend == "tensorflow" else "auto", "mixed_bfloat16"))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=50, help="training batch (default 50, the paper's)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--tiny", action="store_true", help="the tiny testing model (to check the script quickly)")
    parser.add_argument("--json", metavar="FILE", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    import keras

    import model

    config = model.TINY if args.tiny else model.PAPER
    description = machine.machine_description()
    print(f"machine: {description}")
    print(f"model: {config}; batch {args.batch_size}, {args.steps} timed steps")
    rows, baseline = [], None
    for name, jit_compile, policy in variants(keras.backend.backend(), bool(machine.accelerators())):
        rate = measure(config, args.batch_size, args.steps, jit_compile, policy)
        baseline = baseline or rate
        rows.append({"variant": name, "images_per_s": rate, "ratio": rate / baseline})
        print(f"{name:>26}: {rate:9.2f} images/s  ({rate / baseline:.2f}x)")
    if args.json:
        results = {"benchmark": "icl_train_step", "machine": description, "model": str(config),
                   "batch_size": args.batch_size, "steps": args.steps, "rows": rows}
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
