"""Inject an intracluster-light profile into a cutout, as Canepa et al. (2025) built their training set.

The paper injected ICL into real HSC cutouts centred on luminous red galaxies; this module does
the same to any cutout in counts per native pixel: an ICL-free mock from
:mod:`data.clusters` (``python -m data.generate backgrounds``) or a real cutout read by
:mod:`prep_data`. The steps (SPEC Part A, "Artificial training images") follow the paper's own
injection code:

1. Threshold: the counts of mu = 25 + 10 log10(1 + z) + k(z). Sources above it with at least
   20 8-connected pixels are detected (photutils). Touching sources are split: the detection
   footprint is eroded once by a 3 x 3 square, its 4-connected eroded pieces seed a watershed of
   the negative distance transform inside the footprint, the watershed labels are offset by the
   largest detection label, and footprint pixels the flood does not reach keep their detection
   label.
2. The central blob is the set of pixels above the threshold that carry the label of pixel
   (H // 2, W // 2). Its centre is the unweighted mean row and column of those pixels, each
   truncated to an integer.
3. Profile: elliptical exponential (astropy ``Sersic2D`` with n = 1 at integer pixel
   coordinates) whose surface brightness at r_eff is the threshold. r_eff is a quantile, drawn
   from {0, 0.25, 0.5, 1}, of the distances from the centre to the convex-hull vertices of the
   blob after a binary opening by a 2 x 2 square. Each try draws a new ellipticity ~ U(0, 0.5)
   and position angle ~ U(0, 2 pi). A try is rejected when the pixels of its step-4 profile
   brighter than mu = 30.2 + 10 log10(1 + z) (no k-correction) number more than 8 times the
   blob's pixels; the next try uses the quantile 0.25 lower. The try at quantile 0 is kept
   whatever its area.
4. The profile is clipped at the threshold and set to zero on pixels above the threshold.
5. Noise: Gaussian with the astropy ``mad_std`` of the whole image in which pixels above the
   threshold are set to zero (those zeros count), times profile / threshold.
6. The image is faded by (1 - profile / threshold) and the noisy profile added; pixels above
   the threshold keep their values.

The random draws come in the paper's order: the quantile, then ellipticity and angle at every
try, then the noise field. The paper drew them from NumPy's legacy global generator, so a
``numpy.random.RandomState`` passed as ``seed`` reproduces its injection after
``numpy.random.seed`` with the same seed.

Where the paper's code fails or had no such input, this module does the following instead:

* pixels without data (BAD or NO_DATA in the HSC mask plane, or non-finite) are set to zero
  for steps 1-4 and left out of the noise estimate of step 5, while step 6 fades their own
  values (the paper's code took no mask, and a non-finite pixel made its whole image NaN,
  where here it stays non-finite alone). BRIGHT_OBJECT pixels hold real light and
  are used as the paper's code used them; all three planes are left out of ``f_icl_injected``;
* a centre pixel outside every segment raises :class:`InjectionError` (the paper's code then
  took every bright pixel outside the segments as the central blob);
* a blob with no 2 x 2 square uses its own pixels for the hull, and a hull that qhull cannot
  build (collinear or fewer than three points) uses all the points (the paper's code crashed);
* r_eff = 0 (the centre is itself a hull vertex, or a point of a blob with no hull; possible
  only at quantile 0) raises :class:`InjectionError` (the paper's profile was then NaN at the
  centre and zero elsewhere).

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
#: Surface brightness (mag/arcsec^2, before Tolman dimming; no k-correction) bounding the profile's extent.
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
#: Erosions by a 3 x 3 square that separate touching sources before the watershed.
EROSION_STEPS = 1
#: Side (pixels) of the square that opens the central blob before its convex hull is taken.
OPENING_SIZE = 2
#: Mask planes whose pixels hold no data: zero for the injection, left out of the noise estimate.
NO_DATA_PLANES = ("BAD", "NO_DATA")


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
        Source labels after the watershed split (0: background; see :func:`segment_sources`).
    params : dict
        Threshold and faint limit (counts), centre (x, y: integer pixels), blob area (pixels),
        the quantile drawn (``quantile_start``) and the one kept (``quantile``), r_eff (pixels),
        the kept profile's area ratio, ellipticity, position angle (radians), noise sigma
        (counts), the injected flux in the 300 kpc aperture and the fraction it makes of the
        aperture's flux (``f_icl_injected``).
    """

    image: np.ndarray
    profile: np.ndarray
    noise: np.ndarray
    segmentation: np.ndarray
    params: dict


