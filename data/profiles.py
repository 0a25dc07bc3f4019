"""Building blocks shared by the mock generators (:mod:`data.clusters`, :mod:`data.tidal`,
:mod:`data.injection`, :mod:`data.survey_cutouts`): Sersic profiles and point sources on a
pixel grid, the Moffat PSF, the cosmology, and the preview grid of generated cutouts.

Pixel ``i`` spans ``[i - 0.5, i + 0.5]``; positions are (x, y) = (column, row).
"""

import functools
import math

import numpy as np
import scipy.special

import plots

#: Supersampling factor per axis of the pixels around each profile centre (by default).
CENTRE_SUPERSAMPLING = 9
#: Half-size (pixels) of the supersampled box around each profile centre (by default).
CENTRE_BOX_HALF_SIZE = 3
#: Flat Lambda-CDM cosmology (H0 in km/s/Mpc, Omega_m) of the mocks: the cosmology the
#: training backgrounds were cut with.
MOCK_COSMOLOGY = (70.0, 0.3)


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
    flux : float or ndarray
        Total flux (counts).
    r_eff : float or ndarray
        Half-light radius along the major axis (pixels).
    n : float or ndarray
        Sersic index.
    axis_ratio : float or ndarray
        Minor over major axis, in (0, 1].

    Returns
    -------
    float or ndarray
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


def elliptical_radius_squared(dx, dy, axis_ratio, position_angle):
    """Squared elliptical radius along the major axis of offsets (dx, dy) from a profile's centre.

    ``position_angle`` is the angle of the major axis from +x towards +y (radians).
    """
    # Python floats for a scalar angle keep float32 arrays in float32 (NumPy 2 promotion rules).
    if np.ndim(position_angle) == 0:
        cos, sin = float(np.cos(position_angle)), float(np.sin(position_angle))
    else:
        cos, sin = np.cos(position_angle), np.sin(position_angle)
    major = dx * cos + dy * sin
    minor = (-dx * sin + dy * cos) / axis_ratio
    return major * major + minor * minor


def sersic_intensity(scaled_r2, amplitude, n, b, dtype=np.float32):
    """The Sersic law I = amplitude exp(-b ((r / r_eff)^(1/n) - 1)), evaluated in ``dtype``.

    Parameters
    ----------
    scaled_r2 : ndarray
        (r / r_eff)^2, r the elliptical radius (:func:`elliptical_radius_squared`).
    amplitude : float or ndarray
        I_e, the intensity at r_eff (broadcast against ``scaled_r2``).
    n, b : float or ndarray
        Sersic index and :func:`sersic_b` of it (broadcast likewise).
    """
    exponent = np.power(scaled_r2, 0.5 / n, dtype=dtype) - 1.0
    return (amplitude * np.exp(-b * exponent)).astype(dtype)


