"""Classical (non-learnt) scores of tidal galaxies, the yardsticks of the NNCLR detector.

Every AUC of the detector means little on its own: on mocks where tidal features come with
massive hosts, the host's brightness alone separates the classes. ``nnclr_test.py`` prints
each AUC next to two baselines computed on the same test galaxies:

* :func:`host_flux_statistic`, the i-band light of the host's core: a statistic that sees
  only the host. On host-matched pairs (the same scene with and without its feature) it
  scores AUC 0.5 by construction; elsewhere its AUC is how much of the task the host gives
  away.
* :func:`rotation_residual_statistic`, a classical tidal-feature score: the asymmetric faint
  light left after subtracting the image rotated by 180 degrees about the host.

and, trained on the same labelled galaxies as the classifier, a gradient-boosting classifier
on a dozen residual and asymmetry features (:func:`residual_features`,
:func:`fit_boosting_baseline`).

Images are (N, H, W, bands) counts in g, r, i, z, y (a single (H, W, bands) image is also
taken); the host is near the centre ((H - 1) / 2, (W - 1) / 2), where the rotation residual
finds it to a fraction of a pixel. Everything is numpy and scipy, vectorised over the batch
(except the masks of neighbours, drawn image by image); no TensorFlow.
"""

import numpy as np
import scipy.ndimage

#: Band of the host-flux statistic (i, in g, r, i, z, y).
HOST_BAND = 2
#: Radius (px) of the host-flux aperture.
HOST_RADIUS = 5.0
#: Bands summed (noise-weighted) by the rotation residual: g, r, i, the deepest.
RESIDUAL_BANDS = (0, 1, 2)
#: Radius (px) of the central core left out of the rotation residual.
CORE_RADIUS = 4.0
#: Gaussian smoothing (px) of the residual: faint extended light gains, the noise loses.
RESIDUAL_SMOOTHING = 1.5
#: Residual pixels counted are those above this many standard deviations of the residual.
RESIDUAL_THRESHOLD = 1.0
#: A pixel where both the image and its rotation exceed this many noise sigmas (1 px smoothing) is host light.
SYMMETRIC_BRIGHT = 30.0
#: A local maximum this many noise sigmas (1 px smoothing) above the sky is a source (:func:`source_mask`).
PEAK_THRESHOLD = 8.0
#: A local maximum this bright (same units) is a source even when extended (a bright neighbour galaxy).
SOURCE_BRIGHT = 20.0
#: Radius (px) masked around a source at the threshold, and its growth per e-fold of peak brightness.
MASK_BASE, MASK_SCALE = 4.0, 5.0
#: Segments above this many noise sigmas (2 px smoothing) holding a source and not reaching the host are masked.
SEGMENT_THRESHOLD = 3.0
#: Pixels by which the source mask grows.
MASK_GROW = 1
#: Normal consistency constant of the median absolute deviation.
MAD_TO_SIGMA = 1.482602218505602

#: The baselines nnclr_test.py reports, with their legend labels.
BASELINE_NAMES = {"host_flux": "host flux alone", "rotation_residual": "rotation residual",
                  "boosting": "boosted residual features"}


def _batch(images):
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, bands) or (H, W, bands), got shape {images.shape}")
    return images


def _radius(height, width):
    """Distance (px) of every pixel from the image centre ((H - 1) / 2, (W - 1) / 2)."""
    rows, columns = np.mgrid[:height, :width]
    return np.hypot(rows - (height - 1) / 2, columns - (width - 1) / 2)


