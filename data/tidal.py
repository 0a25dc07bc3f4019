"""Mock HSC Ultradeep cutouts of galaxies, some with tidal features, with known truth.

Each mock is a 128 x 128 pixel crop at the native HSC pixel scale (0.168", so 21.5" across;
cropped like the real cutouts, never resized) in the five bands g, r, i, z, y, in counts
(zero point 27). A scene holds:

* a host galaxy with log M* >= 9.5 at z <= 0.4, drawn from a Schechter stellar-mass
  function in a comoving volume, as a Sersic spheroid or a bulge + exponential disc, with
  observed-frame colours of red or blue galaxies at its redshift and sizes from the
  mass-size relations of van der Wel et al. 2014;
* neighbouring field galaxies (about 40 per arcmin^2 brighter than 25 mag, counts rising
  0.3 dex/mag), sometimes a close companion, and stars;
* in 6% of hosts (:data:`TIDAL_FRACTION`, Desmons et al. 2025), whatever their mass, one tidal
  feature: a shell system (around early types only), a stream (from the test-particle library
  of :mod:`data.tidal_streams`), a tidal tail (or two) or a plume, holding 1-5% of the host's
  light (:data:`FEATURE_LIGHT_SHARE_RANGE`).

The host population is that of the HSC-SSP sample of Desmons et al. 2025 ("Analysing the
prevalence of tidal features in HSC-SSP using self-supervised representation learning":
log10 M*/Msun >= 9.5, z <= 0.4, tidal-feature fraction 0.06). Whether a host has a feature,
and the feature's light share and surface brightness, are drawn independently of the host's
mass: the observed rise of the tidal fraction with mass is deliberately not modelled, because a
label tied to host mass lets a classifier score well from the host's brightness alone.

The scene is convolved with a per-band Moffat PSF (seeing about 0.6" in i, Aihara et al.
2019) and Gaussian sky noise at the Ultradeep depth of each band is added. Numbers and their
sources are in the project's MOCKS.md.

Feature surface brightness
--------------------------
The truth ``feature_sb`` is the *intensity-weighted* mean surface brightness of the
PSF-convolved feature in the i band inside the cutout,

    I_mean = sum(I_p^2) / sum(I_p),   feature_sb = counts_to_sb(I_mean),

the mean intensity seen by the feature's own light. For a feature of uniform brightness it
is exactly its surface brightness, and it needs no footprint threshold. It is drawn
uniformly in :data:`FEATURE_SB_RANGE` and is never fainter than :data:`FEATURE_SB_LIMIT`.

The feature's light share is drawn log-uniformly in :data:`FEATURE_LIGHT_SHARE_RANGE` and
always honoured. Its size (the radius holding 90% of its points) is chosen so that at that flux
its mean SB is the drawn one, within limits: at most :data:`FEATURE_MAX_RADIUS_ARCSEC`
(features lie within about 10" of the centre), at least :data:`FEATURE_MIN_RADIUS_ARCSEC` and
:data:`FEATURE_MIN_RADIUS_HOST` host half-light radii (features reach beyond the host's bright
body). Where a limit binds, the realised SB departs from the drawn one (``params["feature"]``
keeps ``drawn_sb``); a feature that would be fainter than :data:`FEATURE_SB_LIMIT` at the
smallest size is made smaller still, down to :data:`FEATURE_FLOOR_RADIUS_ARCSEC`.

Visibility
----------
People label the features they see. Each feature records how visible it is
(:func:`feature_visibility`): on the noiseless g + r + i detection image, its footprint is
where it is at least :data:`FOOTPRINT_THRESHOLD` sky sigmas; ``feature_snr`` is its integrated
S/N over that footprint and ``feature_contrast`` its light over the light of everything else
in the footprint. ``visible`` is ``feature_snr >= VISIBLE_MIN_SNR and feature_contrast >=
VISIBLE_MIN_CONTRAST``.

Host-matched pairs
------------------
The sky noise of a scene comes from its own seed (``params["noise_seed"]``), so
:func:`render_tidal_pair` renders the same scene with and without its feature, with the same
noise: the twins differ by the feature's light alone.

Pixel conventions
-----------------
Image arrays are (row, column, band) = (y, x, band); pixel (i, j) covers
[j - 0.5, j + 0.5] x [i - 0.5, i + 0.5], so the centre of the 128-pixel cutout is at
(63.5, 63.5). The scene is rendered on a canvas with a margin (:data:`CANVAS_MARGIN`) so that
sources just outside the cutout spill light into it and the FFT convolution does not wrap.
"""

import functools
import json
import logging

import numpy as np
import scipy.fft
import scipy.special

import hsc
from data import profiles, tidal_streams

logger = logging.getLogger(__name__)

#: Band names, in the order of the image's last axis.
BANDS = "grizy"
#: Side of the cutout in native pixels.
IMAGE_SIZE = 128
#: Extra pixels rendered on every side of the cutout (light from outside, no FFT wrap).
CANVAS_MARGIN = 16
#: Sky noise per native pixel at Ultradeep depth, counts, in g, r, i, z, y (MOCKS.md).
NOISE_SIGMA = (0.017, 0.020, 0.022, 0.061, 0.089)
#: Median PSF FWHM in g, r, i, z, y, arcsec (Aihara et al. 2019: 0.6" in i, 0.7-0.77" in g, r).
PSF_FWHM_MEDIAN = (0.76, 0.72, 0.60, 0.66, 0.70)
#: Log-normal scatter of the seeing shared by all bands, and of each band on its own.
PSF_FWHM_SCATTER = (0.12, 0.05)
#: Range of the Moffat index beta.
MOFFAT_BETA_RANGE = (2.5, 4.0)
#: Resolution of the PSF parameters (FWHM in pixels, beta); PSFs are cached on this grid.
PSF_GRID = (0.05, 0.25)

