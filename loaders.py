"""Streaming loaders of the project's inputs for every Keras backend (``keras.utils.PyDataset``).

On the TensorFlow backend the commands stream their inputs through tf.data
(:func:`prep_data.cutout_dataset`, :func:`tidal_data.tidal_unlabelled_dataset`,
:func:`tidal_data.tidal_labelled_dataset`); on the others (JAX) through these loaders, which
read the same files with NumPy and h5py and never import TensorFlow. A loader gives the
batches of the pipeline it stands for: the same images (prepared by
:func:`prep_data.load_for_stream`, stretched by :func:`tidal_data.tidal_stretch`), labels and
messages, in the same order when nothing is shuffled, and batched by the same rules (the last
partial batch kept, or dropped for NNCLR's unlabelled stream).

* :class:`CutoutLoader`: prepared ICL cutouts as dicts ``image``, ``index``, ``error`` (and
  ``label``), as :func:`prep_data.cutout_dataset`; what ``predict.py`` and ``gradcam.py`` read
  (through :func:`iterate`).
* :class:`LabelledCutoutLoader`: ``(image, label)`` batches of cutouts for ``fit``, as the
  streams of ``train.py``.
* :class:`ViewLoader`: ``(representation, label)`` batches of the encoder outputs that
  ``finetune.py`` caches, one augmented view per cluster and epoch.
* :class:`TidalUnlabelledLoader`: stretched image batches of the NNCLR unlabelled stream.
* :class:`TidalLabelledLoader`: ``(stretched image, label)`` batches of a classifier set.

Shuffling
---------
A shuffling loader reshuffles at every epoch, reproducibly: the order of epoch ``e`` is drawn by
a NumPy generator seeded with ``seed`` and ``e``, and ``fit`` moves the loader to its next epoch
through ``on_epoch_end``. A loader made with ``repeat=True`` (for ``fit(steps_per_epoch=...)``, where
tf.data would ``repeat()``) has no end: its batch ``i`` is batch ``i mod n`` of pass ``i // n``,
each pass shuffled anew, whatever the epochs' length. Without a seed, a shuffling loader draws
one when it is made. The orders follow the pipelines' rules (a full reshuffle per epoch for the
cutouts and the classifier sets, the shuffle buffer of ``tf.data.Dataset.shuffle`` for the
unlabelled stream) but not tf.data's random draws, so a seeded loader's order is its own.

Parallel reading
----------------
``workers``, ``use_multiprocessing`` and ``max_queue_size`` are those of
``keras.utils.PyDataset``: ``fit`` reads that many batches at once, in threads or in processes,
and always takes them in order. :func:`iterate` reads a loader outside ``fit`` with as many
threads. A cutout's problem is the same one-line error (``prep_data.CutoutError``,
``tidal_data.UnusableImageError``) whichever reads it.
"""

import collections
import concurrent.futures
import os

import keras
import numpy as np

import hsc
import prep_data
import tidal_data

#: Threads that read batches ahead by default: reading and preparing cutouts is file and NumPy
#: work, which threads overlap with the model's steps.
WORKERS = max(1, min(4, os.cpu_count() or 1))


