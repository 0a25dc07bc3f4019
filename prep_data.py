"""Read cluster cutouts from disk and prepare them for the ICL model.

Inputs
------
Every reader yields :class:`Cutout` records (image in counts, HSC mask plane, metadata),
whatever the file format:

* **HSC FITS cutouts**: an image HDU, a mask HDU and a variance HDU, found by ``EXTNAME``
  (``IMAGE``, ``MASK``, ``VARIANCE``) or else as the first and second 2-D HDUs. Mask bit
  numbers come from the mask header's ``MP_*`` keywords (``MP_BAD``, ``MP_NO_DATA``,
  ``MP_BRIGHT_OBJECT``) and fall back to BAD = 0, NO_DATA = 8, BRIGHT_OBJECT = 9. The
  redshift, if any, is read from the ``Z`` or ``REDSHIFT`` keyword.
* **HDF5, this project's layouts** (see :data:`HDF5_FORMAT`):

  - *stacked* (fixed-size cutouts, used by the mock generator): root datasets
    ``image`` (N, H, W) float16/float32 counts, optional ``mask`` (N, H, W) integer HSC mask
    plane, optional ``id`` (N,) UTF-8 strings, optional ``z`` (N,) and any other 1-D (N,)
    dataset as a per-cutout column (``f_icl_true``, ``f_icl_sb``, ``params`` as JSON text...).
    File attributes: ``format = "icl-cutouts"``, ``layout = "stacked"``, optional
    ``mask_bits`` (JSON object plane -> bit), optional ``pixel_scale`` (arcsec/px).
  - *groups* (cutouts of any size): one group per cutout, named by its id, holding
    datasets ``image`` and optional ``mask``; group attributes (``z`` and any scalar) are the
    cutout's metadata. File attributes as above with ``layout = "groups"``.
* **HDF5, the original code's layouts**: one group per cutout with ``<id>/HDU0/DATA`` (image)
  and ``<id>/HDU1/DATA`` (mask), or ``<id>/DATA`` and ``<id>/MASK``.
* **.npy** arrays of *prepared* images (the output of :func:`prepare_image`), shape
  (N, 224, 224), (N, 224, 224, 1) or a single (224, 224); they skip the preprocessing.

Preprocessing (SPEC Part A, identical for training and inference)
-----------------------------------------------------------------
1. NaN or infinite pixels are treated as masked (NO_DATA) and set to 0.
2. Non-square cutouts (cut at a survey edge) are padded symmetrically on the short axis to a
   square, the padding flagged NO_DATA. Padding, not stretching, keeps the physical scale the
   same on both axes, so 112 px stays 300 kpc in x and y.
3. Resize to 224 x 224 with ``skimage.transform.resize`` (bilinear with anti-aliasing, as the
   original). The mask is resized as the fraction of each output pixel that was masked, and
   an output pixel is masked when that fraction exceeds one half.
4. Clip to [0, 10] counts, stretch with arcsinh(x / 0.017359), set BAD | NO_DATA |
   BRIGHT_OBJECT pixels to 0. Normalisation (mean 0.948, std 1.108) happens inside the model.

The ``tf.data`` pipelines stream cutouts from disk in parallel, one cutout at a time, so
inputs of any size never have to fit in memory.
"""

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import threading
import warnings

import h5py
import numpy as np

import hsc

logger = logging.getLogger(__name__)

#: Value of the ``format`` attribute of HDF5 files written in this project's layouts.
HDF5_FORMAT = "icl-cutouts"
#: File suffixes read as FITS, HDF5 and prepared NumPy arrays.
FITS_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fits.fz")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
NPY_SUFFIXES = (".npy",)


class CutoutError(ValueError):
    """A cutout (or a whole file) that cannot be read or prepared; the message names it."""


@dataclasses.dataclass(frozen=True)
class CutoutRef:
    """Where one cutout lives: a file and, for multi-cutout files, its key inside.

    Attributes
    ----------
    path : str
        File path.
    key : str or int or None
        HDF5 group name, row of a stacked HDF5 / .npy file, or None for a FITS file.
    id : str
        Identifier written to outputs.
    """

    path: str
    key: object
    id: str

    @property
    def source(self):
        """Human-readable location, ``file`` or ``file:key``."""
        return self.path if self.key is None else f"{self.path}:{self.key}"