#: Probability that a host has a tidal feature (Desmons et al. 2025), whatever its mass.
TIDAL_FRACTION = 0.06
#: The tidal-feature probability scales as stellar mass to this power (see :func:`tidal_probability`):
#: 0, so that the label carries no information about the host's brightness.
TIDAL_MASS_SLOPE = 0.0
#: Feature kinds and their probabilities.
FEATURE_TYPES = ("shell", "stream", "tail", "plume")
FEATURE_TYPE_PROBABILITIES = (0.2, 0.3, 0.25, 0.25)
#: Range of the drawn mean surface brightness of a feature, i band, mag/arcsec^2.
FEATURE_SB_RANGE = (25.0, 27.5)
#: No feature is fainter than this mean surface brightness (i, mag/arcsec^2).
FEATURE_SB_LIMIT = 27.8
#: Range of the share of the host's light in its feature, drawn log-uniformly (MOCKS.md: about 2%).
FEATURE_LIGHT_SHARE_RANGE = (0.01, 0.05)
#: The radius holding 90% of the feature's particles is at most this (arcsec) ...
FEATURE_MAX_RADIUS_ARCSEC = 10.0
#: ... and at least this (arcsec), and at least this many host half-light radii ...
FEATURE_MIN_RADIUS_ARCSEC = 4.0
FEATURE_MIN_RADIUS_HOST = 3.0
#: ... unless the feature would be fainter than the SB limit: then it shrinks, down to this (arcsec).
FEATURE_FLOOR_RADIUS_ARCSEC = 2.0

#: Bands summed into the detection image of the visibility measure (those of a gri colour image).
VISIBILITY_BANDS = (0, 1, 2)
#: The feature's footprint: where its detection image is at least this many sky sigmas.
FOOTPRINT_THRESHOLD = 0.25
#: A feature is ``visible`` with at least this integrated S/N over its footprint ...
VISIBLE_MIN_SNR = 30.0
#: ... and at least this share of the light of everything else in its footprint.
VISIBLE_MIN_CONTRAST = 0.3
#: Points drawn per geometric feature (shells, tails, plumes).
FEATURE_POINTS = 6000

#: Host stellar-mass range (log10 solar masses), Schechter parameters (log M*, alpha).
HOST_LOG_MASS_RANGE = (9.5, 11.8)
HOST_MASS_FUNCTION = (10.7, -1.2)
#: Host redshift range.
HOST_Z_RANGE = (0.02, 0.4)
#: Absolute i magnitude of the Sun (AB).
SUN_ABSOLUTE_MAG_I = 4.53
#: Flat Lambda-CDM cosmology (H0 in km/s/Mpc, Omega_m).
COSMOLOGY = profiles.MOCK_COSMOLOGY

#: Field galaxies per arcmin^2 brighter than 25 mag (i) and the slope of the counts (dex/mag).
GALAXY_DENSITY = (40.0, 0.3)
#: Magnitude range of field galaxies (i).
GALAXY_MAG_RANGE = (17.0, 26.5)
#: Stars per arcmin^2 and their magnitude range (i).
STAR_DENSITY = 3.0
STAR_MAG_RANGE = (16.0, 25.0)
#: Probability of a close companion galaxy (a confuser for the classifier).
COMPANION_PROBABILITY = 0.15

#: Sersic stamps extend to where the i-band profile falls to this intensity (counts per pixel,
#: a fortieth of the i-band noise): what lies beyond is lost below the noise.
STAMP_THRESHOLD = 0.0005
#: Sampling of the galaxy stamps (:func:`data.profiles.add_sersic`): the 5 x 5 pixels about the
#: centre sub-sampled 7 x 7, without the cusp correction.
STAMP_SAMPLING = dict(supersampling=7, box_half_size=2, cusp_correction=False)
#: Sources fainter than this (i counts, about 22.8 mag) have their cores sub-sampled 3 x 3, not 7 x 7.
OVERSAMPLE_MIN_FLUX = 50.0

_CANVAS = IMAGE_SIZE + 2 * CANVAS_MARGIN
_CENTRE = (_CANVAS - 1) / 2.0


# ----------------------------------------------------------------------------------------
# Profiles


@functools.lru_cache(maxsize=640)
def _psf_transform(fwhm_pixels, beta, size=_CANVAS):
    """Real FFT of a unit-sum Moffat PSF centred on pixel (0, 0) of a periodic size x size grid."""
    offsets = np.fft.fftfreq(size, 1.0 / size).astype(np.float32)
    kernel = profiles.moffat(offsets[:, None] ** 2 + offsets[None, :] ** 2, fwhm_pixels, beta)
    kernel /= kernel.sum()
    return scipy.fft.rfft2(kernel)


def _gaussian_transform(sigma, size=_CANVAS):
    """Real FFT of a unit-sum Gaussian of width ``sigma`` pixels on the periodic canvas."""
    ky = np.fft.fftfreq(size).astype(np.float32)[:, None]
    kx = np.fft.rfftfreq(size).astype(np.float32)[None, :]
    return np.exp(np.float32(-2.0 * np.pi**2 * sigma**2) * (kx * kx + ky * ky))


def bin_points(x, y, weights, shape):
    """A float32 image of ``shape`` holding weighted points, each shared bilinearly among the four
    nearest pixel centres (:func:`data.profiles.add_points`, summed in float64); light off it is lost."""
    image = np.zeros(shape)
    profiles.add_points(image, x, y, weights)
    return image.astype(np.float32)


# ----------------------------------------------------------------------------------------
# Cosmology and colours


@functools.lru_cache(maxsize=1)
def _distance_table():
    """Redshift grid with luminosity distance (Mpc), angular scale (kpc/arcsec) and comoving volume element."""
    cosmology = profiles.cosmology(*COSMOLOGY)
    z = np.linspace(0.005, 1.0, 400)
    luminosity_distance = cosmology.luminosity_distance(z).value
    kpc_per_arcsec = cosmology.kpc_proper_per_arcmin(z).value / 60.0
    volume_element = cosmology.differential_comoving_volume(z).value
    return z, luminosity_distance, kpc_per_arcsec, volume_element


def distance_modulus(z):
    """Distance modulus 5 log10(D_L / 10 pc) in the :data:`COSMOLOGY`, interpolated."""
    grid, luminosity_distance, _, _ = _distance_table()
    return 5.0 * np.log10(np.interp(z, grid, luminosity_distance) * 1e5)


