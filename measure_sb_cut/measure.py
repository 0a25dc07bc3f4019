"""Automatic surface-brightness threshold measurement of the ICL fraction: this project's redesign.

``python -m measure_sb_cut --method improved``. The method of Canepa et al. 2025 (ApJ,
arXiv:2501.08378; SPEC Part A), which labelled the artificial training set, redesigned in the
choices listed below; :mod:`measure_sb_cut.canepa2025` does exactly what the original code did
(the command's default). The steps:

1. subtract the background (``Background2D`` mesh, a smooth surface through its outer ring,
   then 2/3 of the faintest annulus mean);
2. segment galaxies: at least 10 connected pixels brighter than the threshold
   mu = 26 + 10 log10(1 + z) + k(z) mag/arcsec^2;
3. mask compact "hot" sources found in an unsharp-masked copy;
4. drop pixels fainter than the 3-sigma surface-brightness limit in 10 x 10 arcsec boxes;
5. keep the circle of radius 300 kpc about the centre;
6. f_ICL = counts of the kept pixels outside the galaxy segments / counts of all kept pixels.

Choices the published description leaves open, made here so that noise does not bias the
fraction (each is a parameter; see VALIDATION.md for what they do on mocks):

* the sky boxes leave out sources above the threshold, grown by
  ``measurement_helpers.SOURCE_MASK_GROWTH_PX``;
* galaxies are segmented on a copy smoothed by a Gaussian of
  ``measurement_helpers.SEGMENT_SMOOTHING_PX``, so that the galaxy/ICL split follows the light
  rather than the noise (the fluxes are summed on the unsmoothed image);
* hot sources must reach the signal-to-noise ratio ``measurement_helpers.HOT_MIN_SNR`` (with
  the correlated noise of resized images), so that groups of noise peaks above 1.2 sigma are
  not masked; they are not masked inside galaxy segments, where they are galaxy light;
* "below the surface-brightness limit" is judged on the mean of each 10 x 10 arcsec box.

Pixel convention: a square cutout (224 x 224 by default) spanning +-300 kpc, in counts per
*native* HSC pixel; thresholds in counts use ``hsc.PIXEL_SCALE`` whatever the resize, and
flux sums are converted to total counts with the area of a cutout pixel.
"""

import logging
import os

import numpy as np

import common
import hsc
import parallel
from measure_sb_cut import measurement_helpers as helpers
from measure_sb_cut.measurement_helpers import MAX_MASKED_FRACTION, SBMeasurement

logger = logging.getLogger(__name__)

#: Background2D box sides (cutout pixels) of the re-estimates whose spread enters the error.
REESTIMATE_BOX_SIZES = (14, 28)
def check_options(threshold_sb, aperture_kpc, half_width_kpc, background_box_size):
    """Raise ValueError (one line) for measurement settings no cutout can be measured with."""
    if not np.isfinite(threshold_sb):
        raise ValueError(f"threshold_sb must be a number of mag/arcsec^2, got {threshold_sb}")
    for name, value in (("aperture_kpc", aperture_kpc), ("half_width_kpc", half_width_kpc)):
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number of kpc, got {value}")
    if aperture_kpc > half_width_kpc:
        raise ValueError(
            f"cutout smaller than the aperture: the aperture radius {aperture_kpc:g} kpc exceeds the "
            f"cutout half-width {half_width_kpc:g} kpc"
        )
    if background_box_size < 1:
        raise ValueError(f"background_box_size must be at least 1 pixel, got {background_box_size}")


