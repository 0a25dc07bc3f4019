"""Plumbing shared by every command: atomic writes, bad-cutout reports, progress bars,
the Keras backend, the distribution strategy and a quiet start.

Nothing here knows about ICL or tidal features; the science lives in the other modules.
Importing this module has no side effects and imports neither Keras nor TensorFlow, and on a
Keras backend other than TensorFlow nothing here imports TensorFlow.
"""

import contextlib
import dataclasses
import functools
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import tempfile
import types

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


def open_new_file(path):
    """Open ``path`` as a new text file for writing, never through a symbolic link.

    Whatever stands at the name is removed first (a planted link itself, never its target),
    and the file is created with ``O_EXCL | O_NOFOLLOW``, so a link planted in between fails.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return open(descriptor, "w", newline="")


def check_output_file(path, option="--out"):
    """The output file ``path``, checked before any work: its folder exists or can be made and is
    writable, and ``path`` is not a folder. Raises ValueError naming ``option`` and the path."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a folder, not a file")
    check_output_dir(path.parent, option)
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{option} {path}: the file exists and cannot be written")
    return path


def check_output_dir(path, option="--out-dir"):
    """The output folder ``path``, created if missing and checked writable before any work.
    Raises ValueError naming ``option`` and the path."""
    path = pathlib.Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"{option} {path}: exists and is not a folder") from None
    except OSError as error:
        raise ValueError(f"{option} {path}: cannot create the folder ({error.strerror})") from None
    # Try it: permission bits say nothing to root or on some network and virtual file systems.
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"{option} {path}: the folder cannot be written ({error.strerror})") from None
    return path


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
    """Close a run that logged its bad cutouts as it met them (one line each): print how many
    there were (to stderr) and return the script's exit status, 1 if any, else 0."""
    if not errors:
        return 0
    print(f"{len(errors)} cutout(s) could not be {verb} (each is named above)", file=stream or sys.stderr)
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
# The Keras backend


def keras_backend():
    """Name of the Keras backend this process runs, or will run once Keras loads.

    ``keras.backend.backend()`` once Keras is imported; before, what Keras will read: the
    ``KERAS_BACKEND`` environment variable, else the ``backend`` of ``keras.json`` in
    ``KERAS_HOME`` (default ``~/.keras``), else ``"tensorflow"``. Reading it imports nothing,
    so a command can decide before Keras loads whether TensorFlow will load at all.
    """
    keras = sys.modules.get("keras")
    backend = getattr(getattr(keras, "backend", None), "backend", None)
    if callable(backend):
        return backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    if "KERAS_HOME" in os.environ:
        home = os.environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    try:
        with open(os.path.join(os.path.expanduser(home), "keras.json")) as handle:
            configured = json.load(handle).get("backend")
    except (OSError, ValueError, AttributeError):
        configured = None
    return configured or "tensorflow"


def require_tensorflow(what):
    """Refuse ``what`` (an option or a data source that only TensorFlow serves) on another backend.

    Raises
    ------
    ValueError
        One line naming ``what`` and the backend of this run, unless it is TensorFlow.
    """
    backend = keras_backend()
    if backend != "tensorflow":
        raise ValueError(f"{what} needs the TensorFlow backend (KERAS_BACKEND=tensorflow); this run uses {backend}")


#: Keras dtype policies the training commands take (``--precision``). ``mixed_float16`` is left
#: out: it needs loss scaling, which the NNCLR training step does not do.
PRECISIONS = ("float32", "mixed_bfloat16")


def add_precision_argument(parser):
    """``--precision``: the Keras dtype policy of a training command (see :func:`set_precision`)."""
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="float32 (default) or mixed_bfloat16: layers compute in bfloat16 with float32 weights, "
                             "about twice as fast on recent GPUs (slower on most CPUs); the loss and the saved weights "
                             "stay float32")


def set_precision(name):
    """Set the global Keras dtype policy by name (one of :data:`PRECISIONS`) before models are built."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    import keras

    keras.mixed_precision.set_global_policy(name)


# ----------------------------------------------------------------------------------------
# TensorFlow set-up

STRATEGIES = ("default", "mirrored", "multiworker")


class OneDevice:
    """The ``default`` strategy on a backend other than TensorFlow: one device, one process.

    It offers what the commands use of a ``tf.distribute`` strategy: a ``scope()`` that
    changes nothing, one replica, and a process that is its own chief (it writes the run
    directory and has no cluster).
    """

    num_replicas_in_sync = 1
    cluster_resolver = None
    extended = types.SimpleNamespace(should_checkpoint=True)

    def scope(self):
        """A context in which models are built as anywhere else."""
        return contextlib.nullcontext()


def make_strategy(name="default"):
    """A ``tf.distribute`` strategy by name.

    ``default`` runs on one device; ``mirrored`` copies the model to every local GPU (or the
    visible CPU devices) and averages the gradients; ``multiworker`` does the same across
    machines, each reading the cluster layout from the ``TF_CONFIG`` environment variable.

    ``multiworker`` must be made before anything else initialises TensorFlow (building a
    dataset, a model or a tensor): TensorFlow configures its collective ops only at start-up.

    On a Keras backend other than TensorFlow, ``default`` is a :class:`OneDevice` and the
    others are refused (ValueError): they are TensorFlow's.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")
    if keras_backend() != "tensorflow":
        if name != "default":
            require_tensorflow(f"--strategy {name}")
        return OneDevice()
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        try:
            return _multi_worker_strategy_class()()
        except RuntimeError as error:
            raise RuntimeError(
                f"{error}: make the multiworker strategy before any other TensorFlow work"
            ) from error
    return tf.distribute.get_strategy()