@dataclasses.dataclass(frozen=True)
class Cutout:
    """One cutout as read from disk.

    Attributes
    ----------
    ref : CutoutRef
        Where it came from.
    image : ndarray, shape (H, W)
        Pixel values in counts (zero point 27), or a prepared image if ``prepared``.
    mask : ndarray of int, shape (H, W), or None
        HSC mask plane.
    mask_bits : dict of str -> int
        Mask plane name to bit number.
    meta : dict
        Per-cutout metadata (``z`` and, for mocks, the truth columns).
    prepared : bool
        True when ``image`` is already the model's 224 x 224 input (from .npy).
    """

    ref: CutoutRef
    image: np.ndarray
    mask: np.ndarray = None
    mask_bits: dict = dataclasses.field(default_factory=lambda: dict(hsc.DEFAULT_MASK_BITS))
    meta: dict = dataclasses.field(default_factory=dict)
    prepared: bool = False

    @property
    def id(self):
        return self.ref.id


# ----------------------------------------------------------------------------------------
# Finding inputs


def _suffix_kind(path):
    name = path.name.lower()
    if name.endswith(FITS_SUFFIXES):
        return "fits"
    if name.endswith(HDF5_SUFFIXES):
        return "hdf5"
    if name.endswith(NPY_SUFFIXES):
        return "npy"
    return None


