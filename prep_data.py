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

The HDF5 layouts are written by :mod:`data.files`; the tidal-feature cutouts have their own
module, :mod:`tidal_data`.

The ``tf.data`` pipelines stream cutouts from disk in parallel, one cutout at a time, so
inputs of any size never have to fit in memory; ``loaders.CutoutLoader`` does the same without
TensorFlow, for the other Keras backends.
"""

import common

if __name__ in common.MAIN_NAMES:
    common.quiet_interrupt()  # a Ctrl-C while the libraries load is one line, not a traceback

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import sys
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
#: Largest value of a prepared image: arcsinh of the clip's top over the stretch scale (~7.05).
PREPARED_MAX = float(np.arcsinh(hsc.CLIP_RANGE[1] / hsc.ARCSINH_SCALE))
#: What a .npy input must hold, for the messages that refuse one.
PREPARED_DESCRIPTION = (
    "a .npy input must hold prepared images (prep_data.py output: arcsinh(clip(counts, 0, 10) / 0.017359), "
    f"values in [0, {PREPARED_MAX:.2f}], masked pixels 0), shape (N, S, S), (N, S, S, 1) or (S, S) "
    "with S the checkpoint's input size"
)
#: Smallest side, in pixels, of a cutout that is prepared (a smaller one is mostly interpolation).
MIN_SIDE = 16
#: Largest side ``prep_data.py --size`` makes (the models take 112 or 224 px; 2048 px is 16 MiB an image).
MAX_SIDE = 2048
#: Largest fraction of the padded square that may be masked or padding; the rest must be sky.
MAX_UNUSABLE_FRACTION = 0.7


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


def file_kind(path):
    """``"fits"``, ``"hdf5"``, ``"npy"`` or None, from the name of ``path`` (a ``pathlib.Path``)."""
    name = path.name.lower()
    if name.endswith(FITS_SUFFIXES):
        return "fits"
    if name.endswith(HDF5_SUFFIXES):
        return "hdf5"
    if name.endswith(NPY_SUFFIXES):
        return "npy"
    return None


def find_files(inputs, errors=None):
    """Expand files and directories into a list of readable cutout files, in input order.

    Directories are searched (not recursively) for FITS, HDF5 and .npy files, sorted by name.

    Raises
    ------
    CutoutError
        If an input does not exist, has an unknown suffix, or a directory holds no cutouts;
        when ``errors`` is a list, ``(input, message)`` is appended to it instead and the other
        inputs are still listed.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = []
    for item in inputs:
        try:
            files.extend(_expand_input(pathlib.Path(item)))
        except CutoutError as error:
            if errors is None:
                raise
            errors.append((str(item), str(error)))
    return files


def _expand_input(path):
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and file_kind(p))
        if not found:
            raise CutoutError(f"{path}: directory holds no FITS, HDF5 or .npy files")
        return [str(p) for p in found]
    if path.is_file():
        if file_kind(path) is None:
            raise CutoutError(
                f"{path}: unknown file type; expected one of "
                f"{', '.join(FITS_SUFFIXES + HDF5_SUFFIXES + NPY_SUFFIXES)}"
            )
        return [str(path)]
    raise CutoutError(f"{path}: no such file or directory")


def index_cutouts(inputs, missing_ok=False):
    """List every cutout in the inputs without reading pixels.

    Parameters
    ----------
    inputs : str or sequence of str
        Files and directories (see :func:`find_files`).
    missing_ok : bool
        Report a missing or unknown input in ``errors`` and go on, instead of raising.

    Returns
    -------
    refs : list of CutoutRef
        One per cutout, in input order.
    errors : list of (str, str)
        (source, message) for files that could not even be listed; they hold no refs.
    """
    refs, errors = [], []
    for path in find_files(inputs, errors if missing_ok else None):
        try:
            listed = _list_file(path)
        except CutoutError as error:
            errors.append((path, str(error)))
            continue
        if not listed:
            errors.append((path, f"{path}: holds no cutouts"))
        refs.extend(listed)
    return refs, errors


