"""Tidal-feature cutouts (Desmons et al. 2023; SPEC Part B): reading, stretch, classifier
splits, the ``tf.data`` pipelines, the :class:`TidalStream` of tidal files and the
:class:`TidalSource` the NNCLR scripts train on (``loaders`` streams the same batches without
TensorFlow, for the other Keras backends).

128 x 128 cutouts in the bands g, r, i, z, y, counts at zero point 27, stored in the tidal
stacked HDF5 layout (``image`` (N, H, W, 5) float32, ``id``, ``has_tidal``, ``feature_type``,
``feature_sb``, ``params``; file attribute ``bands = "grizy"``) or read from the TFDS builders
``tidal_unlabelled`` / ``tidal_labelled`` (:func:`data.tidal_datasets.tidal_source_from_tfds`).

Mock files may also carry the columns of host-matched pairs and of feature visibility:
``pair_id`` (text; the two renderings of one scene, with and without its feature, share it;
"" for a galaxy in no pair), ``visible`` (0/1: whether a person would see the feature; 0
without one), ``feature_snr``, ``feature_contrast`` and ``feature_light_fraction`` (floats,
NaN without a feature). In a *pair file* every galaxy has a pair id and each pair id is held
by exactly two galaxies, one with ``has_tidal`` = 1 and one with 0 (:func:`check_pairs`).
"""

import dataclasses
import logging
import pathlib

import h5py
import numpy as np

import common
import hsc
from data.files import write_stacked_hdf5
from prep_data import CutoutError, decode_strings, file_kind, find_files

logger = logging.getLogger(__name__)

TIDAL_BANDS = hsc.TIDAL_BANDS
#: Softening of the tidal stretch arcsinh(x / scale / 3), in units of the per-band scale.
TIDAL_STRETCH_SOFTENING = hsc.TIDAL_STRETCH_SOFTENING
#: Number of images (the first ones of the unlabelled stream) whose pixels set the band scale.
TIDAL_SCALE_IMAGES = 1000
#: Names of the classifier sets, and their default sizes per class (Desmons et al. 2023).
TIDAL_SPLITS = ("train", "validation", "test")
TIDAL_SPLIT_SIZES = (300, 30, 50)
#: Optional float columns of the mock truth (NaN where a file lacks them).
TIDAL_FLOAT_COLUMNS = ("feature_sb", "feature_snr", "feature_contrast", "feature_light_fraction")
#: Value of ``visible`` where it is unknown (a file without the column).
VISIBLE_UNKNOWN = -1
#: Galaxies read from a file at a time by the streams of the unlabelled set.
STREAM_CHUNK = 64


def check_tidal_shape(shape, min_size=0, n_bands=len(TIDAL_BANDS), name="images"):
    """Check that tidal images are (H, W, bands) (with or without a leading batch axis).

    Parameters
    ----------
    shape : tuple of int or None
        Shape of one image (H, W, C) or of a stack (N, H, W, C).
    min_size : int
        Smallest allowed height and width in pixels (the crop plus its jitter).
    n_bands : int
        Required number of bands.
    name : str
        Name used in the error messages.

    Raises
    ------
    ValueError
        Naming the rule that failed and the shape that broke it.
    """
    shape = tuple(shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"{name} must be (H, W, {n_bands}) images, got shape {shape}")
    height, width, bands = shape[-3:]
    if bands is not None and bands != n_bands:
        raise ValueError(
            f"{name} must have {n_bands} bands ({TIDAL_BANDS}) in the last axis, got shape {shape}"
        )
    if height is not None and width is not None and min(height, width) < min_size:
        raise ValueError(
            f"{name} are {height}x{width} px, smaller than the crop: need at least {min_size}x{min_size}"
        )


def tidal_band_scale(images, n_images=TIDAL_SCALE_IMAGES):
    """Per-band scale: astropy ``mad_std`` of all pixels of the first ``n_images`` images.

    Parameters
    ----------
    images : ndarray, shape (N, H, W, B)
        Counts. Only the first ``n_images`` are used (Desmons et al. 2023 used the first 1000
        of the unlabelled set); NaN pixels are ignored.

    Returns
    -------
    ndarray of float32, shape (B,)

    Raises
    ------
    ValueError
        If a band has no spread (constant or all-NaN images): the stretch would divide by 0.
    """
    from astropy.stats import mad_std

    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, bands), got shape {images.shape}")
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    pixels = images[:n_images].reshape(-1, images.shape[-1]).astype(np.float64)
    scale = np.asarray(mad_std(pixels, axis=0, ignore_nan=True), dtype=np.float32)
    for band, value in enumerate(scale):
        if not np.isfinite(value) or value <= 0:
            raise ValueError(
                f"band {band} has MAD-std {value} over the first {len(images[:n_images])} images; "
                "the scale must be finite and > 0 (are the images constant?)"
            )
    return scale


