"""Writing cutouts in this project's HDF5 layouts (specified in :mod:`prep_data`, which reads them).

Every file is written atomically: a hidden temporary file, renamed over the target when complete.
"""

import json

import h5py
import numpy as np

import common
import hsc
from prep_data import HDF5_FORMAT


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
    with common.atomic_write(path) as temporary, h5py.File(temporary, "w") as f:
        f.attrs["format"] = HDF5_FORMAT
        f.attrs["layout"] = "stacked"
        f.attrs["mask_bits"] = json.dumps(mask_bits or hsc.DEFAULT_MASK_BITS)
        if pixel_scale is not None:
            f.attrs["pixel_scale"] = float(pixel_scale)
        for key, value in (attributes or {}).items():
            f.attrs[key] = value

        def add(name, data, **options):
            f.create_dataset(name, data=data, **options)
            # Cached chunks get their place in the file now rather than when the dataset object is
            # freed: a sampling profiler (a Dask worker's) that briefly holds a reference would
            # otherwise move them, and the same cutouts would give different bytes.
            f.flush()

        add("image", images, chunks=(1,) + images.shape[1:])
        if masks is not None:
            add("mask", np.asarray(masks), chunks=(1,) + images.shape[1:], compression="gzip")
        if ids is not None:
            add("id", np.asarray([str(i) for i in ids], dtype=h5py.string_dtype()))
        for name, values in (columns or {}).items():
            values = list(values)
            if values and isinstance(values[0], str):
                add(name, np.asarray(values, dtype=h5py.string_dtype()))
            else:
                add(name, np.asarray(values))


def write_groups_hdf5(path, cutouts):
    """Write :class:`Cutout` records of any size in the *groups* layout, atomically."""
    with common.atomic_write(path) as temporary, h5py.File(temporary, "w") as f:
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