def pixel_noise(images):
    """Per-image, per-band sky noise sigma from differences of neighbouring pixels.

    The median absolute difference of horizontally adjacent pixels (times 1.4826, over
    sqrt(2)): light that is smooth on the scale of a pixel (a faint feature spread over
    thousands of pixels, all of it PSF-convolved) cancels in the differences. A second pass
    keeps only the pairs of pixels where the band, smoothed by 2 px, is within 2 sigmas of its
    median (the sky), so that the steep gradients of the host and of bright neighbours do not
    widen the estimate. Pixel-correlated noise (resampled coadds) gives a smaller value than
    the per-pixel sigma, by a factor that is the same for every image of a survey.

    Parameters
    ----------
    images : ndarray, shape (N, H, W, bands)

    Returns
    -------
    ndarray, shape (N, bands)
    """
    images = np.asarray(images, dtype=np.float64)
    count, height, width, bands = images.shape
    finite = np.isfinite(images)
    filled = np.where(finite, images, 0.0)
    differences = np.abs(np.diff(filled, axis=2))
    valid = finite[:, :, 1:] & finite[:, :, :-1]

    def median_of(keep):
        values = np.sort(np.where(keep, differences, np.inf).reshape(count, -1, bands), axis=1)
        kept = keep.reshape(count, -1, bands).sum(axis=1)
        index = np.maximum(kept - 1, 0) // 2
        middle = np.take_along_axis(values, index[:, None, :], axis=1)[:, 0, :]
        return np.where(kept > 0, MAD_TO_SIGMA * middle / np.sqrt(2.0), np.nan), kept

    first, _ = median_of(valid)
    sky = np.nanmedian(np.where(finite, images, np.nan).reshape(count, -1, bands), axis=1)
    smoothed = scipy.ndimage.gaussian_filter(filled - sky[:, None, None, :], sigma=(0, 2, 2, 0), mode="nearest")
    faint = np.abs(smoothed) < 2 * _kernel_norm(2.0) * first[:, None, None, :]
    second, kept = median_of(valid & faint[:, :, 1:] & faint[:, :, :-1])
    return np.where(kept >= 100, second, first)


def host_flux_statistic(images, radius=HOST_RADIUS, band=HOST_BAND):
    """Summed i-band counts within ``radius`` px of the image centre: what the host alone says.

    Parameters
    ----------
    images : ndarray, shape (N, H, W, bands) or (H, W, bands)
        Counts.
    radius : float
        Aperture radius in pixels; a pixel counts when its centre is within it.
    band : int
        Band index (2: i of grizy).

    Returns
    -------
    ndarray of float64, shape (N,)
        NaN pixels count as 0.
    """
    images = _batch(images)
    inside = _radius(*images.shape[1:3]) <= radius
    return np.nansum(images[:, inside, band], axis=1)


def noise_weighted_image(images, bands=RESIDUAL_BANDS):
    """The bands summed with inverse-variance weights, in units of the sum's own noise.

    Each band's noise sigma is :func:`pixel_noise`; the sum
    ``sum_b x_b / sigma_b^2 / sqrt(sum_b 1 / sigma_b^2)`` has unit noise where the sky
    dominates, and is the best signal-to-noise combination for light of flat colour.

    Returns
    -------
    ndarray, shape (N, H, W)
        NaN where a summed band is NaN.
    """
    images = _batch(images)[..., list(bands)]
    sigma = pixel_noise(images)  # (N, bands)
    sigma = np.where(np.isfinite(sigma) & (sigma > 0), sigma, np.inf)
    weights = 1.0 / sigma**2
    norm = np.sqrt(weights.sum(axis=1))
    norm = np.where(norm > 0, norm, 1.0)
    return np.einsum("nhwb,nb->nhw", images, weights) / norm[:, None, None]


def _smooth(images, sigma, mode="nearest"):
    """Gaussian smoothing of each (H, W) image of a batch; NaN-free input.

    ``mode="wrap"`` keeps the noise of every pixel, edges included, at the noise of the
    interior (``nearest`` repeats the edge pixels, whose noise then counts more than once).
    """
    if sigma <= 0:
        return images
    return scipy.ndimage.gaussian_filter(images, sigma=(0, sigma, sigma), mode=mode)