def kpc_per_arcsec(z):
    """Proper kpc per arcsec at redshift ``z`` in the :data:`COSMOLOGY`, interpolated."""
    grid, _, scale, _ = _distance_table()
    return np.interp(z, grid, scale)


def observed_colours(z, red_fraction):
    """Observed-frame colours g-r, r-i, i-z, z-y (mag) of a galaxy at redshift ``z``.

    A linear mix of a red-sequence and a star-forming template whose colours redden with
    redshift as the 4000 A break moves through g and r; approximate fits by eye to the
    colour tracks of HSC galaxies, good to about 0.1 mag for z <= 0.5.

    Parameters
    ----------
    z : float or ndarray
    red_fraction : float or ndarray
        0 for a star-forming galaxy, 1 for a red-sequence galaxy.

    Returns
    -------
    ndarray, shape (4,) + broadcast shape of the inputs
    """
    z = np.asarray(z, dtype=float)
    red = np.array([0.75 + 2.0 * z, 0.38 + 0.9 * z, 0.20 + 0.15 * z, 0.10 + 0.10 * z])
    blue = np.array([0.40 + 0.8 * z, 0.20 + 0.4 * z, 0.08 + 0.10 * z, 0.03 + 0.05 * z])
    return red_fraction * red + (1.0 - red_fraction) * blue


def band_fluxes(mag_i, colours):
    """Counts in g, r, i, z, y of a source with i magnitude ``mag_i`` and colours g-r, r-i, i-z, z-y.

    ``colours`` has the four colours along its first axis; arrays of sources give (5, ...) counts.
    """
    g_r, r_i, i_z, z_y = colours
    mags = np.array([mag_i + r_i + g_r, mag_i + r_i, mag_i, mag_i - i_z, mag_i - i_z - z_y])
    return hsc.mag_to_counts(mags)


# ----------------------------------------------------------------------------------------
# Drawing the parameters of a scene


def _mass_function(log_mass):
    """Schechter stellar-mass function per dex, (M/M*)^(alpha+1) exp(-M/M*), unnormalised."""
    log_mass_star, alpha = HOST_MASS_FUNCTION
    ratio = 10.0 ** (np.asarray(log_mass, dtype=float) - log_mass_star)
    return ratio ** (alpha + 1.0) * np.exp(-ratio)


def _draw_log_mass(rng):
    """Host log10 stellar mass from the Schechter function in :data:`HOST_LOG_MASS_RANGE` (by rejection)."""
    peak = float(_mass_function(HOST_LOG_MASS_RANGE[0]))
    while True:
        log_mass = rng.uniform(*HOST_LOG_MASS_RANGE)
        if rng.uniform(0.0, peak) < _mass_function(log_mass):
            return float(log_mass)


@functools.lru_cache(maxsize=1)
def _mean_tidal_weight():
    """Mean of 10^(slope (log M - 10)) over the host mass function."""
    log_mass = np.linspace(*HOST_LOG_MASS_RANGE, 4001)
    density = _mass_function(log_mass)
    weight = 10.0 ** (TIDAL_MASS_SLOPE * (log_mass - 10.0))
    return float(np.sum(density * weight) / np.sum(density))


def tidal_probability(log_mass):
    """Probability that a host of log10 stellar mass ``log_mass`` has a tidal feature.

    Proportional to M*^:data:`TIDAL_MASS_SLOPE` (the tidal-feature fraction rises with
    stellar mass, Bilek et al. 2020, Desmons et al. 2025), normalised so that the mean over
    the host mass function is :data:`TIDAL_FRACTION`.
    """
    weight = 10.0 ** (TIDAL_MASS_SLOPE * (np.asarray(log_mass, dtype=float) - 10.0))
    return np.minimum(TIDAL_FRACTION * weight / _mean_tidal_weight(), 1.0)


def _draw_host(rng, log_mass):
    """Host parameters at this stellar mass: redshift, type, components with per-band fluxes."""
    grid, _, _, volume_element = _distance_table()
    in_range = (grid >= HOST_Z_RANGE[0]) & (grid <= HOST_Z_RANGE[1])
    weights = volume_element[in_range] / volume_element[in_range].sum()
    z = float(rng.choice(grid[in_range], p=weights) + rng.uniform(-0.5, 0.5) * (grid[1] - grid[0]))
    z = float(np.clip(z, *HOST_Z_RANGE))
    red_probability = 1.0 / (1.0 + np.exp(-(log_mass - 10.5) / 0.3))
    early_type = bool(rng.uniform() < red_probability)
    red_fraction = float(np.clip(rng.normal(0.9 if early_type else 0.15, 0.1), 0.0, 1.0))
    # Rest-frame g-r sets the i-band mass-to-light ratio (Bell et al. 2003, table 7).
    rest_g_r = 0.4 + 0.35 * red_fraction
    log_mass_to_light = -0.152 + 0.518 * rest_g_r
    absolute_mag_i = SUN_ABSOLUTE_MAG_I - 2.5 * (log_mass - log_mass_to_light)
    k_correction_i = (0.8 * red_fraction + 0.3 * (1.0 - red_fraction)) * z
    mag_i = float(absolute_mag_i + distance_modulus(z) + k_correction_i)
    colours = observed_colours(z, red_fraction) + rng.normal(0.0, 0.04, 4)
    # Mass-size relations of van der Wel et al. 2014 (z ~ 0.25), 0.15 dex scatter.
    if early_type:
        log_r_e_kpc = 0.60 + 0.75 * (log_mass - 10.7)
    else:
        log_r_e_kpc = 0.86 + 0.25 * (log_mass - 10.7)
    r_e_kpc = 10.0 ** (log_r_e_kpc + rng.normal(0.0, 0.15))
    r_e_pixels = float(r_e_kpc / kpc_per_arcsec(z) / hsc.PIXEL_SCALE)
    x0 = _CENTRE + rng.uniform(-0.5, 0.5)
    y0 = _CENTRE + rng.uniform(-0.5, 0.5)
    theta = rng.uniform(0.0, np.pi)
    total = band_fluxes(mag_i, colours)
    if early_type:
        components = [_component(x0, y0, total, r_e_pixels, rng.uniform(3.0, 5.5), rng.uniform(0.5, 1.0), theta)]
    else:
        bulge_fraction = rng.uniform(0.05, 0.35)
        # Bulges are redder than their discs.
        bulge_colour = band_fluxes(0.0, observed_colours(z, 1.0)) / band_fluxes(0.0, colours)
        bulge_flux = bulge_fraction * total * bulge_colour / bulge_colour[2]
        disc_flux = np.maximum(total - bulge_flux, 0.0)
        components = [
            _component(x0, y0, disc_flux, r_e_pixels, rng.uniform(0.8, 1.3), rng.uniform(0.25, 1.0), theta),
            _component(
                x0, y0, bulge_flux, 0.2 * r_e_pixels, rng.uniform(2.0, 4.0), rng.uniform(0.6, 1.0), theta
            ),
        ]
    return {
        "z": z,
        "log_stellar_mass": float(log_mass),
        "early_type": early_type,
        "mag_i": mag_i,
        "r_e_pixels": r_e_pixels,
        "colours": [float(c) for c in colours],
        "components": components,
    }


