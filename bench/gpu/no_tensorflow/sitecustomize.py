"""Make every Python process started with this folder on ``PYTHONPATH`` behave as if TensorFlow
were not installed, as on the GPU machine: ``import tensorflow`` (and tensorflow_probability,
tensorflow_datasets, tf_keras) raises ``ModuleNotFoundError``.

``bench/gpu/kit.py --dry-run`` puts this folder first on the path of the commands it runs, so
the dry run proves that the GPU chain never imports TensorFlow.
"""

import importlib.abc
import sys

BLOCKED = ("tensorflow", "tensorflow_probability", "tensorflow_datasets", "tf_keras")


class _NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named '{name}' (TensorFlow is blocked: GPU-machine rehearsal)", name=name)
        # Anything else: not this finder's (None), the next finder looks.


sys.meta_path.insert(0, _NoTensorFlow())