def find_files(inputs):
    """Expand files and directories into a list of readable cutout files, in input order.

    Directories are searched (not recursively) for FITS, HDF5 and .npy files, sorted by name.

    Raises
    ------
    CutoutError
        If an input does not exist, has an unknown suffix, or a directory holds no cutouts.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = []
    for item in inputs:
        path = pathlib.Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and _suffix_kind(p))
            if not found:
                raise CutoutError(f"{path}: directory holds no FITS, HDF5 or .npy files")
            files.extend(str(p) for p in found)
        elif path.is_file():
            if _suffix_kind(path) is None:
                raise CutoutError(
                    f"{path}: unknown file type; expected one of "
                    f"{', '.join(FITS_SUFFIXES + HDF5_SUFFIXES + NPY_SUFFIXES)}"
                )
            files.append(str(path))
        else:
            raise CutoutError(f"{path}: no such file or directory")
    return files


def index_cutouts(inputs):
    """List every cutout in the inputs without reading pixels.

    Parameters
    ----------
    inputs : str or sequence of str
        Files and directories (see :func:`find_files`).

    Returns
    -------
    refs : list of CutoutRef
        One per cutout, in input order.
    errors : list of (str, str)
        (source, message) for files that could not even be listed; they hold no refs.
    """
    refs, errors = [], []
    for path in find_files(inputs):
        try:
            refs.extend(_list_file(path))
        except CutoutError as error:
            errors.append((path, str(error)))
    return refs, errors


def _list_file(path):
    kind = _suffix_kind(pathlib.Path(path))
    stem = pathlib.Path(path).name.split(".")[0]
    if kind == "fits":
        return [CutoutRef(path, None, stem)]
    if kind == "npy":
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise CutoutError(f"{path}: cannot read .npy file ({error})") from None
        if array.ndim == 2:
            return [CutoutRef(path, None, stem)]
        return [CutoutRef(path, i, f"{stem}_{i}") for i in range(array.shape[0])]
    try:
        with h5py.File(path, "r") as f:
            if _is_stacked(f):
                n = f["image"].shape[0]
                ids = _decode(f["id"][()]) if "id" in f else [f"{stem}_{i}" for i in range(n)]
                return [CutoutRef(path, i, str(ids[i])) for i in range(n)]
            return [CutoutRef(path, key, key) for key in f.keys() if isinstance(f[key], h5py.Group)]
    except OSError as error:
        raise CutoutError(f"{path}: cannot read HDF5 file ({error})") from None


def _is_stacked(f):
    return "image" in f and isinstance(f["image"], h5py.Dataset) and f["image"].ndim == 3


def _decode(values):
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.atleast_1d(values)]


# ----------------------------------------------------------------------------------------
# Reading


_open_files = threading.local()


def _h5(path):
    """An open, read-only h5py file, cached per thread (reopening costs more than reading)."""
    cache = getattr(_open_files, "cache", None)
    if cache is None:
        cache = _open_files.cache = {}
    if path not in cache:
        if len(cache) > 8:
            cache.pop(next(iter(cache))).close()
        cache[path] = h5py.File(path, "r")
    return cache[path]


def read_cutout(ref):
    """Read one cutout from disk.

    Raises
    ------
    CutoutError
        If the file cannot be read or its layout is not one described in this module.
    """
    kind = _suffix_kind(pathlib.Path(ref.path))
    try:
        if kind == "fits":
            return _read_fits(ref)
        if kind == "npy":
            array = np.load(ref.path, mmap_mode="r")
            image = np.asarray(array if ref.key is None else array[ref.key], dtype=np.float32)
            return Cutout(ref, np.squeeze(image, axis=-1) if image.ndim == 3 else image, prepared=True)
        return _read_hdf5(ref)
    except CutoutError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise CutoutError(f"{ref.source}: cannot read cutout ({error})") from None


def _read_fits(ref):
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            hdus = fits.open(ref.path, memmap=False)
        except (OSError, ValueError) as error:
            raise CutoutError(f"{ref.source}: cannot read FITS file ({error})") from None
        with hdus:
            named = {hdu.name.upper(): hdu for hdu in hdus}
            arrays = [hdu for hdu in hdus if hdu.data is not None and np.ndim(hdu.data) >= 2]
            image_hdu = named.get("IMAGE") or (arrays[0] if arrays else None)
            if image_hdu is None or image_hdu.data is None:
                raise CutoutError(f"{ref.source}: FITS file holds no image data")
            mask_hdu = named.get("MASK")
            if mask_hdu is None and len(arrays) > 1 and arrays[1] is not image_hdu:
                mask_hdu = arrays[1]
            image = np.asarray(image_hdu.data, dtype=np.float32)
            mask = None if mask_hdu is None or mask_hdu.data is None else np.asarray(mask_hdu.data)
            mask_bits = dict(hsc.DEFAULT_MASK_BITS)
            if mask_hdu is not None:
                for plane in mask_bits:
                    key = f"MP_{plane}"
                    if key in mask_hdu.header:
                        mask_bits[plane] = int(mask_hdu.header[key])
            meta = {}
            for header in (hdus[0].header, image_hdu.header):
                for key in ("Z", "REDSHIFT"):
                    if key in header and "z" not in meta:
                        meta["z"] = float(header[key])
    return Cutout(ref, image, mask, mask_bits, meta)


def _read_hdf5(ref):
    f = _h5(ref.path)
    mask_bits = dict(hsc.DEFAULT_MASK_BITS)
    if "mask_bits" in f.attrs:
        mask_bits.update(json.loads(f.attrs["mask_bits"]))
    if _is_stacked(f):
        row = int(ref.key)
        image = np.asarray(f["image"][row], dtype=np.float32)
        mask = np.asarray(f["mask"][row]) if "mask" in f else None
        meta = {}
        for name, dataset in f.items():
            if name not in ("image", "mask", "id") and isinstance(dataset, h5py.Dataset) and dataset.ndim == 1:
                meta[name] = _scalar(dataset[row])
        return Cutout(ref, image, mask, mask_bits, meta)
    if ref.key not in f:
        raise CutoutError(f"{ref.source}: no such cutout in the file")
    group = f[ref.key]
    if not isinstance(group, h5py.Group):
        raise CutoutError(f"{ref.source}: unknown HDF5 layout (expected a group per cutout)")
    if "mask_bits" in group.attrs:
        mask_bits.update(json.loads(group.attrs["mask_bits"]))
    for image_key, mask_key in (("image", "mask"), ("HDU0/DATA", "HDU1/DATA"), ("DATA", "MASK")):
        if image_key in group:
            image = np.asarray(group[image_key][()], dtype=np.float32)
            mask = np.asarray(group[mask_key][()]) if mask_key in group else None
            break
    else:
        raise CutoutError(
            f"{ref.source}: unknown HDF5 layout; expected datasets 'image' (+'mask'), "
            f"'HDU0/DATA' (+'HDU1/DATA') or 'DATA' (+'MASK') in each cutout group, found {sorted(group.keys())}"
        )
    meta = {k: _scalar(v) for k, v in group.attrs.items() if k != "mask_bits"}
    return Cutout(ref, image, mask, mask_bits, meta)


def _scalar(value):
    value = value.item() if isinstance(value, np.generic) else value
    return value.decode() if isinstance(value, bytes) else value


# ----------------------------------------------------------------------------------------
# Preprocessing


def resize_image(image, size=hsc.ICL_IMAGE_SIZE):
    """Resize a 2-D image to (size, size) exactly as the original pipeline did.

    ``skimage.transform.resize`` with bilinear interpolation and anti-aliasing: the same
    call shrinks real cutouts and the mocks, so both get the same smoothing of the noise.
    """
    from skimage.transform import resize

    image = np.asarray(image, dtype=np.float32)
    if image.shape == (size, size):
        return image.copy()
    return resize(image, (size, size), order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)


def resize_mask(bad, size=hsc.ICL_IMAGE_SIZE):
    """Resize a boolean mask: an output pixel is masked when more than half its area was."""
    from skimage.transform import resize

    bad = np.asarray(bad, dtype=bool)
    if bad.shape == (size, size):
        return bad.copy()
    fraction = resize(bad.astype(np.float32), (size, size), order=1, anti_aliasing=True, preserve_range=True)
    return fraction > 0.5


def bad_pixels(cutout, planes=hsc.ICL_MASK_PLANES):
    """Boolean map of pixels the model must not see: flagged planes plus non-finite pixels."""
    bad = ~np.isfinite(cutout.image)
    if cutout.mask is not None:
        bad |= (cutout.mask.astype(np.int64) & hsc.mask_value(cutout.mask_bits, planes)) != 0
    return bad


def pad_to_square(image, bad):
    """Pad the short axis symmetrically so that both axes keep the same physical scale.

    Returns copies; padded pixels are 0 in ``image`` and True in ``bad``.
    """
    height, width = image.shape
    side = max(height, width)
    if height == width:
        return image, bad
    top, left = (side - height) // 2, (side - width) // 2
    padded = np.zeros((side, side), dtype=image.dtype)
    padded[top : top + height, left : left + width] = image
    padded_bad = np.ones((side, side), dtype=bool)
    padded_bad[top : top + height, left : left + width] = bad
    return padded, padded_bad


def check_cutout(cutout):
    """Validate a cutout read from disk; raise :class:`CutoutError` naming the problem."""
    source = cutout.ref.source
    image = cutout.image
    if image.ndim != 2:
        raise CutoutError(f"{source}: image must be 2-D, got shape {image.shape}")
    if image.size == 0 or min(image.shape) < 2:
        raise CutoutError(f"{source}: image is empty (shape {image.shape})")
    if cutout.mask is not None and cutout.mask.shape != image.shape:
        raise CutoutError(f"{source}: mask shape {cutout.mask.shape} does not match image shape {image.shape}")
    if cutout.mask is not None and not np.issubdtype(cutout.mask.dtype, np.integer):
        raise CutoutError(f"{source}: mask must hold integer mask-plane bits, got dtype {cutout.mask.dtype}")
    if not np.isfinite(image).any():
        raise CutoutError(f"{source}: image has no finite pixels")


def prepare_image(image, bad=None, size=hsc.ICL_IMAGE_SIZE):
    """Turn an image in counts into the ICL model's input (SPEC Part A preprocessing).

    Parameters
    ----------
    image : ndarray, shape (H, W)
        Counts at zero point 27; NaN pixels are treated as masked.
    bad : ndarray of bool, shape (H, W), optional
        Pixels to zero (BAD | NO_DATA | BRIGHT_OBJECT).
    size : int
        Output side in pixels.

    Returns
    -------
    ndarray of float32, shape (size, size, 1)
        arcsinh(clip(image, 0, 10) / 0.017359) with bad pixels set to 0.
    """
    image = np.asarray(image, dtype=np.float32)
    bad = np.zeros(image.shape, dtype=bool) if bad is None else np.asarray(bad, dtype=bool)
    bad = bad | ~np.isfinite(image)
    image = np.where(bad, 0.0, image).astype(np.float32)
    image, bad = pad_to_square(image, bad)
    image = resize_image(image, size)
    bad = resize_mask(bad, size)
    image = np.arcsinh(np.clip(image, *hsc.CLIP_RANGE) / hsc.ARCSINH_SCALE)
    image[bad] = 0.0
    return image[..., None].astype(np.float32)


def prepare_cutout(cutout, size=hsc.ICL_IMAGE_SIZE):
    """Validate and prepare one :class:`Cutout`; returns the (size, size, 1) model input.

    Warns (and carries on) when more than half the cutout is masked.
    """
    if cutout.prepared:
        image = cutout.image
        if image.shape != (size, size):
            raise CutoutError(f"{cutout.ref.source}: prepared image must be {size}x{size}, got shape {image.shape}")
        if not np.isfinite(image).all():
            raise CutoutError(f"{cutout.ref.source}: prepared image holds NaN or infinite values")
        return image[..., None].astype(np.float32)
    check_cutout(cutout)
    bad = bad_pixels(cutout)
    if bad.mean() > 0.5:
        logger.warning("%s: %.0f%% of the pixels are masked", cutout.ref.source, 100 * bad.mean())
    return prepare_image(cutout.image, bad, size)


def report_bad_cutouts(errors, verb="processed"):
    """Print one line per bad cutout to stderr; returns the exit status of a script (1 if any, else 0)."""
    import sys

    if not errors:
        return 0
    print(f"{len(errors)} cutout(s) could not be {verb}:", file=sys.stderr)
    for message in errors:
        print(f"  {message}", file=sys.stderr)
    return 1


def load_prepared(ref, size=hsc.ICL_IMAGE_SIZE):
    """Read and prepare one cutout; raises :class:`CutoutError`."""
    return prepare_cutout(read_cutout(ref), size)


# ----------------------------------------------------------------------------------------
# tf.data pipelines


def cutout_dataset(refs, batch_size, size=hsc.ICL_IMAGE_SIZE, labels=None, shuffle_seed=None, strict=False):
    """Stream prepared cutouts from disk in order, in parallel, batched and prefetched.

    Parameters
    ----------
    refs : sequence of CutoutRef
    batch_size : int
    size : int
        Side of the prepared images.
    labels : sequence of float, optional
        One label per ref; when given, each element also carries ``label``.
    shuffle_seed : int, optional
        Shuffle the order (anew each epoch, reproducibly) before reading, for training.
    strict : bool
        Stop the stream at the first bad cutout (a ``tf.errors.OpError`` carrying its message)
        instead of marking it; training and fine-tuning sets must not lose examples silently.

    Returns
    -------
    tf.data.Dataset
        Batches of dicts: ``image`` (B, size, size, 1) float32, ``index`` (B,) int64 position in
        ``refs``, ``error`` (B,) string, empty when the cutout was prepared; a bad cutout gives
        a zero image and its message, so one broken file never stops a stream.
    """
    import tensorflow as tf

    refs = list(refs)

    def load(index):
        index = int(index)
        try:
            return load_prepared(refs[index], size), b""
        except CutoutError as error:
            if strict:
                raise
            return np.zeros((size, size, 1), np.float32), str(error).encode()

    def load_tf(index):
        image, error = tf.numpy_function(load, [index], [tf.float32, tf.string], stateful=False)
        image.set_shape((size, size, 1))
        error.set_shape(())
        return {"image": image, "index": index, "error": error}

    dataset = tf.data.Dataset.range(len(refs))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(refs), seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = dataset.map(load_tf, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if labels is not None:
        label_tensor = tf.constant(np.asarray(labels, dtype=np.float32))
        dataset = dataset.map(lambda e: {**e, "label": tf.gather(label_tensor, e["index"])})
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def read_labels(refs, label_key):
    """Per-cutout labels from the files' metadata (e.g. ``f_icl_sb`` of the mocks)."""
    labels = []
    for ref in refs:
        cutout = read_cutout(ref)
        if label_key not in cutout.meta:
            raise CutoutError(f"{ref.source}: has no label '{label_key}' (available: {sorted(cutout.meta)})")
        label = float(cutout.meta[label_key])
        if not np.isfinite(label):
            raise CutoutError(f"{ref.source}: label '{label_key}' is {label}; remove the cutout or measure it again")
        labels.append(label)
    return np.asarray(labels, dtype=np.float32)