def _component(x, y, fluxes, r_e, n, q, theta):
    """A Sersic component as a JSON-ready dict (fluxes per band, geometry in pixels)."""
    return {
        "x": float(x),
        "y": float(y),
        "flux": [float(f) for f in fluxes],
        "r_e": float(max(r_e, 0.05)),
        "n": float(n),
        "q": float(q),
        "theta": float(theta),
    }


def _canvas_area_arcmin2():
    return (_CANVAS * hsc.PIXEL_SCALE / 60.0) ** 2


def _draw_neighbours(rng, host):
    """Field galaxies over the canvas and, sometimes, a close companion of the host."""
    density_25, slope = GALAXY_DENSITY
    faint, bright = GALAXY_MAG_RANGE[1], GALAXY_MAG_RANGE[0]
    expected = density_25 * (10.0 ** (slope * (faint - 25.0)) - 10.0 ** (slope * (bright - 25.0)))
    count = rng.poisson(expected * _canvas_area_arcmin2())
    mags = profiles.power_law_magnitudes(rng, count, slope, bright, faint)
    spheroid = rng.uniform(size=count) < 0.3
    r_e_arcsec = 10.0 ** (np.log10(0.6) - 0.1 * (mags - 22.0) + rng.normal(0.0, 0.2, count))
    n = np.where(spheroid, rng.uniform(2.5, 4.0, count), rng.uniform(0.7, 1.3, count))
    colours = observed_colours(rng.uniform(0.1, 1.0, count), np.where(spheroid, 0.9, 0.15))
    colours = np.clip(colours + rng.normal(0.0, 0.1, (4, count)), -0.2, 2.5)
    fluxes = band_fluxes(mags, colours).T
    x, y = rng.uniform(-0.5, _CANVAS - 0.5, (2, count))
    q, theta = rng.uniform(0.3, 1.0, count), rng.uniform(0.0, np.pi, count)
    neighbours = [
        _component(x[k], y[k], fluxes[k], r_e_arcsec[k] / hsc.PIXEL_SCALE, n[k], q[k], theta[k]) for k in range(count)
    ]
    if rng.uniform() < COMPANION_PROBABILITY:
        distance = rng.uniform(2.0, 6.0) / hsc.PIXEL_SCALE
        angle = rng.uniform(0.0, 2.0 * np.pi)
        mag = host["mag_i"] + rng.uniform(1.0, 4.0)
        colours = np.asarray(host["colours"]) + rng.normal(0.0, 0.1, 4)
        neighbours.append(
            _component(
                _CENTRE + distance * np.cos(angle),
                _CENTRE + distance * np.sin(angle),
                band_fluxes(mag, colours),
                host["r_e_pixels"] * 10.0 ** (-0.2 * (mag - host["mag_i"])),
                rng.uniform(1.0, 4.0),
                rng.uniform(0.4, 1.0),
                rng.uniform(0.0, np.pi),
            )
        )
    return neighbours


def _draw_stars(rng):
    """Point sources with colours along the stellar locus."""
    stars = []
    for _ in range(rng.poisson(STAR_DENSITY * _canvas_area_arcmin2())):
        g_r = rng.uniform(0.2, 1.5)
        colours = (g_r, 0.45 * g_r - 0.05, 0.1 + 0.2 * g_r, 0.05 + 0.1 * g_r)
        stars.append(
            {
                "x": float(rng.uniform(-0.5, _CANVAS - 0.5)),
                "y": float(rng.uniform(-0.5, _CANVAS - 0.5)),
                "flux": [float(f) for f in band_fluxes(rng.uniform(*STAR_MAG_RANGE), colours)],
            }
        )
    return stars


def _draw_psf(rng):
    """Per-band Moffat FWHM (pixels, on the cache grid) and beta."""
    common = rng.normal(0.0, PSF_FWHM_SCATTER[0])
    fwhm_arcsec = np.asarray(PSF_FWHM_MEDIAN) * np.exp(common + rng.normal(0.0, PSF_FWHM_SCATTER[1], len(BANDS)))
    step, beta_step = PSF_GRID
    fwhm_pixels = np.round(fwhm_arcsec / hsc.PIXEL_SCALE / step) * step
    beta = round(rng.uniform(*MOFFAT_BETA_RANGE) / beta_step) * beta_step
    return {"fwhm_pixels": [round(float(f), 4) for f in fwhm_pixels], "beta": round(float(beta), 4)}


# ----------------------------------------------------------------------------------------
# Tidal features


def _rotate(x, y, angle):
    c, s = np.cos(angle), np.sin(angle)
    return c * x - s * y, s * x + c * y