def _list_file(path):
    kind = file_kind(pathlib.Path(path))
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
        if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[-1] != 1):
            raise CutoutError(f"{path}: {PREPARED_DESCRIPTION}; got an array of shape {array.shape}")
        return [CutoutRef(path, i, f"{stem}_{i}") for i in range(array.shape[0])]
    try:
        with h5py.File(path, "r") as f:
            if _is_stacked(f):
                _check_stacked(f, path)
                n = f["image"].shape[0]
                ids = decode_strings(f["id"][()]) if "id" in f else [f"{stem}_{i}" for i in range(n)]
                return [CutoutRef(path, i, str(ids[i])) for i in range(n)]
            if "image" in f and isinstance(f["image"], h5py.Dataset):
                shape = f["image"].shape
                if len(shape) == 4 and shape[-1] == 5:
                    raise CutoutError(f"{path}: holds 5-band tidal-feature cutouts (image {shape}), "
                                      "not single-band ICL cluster cutouts")
                raise CutoutError(f"{path}: dataset 'image' has shape {shape}; "
                                  "the stacked layout needs (N, H, W) images")
            groups = [key for key in f.keys() if isinstance(f[key], h5py.Group)]
            if not groups:
                found = sorted(f.keys())
                raise CutoutError(
                    f"{path}: unknown HDF5 layout; expected a stacked 'image' (N, H, W) dataset or one group per "
                    f"cutout, found {found if found else 'an empty file'}"
                )
            return [CutoutRef(path, key, key) for key in groups]
    except OSError as error:
        raise CutoutError(f"{path}: cannot read HDF5 file ({error})") from None


def _check_stacked(f, path):
    """Refuse a stacked file whose per-cutout datasets do not have one entry per image."""
    shape = f["image"].shape
    if "mask" in f and f["mask"].shape != shape:
        raise CutoutError(f"{path}: dataset 'mask' has shape {f['mask'].shape}, the images {shape}")
    for name, dataset in f.items():
        if name in ("image", "mask") or not isinstance(dataset, h5py.Dataset):
            continue
        if name == "id" or dataset.ndim == 1:
            if dataset.ndim != 1 or dataset.shape[0] != shape[0]:
                raise CutoutError(f"{path}: dataset '{name}' has shape {dataset.shape}, "
                                  f"expected one entry per image ({shape[0]})")


def _is_stacked(f):
    return "image" in f and isinstance(f["image"], h5py.Dataset) and f["image"].ndim == 3


def decode_strings(values):
    """Strings (or bytes, as h5py returns them) as a list of ``str``."""
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
    kind = file_kind(pathlib.Path(ref.path))
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
    except (OSError, KeyError, ValueError, TypeError, IndexError) as error:
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
                        try:
                            meta["z"] = float(header[key])
                        except (TypeError, ValueError):
                            # The redshift is not needed to predict: ignore it, do not lose the cutout.
                            logger.warning("%s: keyword %s = %r is not a number; ignored", ref.source, key,
                                           header[key])
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


#: How :func:`resize_mask` resizes: "any" (the original's preparation and automatic measurement)
#: or "nearest" (the original's manual measurement of real clusters).
MASK_RESIZE_RULES = ("any", "nearest")


