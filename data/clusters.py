"""Mock HSC r-band cluster cutouts with known intracluster-light (ICL) truth.

Each mock is a +-300 kpc cutout around a cluster at 0.1 <= z <= 0.5, made the way real cutouts
are made (MOCKS.md): the scene is rendered at a fine pixel scale (the native 0.168" when the
cutout has at most :data:`MAX_FINE_SIZE` native pixels, else at most 0.3"), convolved with a
Moffat PSF by FFT, given Gaussian sky noise at the native HSC level, and shrunk to 224 x 224
with :func:`prep_data.resize_image`, the call that shrinks real cutouts. The scene holds a
brightest cluster galaxy (BCG), member galaxies, field galaxies, stars (the bright ones under
BRIGHT_OBJECT masks), occasional NO_DATA edges and a smooth elliptical ICL profile. (The resize
is evaluated as the equivalent sparse matrices, :func:`resize_fast`, tested equal to it.)

Pixel conventions
-----------------
Images are counts per native HSC pixel (zero point 27): the fine grid holds counts per fine
pixel, the noise is scaled so that the resized image has the noise a native-scale cutout would
get, and the resized image is rescaled back to counts per native pixel, so a surface brightness
``mu`` is always ``hsc.sb_to_counts(mu)`` whatever the grid. Pixel ``i`` spans ``[i - 0.5, i +
0.5]``; the cluster centre is the image centre, ``((N - 1) / 2, (N - 1) / 2)``.

Truth of every mock (computed from the rendered pixels, never from catalogue magnitudes,
because truncated profiles do not hold their nominal flux):

* ``f_icl_true``: ICL flux / (ICL + BCG + member flux) inside the 300 kpc aperture, before noise.
* ``f_icl_sb_ideal``: the surface-brightness-threshold fraction of the noiseless, PSF-convolved,
  resized cluster (BCG, members, ICL; no field galaxies, stars or noise): the flux in aperture
  pixels fainter than ``mu = 26 + 10 log10(1 + z) + k(z)`` over the flux of all aperture pixels
  (Canepa et al. 2025, section 3; applied per pixel, with no masks): what the method gives when
  non-members are masked perfectly.
* ``f_icl_sb_ideal_scene``: the same on the noiseless image of the whole frame (field galaxies
  and stars included): what the automatic method, which cannot tell members from the field,
  can at best reproduce.
* ``z`` and ``params`` (the generation parameters).
"""

import dataclasses
import functools
import json
import logging
import math
import os

import numpy as np
import scipy.fft
import scipy.special

import common
import hsc

logger = logging.getLogger(__name__)

#: Rest-frame surface brightness (mag/arcsec^2) that separates galaxies from ICL (SPEC Part A).
SB_THRESHOLD_REST = 26.0
#: Coarsest fine-grid pixel (arcsec) the scene is rendered at before the resize.
MAX_FINE_PIXEL_SCALE = 0.3
#: Cutouts with more native pixels than this are rendered on a coarser (<= 0.3") grid.
MAX_FINE_SIZE = 1152
#: Border (fine pixels) rendered around the frame so that the PSF does not wrap light around.
CANVAS_MARGIN = 24
#: Supersampling factor per axis of the pixels around each profile centre.
CENTRE_SUPERSAMPLING = 9
#: Half-size (pixels) of the supersampled box around each profile centre.
CENTRE_BOX_HALF_SIZE = 3
#: Galaxy stamps end where the profile falls below this fraction of the per-pixel noise.
TRUNCATION_NOISE_FRACTION = 0.01
#: Galaxy stamps never extend beyond this many effective radii.
MAX_TRUNCATION_R_EFF = 15.0
#: Stars brighter than this r magnitude get a BRIGHT_OBJECT mask.
BRIGHT_STAR_MAG = 18.5
#: BRIGHT_OBJECT mask radius of a star at BRIGHT_STAR_MAG; it grows by 10^0.2 per magnitude brighter.
BRIGHT_STAR_MASK_RADIUS_ARCSEC = 5.0


# ----------------------------------------------------------------------------------------
# Sersic profiles


def sersic_b(n):
    """The Sersic constant b_n: half the light lies inside r_eff, gamma(2n, b_n) = Gamma(2n) / 2."""
    return scipy.special.gammaincinv(2.0 * np.asarray(n, dtype=float), 0.5)


def sersic_surface_brightness_at_r_eff(flux, r_eff, n, axis_ratio=1.0):
    """Surface brightness I_e at the effective radius of an elliptical Sersic profile.

    I(r) = I_e exp(-b_n ((r / r_eff)^(1/n) - 1)), total flux
    F = 2 pi q r_eff^2 n e^(b_n) b_n^(-2n) Gamma(2n) I_e (Graham & Driver 2005, eq. 4),
    with r the elliptical radius along the major axis and q the axis ratio.

    Parameters
    ----------
    flux : float
        Total flux (counts).
    r_eff : float
        Half-light radius along the major axis (pixels).
    n : float
        Sersic index.
    axis_ratio : float
        Minor over major axis, in (0, 1].

    Returns
    -------
    float
        I_e in counts per pixel area.
    """
    b = sersic_b(n)
    norm = 2.0 * np.pi * axis_ratio * r_eff**2 * n * np.exp(b) * b ** (-2.0 * n) * scipy.special.gamma(2.0 * n)
    return flux / norm


def sersic_enclosed_fraction(radius, r_eff, n):
    """Fraction of a Sersic profile's flux inside the elliptical radius ``radius`` (same units as r_eff).

    L(<r) / L = P(2n, b_n (r / r_eff)^(1/n)), the regularised lower incomplete gamma function.
    """
    return scipy.special.gammainc(2.0 * n, sersic_b(n) * (np.asarray(radius, dtype=float) / r_eff) ** (1.0 / n))