def _shell_points(rng, n_points):
    """Nested, interleaved arcs with sharp outer edges (the caustics of a radial merger)."""
    n_shells = int(rng.integers(1, 5))
    ratio = rng.uniform(0.55, 0.75)
    radii = ratio ** np.arange(n_shells)
    alternate = rng.uniform() < 0.7
    sides = np.where(alternate, np.pi * (np.arange(n_shells) % 2), 0.0) + rng.normal(0.0, 0.15, n_shells)
    # Inner shells are brighter per unit length but shorter: keep a share proportional to radius^0.5.
    share = radii**0.5 / np.sum(radii**0.5)
    which = rng.choice(n_shells, size=n_points, p=share)
    half_opening = rng.uniform(0.9, 1.6, n_shells)[which]
    thickness = rng.uniform(0.05, 0.12)
    radius = radii[which] * (1.0 - rng.exponential(thickness, n_points))
    angle = sides[which] + half_opening * (2.0 * rng.beta(2.0, 2.0, n_points) - 1.0)
    return radius * np.cos(angle), radius * np.sin(angle)


def _stream_points(rng, n_points):
    """A stream snapshot from the test-particle library, rotated at random in 3-D and projected."""
    library = tidal_streams.stream_library()
    positions = library[int(rng.integers(len(library)))]
    quaternion = rng.normal(size=4)
    a, b, c, d = quaternion / np.linalg.norm(quaternion)
    rotation = np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
        ]
    )
    # The library fixes the number of particles; n_points is unused here.
    projected = positions @ rotation.T
    return projected[:, 0].astype(np.float64), projected[:, 1].astype(np.float64)


def _tail_points(rng, n_points):
    """One tidal tail, or two in an S, curving away from the host and widening outwards."""
    two = rng.uniform() < 0.5
    # Tails leave the host's outskirts: starting further in would hide their brightest part.
    start = rng.uniform(0.25, 0.45)
    curvature = rng.uniform(0.6, 1.8) * rng.choice([-1.0, 1.0])
    decay = rng.uniform(0.6, 1.5)
    width = rng.uniform(0.03, 0.07)
    second_share = rng.uniform(0.3, 1.0) if two else 0.0
    in_second = rng.uniform(size=n_points) < second_share / (1.0 + second_share)
    # Truncated exponential brightness along the tail.
    u = rng.uniform(size=n_points)
    t = -decay * np.log(1.0 - u * (1.0 - np.exp(-1.0 / decay)))
    radius = start + (1.0 - start) * t
    angle = curvature * t + np.where(in_second, np.pi, 0.0)
    spread = width * (0.5 + 1.5 * t)
    x = radius * np.cos(angle) + spread * rng.standard_normal(n_points)
    y = radius * np.sin(angle) + spread * rng.standard_normal(n_points)
    return x, y


def _plume_points(rng, n_points):
    """A diffuse fan of debris on one side of the host."""
    start = rng.uniform(0.25, 0.45)
    radius = start + (1.0 - start) * rng.beta(1.6, 1.6, n_points)
    opening = rng.uniform(0.3, 0.6)
    bend = rng.uniform(-0.4, 0.4)
    angle = opening * rng.standard_normal(n_points) + bend * radius
    spread = 0.06 * radius
    x = radius * np.cos(angle) + spread * rng.standard_normal(n_points)
    y = radius * np.sin(angle) + spread * rng.standard_normal(n_points)
    return x, y


_FEATURE_POINTS = {"shell": _shell_points, "stream": _stream_points, "tail": _tail_points, "plume": _plume_points}


def feature_points(feature_type, seed):
    """Points tracing a feature, in units of the radius holding 90% of them, about the host.

    Parameters
    ----------
    feature_type : {"shell", "stream", "tail", "plume"}
    seed : int
        Seed of the feature's geometry (orientation, curvature, library snapshot...).

    Returns
    -------
    x, y : ndarray, shape (N,)
        Positions; 90% of the points lie within radius 1.
    """
    if feature_type not in _FEATURE_POINTS:
        raise ValueError(f"feature_type must be one of {FEATURE_TYPES}, got {feature_type!r}")
    rng = np.random.default_rng(seed)
    x, y = _FEATURE_POINTS[feature_type](rng, FEATURE_POINTS)
    x, y = _rotate(x, y, rng.uniform(0.0, 2.0 * np.pi))
    radius_90 = np.quantile(np.hypot(x, y), 0.9)
    return x / radius_90, y / radius_90


def _feature_transform(feature_type, seed, radius_90_pixels, centre):
    """Real FFT of the unit-flux feature map on the canvas, smoothed in proportion to its size."""
    x, y = feature_points(feature_type, seed)
    points = bin_points(
        centre[0] + radius_90_pixels * x, centre[1] + radius_90_pixels * y, np.full(x.shape, 1.0 / x.size), (_CANVAS,) * 2
    )
    smoothing = max(1.0, 0.04 * radius_90_pixels)
    return scipy.fft.rfft2(points) * _gaussian_transform(smoothing)


def _crop(image):
    return image[..., CANVAS_MARGIN : CANVAS_MARGIN + IMAGE_SIZE, CANVAS_MARGIN : CANVAS_MARGIN + IMAGE_SIZE]


def intensity_weighted_sb(image):
    """Intensity-weighted mean surface brightness sum(I^2)/sum(I) of a noiseless image, mag/arcsec^2.

    Parameters
    ----------
    image : ndarray
        Counts per native pixel (non-negative).
    """
    image = np.asarray(image, dtype=np.float64)
    total = image.sum()
    if total <= 0:
        raise ValueError("image must hold positive flux")
    return float(hsc.counts_to_sb(np.sum(image * image) / total))


def _feature_shape_stats(transform, psf):
    """Sum and sum of squares, inside the cutout, of the unit-flux feature convolved with the i PSF."""
    image = _crop(scipy.fft.irfft2(transform * _psf_transform(psf["fwhm_pixels"][2], psf["beta"]), s=(_CANVAS,) * 2))
    image = np.maximum(image, 0.0)
    return float(image.sum()), float(np.sum(image.astype(np.float64) ** 2))


