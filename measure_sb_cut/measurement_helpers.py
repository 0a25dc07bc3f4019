"""Pieces shared by the automatic and the manual surface-brightness threshold measurement.

Every function works on one square cutout of ``hsc.ICL_IMAGE_SIZE`` pixels on a side in
*counts per native HSC pixel* (``prep_data.resize_image`` averages, so a resized pixel keeps
the surface brightness of the native pixels). Surface-brightness thresholds in counts
therefore use the native ``hsc.PIXEL_SCALE`` whatever the resize; only angular sizes (the
10 x 10 arcsec boxes of the surface-brightness limit) and flux *sums* use the cutout's own
scale, ``2 * 300 kpc / 224 px`` at the cluster's redshift.

The steps follow Canepa et al. 2025 (ApJ, arXiv:2501.08378) as summarised in SPEC Part A.
"""

import dataclasses
import functools
import logging
import warnings

import numpy as np
from astropy.cosmology import FlatLambdaCDM
from astropy.stats import SigmaClip, sigma_clipped_stats
from photutils.background import Background2D, MedianBackground
from scipy import ndimage
from scipy.interpolate import SmoothBivariateSpline

import hsc

logger = logging.getLogger(__name__)

#: Cosmology of the measurement (Canepa et al. 2025; SPEC Part A).
MEASUREMENT_COSMOLOGY = FlatLambdaCDM(H0=68.4, Om0=0.301)
#: Rest-frame threshold (mag/arcsec^2) between galaxies and ICL in the measurement.
MEASUREMENT_SB = 26.0
#: Rest-frame threshold (mag/arcsec^2) used to segment galaxies when injecting artificial ICL.
INJECTION_SB = 25.0
#: Radius of the measurement aperture in kpc.
APERTURE_KPC = 300.0

#: Side of the Background2D boxes in (224-px) cutout pixels.
BACKGROUND_BOX_PX = 16
#: Pixels by which sources are grown when masked out of the sky boxes.
SOURCE_MASK_GROWTH_PX = 3
#: Width of the concentric annuli of the constant background term, cutout pixels.
ANNULUS_STEP_PX = 10
#: Fraction of the faintest annulus mean that is subtracted as a constant.
ANNULUS_CONSTANT_FRACTION = 2.0 / 3.0
#: Minimum connected pixels of a galaxy segment.
SEGMENT_MIN_PIXELS = 10
#: Gaussian sigma (pixels) of the smoothing applied before the galaxies are segmented.
SEGMENT_SMOOTHING_PX = 0.5
#: Minimum signal-to-noise ratio of a hot source (sum over its pixels / (rms sqrt(N))).
HOT_MIN_SNR = 5.0
#: Gaussian sigma (pixels) of the smoothed copy subtracted for the unsharp mask.
HOT_SMOOTH_SIGMA_PX = 2.0
#: Detection threshold of the hot mask, in units of the unsharp image's background rms.
HOT_N_SIGMA = 1.2
#: Minimum connected pixels of a hot (compact) source.
HOT_MIN_PIXELS = 3
#: Significance and box side (arcsec) of the surface-brightness limit.
SB_LIMIT_N_SIGMA = 3.0
SB_LIMIT_BOX_ARCSEC = 10.0
#: Width in cutout pixels of the band along the image edges where the noise is measured.
EDGE_WIDTH_PX = 16
#: Half-side in pixels of the square that closes the set of pixels below the surface-brightness limit.
CLOSING_RADIUS_PX = 2


def check_redshift(z):
    """Return ``z`` as a float, or raise ValueError naming the supported range.

    Parameters
    ----------
    z : float
        Cluster redshift; must be finite and in [hsc.Z_MIN, hsc.Z_MAX].
    """
    if z is None:
        raise ValueError("z is required: give the cluster redshift")
    try:
        z = float(z)
    except (TypeError, ValueError):
        raise ValueError(f"z must be a number, got {z!r}") from None
    if not np.isfinite(z):
        raise ValueError(f"z is required: got {z}")
    if not hsc.Z_MIN <= z <= hsc.Z_MAX:
        raise ValueError(f"z must be in [{hsc.Z_MIN}, {hsc.Z_MAX}], got {z:g}")
    return z