class _Batches(keras.utils.PyDataset):
    """Batches of ``count`` examples taken by position; a subclass reads them (:meth:`read`).

    Parameters
    ----------
    count : int
        Examples in one pass.
    batch_size : int
    shuffle : bool
        Reshuffle at every epoch (:meth:`draw_order`).
    seed : int or None
        Seed of the shuffling; None draws one now.
    drop_remainder : bool
        Leave out the last batch when it is partial.
    repeat : bool
        Never end (see the module's description).
    workers, use_multiprocessing, max_queue_size
        Of ``keras.utils.PyDataset``.
    """

    def __init__(self, count, batch_size, shuffle=False, seed=None, drop_remainder=False, repeat=False,
                 workers=WORKERS, use_multiprocessing=False, max_queue_size=10):
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.count, self.batch_size = int(count), int(batch_size)
        self.shuffle, self.drop_remainder, self.repeat = bool(shuffle), bool(drop_remainder), bool(repeat)
        # One seed for the loader's life, so that every worker (thread or process) draws one order.
        self.seed = (int(np.random.SeedSequence().entropy) if seed is None else int(seed)) % 2**64
        self.epoch = 0
        self._orders = None

    def __len__(self):
        """Batches in one pass over the examples."""
        return self.count // self.batch_size if self.drop_remainder else -(-self.count // self.batch_size)

    @property
    def num_batches(self):
        """Batches of an epoch for ``fit``: None (endless) when the loader repeats."""
        return None if self.repeat else len(self)

    def on_epoch_end(self):
        """Move to the next epoch's order (``fit`` calls it)."""
        self.epoch += 1

    def random(self, epoch, stream=0):
        """The random generator of ``epoch`` (``stream`` tells apart the draws of one epoch)."""
        return np.random.default_rng([self.seed, int(epoch), int(stream)])

    def draw_order(self, rng):
        """Positions of one pass, shuffled with ``rng``: a permutation (subclasses may differ)."""
        return rng.permutation(self.count)

    def order(self, epoch):
        """Positions of the examples in the order of pass ``epoch``."""
        if not self.shuffle:
            return np.arange(self.count)
        cached = self._orders
        if cached is None or cached[0] != epoch:
            # Drawn once per epoch; two threads drawing it at once draw the same order.
            cached = self._orders = (epoch, self.draw_order(self.random(epoch)))
        return cached[1]

    def positions(self, index):
        """``(epoch, positions)`` of batch ``index``: its pass and the positions of its examples."""
        batches = len(self)
        if self.repeat:
            if batches == 0:
                raise IndexError(f"the loader has {self.count} examples, fewer than one batch of {self.batch_size}")
            epoch, index = divmod(index, batches)
        else:
            if not 0 <= index < batches:
                raise IndexError(f"batch {index} is out of range: the loader has {batches} batches")
            epoch = self.epoch
        return epoch, self.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]

    def __getitem__(self, index):
        epoch, positions = self.positions(int(index))
        return self.read(positions, epoch)

    def read(self, positions, epoch):
        """The batch of the examples at ``positions``, read in pass ``epoch``."""
        raise NotImplementedError


def iterate(loader):
    """Every batch of one pass over ``loader``, in order, outside ``fit``.

    With more than one of ``loader.workers``, that many threads read ahead, at most
    ``loader.max_queue_size`` batches (memory stays bounded however long the pass). An error
    of a batch is raised when its turn comes.
    """
    count = len(loader)
    if loader.workers <= 1:
        for index in range(count):
            yield loader[index]
        return
    ahead = max(loader.max_queue_size, loader.workers)
    pool = concurrent.futures.ThreadPoolExecutor(loader.workers, thread_name_prefix="loader")
    pending = collections.deque()
    try:
        for index in range(count):
            pending.append(pool.submit(loader.__getitem__, index))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------
# ICL cutouts


class CutoutLoader(_Batches):
    """Prepared cutouts streamed from disk in batches: what :func:`prep_data.cutout_dataset` gives.

    Parameters
    ----------
    refs : sequence of prep_data.CutoutRef
    batch_size : int
    size : int
        Side of the prepared images.
    labels : sequence of float, optional
        One label per ref; when given, each batch also carries ``label``.
    shuffle_seed : int, optional
        Shuffle the order, anew each epoch and reproducibly, for training.
    strict : bool
        Raise :class:`prep_data.CutoutError` at the first bad cutout instead of marking it.
    cache_bytes : int
        Keep prepared cutouts in memory, up to this many bytes, so that later epochs read them
        from memory (a training run on a fast GPU waits on the HDF5 reads otherwise; with
        threads, memory is shared). 0 (default): read every cutout from disk each time.
    **options
        ``workers``, ``use_multiprocessing``, ``max_queue_size`` (``keras.utils.PyDataset``).

    A batch is a dict: ``image`` (B, size, size, 1) float32, ``index`` (B,) int64 position in
    ``refs``, ``error`` (B,) str, empty when the cutout was prepared (a bad cutout gives a zero
    image and its message), and ``label`` (B,) float32 with ``labels``.
    """

    def __init__(self, refs, batch_size, size=hsc.ICL_IMAGE_SIZE, labels=None, shuffle_seed=None, strict=False,
                 cache_bytes=0, **options):
        self.refs = list(refs)
        self.cache_bytes = int(cache_bytes)
        self._cache, self._cached_bytes = {}, 0
        super().__init__(len(self.refs), batch_size, shuffle=shuffle_seed is not None, seed=shuffle_seed, **options)
        self.size, self.strict = int(size), bool(strict)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.float32).reshape(-1)
        if self.labels is not None and len(self.labels) != len(self.refs):
            raise ValueError(f"got {len(self.refs)} cutouts but {len(self.labels)} labels")

    def read(self, positions, epoch):
        images, errors = [], []
        for position in positions:
            image, message = self._cached_load(int(position))
            images.append(image)
            errors.append(message)
        batch = {
            "image": np.stack(images) if images else np.zeros((0, self.size, self.size, 1), np.float32),
            "index": np.asarray(positions, dtype=np.int64),
            "error": np.asarray(errors, dtype=object),
        }
        if self.labels is not None:
            batch["label"] = self.labels[positions]
        return batch

    def _cached_load(self, position):
        """The prepared cutout at ``position`` and its message, from memory when cached."""
        found = self._cache.get(position)
        if found is not None:
            return found
        found = self._load(self.refs[position])
        if self._cached_bytes + found[0].nbytes <= self.cache_bytes:
            self._cache[position] = found
            self._cached_bytes += found[0].nbytes
        return found

    def _load(self, ref):
        try:
            return prep_data.load_for_stream(ref, self.size, self.strict)
        except prep_data.CutoutError:
            raise
        except Exception as error:  # strict only: otherwise load_for_stream marks the cutout
            raise prep_data.CutoutError(f"{ref.source}: cannot read cutout ({type(error).__name__}: {error})") from error


