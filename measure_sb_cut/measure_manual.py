"""Manual-style surface-brightness threshold measurement for real clusters.

The automatic measurement (:func:`measure_sb_cut.measure_icl_fraction`) plus what Canepa et
al. 2025 did by hand for the 101 real clusters of the fine-tuning set:

* galaxies of a member catalogue whose photometric redshift is outside
  |z_phot - z_cl| <= 3 x 0.05 (1 + z_cl) are non-members: their segment, grown a little to
  cover the halo below the threshold (or, for galaxies fainter than the threshold, a small
  disk), is masked out of both fluxes;
* user-given star masks are masked out of both fluxes;
* a bright-star mask that covers the image centre (where the brightest cluster galaxy sits)
  is ignored, with a warning, whether it comes from the user or from the HSC
  BRIGHT_OBJECT mask plane.

The error is that of the automatic measurement: rms x sqrt(N pixels) on both fluxes, added
in quadrature to the spread over background re-estimates.
"""

import logging
import warnings

import numpy as np
from scipy import ndimage

import hsc
from measure_sb_cut import measurement_helpers as helpers
from measure_sb_cut.measure import measure_icl_fraction
from measure_sb_cut.measurement_helpers import (
    catalogue_pixels,
    disk_mask,
    star_mask_from,
)

logger = logging.getLogger(__name__)

#: Photometric-redshift scatter per (1 + z) of the member catalogue.
MEMBER_DZ = 0.05
#: Members lie within this many scatters of the cluster redshift.
MEMBER_N_SIGMA = 3.0
#: Radius (cutout pixels) masked around a non-member that has no segment of its own.
NON_MEMBER_RADIUS_PX = 3.0
#: Non-member segments are grown by this many pixels: their halos continue below the threshold.
NON_MEMBER_GROWTH_PX = 3


def is_member(z_phot, z_cluster, dz=MEMBER_DZ, n_sigma=MEMBER_N_SIGMA):
    """True where |z_phot - z_cluster| <= n_sigma * dz * (1 + z_cluster).

    Parameters
    ----------
    z_phot : array_like
        Photometric redshifts; NaN counts as a non-member.
    z_cluster : float
    dz : float
        Scatter of the photometric redshifts per (1 + z).
    n_sigma : float
    """
    z_phot = np.asarray(z_phot, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.abs(z_phot - z_cluster) <= n_sigma * dz * (1.0 + z_cluster)


def _drop_central(mask, what):
    central = helpers.central_component(mask)
    if central.any():
        warnings.warn(f"{what} covers the image centre; ignoring that part of it", stacklevel=3)
        logger.warning("%s covers the image centre; ignoring that part of it", what)
        return mask & ~central
    return mask


def measure_icl_fraction_manual(
    image,
    z,
    mask=None,
    mask_bits=None,
    *,
    members=None,
    wcs=None,
    star_masks=None,
    member_dz=MEMBER_DZ,
    member_n_sigma=MEMBER_N_SIGMA,
    non_member_radius_px=NON_MEMBER_RADIUS_PX,
    non_member_growth_px=NON_MEMBER_GROWTH_PX,
    **options,
):
    """Measure the ICL fraction of a real cluster, masking non-members and stars.

    Parameters
    ----------
    image : array_like, shape (N, N)
        Cutout as for :func:`measure_sb_cut.measure_icl_fraction` (+-300 kpc, counts per native
        pixel).
    z : float
        Cluster redshift, in [0.1, 0.5].
    mask : array_like of int or bool, shape (N, N), optional
        HSC mask plane or a boolean map of bad pixels. A BRIGHT_OBJECT region of the mask plane
        that covers the image centre is ignored (with a warning).
    mask_bits : dict of str -> int, optional
        Mask plane bit numbers; ``hsc.DEFAULT_MASK_BITS`` by default.
    members : mapping or table, optional
        Galaxy catalogue with a ``z_phot`` column and either ``x``, ``y`` (0-based pixel
        coordinates in ``image``) or ``ra``, ``dec`` (degrees, with ``wcs``). Galaxies outside
        |z_phot - z| <= member_n_sigma x member_dz x (1 + z) are masked.
    wcs : astropy.wcs.WCS, optional
        World coordinates of ``image`` (after any resize), for catalogues with ra/dec.
    star_masks : ndarray of bool or sequence, optional
        Star masks: boolean arrays of the image's shape and/or (x, y, radius_px) circles. A star
        mask covering the image centre is ignored with a warning.
    member_dz, member_n_sigma : float
        Photometric-redshift scatter per (1 + z) and the membership width in units of it.
    non_member_radius_px : float
        Radius masked around a non-member with no segment of its own (fainter than the
        threshold), cutout pixels.
    non_member_growth_px : int
        Non-member segments are dilated by this many pixels, since their light continues
        below the threshold.
    **options
        Passed to :func:`measure_sb_cut.measure_icl_fraction` (threshold, cosmology, aperture...).

    Returns
    -------
    SBMeasurement
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {image.shape}")
    z = helpers.check_redshift(z)
    shape = image.shape

    if mask is not None and np.asarray(mask).dtype != bool:
        bits = dict(hsc.DEFAULT_MASK_BITS) if mask_bits is None else dict(mask_bits)
        planes = tuple(plane for plane in hsc.ICL_MASK_PLANES if plane != "BRIGHT_OBJECT")
        bright = helpers.bad_pixel_map(image, mask, bits, ("BRIGHT_OBJECT",)) & np.isfinite(image)
        bad = helpers.bad_pixel_map(image, mask, bits, planes) | _drop_central(bright, "the BRIGHT_OBJECT mask")
    else:
        bad = helpers.bad_pixel_map(image, mask)

    stars = _drop_central(star_mask_from(star_masks, shape), "a star mask")
    non_members = np.zeros(shape, dtype=bool)
    if members is not None:
        x, y, z_phot = catalogue_pixels(members, wcs)
        outside = ~is_member(z_phot, z, member_dz, member_n_sigma)
        inside_image = (x >= -0.5) & (x < shape[1] - 0.5) & (y >= -0.5) & (y < shape[0] - 0.5)
        chosen = outside & inside_image
        if chosen.any():
            threshold = helpers.threshold_counts(options.get("threshold_sb", helpers.MEASUREMENT_SB), z)
            subtracted, _ = helpers.subtract_background(image, bad, threshold)
            smoothing = options.get("segment_smoothing_px", helpers.SEGMENT_SMOOTHING_PX)
            smoothed = helpers.smooth(subtracted, bad, smoothing)
            labels, _ = helpers.label_sources(smoothed, threshold, bad)
            central_label = labels[shape[0] // 2, shape[1] // 2]
            for column, row in zip(np.rint(x[chosen]).astype(int), np.rint(y[chosen]).astype(int)):
                label = labels[row, column]
                if label > 0 and label != central_label:
                    non_members |= labels == label
                else:
                    # No own segment, or blended with the central galaxy: mask only its core.
                    non_members |= disk_mask(shape, column, row, non_member_radius_px)
        if non_member_growth_px > 0 and non_members.any():
            non_members = ndimage.binary_dilation(non_members, helpers.disk(non_member_growth_px))
        logger.info("%d of %d catalogue galaxies in the image are non-members", int(chosen.sum()), int(inside_image.sum()))
    return measure_icl_fraction(image, z, mask=bad, extra_mask=non_members | stars, **options)