@functools.cache
def _multi_worker_strategy_class():
    """``tf.distribute.MultiWorkerMirroredStrategy`` with a ``reduce`` that Keras 3's ``fit`` can use.

    Keras 3 (up to 3.15 at least, keras-team/keras#20585) calls ``strategy.reduce`` with a
    whole batch, a tuple of per-replica tensors (to build the model symbolically), and with
    ``axis=0`` on the scalar per-step logs. ``MirroredStrategy`` accepts both;
    ``MultiWorkerMirroredStrategy`` takes one tensor only and cannot reduce a scalar along an
    axis, so ``fit`` stops at its first batch. This subclass reduces each tensor of a structure
    in turn, and a scalar across the replicas (what ``axis=0`` means for the other strategies).
    """
    import tensorflow as tf

    class KerasMultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            reduce_one = super().reduce

            def reduce_tensor(tensor):
                shape = getattr(self.experimental_local_results(tensor)[0], "shape", None)
                scalar = shape is not None and tf.TensorShape(shape).rank == 0
                return reduce_one(reduce_op, tensor, None if scalar else axis)

            return tf.nest.map_structure(reduce_tensor, value)

    return KerasMultiWorkerMirroredStrategy


def split_batches_across_workers(dataset):
    """``dataset`` set to give each worker of a multi-worker strategy its share of every batch.

    Every worker reads the whole ``dataset`` (the same files, shuffled with the same seed) and
    the strategy keeps, on each worker, its replicas' slices of each global batch: together
    the workers train on the examples one process would, in the same batches. tf.data's
    default (``AUTO``) would instead give each worker whole files when the data come from
    files (TFDS), so the batches would differ from a one-process run. Other strategies ignore
    the setting, and a dataset that is no ``tf.data.Dataset`` (a ``keras.utils.PyDataset`` of
    :mod:`loaders`, which only one process reads) is returned as it is.
    """
    if not hasattr(dataset, "with_options"):
        return dataset
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


@dataclasses.dataclass(frozen=True)
class WorkerFolders:
    """Where one process of a (possibly multi-worker) run reads and writes.

    ``run`` is the run directory, written by the chief, from which every worker resumes;
    ``own`` is the folder this process writes: ``run`` itself on the chief (and in any
    one-process run), a temporary folder of its own on the other workers, so that two workers
    never write the same file. Make it with :func:`worker_folders`.
    """

    run: pathlib.Path
    own: pathlib.Path

    @property
    def chief(self):
        """Whether this process writes the run directory."""
        return self.own == self.run


def worker_folders(out_dir, strategy):
    """The :class:`WorkerFolders` of this process for the run directory ``out_dir`` (created).

    The chief (task type ``chief``, or worker 0 of a cluster without one; every one-process
    run) writes ``out_dir``. Another worker of a ``TF_CONFIG`` cluster writes
    ``out_dir/tmp-worker-<index>``, emptied now and removed by :func:`remove_worker_folder`
    when the run ends. The workers still save everything the chief saves, at the same points
    (the pattern of ``tf.distribute``): saving may read variables through collective ops that
    every worker must join.
    """
    run = pathlib.Path(out_dir)
    run.mkdir(parents=True, exist_ok=True)
    if strategy.extended.should_checkpoint:
        return WorkerFolders(run, run)
    resolver = strategy.cluster_resolver
    own = run / f"tmp-{resolver.task_type}-{resolver.task_id}"
    shutil.rmtree(own, ignore_errors=True)
    own.mkdir()
    return WorkerFolders(run, own)


def remove_worker_folder(folders):
    """Remove a non-chief worker's own folder at the end of the run (nothing on the chief)."""
    if not folders.chief:
        shutil.rmtree(folders.own, ignore_errors=True)


def backup_and_restore(folders, name, **options):
    """``keras.callbacks.BackupAndRestore`` in the folder ``name`` of this process's own folder.

    Keras 3's callback knows nothing of workers: each process backs up to and resumes from
    the folder it is given. The chief's is ``folders.run / name``; another worker's starts as a
    copy of it, so that every worker resumes from the chief's last finished epoch (with the
    same weights and optimiser state) and then writes only its own copy. ``options`` go to the
    callback. Make it before ``fit``: the chief writes its backup only at the end of an epoch,
    which needs every worker's steps.
    """
    import keras

    backup = folders.own / name
    if not folders.chief:
        shutil.rmtree(backup, ignore_errors=True)
        if (folders.run / name).is_dir():
            shutil.copytree(folders.run / name, backup)
    return keras.callbacks.BackupAndRestore(str(backup), **options)