def load_labelled_arrays(inputs, label_key):
    """Prepared images and labels of every cutout in the inputs, in memory (small sets only).

    Returns ``(ids, images (N, 224, 224, 1), labels (N,))``; raises on the first bad cutout,
    since a training or fine-tuning set with a silently dropped cluster is a different set.
    """
    refs, errors = index_cutouts(inputs)
    if errors:
        raise CutoutError(errors[0][1])
    if not refs:
        raise CutoutError(f"{inputs}: no cutouts found")
    images = np.stack([load_prepared(ref) for ref in refs])
    return [ref.id for ref in refs], images, read_labels(refs, label_key)


# ----------------------------------------------------------------------------------------
# Tidal-feature cutouts (Desmons et al. 2023; SPEC Part B)
#
# 128 x 128 cutouts in the bands g, r, i, z, y, counts at zero point 27, stored in the tidal
# stacked HDF5 layout (``image`` (N, H, W, 5) float32, ``id``, ``has_tidal``, ``feature_type``,
# ``feature_sb``, ``params``; file attribute ``bands = "grizy"``) or read from the TFDS builders
# ``tidal_unlabelled`` / ``tidal_labelled`` of ``data/tidal_datasets.py``.

#: Bands of the tidal cutouts, in the order of the last image axis.
TIDAL_BANDS = hsc.TIDAL_BANDS
#: Softening of the tidal stretch arcsinh(x / scale / 3), in units of the per-band scale.
TIDAL_STRETCH_SOFTENING = hsc.TIDAL_STRETCH_SOFTENING
#: Number of images (the first ones of the unlabelled stream) whose pixels set the band scale.
TIDAL_SCALE_IMAGES = 1000
#: Names of the classifier sets, and their default sizes per class (Desmons et al. 2023).
TIDAL_SPLITS = ("train", "validation", "test")
TIDAL_SPLIT_SIZES = (300, 30, 50)


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
    """

    paths: tuple
    file_index: np.ndarray
    rows: np.ndarray
    ids: np.ndarray
    has_tidal: np.ndarray
    feature_type: np.ndarray
    feature_sb: np.ndarray
    image_shape: tuple

    def __len__(self):
        return len(self.ids)


def index_tidal_hdf5(inputs):
    """List the galaxies of tidal HDF5 files (files or directories of them).

    Raises
    ------
    CutoutError
        If a file is unreadable, not in the tidal layout, or the files disagree on image shape.
    """
    paths = [path for path in find_files(inputs) if _suffix_kind(pathlib.Path(path)) == "hdf5"]
    if not paths:
        raise CutoutError(f"{inputs}: no HDF5 files found")
    columns = {"file_index": [], "rows": [], "ids": [], "has_tidal": [], "feature_type": [], "feature_sb": []}
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
                columns["ids"].extend(_decode(f["id"][()]) if "id" in f else [f"{pathlib.Path(path).stem}_{i}" for i in range(count)])
                columns["has_tidal"].append(np.asarray(f["has_tidal"][()], dtype=np.int64))
                columns["feature_type"].extend(_decode(f["feature_type"][()]) if "feature_type" in f else ["unknown"] * count)
                columns["feature_sb"].append(
                    np.asarray(f["feature_sb"][()], dtype=np.float64) if "feature_sb" in f else np.full(count, np.nan)
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
    return TidalCatalogue(
        paths=tuple(paths),
        file_index=np.concatenate(columns["file_index"]),
        rows=np.concatenate(columns["rows"]),
        ids=np.asarray(columns["ids"]),
        has_tidal=has_tidal,
        feature_type=np.asarray(columns["feature_type"]),
        feature_sb=np.where(has_tidal == 1, np.concatenate(columns["feature_sb"]), np.nan),
        image_shape=image_shape,
    )


def read_tidal_images(catalogue, indices):
    """Images (counts, float32) of the galaxies at ``indices`` of a :class:`TidalCatalogue`.

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
            images[chosen[order]] = f["image"][rows[order]]
    return images