def exponential_profile(shape, x0, y0, amplitude, r_eff, ellipticity, position_angle):
    """Elliptical exponential (Sersic n = 1) surface brightness at integer pixel coordinates.

    I(r) = amplitude * exp(-b_1 (r / r_eff - 1)), b_1 = 1.678, r the elliptical radius along the
    major axis with axis ratio 1 - ellipticity: astropy's ``Sersic2D(n=1)`` evaluated at
    x = column, y = row.

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
        1 - b / a, in [0, 1).
    position_angle : float
        Major axis angle from +x towards +y (radians).

    Returns
    -------
    ndarray of float32, shape (H, W)
    """
    return _exponential(shape, x0, y0, amplitude, r_eff, ellipticity, position_angle).astype(np.float32)


def _exponential(shape, x0, y0, amplitude, r_eff, ellipticity, position_angle):
    # float64, as astropy evaluates the paper's model; the area test compares these values.
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    r2 = profiles.elliptical_radius_squared(xx - x0, yy - y0, 1.0 - ellipticity, position_angle)
    b = float(profiles.sersic_b(1.0))
    return profiles.sersic_intensity(r2 * (1.0 / r_eff**2), amplitude, 1.0, b, dtype=np.float64)


def segment_sources(image, threshold, bad=None, min_pixels=MIN_SOURCE_PIXELS, erosion_steps=EROSION_STEPS):
    """Sources above ``threshold`` (photutils), touching ones split by erosion and watershed.

    The detection footprint (``min_pixels`` 8-connected pixels brighter than ``threshold``) is
    eroded ``erosion_steps`` times by a 3 x 3 square (pixels beyond the edge count as inside).
    Each 4-connected piece of what remains seeds a watershed of the negative distance transform
    of the footprint, flooded inside the footprint, so that two overlapping round sources split
    along their neck.

    Returns
    -------
    ndarray of int32, shape (H, W)
        0 on the background; a flooded pixel holds its watershed label plus the largest
        detection label, a footprint pixel no seed reaches (a source thinner than the erosion)
        its detection label. Labels are distinct per source but not consecutive.
    """
    from photutils.segmentation import detect_sources
    from scipy import ndimage
    from skimage.segmentation import watershed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no sources found" is an answer here, not a problem
        segments = detect_sources(image, threshold, n_pixels=min_pixels, mask=bad)
    if segments is None:
        return np.zeros(image.shape, dtype=np.int32)
    labels = segments.data.astype(np.int32)
    footprint = labels > 0
    square = np.ones((3, 3), dtype=bool)
    cores = ndimage.binary_erosion(footprint, structure=square, iterations=erosion_steps, border_value=1)
    seeds, _ = ndimage.label(cores)
    distance = ndimage.distance_transform_edt(footprint)
    split = watershed(-distance, seeds, mask=footprint)
    return np.where(split > 0, split + labels.max(), labels).astype(np.int32)