class LabelledCutoutLoader(CutoutLoader):
    """``(image, label)`` batches of cutouts for ``fit``: the streams ``train.py`` trains on.

    As :class:`CutoutLoader` with ``labels``, but each batch is the pair ``image``
    (B, size, size, 1) float32 and ``label`` (B,) float32, and ``strict`` is on by default:
    a training set must not lose examples silently.
    """

    def __init__(self, refs, labels, batch_size, size=hsc.ICL_IMAGE_SIZE, shuffle_seed=None, strict=True, cache_bytes=0,
                 **options):
        super().__init__(refs, batch_size, size, labels, shuffle_seed, strict, cache_bytes, **options)

    def read(self, positions, epoch):
        batch = super().read(positions, epoch)
        return batch["image"], batch["label"]


class ViewLoader(_Batches):
    """``(representation, label)`` batches of cached views, one view per cluster and epoch.

    What ``finetune.py``'s cached method trains the head on: every epoch reshuffles the
    clusters and takes, for each, one of its stored augmented views, drawn at random.

    Parameters
    ----------
    views : ndarray, shape (N, V, D)
        V representations of each of N clusters.
    labels : array, shape (N,)
    batch_size : int
    seed : int or None
    **options
        ``workers``, ``use_multiprocessing``, ``max_queue_size`` (``keras.utils.PyDataset``).
    """

    def __init__(self, views, labels, batch_size, seed=None, **options):
        self.views = np.asarray(views, dtype=np.float32)
        self.labels = np.asarray(labels, dtype=np.float32).reshape(-1)
        if self.views.ndim != 3:
            raise ValueError(f"views must be (clusters, views, features), got shape {self.views.shape}")
        if len(self.labels) != len(self.views):
            raise ValueError(f"got {len(self.views)} clusters but {len(self.labels)} labels")
        options.setdefault("workers", 1)  # arrays in memory: threads would only add their overhead
        super().__init__(len(self.views), batch_size, shuffle=True, seed=seed, **options)
        self._choices = None

    def read(self, positions, epoch):
        cached = self._choices
        if cached is None or cached[0] != epoch:
            cached = self._choices = (epoch, self.random(epoch, 1).integers(0, self.views.shape[1], self.count))
        return self.views[positions, cached[1][positions]], self.labels[positions]


# ----------------------------------------------------------------------------------------
# Tidal galaxies (NNCLR)


def buffer_order(count, buffer_size, rng):
    """The order in which a shuffle buffer of ``buffer_size`` passes on ``count`` examples.

    The rule of ``tf.data.Dataset.shuffle``: the buffer fills with the first examples; each
    output is a uniformly drawn member of the buffer, whose place the next example takes (or
    which leaves the buffer once the input is spent). A buffer holding the whole pass gives a
    uniform permutation.
    """
    if buffer_size >= count:
        return rng.permutation(count)
    draws = rng.random(count)
    buffer, incoming = list(range(buffer_size)), buffer_size
    order = np.empty(count, dtype=np.int64)
    for step in range(count):
        slot = int(draws[step] * len(buffer))
        order[step] = buffer[slot]
        if incoming < count:
            buffer[slot] = incoming
            incoming += 1
        else:
            buffer[slot] = buffer[-1]
            buffer.pop()
    return order