def resize_mask(bad, size=hsc.ICL_IMAGE_SIZE, rule="any"):
    """Resize a boolean mask as the original code did.

    ``"any"``: the mask is resized like the image (bilinear, anti-aliased) and an output pixel
    is masked when any masked input pixel contributed to it, which is the original's
    ``resize(mask) > 0``; every output pixel that a masked pixel's value reaches is masked, so
    what a bad pixel holds never leaks into the unmasked image. ``"nearest"``: nearest-neighbour
    sampling, what the original's ``resize`` did to the boolean masks of real clusters in its
    manual measurement.
    """
    from skimage.transform import resize

    if rule not in MASK_RESIZE_RULES:
        raise ValueError(f"rule must be one of {MASK_RESIZE_RULES}, got {rule!r}")
    bad = np.asarray(bad, dtype=bool)
    if bad.shape == (size, size):
        return bad.copy()
    if rule == "nearest":
        return resize(bad, (size, size), order=0, anti_aliasing=False).astype(bool)
    weight = resize(bad.astype(np.float64), (size, size), order=1, anti_aliasing=True, preserve_range=True)
    return weight > 0


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
        return check_prepared(cutout, size)[..., None].astype(np.float32)
    check_cutout(cutout)
    bad = bad_pixels(cutout)
    check_usable(cutout, bad)
    if bad.mean() > 0.5:
        logger.warning("%s: %.0f%% of the pixels are masked", cutout.ref.source, 100 * bad.mean())
    return prepare_image(cutout.image, bad, size)


