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


def machine_description():
    """One line naming the CPU, its cores, the accelerators and the TensorFlow version."""
    import tensorflow as tf

    cpu = cpu_name()
    gpus = tf.config.list_physical_devices("GPU")
    gpu_names = []
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu)
        gpu_names.append(details.get("device_name", gpu.name))
    accelerators = ", ".join(gpu_names) if gpu_names else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {accelerators}; TensorFlow {tf.__version__}, Python {platform.python_version()}"


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