def measure_icl_fraction(
    image,
    z,
    mask=None,
    mask_bits=None,
    *,
    threshold_sb=helpers.MEASUREMENT_SB,
    cosmology=helpers.MEASUREMENT_COSMOLOGY,
    aperture_kpc=helpers.APERTURE_KPC,
    half_width_kpc=hsc.CUTOUT_HALF_WIDTH_KPC,
    pixel_scale=hsc.PIXEL_SCALE,
    background_box_size=helpers.BACKGROUND_BOX_PX,
    reestimate_box_sizes=REESTIMATE_BOX_SIZES,
    segment_smoothing_px=helpers.SEGMENT_SMOOTHING_PX,
    hot_min_snr=helpers.HOT_MIN_SNR,
    extra_mask=None,
    keep_maps=False,
):
    """Measure the ICL fraction of a cluster cutout with the surface-brightness threshold method.

    Parameters
    ----------
    image : array_like, shape (N, N)
        Square cutout spanning +-``half_width_kpc`` about the cluster centre (224 x 224 in this
        project), in counts per native pixel of ``pixel_scale`` arcsec (zero point 27).
        Non-finite pixels are treated as masked.
    z : float
        Cluster redshift, in [0.1, 0.5].
    mask : array_like of int or bool, shape (N, N), optional
        HSC mask plane (BAD, NO_DATA and BRIGHT_OBJECT pixels are left out) or a boolean map
        of bad pixels.
    mask_bits : dict of str -> int, optional
        Mask plane bit numbers; ``hsc.DEFAULT_MASK_BITS`` by default.
    threshold_sb : float
        Rest-frame threshold between galaxies and ICL, mag/arcsec^2 (26 for the measurement,
        ``helpers.INJECTION_SB`` = 25 is the injection's).
    cosmology : astropy.cosmology.FLRW
        Converts kpc to arcsec; FlatLambdaCDM(H0=68.4, Om0=0.301) by default.
    aperture_kpc : float
        Radius of the measurement aperture, kpc (must fit in the cutout).
    half_width_kpc : float
        Half-width of the cutout, kpc.
    pixel_scale : float
        Native pixel scale (arcsec/px) of the counts, for the surface-brightness conversions.
    background_box_size : int
        Background2D box side, cutout pixels.
    reestimate_box_sizes : sequence of int
        Box sides of the background re-estimates; the standard deviation of f_icl over the
        main and re-estimated backgrounds is the background error. Empty to skip (faster).
    segment_smoothing_px : float
        Gaussian sigma (cutout pixels) of the smoothing before the galaxies are segmented; 0
        thresholds the raw pixels (see ``measurement_helpers.segment_galaxies``).
    hot_min_snr : float
        Hot (compact) sources fainter than this signal-to-noise ratio are noise and stay
        unmasked; 0 masks every detection (see ``measurement_helpers.hot_mask``).
    extra_mask : array_like of bool, shape (N, N), optional
        More pixels to leave out of both fluxes (non-member galaxies, stars).
    keep_maps : bool
        Keep the masks and the background-subtracted image in ``SBMeasurement.maps``.

    Returns
    -------
    SBMeasurement

    Raises
    ------
    ValueError
        With a message naming the problem: bad shape, z missing or outside [0.1, 0.5], an
        aperture larger than the cutout, every aperture pixel masked, a background estimate
        that failed, no positive light in the aperture, an ICL fraction outside [0, 1], a non-finite
        surface-brightness limit, or more than MAX_MASKED_FRACTION of the aperture masked.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {image.shape}")
    if image.shape[0] != image.shape[1]:
        raise ValueError(
            f"image must be square (pad it with prep_data.pad_to_square first), got shape {image.shape}"
        )
    z = helpers.check_redshift(z)
    check_options(threshold_sb, aperture_kpc, half_width_kpc, background_box_size)
    if mask is not None and np.shape(mask) != image.shape:
        raise ValueError(f"mask shape {np.shape(mask)} does not match image shape {image.shape}")
    if extra_mask is not None and np.shape(extra_mask) != image.shape:
        raise ValueError(f"extra_mask shape {np.shape(extra_mask)} does not match image shape {image.shape}")

    size = image.shape[0]
    bad = helpers.bad_pixel_map(image, mask, mask_bits)
    n_non_finite = int((~np.isfinite(image)).sum())
    if n_non_finite:
        logger.warning("%d non-finite pixels treated as masked", n_non_finite)
    extra = np.zeros(image.shape, dtype=bool) if extra_mask is None else np.asarray(extra_mask, dtype=bool)
    radius_px = aperture_kpc / half_width_kpc * size / 2.0
    in_aperture = helpers.aperture(image.shape, radius_px)
    if not (in_aperture & ~bad & ~extra).any():
        raise ValueError("all pixels inside the aperture are masked")

    cutout_scale = helpers.cutout_pixel_scale(z, size, half_width_kpc, cosmology)
    threshold_mu = float(hsc.observed_surface_brightness(threshold_sb, z))
    threshold = float(hsc.sb_to_counts(threshold_mu, pixel_scale))
    # Flux sums over cutout pixels of counts per native pixel: multiply by the pixel area ratio.
    area_factor = (cutout_scale / pixel_scale) ** 2

    # Pixels masked by the caller (stars, non-members) stay out of the sky estimate too.
    unusable = bad | extra
    subtracted, _ = helpers.subtract_background(image, unusable, threshold, background_box_size)
    masked_fraction = float((in_aperture & (bad | extra)).sum() / in_aperture.sum())
    if masked_fraction > MAX_MASKED_FRACTION:
        raise ValueError(
            f"{masked_fraction:.0%} of the pixels inside {aperture_kpc:g} kpc are masked or not finite "
            f"(at most {MAX_MASKED_FRACTION:.0%} allowed): too little of the cluster is left to measure"
        )
    galaxies = helpers.segment_galaxies(subtracted, threshold, bad, segment_smoothing_px)
    # Compact sources inside a galaxy segment are galaxy light already; masking them there
    # would take a bright core out of the total flux.
    hot = helpers.hot_mask(subtracted, unusable, min_snr=hot_min_snr) & ~galaxies
    excluded = bad | extra | hot
    rms = helpers.pixel_rms(subtracted, excluded | galaxies)
    limit, box_px = helpers.surface_brightness_limit(rms, cutout_scale)

    dropped = helpers.below_limit(subtracted, ~excluded, limit, box_px) & ~galaxies
    kept = in_aperture & ~excluded & ~dropped
    if not kept.any():
        raise ValueError("all pixels inside the aperture are masked or below the surface-brightness limit")
    icl = kept & ~galaxies
    icl_sum, total_sum = float(subtracted[icl].sum()), float(subtracted[kept].sum())
    if not np.isfinite(total_sum) or total_sum <= 0:
        raise ValueError(
            f"{'negative' if total_sum < 0 else 'no'} total light inside {aperture_kpc:g} kpc "
            f"(sum {total_sum:.3g} counts per pixel): "
            "over-subtracted background or bad pixels"
        )
    f_icl = icl_sum / total_sum
    if not 0.0 <= f_icl <= 1.0:
        raise ValueError(
            f"ICL fraction {f_icl:.3g} outside [0, 1]: negative light "
            f"{'outside' if icl_sum < 0 else 'in'} the galaxies inside {aperture_kpc:g} kpc "
            f"(ICL {icl_sum:.3g}, total {total_sum:.3g} counts per pixel): over-subtracted background or bad pixels"
        )
    sb_limit = float(hsc.counts_to_sb(limit, pixel_scale))
    if not np.isfinite(sb_limit) or not np.isfinite(rms) or rms <= 0:
        raise ValueError(
            f"surface-brightness limit not finite (noise rms {rms:.3g} counts per pixel): "
            "the sky near the edges is constant or holds bad pixels"
        )
    if sb_limit < threshold_mu:
        raise ValueError(
            f"surface-brightness limit {sb_limit:.2f} mag/arcsec^2 is brighter than the threshold "
            f"{threshold_mu:.2f} (noise rms {rms:.3g} counts per pixel): bad pixels or noise swamp the ICL"
        )

    # Background re-estimates: the sky and the galaxy/ICL split move with the background; the
    # pixels below the surface-brightness limit (a noise property) are kept from the main run.
    fractions = [f_icl]
    for box_size in reestimate_box_sizes:
        try:
            other, _ = helpers.subtract_background(image, unusable, threshold, box_size)
        except ValueError as error:
            logger.debug("background re-estimate with %d px boxes skipped: %s", box_size, error)
            continue
        other_galaxies = helpers.segment_galaxies(other, threshold, bad, segment_smoothing_px)
        other_kept = in_aperture & ~excluded & ~(dropped & ~other_galaxies)
        other_total = float(other[other_kept].sum())
        if other_total > 0:
            fractions.append(float(other[other_kept & ~other_galaxies].sum()) / other_total)
    background_err = float(np.std(fractions, ddof=1)) if len(fractions) > 1 else 0.0

    n_icl = int(icl.sum())
    n_galaxy = int(kept.sum()) - n_icl
    # rms x sqrt(N pixels), with N counted in independent noise elements of the resized image.
    correlation_area = helpers.noise_correlation_area(subtracted, excluded | galaxies)
    icl_err = rms * np.sqrt(n_icl * correlation_area)
    galaxy_err = rms * np.sqrt(n_galaxy * correlation_area)
    galaxy_sum = total_sum - icl_sum
    # f = I / (I + G) with independent I and G: df/dI = G / T^2, df/dG = -I / T^2.
    noise_err = float(np.hypot(galaxy_sum * icl_err, icl_sum * galaxy_err) / total_sum**2)

    maps = None
    if keep_maps:
        maps = {
            "subtracted": subtracted,
            "bad": bad,
            "extra": extra,
            "galaxies": galaxies,
            "hot": hot,
            "dropped": dropped,
            "aperture": in_aperture,
            "threshold_counts": threshold,
            "smoothed": helpers.smooth(subtracted, bad, segment_smoothing_px),
        }
    return SBMeasurement(
        f_icl=float(f_icl),
        f_icl_err=float(np.hypot(noise_err, background_err)),
        icl_flux=icl_sum * area_factor,
        total_flux=total_sum * area_factor,
        sb_limit=sb_limit,
        threshold_sb=threshold_mu,
        f_icl_err_noise=noise_err,
        f_icl_err_background=background_err,
        icl_flux_err=float(icl_err * area_factor),
        pixel_rms=rms,
        n_icl_pixels=n_icl,
        n_kept_pixels=int(kept.sum()),
        z=z,
        maps=maps,
    )


def plot_measurement(image, measurement, path, title=None):
    """Diagnostic PNG of one measurement: the image, the masks, the threshold contour, the aperture.

    Parameters
    ----------
    image : ndarray, shape (N, N)
        The cutout measured (counts).
    measurement : SBMeasurement
        Made with ``keep_maps=True``.
    path : str or path-like
        PNG to write (atomically).
    title : str, optional
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Circle, Patch

    import plots

    maps = measurement.maps
    if maps is None:
        raise ValueError("measurement has no maps: measure with keep_maps=True")
    stretched = np.arcsinh(np.clip(np.nan_to_num(maps["subtracted"]), 0, None) / hsc.ARCSINH_SCALE)
    figure, axes = plots.new_figure(1, 2, figsize=(11, 5.6), layout="constrained")
    for axis in axes:
        axis.imshow(stretched, origin="lower", cmap="gray", vmin=0, vmax=np.percentile(stretched, 99.5))
        axis.set_xticks([])
        axis.set_yticks([])
    layers = [
        ("bad", "masked (mask plane)", "tab:red"),
        ("extra", "masked (members / stars)", "tab:orange"),
        ("galaxies", "galaxies (above threshold)", "tab:blue"),
        ("hot", "hot (compact sources)", "tab:green"),
        ("dropped", "below SB limit", "tab:purple"),
    ]
    handles = []
    for key, label, colour in layers:
        layer = maps[key]
        if layer.any():
            axes[1].imshow(
                np.where(layer, 1.0, np.nan), origin="lower", cmap=ListedColormap([colour]), alpha=0.45, vmin=0, vmax=1
            )
            handles.append(Patch(color=colour, alpha=0.6, label=label))
    centre = (image.shape[0] - 1) / 2.0
    radius = np.sqrt(maps["aperture"].sum() / np.pi)
    for axis in axes:
        axis.add_patch(Circle((centre, centre), radius, fill=False, color="yellow", lw=1.2))
        axis.contour(maps["smoothed"], levels=[maps["threshold_counts"]], colors="cyan", linewidths=0.8)
        axis.set_xlim(-0.5, image.shape[1] - 0.5)
        axis.set_ylim(-0.5, image.shape[0] - 0.5)
    handles += [
        Patch(edgecolor="yellow", fill=False, label="aperture"),
        Patch(edgecolor="cyan", fill=False, label=f"threshold {measurement.threshold_sb:.2f} mag/arcsec$^2$"),
    ]
    axes[1].legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.8)
    axes[0].set_title(f"{title}: background subtracted" if title else "background subtracted", fontsize=10)
    axes[1].set_title(
        f"z = {measurement.z:.3f}, f_ICL = {measurement.f_icl:.3f} +- {measurement.f_icl_err:.3f}, "
        f"SB limit {measurement.sb_limit:.2f} mag/arcsec$^2$",
        fontsize=10,
    )
    plots.save_figure(figure, path, dpi=90, tight=False)