def tidal_hdf5_dataset(catalogue, chunk=64):
    """Stream every image of a :class:`TidalCatalogue` from disk as ``{"image", "id"}`` elements.

    Reads ``chunk`` rows at a time so the unlabelled set never has to fit in memory.
    """
    import tensorflow as tf

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
        unlabelled set with the tidal galaxies joined in.
    splits : dict of str -> ndarray of int, or None
        Classifier sets fixed by the storage (the TFDS builder's splits), as indices into
        ``ids``; None when :func:`tidal_classifier_splits` draws them.
    truth : dict of str -> ndarray, or None
        Mock truth of the labelled pool when the storage has it: ``feature_type`` (str) and
        ``feature_sb`` (mag/arcsec^2, NaN without a feature), each of shape (N,).
    """

    description: str
    ids: np.ndarray
    labels: np.ndarray
    image_shape: tuple
    read_labelled: object
    unlabelled: object
    splits: dict = None
    truth: dict = None


def tidal_source_splits(source, sizes=TIDAL_SPLIT_SIZES, seed=0):
    """The classifier sets of a :class:`TidalSource`: its own splits if it has them, else drawn.

    Raises
    ------
    ValueError
        If a set lacks one of the classes, or the pool is too small for ``sizes``.
    """
    if source.splits is None:
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
    and the labelled pool is every galaxy with its ``has_tidal`` truth (mock data)."""
    catalogue = index_tidal_hdf5(inputs)
    has_truth = (catalogue.feature_type != "unknown").any() or np.isfinite(catalogue.feature_sb).any()
    return TidalSource(
        description=", ".join(catalogue.paths),
        ids=catalogue.ids,
        labels=catalogue.has_tidal,
        image_shape=catalogue.image_shape,
        read_labelled=lambda indices: read_tidal_images(catalogue, indices),
        unlabelled=lambda: tidal_hdf5_dataset(catalogue).map(lambda element: element["image"]),
        truth={"feature_type": catalogue.feature_type, "feature_sb": catalogue.feature_sb} if has_truth else None,
    )


def _load_tfds(name, data_dir, split="all"):
    import tensorflow_datasets as tfds

    from data import tidal_datasets  # noqa: F401  (importing registers the builders)

    return tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False)