def _kernel_norm(sigma):
    """L2 norm of the smoothing kernel of :func:`_smooth` (1 without smoothing): the noise of
    a smoothed image of unit white noise."""
    size = int(8 * sigma) + 9
    delta = np.zeros((1, size, size))
    delta[0, size // 2, size // 2] = 1.0
    return float(np.sqrt((_smooth(delta, sigma) ** 2).sum()))


def host_centre(summed, search=3.0, smoothing=1.0):
    """Sub-pixel centre of the host: the brightest pixel of the lightly smoothed image within
    ``search`` px of the image centre, refined by the vertex of a 2-D quadratic fitted to it and
    its eight neighbours (the tilt of an inclined ellipse included).

    Returns
    -------
    ndarray, shape (N, 2)
        (row, column) of each image's host.
    """
    fine = _smooth(summed, smoothing)
    count, height, width = fine.shape
    window = np.where(_radius(height, width)[None] <= search, fine, -np.inf)
    rows, columns = np.unravel_index(window.reshape(count, -1).argmax(axis=1), (height, width))
    rows, columns = np.clip(rows, 1, height - 2), np.clip(columns, 1, width - 2)
    offsets = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    patch = fine[np.arange(count)[:, None], rows[:, None] + offsets[:, 0], columns[:, None] + offsets[:, 1]]  # (N, 9)
    dy, dx = offsets[:, 0].astype(np.float64), offsets[:, 1].astype(np.float64)
    design = np.stack([np.ones(9), dy, dx, dy**2, dy * dx, dx**2], axis=1)
    a = patch @ np.linalg.pinv(design).T  # least-squares f = a0 + a1 y + a2 x + a3 y^2 + a4 xy + a5 x^2
    hessian = np.stack([np.stack([2 * a[:, 3], a[:, 4]], -1), np.stack([a[:, 4], 2 * a[:, 5]], -1)], -2)
    gradient = -a[:, 1:3]
    determinant = np.linalg.det(hessian)
    # A peak: negative definite. Otherwise (a flat or saddle core) the brightest pixel stays.
    peak = (hessian[:, 0, 0] < 0) & (determinant > 0)
    offset = np.zeros((count, 2))
    if peak.any():
        offset[peak] = np.linalg.solve(hessian[peak], gradient[peak][..., None])[..., 0]
    offset = np.clip(np.nan_to_num(offset), -1.0, 1.0)
    return np.stack([rows + offset[:, 0], columns + offset[:, 1]], axis=1)


def rotate_about(images, centres):
    """Each (H, W) image rotated by 180 degrees about its own sub-pixel centre (row, column).

    A flip of both axes rotates about the image centre ((H - 1) / 2, (W - 1) / 2); a Fourier
    shift by twice the offset of ``centres`` from it moves the pivot there, keeping the
    noise's power (the light shifted across an edge wraps round: at most a pixel's width).
    """
    images = np.asarray(images, dtype=np.float64)
    count, height, width = images.shape
    shift = 2 * (np.asarray(centres, dtype=np.float64) - np.array([(height - 1) / 2, (width - 1) / 2]))
    flipped = images[:, ::-1, ::-1]
    if not np.any(shift):
        return flipped.copy()
    frequency_rows = np.fft.fftfreq(height)[None, :, None]
    frequency_columns = np.fft.fftfreq(width)[None, None, :]
    phase = np.exp(-2j * np.pi * (frequency_rows * shift[:, 0, None, None] + frequency_columns * shift[:, 1, None, None]))
    return np.fft.ifft2(np.fft.fft2(flipped) * phase).real


def _ring(inner, outer):
    """Footprint of the pixels between ``inner`` and ``outer`` px from the centre."""
    half = int(np.ceil(outer))
    rows, columns = np.mgrid[-half:half + 1, -half:half + 1]
    distance = np.hypot(rows, columns)
    return (distance >= inner) & (distance <= outer)


def source_mask(summed, centres, peak_threshold=PEAK_THRESHOLD, bright_threshold=SOURCE_BRIGHT, mask_base=MASK_BASE,
                mask_scale=MASK_SCALE, segment_threshold=SEGMENT_THRESHOLD, grow=MASK_GROW, host_radius=3.0):
    """Pixels dominated by other sources than the host and its feature (neighbours, stars).

    On the summed image of unit noise smoothed by a 1 px Gaussian (in units of its noise),
    every local maximum (5 x 5 px) more than ``host_radius`` px from the host and above
    ``peak_threshold`` is a candidate. It is a source when it is compact (nowhere on a ring
    4-6 px around it is the image above half the peak, which a ridge of a shell or stream
    would be) or brighter than ``bright_threshold`` (an extended neighbour is far brighter than
    a tidal feature). Around each source a disc is masked, of radius
    ``mask_base + mask_scale * ln(peak / peak_threshold)`` px (brighter sources have wider
    wings), and the whole segment holding it, the image smoothed by 2 px being segmented above
    ``segment_threshold`` times its noise, unless that segment reaches the host (light
    connected to the host, where tidal features lie, stays). The mask grows by ``grow`` px.

    Returns
    -------
    ndarray of bool, shape (N, H, W)
    """
    count, height, width = summed.shape
    rows, columns = np.mgrid[:height, :width]
    distance = np.hypot(rows[None] - centres[:, 0, None, None], columns[None] - centres[:, 1, None, None])
    fine = _smooth(summed, 1.0) / _kernel_norm(1.0)
    peaks = (fine == scipy.ndimage.maximum_filter(fine, size=(1, 5, 5))) & (fine > peak_threshold) & (distance > host_radius)
    around = scipy.ndimage.maximum_filter(fine, footprint=_ring(4.0, 6.0)[None], mode="nearest")
    sources = peaks & ((around < 0.5 * fine) | (fine > bright_threshold))
    detection = _smooth(summed, 2.0) / _kernel_norm(2.0)
    connectivity = np.zeros((3, 3, 3), bool)
    connectivity[1] = scipy.ndimage.generate_binary_structure(2, 1)  # segments never join across images
    segments, _ = scipy.ndimage.label(detection > segment_threshold, structure=connectivity)
    mask = np.zeros(summed.shape, bool)
    for galaxy in np.flatnonzero(sources.any(axis=(1, 2))):
        peak_rows, peak_columns = np.nonzero(sources[galaxy])
        radius = mask_base + mask_scale * np.log(fine[galaxy, peak_rows, peak_columns] / peak_threshold)
        squared = (rows[None] - peak_rows[:, None, None]) ** 2 + (columns[None] - peak_columns[:, None, None]) ** 2
        mask[galaxy] = (squared <= radius[:, None, None] ** 2).any(axis=0)
        labels = segments[galaxy]
        host = labels[distance[galaxy] <= host_radius]
        held = np.setdiff1d(labels[peak_rows, peak_columns], np.concatenate([host, [0]]))
        mask[galaxy] |= np.isin(labels, held)
    if grow > 0:
        mask = scipy.ndimage.binary_dilation(mask, structure=np.ones((1, 2 * grow + 1, 2 * grow + 1), bool))
    return mask


def _residual_maps(images, bands, core_radius, smoothing, symmetric_bright, mask_sources):
    """Shared first steps of the rotation residual.

    Returns
    -------
    residual : ndarray, shape (N, H, W)
        (image - image rotated about the host), smoothed, in units of its noise.
    used : ndarray of bool, shape (N, H, W)
        The pixels the score counts.
    summed : ndarray, shape (N, H, W)
        The noise-weighted image (unit noise), NaNs set to 0.
    centres : ndarray, shape (N, 2)
    """
    summed = noise_weighted_image(images, bands)
    finite = np.isfinite(summed)
    summed = np.where(finite, summed, 0.0)
    centres = host_centre(summed)
    rotated = rotate_about(summed, centres)
    count, height, width = summed.shape
    rows, columns = np.mgrid[:height, :width]
    distance = np.hypot(rows[None] - centres[:, 0, None, None], columns[None] - centres[:, 1, None, None])
    used = finite & finite[:, ::-1, ::-1] & (distance > core_radius)
    # Light that is bright on both sides of the centre is the host's own body: its residual is
    # dominated by photon noise and the profile's cusp, not by faint asymmetric light.
    norm = _kernel_norm(1.0)
    used &= ~(np.minimum(_smooth(summed, 1.0), _smooth(rotated, 1.0)) > symmetric_bright * norm)
    if mask_sources:
        # A source also spoils the pixel it lands on after the rotation: left out on both sides.
        sources = source_mask(summed, centres)
        used &= ~(sources | (rotate_about(sources.astype(np.float64), centres) > 0.5))
    # The noise of the smoothed residual, for unit pixel noise on each side: sqrt(2) times the
    # L2 norm of the smoothing kernel (white noise; the summed image has unit noise).
    residual = _smooth(summed - rotated, smoothing, mode="wrap") / (np.sqrt(2.0) * _kernel_norm(smoothing))
    return residual, used, summed, centres


def rotation_residual_statistic(images, bands=RESIDUAL_BANDS, core_radius=CORE_RADIUS, smoothing=RESIDUAL_SMOOTHING,
                                threshold=RESIDUAL_THRESHOLD, symmetric_bright=SYMMETRIC_BRIGHT, mask_sources=True):
    """A classical tidal-feature score: the significance of asymmetric faint light around the host.

    Algorithm, per image:

    1. Sum the ``bands`` (g, r, i) with inverse-variance weights, each band's noise sigma
       estimated from differences of neighbouring pixels, scaled to unit sky noise
       (:func:`noise_weighted_image`).
    2. Find the host's sub-pixel centre near the image centre (:func:`host_centre`) and
       subtract the image rotated by 180 degrees about it (:func:`rotate_about`): a
       symmetric host (any Sersic profile, bulge and disc, any inclination) cancels; a shell,
       stream, tail or plume on one side remains as positive residual (and as its negative
       mirror on the other).
    3. Leave out the pixels that are not faint asymmetric light around the host: the central
       core (``core_radius`` px); pixels where both the image and its rotation, smoothed by
       1 px, exceed ``symmetric_bright`` times their noise (the host's bright body, where
       photon noise and the profile's cusp dominate); with ``mask_sources``, pixels
       dominated by neighbours and stars (:func:`source_mask`), and their rotated
       positions too. NaN pixels are left out.
    4. Smooth the residual with a Gaussian of ``smoothing`` px (faint extended light gains
       signal-to-noise) and express it in units of its noise.
    5. Score = the residual summed over the pixels used where it exceeds ``threshold`` sigmas,
       minus what pure noise would give (``n * phi(threshold)`` for ``n`` pixels used), over
       the spread of that sum for uncorrelated noise (``sqrt(n * v)``, ``v`` the variance of
       ``X 1(X > threshold)`` for a standard normal ``X``): about 0 for a symmetric galaxy in
       noise (with a spread of about 3 at the default smoothing, which correlates neighbouring
       pixels), growing with the amount and brightness of asymmetric faint light.

    The score does not depend on the host's flux or on the noise level of the image, and is
    monotone in "more asymmetric faint light": adding light on one side of the host raises it.
    The noise sigmas of steps 1 and 4 assume uncorrelated pixel noise; with correlated noise
    the scores of all images scale alike. About 5 ms per 128 x 128 image.

    Parameters
    ----------
    images : ndarray, shape (N, H, W, bands) or (H, W, bands)
        Counts in g, r, i, z, y.

    Returns
    -------
    ndarray of float64, shape (N,)
        0 (no asymmetric light measured) for an image with no usable pixel.
    """
    residual, used, _, _ = _residual_maps(_batch(images), bands, core_radius, smoothing, symmetric_bright, mask_sources)
    return _score(residual, used, threshold)


def _score(residual, used, threshold):
    """Step 5 of :func:`rotation_residual_statistic`: the excess of the residual above ``threshold``."""
    excess, spread = _threshold_moments(threshold)
    above = np.where(used & (residual > threshold), residual, 0.0).sum(axis=(1, 2))
    count = used.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (above - count * excess) / np.sqrt(np.maximum(count, 1) * spread), 0.0)