def check_prepared(cutout, size=hsc.ICL_IMAGE_SIZE):
    """The image of a prepared cutout (.npy), refused unless it is a prepared image of side ``size``."""
    source, image = cutout.ref.source, cutout.image
    if image.shape != (size, size):
        raise CutoutError(
            f"{source}: prepared image must be {size}x{size} to match the checkpoint's input size, got shape "
            f"{image.shape}; prepare the cutouts with prep_data.py --size {size}"
        )
    if not np.isfinite(image).all():
        raise CutoutError(f"{source}: prepared image holds NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < -1e-4 or high > PREPARED_MAX + 1e-3:
        raise CutoutError(f"{source}: values in [{low:.3g}, {high:.3g}] are not a prepared image ({PREPARED_DESCRIPTION})")
    if high - low == 0:
        raise CutoutError(f"{source}: prepared image is constant ({low:.3g} everywhere); not a sky cutout")
    return image


def check_usable(cutout, bad):
    """Refuse a cutout whose prediction would mean nothing: too small, mostly padding or masked, or flat."""
    source, image = cutout.ref.source, cutout.image
    height, width = image.shape
    if min(height, width) < MIN_SIDE:
        raise CutoutError(f"{source}: image of {height}x{width} px is too small (at least {MIN_SIDE} px a side)")
    side = max(height, width)
    padding = 1 - height * width / side**2
    unusable = padding + (1 - padding) * float(bad.mean())
    if padding > MAX_UNUSABLE_FRACTION:
        raise CutoutError(f"{source}: aspect ratio of {height}x{width} px: padding to a square would be "
                          f"{100 * padding:.0f}% of the image (at most {100 * MAX_UNUSABLE_FRACTION:.0f}%)")
    if unusable > MAX_UNUSABLE_FRACTION:
        raise CutoutError(f"{source}: {100 * unusable:.0f}% of the (padded) image is masked or non-finite "
                          f"(at most {100 * MAX_UNUSABLE_FRACTION:.0f}%)")
    sky = np.clip(image[~bad], *hsc.CLIP_RANGE)
    if sky.size == 0 or float(sky.max() - sky.min()) == 0:
        value = float(sky[0]) if sky.size else 0.0
        raise CutoutError(f"{source}: image is constant ({value:.3g} counts everywhere after clipping to "
                          f"[{hsc.CLIP_RANGE[0]:g}, {hsc.CLIP_RANGE[1]:g}]); not a sky cutout")


def load_prepared(ref, size=hsc.ICL_IMAGE_SIZE):
    """Read and prepare one cutout; raises :class:`CutoutError`."""
    return prepare_cutout(read_cutout(ref), size)


# ----------------------------------------------------------------------------------------
# Streams: tf.data pipelines here, keras.utils.PyDataset loaders in loaders.py


def load_for_stream(ref, size=hsc.ICL_IMAGE_SIZE, strict=False):
    """One cutout of a stream, prepared: ``(image, message)``.

    ``image`` is the (size, size, 1) model input and ``message`` is empty; a cutout that cannot
    be read or prepared gives a zero image and the one-line message naming it, so one broken
    file never stops a stream. With ``strict`` the error is raised instead (training and
    fine-tuning sets must not lose examples silently). Both :func:`cutout_dataset` and
    :class:`loaders.CutoutLoader` read their cutouts through this function.
    """
    try:
        return load_prepared(ref, size), ""
    except CutoutError as error:
        if strict:
            raise
        return np.zeros((size, size, 1), np.float32), str(error)
    except Exception as error:  # one broken cutout must never cost its batch
        if strict:
            raise
        return np.zeros((size, size, 1), np.float32), f"{ref.source}: cannot read cutout ({type(error).__name__}: {error})"


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

    ``loaders.CutoutLoader`` gives the same batches without TensorFlow, for the other Keras
    backends.
    """
    import tensorflow as tf

    refs = list(refs)

    def load(index):
        image, message = load_for_stream(refs[int(index)], size, strict)
        return image, message.encode()

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
        try:
            label = float(np.asarray(cutout.meta[label_key]).item())
        except (TypeError, ValueError):
            raise CutoutError(f"{ref.source}: label '{label_key}' is {cutout.meta[label_key]!r}, not a number") from None
        if not np.isfinite(label):
            raise CutoutError(f"{ref.source}: label '{label_key}' is {label}; remove the cutout or measure it again")
        if not 0.0 <= label <= 1.0:
            # An ICL fraction outside [0, 1] is a broken measurement, and the Beta mixture
            # would silently clip it.
            raise CutoutError(f"{ref.source}: label '{label_key}' is {label:g}, not a fraction in [0, 1]")
        labels.append(label)
    return np.asarray(labels, dtype=np.float32)


def escape_id(identifier):
    """An id fit for one line of ``ids.txt``: backslashes, line feeds and carriage returns escaped."""
    return str(identifier).replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


@common.interruptible("interrupted: rerun the same command (its outputs are written only when complete)")
def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Prepare cluster cutouts (FITS, HDF5) into a .npy array of SxS model inputs (S = 224 by default)."
    )
    parser.add_argument("inputs", nargs="+", help="FITS or HDF5 files, or directories of them")
    parser.add_argument("--out", required=True,
                        help="output .npy file; the ids go to OUT.ids.txt, one a line (\\, line feeds and "
                             "carriage returns escaped as \\\\, \\n and \\r)")
    parser.add_argument("--size", type=int, default=hsc.ICL_IMAGE_SIZE,
                        help=f"side of the prepared images in pixels: the checkpoint's input size "
                             f"(default {hsc.ICL_IMAGE_SIZE}; the shipped checkpoints take 112)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not MIN_SIDE <= args.size <= MAX_SIDE:
        print(f"error: --size must be between {MIN_SIDE} and {MAX_SIDE} px, got {args.size}", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    ids_path = out.with_suffix(".ids.txt")
    try:
        common.check_output_file(out, "--out")
        common.check_output_file(ids_path, "--out")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    refs, errors = index_cutouts(args.inputs, missing_ok=True)
    images, ids = [], []
    for ref in common.progress(refs, desc="preparing", unit="cutout", disable=len(refs) < 20):
        try:
            images.append(load_prepared(ref, args.size)[..., 0])
            ids.append(ref.id)
        except CutoutError as error:
            errors.append((ref.source, str(error)))
    for _, message in errors:
        print(f"error: {message}", file=sys.stderr)
    escaped = [escape_id(i) for i in ids]
    if escaped != [str(i) for i in ids]:
        logger.warning("some ids hold backslashes or line breaks; they are escaped in %s", ids_path)
    common.save_array(out, np.asarray(images, dtype=np.float32).reshape(-1, args.size, args.size))
    common.write_text(ids_path, "".join(f"{i}\n" for i in escaped))
    print(f"wrote {len(images)} prepared images to {out} (ids in {ids_path})")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