def sersic_truncation_radius(flux, r_eff, n, axis_ratio, level):
    """Elliptical radius (pixels) where the profile falls to ``level`` counts per pixel (0 if never above).

    Scalars give a float, arrays an array.
    """
    b = sersic_b(n)
    central = sersic_surface_brightness_at_r_eff(flux, r_eff, n, axis_ratio) * np.exp(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        radius = np.where(central > level, r_eff * (np.log(np.maximum(central, level) / level) / b) ** n, 0.0)
    return float(radius) if np.ndim(radius) == 0 else radius


def _elliptical_radius_squared(dx, dy, axis_ratio, position_angle):
    # Python floats for a scalar angle keep float32 arrays in float32 (NumPy 2 promotion rules).
    if np.ndim(position_angle) == 0:
        cos, sin = float(np.cos(position_angle)), float(np.sin(position_angle))
    else:
        cos, sin = np.cos(position_angle), np.sin(position_angle)
    major = dx * cos + dy * sin
    minor = (-dx * sin + dy * cos) / axis_ratio
    return major * major + minor * minor


def _sersic_values(r2, amplitude, r_eff, n, b):
    exponent = np.power(r2 * (1.0 / r_eff**2), 0.5 / n, dtype=np.float32) - 1.0
    return (amplitude * np.exp(-b * exponent)).astype(np.float32)


def add_sersic(canvas, x0, y0, flux, r_eff, n, axis_ratio=1.0, position_angle=0.0, truncation_radius=np.inf):
    """Add an elliptical Sersic profile to ``canvas`` in place, each pixel holding its flux.

    Pixels are sampled at their centres, except a box of ``2 * CENTRE_BOX_HALF_SIZE + 1`` pixels
    around the centre, which is supersampled ``CENTRE_SUPERSAMPLING`` times per axis; inside the
    largest ellipse that fits that box, the supersampled sum is corrected to the analytic
    enclosed flux (added to the central pixel), which catches the cusp of high-n profiles.

    Parameters
    ----------
    canvas : ndarray of float32, shape (H, W)
        Modified in place (this is the renderer's own work array, never a user input).
    x0, y0 : float
        Centre in pixel coordinates (column, row); pixel i spans [i - 0.5, i + 0.5].
    flux : float
        Total flux of the untruncated profile (counts).
    r_eff : float
        Half-light radius along the major axis (pixels).
    n : float
        Sersic index.
    axis_ratio : float
        Minor over major axis.
    position_angle : float
        Angle of the major axis from the +x axis towards +y (radians).
    truncation_radius : float
        Elliptical radius (pixels) beyond which the profile is zero.

    Returns
    -------
    float
        The flux actually added to the canvas (counts).
    """
    height, width = canvas.shape
    reach = min(truncation_radius, 2.0 * (height + width))
    col_lo, col_hi = max(0, int(np.floor(x0 - reach))), min(width - 1, int(np.ceil(x0 + reach)))
    row_lo, row_hi = max(0, int(np.floor(y0 - reach))), min(height - 1, int(np.ceil(y0 + reach)))
    if col_lo > col_hi or row_lo > row_hi:
        return 0.0
    b = float(sersic_b(n))
    amplitude = float(sersic_surface_brightness_at_r_eff(flux, r_eff, n, axis_ratio))
    dx = (np.arange(col_lo, col_hi + 1, dtype=np.float32) - np.float32(x0))[None, :]
    dy = (np.arange(row_lo, row_hi + 1, dtype=np.float32) - np.float32(y0))[:, None]
    centred = (x0 == (width - 1) / 2 and y0 == (height - 1) / 2 and not np.isfinite(truncation_radius)
               and (col_lo, row_lo, col_hi, row_hi) == (0, 0, width - 1, height - 1))
    if centred:
        # A profile at the canvas centre is point-symmetric: evaluate the top half, mirror the rest.
        top = (height + 1) // 2
        values = np.empty((height, width), np.float32)
        values[:top] = _sersic_values(_elliptical_radius_squared(dx, dy[:top], axis_ratio, position_angle), amplitude, r_eff, n, b)
        values[top:] = values[: height - top][::-1, ::-1]
    else:
        r2 = _elliptical_radius_squared(dx, dy, axis_ratio, position_angle)
        values = _sersic_values(r2, amplitude, r_eff, n, b)
        if np.isfinite(truncation_radius):
            values[r2 > truncation_radius**2] = 0.0

    centre_col, centre_row = int(np.floor(x0 + 0.5)), int(np.floor(y0 + 0.5))
    half = CENTRE_BOX_HALF_SIZE
    box_cols = np.arange(max(col_lo, centre_col - half), min(col_hi, centre_col + half) + 1)
    box_rows = np.arange(max(row_lo, centre_row - half), min(row_hi, centre_row + half) + 1)
    if box_cols.size and box_rows.size:
        steps = CENTRE_SUPERSAMPLING
        offsets = (np.arange(steps) + 0.5) / steps - 0.5
        sub_dx = ((box_cols[:, None] + offsets[None, :]).ravel() - x0)[None, :]
        sub_dy = ((box_rows[:, None] + offsets[None, :]).ravel() - y0)[:, None]
        sub_r2 = _elliptical_radius_squared(sub_dx, sub_dy, axis_ratio, position_angle)
        sub_values = _sersic_values(sub_r2.astype(np.float32), amplitude, r_eff, n, b).astype(np.float64)
        sub_values[sub_r2 > truncation_radius**2] = 0.0
        pixel_means = sub_values.reshape(box_rows.size, steps, box_cols.size, steps).mean(axis=(1, 3))
        rows = slice(box_rows[0] - row_lo, box_rows[-1] - row_lo + 1)
        cols = slice(box_cols[0] - col_lo, box_cols[-1] - col_lo + 1)
        values[rows, cols] = pixel_means
        # The largest ellipse about the centre that lies inside the box: its supersampled flux is
        # replaced by the analytic one, which the sampling misses at the cusp of a high-n profile.
        local_radius = min(half - 0.5, truncation_radius)
        complete = box_cols.size == box_rows.size == 2 * half + 1
        if complete and local_radius > 0:
            inside = sub_r2 <= local_radius**2
            sampled = sub_values[inside].sum() / steps**2
            analytic = flux * float(sersic_enclosed_fraction(local_radius, r_eff, n))
            values[centre_row - row_lo, centre_col - col_lo] += analytic - sampled
    canvas[row_lo : row_hi + 1, col_lo : col_hi + 1] += values
    return float(values.sum(dtype=np.float64))


#: Half-sizes (pixels) the batched stamps are rounded up to, so that similar galaxies share one array.
_BATCH_HALF_SIZES = (1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64)


def add_sersic_batch(canvas, x0, y0, flux, r_eff, n, axis_ratio, position_angle, truncation_radius):
    """Add many small Sersic profiles to ``canvas`` in place, vectorised by stamp size.

    Faster and coarser than :func:`add_sersic` (meant for field galaxies): pixels are sampled at
    their centres and the pixel holding each centre takes whatever flux the sampling missed, so
    every profile keeps its analytic flux inside its truncation ellipse. Profiles with a truncation
    radius under one pixel become points; those larger than the largest stamp use :func:`add_sersic`.
    Arguments are 1-D arrays of the quantities of :func:`add_sersic`.

    Returns
    -------
    ndarray of float
        Analytic flux of each profile inside its truncation ellipse (before clipping at the canvas edge).
    """
    x0, y0, flux, r_eff, n, axis_ratio, position_angle, truncation_radius = (
        np.atleast_1d(np.asarray(v, dtype=np.float64))
        for v in (x0, y0, flux, r_eff, n, axis_ratio, position_angle, truncation_radius)
    )
    single = np.float32
    height, width = canvas.shape
    enclosed = flux * sersic_enclosed_fraction(truncation_radius, r_eff, n)
    points = truncation_radius < 1.0
    add_points(canvas, x0[points], y0[points], flux[points])
    enclosed[points] = flux[points]
    # A stamp of half-size h about the nearest pixel holds an ellipse of radius up to h - 0.5.
    needed = np.ceil(truncation_radius + 0.5)
    group = np.searchsorted(_BATCH_HALF_SIZES, needed)
    for index in np.flatnonzero(~points & (group >= len(_BATCH_HALF_SIZES))):
        add_sersic(canvas, x0[index], y0[index], flux[index], r_eff[index], n[index], axis_ratio[index],
                   position_angle[index], truncation_radius[index])
    for g, half in enumerate(_BATCH_HALF_SIZES):
        members = np.flatnonzero(~points & (group == g))
        if members.size == 0:
            continue
        offsets = np.arange(-half, half + 1)
        centre_col = np.floor(x0[members] + 0.5).astype(np.int64)
        centre_row = np.floor(y0[members] + 0.5).astype(np.int64)
        dx = (centre_col - x0[members]).astype(single)[:, None, None] + offsets[None, None, :].astype(single)
        dy = (centre_row - y0[members]).astype(single)[:, None, None] + offsets[None, :, None].astype(single)
        q = axis_ratio[members].astype(single)[:, None, None]
        pa = position_angle[members].astype(single)[:, None, None]
        r2 = _elliptical_radius_squared(dx, dy, q, pa)
        b = sersic_b(n[members]).astype(single)
        amplitude = sersic_surface_brightness_at_r_eff(flux[members], r_eff[members], n[members], axis_ratio[members])
        scaled_r2 = r2 / (r_eff[members] ** 2).astype(single)[:, None, None]
        exponent = scaled_r2 ** (0.5 / n[members]).astype(single)[:, None, None] - single(1.0)
        values = amplitude.astype(single)[:, None, None] * np.exp(-b[:, None, None] * exponent)
        values[r2 > (truncation_radius[members] ** 2).astype(single)[:, None, None]] = 0.0
        missing = enclosed[members] - values.sum(axis=(1, 2), dtype=np.float64)
        values[:, half, half] = np.maximum(values[:, half, half] + missing, 0.0)
        rows = centre_row[:, None, None] + offsets[None, :, None]
        cols = centre_col[:, None, None] + offsets[None, None, :]
        rows, cols = np.broadcast_to(rows, values.shape), np.broadcast_to(cols, values.shape)
        keep = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width) & (values > 0)
        np.add.at(canvas, (rows[keep], cols[keep]), values[keep].astype(canvas.dtype))
    return enclosed


