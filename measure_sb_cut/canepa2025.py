"""The surface-brightness threshold measurement exactly as the published code made it.

Canepa et al. 2025 labelled their artificial training set with an automatic measurement and
their real clusters with a manual variant of it (``measure.py`` and ``measure_manual.py`` of
``lpcan/ml_icl``). This module redoes both step by step, so that a cluster measured here gets
the fraction the original code gives it; :mod:`measure_sb_cut.measure` holds this project's
redesigned ("improved") method. ``python -m measure_sb_cut`` uses this one by default
(``--method canepa2025``).

Automatic measurement (:func:`measure_icl_fraction_canepa2025`), on a 224 x 224 cutout in
counts per native pixel spanning +-300 kpc:

1. A bright-star mask over the image centre is dropped: the whole bad-pixel mask is ignored
   when its centre pixel is set.
2. Background: ``Background2D`` with 16 px boxes on the unmasked cutout gives a 14 x 14 mesh;
   a cubic smoothing spline (``bisplrep``) through the mesh's outer ring is evaluated on the
   mesh grid and zoomed to the image (cubic, reflect). To it is added 2/3 of the smallest
   sigma-clipped mean of the raw cutout in 10 px annuli about the centre (bad pixels left
   out). The background is subtracted and bad pixels are set to zero.
3. Galaxies: ``detect_sources`` at the counts of mu = 26 + 10 log10(1 + z) + k(z) with at least
   10 connected pixels.
4. Hot mask: the cutout minus its convolution with a Gaussian of sigma 2 px (unsharp mask);
   sources of at least 3 pixels above the unsharp image's ``Background2D`` (16 px boxes) plus
   1.2 x its sigma-clipped standard deviation, found outside the galaxies.
5. Surface-brightness limit: mu_lim = -2.5 log10(3 sigma / (0.168 x 10)) + 27, with sigma the
   sigma-clipped standard deviation of the subtracted image.
6. Pixels whose surface brightness is at or below the limit (and non-positive pixels) are
   dropped; the dropped set is closed (binary closing with a 3 x 3 cross).
7. Inside the circle of radius 112 px, leaving out hot and dropped pixels: f_ICL = light
   outside the galaxies / all light.

The original has three plain mistakes. They are kept by default, so that the numbers match
(a switch in ``fixes`` corrects each):

* ``"sigma-region"``: the noise of step 5 was meant to come from the 16 px band along the
  edges, without bad pixels; the mask ``bad & edges`` leaves out only bad edge pixels, so
  sigma comes from the whole image (galaxies included). Fixed: good edge pixels only.
* ``"limit-scale"``: step 5 counts the pixels in a 10" box with the native 0.168"/px, while sigma
  is that of the resized pixels. Fixed: the cutout's own pixel scale s (2 x 300 kpc / 224 px at
  z), mu_lim = -2.5 log10(3 sigma s / (10 x 0.168^2)) + 27, brighter by 2.5 log10(s / 0.168).
  (The noise correlation the resize brings is still left out; ``--method improved`` has it.)
* ``"edge-spline"``: the ring of mesh cells in step 2 leaves out the mesh's last row
  (``Y < n`` instead of ``Y < n - 1``). Fixed: the whole ring.

Manual measurement (:func:`measure_icl_fraction_manual_canepa2025`), for real clusters: the
same limit, but the background is one constant (1/3 of the smallest annulus mean); galaxies
of a member catalogue that fail the photometric-redshift cut are masked (their watershed
segments grown by one pixel) together with the hot mask of the subtracted image; ICL pixels
are those fainter than the threshold (not those outside galaxy segments), and the dropped
pixels are not closed. Its error is the original's: rms x sqrt(N) on both fluxes, with rms
the median background rms of the outer ring of a 19 px ``Background2D`` mesh.
"""

import itertools
import logging
import warnings

import numpy as np
from scipy import ndimage