@functools.lru_cache(maxsize=4096)
def _kpc_per_arcsec(z, h0, om0):
    return float(FlatLambdaCDM(H0=h0, Om0=om0).kpc_proper_per_arcmin(z).value) / 60.0


def kpc_per_arcsec(z, cosmology=MEASUREMENT_COSMOLOGY):
    """Proper kpc per arcsec at redshift ``z`` (cached for flat Lambda-CDM cosmologies)."""
    if isinstance(cosmology, FlatLambdaCDM) and cosmology.Ode0 + cosmology.Om0 == 1.0:
        return _kpc_per_arcsec(float(z), float(cosmology.H0.value), float(cosmology.Om0))
    return float(cosmology.kpc_proper_per_arcmin(z).value) / 60.0


def cutout_pixel_scale(z, size, half_width_kpc=hsc.CUTOUT_HALF_WIDTH_KPC, cosmology=MEASUREMENT_COSMOLOGY):
    """Arcsec per pixel of a cutout spanning +-``half_width_kpc`` in ``size`` pixels at ``z``.

    Returns
    -------
    float
        ``2 * half_width_kpc / size / kpc_per_arcsec(z)``; about 1.4"/px at z = 0.1 and
        0.44"/px at z = 0.5 for the 224-px, +-300 kpc cutouts.
    """
    return 2.0 * half_width_kpc / size / kpc_per_arcsec(z, cosmology)


def threshold_counts(mu_rest, z, pixel_scale=hsc.PIXEL_SCALE):
    """Counts per native pixel of the rest-frame surface brightness ``mu_rest`` seen at ``z``.

    mu_obs = mu_rest + 10 log10(1 + z) + k(z) (Tolman dimming and the k-correction of
    Chilingarian et al. 2010, as in Canepa et al. 2025), then ``hsc.sb_to_counts``.
    """
    return float(hsc.sb_to_counts(hsc.observed_surface_brightness(mu_rest, z), pixel_scale))


def bad_pixel_map(image, mask=None, mask_bits=None, planes=hsc.ICL_MASK_PLANES):
    """Boolean map of pixels to leave out: flagged mask planes and non-finite pixels.

    Parameters
    ----------
    image : ndarray, shape (H, W)
    mask : ndarray of int or bool, shape (H, W), optional
        HSC mask plane (integer bits) or a ready boolean map (True = bad).
    mask_bits : dict of str -> int, optional
        Bit numbers of the planes; ``hsc.DEFAULT_MASK_BITS`` by default.
    planes : sequence of str
        Planes that make a pixel bad.
    """
    bad = ~np.isfinite(image)
    if mask is None:
        return bad
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return bad | mask
    bits = dict(hsc.DEFAULT_MASK_BITS) if mask_bits is None else dict(mask_bits)
    return bad | ((mask.astype(np.int64) & hsc.mask_value(bits, planes)) != 0)


def _mesh_centres(n_boxes, box_size):
    return np.arange(n_boxes) * box_size + (box_size - 1) / 2.0