def _draw_feature(rng, host, host_flux_i, psf):
    """Feature type, geometry seed, size and flux: the drawn light share exactly, the drawn SB where the size limits allow."""
    types = FEATURE_TYPES if host["early_type"] else tuple(t for t in FEATURE_TYPES if t != "shell")
    probabilities = np.asarray([FEATURE_TYPE_PROBABILITIES[FEATURE_TYPES.index(t)] for t in types])
    feature_type = str(rng.choice(types, p=probabilities / probabilities.sum()))
    seed = int(rng.integers(2**31))
    drawn_sb = float(rng.uniform(*FEATURE_SB_RANGE))
    low, high = FEATURE_LIGHT_SHARE_RANGE
    light_fraction = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    colour_mix = rng.uniform(0.0, 1.0)
    # Debris carries the colours of the disrupted satellite: between the host's and a bluer galaxy's.
    colours = (1 - colour_mix) * np.asarray(host["colours"]) + colour_mix * observed_colours(host["z"], 0.0)
    colour_ratio = band_fluxes(0.0, colours) / band_fluxes(0.0, colours)[2]

    centre = (host["components"][0]["x"], host["components"][0]["y"])
    max_radius = FEATURE_MAX_RADIUS_ARCSEC / hsc.PIXEL_SCALE
    min_radius = min(
        max(FEATURE_MIN_RADIUS_ARCSEC / hsc.PIXEL_SCALE, FEATURE_MIN_RADIUS_HOST * host["r_e_pixels"]), max_radius
    )
    flux_i = light_fraction * host_flux_i

    def mean_intensity(radius):
        """Intensity-weighted mean intensity (counts/px) of the feature at this size and flux."""
        total, squares = _feature_shape_stats(_feature_transform(feature_type, seed, radius, centre), psf)
        return flux_i * squares / total

    # The mean intensity falls as the size squared, near enough to aim with one trial.
    trial_radius = np.sqrt(min_radius * max_radius)
    wanted = float(hsc.sb_to_counts(drawn_sb))
    radius = float(np.clip(trial_radius * np.sqrt(mean_intensity(trial_radius) / wanted), min_radius, max_radius))
    intensity = mean_intensity(radius)
    faintest = float(hsc.sb_to_counts(FEATURE_SB_LIMIT))
    floor = min(FEATURE_FLOOR_RADIUS_ARCSEC / hsc.PIXEL_SCALE, radius)
    for _ in range(3):
        if intensity >= faintest * 0.98 or radius <= floor:
            break
        # Even at its smallest size the feature is fainter than any seen: shrink it to the limit.
        radius = float(max(radius * np.sqrt(intensity / faintest), floor))
        intensity = mean_intensity(radius)
    return {
        "type": feature_type,
        "seed": seed,
        "radius_90_pixels": radius,
        "centre": [float(centre[0]), float(centre[1])],
        "flux": [float(flux_i * c) for c in colour_ratio],
        "drawn_sb": drawn_sb,
        "mean_sb": float(hsc.counts_to_sb(intensity)),
        "light_fraction": light_fraction,
    }


# ----------------------------------------------------------------------------------------
# Rendering


def _stamp_half_width(component):
    """Half-width (pixels) of the stamp of a Sersic component: out to where its i-band
    intensity falls to :data:`STAMP_THRESHOLD` counts, within [4, canvas] pixels."""
    r_e, n, q = component["r_e"], component["n"], component["q"]
    b = profiles.sersic_b(n)
    intensity_at_r_e = profiles.sersic_surface_brightness_at_r_eff(component["flux"][2], r_e, n, q)
    if intensity_at_r_e <= STAMP_THRESHOLD:
        return 4
    # I(r) = I_e exp(-b ((r / r_e)^(1/n) - 1)) = threshold, solved for r.
    radius = r_e * (1.0 + np.log(intensity_at_r_e / STAMP_THRESHOLD) / b) ** n
    return int(np.clip(np.ceil(radius), 4, _CANVAS))


def _add_component(scene, component):
    """Add a Sersic component to the (5, H, W) scene, on a stamp around it."""
    half = _stamp_half_width(component)
    x, y = component["x"], component["y"]
    col_lo, col_hi = max(int(np.floor(x)) - half, 0), min(int(np.floor(x)) + half + 1, _CANVAS)
    row_lo, row_hi = max(int(np.floor(y)) - half, 0), min(int(np.floor(y)) + half + 1, _CANVAS)
    if col_lo >= col_hi or row_lo >= row_hi:
        return
    # A faint source's core holds too little light above the noise to be worth fine sampling.
    sampling = STAMP_SAMPLING if component["flux"][2] > OVERSAMPLE_MIN_FLUX else dict(STAMP_SAMPLING, supersampling=3)
    profile = profiles.render_sersic((row_hi - row_lo, col_hi - col_lo), x - col_lo, y - row_lo, 1.0, component["r_e"],
                                     component["n"], component["q"], component["theta"], **sampling)
    scene[:, row_lo:row_hi, col_lo:col_hi] += np.asarray(component["flux"], np.float32)[:, None, None] * profile


def render_components(params):
    """The noiseless scene without its feature, and the feature alone (zeros without one).

    Returns
    -------
    rest, feature : ndarray, shape (128, 128, 5), float32
        Counts per native pixel in g, r, i, z, y, PSF-convolved.
    """
    scene = np.zeros((len(BANDS), _CANVAS, _CANVAS), dtype=np.float32)
    for component in params["host"]["components"] + params["neighbours"]:
        _add_component(scene, component)
    if params["stars"]:
        stars = params["stars"]
        x = np.array([s["x"] for s in stars])
        y = np.array([s["y"] for s in stars])
        for band in range(len(BANDS)):
            scene[band] += bin_points(x, y, np.array([s["flux"][band] for s in stars]), (_CANVAS, _CANVAS))
    psf = np.stack([_psf_transform(fwhm, params["psf"]["beta"]) for fwhm in params["psf"]["fwhm_pixels"]])

    def image_of(transform):
        image = _crop(scipy.fft.irfft2(transform * psf, s=(_CANVAS, _CANVAS))).transpose(1, 2, 0)
        return np.ascontiguousarray(image, dtype=np.float32)

    rest = image_of(scipy.fft.rfft2(scene))
    feature = params.get("feature")
    if feature is None:
        return rest, np.zeros_like(rest)
    transform = _feature_transform(feature["type"], feature["seed"], feature["radius_90_pixels"], feature["centre"])
    return rest, image_of(np.asarray(feature["flux"], np.float32)[:, None, None] * transform[None])


