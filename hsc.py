"""Hyper Suprime-Cam conventions shared by every part of the project.

The true constants (pixel scale, zero point, mask bits, the display scale and the
normalisation of the ICL model) live here and nowhere else, together with the
photometric conversions between counts and surface brightness.

References
----------
Canepa et al. 2025 (ApJ, arXiv:2501.08378), section 2 and appendix A;
Chilingarian, Melchior & Zolotukhin 2010 for the k-correction polynomial;
Aihara et al. 2018 (PASJ 70, S4) for the HSC mask planes.
"""

import numpy as np

#: HSC pixel scale in arcsec per pixel.
PIXEL_SCALE = 0.168
#: Photometric zero point of HSC coadds (AB mag of one count).
ZERO_POINT = 27.0
#: Flux of a zero-magnitude source in counts, 10**(0.4 * ZERO_POINT).
ZERO_POINT_FLUX = 10.0 ** (0.4 * ZERO_POINT)

#: Default HSC mask plane bit numbers (used when a FITS header has no MP_* keys).
DEFAULT_MASK_BITS = {"BAD": 0, "NO_DATA": 8, "BRIGHT_OBJECT": 9}
#: Mask planes whose pixels are set to zero before the ICL model sees them.
ICL_MASK_PLANES = ("BAD", "NO_DATA", "BRIGHT_OBJECT")

#: Side of the square image the ICL model reads, in pixels.
ICL_IMAGE_SIZE = 224
#: Half-width of an ICL cutout in kpc (the image spans +-300 kpc).
CUTOUT_HALF_WIDTH_KPC = 300.0
#: Pixel values are clipped to this range (counts) before the arcsinh stretch.
CLIP_RANGE = (0.0, 10.0)
#: Arcsinh softening scale in counts: the typical background noise of the resized images.
ARCSINH_SCALE = 0.017359
#: Mean and standard deviation of arcsinh-stretched training images (model input normalisation).
NORM_MEAN = 0.948
NORM_STD = 1.108

#: Bands of the tidal-feature cutouts, in order.
TIDAL_BANDS = "grizy"
#: Tidal images are stretched as arcsinh(x / (scale * TIDAL_STRETCH_SOFTENING)), scale = per-band MAD-std.
TIDAL_STRETCH_SOFTENING = 3.0

#: Redshift range of the clusters and training galaxies.
Z_MIN, Z_MAX = 0.1, 0.5

#: k-correction polynomial coefficients for g - r = 0.7 (Chilingarian et al. 2010), lowest order first.
K_CORRECTION_COEFFS = (0.0, 1.111, -1.101, -75.050, 295.888, -295.390)


def mask_value(bits, planes=ICL_MASK_PLANES):
    """Integer with the bits of the named mask planes set.

    Parameters
    ----------
    bits : dict of str -> int
        Mask plane name to bit number, e.g. ``DEFAULT_MASK_BITS``.
    planes : sequence of str
        Names of the planes to combine.
    """
    value = 0
    for plane in planes:
        value |= 1 << int(bits[plane])
    return value


def k_correction(z):
    """r-band k-correction (mag) at redshift ``z`` for a g - r = 0.7 galaxy.

    k(z) = 1.111 z - 1.101 z^2 - 75.050 z^3 + 295.888 z^4 - 295.390 z^5
    (Chilingarian et al. 2010), as used by Canepa et al. 2025.
    """
    z = np.asarray(z, dtype=float)
    return np.polynomial.polynomial.polyval(z, K_CORRECTION_COEFFS)


def observed_surface_brightness(mu_rest, z):
    """Observed threshold for a rest-frame surface brightness ``mu_rest`` at redshift ``z``.

    Tolman dimming 10 log10(1 + z) plus the k-correction, in mag/arcsec^2.
    """
    z = np.asarray(z, dtype=float)
    return mu_rest + 10.0 * np.log10(1.0 + z) + k_correction(z)


def sb_to_counts(mu, pixel_scale=PIXEL_SCALE):
    """Counts per pixel of a surface brightness ``mu`` (mag/arcsec^2).

    c = 10**(-0.4 (mu - ZP - 5 log10(pixel_scale))).
    """
    mu = np.asarray(mu, dtype=float)
    return 10.0 ** (-0.4 * (mu - ZERO_POINT - 5.0 * np.log10(pixel_scale)))


def counts_to_sb(counts, pixel_scale=PIXEL_SCALE):
    """Surface brightness (mag/arcsec^2) of a pixel holding ``counts``.

    mu = 2.5 log10(ZERO_POINT_FLUX / c) + 5 log10(pixel_scale); non-positive counts give inf.
    """
    counts = np.asarray(counts, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = 2.5 * np.log10(ZERO_POINT_FLUX / counts) + 5.0 * np.log10(pixel_scale)
    return np.where(counts > 0, mu, np.inf)


def mag_to_counts(mag):
    """Total counts of a source of AB magnitude ``mag``: 10**(-0.4 (mag - ZP))."""
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - ZERO_POINT))


def counts_to_mag(counts):
    """AB magnitude of a source with ``counts`` total counts."""
    return ZERO_POINT - 2.5 * np.log10(np.asarray(counts, dtype=float))