def fit_edge_surface(background_mesh, box_size, shape, degree=1, usable=None):
    """Smooth surface through the outer ring of a background mesh, evaluated on the image grid.

    The inner boxes of a cluster cutout hold ICL, so only the outermost ring of the
    Background2D mesh (the sky at +-300 kpc) constrains the surface (SPEC Part A, step 1).

    Parameters
    ----------
    background_mesh : ndarray, shape (NY, NX)
        ``Background2D.background_mesh``.
    box_size : int
        Box side in pixels.
    shape : tuple of int
        Image shape (H, W).
    degree : int
        Degree of the spline in x and y (1: a bilinear surface, the stable choice for a ring).
    usable : ndarray of bool, shape (NY, NX), optional
        Boxes measured on enough unmasked pixels; the others are left out of the fit.

    Raises
    ------
    ValueError
        "background estimate failed: ..." when fewer than max(8, (degree + 1)**2) edge boxes
        are usable.
    """
    n_y, n_x = background_mesh.shape
    yy, xx = np.meshgrid(_mesh_centres(n_y, box_size), _mesh_centres(n_x, box_size), indexing="ij")
    ring = np.zeros(background_mesh.shape, dtype=bool)
    ring[[0, -1], :] = True
    ring[:, [0, -1]] = True
    n_ring = int(ring.sum())
    if usable is not None:
        ring &= usable
    needed = max(8, (degree + 1) ** 2)
    if ring.sum() < needed:
        raise ValueError(
            f"background estimate failed: only {ring.sum()} of {n_ring} edge boxes of {box_size} px have "
            f"at least half their pixels unmasked (need {needed})"
        )
    values = background_mesh[ring]
    if np.ptp(values) == 0:
        return np.full(shape, float(values[0]), dtype=np.float32)
    spline = SmoothBivariateSpline(xx[ring], yy[ring], values, kx=degree, ky=degree, s=ring.sum())
    surface = spline(np.arange(shape[1]), np.arange(shape[0]), grid=True).T
    return surface.astype(np.float32)


def annulus_means(image, excluded, step=ANNULUS_STEP_PX, min_pixels=50):
    """Sigma-clipped means of ``image`` in concentric annuli about the image centre.

    Parameters
    ----------
    image : ndarray, shape (H, W)
    excluded : ndarray of bool, shape (H, W)
        Pixels left out (masked and source pixels).
    step : float
        Annulus width in pixels.
    min_pixels : int
        Annuli with fewer good pixels are skipped.

    Returns
    -------
    ndarray
        One mean per annulus with enough pixels, innermost first.
    """
    order, bounds = _annulus_order(image.shape, float(step))
    values = image.ravel()[order]
    good = ~excluded.ravel()[order]
    means = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        ring = values[start:stop][good[start:stop]]
        if ring.size >= min_pixels:
            means.append(_clipped_mean(ring))
    return np.asarray(means)


@functools.lru_cache(maxsize=8)
def _annulus_order(shape, step):
    """Flat pixel indices sorted by annulus, and the start of each annulus in that order."""
    index = (_radius_map(shape) // step).astype(int).ravel()
    order = np.argsort(index, kind="stable")
    bounds = np.searchsorted(index[order], np.arange(index.max() + 2))
    return order, bounds


def _clipped_mean(values, n_sigma=3.0, iterations=10):
    """Sigma-clipped mean: clip about the median at ``n_sigma`` standard deviations, as
    ``astropy.stats.sigma_clipped_stats`` does, on a sorted copy where every clipped set is a
    contiguous slice (so each iteration costs two binary searches)."""
    ordered = np.sort(values.astype(np.float64))
    sums = np.concatenate([[0.0], np.cumsum(ordered)])
    squares = np.concatenate([[0.0], np.cumsum(ordered**2)])
    low, high = 0, ordered.size
    for _ in range(iterations):
        count = high - low
        middle = low + count // 2
        centre = ordered[middle] if count % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])
        mean = (sums[high] - sums[low]) / count
        spread = np.sqrt(max((squares[high] - squares[low]) / count - mean**2, 0.0))
        new_low = np.searchsorted(ordered, centre - n_sigma * spread, side="left")
        new_high = np.searchsorted(ordered, centre + n_sigma * spread, side="right")
        if (new_low, new_high) == (low, high) or new_high - new_low < 2:
            break
        low, high = new_low, new_high
    return float((sums[high] - sums[low]) / (high - low))