def scene_noise(params):
    """The sky noise of a scene, from its own ``noise_seed``: the same for both twins of a pair."""
    rng = np.random.default_rng(params["noise_seed"])
    shape = (IMAGE_SIZE, IMAGE_SIZE, len(BANDS))
    return rng.standard_normal(shape, dtype=np.float32) * np.asarray(NOISE_SIGMA, np.float32)


def render_scene(params, noise_rng=None, include_feature=True):
    """Render a scene from its parameters (as stored in the truth's ``params``).

    Parameters
    ----------
    params : dict
        Scene parameters, as drawn by :func:`draw_scene`.
    noise_rng : numpy.random.Generator or True, optional
        Source of the sky noise; True takes the scene's own noise (:func:`scene_noise`), as
        :func:`render_tidal_galaxy` does; None renders the noiseless image.
    include_feature : bool
        False leaves the tidal feature out (the twin of a host-matched pair).

    Returns
    -------
    ndarray, shape (128, 128, 5), float32
        Counts per native pixel in g, r, i, z, y.
    """
    rest, feature = render_components(params)
    image = rest + feature if include_feature else rest
    if noise_rng is True:
        image = image + scene_noise(params)
    elif noise_rng is not None:
        image = image + noise_rng.standard_normal(image.shape, dtype=np.float32) * np.asarray(NOISE_SIGMA, np.float32)
    return image


def feature_visibility(feature, rest, noise_sigma=NOISE_SIGMA, bands=VISIBILITY_BANDS):
    """How visible a feature is against the sky noise and the light beneath it.

    Parameters
    ----------
    feature, rest : ndarray, shape (H, W, 5)
        Noiseless counts of the feature alone and of everything else in the scene.
    noise_sigma : sequence of float
        Sky noise per band (counts per pixel).
    bands : sequence of int
        Bands summed into the detection image.

    Returns
    -------
    dict
        ``snr`` (integrated S/N of the feature over its footprint), ``contrast`` (its light over
        that of everything else in the footprint), ``footprint_pixels`` and ``visible``
        (``snr >= VISIBLE_MIN_SNR and contrast >= VISIBLE_MIN_CONTRAST``); zeros and False
        when no pixel reaches the footprint threshold.
    """
    bands = list(bands)
    sigma = float(np.sqrt(np.sum(np.asarray(noise_sigma, dtype=np.float64)[bands] ** 2)))
    detection = np.asarray(feature, dtype=np.float64)[..., bands].sum(axis=-1)
    footprint = detection >= FOOTPRINT_THRESHOLD * sigma
    pixels = int(footprint.sum())
    if pixels == 0:
        return {"snr": 0.0, "contrast": 0.0, "footprint_pixels": 0, "visible": False}
    light = float(detection[footprint].sum())
    beneath = float(np.asarray(rest, dtype=np.float64)[..., bands].sum(axis=-1)[footprint].clip(min=0).sum())
    snr = light / (sigma * np.sqrt(pixels))
    contrast = light / beneath if beneath > 0 else float("inf")
    visible = bool(snr >= VISIBLE_MIN_SNR and contrast >= VISIBLE_MIN_CONTRAST)
    return {"snr": float(snr), "contrast": float(min(contrast, 1e6)), "footprint_pixels": pixels, "visible": visible}


def _host_flux_i(host):
    """i-band counts of the host on the canvas (its profile beyond the canvas does not count)."""
    scene = np.zeros((len(BANDS), _CANVAS, _CANVAS), dtype=np.float32)
    for component in host["components"]:
        _add_component(scene, component)
    return float(scene[2].sum(dtype=np.float64))


def draw_scene(rng, has_tidal=None):
    """Draw the parameters of one scene.

    Parameters
    ----------
    rng : numpy.random.Generator
    has_tidal : bool, optional
        Whether the host has a tidal feature; None draws it with probability
        :data:`TIDAL_FRACTION`.

    Returns
    -------
    dict
        JSON-ready parameters: ``host``, ``neighbours``, ``stars``, ``psf``, ``feature``
        (None without a feature).
    """
    # Whether the host has a feature is drawn independently of the host (TIDAL_MASS_SLOPE = 0);
    # with a slope, a forced outcome redraws the host so that both classes keep their populations.
    while True:
        log_mass = _draw_log_mass(rng)
        drawn = bool(rng.uniform() < tidal_probability(log_mass))
        if has_tidal is None or drawn == bool(has_tidal) or TIDAL_MASS_SLOPE == 0:
            break
    has_tidal = drawn if has_tidal is None else bool(has_tidal)
    host = _draw_host(rng, log_mass)
    psf = _draw_psf(rng)
    params = {"host": host, "neighbours": _draw_neighbours(rng, host), "stars": _draw_stars(rng), "psf": psf}
    params["feature"] = _draw_feature(rng, host, _host_flux_i(host), psf) if has_tidal else None
    params["noise_seed"] = int(rng.integers(2**63))
    return params


def _truth(params, rest, feature):
    """The truth of a rendered scene (see :func:`render_tidal_galaxy`)."""
    drawn = params["feature"]
    truth = {
        "has_tidal": int(drawn is not None),
        "feature_type": drawn["type"] if drawn else "none",
        "feature_sb": drawn["mean_sb"] if drawn else float("nan"),
        "feature_light_fraction": drawn["light_fraction"] if drawn else float("nan"),
        "feature_snr": float("nan"),
        "feature_contrast": float("nan"),
        "visible": 0,
        "pair_id": "",
        "params": params,
    }
    if drawn is not None:
        visibility = feature_visibility(feature, rest)
        truth.update(feature_snr=visibility["snr"], feature_contrast=visibility["contrast"],
                     visible=int(visibility["visible"]))
    return truth


