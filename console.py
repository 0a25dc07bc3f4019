"""The installed commands: each one runs a script's ``main()`` after a quiet start.

``pip install -e .`` makes these console commands (``pyproject.toml``); from a checkout the
scripts run as they always did (``python predict.py ...``). This module only dispatches: it
imports a script when its command runs, so a command loads only what it needs, and TensorFlow
loads quietly (no start-up notices unless ``--verbose``).
"""

import importlib
import sys

import common

#: Command name -> (module whose ``main(argv)`` it runs, whether that module loads TensorFlow).
COMMANDS = {
    "icl-train": ("train", True),
    "icl-finetune": ("finetune", True),
    "icl-predict": ("predict", True),
    "icl-gradcam": ("gradcam", True),
    "icl-prep-data": ("prep_data", False),
    "icl-measure-sb": ("measure_sb_cut.__main__", False),
    "tidal-train": ("nnclr_train", True),
    "tidal-test": ("nnclr_test", True),
    "tidal-similarity": ("similarity", False),
    "mock-generate": ("data.generate", False),
}


def run(command, argv=None):
    """Run ``command`` (a key of :data:`COMMANDS`) with ``argv`` (default ``sys.argv[1:]``); returns its exit status."""
    module_name, uses_tensorflow = COMMANDS[command]
    argv = sys.argv[1:] if argv is None else list(argv)
    common.quiet_start(argv, tensorflow=uses_tensorflow)
    return importlib.import_module(module_name).main(argv)


def _entry_point(command):
    def entry():
        return run(command)

    entry.__name__ = entry.__qualname__ = command.replace("-", "_")
    entry.__doc__ = f"The ``{command}`` command."
    return entry


icl_train = _entry_point("icl-train")
icl_finetune = _entry_point("icl-finetune")
icl_predict = _entry_point("icl-predict")
icl_gradcam = _entry_point("icl-gradcam")
icl_prep_data = _entry_point("icl-prep-data")
icl_measure_sb = _entry_point("icl-measure-sb")
tidal_train = _entry_point("tidal-train")
tidal_test = _entry_point("tidal-test")
tidal_similarity = _entry_point("tidal-similarity")
mock_generate = _entry_point("mock-generate")