def tidal_source_from_tfds(unlabelled_name="tidal_unlabelled", labelled_name="tidal_labelled", data_dir=None):
    """A :class:`TidalSource` over the TFDS builders of ``data/tidal_datasets.py``.

    The labelled builder (small by design) is read into memory, and its train / validation /
    test splits are the classifier sets; its tidal galaxies join the unlabelled stream, as in
    Desmons et al. 2023. Builder configs go in the names (``"tidal_unlabelled/small"``).
    """
    labelled, splits = [], {}
    for name in TIDAL_SPLITS:
        elements = list(_load_tfds(labelled_name, data_dir, split=name).as_numpy_iterator())
        splits[name] = np.arange(len(labelled), len(labelled) + len(elements))
        labelled.extend(elements)
    if not labelled:
        raise CutoutError(f"TFDS dataset {labelled_name} is empty")
    images = np.stack([element["image"] for element in labelled]).astype(np.float32)
    labels = np.asarray([int(element["label"]) for element in labelled])
    ids = np.asarray(_decode([element["id"] for element in labelled]))
    check_tidal_shape(images.shape, name=f"{labelled_name} images")

    def unlabelled():
        import tensorflow as tf

        stream = _load_tfds(unlabelled_name, data_dir).map(lambda element: tf.cast(element["image"], tf.float32))
        return stream.concatenate(tf.data.Dataset.from_tensor_slices(images[labels == 1]))

    return TidalSource(
        description=f"tfds {unlabelled_name} + {labelled_name} ({data_dir or 'default data_dir'})",
        ids=ids,
        labels=labels,
        image_shape=images.shape[1:],
        read_labelled=lambda indices: images[np.asarray(indices, dtype=np.int64)],
        unlabelled=unlabelled,
        splits=splits,
    )