# ----------------------------------------------------------------------------------------
# Measuring cutouts read from files (the command line, the validation and the benchmark)

#: Columns of the measurement CSV, in order.
CSV_COLUMNS = (
    "id",
    "source",
    "z",
    "f_icl",
    "f_icl_err",
    "icl_flux",
    "total_flux",
    "sb_limit",
    "threshold_sb",
    "f_icl_err_noise",
    "f_icl_err_background",
    "method",
    "error",
)
#: Methods of :func:`measure_ref`: the original code's (``measure_sb_cut.canepa2025``) and this
#: project's redesign (:func:`measure_icl_fraction`).
METHODS = ("canepa2025", "improved")
#: Relative tolerance on the span of a native-resolution cutout (cosmologies of the cutouts differ).
SPAN_TOLERANCE = 0.1


def write_csv(rows, path, columns=CSV_COLUMNS):
    """Write measurement rows (dicts) to the CSV ``path``, atomically; NaN becomes an empty field."""
    import csv

    import common

    def cell(value):
        if isinstance(value, float):
            return "" if np.isnan(value) else f"{value:.6g}"
        return value

    with common.atomic_write(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: cell(value) for key, value in row.items()})


def cutout_for_measurement(
    cutout, z, half_width_kpc=hsc.CUTOUT_HALF_WIDTH_KPC, cosmology=helpers.MEASUREMENT_COSMOLOGY, method="improved",
    mask_rule="any",
):
    """The 224 x 224 image and bad-pixel map of a cutout read by ``prep_data.read_cutout``.

    With ``method="canepa2025"`` only non-finite pixels are zeroed before the resize (the
    original resized the cutout as it was, and its background mesh and unsharp mask see the
    values under the mask); with ``"improved"`` every bad pixel is. ``mask_rule`` is
    :func:`prep_data.resize_mask`'s.

    A 224 x 224 cutout is taken as already resized (it spans +-``half_width_kpc``). Any other
    cutout is in native HSC pixels: non-square ones are padded to a square (the padding
    masked, as ``prep_data.pad_to_square`` does; with ``"canepa2025"`` only when the sides
    differ by more than 10%, the others are resized straight, as the original did), an axis
    longer than +-``half_width_kpc`` by more than 10% is cropped about the centre to that span,
    and the result is resized with ``prep_data.resize_image`` / ``prep_data.resize_mask``.

    Raises
    ------
    ValueError
        For a prepared (.npy) image, an empty or all-masked image, or a cutout that does not
        reach +-``half_width_kpc`` ("cutout smaller than the aperture").
    """
    import prep_data

    if cutout.prepared:
        raise ValueError("prepared (arcsinh-stretched) images cannot be measured; give cutouts in counts")
    prep_data.check_cutout(cutout)
    size = hsc.ICL_IMAGE_SIZE
    bad = prep_data.bad_pixels(cutout)
    zeroed = bad if method == "improved" else ~np.isfinite(cutout.image)
    image = np.where(zeroed, 0.0, cutout.image).astype(np.float32)
    if image.shape == (size, size):
        return image, bad
    height, width = image.shape
    # The original resized its (nearly square) cutouts straight to 224 x 224; a cutout cut short
    # by the survey's edge is padded instead, keeping the pixel scale of both axes.
    if method == "improved" or max(height, width) > (1.0 + SPAN_TOLERANCE) * min(height, width):
        image, bad = prep_data.pad_to_square(image, bad)
    span_px = 2.0 * half_width_kpc / helpers.kpc_per_arcsec(z, cosmology) / hsc.PIXEL_SCALE
    side = min(image.shape)
    if side < (1.0 - SPAN_TOLERANCE) * span_px:
        raise ValueError(
            f"cutout smaller than the aperture: {side} px x {hsc.PIXEL_SCALE}\"/px spans "
            f"{side * hsc.PIXEL_SCALE:.0f}\", but +-{half_width_kpc:g} kpc at z = {z:g} needs "
            f"{span_px * hsc.PIXEL_SCALE:.0f}\" ({span_px:.0f} px)"
        )
    crops = []
    for length in image.shape:
        if length > (1.0 + SPAN_TOLERANCE) * span_px:
            start = (length - int(round(span_px))) // 2
            crops.append(slice(start, start + int(round(span_px))))
        else:
            crops.append(slice(None))
    image, bad = image[tuple(crops)], bad[tuple(crops)]
    return prep_data.resize_image(image, size), prep_data.resize_mask(bad, size, mask_rule)