def render_sersic(shape, x0, y0, flux, r_eff, n, axis_ratio=1.0, position_angle=0.0, truncation_radius=np.inf):
    """A new float32 image of one Sersic profile (see :func:`add_sersic` for the arguments)."""
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be two positive integers, got {shape}")
    if r_eff <= 0:
        raise ValueError(f"r_eff must be positive, got {r_eff}")
    if not 0.2 <= n <= 10:
        raise ValueError(f"n must be in [0.2, 10], got {n}")
    if not 0 < axis_ratio <= 1:
        raise ValueError(f"axis_ratio must be in (0, 1], got {axis_ratio}")
    canvas = np.zeros(shape, dtype=np.float32)
    add_sersic(canvas, x0, y0, flux, r_eff, n, axis_ratio, position_angle, truncation_radius)
    return canvas


def add_points(canvas, x, y, flux):
    """Add point sources (shared bilinearly between the four nearest pixels) in place; off-canvas light is lost."""
    x, y, flux = (np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (x, y, flux))
    height, width = canvas.shape
    col, row = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = x - col, y - row
    for d_row, d_col, weight in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        r, c = row + d_row, col + d_col
        keep = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        np.add.at(canvas, (r[keep], c[keep]), (flux * weight)[keep].astype(canvas.dtype))


# ----------------------------------------------------------------------------------------
# PSF, convolution, noise and the resize