def add_sersic(canvas, x0, y0, flux, r_eff, n, axis_ratio=1.0, position_angle=0.0, truncation_radius=np.inf,
               supersampling=CENTRE_SUPERSAMPLING, box_half_size=CENTRE_BOX_HALF_SIZE, cusp_correction=True):
    """Add an elliptical Sersic profile to ``canvas`` in place, each pixel holding its flux.

    Pixels are sampled at their centres, except a box of ``2 * box_half_size + 1`` pixels around
    the centre, which is supersampled ``supersampling`` times per axis; with ``cusp_correction``,
    inside the largest ellipse that fits that box the supersampled sum is corrected to the
    analytic enclosed flux (added to the central pixel), which catches the cusp of high-n profiles.

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
    supersampling : int
        Samples per axis of each pixel in the central box (1: none).
    box_half_size : int
        Half-size (pixels) of the central box, about the pixel holding the centre.
    cusp_correction : bool
        Correct the central pixel to the analytic flux inside the box (needs the whole box on the canvas).

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
        r2 = elliptical_radius_squared(dx, dy[:top], axis_ratio, position_angle)
        values[:top] = sersic_intensity(r2 * (1.0 / r_eff**2), amplitude, n, b)
        values[top:] = values[: height - top][::-1, ::-1]
    else:
        r2 = elliptical_radius_squared(dx, dy, axis_ratio, position_angle)
        values = sersic_intensity(r2 * (1.0 / r_eff**2), amplitude, n, b)
        if np.isfinite(truncation_radius):
            values[r2 > truncation_radius**2] = 0.0

    centre_col, centre_row = int(np.floor(x0 + 0.5)), int(np.floor(y0 + 0.5))
    half = box_half_size
    box_cols = np.arange(max(col_lo, centre_col - half), min(col_hi, centre_col + half) + 1)
    box_rows = np.arange(max(row_lo, centre_row - half), min(row_hi, centre_row + half) + 1)
    if box_cols.size and box_rows.size:
        steps = supersampling
        offsets = (np.arange(steps) + 0.5) / steps - 0.5
        sub_dx = ((box_cols[:, None] + offsets[None, :]).ravel() - x0)[None, :]
        sub_dy = ((box_rows[:, None] + offsets[None, :]).ravel() - y0)[:, None]
        sub_r2 = elliptical_radius_squared(sub_dx, sub_dy, axis_ratio, position_angle)
        sub_values = sersic_intensity(sub_r2.astype(np.float32) * (1.0 / r_eff**2), amplitude, n, b).astype(np.float64)
        sub_values[sub_r2 > truncation_radius**2] = 0.0
        pixel_means = sub_values.reshape(box_rows.size, steps, box_cols.size, steps).mean(axis=(1, 3))
        rows = slice(box_rows[0] - row_lo, box_rows[-1] - row_lo + 1)
        cols = slice(box_cols[0] - col_lo, box_cols[-1] - col_lo + 1)
        values[rows, cols] = pixel_means
        # The largest ellipse about the centre that lies inside the box: its supersampled flux is
        # replaced by the analytic one, which the sampling misses at the cusp of a high-n profile.
        local_radius = min(half - 0.5, truncation_radius)
        complete = box_cols.size == box_rows.size == 2 * half + 1
        if cusp_correction and complete and local_radius > 0:
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
        r2 = elliptical_radius_squared(dx, dy, q, pa)
        b = sersic_b(n[members]).astype(single)[:, None, None]
        amplitude = sersic_surface_brightness_at_r_eff(flux[members], r_eff[members], n[members], axis_ratio[members])
        scaled_r2 = r2 / (r_eff[members] ** 2).astype(single)[:, None, None]
        values = sersic_intensity(scaled_r2, amplitude.astype(single)[:, None, None], n[members][:, None, None], b)
        values[r2 > (truncation_radius[members] ** 2).astype(single)[:, None, None]] = 0.0
        missing = enclosed[members] - values.sum(axis=(1, 2), dtype=np.float64)
        values[:, half, half] = np.maximum(values[:, half, half] + missing, 0.0)
        rows = centre_row[:, None, None] + offsets[None, :, None]
        cols = centre_col[:, None, None] + offsets[None, None, :]
        rows, cols = np.broadcast_to(rows, values.shape), np.broadcast_to(cols, values.shape)
        keep = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width) & (values > 0)
        np.add.at(canvas, (rows[keep], cols[keep]), values[keep].astype(canvas.dtype))
    return enclosed


def render_sersic(shape, x0, y0, flux, r_eff, n, axis_ratio=1.0, position_angle=0.0, truncation_radius=np.inf,
                  **sampling):
    """A new float32 image of one Sersic profile.

    Arguments as :func:`add_sersic` (``sampling``: its ``supersampling``, ``box_half_size`` and
    ``cusp_correction``). The parameters are checked: r_eff > 0, 0.2 <= n <= 10, 0 < axis_ratio <= 1.
    """
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be two positive integers, got {shape}")
    if r_eff <= 0:
        raise ValueError(f"r_eff must be positive, got {r_eff}")
    if not 0.2 <= n <= 10:
        raise ValueError(f"n must be in [0.2, 10], got {n}")
    if not 0 < axis_ratio <= 1:
        raise ValueError(f"axis_ratio must be in (0, 1], got {axis_ratio}")
    canvas = np.zeros(shape, dtype=np.float32)
    add_sersic(canvas, x0, y0, flux, r_eff, n, axis_ratio, position_angle, truncation_radius, **sampling)
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


def disc_mask(shape, x0, y0, radius):
    """Boolean map of the pixels of ``shape`` whose centres lie within ``radius`` of (x0, y0)."""
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (xx - x0) ** 2 + (yy - y0) ** 2 <= radius**2


# ----------------------------------------------------------------------------------------
# The Moffat PSF


def moffat(r2, fwhm, beta):
    """The Moffat profile (1 + r^2 / alpha^2)^(-beta), alpha = fwhm / (2 sqrt(2^(1/beta) - 1)) (Moffat 1969).

    Evaluated at the squared radii ``r2`` (pixels^2) in their own precision; not normalised.
    """
    if fwhm <= 0:
        raise ValueError(f"fwhm must be positive, got {fwhm}")
    if beta <= 1:
        raise ValueError(f"beta must be > 1, got {beta}")
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    kind = np.asarray(r2).dtype.type
    return (1.0 + r2 / kind(alpha**2)) ** kind(-beta)


def moffat_psf(fwhm, beta, radius=None, supersampling=5):
    """Pixel-integrated circular Moffat PSF (:func:`moffat`), normalised to unit sum.

    Parameters
    ----------
    fwhm : float
        Full width at half maximum (pixels).
    beta : float
        Moffat index (> 1).
    radius : int, optional
        Half-size of the kernel in pixels (default 6 FWHM, at least 4).
    supersampling : int
        Samples per pixel per axis (1: sampled at the pixel centres).

    Returns
    -------
    ndarray of float32, shape (2 radius + 1, 2 radius + 1)
    """
    radius = int(max(4, np.ceil(6 * fwhm))) if radius is None else int(radius)
    side = 2 * radius + 1
    coords = (np.arange(side * supersampling) + 0.5) / supersampling - radius - 0.5
    fine = moffat(coords[None, :] ** 2 + coords[:, None] ** 2, fwhm, beta)
    kernel = fine.reshape(side, supersampling, side, supersampling).sum(axis=(1, 3))
    return (kernel / kernel.sum()).astype(np.float32)


def power_law_magnitudes(rng, count, slope, bright, faint):
    """``count`` magnitudes between ``bright`` and ``faint`` with counts N(<m) ~ 10^(slope m) (by inverse transform)."""
    low, high = 10.0 ** (slope * bright), 10.0 ** (slope * faint)
    return np.log10(low + rng.uniform(size=count) * (high - low)) / slope


# ----------------------------------------------------------------------------------------
# Cosmology


@functools.lru_cache(maxsize=8)
def cosmology(h0=MOCK_COSMOLOGY[0], omega_m=MOCK_COSMOLOGY[1]):
    """The astropy ``FlatLambdaCDM`` cosmology of these parameters (one instance per pair)."""
    from astropy.cosmology import FlatLambdaCDM

    return FlatLambdaCDM(H0=h0, Om0=omega_m)


def kpc_per_arcsec(z, parameters=MOCK_COSMOLOGY):
    """Proper kpc per arcsec at redshift ``z`` in the flat cosmology ``parameters`` = (H0, Omega_m)."""
    return float(cosmology(*parameters).kpc_proper_per_arcmin(z).value) / 60.0


# ----------------------------------------------------------------------------------------
# Preview


def draw_preview(panels, path, columns=8, title=None):
    """PNG grid of cutouts, each with a caption (written atomically).

    Parameters
    ----------
    panels : sequence of (rgb, caption, colour)
        ``rgb`` an (H, W, 3) array in [0, 1], shown with the origin at the lower left;
        ``caption`` the panel's title, in ``colour`` (a matplotlib colour).
    path : str or path-like
        Output PNG.
    columns : int
        Panels per row.
    title : str, optional
        Title of the whole figure.
    """
    if len(panels) == 0:
        raise ValueError("panels must hold at least one cutout")
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plots.new_figure(rows, columns, figsize=(2.2 * columns, 2.6 * rows))
    axes = np.asarray(axes, dtype=object).ravel()
    for axis in axes:
        axis.set_axis_off()
    for axis, (rgb, caption, colour) in zip(axes, panels):
        axis.imshow(rgb, origin="lower", interpolation="nearest")
        axis.set_title(caption, fontsize=7, color=colour)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    plots.save_figure(figure, path, dpi=80)