def tidal_stretch(images, band_scale, softening=TIDAL_STRETCH_SOFTENING):
    """Stretch tidal images: arcsinh(x / scale / softening) per band (Desmons et al. 2023).

    Parameters
    ----------
    images : ndarray, shape (..., B)
        Counts; not modified.
    band_scale : sequence of float, length B
        Per-band scale from :func:`tidal_band_scale`.
    softening : float
        Softening in units of the band scale (3 in the paper).

    Returns
    -------
    ndarray of float32, same shape
    """
    band_scale = np.asarray(band_scale, dtype=np.float32)
    images = np.asarray(images, dtype=np.float32)
    if images.shape[-1] != band_scale.shape[-1]:
        raise ValueError(f"band_scale has {band_scale.size} bands, images have {images.shape[-1]}")
    return np.arcsinh(images / (band_scale * softening)).astype(np.float32)


def check_tidal_labels(labels):
    """Check a classifier label vector: 0/1 values and both classes present.

    Raises
    ------
    ValueError
        If a label is not 0 or 1, or the set holds one class only.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (no tidal feature) or 1 (tidal feature), got values {np.unique(labels)}")
    present = np.unique(labels)
    if present.size < 2:
        raise ValueError(
            f"the labelled set has one class only (label {int(present[0])} for all {labels.size} galaxies); "
            "the classifier needs both tidal (1) and non-tidal (0) galaxies"
        )


def tidal_classifier_splits(labels, sizes=TIDAL_SPLIT_SIZES, seed=0):
    """Balanced classifier sets: ``sizes`` = (train, validation, test) galaxies *per class*.

    Each class is shuffled with ``numpy.random.default_rng(seed)`` and cut in that order, so the
    sets are disjoint and the same seed and labels always give the same sets.

    Parameters
    ----------
    labels : array of int, shape (N,)
        0/1 label of every galaxy in the labelled pool.
    sizes : (int, int, int)
        Galaxies per class in the train, validation and test sets (SPEC: 300, 30, 50).
    seed : int

    Returns
    -------
    dict of str -> ndarray of int
        Indices into ``labels`` for "train", "validation" and "test", each sorted.

    Raises
    ------
    ValueError
        If the labels are not 0/1 of both classes, or a class is too small for the sizes.
    """
    check_tidal_labels(labels)
    labels = np.asarray(labels)
    sizes = tuple(int(size) for size in sizes)
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"sizes must be three positive counts (train, validation, test), got {sizes}")
    rng = np.random.default_rng(seed)
    splits = {name: [] for name in TIDAL_SPLITS}
    for label in (0, 1):
        members = np.flatnonzero(labels == label)
        if members.size < sum(sizes):
            raise ValueError(
                f"class {label} has {members.size} galaxies, the splits need {sum(sizes)} per class "
                f"(train {sizes[0]} + validation {sizes[1]} + test {sizes[2]})"
            )
        members = rng.permutation(members)
        edges = np.cumsum((0,) + sizes)
        for name, start, stop in zip(TIDAL_SPLITS, edges[:-1], edges[1:]):
            splits[name].append(members[start:stop])
    return {name: np.sort(np.concatenate(parts)) for name, parts in splits.items()}


def tidal_pair_splits(twins, labels, sizes=TIDAL_SPLIT_SIZES, seed=0):
    """Classifier sets of whole host-matched pairs: ``sizes`` = (train, validation, test) pairs,
    each pair giving one galaxy of each class.

    Parameters
    ----------
    twins : array of int, shape (N,)
        Position of each galaxy's twin (:func:`check_pairs`).
    labels : array of int, shape (N,)
    sizes : (int, int, int)
    seed : int
        The pairs are shuffled with ``numpy.random.default_rng(seed)`` and cut in that order.

    Returns
    -------
    dict of str -> ndarray of int
        Indices of both twins of the chosen pairs for "train", "validation" and "test", sorted.
    """
    labels = np.asarray(labels)
    sizes = tuple(int(size) for size in sizes)
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"sizes must be three positive counts (train, validation, test), got {sizes}")
    with_feature = np.flatnonzero(labels == 1)
    if with_feature.size < sum(sizes):
        raise ValueError(
            f"the pair file has {with_feature.size} pairs, the splits need {sum(sizes)} "
            f"(train {sizes[0]} + validation {sizes[1]} + test {sizes[2]})"
        )
    chosen = np.random.default_rng(seed).permutation(with_feature)
    edges = np.cumsum((0,) + sizes)
    return {name: np.sort(np.concatenate([chosen[start:stop], np.asarray(twins)[chosen[start:stop]]]))
            for name, start, stop in zip(TIDAL_SPLITS, edges[:-1], edges[1:])}


def tidal_unlabelled_dataset(
    images, band_scale, batch_size, shuffle_buffer, seed=None, min_size=0, softening=TIDAL_STRETCH_SOFTENING
):
    """The unlabelled NNCLR stream: stretched images, shuffled, batched and prefetched.

    Parameters
    ----------
    images : tf.data.Dataset or ndarray
        Unbatched images (H, W, 5) in counts, as elements, dicts with ``image``, or an array
        (N, H, W, 5).
    band_scale : sequence of float, length 5
    batch_size : int
    shuffle_buffer : int
    seed : int or None
        Shuffle seed.
    min_size : int
        Smallest allowed image side (the augmentation's crop plus jitter).

    Returns
    -------
    tf.data.Dataset
        Batches (batch_size, H, W, 5) float32; the last partial batch is dropped so that every
        step pushes the same number of projections into the support queue.
    """
    import tensorflow as tf

    if not isinstance(images, tf.data.Dataset):
        images = tf.data.Dataset.from_tensor_slices(np.asarray(images, dtype=np.float32))
    if isinstance(images.element_spec, dict):
        images = images.map(lambda element: element["image"], num_parallel_calls=tf.data.AUTOTUNE)
    check_tidal_shape(images.element_spec.shape, min_size)
    scale = tf.constant(np.asarray(band_scale, dtype=np.float32) * softening)
    images = images.map(lambda image: tf.asinh(tf.cast(image, tf.float32) / scale), num_parallel_calls=tf.data.AUTOTUNE)
    if shuffle_buffer > 1:
        images = images.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return images.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def tidal_labelled_dataset(images, labels, band_scale, batch_size, shuffle=False, seed=None, min_size=0):
    """A classifier set as ``(stretched image, label)`` batches.

    Parameters
    ----------
    images : ndarray, shape (N, H, W, 5)
        Counts.
    labels : array of int, shape (N,)
    band_scale : sequence of float, length 5
    batch_size : int
    shuffle : bool
        Reshuffle every epoch (training sets).
    seed : int or None
    min_size : int
        Smallest allowed image side.
    """
    import tensorflow as tf

    images = np.asarray(images)
    check_tidal_shape(images.shape, min_size)
    labels = np.asarray(labels, dtype=np.float32)
    if len(labels) != len(images):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    dataset = tf.data.Dataset.from_tensor_slices((tidal_stretch(images, band_scale), labels))
    if shuffle:
        dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


@dataclasses.dataclass(frozen=True)
class TidalCatalogue:
    """Every galaxy in a set of tidal HDF5 files, without the pixels.

    Attributes
    ----------
    paths : tuple of str
        The files.
    file_index, rows : ndarray of int, shape (N,)
        File (position in ``paths``) and row of each galaxy.
    ids : ndarray of str, shape (N,)
    has_tidal : ndarray of int, shape (N,)
        1 with a tidal feature, 0 without.
    feature_type : ndarray of str, shape (N,)
        "unknown" where the file has no ``feature_type`` column.
    feature_sb : ndarray of float, shape (N,)
        Mean surface brightness of the feature (mock truth, mag/arcsec^2); NaN where the file
        has no ``feature_sb`` column and for galaxies without a feature.
    image_shape : tuple of int
        (H, W, bands) of every image.
    pair_id : ndarray of str, shape (N,)
        Host-matched pair of each galaxy; "" for galaxies in no pair and where the file has
        no ``pair_id`` column.
    visible : ndarray of int, shape (N,)
        1 when a person would see the feature, 0 when not (and for galaxies without one),
        :data:`VISIBLE_UNKNOWN` (-1) where the file has no ``visible`` column.
    feature_snr, feature_contrast, feature_light_fraction : ndarray of float, shape (N,)
        Mock truth of the feature; NaN where the file lacks the column
        (``feature_light_fraction`` also for galaxies without a feature).

    The last five default to their "absent" values when not given.
    """

    paths: tuple
    file_index: np.ndarray
    rows: np.ndarray
    ids: np.ndarray
    has_tidal: np.ndarray
    feature_type: np.ndarray
    feature_sb: np.ndarray
    image_shape: tuple
    pair_id: np.ndarray = None
    visible: np.ndarray = None
    feature_snr: np.ndarray = None
    feature_contrast: np.ndarray = None
    feature_light_fraction: np.ndarray = None

    def __post_init__(self):
        count = len(self.ids)
        defaults = {"pair_id": np.full(count, "", dtype="<U1"), "visible": np.full(count, VISIBLE_UNKNOWN, np.int64),
                    **{name: np.full(count, np.nan) for name in TIDAL_FLOAT_COLUMNS[1:]}}
        for name, default in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)

    def __len__(self):
        return len(self.ids)


def index_tidal_hdf5(inputs):
    """List the galaxies of tidal HDF5 files (files or directories of them).

    Raises
    ------
    CutoutError
        If a file is unreadable, not in the tidal layout, or the files disagree on image shape.
    """
    paths = [path for path in find_files(inputs) if file_kind(pathlib.Path(path)) == "hdf5"]
    if not paths:
        raise CutoutError(f"{inputs}: no HDF5 files found")
    columns = {"file_index": [], "rows": [], "ids": [], "has_tidal": [], "feature_type": [], "pair_id": [],
               "visible": [], **{name: [] for name in TIDAL_FLOAT_COLUMNS}}
    image_shape = None
    for position, path in enumerate(paths):
        try:
            with h5py.File(path, "r") as f:
                if "image" not in f or f["image"].ndim != 4:
                    found = f["image"].shape if "image" in f else "no 'image' dataset"
                    raise CutoutError(f"{path}: not a tidal file; 'image' must be (N, H, W, 5), got {found}")
                check_tidal_shape(f["image"].shape, name=f"{path}: images")
                if "has_tidal" not in f:
                    raise CutoutError(f"{path}: tidal file has no 'has_tidal' column")
                count = f["image"].shape[0]
                shape = tuple(f["image"].shape[1:])
                columns["ids"].extend(decode_strings(f["id"][()]) if "id" in f else [f"{pathlib.Path(path).stem}_{i}" for i in range(count)])
                columns["has_tidal"].append(np.asarray(f["has_tidal"][()], dtype=np.int64))
                columns["feature_type"].extend(decode_strings(f["feature_type"][()]) if "feature_type" in f else ["unknown"] * count)
                pair_id = decode_strings(f["pair_id"][()]) if "pair_id" in f else [""] * count
                if len(pair_id) != count:
                    raise CutoutError(f"{path}: column 'pair_id' has {len(pair_id)} values for {count} images")
                columns["pair_id"].extend(pair_id)
                columns["visible"].append(
                    np.asarray(f["visible"][()], dtype=np.int64) if "visible" in f else np.full(count, VISIBLE_UNKNOWN)
                )
                for name in TIDAL_FLOAT_COLUMNS:
                    columns[name].append(
                        np.asarray(f[name][()], dtype=np.float64) if name in f else np.full(count, np.nan)
                    )
                for name in ("has_tidal", "visible", *TIDAL_FLOAT_COLUMNS):
                    if columns[name][-1].shape != (count,):
                        raise CutoutError(
                            f"{path}: column {name!r} has shape {columns[name][-1].shape}, expected ({count},)"
                        )
        except OSError as error:
            raise CutoutError(f"{path}: cannot read HDF5 file ({error})") from None
        except ValueError as error:
            raise CutoutError(str(error)) from None
        if image_shape is not None and shape != image_shape:
            raise CutoutError(f"{path}: images are {shape}, the other files hold {image_shape}")
        image_shape = shape
        columns["file_index"].append(np.full(count, position))
        columns["rows"].append(np.arange(count))
    has_tidal = np.concatenate(columns["has_tidal"])
    floats = {name: np.concatenate(columns[name]) for name in TIDAL_FLOAT_COLUMNS}
    for name in ("feature_sb", "feature_light_fraction"):
        floats[name] = np.where(has_tidal == 1, floats[name], np.nan)
    return TidalCatalogue(
        paths=tuple(paths),
        file_index=np.concatenate(columns["file_index"]),
        rows=np.concatenate(columns["rows"]),
        ids=np.asarray(columns["ids"]),
        has_tidal=has_tidal,
        feature_type=np.asarray(columns["feature_type"]),
        image_shape=image_shape,
        pair_id=np.asarray(columns["pair_id"], dtype=str),
        visible=np.concatenate(columns["visible"]),
        **floats,
    )


class UnusableImageError(ValueError):
    """A galaxy's image is not a sky cutout (mostly no data, or constant); the message names it."""


#: Share of a galaxy's pixels that may be non-finite (no data); they are read as 0, the sky level.
MAX_NONFINITE_FRACTION = 0.3

_warned_nonfinite = set()


def check_tidal_pixels(images, describe, source):
    """Make the images of a read usable, in place: non-finite pixels (no data) become 0.

    A galaxy with more than :data:`MAX_NONFINITE_FRACTION` of its pixels non-finite, or whose
    image is constant (all bands), is not a sky cutout: :class:`UnusableImageError` naming it
    (``describe(position)`` gives its file and id). Non-finite pixels are warned about once
    per ``source`` (the file) and process.
    """
    bad = ~np.isfinite(images)
    if bad.any():
        shares = bad.reshape(len(images), -1).mean(axis=1)
        worst = int(np.argmax(shares))
        if shares[worst] > MAX_NONFINITE_FRACTION:
            raise UnusableImageError(f"{describe(worst)}: {100 * shares[worst]:.0f}% of the pixels are non-finite "
                                     f"(at most {100 * MAX_NONFINITE_FRACTION:.0f}%); not a usable cutout, leave it out")
        images[bad] = 0.0
        if source not in _warned_nonfinite:
            _warned_nonfinite.add(source)
            logger.warning("%s and maybe others: non-finite pixels (no data) are read as 0, the sky level",
                           describe(int(np.flatnonzero(shares)[0])))
    flat = images.reshape(len(images), -1)
    constant = np.flatnonzero(flat.max(axis=1) == flat.min(axis=1))
    if constant.size:
        raise UnusableImageError(f"{describe(int(constant[0]))}: the image is constant ({flat[constant[0], 0]:g} "
                                 "everywhere); not a sky cutout, leave it out")
    return images


def read_tidal_images(catalogue, indices):
    """Images (counts, float32) of the galaxies at ``indices`` of a :class:`TidalCatalogue`.

    Non-finite pixels are read as 0, and unusable images are refused (:func:`check_tidal_pixels`).

    Returns
    -------
    ndarray, shape (len(indices), H, W, bands)
    """
    indices = np.asarray(indices, dtype=np.int64)
    images = np.empty((len(indices),) + catalogue.image_shape, dtype=np.float32)
    for position, path in enumerate(catalogue.paths):
        chosen = np.flatnonzero(catalogue.file_index[indices] == position)
        if chosen.size == 0:
            continue
        rows = catalogue.rows[indices[chosen]]
        order = np.argsort(rows)
        # h5py fancy indexing needs increasing rows; read sorted, then put back in place.
        with h5py.File(path, "r") as f:
            read = np.asarray(f["image"][rows[order]], dtype=np.float32)

        def describe(position, galaxies=indices[chosen[order]], path=path):
            return f"{path}: galaxy '{catalogue.ids[galaxies[position]]}' (row {catalogue.rows[galaxies[position]]})"

        images[chosen[order]] = check_tidal_pixels(read, describe, path)
    return images


#: The per-galaxy columns of a :class:`TidalCatalogue`.
CATALOGUE_COLUMNS = ("file_index", "rows", "ids", "has_tidal", "feature_type", "pair_id", "visible",
                     *TIDAL_FLOAT_COLUMNS)


def catalogue_subset(catalogue, indices):
    """The galaxies at ``indices`` of a :class:`TidalCatalogue`, as a catalogue of their own.

    Small (no pixels) and picklable: what a Dask task needs to read its galaxies itself.
    """
    indices = np.asarray(indices, dtype=np.int64)
    return dataclasses.replace(
        catalogue,
        **{name: getattr(catalogue, name)[indices] for name in CATALOGUE_COLUMNS},
    )


def tidal_hdf5_dataset(catalogue, chunk=None):
    """Stream every image of a :class:`TidalCatalogue` from disk as ``{"image", "id"}`` elements.

    Reads ``chunk`` rows at a time (default :data:`STREAM_CHUNK`) so the unlabelled set never has
    to fit in memory.
    """
    import tensorflow as tf

    chunk = chunk or STREAM_CHUNK

    def generate():
        for start in range(0, len(catalogue), chunk):
            indices = np.arange(start, min(start + chunk, len(catalogue)))
            images = read_tidal_images(catalogue, indices)
            for image, galaxy_id in zip(images, catalogue.ids[indices]):
                yield {"image": image, "id": galaxy_id}

    signature = {
        "image": tf.TensorSpec(catalogue.image_shape, tf.float32),
        "id": tf.TensorSpec((), tf.string),
    }
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    # A known length lets Keras size its epochs without running out of data first.
    return dataset.apply(tf.data.experimental.assert_cardinality(len(catalogue)))


@dataclasses.dataclass(frozen=True)
class TidalStream:
    """The unlabelled stream of tidal HDF5 files: every galaxy of ``catalogues``, in order.

    What the NNCLR encoder trains on when the data are files (:func:`tidal_source_from_hdf5`),
    readable by position without TensorFlow (:meth:`read`, as ``loaders.TidalUnlabelledLoader``
    does) and, on the TensorFlow backend, as the tf.data stream of :func:`tidal_hdf5_dataset`.

    Calling it gives the stream as the backend's pipelines take it: on TensorFlow an unbatched
    ``tf.data.Dataset`` of counts images (H, W, bands), each catalogue's after the one before;
    on any other Keras backend the stream itself, so that ``source.unlabelled()`` of a
    :class:`TidalSource` and its :meth:`concatenate` never import TensorFlow there.

    Attributes
    ----------
    catalogues : tuple of TidalCatalogue
        The files' galaxies, streamed one catalogue after the other.
    """

    catalogues: tuple

    def __post_init__(self):
        object.__setattr__(self, "catalogues", tuple(self.catalogues))
        if not self.catalogues:
            raise ValueError("a tidal stream needs at least one catalogue")
        shapes = {tuple(catalogue.image_shape) for catalogue in self.catalogues}
        if len(shapes) > 1:
            raise ValueError(f"the files of one tidal stream must hold images of one shape, got {sorted(shapes)}")

    def __len__(self):
        return sum(len(catalogue) for catalogue in self.catalogues)

    @property
    def image_shape(self):
        """(H, W, bands) of every image."""
        return tuple(self.catalogues[0].image_shape)

    def concatenate(self, other):
        """This stream followed by ``other`` (a :class:`TidalStream`)."""
        if not isinstance(other, TidalStream):
            raise TypeError(f"a tidal stream can only be followed by another tidal stream, got {type(other).__name__}")
        return TidalStream(self.catalogues + other.catalogues)

    def read(self, positions):
        """Counts images (float32) of the galaxies at ``positions`` of the stream, in that order.

        Non-finite pixels are read as 0 and unusable images are refused, as in
        :func:`read_tidal_images`.

        Returns
        -------
        ndarray, shape (len(positions), H, W, bands)
        """
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"stream positions must be in [0, {len(self)}), got {positions.min()}..{positions.max()}")
        starts = np.cumsum([0] + [len(catalogue) for catalogue in self.catalogues])
        owner = np.searchsorted(starts, positions, side="right") - 1
        images = np.empty((positions.size,) + self.image_shape, dtype=np.float32)
        for index, catalogue in enumerate(self.catalogues):
            chosen = np.flatnonzero(owner == index)
            if chosen.size:
                images[chosen] = read_tidal_images(catalogue, positions[chosen] - starts[index])
        return images

    def head(self, count, chunk=None):
        """The first ``count`` images (fewer if the stream is shorter), read ``chunk`` at a time.

        The chunks are those of :func:`tidal_hdf5_dataset` (default :data:`STREAM_CHUNK`), so an
        unusable image among them is reported as the tf.data stream reports it.
        """
        chunk = chunk or STREAM_CHUNK
        count = min(int(count), len(self))
        parts, read = [], 0
        for catalogue in self.catalogues:
            for start in range(0, len(catalogue), chunk):
                if read >= count:
                    break
                parts.append(read_tidal_images(catalogue, np.arange(start, min(start + chunk, len(catalogue)))))
                read += len(parts[-1])
        images = np.concatenate(parts) if parts else np.empty((0,) + self.image_shape, np.float32)
        return images[:count]

    def __call__(self):
        if common.keras_backend() != "tensorflow":
            return self
        datasets = [tidal_hdf5_dataset(catalogue).map(lambda element: element["image"]) for catalogue in self.catalogues]
        stream = datasets[0]
        for dataset in datasets[1:]:
            stream = stream.concatenate(dataset)
        return stream


