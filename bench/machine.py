"""What every benchmark prints first: the machine it ran on, and a timer."""

import os
import pathlib
import platform
import sys
import time

# Benchmarks run as scripts from anywhere; the project's modules live one folder up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def cpu_name():
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return cpu


def accelerators():
    """Names of the accelerators the Keras backend sees (empty on a CPU-only machine)."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return [
            tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
            for gpu in tf.config.list_physical_devices("GPU")
        ]
    if backend == "jax":
        import jax

        return [device.device_kind for device in jax.devices() if device.platform != "cpu"]
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return []


def backend_version():
    """The Keras backend and its version, e.g. ``JAX 0.10.2``."""
    import keras

    backend = keras.backend.backend()
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(backend)
    version = __import__(module).__version__ if module else "?"
    name = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}.get(backend, backend)
    return f"{name} {version}"


def machine_description():
    """One line naming the CPU, its cores, the accelerators and the Keras backend with its version."""
    import keras

    names = accelerators()
    accelerator = ", ".join(names) if names else "no GPU"
    return (
        f"{cpu_name()}, {os.cpu_count()} cores, {accelerator}; {backend_version()} "
        f"(Keras {keras.__version__}), Python {platform.python_version()}"
    )


def best_time(function, repeats=3, warmup=1):
    """Smallest wall time of ``repeats`` calls after ``warmup`` calls (the least disturbed run)."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)