class TidalUnlabelledLoader(_Batches):
    """The unlabelled NNCLR stream: stretched images, shuffled, in full batches.

    What :func:`tidal_data.tidal_unlabelled_dataset` gives: the images stretched with
    arcsinh(x / scale / softening) per band, passed through a shuffle buffer of
    ``shuffle_buffer`` (none at 1 or less), in batches of ``batch_size`` with the last partial
    batch dropped, so that every step pushes as many projections into the support queue.

    Parameters
    ----------
    images : tidal_data.TidalStream or ndarray
        The stream of a :class:`tidal_data.TidalSource` of tidal files (read a batch at a
        time) or an array (N, H, W, 5), in counts.
    band_scale : sequence of float, length 5
    batch_size : int
    shuffle_buffer : int
    seed : int or None
    min_size : int
        Smallest allowed image side (the augmentation's crop plus jitter).
    softening : float
    repeat : bool
        Never end, each pass reshuffled (for ``fit(steps_per_epoch=...)``).
    **options
        ``workers``, ``use_multiprocessing``, ``max_queue_size`` (``keras.utils.PyDataset``).

    Each batch is an array (batch_size, H, W, 5) float32.
    """

    def __init__(self, images, band_scale, batch_size, shuffle_buffer, seed=None, min_size=0,
                 softening=tidal_data.TIDAL_STRETCH_SOFTENING, repeat=False, **options):
        if isinstance(images, tidal_data.TidalStream):
            shape = (len(images), *images.image_shape)
        elif callable(images):
            raise TypeError("the unlabelled stream must be a tidal_data.TidalStream (tidal HDF5 files) or an array; "
                            "other streams (TFDS) need the TensorFlow backend's tidal_data.tidal_unlabelled_dataset")
        else:
            images = np.asarray(images, dtype=np.float32)
            shape = images.shape
        tidal_data.check_tidal_shape(shape, min_size)
        self.images = images
        self.band_scale = np.asarray(band_scale, dtype=np.float32)
        self.softening = softening
        self.shuffle_buffer = int(shuffle_buffer)
        super().__init__(shape[0], batch_size, shuffle=self.shuffle_buffer > 1, seed=seed, drop_remainder=True,
                         repeat=repeat, **options)

    def draw_order(self, rng):
        return buffer_order(self.count, self.shuffle_buffer, rng)

    def read(self, positions, epoch):
        if isinstance(self.images, tidal_data.TidalStream):
            counts = self.images.read(positions)
        else:
            counts = self.images[positions]
        return tidal_data.tidal_stretch(counts, self.band_scale, self.softening)


class TidalLabelledLoader(_Batches):
    """A classifier set as ``(stretched image, label)`` batches: what
    :func:`tidal_data.tidal_labelled_dataset` gives.

    Parameters
    ----------
    images : ndarray, shape (N, H, W, 5)
        Counts; stretched once, when the loader is made.
    labels : array of int, shape (N,)
    band_scale : sequence of float, length 5
    batch_size : int
    shuffle : bool
        Reshuffle every epoch (training sets).
    seed : int or None
    min_size : int
        Smallest allowed image side.
    **options
        ``workers``, ``use_multiprocessing``, ``max_queue_size`` (``keras.utils.PyDataset``).

    Each batch is images (B, H, W, 5) float32 and labels (B,) float32; the last batch may be
    partial.
    """

    def __init__(self, images, labels, band_scale, batch_size, shuffle=False, seed=None, min_size=0, **options):
        images = np.asarray(images)
        tidal_data.check_tidal_shape(images.shape, min_size)
        labels = np.asarray(labels, dtype=np.float32)
        if len(labels) != len(images):
            raise ValueError(f"got {len(images)} images but {len(labels)} labels")
        self.images = tidal_data.tidal_stretch(images, band_scale)
        self.labels = labels
        options.setdefault("workers", 1)  # arrays in memory: threads would only add their overhead
        super().__init__(len(labels), batch_size, shuffle=shuffle, seed=seed, **options)

    def read(self, positions, epoch):
        return self.images[positions], self.labels[positions]