def write_tidal_hdf5(path, images, ids, columns=None):
    """Write tidal cutouts (N, H, W, 5) in the tidal stacked layout, atomically.

    ``columns`` holds the per-galaxy values (``has_tidal``, ``feature_type``, ``feature_sb``,
    ``params``...); see :func:`write_stacked_hdf5`.
    """
    images = np.asarray(images, dtype=np.float32)
    check_tidal_shape(images.shape)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, 5), got shape {images.shape}")
    write_stacked_hdf5(path, images, ids=ids, columns=columns, pixel_scale=hsc.PIXEL_SCALE, attributes={"bands": TIDAL_BANDS})


@dataclasses.dataclass(frozen=True)
class TidalSource:
    """The two views of the tidal data the NNCLR scripts need, whatever the storage.

    Attributes
    ----------
    description : str
        Where the data come from (for logs and outputs).
    ids : ndarray of str, shape (N,)
        Galaxies of the labelled pool (the candidates of the classifier sets).
    labels : ndarray of int, shape (N,)
        1 with a tidal feature, 0 without.
    image_shape : tuple of int
        (H, W, bands).
    read_labelled : callable
        ``read_labelled(indices)`` -> counts (len(indices), H, W, bands) of labelled galaxies.
    unlabelled : callable
        ``unlabelled()`` -> unbatched tf.data.Dataset of counts images (H, W, bands): the
        unlabelled set with the tidal galaxies joined in. For HDF5 files it is a
        :class:`TidalStream`, which the loaders of every backend read (and which calling
        returns itself on a backend other than TensorFlow).
    splits : dict of str -> ndarray of int, or None
        Classifier sets fixed by the storage (the TFDS builder's splits), as indices into
        ``ids``; None when :func:`tidal_classifier_splits` draws them.
    truth : dict of str -> ndarray, or None
        Mock truth of the labelled pool when the storage has it: ``feature_type`` (str) and
        ``feature_sb`` (mag/arcsec^2, NaN without a feature), and where the files carry them
        ``pair_id`` (str, "" outside pairs), ``visible`` (int, -1 unknown), ``feature_snr``,
        ``feature_contrast`` and ``feature_light_fraction`` (float), each of shape (N,).
    catalogue : TidalCatalogue or None
        The files of the labelled pool (same order as ``ids``) when it is stored in HDF5
        files, so that other processes can read the galaxies themselves; None otherwise.
    """

    description: str
    ids: np.ndarray
    labels: np.ndarray
    image_shape: tuple
    read_labelled: object
    unlabelled: object
    splits: dict = None
    truth: dict = None
    catalogue: TidalCatalogue = None


