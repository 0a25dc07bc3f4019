"""Small synthetic cluster cutouts for tests: a smooth glow whose share of the light is the label."""

import numpy as np
from astropy.io import fits

import data.files
import hsc


def synthetic_clusters(n, size=64, seed=0, noise=0.03):
    """Images (n, size, size) in counts and labels (n,) in [0.05, 0.45].

    Each image holds a compact 'galaxy' of fixed flux and an extended exponential glow whose
    flux fraction is the label, so a model can learn the label from the pixels.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    radius = np.hypot(x, y)
    galaxy = np.exp(-radius / (size / 40))
    glow = np.exp(-radius / (size / 6))
    labels = rng.uniform(0.05, 0.45, n).astype(np.float32)
    images = []
    for label in labels:
        galaxy_flux = 400.0
        glow_flux = galaxy_flux * label / (1 - label)
        image = galaxy * galaxy_flux / galaxy.sum() + glow * glow_flux / glow.sum()
        images.append(image + rng.normal(0, noise, image.shape))
    return np.asarray(images, np.float32), labels


def write_cluster_hdf5(path, n, size=64, seed=0):
    """A stacked-layout HDF5 file of synthetic clusters with labels in ``f_icl_sb``; returns labels."""
    images, labels = synthetic_clusters(n, size, seed)
    masks = np.zeros(images.shape, np.int32)
    data.files.write_stacked_hdf5(
        path,
        images,
        masks,
        ids=[f"c{seed}_{i:03d}" for i in range(n)],
        columns={"z": np.full(n, 0.3), "f_icl_sb": labels},
    )
    return labels


def write_fits_cutout(path, shape=(80, 64), seed=0, nan_strip=False, star=False, z=0.3, hsc_keys=True):
    """An HSC-style FITS cutout: IMAGE, MASK (with MP_* keys) and VARIANCE HDUs."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 0.03, shape).astype(np.float32)
    y, x = np.mgrid[: shape[0], : shape[1]]
    image += 5 * np.exp(-np.hypot(y - shape[0] / 2, x - shape[1] / 2) / 4)
    mask = np.zeros(shape, np.int32)
    if nan_strip:
        image[:, :4] = np.nan
    if star:
        mask[5:15, 5:15] |= 1 << hsc.DEFAULT_MASK_BITS["BRIGHT_OBJECT"]
        image[5:15, 5:15] = 50.0
    mask_header = fits.Header()
    if hsc_keys:
        for plane, bit in hsc.DEFAULT_MASK_BITS.items():
            mask_header[f"HIERARCH MP_{plane}"] = bit
    primary = fits.PrimaryHDU(header=fits.Header({"Z": z}))
    hdus = [
        primary,
        fits.ImageHDU(image, name="IMAGE"),
        fits.ImageHDU(mask, header=mask_header, name="MASK"),
        fits.ImageHDU(np.full(shape, 1e-3, np.float32), name="VARIANCE"),
    ]
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path
