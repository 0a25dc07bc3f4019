"""Plumbing shared by every command: atomic writes, bad-cutout reports, progress bars,
the distribution strategy and a quiet start.

Nothing here knows about ICL or tidal features; the science lives in the other modules.
Importing this module has no side effects and does not import TensorFlow.
"""

import contextlib
import json
import os
import pathlib
import sys

import numpy as np

#: Version of the project (``pyproject.toml`` and ``CITATION.cff`` carry the same).
__version__ = "0.1.0"

# Environment read by TensorFlow's C++ core and absl when they first load.
_QUIET_ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": "3",  # no INFO/WARNING/ERROR lines from the C++ core (oneDNN, CUDA probes)
    "GRPC_VERBOSITY": "ERROR",
    "ABSL_MIN_LOG_LEVEL": "3",
}


# ----------------------------------------------------------------------------------------
# Writing files


def atomic_path(path):
    """The hidden temporary sibling of ``path`` that :func:`atomic_write` writes first.

    The name carries the process id, so two processes writing the same file never share it,
    and ends with the suffixes of ``path`` (``.weights.h5``, ``.keras``, ``.csv``...), since
    Keras and other writers choose the format from the name:
    ``runs/best.weights.h5`` -> ``runs/.best.partial-1234.weights.h5``.
    """
    path = pathlib.Path(path)
    suffix = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffix)]
    return path.with_name(f".{stem}.partial-{os.getpid()}{suffix}")


@contextlib.contextmanager
def atomic_write(path):
    """Write ``path`` all at once: the block writes the yielded temporary path, which replaces
    ``path`` only when the block ends without an exception (and is removed otherwise).

    >>> with atomic_write("table.csv") as temporary:
    ...     temporary.write_text("id,f_icl\\n")
    """
    path = pathlib.Path(path)
    temporary = atomic_path(path)
    try:
        yield temporary
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)


def write_json(path, values):
    """``values`` as indented JSON, atomically."""
    with atomic_write(path) as temporary:
        temporary.write_text(json.dumps(values, indent=2))


def save_array(path, array):
    """``np.save`` of ``array`` (never pickled), atomically."""
    with atomic_write(path) as temporary, open(temporary, "wb") as handle:
        np.save(handle, np.asarray(array), allow_pickle=False)


def write_text(path, text):
    """A text file, atomically."""
    with atomic_write(path) as temporary:
        temporary.write_text(text)


def save_keras_model(keras_model, path):
    """Save a whole Keras model (architecture and weights) to a ``.keras`` file, atomically."""
    path = pathlib.Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"model path must end with '.keras', got {path.name}")
    with atomic_write(path) as temporary:
        keras_model.save(temporary)


# ----------------------------------------------------------------------------------------
# Reporting


def report_bad_cutouts(errors, verb="processed", stream=None):
    """Print one line per bad cutout (to stderr); returns a script's exit status: 1 if any, else 0."""
    if not errors:
        return 0
    stream = stream or sys.stderr
    print(f"{len(errors)} cutout(s) could not be {verb}:", file=stream)
    for message in errors:
        print(f"  {message}", file=stream)
    return 1


def progress(iterable=None, **options):
    """A tqdm progress bar (the notebook widget in Jupyter); ``disable=True`` hides it."""
    from tqdm.auto import tqdm

    return tqdm(iterable, **options)


def epoch_progress(description):
    """A Keras callback drawing one tqdm bar over the epochs, with the latest metrics.

    Use it with ``fit(..., verbose=0)`` in place of Keras's own per-step log.
    """
    import keras

    class EpochBar(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.bar = progress(total=self.params.get("epochs"), desc=description, unit="epoch")

        def on_epoch_end(self, epoch, logs=None):
            self.bar.update(1)
            self.bar.set_postfix({key: f"{value:.3g}" for key, value in (logs or {}).items()})

        def on_train_end(self, logs=None):
            self.bar.close()

    return EpochBar()


# ----------------------------------------------------------------------------------------
# TensorFlow set-up

STRATEGIES = ("default", "mirrored", "multiworker")


def make_strategy(name="default"):
    """A ``tf.distribute`` strategy by name.

    ``default`` runs on one device; ``mirrored`` copies the model to every local GPU (or the
    visible CPU devices) and averages the gradients; ``multiworker`` does the same across
    machines, each reading the cluster layout from the ``TF_CONFIG`` environment variable.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


#: ``__name__`` of a command's own module: run as a script, or re-imported by the worker processes
#: it spawns (multiprocessing, Dask), which must start as quietly as the command.
MAIN_NAMES = ("__main__", "__mp_main__")


def quiet_start(argv=None, tensorflow=True):
    """Keep TensorFlow's start-up lines (oneDNN notice, CUDA probes, absl) off the terminal.

    Call it first thing in a command, before anything imports TensorFlow. It sets the log
    levels a user has not set and, with ``tensorflow=True``, imports TensorFlow with the
    process's standard error closed for the duration of the import (the C++ core writes its
    notices there before any log level is read). Python errors of the import still surface.
    ``--verbose`` among the arguments (``argv``, default ``sys.argv``) leaves everything as it
    is. Returns whether it silenced anything.
    """
    argv = sys.argv[1:] if argv is None else argv
    if "--verbose" in argv:
        return False
    for key, value in _QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if tensorflow and "tensorflow" not in sys.modules:
        sys.stderr.flush()
        saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(null)
    return True


def add_verbose_argument(parser):
    """``--verbose``: show TensorFlow's own start-up and log lines (read by :func:`quiet_start`)."""
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's start-up and log messages as well as the command's own")
    return parser
