"""Inject an intracluster-light profile into a cutout, as Canepa et al. (2025) built their training set.

The paper injected ICL into real HSC cutouts centred on luminous red galaxies; this module does
the same to any cutout in counts per native pixel: an ICL-free mock from
:mod:`data.clusters` (``python -m data.generate backgrounds``) or a real cutout read by
:mod:`prep_data`. The steps (SPEC Part A, "Artificial training images"):

1. Threshold: the counts of mu = 25 + 10 log10(1 + z) + k(z). Sources above it with at least
   20 connected pixels are detected, and touching sources are split by erosion and watershed.
2. The central blob is the segment under the image centre; its centroid is the profile centre.
3. Profile: elliptical exponential (Sersic n = 1) with surface brightness at r_eff equal to the
   threshold; r_eff is a quantile, drawn from {0, 0.25, 0.5, 1}, of the distances from the
   centroid to the blob's convex-hull vertices; ellipticity ~ U(0, 0.5), position angle
   ~ U(0, 2 pi). While the area where the profile is brighter than mu = 30.2 + 10 log10(1 + z)
   + k(z) exceeds 8 times the blob's area, the quantile steps down by 0.25.
4. The profile is clipped at the threshold and set to zero on pixels above the threshold.
5. Noise: Gaussian with the background's MAD standard deviation, times profile / threshold.
6. The image is faded by (1 - profile / threshold) and the noisy profile added; pixels above
   the threshold keep their values.

Zeroing the profile on bright pixels leaves a step around every galaxy (MOCKS.md); the mocks of
:mod:`data.clusters` keep their own ICL smooth, and this module stays faithful to the paper.
"""

import common

if __name__ in common.MAIN_NAMES:
    common.quiet_interrupt()  # a Ctrl-C while the libraries load is one line, not a traceback

import argparse
import dataclasses
import json
import logging
import os
import sys
import warnings

import numpy as np

import data.files
import hsc
import prep_data
from data import profiles

logger = logging.getLogger(__name__)

#: Rest-frame surface brightness (mag/arcsec^2) of the segmentation threshold and profile amplitude.
THRESHOLD_SB_REST = 25.0
#: Rest-frame surface brightness (mag/arcsec^2) bounding the profile's extent (step 3).
FAINT_LIMIT_SB_REST = 30.2
#: Smallest source, in connected pixels above the threshold.
MIN_SOURCE_PIXELS = 20
#: Quantiles of the hull-vertex distances that r_eff is drawn from.
R_EFF_QUANTILES = (0.0, 0.25, 0.5, 1.0)
#: Step by which the quantile shrinks while the profile is too extended.
QUANTILE_STEP = 0.25
#: Largest ratio of the profile's area above the faint limit to the central blob's area.
MAX_AREA_RATIO = 8.0
#: Largest ellipticity (1 - axis ratio) of the injected profile.
MAX_ELLIPTICITY = 0.5
#: Erosion steps (pixels) that separate touching sources before the watershed.
EROSION_STEPS = 2
#: Smallest distance (pixels) between two watershed markers (brightness peaks).
SEPARATION_PX = 4


class InjectionError(ValueError):
    """A cutout the injection cannot work on; the message says why."""


@dataclasses.dataclass(frozen=True)
class InjectionResult:
    """Outcome of :func:`inject_icl`.

    Attributes
    ----------
    image : ndarray of float32, shape (H, W)
        The cutout with the ICL injected (counts per native pixel).
    profile : ndarray of float32, shape (H, W)
        The clipped, galaxy-zeroed profile before noise (step 4).
    noise : ndarray of float32, shape (H, W)
        The noise added with it (step 5).
    segmentation : ndarray of int, shape (H, W)
        Source labels after the watershed split (0: background).
    params : dict
        Threshold (counts), centre (x, y in pixels), r_eff (pixels), quantile, ellipticity,
        position angle (radians), noise sigma (counts), the injected flux in the 300 kpc aperture
        and the fraction it makes of the aperture's flux (``f_icl_injected``).
    """

    image: np.ndarray
    profile: np.ndarray
    noise: np.ndarray
    segmentation: np.ndarray
    params: dict