def moffat_psf(fwhm, beta, radius=None, supersampling=5):
    """Pixel-integrated circular Moffat PSF, normalised to unit sum.

    I(r) proportional to (1 + (r / alpha)^2)^(-beta), alpha = fwhm / (2 sqrt(2^(1/beta) - 1)).

    Parameters
    ----------
    fwhm : float
        Full width at half maximum (pixels).
    beta : float
        Moffat index (> 1).
    radius : int, optional
        Half-size of the kernel in pixels (default 6 FWHM, at least 4).
    supersampling : int
        Samples per pixel per axis.

    Returns
    -------
    ndarray of float32, shape (2 radius + 1, 2 radius + 1)
    """
    if fwhm <= 0:
        raise ValueError(f"fwhm must be positive, got {fwhm}")
    if beta <= 1:
        raise ValueError(f"beta must be > 1, got {beta}")
    radius = int(max(4, np.ceil(6 * fwhm))) if radius is None else int(radius)
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    side = 2 * radius + 1
    coords = (np.arange(side * supersampling) + 0.5) / supersampling - radius - 0.5
    r2 = coords[None, :] ** 2 + coords[:, None] ** 2
    fine = (1.0 + r2 / alpha**2) ** (-beta)
    kernel = fine.reshape(side, supersampling, side, supersampling).sum(axis=(1, 3))
    return (kernel / kernel.sum()).astype(np.float32)


def convolve_fft(images, psf):
    """Convolve one or more same-shape images with ``psf`` by FFT (zero padded, same size out).

    Parameters
    ----------
    images : sequence of ndarray, shape (H, W)
    psf : ndarray, shape (k, k), k odd

    Returns
    -------
    list of ndarray of float32
    """
    height, width = images[0].shape
    half = psf.shape[0] // 2
    shape = (scipy.fft.next_fast_len(height + half, real=True), scipy.fft.next_fast_len(width + half, real=True))
    kernel = np.zeros(shape, dtype=np.float32)
    kernel[: psf.shape[0], : psf.shape[1]] = psf
    kernel = np.roll(kernel, (-half, -half), axis=(0, 1))
    kernel_ft = scipy.fft.rfft2(kernel, workers=1)
    out = []
    for image in images:
        product = scipy.fft.rfft2(image, s=shape, workers=1) * kernel_ft
        out.append(scipy.fft.irfft2(product, s=shape, workers=1)[:height, :width].astype(np.float32))
    return out


@functools.lru_cache(maxsize=256)
def resize_matrix(size_in, size_out=hsc.ICL_IMAGE_SIZE):
    """The 1-D linear map of :func:`prep_data.resize_image` as a sparse (size_out, size_in) matrix.

    ``skimage.transform.resize`` (bilinear, anti-aliased) is separable: a Gaussian filter of
    sigma = (k - 1) / 2, k = size_in / size_out (truncated at 4 sigma, mirrored at the edges),
    then linear interpolation at x_i = (i + 0.5) k - 0.5. So ``resize_image(X) == A X A^T``,
    which :func:`resize_fast` evaluates 5-30 times faster (tests hold the two to 1e-6).
    """
    import scipy.sparse

    if size_in < size_out:
        raise ValueError(f"size_in must be at least size_out ({size_out}), got {size_in}")
    scale = size_in / size_out
    sigma = (scale - 1.0) / 2.0
    if sigma > 0:
        radius = int(4.0 * sigma + 0.5)
        offsets = np.arange(-radius, radius + 1)
        taps = np.exp(-0.5 * (offsets / sigma) ** 2)
        taps /= taps.sum()
    else:
        offsets, taps = np.zeros(1, dtype=int), np.ones(1)
    position = (np.arange(size_out) + 0.5) * scale - 0.5
    left = np.floor(position).astype(np.int64)
    right_weight = position - left
    period = max(2 * (size_in - 1), 1)
    rows, cols, values = [], [], []
    for shift, weight in ((0, 1.0 - right_weight), (1, right_weight)):
        centre = np.clip(left + shift, 0, size_in - 1)
        source = np.abs(centre[:, None] + offsets[None, :]) % period
        source = np.where(source > size_in - 1, period - source, source)
        rows.append(np.repeat(np.arange(size_out), offsets.size))
        cols.append(source.ravel())
        values.append((weight[:, None] * taps[None, :]).ravel())
    return scipy.sparse.csr_matrix(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=(size_out, size_in)
    )