def tidal_source_splits(source, sizes=TIDAL_SPLIT_SIZES, seed=0):
    """The classifier sets of a :class:`TidalSource`: its own splits if it has them, else drawn.

    A pool of host-matched pairs (every galaxy with a ``pair_id``, :func:`check_pairs`) is split
    by whole pairs (:func:`tidal_pair_splits`), so that no scene is in two sets.

    Raises
    ------
    ValueError
        If a set lacks one of the classes, the pool is too small for ``sizes``, or its pairs do
        not match.
    """
    if source.splits is None:
        pair_ids = (source.truth or {}).get("pair_id")
        if pair_ids is not None and (np.asarray(pair_ids) != "").all():
            twins = check_pairs(pair_ids, source.labels, source.description, source.ids)
            return tidal_pair_splits(twins, source.labels, sizes, seed)
        return tidal_classifier_splits(source.labels, sizes, seed)
    for name in TIDAL_SPLITS:
        if name not in source.splits:
            raise ValueError(f"{source.description}: has no {name!r} split")
        try:
            check_tidal_labels(source.labels[source.splits[name]])
        except ValueError as error:
            raise ValueError(f"{name} split: {error}") from None
    return {name: np.asarray(source.splits[name]) for name in TIDAL_SPLITS}


def tidal_source_from_hdf5(inputs):
    """A :class:`TidalSource` over tidal HDF5 files: every galaxy is in the unlabelled stream,
    and the labelled pool is every galaxy with its ``has_tidal`` truth (mock data).

    ``truth`` holds ``feature_type`` and ``feature_sb``, plus each of ``pair_id``, ``visible``,
    ``feature_snr``, ``feature_contrast`` and ``feature_light_fraction`` that some file carries
    (a pair id that is not empty, a known visibility, a finite value).

    The galaxies' ids must be unique: the classifier sets, the test-overlap check and the
    outputs name galaxies by id. A repeated id is a ValueError naming both places.
    """
    catalogue = index_tidal_hdf5(inputs)
    unique, counts = np.unique(catalogue.ids, return_counts=True)
    if (counts > 1).any():
        repeated = unique[counts > 1][0]
        where = [f"{catalogue.paths[catalogue.file_index[i]]} row {catalogue.rows[i]}"
                 for i in np.flatnonzero(catalogue.ids == repeated)[:2]]
        raise ValueError(f"galaxy id '{repeated}' is given {counts[counts > 1][0]} times ({where[0]}, {where[1]}); "
                         "the ids of the tidal files must be unique")
    truth = {"feature_type": catalogue.feature_type, "feature_sb": catalogue.feature_sb}
    present = {"pair_id": (catalogue.pair_id != "").any(), "visible": (catalogue.visible != VISIBLE_UNKNOWN).any(),
               **{name: np.isfinite(getattr(catalogue, name)).any() for name in TIDAL_FLOAT_COLUMNS[1:]}}
    truth.update({name: getattr(catalogue, name) for name, found in present.items() if found})
    has_truth = (catalogue.feature_type != "unknown").any() or np.isfinite(catalogue.feature_sb).any() or any(present.values())
    return TidalSource(
        description=", ".join(catalogue.paths),
        ids=catalogue.ids,
        labels=catalogue.has_tidal,
        image_shape=catalogue.image_shape,
        read_labelled=lambda indices: read_tidal_images(catalogue, indices),
        unlabelled=TidalStream((catalogue,)),
        truth=truth if has_truth else None,
        catalogue=catalogue,
    )