# ----------------------------------------------------------------------------------------
# Writing


def atomic_path(path):
    """Temporary sibling path to write to before ``os.replace`` onto ``path``."""
    path = pathlib.Path(path)
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def write_stacked_hdf5(path, images, masks=None, ids=None, columns=None, mask_bits=None, pixel_scale=None,
                       attributes=None):
    """Write cutouts in the *stacked* layout, atomically (temporary file, then rename).

    Parameters
    ----------
    path : str
    images : ndarray, shape (N, H, W) or (N, H, W, bands)
        Counts; stored as given (float16 halves the size and stays far below the noise).
    masks : ndarray of int, shape (N, H, W), optional
    ids : sequence of str, optional
    columns : dict of str -> sequence, optional
        Per-cutout values (numbers, or strings such as JSON parameters).
    mask_bits : dict, optional
    pixel_scale : float, optional
    attributes : dict, optional
        Further file attributes (e.g. ``bands = "grizy"`` for tidal cutouts).
    """
    images = np.asarray(images)
    if images.ndim not in (3, 4):
        raise ValueError(f"images must be (N, H, W) or (N, H, W, bands), got shape {images.shape}")
    path = pathlib.Path(path)
    temporary = atomic_path(path)
    with h5py.File(temporary, "w") as f:
        f.attrs["format"] = HDF5_FORMAT
        f.attrs["layout"] = "stacked"
        f.attrs["mask_bits"] = json.dumps(mask_bits or hsc.DEFAULT_MASK_BITS)
        if pixel_scale is not None:
            f.attrs["pixel_scale"] = float(pixel_scale)
        for key, value in (attributes or {}).items():
            f.attrs[key] = value
        f.create_dataset("image", data=images, chunks=(1,) + images.shape[1:])
        if masks is not None:
            f.create_dataset("mask", data=np.asarray(masks), chunks=(1,) + images.shape[1:], compression="gzip")
        if ids is not None:
            f.create_dataset("id", data=np.asarray([str(i) for i in ids], dtype=h5py.string_dtype()))
        for name, values in (columns or {}).items():
            values = list(values)
            if values and isinstance(values[0], str):
                f.create_dataset(name, data=np.asarray(values, dtype=h5py.string_dtype()))
            else:
                f.create_dataset(name, data=np.asarray(values))
    os.replace(temporary, path)