def plot_filename(ref, duplicate=False):
    """PNG name of a cutout's diagnostic plot: its id with characters outside [A-Za-z0-9._-] replaced.

    An id that had to be changed also gets a short hash of the id (``a/b`` and ``a_b`` never
    share a file), and an id that several cutouts share (``duplicate``) a short hash of the
    cutout's source, so that no plot overwrites another.
    """
    import hashlib

    identifier = str(ref.id)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in identifier).lstrip(".")[:100]
    if safe != identifier or not safe:
        safe = f"{safe}_{hashlib.sha1(identifier.encode()).hexdigest()[:8]}".lstrip("_")
    if duplicate:
        safe = f"{safe}_{hashlib.sha1(str(ref.source).encode()).hexdigest()[:8]}"
    return safe + ".png"


def method_label(method, fixes=None):
    """The ``method`` column of a row: the method's name, then ``+fix`` for each fix applied."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return "".join([method, *(f"+{fix}" for fix in sorted(fixes or ()))])


def measure_ref(ref, z=None, catalogue_z=None, plot_dir=None, options=None, meta_columns=(), plot_name=None):
    """Read and measure one cutout; never raises for a bad cutout.

    Parameters
    ----------
    ref : prep_data.CutoutRef
    z : float, optional
        Redshift for every cutout (the command line's ``--z``); first choice.
    catalogue_z : float, optional
        Redshift of this cutout from a catalogue; second choice, before the file's ``z``.
    plot_dir : str, optional
        Directory for a diagnostic PNG named ``plot_name`` (by default :func:`plot_filename`).
    options : dict, optional
        ``method`` (one of :data:`METHODS`, "improved" by default), then keyword arguments of
        :func:`measure_icl_fraction` ("improved") or of
        :func:`measure_sb_cut.canepa2025.measure_icl_fraction_canepa2025` ("canepa2025").
    meta_columns : sequence of str
        Metadata columns of the cutout to copy into the row (truth columns of mocks).

    Returns
    -------
    dict
        One CSV row (:data:`CSV_COLUMNS` plus ``meta_columns``); ``error`` holds the message of
        a cutout that could not be measured (its numbers are then NaN).
    """
    import prep_data

    options = dict(options or {})
    method = options.pop("method", "improved")
    row = {column: np.nan for column in CSV_COLUMNS}
    row.update(id=ref.id, source=ref.source, method=method_label(method, options.get("fixes")), error="")
    try:
        cutout = prep_data.read_cutout(ref)
        for column in meta_columns:
            row[column] = cutout.meta.get(column, np.nan)
        for candidate in (z, catalogue_z, cutout.meta.get("z")):
            if candidate is not None and not (isinstance(candidate, float) and np.isnan(candidate)):
                row["z"] = candidate
                break
        else:
            raise ValueError("no redshift: give --z, a --catalog row for this id, or a Z/REDSHIFT header keyword")
        redshift = helpers.check_redshift(row["z"])
        image, bad = cutout_for_measurement(
            cutout,
            redshift,
            options.get("half_width_kpc", hsc.CUTOUT_HALF_WIDTH_KPC),
            options.get("cosmology", helpers.MEASUREMENT_COSMOLOGY),
            method=method,
        )
        if method == "canepa2025":
            from measure_sb_cut.canepa2025 import (
                measure_icl_fraction_canepa2025 as measure_function,
            )
        else:
            measure_function = measure_icl_fraction
        measurement = measure_function(image, redshift, mask=bad, keep_maps=plot_dir is not None, **options)
    except ValueError as error:  # prep_data.CutoutError is a ValueError
        message = str(error)
        row["error"] = message if message.startswith(ref.source) else f"{ref.source}: {message}"
        return row
    except Exception as error:  # one broken cutout must not stop a batch of thousands
        logger.exception("%s: unexpected error", ref.source)
        row["error"] = f"{ref.source}: unexpected {type(error).__name__}: {error}"
        return row
    for column in CSV_COLUMNS[3:-2]:
        row[column] = getattr(measurement, column)
    if plot_dir is not None:
        plot_measurement(image, measurement, os.path.join(plot_dir, plot_name or plot_filename(ref)), title=f"{ref.id}")
    return row


def _ignore_interrupts():
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _measure_task(arguments):
    return measure_ref(*arguments)


def measure_partition(tasks):
    """The Dask task of :func:`measure_refs`: measure one partition of cutouts on a worker.

    Parameters
    ----------
    tasks : list of tuple
        The arguments of :func:`measure_ref`, one tuple per cutout. The worker reads the
        cutouts itself (and writes the plots), so the files must be on a file system every
        machine sees.

    Returns
    -------
    list of dict
        One row per task, in order; a cutout that cannot be measured is its row's ``error``
        (:func:`measure_ref` never raises for one), so a partition is never lost to a bad input.
    """
    return [measure_ref(*task) for task in tasks]


def measure_refs(refs, z=None, catalogue=None, plot_dir=None, options=None, workers=1, meta_columns=(), progress=True,
                 client=None, partition_size=parallel.PARTITION_SIZE):
    """Measure many cutouts, in input order, in parallel over ``workers`` processes or a Dask cluster.

    Parameters
    ----------
    refs : sequence of prep_data.CutoutRef
    z : float, optional
        Redshift for every cutout.
    catalogue : dict of str -> float, optional
        Redshift by cutout id.
    plot_dir, options, meta_columns
        As for :func:`measure_ref`.
    workers : int
        Processes; 1 measures in this process. Not used with ``client``.
    progress : bool
        Show a tqdm progress bar.
    client : dask.distributed.Client, optional
        Measure on this Dask cluster instead, ``partition_size`` cutouts per task
        (:func:`measure_partition`, :mod:`parallel`); the rows are the same as without it.
    partition_size : int
        Cutouts per Dask task.

    Yields
    ------
    dict
        One row per ref, in order (see :func:`measure_ref`).
    """
    import collections

    catalogue = catalogue or {}
    counts = collections.Counter(str(ref.id) for ref in refs)
    tasks = [(ref, z, catalogue.get(str(ref.id)), plot_dir, options, tuple(meta_columns),
              plot_filename(ref, counts[str(ref.id)] > 1)) for ref in refs]
    bar = common.progress(total=len(tasks), desc="measuring", unit="cutout", disable=not progress)
    if client is not None:
        for rows in parallel.map_in_order(client, measure_partition, parallel.partitions(tasks, partition_size)):
            yield from rows
            bar.update(len(rows))
    elif workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield _measure_task(task)
            bar.update()
    else:
        import multiprocessing
        import sys

        # Cutouts are read by the workers themselves: sending pixels back and forth would cost
        # more than measuring them. Chunks keep the inter-process traffic low. Forking is the
        # fastest start, but a process that has loaded TensorFlow must not be forked.
        chunk = max(1, min(16, len(tasks) // (4 * workers)))
        method = "forkserver" if "tensorflow" in sys.modules else "fork"
        # The workers leave Ctrl-C to this process, which terminates them (no traceback from each).
        with multiprocessing.get_context(method).Pool(workers, initializer=_ignore_interrupts) as pool:
            for row in pool.imap(_measure_task, tasks, chunksize=chunk):
                yield row
                bar.update()
    bar.close()