def _threshold_moments(threshold):
    """Mean and variance of X 1(X > t) for a standard normal X."""
    from scipy.stats import norm

    density, tail = norm.pdf(threshold), norm.sf(threshold)
    mean = density
    second = tail + threshold * density
    return mean, second - mean**2


#: Names of the columns of :func:`residual_features`.
RESIDUAL_FEATURE_NAMES = (
    "rotation_residual", "residual_positive_sum_1sigma", "residual_positive_sum_2sigma", "residual_area_1sigma",
    "residual_area_2sigma", "residual_max", "residual_quadrant_max", "residual_radius", "asymmetry_index",
    "outer_light", "outer_to_inner_light", "outer_light_skew", "outer_colour_g_minus_i", "host_flux_i",
)


def residual_features(images, bands=RESIDUAL_BANDS, core_radius=CORE_RADIUS, smoothing=RESIDUAL_SMOOTHING):
    """A dozen asymmetry and residual features of each image, for :func:`fit_boosting_baseline`.

    From the smoothed rotation residual in sigmas over the pixels used (as in
    :func:`rotation_residual_statistic`): the rotation-residual score, the positive residual
    summed above 1 and 2 sigmas, the areas above 1 and 2 sigmas (fractions of the pixels
    used), the largest residual, the largest residual summed over one quadrant, the mean
    radius of the residual above 1 sigma (px); the CAS asymmetry index sum|I - I_180| /
    sum|I| inside 20 px; the light outside 2 core radii and its ratio to the light inside
    them, the skewness of the outer pixels, the g - i colour of the outer light (counts
    ratio, bounded), and the host's i-band core flux.

    Returns
    -------
    ndarray of float64, shape (N, len(RESIDUAL_FEATURE_NAMES))
        NaN where a feature cannot be computed (HistGradientBoostingClassifier takes NaN).
    """
    images = _batch(images)
    residual, used, summed, centres = _residual_maps(images, bands, core_radius, smoothing, SYMMETRIC_BRIGHT, True)
    count = np.maximum(used.sum(axis=(1, 2)), 1)
    masked = np.where(used, residual, 0.0)
    height, width = summed.shape[1:]
    radius = _radius(height, width)
    above1, above2 = used & (residual > 1), used & (residual > 2)
    quadrants = [(slice(None), slice(0, height // 2), slice(0, width // 2)),
                 (slice(None), slice(0, height // 2), slice(width // 2, None)),
                 (slice(None), slice(height // 2, None), slice(0, width // 2)),
                 (slice(None), slice(height // 2, None), slice(width // 2, None))]
    positive = np.where(above1, masked, 0.0)
    quadrant_max = np.max([positive[part].sum(axis=(1, 2)) for part in quadrants], axis=0) / np.sqrt(count)
    with np.errstate(invalid="ignore", divide="ignore"):
        weight = positive.sum(axis=(1, 2))
        mean_radius = (positive * radius[None]).sum(axis=(1, 2)) / weight
        inside = radius <= 20
        rotated = rotate_about(summed, centres)
        asymmetry = np.abs(summed - rotated)[:, inside].sum(axis=1) / np.abs(summed)[:, inside].sum(axis=1)
        outer = radius > 2 * core_radius
        outer_light = np.where(outer[None], summed, 0.0).sum(axis=(1, 2))
        inner_light = np.where(~outer[None], summed, 0.0).sum(axis=(1, 2))
        outer_pixels = summed[:, outer]
        centred = outer_pixels - outer_pixels.mean(axis=1, keepdims=True)
        skew = (centred**3).mean(axis=1) / np.maximum((centred**2).mean(axis=1), 1e-12) ** 1.5
        g_outer = np.nansum(images[:, outer, 0], axis=1)
        i_outer = np.nansum(images[:, outer, 2], axis=1)
        colour = np.arctan2(g_outer, i_outer)  # bounded where the outer light is near 0
        features = [
            _score(residual, used, RESIDUAL_THRESHOLD),
            positive.sum(axis=(1, 2)) / np.sqrt(count),
            np.where(above2, masked, 0.0).sum(axis=(1, 2)) / np.sqrt(count),
            above1.sum(axis=(1, 2)) / count,
            above2.sum(axis=(1, 2)) / count,
            np.where(used, residual, -np.inf).max(axis=(1, 2)),
            quadrant_max,
            mean_radius,
            asymmetry,
            outer_light / np.sqrt(outer.sum()),
            outer_light / np.where(inner_light > 0, inner_light, np.nan),
            skew,
            colour,
            host_flux_statistic(images),
        ]
    features = np.stack(features, axis=1)
    return np.where(np.isfinite(features), features, np.nan)


def fit_boosting_baseline(train_features, train_labels, seed):
    """Gradient-boosted trees on :func:`residual_features`: a classical baseline trained on labels.

    sklearn's ``HistGradientBoostingClassifier`` (shallow trees, early stopping on a held-out
    tenth when there are enough galaxies), deterministic for a seed.

    Returns
    -------
    sklearn estimator
        ``predict_proba(features)[:, 1]`` is the probability of a tidal feature.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    train_labels = np.asarray(train_labels, dtype=int)
    if np.bincount(train_labels, minlength=2).min() < 2:
        raise ValueError("the boosting baseline needs at least 2 labelled galaxies of each class")
    model = HistGradientBoostingClassifier(
        max_iter=300, learning_rate=0.05, max_depth=3, min_samples_leaf=min(20, max(2, len(train_labels) // 10)),
        l2_regularization=1.0, early_stopping=len(train_labels) >= 100, validation_fraction=0.1, n_iter_no_change=20,
        random_state=seed,
    )
    train_features = np.asarray(train_features, dtype=np.float64)
    # A feature undefined for every training galaxy (possible on small or tiny images) carries
    # nothing, and sklearn's binning fails on an all-NaN column: make it a constant no tree splits on.
    train_features = np.where(np.isnan(train_features).all(axis=0), 0.0, train_features)
    return model.fit(train_features, train_labels)


def baseline_scores(read, rows, names=("host_flux", "rotation_residual"), chunk=256, progress=None):
    """The baseline statistics of the galaxies at ``rows``, read ``chunk`` at a time.

    Parameters
    ----------
    read : callable
        ``read(indices)`` -> counts (len(indices), H, W, bands).
    rows : array of int
    names : sequence of str
        Among ``host_flux``, ``rotation_residual`` and ``features`` (:func:`residual_features`).
    progress : callable, optional
        Wraps the iterable of chunks (a progress bar).

    Returns
    -------
    dict of str -> ndarray
        One value (``features``: one row) per galaxy, in the order of ``rows``.
    """
    functions = {"host_flux": host_flux_statistic, "rotation_residual": rotation_residual_statistic,
                 "features": residual_features}
    rows = np.asarray(rows, dtype=np.int64)
    starts = range(0, len(rows), chunk)
    parts = {name: [] for name in names}
    for start in (progress(starts) if progress else starts):
        images = read(rows[start:start + chunk])
        for name in names:
            parts[name].append(functions[name](images))
    return {name: np.concatenate(values) if values else np.zeros(0) for name, values in parts.items()}