def exponential_profile(shape, x0, y0, amplitude, r_eff, ellipticity, position_angle):
    """Elliptical exponential (Sersic n = 1) surface brightness sampled at pixel centres.

    I(r) = amplitude * exp(-b_1 (r / r_eff - 1)), b_1 = 1.678 (astropy ``Sersic2D`` with n = 1),
    r the elliptical radius along the major axis (axis ratio 1 - ellipticity).

    Parameters
    ----------
    shape : tuple of int
        (H, W).
    x0, y0 : float
        Centre (column, row) in pixels.
    amplitude : float
        Surface brightness at r_eff (counts per pixel).
    r_eff : float
        Effective radius along the major axis (pixels), > 0.
    ellipticity : float
        In [0, 1).
    position_angle : float
        Major axis angle from +x towards +y (radians).
    """
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    r2 = profiles.elliptical_radius_squared(xx - x0, yy - y0, 1.0 - ellipticity, position_angle)
    b = float(profiles.sersic_b(1.0))
    return profiles.sersic_intensity(r2 * (1.0 / r_eff**2), amplitude, 1.0, b, dtype=np.float64).astype(np.float32)


def segment_sources(image, threshold, bad=None, min_pixels=MIN_SOURCE_PIXELS, erosion_steps=EROSION_STEPS):
    """Sources above ``threshold`` (photutils), touching ones split by erosion and watershed.

    Each footprint is eroded by ``erosion_steps`` pixels; the watershed then floods the
    brightness landscape (smoothed by a 1 px Gaussian) inside the footprints from markers at the
    brightness peaks of the eroded footprints (at least ``SEPARATION_PX`` apart and twice the
    threshold), so that a neighbour embedded in the central galaxy's isophote gets its own label.

    Returns
    -------
    ndarray of int, shape (H, W)
        Labels 1..n of the sources, 0 elsewhere.
    """
    from photutils.segmentation import detect_sources
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no sources found" is an answer here, not a problem
        segments = detect_sources(image, threshold, n_pixels=min_pixels, mask=bad)
    if segments is None:
        return np.zeros(image.shape, dtype=np.int32)
    footprint = segments.data > 0
    cores = ndimage.binary_erosion(footprint, iterations=erosion_steps)
    smooth = ndimage.gaussian_filter(image, 1.0)
    peaks = peak_local_max(smooth, min_distance=SEPARATION_PX, threshold_abs=2.0 * threshold, labels=cores.astype(np.int32))
    markers = np.zeros(image.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    split = watershed(-smooth, markers, mask=footprint)
    # Footprints with no peak (faint, or lost to the erosion) keep their own label.
    orphans = footprint & (split == 0)
    if orphans.any():
        extra, _ = ndimage.label(orphans)
        split = np.where(orphans, extra + len(peaks), split)
    return split.astype(np.int32)


def inject_icl(image, z, mask=None, mask_bits=None, seed=None, quantile=None):
    """Inject an ICL profile into one cutout (SPEC Part A, steps 1-6).

    Parameters
    ----------
    image : ndarray, shape (H, W)
        Counts per native HSC pixel (zero point 27), the cluster or galaxy at the centre.
        Not modified.
    z : float
        Redshift of the central galaxy, in [0.1, 0.5].
    mask : ndarray of int, shape (H, W), optional
        HSC mask plane; BAD | NO_DATA | BRIGHT_OBJECT pixels are left out of the detection and
        the noise estimate (the profile is still added there).
    mask_bits : dict, optional
        Mask plane bit numbers (default ``hsc.DEFAULT_MASK_BITS``).
    seed : int or numpy.random.Generator, optional
        Randomness of the quantile, shape and noise.
    quantile : float, optional
        Start from this quantile instead of drawing one from ``R_EFF_QUANTILES``.

    Returns
    -------
    InjectionResult

    Raises
    ------
    InjectionError
        If the image is not 2-D, holds no finite unmasked pixels, or has no source above the
        threshold near its centre.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise InjectionError(f"image must be 2-D, got shape {image.shape}")
    if not hsc.Z_MIN <= z <= hsc.Z_MAX:
        raise InjectionError(f"z must be in [{hsc.Z_MIN}, {hsc.Z_MAX}], got {z}")
    if mask is not None and np.shape(mask) != image.shape:
        raise InjectionError(f"mask shape {np.shape(mask)} does not match image shape {image.shape}")
    if quantile is not None and not 0.0 <= quantile <= 1.0:
        raise InjectionError(f"quantile must be in [0, 1], got {quantile}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    bad = ~np.isfinite(image)
    if mask is not None:
        bad |= (np.asarray(mask).astype(np.int64) & hsc.mask_value(mask_bits or hsc.DEFAULT_MASK_BITS)) != 0
    if bad.all():
        raise InjectionError("background cutout is entirely masked (BAD | NO_DATA | BRIGHT_OBJECT or non-finite)")
    clean = np.where(bad, 0.0, image).astype(np.float32)

    threshold = float(hsc.sb_to_counts(hsc.observed_surface_brightness(THRESHOLD_SB_REST, z)))
    faint_limit = float(hsc.sb_to_counts(hsc.observed_surface_brightness(FAINT_LIMIT_SB_REST, z)))
    segmentation = segment_sources(clean, threshold, bad)
    height, width = image.shape
    centre_row, centre_col = (height - 1) // 2, (width - 1) // 2
    label = int(segmentation[centre_row, centre_col])
    if label == 0:
        raise InjectionError(
            f"no source brighter than the threshold ({threshold:.4g} counts, mu = {THRESHOLD_SB_REST} rest frame) "
            "covers the image centre"
        )
    blob = segmentation == label
    rows, cols = np.nonzero(blob)
    weights = clean[blob]
    y0, x0 = float(np.average(rows, weights=weights)), float(np.average(cols, weights=weights))
    distances = _hull_distances(rows, cols, x0, y0)

    if quantile is None:
        quantile = float(rng.choice(R_EFF_QUANTILES))
    ellipticity = float(rng.uniform(0.0, MAX_ELLIPTICITY))
    position_angle = float(rng.uniform(0.0, 2.0 * np.pi))
    blob_area = int(blob.sum())
    while True:
        r_eff = max(float(np.quantile(distances, quantile)), 0.5)
        unclipped = exponential_profile(image.shape, x0, y0, threshold, r_eff, ellipticity, position_angle)
        extent = int((unclipped > faint_limit).sum())
        if extent <= MAX_AREA_RATIO * blob_area or quantile <= 0.0:
            break
        quantile = max(0.0, quantile - QUANTILE_STEP)

    galaxies = clean > threshold
    profile = np.minimum(unclipped, threshold)
    profile[galaxies] = 0.0
    background = clean[~galaxies & ~bad]
    from astropy.stats import mad_std

    sigma = float(mad_std(background)) if background.size else 0.0
    noise = (rng.standard_normal(image.shape) * sigma * (profile / threshold)).astype(np.float32)
    injected = image * (1.0 - profile / threshold) + profile + noise
    injected = np.where(galaxies, image, injected).astype(np.float32)

    aperture = profiles.disc_mask(image.shape, (width - 1) / 2.0, (height - 1) / 2.0, min(height, width) / 2.0)
    usable = aperture & ~bad
    injected_flux = float(profile[usable].sum(dtype=np.float64))
    total_flux = float(np.clip(injected[usable], 0.0, None).sum(dtype=np.float64))
    params = dict(
        z=float(z),
        threshold_counts=threshold,
        faint_limit_counts=faint_limit,
        centre_x=x0,
        centre_y=y0,
        blob_area_px=blob_area,
        quantile=quantile,
        r_eff_px=r_eff,
        ellipticity=ellipticity,
        position_angle=position_angle,
        noise_sigma=sigma,
        icl_flux_aperture=injected_flux,
        f_icl_injected=injected_flux / total_flux if total_flux > 0 else 0.0,
    )
    return InjectionResult(injected, profile.astype(np.float32), noise, segmentation, params)


def _hull_distances(rows, cols, x0, y0):
    points = np.column_stack([cols, rows]).astype(float)
    try:
        from scipy.spatial import ConvexHull

        vertices = points[ConvexHull(points).vertices]
    except Exception:  # degenerate (collinear) blobs have no 2-D hull: all their pixels bound them
        vertices = points
    return np.hypot(vertices[:, 0] - x0, vertices[:, 1] - y0)


def resize_cutout(cutout, size=hsc.ICL_IMAGE_SIZE):
    """Pad a :class:`prep_data.Cutout` to a square and resize image and mask to (size, size).

    The image stays in counts per native pixel (the resize averages); each mask plane is
    resized as :func:`prep_data.resize_mask` does, padding flagged NO_DATA.

    Returns
    -------
    image : ndarray of float32, shape (size, size)
    mask : ndarray of int32, shape (size, size)
    """
    image = np.asarray(cutout.image, dtype=np.float32)
    if image.ndim != 2:
        raise InjectionError(f"{cutout.ref.source}: image must be 2-D, got shape {image.shape}")
    mask = np.zeros(image.shape, np.int64) if cutout.mask is None else np.asarray(cutout.mask).astype(np.int64)
    bits = cutout.mask_bits
    non_finite = ~np.isfinite(image)
    image = np.where(non_finite, 0.0, image).astype(np.float32)
    no_data = non_finite | ((mask & (1 << int(bits["NO_DATA"]))) != 0)
    image, no_data = prep_data.pad_to_square(image, no_data)
    resized = prep_data.resize_image(image, size)
    out_mask = np.zeros((size, size), np.int32)
    out_mask[prep_data.resize_mask(no_data, size)] |= 1 << hsc.DEFAULT_MASK_BITS["NO_DATA"]
    for plane in ("BAD", "BRIGHT_OBJECT"):
        flagged = (mask & (1 << int(bits[plane]))) != 0
        flagged, _ = prep_data.pad_to_square(flagged.astype(np.float32), np.zeros(flagged.shape, bool))
        out_mask[prep_data.resize_mask(flagged > 0.5, size)] |= 1 << hsc.DEFAULT_MASK_BITS[plane]
    return resized, out_mask


# ----------------------------------------------------------------------------------------
# Command line: inject into every cutout of some files


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m data.injection",
        description="Inject ICL (Canepa et al. 2025) into cutouts read by prep_data; write a stacked HDF5 file.",
    )
    parser.add_argument("inputs", nargs="+", help="FITS or HDF5 cutouts (files or directories); each needs a redshift")
    parser.add_argument("--out", required=True, help="output HDF5 file (stacked layout, 224 x 224)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--z", type=float, help="redshift for cutouts whose metadata has none")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from tqdm import tqdm

    try:
        refs, errors = prep_data.index_cutouts(args.inputs)
    except prep_data.CutoutError as error:
        parser.exit(2, f"error: {error}\n")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        parser.exit(2, f"error: --out {args.out}: directory {out_dir} does not exist or is not writable\n")
    images, masks, ids, columns = [], [], [], {"z": [], "f_icl_injected": [], "params": []}
    for index, ref in enumerate(tqdm(refs, desc="injecting", unit="cutout", disable=len(refs) < 20)):
        try:
            cutout = prep_data.read_cutout(ref)
            z = cutout.meta.get("z", args.z)
            if z is None:
                raise InjectionError(f"{ref.source}: no redshift in the metadata; pass --z")
            image, mask = resize_cutout(cutout)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = inject_icl(image, float(z), mask, seed=np.random.default_rng([args.seed, index]))
        except (prep_data.CutoutError, InjectionError) as error:
            errors.append((ref.source, str(error)))
            continue
        images.append(result.image.astype(np.float16))
        masks.append(mask)
        ids.append(ref.id)
        columns["z"].append(float(z))
        columns["f_icl_injected"].append(result.params["f_icl_injected"])
        columns["params"].append(json.dumps(result.params, sort_keys=True))
    for source, message in errors:
        print(f"error: {message}", file=sys.stderr)
    if not images:
        parser.exit(1, "error: no cutout could be injected\n")
    data.files.write_stacked_hdf5(args.out, np.stack(images), np.stack(masks), ids, columns, pixel_scale=hsc.PIXEL_SCALE)
    print(f"wrote {len(images)} injected cutouts to {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