import hsc
from measure_sb_cut import measurement_helpers as helpers
from measure_sb_cut.measurement_helpers import (
    MAX_MASKED_FRACTION,
    SBMeasurement,
    catalogue_pixels,
    star_mask_from,
)

logger = logging.getLogger(__name__)

#: Corrections of the original's plain mistakes (see the module docstring).
FIXES = ("sigma-region", "limit-scale", "edge-spline")
#: Side of the cutouts the original measured, pixels; its circle, edge band and centre follow it.
SIZE = hsc.ICL_IMAGE_SIZE
#: Cells of the background mesh along each side (box side = size // 14).
MESH_CELLS = 14
#: Radius step (pixels) of the annuli of the constant background term.
ANNULUS_STEP_PX = 10
#: Fraction of the smallest annulus mean added to the background: automatic, manual.
AUTOMATIC_CONSTANT_FRACTION = 2.0 / 3.0
MANUAL_CONSTANT_FRACTION = 1.0 / 3.0
#: Smallest galaxy segment, connected pixels.
SEGMENT_MIN_PIXELS = 10
#: Gaussian sigma (pixels) of the unsharp mask, its Background2D box, threshold and smallest source.
HOT_KERNEL_SIGMA_PX = 2.0
HOT_BOX_PX = 16
HOT_N_SIGMA = 1.2
HOT_MIN_PIXELS = 3
#: Width (pixels) of the edge band where the noise was meant to be measured.
EDGE_BAND_PX = 16
#: Significance and box side (arcsec) of the surface-brightness limit.
LIMIT_N_SIGMA = 3.0
LIMIT_BOX_ARCSEC = 10.0
#: Photometric-redshift scatter per (1 + z) and width of the member cut (manual variant).
MEMBER_DZ = 0.05
MEMBER_N_SIGMA = 3.0
#: Gaussian sigma (pixels) whose 3 x 3 kernel grows the non-member segments (manual variant).
NON_MEMBER_SIGMA_PX = 0.3
#: Background2D box and excluded percentile of the error's rms (manual variant).
RMS_BOX_PX = 19
RMS_EXCLUDE_PERCENTILE = 20


def check_fixes(fixes):
    """The set of fixes asked for; ValueError (one line) for an unknown name."""
    fixes = set(fixes or ())
    unknown = fixes - set(FIXES)
    if unknown:
        raise ValueError(f"unknown fix {min(unknown)!r}: choose from {', '.join(FIXES)}")
    return fixes


def _check_image(image, z, mask):
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2 or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be a square 2-D array, got shape {image.shape}")
    if image.shape[0] < 2 * EDGE_BAND_PX + 2 or image.shape[0] % MESH_CELLS:
        raise ValueError(f"image side must be a multiple of {MESH_CELLS} of at least 42 pixels, got {image.shape[0]}")
    z = helpers.check_redshift(z)
    if mask is not None and np.shape(mask) != image.shape:
        raise ValueError(f"mask shape {np.shape(mask)} does not match image shape {image.shape}")
    non_finite = ~np.isfinite(image)
    if non_finite.all():
        raise ValueError("image has no finite pixels")
    if non_finite.any():
        # The original had none; a non-finite pixel would make every sum NaN. Zero and mask it.
        logger.warning("%d non-finite pixels set to zero and masked", int(non_finite.sum()))
        image = np.where(non_finite, 0.0, image)
    return image, z, non_finite