def write_groups_hdf5(path, cutouts):
    """Write :class:`Cutout` records of any size in the *groups* layout, atomically."""
    path = pathlib.Path(path)
    temporary = atomic_path(path)
    with h5py.File(temporary, "w") as f:
        f.attrs["format"] = HDF5_FORMAT
        f.attrs["layout"] = "groups"
        for cutout in cutouts:
            group = f.create_group(cutout.id)
            group.create_dataset("image", data=cutout.image)
            if cutout.mask is not None:
                group.create_dataset("mask", data=cutout.mask, compression="gzip")
            group.attrs["mask_bits"] = json.dumps(cutout.mask_bits)
            for key, value in cutout.meta.items():
                group.attrs[key] = value
    os.replace(temporary, path)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Prepare cluster cutouts (FITS, HDF5) into a .npy array of 224x224 model inputs."
    )
    parser.add_argument("inputs", nargs="+", help="FITS or HDF5 files, or directories of them")
    parser.add_argument("--out", required=True, help="output .npy file; the ids go to OUT.ids.txt")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from tqdm import tqdm

    try:
        refs, errors = index_cutouts(args.inputs)
    except CutoutError as error:
        parser.exit(2, f"error: {error}\n")
    images, ids = [], []
    for ref in tqdm(refs, desc="preparing", unit="cutout", disable=len(refs) < 20):
        try:
            images.append(load_prepared(ref)[..., 0])
            ids.append(ref.id)
        except CutoutError as error:
            errors.append((ref.source, str(error)))
    for _, message in errors:
        print(f"error: {message}")
    out = pathlib.Path(args.out)
    temporary = atomic_path(out)
    with open(temporary, "wb") as handle:
        np.save(handle, np.asarray(images, dtype=np.float32).reshape(-1, hsc.ICL_IMAGE_SIZE, hsc.ICL_IMAGE_SIZE))
    os.replace(temporary, out)
    ids_path = out.with_suffix(".ids.txt")
    ids_path.write_text("".join(f"{i}\n" for i in ids))
    print(f"wrote {len(images)} prepared images to {out} (ids in {ids_path})")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