def render_tidal_galaxy(rng, has_tidal=None):
    """Render one mock HSC Ultradeep cutout of a galaxy, with a tidal feature or not.

    Parameters
    ----------
    rng : numpy.random.Generator or int or None
        Source of all randomness (an int or None is passed to ``np.random.default_rng``).
    has_tidal : bool, optional
        Force a tidal feature (True) or none (False); None draws one with probability
        :data:`TIDAL_FRACTION`.

    Returns
    -------
    image : ndarray, shape (128, 128, 5), float32
        Counts per native 0.168" pixel (zero point 27) in g, r, i, z, y, with sky noise.
    truth : dict
        ``has_tidal`` (int 0/1), ``feature_type`` (none, shell, stream, tail, plume),
        ``feature_sb`` (intensity-weighted mean i-band surface brightness of the feature,
        mag/arcsec^2), ``feature_light_fraction``, ``feature_snr``, ``feature_contrast``
        (NaN without a feature), ``visible`` (int 0/1, see :func:`feature_visibility`),
        ``pair_id`` ("" for a single galaxy) and ``params`` (the scene parameters, a
        JSON-ready dict that :func:`render_scene` renders again).
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    if has_tidal is not None and not isinstance(has_tidal, (bool, np.bool_)):
        raise ValueError(f"has_tidal must be True, False or None, got {has_tidal!r}")
    params = draw_scene(rng, has_tidal)
    rest, feature = render_components(params)
    return rest + feature + scene_noise(params), _truth(params, rest, feature)


#: Scenes drawn at most to find one whose feature is visible (:func:`render_tidal_pair`).
VISIBLE_MAX_TRIES = 1000


def render_tidal_pair(rng, pair_id="", visible=None):
    """Render one scene with a tidal feature twice: with it, and without it (host-matched twins).

    The twins share the host, neighbours, stars, PSF and noise realisation; they differ by the
    feature's light alone. On such pairs any statistic of the host alone scores AUC 0.5.

    Parameters
    ----------
    rng : numpy.random.Generator or int or None
    pair_id : str
        Recorded in both truths.
    visible : bool, optional
        True redraws the scene until its feature is visible (:func:`feature_visibility`), as the
        features people label are; the host population of such pairs leans to bright hosts,
        shared by both twins.

    Returns
    -------
    image_with, image_without : ndarray, shape (128, 128, 5), float32
    truth_with, truth_without : dict
        As :func:`render_tidal_galaxy`; both carry ``pair_id`` and the same ``params``
        (``truth_without`` has ``has_tidal`` 0 and no feature columns).
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    for _ in range(VISIBLE_MAX_TRIES if visible else 1):
        params = draw_scene(rng, True)
        rest, feature = render_components(params)
        if not visible or feature_visibility(feature, rest)["visible"]:
            break
    else:
        raise RuntimeError(f"no visible feature in {VISIBLE_MAX_TRIES} scenes")
    noise = scene_noise(params)
    truth_with = dict(_truth(params, rest, feature), pair_id=pair_id)
    truth_without = dict(_truth(dict(params, feature=None), rest, feature), pair_id=pair_id, params=params)
    return rest + feature + noise, rest + noise, truth_with, truth_without


# ----------------------------------------------------------------------------------------
# Preview


def _display(image):
    """RGB (i, r, g) with an arcsinh stretch in units of each band's noise, so faint light shows."""
    channels = []
    for band in (2, 1, 0):
        scaled = np.arcsinh(image[..., band] / (NOISE_SIGMA[band])) / np.arcsinh(3000.0)
        channels.append(np.clip(scaled, 0.0, 1.0))
    return np.stack(channels, axis=-1)


def preview_panel(image, truth):
    """A panel of :func:`data.profiles.draw_preview`: the cutout in gri (:func:`_display`) captioned
    with its feature type and mean SB (i, mag/arcsec^2), in red when it has a feature."""
    caption = f"{truth['feature_type']} {truth['feature_sb']:.1f}" if truth.get("has_tidal") else "no feature"
    return _display(np.asarray(image)), caption, "C3" if truth.get("has_tidal") else "black"


#: Title of a preview of tidal galaxies.
PREVIEW_TITLE = "gri; title: feature type, mean SB (i, mag/arcsec$^2$)"


# ----------------------------------------------------------------------------------------
# Files


def write_tidal_hdf5(path, images, truths, ids):
    """Write tidal cutouts in the stacked HDF5 layout, atomically (temporary file, then rename).

    Layout: ``image`` (N, 128, 128, 5) float32 counts in g, r, i, z, y (file attribute
    ``bands = "grizy"``), ``id`` (N,) text, and the columns of :func:`truth_columns`.

    Parameters
    ----------
    path : str or path-like
    images : sequence of ndarray, shape (128, 128, 5)
    truths : sequence of dict
        As returned by :func:`render_tidal_galaxy`.
    ids : sequence of str
    """
    import tidal_data

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, len(BANDS)):
        raise ValueError(f"images must be (N, {IMAGE_SIZE}, {IMAGE_SIZE}, {len(BANDS)}), got shape {images.shape}")
    if not len(images) == len(truths) == len(ids):
        raise ValueError(
            f"images, truths and ids must have the same length, got {len(images)}, {len(truths)} and {len(ids)}"
        )
    tidal_data.write_tidal_hdf5(path, images, ids, truth_columns(truths))


def truth_columns(truths):
    """The columns of the tidal layout from truth dicts of :func:`render_tidal_galaxy`: ``has_tidal``
    (int), ``feature_type`` (text), ``feature_sb``, ``feature_light_fraction``, ``feature_snr``,
    ``feature_contrast`` (float, NaN without a feature), ``visible`` (int), ``pair_id`` (text, ""
    outside a pair) and ``params`` (JSON text)."""
    floats = ("feature_sb", "feature_light_fraction", "feature_snr", "feature_contrast")
    columns = {"has_tidal": np.asarray([int(t["has_tidal"]) for t in truths], dtype=np.int64),
               "feature_type": [str(t["feature_type"]) for t in truths]}
    for name in floats:
        columns[name] = np.asarray([float(t.get(name, np.nan)) for t in truths], dtype=np.float64)
    columns["visible"] = np.asarray([int(t.get("visible", 0)) for t in truths], dtype=np.int64)
    columns["pair_id"] = [str(t.get("pair_id", "")) for t in truths]
    columns["params"] = [json.dumps(t["params"], sort_keys=True) for t in truths]
    return columns