def bad_pixels(image, mask, mask_bits, non_finite):
    """The boolean bad-pixel map, dropped entirely when it covers the centre pixel (step 1)."""
    if mask is None:
        bad = np.zeros(image.shape, dtype=bool)
    elif np.asarray(mask).dtype == bool:
        bad = np.asarray(mask, dtype=bool).copy()
    else:
        bits = hsc.mask_value(mask_bits or hsc.DEFAULT_MASK_BITS)
        bad = (np.asarray(mask).astype(np.int64) & bits) != 0
    size = image.shape[0]
    if bad[size // 2, size // 2]:
        logger.warning("the bad-pixel mask covers the image centre: it is ignored, as the original did")
        bad = np.zeros(image.shape, dtype=bool)
    return bad | non_finite


def _background2d(data, box_size, **options):
    from photutils.background import Background2D

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # photutils warns about meshes it fills; the original ignored it
        return Background2D(data, box_size=box_size, **options)


def check_coverage(bad):
    """Refuse a cutout whose sky or cluster is mostly masked, where the original's number means nothing.

    The background comes from the 16 px band along the edges and the fraction from the
    aperture; more than half of either masked is refused (the original measured it anyway).
    """
    size = bad.shape[0]
    band = np.ones(bad.shape, bool)
    band[EDGE_BAND_PX:-EDGE_BAND_PX, EDGE_BAND_PX:-EDGE_BAND_PX] = False
    masked = float(bad[band].mean())
    if masked > MAX_MASKED_FRACTION:
        raise ValueError(
            f"background estimate failed: {masked:.0%} of the {EDGE_BAND_PX} px band along the edges is masked "
            f"(at most {MAX_MASKED_FRACTION:.0%} allowed): no sky left to measure"
        )
    inside = circle(size)
    masked = float(bad[inside].mean())
    if masked > MAX_MASKED_FRACTION:
        raise ValueError(
            f"{masked:.0%} of the pixels inside the aperture are masked or not finite "
            f"(at most {MAX_MASKED_FRACTION:.0%} allowed): too little of the cluster is left to measure"
        )


def annulus_means(image, bad, step=ANNULUS_STEP_PX):
    """Sigma-clipped means of ``image`` in annuli of ``step`` px about the centre, bad pixels left out.

    Radii -1, step - 1, 2 step - 1, ... below size // 2; an annulus holds the pixels whose
    distance d to pixel (size // 2, size // 2) satisfies r_i < d <= r_(i+1).
    """
    from astropy.stats import sigma_clipped_stats

    size = image.shape[0]
    yy, xx = np.ogrid[:size, :size]
    distance = np.sqrt((xx - size // 2) ** 2 + (yy - size // 2) ** 2)
    radii = np.arange(-1, size // 2, step)
    means = []
    for inner, outer in itertools.pairwise(radii):
        values = image[(distance > inner) & (distance <= outer) & ~bad]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty annulus gives NaN, as in the original
            means.append(sigma_clipped_stats(values)[0] if values.size else np.nan)
    return np.array(means)


def edge_spline_background(image, fix_edge_spline=False):
    """Step 2's smooth surface: a spline through the outer ring of the Background2D mesh, zoomed."""
    from scipy.interpolate import bisplev, bisplrep

    size = image.shape[0]
    mesh = _background2d(image, size // MESH_CELLS).background_mesh
    rows, cols = np.indices(mesh.shape)
    last_row = mesh.shape[0] - 1 if fix_edge_spline else mesh.shape[0]
    inner = (cols > 0) & (cols < mesh.shape[1] - 1) & (rows > 0) & (rows < last_row)
    ring = np.argwhere(~inner)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bisplrep's fit-quality warnings
        tck = bisplrep(ring[:, 0], ring[:, 1], mesh[~inner])
    surface = bisplev(np.arange(mesh.shape[0]), np.arange(mesh.shape[1]), tck)
    return ndimage.zoom(surface, np.array(image.shape) / np.array(mesh.shape), mode="reflect")


def unsharp_hot_mask(image, galaxies):
    """Step 4: compact sources of the unsharp-masked ``image`` outside ``galaxies`` (boolean map)."""
    from astropy.convolution import Gaussian2DKernel, convolve
    from photutils.segmentation import detect_sources, detect_threshold

    unsharp = image - convolve(image, Gaussian2DKernel(HOT_KERNEL_SIGMA_PX))
    background = _background2d(unsharp, HOT_BOX_PX).background
    threshold = detect_threshold(unsharp, HOT_N_SIGMA, background=background, mask=galaxies)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no sources found" is an answer here
        segments = detect_sources(unsharp, threshold, n_pixels=HOT_MIN_PIXELS, mask=galaxies)
    return np.zeros(image.shape, dtype=bool) if segments is None else segments.data > 0


def detect_galaxies(subtracted, threshold):
    """Step 3: labels of sources above ``threshold`` with at least 10 connected pixels (0: none)."""
    from photutils.segmentation import detect_sources

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        segments = detect_sources(subtracted, threshold, n_pixels=SEGMENT_MIN_PIXELS)
    if segments is None:
        raise ValueError(f"no source brighter than the threshold ({threshold:.4g} counts) in the image")
    return segments.data


def surface_brightness_limit(subtracted, bad, z, fixes, half_width_kpc, cosmology):
    """Step 5: (limit in mag/arcsec^2, sigma in counts per pixel)."""
    from astropy.stats import sigma_clipped_stats

    size = subtracted.shape[0]
    yy, xx = np.ogrid[:size, :size]
    band = EDGE_BAND_PX
    inside = (xx < size - band) & (xx > band) & (yy < size - band) & (yy > band)
    if "sigma-region" in fixes:
        left_out = bad | inside
    else:
        left_out = bad & ~inside
    sigma = float(sigma_clipped_stats(subtracted, mask=left_out)[2])
    # A 10" box holds (10 / s)^2 pixels of side s, so its mean has the noise sigma s / 10, in
    # counts per native pixel (the resize keeps the native pixels' counts), and sigma s / (10 x
    # 0.168^2) per arcsec^2. The original put s = 0.168; the cutout's pixels are larger.
    scale = helpers.cutout_pixel_scale(z, size, half_width_kpc, cosmology) if "limit-scale" in fixes else hsc.PIXEL_SCALE
    with np.errstate(divide="ignore", invalid="ignore"):
        box_sigma = LIMIT_N_SIGMA * sigma * scale / (LIMIT_BOX_ARCSEC * hsc.PIXEL_SCALE**2)
        limit = -2.5 * np.log10(box_sigma) + hsc.ZERO_POINT
    return float(limit), sigma


def kept_counts(subtracted, limit):
    """Counts of the pixels brighter than the limit (NaN elsewhere, and at non-positive pixels).

    The original converted the image to surface brightness, set pixels at or below the limit
    to NaN and converted back; the same here, in the same arithmetic.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        sb = hsc.counts_to_sb(subtracted)
        sb = np.where(sb >= limit, np.nan, sb)
        return sb, hsc.sb_to_counts(sb)


def close_cross(mask):
    """Binary closing with a 3 x 3 cross: dilation with the border off, erosion with it on."""
    cross = ndimage.generate_binary_structure(2, 1)
    dilated = ndimage.binary_dilation(mask, cross, border_value=0)
    return ndimage.binary_erosion(dilated, cross, border_value=1)


def circle(size):
    """The original's aperture: pixels within size / 2 of pixel (size // 2, size // 2)."""
    yy, xx = np.ogrid[:size, :size]
    return np.sqrt((xx - size // 2) ** 2 + (yy - size // 2) ** 2) <= size / 2


def _measurement(z, counts, kept, icl_pixels, image, bad, limit, threshold_mu, half_width_kpc, cosmology, maps):
    """The sums over the kept and ICL pixels, the fraction and the original's error, as an SBMeasurement."""
    icl, total = float(np.nansum(counts[icl_pixels])), float(np.nansum(counts[kept]))
    f_icl = _fraction(icl, total, "total")
    # The original's error: rms x sqrt(N) on both sums (N: pixels holding light), relative
    # errors added in quadrature.
    rms = edge_rms(image, bad)
    n_icl = int(np.count_nonzero(np.nan_to_num(counts[icl_pixels])))
    n_kept = int(np.count_nonzero(np.nan_to_num(counts[kept])))
    icl_err, total_err = rms * np.sqrt(n_icl), rms * np.sqrt(n_kept)
    with np.errstate(divide="ignore", invalid="ignore"):
        f_err = float(f_icl * np.hypot(icl_err / icl, total_err / total)) if icl > 0 else 0.0
    area_factor = (helpers.cutout_pixel_scale(z, image.shape[0], half_width_kpc, cosmology) / hsc.PIXEL_SCALE) ** 2
    return SBMeasurement(
        f_icl=float(f_icl),
        f_icl_err=f_err,
        icl_flux=icl * area_factor,
        total_flux=total * area_factor,
        sb_limit=float(limit),
        threshold_sb=float(threshold_mu),
        f_icl_err_noise=f_err,
        f_icl_err_background=0.0,
        icl_flux_err=float(icl_err) * area_factor,
        pixel_rms=float(rms),
        n_icl_pixels=n_icl,
        n_kept_pixels=n_kept,
        z=z,
        maps=maps,
    )


def edge_rms(image, bad):
    """The manual variant's noise: median background rms of the outer ring of a 19 px mesh."""
    estimate = _background2d(image, RMS_BOX_PX, mask=bad, exclude_percentile=RMS_EXCLUDE_PERCENTILE)
    # photutils 1 left excluded boxes out (``background_rms_mesh_masked``); photutils 2 and
    # later fill them in and have only ``background_rms_mesh``.
    rms_mesh = getattr(estimate, "background_rms_mesh_masked", None)
    if rms_mesh is None:
        rms_mesh = estimate.background_rms_mesh
    mesh = np.ma.filled(np.ma.asarray(rms_mesh, dtype=float), np.nan)
    rows, cols = np.indices(mesh.shape)
    inner = (cols > 0) & (cols < mesh.shape[1] - 1) & (rows > 0) & (rows < mesh.shape[0] - 1)
    return float(np.nanmedian(mesh[~inner]))


def _fraction(icl, total, what):
    if not np.isfinite(total) or total <= 0:
        raise ValueError(
            f"no light above the surface-brightness limit inside the aperture ({what} {total:.3g} counts per pixel)"
        )
    return icl / total


def measure_icl_fraction_canepa2025(
    image,
    z,
    mask=None,
    mask_bits=None,
    *,
    threshold_sb=helpers.MEASUREMENT_SB,
    fixes=(),
    half_width_kpc=hsc.CUTOUT_HALF_WIDTH_KPC,
    cosmology=helpers.MEASUREMENT_COSMOLOGY,
    keep_maps=False,
):
    """The automatic measurement of the original code (the module docstring's steps 1-7).

    Parameters
    ----------
    image : array_like, shape (224, 224)
        Cutout spanning +-``half_width_kpc`` about the cluster centre in counts per native HSC
        pixel (zero point 27), resized as the original did (``cutout_for_measurement``).
        Non-finite pixels are set to zero and masked (the original had none).
    z : float
        Cluster redshift, in [0.1, 0.5].
    mask : array_like of int or bool, optional
        HSC mask plane (BAD, NO_DATA and BRIGHT_OBJECT bits) or a boolean bad-pixel map.
    mask_bits : dict, optional
        Mask-plane bit numbers (``hsc.DEFAULT_MASK_BITS``).
    threshold_sb : float
        Rest-frame threshold between galaxies and ICL, mag/arcsec^2 (26).
    fixes : iterable of str
        Corrections of the original's mistakes to apply, from :data:`FIXES` (none by default).
    half_width_kpc, cosmology
        Span of the cutout and cosmology; used only by the ``"limit-scale"`` fix and to turn
        the sums into total counts.
    keep_maps : bool
        Keep the maps for :func:`measure_sb_cut.measure.plot_measurement`.

    Returns
    -------
    SBMeasurement
        ``f_icl_err`` is the manual variant's error (the automatic code had none);
        ``f_icl_err_background`` is 0.

    Raises
    ------
    ValueError
        For a bad shape or redshift, an unknown fix, more than half of the edge band or of the
        aperture masked (:func:`check_coverage`), no source above the threshold, or no light
        above the surface-brightness limit inside the aperture.
    """
    fixes = check_fixes(fixes)
    image, z, non_finite = _check_image(image, z, mask)
    size = image.shape[0]
    bad = bad_pixels(image, mask, mask_bits, non_finite)
    check_coverage(bad)
    if not np.isfinite(threshold_sb):
        raise ValueError(f"threshold_sb must be a number of mag/arcsec^2, got {threshold_sb}")

    means = annulus_means(image, bad)
    background = edge_spline_background(image, "edge-spline" in fixes) + AUTOMATIC_CONSTANT_FRACTION * np.min(means)
    subtracted = (image - background) * ~bad

    threshold_mu = float(hsc.observed_surface_brightness(threshold_sb, z))
    threshold = float(hsc.sb_to_counts(threshold_mu))
    galaxies = detect_galaxies(subtracted, threshold) > 0
    hot = unsharp_hot_mask(image, galaxies)
    limit, _ = surface_brightness_limit(subtracted, bad, z, fixes, half_width_kpc, cosmology)

    _, counts = kept_counts(subtracted, limit)
    dropped = close_cross(np.isnan(counts))
    kept = circle(size) & ~dropped & ~hot
    icl_pixels = kept & ~galaxies
    maps = None
    if keep_maps:
        maps = {
            "subtracted": subtracted,
            "bad": bad,
            "extra": np.zeros_like(bad),
            "galaxies": galaxies,
            "hot": hot,
            "dropped": dropped & ~bad,
            "aperture": circle(size),
            "threshold_counts": threshold,
            "smoothed": subtracted,
        }
    return _measurement(z, counts, kept, icl_pixels, image, bad, limit, threshold_mu, half_width_kpc, cosmology, maps)


def watershed_segments(subtracted, threshold):
    """The manual variant's segmentation: footprints split by a watershed of their distance map.

    Markers are the 4-connected components of the footprints eroded by a 3 x 3 square; the
    watershed labels are shifted past the largest footprint label, and footprint pixels the
    watershed leaves out keep their footprint label.
    """
    from skimage.segmentation import watershed

    labels = detect_galaxies(subtracted, threshold)
    footprint = labels > 0
    eroded = ndimage.binary_erosion(footprint, np.ones((3, 3), bool), border_value=1)
    markers, _ = ndimage.label(eroded)
    distance = ndimage.distance_transform_edt(footprint)
    split = watershed(-distance, markers, mask=footprint)
    return np.where(split > 0, split + labels.max(), labels)


def non_member_mask(subtracted, labels, members_xy):
    """Segments of galaxies that are not members, grown by one pixel, minus the members' segments."""
    from astropy.convolution import Gaussian2DKernel, convolve

    x, y = members_xy
    size = subtracted.shape[0]
    member_labels = set()
    for column, row in zip(np.asarray(x, dtype=float), np.asarray(y, dtype=float)):
        column, row = int(column), int(row)
        if 0 <= row < size and 0 <= column < size and labels[row, column] != 0:
            member_labels.add(int(labels[row, column]))
    member_labels = np.array(sorted(member_labels), dtype=labels.dtype)
    others = (labels > 0) & ~np.isin(labels, member_labels)
    grown = convolve(others.astype(float), Gaussian2DKernel(NON_MEMBER_SIGMA_PX)) != 0
    return grown & ~np.isin(labels, member_labels)


def member_positions(members, z, wcs=None):
    """(x, y) pixel positions of the catalogue galaxies within 3 x 0.05 (1 + z) of the cluster redshift.

    ``members`` has a ``z_phot`` column and ``x``, ``y`` pixel columns (of the 224 x 224 image) or
    ``ra``, ``dec`` with ``wcs``. The cut is strict, as the original's.
    """
    x, y, z_phot = catalogue_pixels(members, wcs)
    width = MEMBER_N_SIGMA * MEMBER_DZ * (1.0 + z)
    with np.errstate(invalid="ignore"):
        chosen = (z_phot < z + width) & (z_phot > z - width)
    return x[chosen], y[chosen]


def measure_icl_fraction_manual_canepa2025(
    image,
    z,
    mask=None,
    mask_bits=None,
    *,
    members=None,
    wcs=None,
    star_masks=None,
    threshold_sb=helpers.MEASUREMENT_SB,
    fixes=(),
    half_width_kpc=hsc.CUTOUT_HALF_WIDTH_KPC,
    cosmology=helpers.MEASUREMENT_COSMOLOGY,
    keep_maps=False,
):
    """The manual measurement of the original code, which labelled the real clusters.

    Parameters
    ----------
    image, z, mask, mask_bits, threshold_sb, fixes, half_width_kpc, cosmology, keep_maps
        As for :func:`measure_icl_fraction_canepa2025`. The original resized the mask plane
        of real clusters with nearest-neighbour sampling (``prep_data.resize_mask`` with
        ``rule="nearest"``).
    members : mapping or table, optional
        Catalogue with ``z_phot`` and ``x``, ``y`` (pixels of ``image``) or ``ra``, ``dec`` (with
        ``wcs``). Galaxies within the photometric-redshift cut are members; every other
        segment of the image is masked. Without a catalogue every segment is masked, as the
        original did when its query found no members.
    wcs : astropy.wcs.WCS, optional
    star_masks : ndarray of bool or sequence of (x, y, radius_px), optional
        Added to the bad-pixel mask before anything else, as the original did (so a star mask
        over the centre drops the whole mask).

    Returns
    -------
    SBMeasurement
    """
    fixes = check_fixes(fixes)
    image, z, non_finite = _check_image(image, z, mask)
    size = image.shape[0]
    if mask is not None and np.asarray(mask).dtype != bool:
        mask = (np.asarray(mask).astype(np.int64) & hsc.mask_value(mask_bits or hsc.DEFAULT_MASK_BITS)) != 0
    combined = np.zeros(image.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    combined = combined | star_mask_from(star_masks, image.shape)
    bad = bad_pixels(image, combined, None, non_finite)
    check_coverage(bad)

    means = annulus_means(image, bad)
    subtracted = (image - MANUAL_CONSTANT_FRACTION * np.min(means)) * ~bad

    threshold_mu = float(hsc.observed_surface_brightness(threshold_sb, z))
    threshold = float(hsc.sb_to_counts(threshold_mu))
    labels = watershed_segments(subtracted, threshold)
    member_xy = member_positions(members, z, wcs) if members is not None else (np.array([]), np.array([]))
    non_members = non_member_mask(subtracted, labels, member_xy)
    hot = unsharp_hot_mask(subtracted, labels > 0)
    excluded = non_members | hot
    limit, _ = surface_brightness_limit(subtracted, bad, z, fixes, half_width_kpc, cosmology)

    sb, counts = kept_counts(subtracted, limit)
    with np.errstate(invalid="ignore"):
        fainter = sb >= threshold_mu
    dropped = np.isnan(counts)
    kept = circle(size) & ~dropped & ~excluded
    icl_pixels = kept & fainter
    maps = None
    if keep_maps:
        maps = {
            "subtracted": subtracted,
            "bad": bad,
            "extra": non_members,
            "galaxies": circle(size) & ~fainter & ~dropped,
            "hot": hot,
            "dropped": dropped & ~bad,
            "aperture": circle(size),
            "threshold_counts": threshold,
            "smoothed": subtracted,
        }
    return _measurement(z, counts, kept, icl_pixels, image, bad, limit, threshold_mu, half_width_kpc, cosmology, maps)