@functools.lru_cache(maxsize=8)
def _radius_map(shape):
    centre_y, centre_x = (shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0
    yy, xx = np.indices(shape)
    radius = np.hypot(yy - centre_y, xx - centre_x)
    radius.setflags(write=False)
    return radius


def background_meshes(data, bad, box_size, what="background"):
    """Background2D mesh (median of sigma-clipped boxes), median-filtered over 3 x 3 boxes.

    The 3 x 3 median filter is applied here with ``scipy.ndimage.median_filter`` rather than by
    Background2D, whose NaN-aware filter costs more than the rest of the estimate.

    Parameters
    ----------
    data : ndarray, shape (H, W)
    bad : ndarray of bool, shape (H, W)
    box_size : int
    what : {"background", "both"}
        Also return the rms mesh when "both".

    Returns
    -------
    meshes : list of ndarray, shape (NY, NX)
        The background mesh (and the rms mesh).
    usable : ndarray of bool, shape (NY, NX)
        Boxes with at least half their pixels unmasked.

    Raises
    ------
    ValueError
        "background estimate failed: ..." when too many boxes are masked.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            estimate = Background2D(
                data,
                box_size,
                mask=bad,
                filter_size=1,
                sigma_clip=SigmaClip(sigma=3.0, maxiters=5),
                bkg_estimator=MedianBackground(),
                exclude_percentile=50.0,
            )
            meshes = [estimate.background_mesh]
            if what == "both":
                meshes.append(estimate.background_rms_mesh)
            n_unmasked = np.asarray(estimate.n_pixels_mesh)
    except ValueError as error:
        raise ValueError(f"background estimate failed: {error}") from None
    filtered = [ndimage.median_filter(np.asarray(mesh, dtype=np.float32), 3, mode="nearest") for mesh in meshes]
    return filtered, n_unmasked >= 0.5 * box_size**2


def mesh_to_image(mesh, box_size, shape):
    """Bilinear interpolation of a mesh of box values (at the box centres) onto the pixel grid.

    Beyond the outermost box centres the edge values are held constant.
    """
    mesh = np.asarray(mesh, dtype=np.float32)
    lower, weight = _interpolation_weights(mesh.shape[0], box_size, shape[0])
    rows = mesh[lower] * (1 - weight)[:, None] + mesh[lower + 1] * weight[:, None]
    lower, weight = _interpolation_weights(mesh.shape[1], box_size, shape[1])
    return (rows[:, lower] * (1 - weight) + rows[:, lower + 1] * weight).astype(np.float32)


@functools.lru_cache(maxsize=32)
def _interpolation_weights(n_boxes, box_size, n_pixels):
    """Index of the box centre below each pixel and the linear weight of the next one.

    Elementwise rather than a matrix product: a tiny BLAS call costs more than it computes
    when the cores are busy.
    """
    if n_boxes == 1:
        return np.zeros(n_pixels, dtype=int), np.zeros(n_pixels, dtype=np.float32)
    position = np.clip((np.arange(n_pixels) - (box_size - 1) / 2.0) / box_size, 0, n_boxes - 1)
    lower = np.minimum(np.floor(position).astype(int), n_boxes - 2)
    return lower, (position - lower).astype(np.float32)


def subtract_background(
    image,
    bad,
    source_threshold,
    box_size=BACKGROUND_BOX_PX,
    spline_degree=1,
    annulus_step=ANNULUS_STEP_PX,
    constant_fraction=ANNULUS_CONSTANT_FRACTION,
):
    """Background-subtracted copy of a cluster cutout (SPEC Part A, step 1).

    1. photutils ``Background2D`` with ``box_size`` boxes (median estimator, 3-sigma clipping);
    2. a smooth surface fitted to the outer ring of its mesh is subtracted;
    3. ``constant_fraction`` x the minimum sigma-clipped mean over concentric annuli
       ``annulus_step`` px apart, outside bad pixels and sources brighter than
       ``source_threshold``, is subtracted as a constant.

    Parameters
    ----------
    image : ndarray, shape (H, W)
        Counts per native pixel; bad pixels may hold any value.
    bad : ndarray of bool, shape (H, W)
    source_threshold : float
        Counts above which pixels belong to sources and are left out of the annuli.

    Returns
    -------
    subtracted : ndarray of float32, shape (H, W)
        The image minus the surface and the constant (bad pixels set to 0).
    background : ndarray of float32, shape (H, W)
        What was subtracted.

    Raises
    ------
    ValueError
        "background estimate failed: ..." when Background2D cannot estimate the sky (too many
        masked pixels) or no annulus has enough unmasked pixels.
    """
    data = np.where(bad, 0.0, image).astype(np.float32)
    # Sources and their wings stay out of the sky boxes (the clipping alone keeps the wings).
    sources = segment_sources(data, source_threshold, bad)
    wings = ndimage.maximum_filter(sources, size=2 * SOURCE_MASK_GROWTH_PX + 1)
    (mesh,), usable = background_meshes(data, bad | wings, box_size)
    surface = fit_edge_surface(mesh, box_size, image.shape, spline_degree, usable)
    flattened = data - surface
    sources = segment_sources(flattened, source_threshold, bad)
    means = annulus_means(flattened, bad | sources, annulus_step)
    if means.size == 0:
        raise ValueError("background estimate failed: no annulus has enough unmasked pixels")
    constant = constant_fraction * float(means.min())
    background = surface + np.float32(constant)
    return np.where(bad, 0.0, data - background).astype(np.float32), background


def label_sources(image, threshold, bad, n_pixels=SEGMENT_MIN_PIXELS):
    """Label sources: groups of at least ``n_pixels`` 8-connected pixels above ``threshold``.

    The same segmentation as photutils ``detect_sources(image, threshold, n_pixels=n_pixels,
    mask=bad)`` (8-connectivity), done with ``scipy.ndimage.label`` and one ``bincount``: on
    noisy cutouts with thousands of small candidate groups it is several times faster.

    Parameters
    ----------
    image : ndarray, shape (H, W)
    threshold : float or ndarray, shape (H, W)
    bad : ndarray of bool, shape (H, W)
        Pixels that never belong to a source.
    n_pixels : int

    Returns
    -------
    labels : ndarray of int, shape (H, W)
        0 for no source, 1..n for the sources kept (not consecutive).
    kept : ndarray of int
        The labels kept.
    """
    above = (image > threshold) & ~bad
    labels, n_labels = ndimage.label(above, structure=np.ones((3, 3), dtype=bool))
    if n_labels == 0:
        return labels, np.zeros(0, dtype=int)
    areas = np.bincount(labels.ravel(), minlength=n_labels + 1)
    areas[0] = 0
    kept = np.flatnonzero(areas >= n_pixels)
    small = areas < n_pixels
    small[0] = True
    labels[small[labels]] = 0
    return labels, kept


def segment_sources(image, threshold, bad, n_pixels=SEGMENT_MIN_PIXELS):
    """Boolean map of sources: at least ``n_pixels`` 8-connected pixels above ``threshold``."""
    labels, _ = label_sources(image, threshold, bad, n_pixels)
    return labels > 0


def smooth(image, bad, sigma_px):
    """Gaussian-smoothed copy of ``image`` with bad pixels set to 0 (a copy even for sigma 0)."""
    data = np.where(bad, 0.0, image).astype(np.float32)
    return ndimage.gaussian_filter(data, sigma_px) if sigma_px > 0 else data


def segment_galaxies(image, threshold, bad, smoothing_px=SEGMENT_SMOOTHING_PX, n_pixels=SEGMENT_MIN_PIXELS):
    """Galaxy segments: sources above the threshold in a lightly smoothed copy (SPEC Part A, step 2).

    Thresholding raw pixels near the noise level sorts pixels by their noise: positive
    fluctuations join the galaxies, negative ones stay in the ICL, which biases the ICL flux
    low at high redshift where the threshold is only about 1.5 sigma. Smoothing with a Gaussian
    of ``smoothing_px`` pixels first makes the split follow the light rather than the noise.
    The fluxes themselves are always summed on the unsmoothed image.

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    return segment_sources(smooth(image, bad, smoothing_px), threshold, bad, n_pixels)


def hot_mask(
    image,
    bad,
    smooth_sigma=HOT_SMOOTH_SIGMA_PX,
    n_sigma=HOT_N_SIGMA,
    n_pixels=HOT_MIN_PIXELS,
    box_size=BACKGROUND_BOX_PX,
    min_snr=HOT_MIN_SNR,
):
    """Compact sources found in an unsharp-masked copy of the image (SPEC Part A, step 3).

    The image minus its Gaussian-smoothed copy (sigma ``smooth_sigma`` px) keeps only small
    structures; pixels more than ``n_sigma`` x the rms of a ``box_size`` Background2D above its
    background, in groups of at least ``n_pixels``, are hot. Groups whose summed signal is below
    ``min_snr`` x rms sqrt(N pixels x the noise correlation area) are noise and are dropped
    (``min_snr = 0`` keeps every group).

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    data = np.where(bad, 0.0, image).astype(np.float32)
    unsharp = data - ndimage.gaussian_filter(data, smooth_sigma)
    (level, rms), _ = background_meshes(unsharp, bad, box_size, what="both")
    threshold = mesh_to_image(level + n_sigma * rms, box_size, image.shape)
    labels, kept = label_sources(unsharp, threshold, bad, n_pixels)
    if min_snr > 0 and kept.size:
        # At 1.2 sigma, noise alone makes groups of a few pixels; masking them would drop
        # positive noise only and bias the ICL flux low. Keep the significant ones, with the
        # noise of a sum over correlated pixels.
        signal = ndimage.sum_labels(unsharp - mesh_to_image(level, box_size, image.shape), labels, kept)
        areas = np.bincount(labels.ravel())[kept]
        correlation = noise_correlation_area(unsharp, bad | (labels > 0), block_px=2)
        noise = float(np.median(rms)) * np.sqrt(areas * correlation)
        significant = np.zeros(labels.max() + 1, dtype=bool)
        significant[kept[signal >= min_snr * noise]] = True
        return significant[labels]
    return labels > 0


def edge_band(shape, width=EDGE_WIDTH_PX):
    """Boolean map of the band ``width`` pixels wide along the image edges."""
    band = np.ones(shape, dtype=bool)
    band[width:-width, width:-width] = False
    return band


def pixel_rms(image, excluded, width=EDGE_WIDTH_PX):
    """Sigma-clipped standard deviation of the pixels near the edges (counts per native pixel).

    Falls back to every non-excluded pixel when the edge band has fewer than 100 of them.
    """
    band = edge_band(image.shape, width) & ~excluded
    values = image[band] if band.sum() >= 100 else image[~excluded]
    if values.size < 10:
        raise ValueError("background estimate failed: too few unmasked pixels to measure the noise")
    _, _, std = sigma_clipped_stats(values, sigma=3.0, maxiters=5)
    return float(std)


def noise_correlation_area(image, excluded, block_px=4, width=EDGE_WIDTH_PX):
    """Pixels per independent noise element, from the variance of block means near the edges.

    Resized cutouts have correlated noise: the mean of an n x n block varies more than
    rms / n. The ratio var(block mean) / (rms^2 / n^2) is the number of pixels that share one
    noise draw; rms x sqrt(N / ratio) is then the noise of a sum of N pixels. Returns 1 for
    white noise (and when too few clean blocks lie in the edge band).
    """
    height, width_px = image.shape
    rows, columns = height // block_px, width_px // block_px
    crop = (slice(0, rows * block_px), slice(0, columns * block_px))
    blocks = image[crop].reshape(rows, block_px, columns, block_px)
    clean = ~excluded[crop].reshape(rows, block_px, columns, block_px).any(axis=(1, 3))
    clean &= edge_band((rows, columns), max(1, width // block_px))
    if clean.sum() < 30:
        return 1.0
    block_means = blocks.mean(axis=(1, 3))[clean]
    pixel_values = blocks.transpose(0, 2, 1, 3)[clean].ravel()
    _, _, block_std = sigma_clipped_stats(block_means, sigma=3.0, maxiters=5)
    _, _, pixel_std = sigma_clipped_stats(pixel_values, sigma=3.0, maxiters=5)
    if pixel_std <= 0:
        return 1.0
    return float(max(1.0, (block_std * block_px / pixel_std) ** 2))


def surface_brightness_limit(rms, cutout_scale, n_sigma=SB_LIMIT_N_SIGMA, box_arcsec=SB_LIMIT_BOX_ARCSEC):
    """Surface-brightness limit in counts per native pixel and the box side in cutout pixels.

    The n-sigma limit in boxes of ``box_arcsec`` x ``box_arcsec`` (Roman, Trujillo & Montes
    2020, appendix A): the mean of n x n pixels has noise rms / n, with n = box_arcsec /
    ``cutout_scale``; the limit is n_sigma * rms / n counts per pixel, and
    ``hsc.counts_to_sb`` turns it into mag/arcsec^2. (Resized cutouts have correlated noise,
    so the true box noise is somewhat larger than rms / n.)

    Returns
    -------
    limit : float
        Counts per native pixel.
    box_px : float
        Box side in cutout pixels.
    """
    box_px = box_arcsec / cutout_scale
    return n_sigma * rms / box_px, box_px


def below_limit(image, valid, limit, box_px, closing_radius=CLOSING_RADIUS_PX):
    """Pixels whose box-averaged value is fainter than the surface-brightness limit.

    The image is averaged over boxes of ``box_px`` (ignoring invalid pixels), compared with
    ``limit`` and the resulting set morphologically closed (SPEC Part A, step 4), so that noise
    does not leave isolated kept pixels in the sky.

    Returns
    -------
    ndarray of bool, shape (H, W)
        True where the pixel is dropped.
    """
    size = max(1, int(round(box_px)))
    weights = ndimage.uniform_filter(valid.astype(np.float32), size, mode="constant")
    sums = ndimage.uniform_filter(np.where(valid, image, 0.0).astype(np.float32), size, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        smoothed = np.where(weights > 0, sums / weights, 0.0)
    dropped = smoothed < limit
    if closing_radius > 0:
        # Closing with a square of side 2 r + 1 (maximum then minimum filter: separable and fast).
        side = 2 * closing_radius + 1
        dropped = ndimage.minimum_filter(ndimage.maximum_filter(dropped, size=side, mode="nearest"), size=side, mode="nearest")
    return dropped


def disk(radius):
    """Boolean disk structuring element of integer ``radius``."""
    yy, xx = np.indices((2 * radius + 1, 2 * radius + 1)) - radius
    return np.hypot(yy, xx) <= radius + 0.01


def aperture(shape, radius_px):
    """Boolean map of the circle of ``radius_px`` pixels about the image centre."""
    return _radius_map(tuple(shape)) <= radius_px


def central_component(mask):
    """The connected part of a boolean ``mask`` that covers the image centre (empty if none)."""
    centre = (mask.shape[0] // 2, mask.shape[1] // 2)
    if not mask[centre]:
        return np.zeros(mask.shape, dtype=bool)
    labels, _ = ndimage.label(mask)
    return labels == labels[centre]


# ----------------------------------------------------------------------------------------
# The result, and the catalogues and star masks of the manual variants

#: A cutout with more than this fraction of its aperture masked (mask plane, NaN or infinite
#: pixels, ``extra_mask``) is refused: the fraction of what is left would not be the cluster's.
MAX_MASKED_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class SBMeasurement:
    """Result of one surface-brightness threshold measurement.

    Attributes
    ----------
    f_icl : float
        ICL fraction inside the aperture, ``icl_flux / total_flux``.
    f_icl_err : float
        Uncertainty of ``f_icl``: the noise term and the background term added in quadrature.
    icl_flux, total_flux : float
        Counts (zero point 27) of the ICL and of all kept light inside the aperture.
    sb_limit : float
        Surface-brightness limit reached, mag/arcsec^2 (3 sigma, 10 x 10 arcsec boxes).
    threshold_sb : float
        Observed threshold between galaxies and ICL, mag/arcsec^2.
    f_icl_err_noise : float
        Error from the pixel noise, rms x sqrt(N pixels) on both fluxes (N counted in
        independent noise elements: resizing correlates neighbouring pixels), propagated to f_icl.
    f_icl_err_background : float
        Standard deviation of f_icl over the background re-estimates (0 when none).
    icl_flux_err : float
        rms x sqrt(N ICL pixels x the noise correlation area), in counts.
    pixel_rms : float
        Noise rms near the edges, counts per native pixel.
    n_icl_pixels, n_kept_pixels : int
        Cutout pixels counted as ICL, and all pixels counted inside the aperture.
    z : float
        Cluster redshift used.
    maps : dict or None
        With ``keep_maps=True``: the boolean maps (``bad``, ``galaxies``, ``hot``, ``dropped``,
        ``aperture``, ``extra``), the ``subtracted`` image, its ``smoothed`` copy that was
        segmented and the ``threshold_counts``, for diagnostics.
    """

    f_icl: float
    f_icl_err: float
    icl_flux: float
    total_flux: float
    sb_limit: float
    threshold_sb: float
    f_icl_err_noise: float
    f_icl_err_background: float
    icl_flux_err: float
    pixel_rms: float
    n_icl_pixels: int
    n_kept_pixels: int
    z: float
    maps: dict = dataclasses.field(default=None, repr=False, compare=False)


def catalogue_pixels(members, wcs):
    """(x, y, z_phot) arrays from a catalogue with x/y pixel columns or ra/dec and a WCS."""

    def column(name):
        try:
            return np.asarray(members[name], dtype=float)
        except (KeyError, IndexError, ValueError):
            return None

    z_phot = column("z_phot")
    if z_phot is None:
        raise ValueError("members must have a 'z_phot' column (photometric redshifts)")
    x, y = column("x"), column("y")
    if x is None or y is None:
        ra, dec = column("ra"), column("dec")
        if ra is None or dec is None:
            raise ValueError("members must have pixel columns 'x', 'y' or sky columns 'ra', 'dec'")
        if wcs is None:
            raise ValueError("members given by 'ra', 'dec' need the image's wcs")
        x, y = wcs.world_to_pixel_values(ra, dec)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float), z_phot


def disk_mask(shape, x, y, radius):
    yy, xx = np.indices(shape)
    return np.hypot(xx - x, yy - y) <= radius


def star_mask_from(star_masks, shape):
    """Combine user star masks: boolean arrays of ``shape`` and/or (x, y, radius_px) circles."""
    combined = np.zeros(shape, dtype=bool)
    if star_masks is None:
        return combined
    if isinstance(star_masks, np.ndarray) and star_masks.dtype == bool:
        star_masks = [star_masks]
    for item in star_masks:
        if isinstance(item, np.ndarray) and item.dtype == bool:
            if item.shape != shape:
                raise ValueError(f"star mask shape {item.shape} does not match image shape {shape}")
            combined |= item
        elif len(item) == 3:
            x, y, radius = (float(value) for value in item)
            if radius <= 0:
                raise ValueError(f"star mask radius must be positive, got {radius}")
            combined |= disk_mask(shape, x, y, radius)
        else:
            raise ValueError(f"star masks must be boolean arrays or (x, y, radius) circles, got {item!r}")
    return combined