def inject_icl(image, z, mask=None, mask_bits=None, seed=None, quantile=None):
    """Inject an ICL profile into one cutout (SPEC Part A, steps 1-6 of the module docstring).

    Parameters
    ----------
    image : ndarray, shape (H, W)
        Counts per native HSC pixel (zero point 27), the cluster or galaxy at the centre.
        Not modified.
    z : float
        Redshift of the central galaxy, in [0.1, 0.5].
    mask : ndarray of int, shape (H, W), optional
        HSC mask plane. BAD | NO_DATA pixels are set to zero for steps 1-4 and left out of the
        noise estimate (the profile is still added there); BAD | NO_DATA | BRIGHT_OBJECT pixels
        are left out of ``f_icl_injected``.
    mask_bits : dict, optional
        Mask plane bit numbers (default ``hsc.DEFAULT_MASK_BITS``).
    seed : int, numpy.random.Generator or numpy.random.RandomState, optional
        Randomness of the quantile, shape and noise. A ``RandomState`` makes the same draws as
        the paper's code made from the legacy global generator in the same state.
    quantile : float, optional
        Start from this quantile instead of drawing one from ``R_EFF_QUANTILES`` (no draw is
        made for it).

    Returns
    -------
    InjectionResult

    Raises
    ------
    InjectionError
        If the image is not 2-D, holds no finite unmasked pixels, has no source above the
        threshold at its centre pixel, or its central blob gives r_eff = 0.
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
    if isinstance(seed, np.random.Generator | np.random.RandomState):
        rng = seed
    else:
        rng = np.random.default_rng(seed)
    bad = ~np.isfinite(image)
    masked = bad.copy()
    if mask is not None:
        flags = np.asarray(mask).astype(np.int64)
        bits = mask_bits or hsc.DEFAULT_MASK_BITS
        bad |= (flags & hsc.mask_value(bits, NO_DATA_PLANES)) != 0
        masked |= (flags & hsc.mask_value(bits)) != 0
    if masked.all():
        raise InjectionError("background cutout is entirely masked (BAD | NO_DATA | BRIGHT_OBJECT or non-finite)")
    clean = np.where(bad, 0.0, image).astype(np.float64)

    # Step 1: threshold and segmentation.
    threshold = float(hsc.sb_to_counts(hsc.observed_surface_brightness(THRESHOLD_SB_REST, z)))
    faint_limit = float(hsc.sb_to_counts(FAINT_LIMIT_SB_REST + 10.0 * np.log10(1.0 + z)))
    segmentation = segment_sources(clean, threshold, bad)
    galaxies = clean > threshold

    # Step 2: the central blob and its centre.
    height, width = image.shape
    label = int(segmentation[height // 2, width // 2])
    if label == 0:
        raise InjectionError(
            f"no source brighter than the threshold ({threshold:.4g} counts, mu = {THRESHOLD_SB_REST} rest frame) "
            f"covers the image centre (pixel row {height // 2}, column {width // 2})"
        )
    blob = galaxies & (segmentation == label)
    blob_area = int(blob.sum())
    rows, cols = np.nonzero(blob)
    y0, x0 = int(rows.sum()) // blob_area, int(cols.sum()) // blob_area
    distances = _hull_distances(blob, y0, x0)

    # Steps 3-4: tries of shrinking r_eff until the profile is compact enough.
    quantile_start = float(rng.choice(R_EFF_QUANTILES)) if quantile is None else float(quantile)
    quantile = quantile_start
    while True:
        r_eff = float(np.quantile(distances, quantile))
        ellipticity = float(rng.uniform(0.0, MAX_ELLIPTICITY))
        position_angle = float(rng.uniform(0.0, 2.0 * np.pi))
        if r_eff <= 0.0:
            raise InjectionError(
                f"r_eff = 0: the central blob's centre (row {y0}, column {x0}) is one of the points bounding it"
            )
        profile = np.minimum(_exponential(image.shape, x0, y0, threshold, r_eff, ellipticity, position_angle),
                             threshold)
        profile[galaxies] = 0.0
        extent = int(np.count_nonzero(profile > faint_limit))
        if extent <= MAX_AREA_RATIO * blob_area or quantile < QUANTILE_STEP:
            break
        quantile -= QUANTILE_STEP

    # Step 5: noise scaled by the profile.
    from astropy.stats import mad_std

    sky = np.where(galaxies, 0.0, clean)[~bad]
    sigma = float(mad_std(sky))
    weight = profile / threshold
    noise = rng.normal(0.0, sigma, image.shape) * weight

    # Step 6: fade the background under the profile and add it.
    faded = image * (1.0 - weight)
    injected = np.where(galaxies, image, faded + (profile + noise)).astype(np.float32)

    aperture = profiles.disc_mask(image.shape, (width - 1) / 2.0, (height - 1) / 2.0, min(height, width) / 2.0)
    usable = aperture & ~masked
    injected_flux = float(profile[usable].sum(dtype=np.float64))
    total_flux = float(np.clip(injected[usable], 0.0, None).sum(dtype=np.float64))
    params = {
        "z": float(z),
        "threshold_counts": threshold,
        "faint_limit_counts": faint_limit,
        "centre_x": float(x0),
        "centre_y": float(y0),
        "blob_area_px": blob_area,
        "quantile_start": quantile_start,
        "quantile": quantile,
        "r_eff_px": r_eff,
        "area_ratio": extent / blob_area,
        "ellipticity": ellipticity,
        "position_angle": position_angle,
        "noise_sigma": sigma,
        "icl_flux_aperture": injected_flux,
        "f_icl_injected": injected_flux / total_flux if total_flux > 0 else 0.0,
    }
    return InjectionResult(injected, profile.astype(np.float32), noise.astype(np.float32), segmentation, params)


def _hull_distances(blob, row0, col0):
    """Distances from (row0, col0) to the convex-hull vertices of ``blob`` opened by a 2 x 2 square."""
    from scipy import ndimage
    from scipy.spatial import ConvexHull, QhullError

    square = np.ones((OPENING_SIZE, OPENING_SIZE), dtype=bool)
    # Erosion counts pixels beyond the edge as inside, as skimage's binary opening does.
    opened = ndimage.binary_dilation(ndimage.binary_erosion(blob, structure=square, border_value=1), structure=square)
    points = np.argwhere(opened)
    if len(points) == 0:  # no 2 x 2 square fits in the blob: its own pixels bound it
        points = np.argwhere(blob)
    try:
        points = points[ConvexHull(points.astype(np.float64)).vertices]
    except QhullError:  # collinear or too few points: no 2-D hull, all of them bound the blob
        pass
    return np.hypot(points[:, 0] - row0, points[:, 1] - col0)


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