def check_pairs(pair_ids, labels, description, ids=None):
    """Check that the galaxies of a pair file form host-matched pairs.

    In a pair file every galaxy has a pair id, and each pair id is held by exactly two
    galaxies: the scene with its tidal feature (label 1) and the same scene without (label 0).

    Parameters
    ----------
    pair_ids : array of str, shape (N,)
    labels : array of int, shape (N,)
        ``has_tidal`` of each galaxy.
    description : str
        The file(s), for the message.
    ids : array of str, shape (N,), optional
        Galaxy ids, to name a galaxy that has no pair id.

    Returns
    -------
    ndarray of int, shape (N,)
        Position of each galaxy's twin.

    Raises
    ------
    ValueError
        One line naming ``description`` and the first offending pair (in file order): a pair
        id held by one galaxy or by more than two, twins with the same label, or galaxies
        without a pair id among paired ones.
    """
    pair_ids = np.asarray(pair_ids).astype(str)
    labels = np.asarray(labels)
    if len(pair_ids) != len(labels):
        raise ValueError(f"{description}: {len(pair_ids)} pair ids for {len(labels)} galaxies")
    empty = np.flatnonzero(pair_ids == "")
    if empty.size:
        name = f"galaxy {ids[empty[0]]}" if ids is not None else f"galaxy {empty[0]} (position)"
        raise ValueError(
            f"{description}: {empty.size} of {len(pair_ids)} galaxies have no pair_id (e.g. {name}) in a file of "
            "host-matched pairs; every galaxy of a pair file must have a twin"
        )
    unique, first, inverse, counts = np.unique(pair_ids, return_index=True, return_inverse=True, return_counts=True)
    ones = np.bincount(inverse, weights=(labels == 1), minlength=len(unique))
    bad = (counts != 2) | (ones != 1)
    if bad.any():
        worst = np.flatnonzero(bad)[np.argmin(first[bad])]
        pair, count = str(unique[worst]), int(counts[worst])
        if count != 2:
            problem = f"appears {'once' if count == 1 else f'{count} times'}, not twice"
        else:
            problem = f"has both twins with has_tidal={int(labels[first[worst]])}"
        raise ValueError(
            f"{description}: pair_id {pair!r} {problem}; each pair must be one galaxy with its tidal feature "
            "(has_tidal=1) and the same scene without it (has_tidal=0)"
        )
    order = np.argsort(inverse, kind="stable")  # the two members of each pair side by side
    twins = np.empty(len(labels), dtype=np.int64)
    twins[order[0::2]], twins[order[1::2]] = order[1::2], order[0::2]
    return twins