def resize_fast(image, size_out=hsc.ICL_IMAGE_SIZE):
    """:func:`prep_data.resize_image` of a square image, by the sparse matrices of :func:`resize_matrix`."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2 or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be square and 2-D, got shape {image.shape}")
    if image.shape[0] == size_out:
        return image.copy()
    matrix = resize_matrix(image.shape[0], size_out)
    return np.asarray((matrix @ (matrix @ image).T).T, dtype=np.float32)


@functools.lru_cache(maxsize=4096)
def resize_noise_factor(size_in, size_out=hsc.ICL_IMAGE_SIZE):
    """Ratio of output to input noise of :func:`prep_data.resize_image` for white noise.

    With the separable map ``A`` of :func:`resize_matrix`, the output variance of unit white
    noise, averaged over output pixels, is (mean_i sum_j A_ij^2)^2, so the standard-deviation
    ratio is mean_i sum_j A_ij^2. MOCKS.md measured 0.63-0.85 of 1/k for these resizes.
    """
    if size_in <= size_out:
        return 1.0
    matrix = resize_matrix(size_in, size_out)
    return float(matrix.multiply(matrix).sum() / size_out)


def fine_noise_sigma(noise_native, native_size, fine_size, size_out=hsc.ICL_IMAGE_SIZE):
    """Per-pixel noise (counts per fine pixel) to draw on the fine grid.

    Chosen so that, after the resize to ``size_out`` and the conversion to counts per native
    pixel, the noise equals that of a real cutout of ``native_size`` native pixels with
    ``noise_native`` counts per native pixel, resized the same way:
    sigma_fine = sigma_native * A * rho(native) / rho(fine), with A the fine-to-native pixel
    area ratio and rho :func:`resize_noise_factor`. On the native grid it is ``noise_native``.
    """
    if noise_native < 0:
        raise ValueError(f"noise_native must be >= 0, got {noise_native}")
    if fine_size > native_size:
        raise ValueError(f"fine_size must not exceed native_size ({native_size}), got {fine_size}")
    area_ratio = (native_size / fine_size) ** 2
    return noise_native * area_ratio * resize_noise_factor(native_size, size_out) / resize_noise_factor(fine_size, size_out)


# ----------------------------------------------------------------------------------------
# Parameter distributions


@dataclasses.dataclass(frozen=True)
class ClusterDistribution:
    """Ranges the generation parameters are drawn from (MOCKS.md, "Plausible parameter distributions").

    Ranges are uniform ``(low, high)`` unless the field says otherwise; lengths in kpc are proper.
    """

    z_range: tuple = (hsc.Z_MIN, hsc.Z_MAX)  # cluster redshift
    icl_fraction_range: tuple = (0.02, 0.45)  # physical ICL fraction inside 300 kpc
    icl_fraction_mode: float = None  # None: uniform; else the mode of a triangular draw in the range
    icl_sersic_n_range: tuple = (1.0, 1.0)  # ICL Sersic index (1: exponential, as the injection)
    icl_r_eff_kpc_range: tuple = (40.0, 150.0)  # ICL half-light radius along the major axis
    icl_axis_ratio_range: tuple = (0.4, 0.9)  # ICL minor / major axis
    icl_alignment_deg: float = 15.0  # ICL position angle within +- this of the BCG's
    bcg_abs_mag: tuple = (-23.4, 0.35)  # BCG rest-frame M_r, (mean, standard deviation)
    bcg_r_eff_kpc: tuple = (15.0, 0.15)  # BCG half-light radius, (median, log10 scatter)
    bcg_sersic_n_range: tuple = (3.5, 6.0)  # BCG Sersic index
    bcg_axis_ratio_range: tuple = (0.6, 0.95)  # BCG minor / major axis
    member_count_range: tuple = (20, 80)  # members within 420 kpc of the centre (inclusive)
    member_abs_mag_range: tuple = (-23.0, -17.5)  # Schechter function limits
    schechter: tuple = (-22.2, -1.05)  # (M*, alpha) of the member luminosity function
    member_core_radius_kpc: float = 100.0  # members follow Sigma(r) ~ 1 / (1 + (r / r_c)^2)
    field_density_per_arcmin2: float = 40.0  # field galaxies brighter than r = 25
    field_mag_range: tuple = (18.0, 25.5)  # field galaxy magnitudes, N(<m) ~ 10^(0.3 m)
    star_density_per_arcmin2: float = 3.0  # stars in the magnitude range below
    star_mag_range: tuple = (15.0, 24.0)  # star magnitudes, N(<m) ~ 10^(0.25 m)
    psf_fwhm_arcsec: tuple = (0.72, 0.08)  # Moffat FWHM (mean, standard deviation), clipped to 0.5-1.1"
    psf_beta_range: tuple = (2.5, 4.5)  # Moffat beta
    noise_sigma_range: tuple = (0.022, 0.04)  # native sky noise, counts per 0.168" pixel
    no_data_probability: float = 0.1  # chance of a NO_DATA strip along one edge
    cosmology: tuple = (70.0, 0.3)  # FlatLambdaCDM (H0, Om0) used to cut the cutout


#: The training set (MOCKS.md ranges; the cosmology used to cut the original backgrounds).
TRAINING_DISTRIBUTION = ClusterDistribution()
#: A deliberately different population standing in for real clusters: other cosmology, worse
#: seeing, deeper noise, richer clusters, ICL fractions peaked near the typical 8-30%, and ICL
#: profiles that are not all exponential.
REAL_LIKE_DISTRIBUTION = ClusterDistribution(
    z_range=(0.12, 0.45),
    icl_fraction_range=(0.03, 0.4),
    icl_fraction_mode=0.15,
    icl_sersic_n_range=(0.7, 2.5),
    icl_r_eff_kpc_range=(60.0, 220.0),
    icl_axis_ratio_range=(0.5, 0.95),
    icl_alignment_deg=25.0,
    bcg_abs_mag=(-23.6, 0.3),
    bcg_sersic_n_range=(4.0, 7.0),
    member_count_range=(40, 120),
    psf_fwhm_arcsec=(0.8, 0.1),
    noise_sigma_range=(0.028, 0.045),
    no_data_probability=0.05,
    cosmology=(68.4, 0.301),
)
#: ICL-free fields around luminous red galaxies, the backgrounds the injection works on.
BACKGROUND_DISTRIBUTION = dataclasses.replace(TRAINING_DISTRIBUTION, icl_fraction_range=(0.0, 0.0), member_count_range=(5, 40))


@functools.lru_cache(maxsize=8)
def _cosmology(h0, omega_m):
    from astropy.cosmology import FlatLambdaCDM

    return FlatLambdaCDM(H0=h0, Om0=omega_m)


def cutout_geometry(z, cosmology=TRAINING_DISTRIBUTION.cosmology):
    """Size of the +-300 kpc cutout at redshift ``z``.

    Returns
    -------
    kpc_per_arcsec : float
    native_size : int
        Side in native 0.168" pixels.
    fine_size : int
        Side of the grid the scene is rendered on.
    """
    cosmo = _cosmology(*cosmology)
    kpc_per_arcsec = float(cosmo.kpc_proper_per_arcmin(z).value) / 60.0
    width_arcsec = 2.0 * hsc.CUTOUT_HALF_WIDTH_KPC / kpc_per_arcsec
    native_size = int(round(width_arcsec / hsc.PIXEL_SCALE))
    coarse_size = int(np.ceil(width_arcsec / MAX_FINE_PIXEL_SCALE))
    fine_size = min(native_size, max(MAX_FINE_SIZE, coarse_size))
    return kpc_per_arcsec, native_size, fine_size


def _schechter_magnitudes(rng, count, m_star, alpha, bright, faint):
    grid = np.linspace(bright, faint, 512)
    luminosity = 10.0 ** (-0.4 * (grid - m_star))
    density = luminosity ** (alpha + 1.0) * np.exp(-luminosity)
    cdf = np.cumsum(density)
    cdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
    return np.interp(rng.uniform(size=count), cdf, grid)


def _power_law_magnitudes(rng, count, slope, bright, faint):
    low, high = 10.0 ** (slope * bright), 10.0 ** (slope * faint)
    return np.log10(low + rng.uniform(size=count) * (high - low)) / slope


def _apparent_magnitude(absolute, z, cosmology):
    return absolute + float(_cosmology(*cosmology).distmod(z).value) + float(hsc.k_correction(z))


# ----------------------------------------------------------------------------------------
# The cluster renderer


def render_cluster(rng, distribution=TRAINING_DISTRIBUTION, include_icl=True, z=None, return_components=False):
    """Render one mock cluster cutout with its truth.

    Parameters
    ----------
    rng : numpy.random.Generator
    distribution : ClusterDistribution
        Parameter ranges.
    include_icl : bool
        False renders a background (no ICL; ``f_icl_true`` = 0).
    z : float, optional
        Redshift; drawn from ``distribution.z_range`` when None.
    return_components : bool
        Also return the noiseless, PSF-convolved, resized components (for checks and plots).

    Returns
    -------
    image : ndarray of float32, shape (224, 224)
        Counts per native 0.168" pixel (zero point 27), NO_DATA pixels set to 0.
    mask : ndarray of int32, shape (224, 224)
        HSC mask plane with bits ``hsc.DEFAULT_MASK_BITS`` (BRIGHT_OBJECT, NO_DATA).
    truth : dict
        ``z``, ``f_icl_true``, ``f_icl_sb_ideal``, ``f_icl_sb_ideal_scene`` (floats) and ``params``
        (a JSON-able dict).
    components : dict, only with ``return_components``
        ``icl``, ``galaxies`` (BCG and members) and ``others`` (field galaxies and stars), each
        (224, 224) float32 counts per native pixel, without noise or masks.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    d = distribution
    if z is None:
        z = float(rng.uniform(*d.z_range))
    if not hsc.Z_MIN <= z <= hsc.Z_MAX:
        raise ValueError(f"z must be in [{hsc.Z_MIN}, {hsc.Z_MAX}], got {z}")
    kpc_per_arcsec, native_size, fine_size = cutout_geometry(z, d.cosmology)
    fine_scale = 2.0 * hsc.CUTOUT_HALF_WIDTH_KPC / kpc_per_arcsec / fine_size  # arcsec per fine pixel
    kpc_per_pixel = kpc_per_arcsec * fine_scale
    # Counts per native pixel -> counts per fine pixel.
    area_ratio = (fine_scale / hsc.PIXEL_SCALE) ** 2
    margin = CANVAS_MARGIN
    canvas_size = fine_size + 2 * margin
    centre = margin + (fine_size - 1) / 2.0

    noise_native = float(rng.uniform(*d.noise_sigma_range))
    noise_fine = fine_noise_sigma(noise_native, native_size, fine_size)
    truncation_level = TRUNCATION_NOISE_FRACTION * noise_fine
    psf_fwhm = float(np.clip(rng.normal(*d.psf_fwhm_arcsec), 0.5, 1.1))
    psf_beta = float(rng.uniform(*d.psf_beta_range))

    galaxies = np.zeros((canvas_size, canvas_size), np.float32)
    others = np.zeros((canvas_size, canvas_size), np.float32)

    # BCG, at the centre.
    bcg_mag = _apparent_magnitude(rng.normal(*d.bcg_abs_mag), z, d.cosmology)
    bcg_r_eff_kpc = d.bcg_r_eff_kpc[0] * 10.0 ** rng.normal(0.0, d.bcg_r_eff_kpc[1])
    bcg = dict(
        mag=bcg_mag,
        r_eff_kpc=bcg_r_eff_kpc,
        n=float(rng.uniform(*d.bcg_sersic_n_range)),
        axis_ratio=float(rng.uniform(*d.bcg_axis_ratio_range)),
        position_angle=float(rng.uniform(0.0, np.pi)),
    )
    add_sersic(
        galaxies, centre, centre, float(hsc.mag_to_counts(bcg_mag)), bcg_r_eff_kpc / kpc_per_pixel,
        bcg["n"], bcg["axis_ratio"], bcg["position_angle"],
    )

    # Members: a cored projected distribution, early types towards the centre.
    member_count = int(rng.integers(d.member_count_range[0], d.member_count_range[1] + 1))
    r_max = np.sqrt(2.0) * hsc.CUTOUT_HALF_WIDTH_KPC
    core = d.member_core_radius_kpc
    radius_kpc = core * np.sqrt(np.expm1(rng.uniform(size=member_count) * np.log1p((r_max / core) ** 2)))
    angle = rng.uniform(0.0, 2.0 * np.pi, member_count)
    member_abs = _schechter_magnitudes(rng, member_count, d.schechter[0], d.schechter[1], *d.member_abs_mag_range)
    early = rng.uniform(size=member_count) < np.clip(0.85 - 0.5 * radius_kpc / r_max, 0.3, 0.85)
    member_r_eff_kpc = 3.5 * 10.0 ** (-0.2 * (member_abs + 21.0) + rng.normal(0.0, 0.15, member_count))
    member_n = np.where(early, rng.uniform(2.5, 5.0, member_count), rng.uniform(0.7, 1.5, member_count))
    member_q = np.where(early, rng.uniform(0.5, 1.0, member_count), rng.uniform(0.25, 1.0, member_count))
    member_pa = rng.uniform(0.0, np.pi, member_count)
    member_x = centre + radius_kpc * np.cos(angle) / kpc_per_pixel
    member_y = centre + radius_kpc * np.sin(angle) / kpc_per_pixel
    member_flux = hsc.mag_to_counts(member_abs + _apparent_magnitude(0.0, z, d.cosmology))
    for i in range(member_count):
        _add_galaxy(galaxies, member_x[i], member_y[i], member_flux[i], member_r_eff_kpc[i] / kpc_per_pixel,
                    member_n[i], member_q[i], member_pa[i], truncation_level)

    # ICL: flux set so that the rendered ICL makes the drawn fraction of the aperture light.
    yy, xx = np.ogrid[:canvas_size, :canvas_size]
    aperture = (xx - centre) ** 2 + (yy - centre) ** 2 <= (fine_size / 2.0) ** 2
    galaxy_light = float(galaxies[aperture].sum(dtype=np.float64))
    icl = None
    if include_icl and d.icl_fraction_range[1] > 0:
        low, high = d.icl_fraction_range
        target = rng.triangular(low, d.icl_fraction_mode, high) if d.icl_fraction_mode else rng.uniform(low, high)
        icl = dict(
            target_fraction=float(target),
            r_eff_kpc=float(rng.uniform(*d.icl_r_eff_kpc_range)),
            n=float(rng.uniform(*d.icl_sersic_n_range)),
            axis_ratio=float(rng.uniform(*d.icl_axis_ratio_range)),
            position_angle=float(bcg["position_angle"] + np.radians(rng.uniform(-1, 1) * d.icl_alignment_deg)),
        )
        icl_image = np.zeros_like(galaxies)
        add_sersic(icl_image, centre, centre, 1.0, icl["r_eff_kpc"] / kpc_per_pixel, icl["n"], icl["axis_ratio"], icl["position_angle"])
        unit_light = float(icl_image[aperture].sum(dtype=np.float64))
        icl_image *= np.float32(target * galaxy_light / ((1.0 - target) * unit_light))
        icl_light = float(icl_image[aperture].sum(dtype=np.float64))
        icl["mag"] = float(hsc.counts_to_mag(icl_image.sum(dtype=np.float64)))
        cluster = galaxies + icl_image
    else:
        icl_light = 0.0
        icl_image = np.zeros_like(galaxies)
        cluster = galaxies
    f_icl_true = icl_light / (icl_light + galaxy_light)

    # Field galaxies over the canvas.
    canvas_arcmin2 = (canvas_size * fine_scale / 60.0) ** 2
    field_density = d.field_density_per_arcmin2 * 10.0 ** (0.3 * (d.field_mag_range[1] - 25.0))
    field_count = int(rng.poisson(field_density * canvas_arcmin2))
    field_mag = _power_law_magnitudes(rng, field_count, 0.3, *d.field_mag_range)
    field_r_eff = 0.6 * 10.0 ** (-0.1 * (field_mag - 22.0) + rng.normal(0.0, 0.2, field_count)) / fine_scale
    field_disk = rng.uniform(size=field_count) < 0.7
    field_n = np.where(field_disk, rng.uniform(0.7, 1.5, field_count), rng.uniform(2.0, 4.0, field_count))
    field_q = rng.uniform(0.25, 1.0, field_count)
    field_pa = rng.uniform(0.0, np.pi, field_count)
    field_x, field_y = rng.uniform(-0.5, canvas_size - 0.5, (2, field_count))
    field_flux = hsc.mag_to_counts(field_mag)
    field_truncation = np.minimum(
        sersic_truncation_radius(field_flux, field_r_eff, field_n, field_q, truncation_level), MAX_TRUNCATION_R_EFF * field_r_eff
    )
    add_sersic_batch(others, field_x, field_y, field_flux, field_r_eff, field_n, field_q, field_pa, field_truncation)

    # Stars: point sources; the bright ones are masked.
    star_count = int(rng.poisson(d.star_density_per_arcmin2 * canvas_arcmin2))
    star_mag = _power_law_magnitudes(rng, star_count, 0.25, *d.star_mag_range)
    star_x, star_y = rng.uniform(-0.5, canvas_size - 0.5, (2, star_count))
    add_points(others, star_x, star_y, hsc.mag_to_counts(star_mag))

    # PSF, noise, resize.
    psf = moffat_psf(psf_fwhm / fine_scale, psf_beta)
    cluster_convolved, others_convolved = convolve_fft([cluster, others], psf)
    frame = slice(margin, margin + fine_size)
    scene = cluster_convolved[frame, frame] + others_convolved[frame, frame]
    scene += rng.standard_normal(scene.shape, dtype=np.float32) * np.float32(noise_fine)
    image = resize_fast(scene) / np.float32(area_ratio)
    ideal = resize_fast(cluster_convolved[frame, frame]) / np.float32(area_ratio)
    f_icl_sb_ideal = sb_threshold_fraction(ideal, z)
    # The automatic SB method cannot tell field galaxies and stars from members; this is the
    # answer it would give on the noiseless image of everything in the frame.
    ideal_scene = resize_fast(cluster_convolved[frame, frame] + others_convolved[frame, frame]) / np.float32(area_ratio)
    f_icl_sb_ideal_scene = sb_threshold_fraction(ideal_scene, z)

    mask = np.zeros(image.shape, np.int32)
    size = image.shape[0]
    output_scale = fine_size / size  # fine pixels per output pixel
    bright = star_mag < BRIGHT_STAR_MAG
    out_yy, out_xx = np.ogrid[:size, :size]
    bright_bit = 1 << hsc.DEFAULT_MASK_BITS["BRIGHT_OBJECT"]
    for x, y, mag in zip(star_x[bright], star_y[bright], star_mag[bright]):
        radius_arcsec = BRIGHT_STAR_MASK_RADIUS_ARCSEC * 10.0 ** (0.2 * (BRIGHT_STAR_MAG - mag))
        cx, cy = (x - margin + 0.5) / output_scale - 0.5, (y - margin + 0.5) / output_scale - 0.5
        radius = radius_arcsec / fine_scale / output_scale
        mask[(out_xx - cx) ** 2 + (out_yy - cy) ** 2 <= radius**2] |= bright_bit
    no_data = None
    if rng.uniform() < d.no_data_probability:
        edge = int(rng.integers(4))
        width = int(rng.uniform(0.05, 0.3) * size)
        strip = [slice(None), slice(None)]
        strip[edge % 2] = slice(0, width) if edge < 2 else slice(size - width, size)
        image[tuple(strip)] = 0.0
        mask[tuple(strip)] |= 1 << hsc.DEFAULT_MASK_BITS["NO_DATA"]
        no_data = dict(edge=("top", "left", "bottom", "right")[edge], width_px=width)

    params = dict(
        z=z,
        cosmology=list(d.cosmology),
        kpc_per_arcsec=kpc_per_arcsec,
        native_size=native_size,
        fine_size=fine_size,
        fine_pixel_scale=fine_scale,
        noise_sigma_native=noise_native,
        psf_fwhm_arcsec=psf_fwhm,
        psf_beta=psf_beta,
        bcg=bcg,
        icl=icl,
        member_count=member_count,
        field_count=field_count,
        star_count=star_count,
        bright_star_count=int(bright.sum()),
        no_data=no_data,
        sb_threshold_counts=float(sb_threshold_counts(z)),
    )
    truth = dict(
        z=z,
        f_icl_true=float(f_icl_true),
        f_icl_sb_ideal=float(f_icl_sb_ideal),
        f_icl_sb_ideal_scene=float(f_icl_sb_ideal_scene),
        params=_json_safe(params),
    )
    if not return_components:
        return image.astype(np.float32), mask, truth
    icl_convolved, galaxies_convolved = convolve_fft([icl_image, galaxies], psf)
    components = {
        name: resize_fast(array[frame, frame]) / np.float32(area_ratio)
        for name, array in (("icl", icl_convolved), ("galaxies", galaxies_convolved), ("others", others_convolved))
    }
    return image.astype(np.float32), mask, truth, components