#: ``__name__`` of a command's own module: run as a script, or re-imported by the worker processes
#: it spawns (multiprocessing, Dask), which must start as quietly as the command.
MAIN_NAMES = ("__main__", "__mp_main__")


def tensorflow_error_line(error):
    """One line for a TensorFlow runtime error (``tf.errors.OpError``).

    An error raised in Python inside a data pipeline (a cutout that cannot be prepared) reaches
    the command wrapped in TensorFlow's report, behind a "Graph execution error" line and a
    traceback; the innermost Python error's own message is what the user needs. Otherwise the
    first informative line of TensorFlow's message.
    """
    text = getattr(error, "message", None) or str(error)
    raised = re.findall(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", text, flags=re.MULTILINE)
    if raised:
        kind, message = raised[-1]
        # These errors of the project's readers name the file and the cutout themselves.
        return message.strip() if kind in ("CutoutError", "UnusableImageError") else f"{kind}: {message.strip()}"
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.strip().startswith(("Graph execution error", "Detected at", "<stack", "[["))]
    return lines[0] if lines else text.strip() or type(error).__name__


def interruptible(message):
    """Decorate a command's ``main(argv)``: Ctrl-C ends it promptly with the one line ``message``
    on stderr (what is kept and how to go on) and exit status 130, instead of a traceback."""
    def decorate(main):
        @functools.wraps(main)
        def wrapped(argv=None):
            try:
                return main(argv)
            except KeyboardInterrupt:
                print(message, file=sys.stderr)
                return 130

        return wrapped

    return decorate


#: What an interrupted training run keeps, and how it goes on.
INTERRUPTED_TRAINING = ("interrupted: the run folder keeps the last finished epoch (or fold); rerun the same command "
                        "to resume from there")


def data_errors_are_one_line(*kinds):
    """Decorate a command's ``main(argv)``: an error found in the data while the work runs (an
    exception of ``kinds``, or a TensorFlow runtime error, which carries what a data pipeline
    raised) is one ``error:`` line on stderr and exit status 2 instead of a traceback."""
    def decorate(main):
        @functools.wraps(main)
        def wrapped(argv=None):
            try:
                return main(argv)
            except Exception as error:
                tensorflow = sys.modules.get("tensorflow")
                if isinstance(error, kinds):
                    line = str(error)
                elif tensorflow is not None and isinstance(error, tensorflow.errors.OpError):
                    line = tensorflow_error_line(error)
                else:
                    raise
                print(f"error: {line}", file=sys.stderr)
                return 2

        return wrapped

    return decorate


def quiet_interrupt():
    """Make a Ctrl-C that nothing catches one line, ``interrupted``, instead of a traceback.

    Commands catch KeyboardInterrupt where they have work to keep; what is left is a Ctrl-C
    while a command is still starting (importing its libraries), which is no error of the
    user's. Any other uncaught exception keeps Python's own report. The process still ends as
    an interrupted one (status 130 in a shell). Call it first thing in a command.
    """
    previous = sys.excepthook
    if getattr(previous, "quiet_interrupt", False):
        return

    def hook(kind, value, trace):
        if issubclass(kind, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
        else:
            previous(kind, value, trace)

    hook.quiet_interrupt = True
    sys.excepthook = hook


def quiet_start(argv=None, tensorflow=True):
    """Keep the start-up lines of TensorFlow (oneDNN notice, CUDA probes, absl) and JAX off the terminal.

    Call it first thing in a command, before anything imports TensorFlow. It sets the log
    levels a user has not set and, with ``tensorflow=True`` and TensorFlow as the Keras
    backend (:func:`keras_backend`), imports TensorFlow with the process's standard error
    closed for the duration of the import (the C++ core writes its notices there before any
    log level is read). On another backend TensorFlow is not imported: it need not even be
    installed. Python errors of the import still surface.
    ``--verbose`` among the arguments (``argv``, default ``sys.argv``) leaves everything as it
    is. Returns whether it silenced anything. A Ctrl-C while it loads is one line
    (:func:`quiet_interrupt`), with or without ``--verbose``.
    """
    quiet_interrupt()
    argv = sys.argv[1:] if argv is None else argv
    if "--verbose" in argv:
        return False
    for key, value in _QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    # TensorFlow's Python logger reports at INFO (the multi-worker set-up, every collective op
    # it builds), which a command's logging.basicConfig(level=INFO) would otherwise print twice.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    # JAX reports at INFO each platform it probes and lacks ("Unable to initialize backend 'tpu'").
    logging.getLogger("jax").setLevel(logging.WARNING)
    if tensorflow and "tensorflow" not in sys.modules and keras_backend() == "tensorflow":
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