def _add_galaxy(canvas, x, y, flux, r_eff, n, axis_ratio, position_angle, truncation_level):
    radius = min(sersic_truncation_radius(flux, r_eff, n, axis_ratio, truncation_level), MAX_TRUNCATION_R_EFF * r_eff)
    if radius < 1.0:
        # Fainter than the noise floor everywhere beyond a pixel: a point carries it well enough.
        add_points(canvas, x, y, flux)
    else:
        add_sersic(canvas, x, y, flux, r_eff, n, axis_ratio, position_angle, radius)


def sb_threshold_counts(z, mu_rest=SB_THRESHOLD_REST):
    """Counts per native pixel of the observed ICL threshold at redshift ``z`` (dimming and k-correction)."""
    return hsc.sb_to_counts(hsc.observed_surface_brightness(mu_rest, z))


def aperture_mask(size=hsc.ICL_IMAGE_SIZE):
    """Boolean (size, size) map of the 300 kpc aperture: the circle of radius size/2 about the centre."""
    yy, xx = np.ogrid[:size, :size]
    centre = (size - 1) / 2.0
    return (xx - centre) ** 2 + (yy - centre) ** 2 <= (size / 2.0) ** 2


def sb_threshold_fraction(image, z, mu_rest=SB_THRESHOLD_REST):
    """Surface-brightness-threshold ICL fraction of a noiseless image.

    Flux in aperture pixels fainter than ``mu_rest + 10 log10(1 + z) + k(z)`` over the flux of
    all aperture pixels (Canepa et al. 2025, applied per pixel).

    Parameters
    ----------
    image : ndarray, shape (S, S)
        Counts per native pixel.
    z : float
        Redshift.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2 or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be square and 2-D, got shape {image.shape}")
    inside = aperture_mask(image.shape[0])
    values = image[inside]
    total = values.sum()
    if total <= 0:
        raise ValueError("image holds no positive flux inside the aperture")
    return float(values[values < sb_threshold_counts(z)].sum() / total)


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    return value


def params_json(params):
    """The generation parameters as JSON text (the ``params`` column)."""
    return json.dumps(_json_safe(params), sort_keys=True)


# ----------------------------------------------------------------------------------------
# Preview


def draw_preview(images, truths, path, masks=None, columns=8):
    """PNG grid of mock cutouts with their truth, in the model's arcsinh stretch.

    Parameters
    ----------
    images : sequence of ndarray, shape (224, 224)
        Counts per native pixel.
    truths : sequence of dict
        With ``z``, ``f_icl_true`` and ``f_icl_sb_ideal``.
    path : str
        Output PNG path (written atomically).
    masks : sequence of ndarray, optional
        Mask planes; masked pixels are shown in red.
    columns : int
        Panels per row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(images)
    if count == 0:
        raise ValueError("images must hold at least one cutout")
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    flagged = hsc.mask_value(hsc.DEFAULT_MASK_BITS)
    for i, (image, truth) in enumerate(zip(images, truths)):
        stretched = np.arcsinh(np.clip(np.asarray(image, np.float32), -0.1, 10.0) / hsc.ARCSINH_SCALE)
        scaled = np.clip(stretched / np.arcsinh(10.0 / hsc.ARCSINH_SCALE / 4.0), 0.0, 1.0)
        rgb = np.repeat(scaled[..., None], 3, axis=-1)
        if masks is not None:
            bad = (np.asarray(masks[i]) & flagged) != 0
            rgb[bad] = 0.6 * rgb[bad] + 0.4 * np.array([1.0, 0.0, 0.0])
        ax = axes.ravel()[i]
        ax.imshow(rgb, origin="lower", interpolation="nearest")
        ax.set_title(
            f"z={truth['z']:.2f} true={truth['f_icl_true']:.3f}\nSB ideal={truth['f_icl_sb_ideal']:.3f}", fontsize=7
        )
    figure.tight_layout()
    temporary = common.atomic_path(path)
    figure.savefig(temporary, dpi=80, format="png")
    plt.close(figure)
    os.replace(temporary, path)
