"""Host-matched pairs of mock HSC cutouts, with and without a tidal feature, rendered with GalSim.

A second renderer of tidal galaxies, written apart from :mod:`data.tidal` so that a detector
trained on one can be tested on the other without having learnt the first one's quirks. Each
call renders one scene twice: ``image_with`` holds the tidal feature, ``image_without`` does not,
and everything else (host, neighbours, stars, PSF and the very same noise array) is shared, so
the twins differ by the feature's light alone.

Images follow the project's tidal layout: 128 x 128 native 0.168" pixels (21.5" across) in
g, r, i, z, y, counts at zero point 27 (counts = 10**(-0.4 (mag - 27))), arrays indexed
(row, column, band), the host centred at pixel (63.5, 63.5), pixel (i, j) centred on (j, i).

Scene
-----
* Host: i magnitude 16.5-21.5 (counts rising 0.25 dex/mag, a stand-in for log M*/Msun >= 9.5
  at z <= 0.4), half-light radius 0.5-4" (1.4" at i = 19, shrinking 0.16 dex/mag, 0.12 dex
  scatter). Early types (30% of the faintest hosts, 70% of the brightest) are a
  ``galsim.Spergel`` spheroid (nu -0.6..0, axis ratio 0.5-1); late types an
  ``galsim.Exponential`` disc (axis ratio 0.3-1) with a ``galsim.Spergel`` bulge (nu -0.6..-0.2,
  0.15-0.3 of the disc's radius, 5-35% of the i light, redder). Colours g-r 0.5-1.3,
  r-i 0.2-0.5, i-z 0.05-0.3, z-y 0.0-0.15 from blue to red.
* Neighbours: field galaxies of i = 19-26 (30 per arcmin^2 brighter than 25, counts rising
  0.3 dex/mag; about 12 per scene) over the cutout and a 16-pixel margin, none within 2" of the
  host; ``galsim.Exponential`` (70%) or ``galsim.Spergel`` (nu -0.5..0.3). A star (i = 17-24)
  in 40% of the scenes, the PSF alone.
* PSF, per band: ``galsim.Kolmogorov`` convolved with a small ``galsim.Gaussian`` (sigma
  0.05-0.10", optics and guiding), total FWHM 0.55-0.95" in i and within a few per cent of it
  (3% scatter, at most 8%) in the other bands.
* Noise: Gaussian sky noise of sigma 0.017, 0.020, 0.022, 0.061, 0.089 counts per pixel in
  g, r, i, z, y times a factor 0.8-1.3 per image, and in half the images a plane sky residual
  rising from -A to +A sigma across the cutout (A up to 0.2). The noise is drawn once per pair
  from its own seed (``params["noise"]["seed"]``) and added to both twins.
* Feature, always present in ``image_with``, one of (probabilities 0.25 each)

  - shell: 1-3 concentric arcs about the host at 3-10", 90-200 degrees each, a sharp outer
    edge (0.06") and light fading inwards over 8-20% of the radius, alternating sides in 70%
    of the systems;
  - stream: a band 0.3-1" wide (FWHM) and 8-20" long along an ellipse centred on the host
    (a projected great circle, with a slight lopsidedness) whose closest approach is 3-9";
  - tail: a band leaving the host's edge (1.5 half-light radii, 1-3") and curving (0.3-1.2 rad)
    outwards to 5-10", 0.3-0.8" wide at its root and 2.5-4 times wider at its end, fading
    outwards;
  - plume: a diffuse fan (Gaussian in angle, FWHM 30-70 degrees, slightly bent) from the
    host's edge out to 4-9".

  It holds a share of the host's i light (in the cutout, after the PSF) drawn log-uniformly in
  1-5%, whatever the host, with the host's colours or bluer ones (g-r up to 0.25 mag bluer).
  Its size is then rescaled within the ranges above, where they allow, so that its mean surface
  brightness (below) lies in 24.5-28 mag/arcsec^2 in i; the realised value is recorded.

How it differs from :mod:`data.tidal`
-------------------------------------
=================  ==================================  ===========================================
                   :mod:`data.tidal`                    this module
=================  ==================================  ===========================================
host profiles      Sersic (n 0.8-5.5), numpy on a       GalSim Spergel spheroids and Exponential
                   sub-sampled pixel grid               discs with Spergel bulges, drawn by GalSim
host population    Schechter mass function, redshift,   i magnitude 16.5-21.5 and size 0.5-4"
                   mass-size relations, M/L             drawn directly
neighbours         Sersic, 40 per arcmin^2 < 25 mag,     Exponential/Spergel, 30 per arcmin^2 < 25
                   companions, stars binned as points   mag, stars as the PSF (GalSim)
PSF                Moffat (beta 2.5-4), numpy FFT       Kolmogorov x Gaussian (GalSim), FWHM
                                                        0.55-0.95" in i
feature geometry   point clouds (6000 points, or a      analytic maps on a 0.084" grid: polar
                   test-particle stream) binned and     profiles (shells, plumes) and sums of
                   Gaussian-smoothed                    separable Gaussian blobs along parametric
                                                        curves (streams, tails), drawn through
                                                        ``galsim.InterpolatedImage``
feature light      SB drawn (25-27.5), size from a      light share drawn (1-5%), size from the
                   2% (0.5-8%) light share              SB window 24.5-28
noise              fixed per-band sigma                 sigma x 0.8-1.3 per image, plane sky
                                                        residual in half the images
=================  ==================================  ===========================================

The two share no rendering code: only the constants of :mod:`hsc` (pixel scale, zero point), the
file and plot plumbing (:mod:`tidal_data`, :mod:`common`, :mod:`plots`) and, for the visibility of
a feature, :func:`data.tidal.feature_visibility` (one definition of ``visible`` for both renderers).

Truth
-----
``feature_sb`` is the intensity-weighted mean surface brightness of the PSF-convolved, noiseless
feature in i inside the cutout, I_mean = sum(I^2) / sum(I), SB = 27 - 2.5 log10(I_mean / 0.168^2).
``feature_light_fraction`` is the feature's i light over the host's, both in the cutout.
``visible``, ``feature_snr`` and ``feature_contrast`` come from the visibility measure (the
feature alone against the noiseless rest of the scene and this image's sky noise).

Command line
------------
python -m data.tidal_galsim --n 200 --seed 1 --out galsim_pairs.h5 --preview galsim_pairs.png
"""

import common

if __name__ in common.MAIN_NAMES:
    common.quiet_interrupt()  # a Ctrl-C while the libraries load is one line, not a traceback

import argparse
import json
import logging
import math
import sys
import time

import galsim
import numpy as np
import scipy.special

import hsc
from data.tidal import feature_visibility

logger = logging.getLogger(__name__)

#: Band names, in the order of the image's last axis.
BANDS = "grizy"
#: Side of the cutout in native pixels, and the pixel scale (arcsec).
IMAGE_SIZE = 128
PIXEL_SCALE = hsc.PIXEL_SCALE
#: Centre of the cutout (pixel coordinates, row and column alike).
CENTRE = (IMAGE_SIZE - 1) / 2.0
#: Neighbours and stars are placed over the cutout and this margin (pixels) on every side.
MARGIN = 16

#: Sky noise per native pixel, counts, in g, r, i, z, y; its per-image factor range.
NOISE_SIGMA = (0.017, 0.020, 0.022, 0.061, 0.089)
NOISE_FACTOR_RANGE = (0.8, 1.3)
#: Probability of a plane sky residual, and its largest half-amplitude across the cutout (sigma).
SKY_GRADIENT_PROBABILITY = 0.5
SKY_GRADIENT_MAX = 0.2

#: Host i magnitude range and the slope of the host counts (dex/mag).
HOST_MAG_RANGE = (16.5, 21.5)
HOST_MAG_SLOPE = 0.25
#: Half-light radius (arcsec) at i = 19, its slope (dex/mag), scatter (dex) and range.
HOST_SIZE = (1.4, -0.16, 0.12, (0.5, 4.0))
#: Colour ranges g-r, r-i, i-z, z-y, from the bluest to the reddest hosts.
COLOUR_RANGES = ((0.5, 1.3), (0.2, 0.5), (0.05, 0.3), (0.0, 0.15))
#: Largest bluing of a feature relative to its host (g-r, r-i, i-z, z-y).
FEATURE_BLUING = (0.25, 0.10, 0.05, 0.03)

#: Field galaxies per arcmin^2 brighter than 25 (i), the slope of the counts and the magnitudes.
GALAXY_DENSITY = (30.0, 0.3)
GALAXY_MAG_RANGE = (19.0, 26.0)
#: No neighbour centre lies closer than this to the host (arcsec).
NEIGHBOUR_MIN_DISTANCE = 2.0
#: Probability of a star in the scene and its magnitude range (i).
STAR_PROBABILITY = 0.4
STAR_MAG_RANGE = (17.0, 24.0)

#: PSF: total i-band FWHM range (arcsec), per-band scatter and limit, optics Gaussian sigma range.
PSF_FWHM_RANGE = (0.55, 0.95)
PSF_BAND_SCATTER = (0.03, 0.08)
PSF_OPTICS_SIGMA = (0.05, 0.10)

#: Feature kinds, their probabilities, and the range of their share of the host's light.
FEATURE_TYPES = ("shell", "stream", "tail", "plume")
FEATURE_TYPE_PROBABILITIES = (0.25, 0.25, 0.25, 0.25)
FEATURE_LIGHT_FRACTION_RANGE = (0.01, 0.05)
#: The feature's size is adjusted to keep its mean i surface brightness in this window (mag/arcsec^2).
FEATURE_SB_WINDOW = (24.5, 28.0)
#: The feature maps: side (pixels) and pixel scale (arcsec, half the native one).
MAP_SIZE = 272
MAP_SCALE = PIXEL_SCALE / 2.0

#: GalSim accuracy: looser than the defaults, far below the sky noise, five times faster.
GSPARAMS = galsim.GSParams(folding_threshold=1e-2, maxk_threshold=2e-3)


# ----------------------------------------------------------------------------------------
# Photometry


def mag_to_counts(mag):
    """Counts of a source of AB magnitude ``mag`` at the zero point 27."""
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - hsc.ZERO_POINT))


def intensity_weighted_sb(image):
    """Intensity-weighted mean surface brightness (mag/arcsec^2) of noiseless counts per pixel:
    I_mean = sum(I^2) / sum(I), SB = 27 - 2.5 log10(I_mean / 0.168^2)."""
    image = np.clip(np.asarray(image, dtype=np.float64), 0.0, None)
    total = image.sum()
    if total <= 0:
        return float("inf")
    return float(hsc.ZERO_POINT - 2.5 * np.log10(np.sum(image * image) / total / PIXEL_SCALE**2))


def _band_ratios(colours):
    """Flux in g, r, i, z, y over the i flux for colours g-r, r-i, i-z, z-y."""
    g_r, r_i, i_z, z_y = colours
    offsets = np.array([g_r + r_i, r_i, 0.0, -i_z, -i_z - z_y])
    return 10.0 ** (-0.4 * offsets)


# ----------------------------------------------------------------------------------------
# Drawing the scene


def _power_law_mags(rng, count, slope, bright, faint):
    """``count`` magnitudes with counts rising as 10^(slope m) between ``bright`` and ``faint``."""
    low, high = 10.0 ** (slope * bright), 10.0 ** (slope * faint)
    return np.log10(low + rng.uniform(size=count) * (high - low)) / slope


def _draw_host(rng):
    mag_i = float(_power_law_mags(rng, 1, HOST_MAG_SLOPE, *HOST_MAG_RANGE)[0])
    size_at_19, slope, scatter, (small, large) = HOST_SIZE
    hlr = float(np.clip(size_at_19 * 10.0 ** (slope * (mag_i - 19.0) + rng.normal(0.0, scatter)), small, large))
    brightness = (HOST_MAG_RANGE[1] - mag_i) / (HOST_MAG_RANGE[1] - HOST_MAG_RANGE[0])
    early_type = bool(rng.uniform() < 0.3 + 0.4 * brightness)
    redness = rng.uniform(0.6, 1.0) if early_type else rng.uniform(0.0, 0.5)
    colours = [float(np.clip(low + redness * (high - low) + rng.normal(0.0, 0.03), low, high))
               for low, high in COLOUR_RANGES]
    host = {"mag_i": mag_i, "half_light_radius": hlr, "early_type": early_type, "redness": float(redness),
            "colours": colours, "position_angle": float(rng.uniform(0.0, np.pi))}
    if early_type:
        host.update(nu=float(rng.uniform(-0.6, 0.0)), q=float(rng.uniform(0.5, 1.0)))
    else:
        host.update(q=float(rng.uniform(0.3, 1.0)), bulge_fraction=float(rng.uniform(0.05, 0.35)),
                    bulge_nu=float(rng.uniform(-0.6, -0.2)), bulge_radius=float(hlr * rng.uniform(0.15, 0.3)),
                    bulge_q=float(rng.uniform(0.6, 1.0)),
                    bulge_colours=[float(high) for _, high in COLOUR_RANGES])
    return host


def _draw_psf(rng):
    fwhm_i = rng.uniform(*PSF_FWHM_RANGE)
    scatter, limit = PSF_BAND_SCATTER
    factors = 1.0 + np.clip(rng.normal(0.0, scatter, len(BANDS)), -limit, limit)
    factors[BANDS.index("i")] = 1.0
    optics = rng.uniform(*PSF_OPTICS_SIGMA)
    fwhm = fwhm_i * factors
    # FWHMs add nearly in quadrature: the Kolmogorov part makes up the rest of the total.
    atmosphere = np.sqrt(fwhm**2 - (2.3548 * optics) ** 2)
    return {"fwhm": [float(f) for f in fwhm], "kolmogorov_fwhm": [float(f) for f in atmosphere],
            "optics_sigma": float(optics)}


def _random_position(rng, min_distance):
    """A position (arcsec from the host) over the cutout and its margin, at least ``min_distance`` away."""
    half = (IMAGE_SIZE / 2.0 + MARGIN) * PIXEL_SCALE
    while True:
        x, y = rng.uniform(-half, half, 2)
        if math.hypot(x, y) >= min_distance:
            return float(x), float(y)


def _draw_neighbours(rng):
    density_25, slope = GALAXY_DENSITY
    bright, faint = GALAXY_MAG_RANGE
    area = ((IMAGE_SIZE + 2 * MARGIN) * PIXEL_SCALE / 60.0) ** 2
    expected = density_25 * (10.0 ** (slope * (faint - 25.0)) - 10.0 ** (slope * (bright - 25.0))) * area
    neighbours = []
    for mag in _power_law_mags(rng, rng.poisson(expected), slope, bright, faint):
        x, y = _random_position(rng, NEIGHBOUR_MIN_DISTANCE)
        redness = rng.uniform()
        colours = [float(low + redness * (high - low) + rng.normal(0.0, 0.1)) for low, high in COLOUR_RANGES]
        spergel = bool(rng.uniform() < 0.3)
        size = 0.5 * 10.0 ** (-0.12 * (mag - 22.0) + rng.normal(0.0, 0.15))
        neighbours.append({
            "x": x, "y": y, "mag_i": float(mag), "colours": colours,
            "half_light_radius": float(np.clip(size, 0.15, 2.5)),
            "nu": float(rng.uniform(-0.5, 0.3)) if spergel else None,
            "q": float(rng.uniform(0.3, 1.0)), "position_angle": float(rng.uniform(0.0, np.pi)),
        })
    return neighbours


def _draw_stars(rng):
    if rng.uniform() >= STAR_PROBABILITY:
        return []
    x, y = _random_position(rng, 3.0)
    g_r = rng.uniform(0.3, 1.4)
    colours = [float(g_r), float(0.5 * g_r - 0.1), float(0.15 * g_r + 0.05), float(0.08 * g_r)]
    return [{"x": x, "y": y, "mag_i": float(rng.uniform(*STAR_MAG_RANGE)), "colours": colours}]


def _draw_noise(rng):
    gradient = None
    if rng.uniform() < SKY_GRADIENT_PROBABILITY:
        gradient = {"amplitude": float(rng.uniform(0.0, SKY_GRADIENT_MAX)),
                    "angle": float(rng.uniform(0.0, 2 * np.pi))}
    return {"seed": int(rng.integers(2**31)), "factor": float(rng.uniform(*NOISE_FACTOR_RANGE)), "gradient": gradient}


# ----------------------------------------------------------------------------------------
# Feature geometry: maps in arcsec about the host, on a grid of MAP_SIZE pixels of MAP_SCALE


def _map_axis():
    return (np.arange(MAP_SIZE) - (MAP_SIZE - 1) / 2.0) * MAP_SCALE


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _wrap(angle):
    return (angle + np.pi) % (2.0 * np.pi) - np.pi


def _polar():
    axis = _map_axis()
    x, y = np.meshgrid(axis, axis)
    return np.hypot(x, y), np.arctan2(y, x)


def _blob_map(x, y, width, weight):
    """Sum of circular Gaussians of FWHM ``width`` and flux ``weight`` centred on (x, y), as a map.

    Each Gaussian is the product of a row and a column profile, so the whole sum is one matrix
    product: map = (G_y^T diag(w)) G_x.
    """
    axis = _map_axis()
    sigma = np.asarray(width) / 2.3548
    columns = np.exp(-0.5 * ((axis[None, :] - np.asarray(x)[:, None]) / sigma[:, None]) ** 2)
    rows = np.exp(-0.5 * ((axis[None, :] - np.asarray(y)[:, None]) / sigma[:, None]) ** 2)
    rows *= (np.asarray(weight) / (2.0 * np.pi * sigma**2))[:, None]
    return rows.T @ columns


def _along_curve(x, y, step):
    """Resample the polyline (x, y) at equal arc-length steps; returns the new points and their
    fractional position 0..1 along it."""
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
    count = max(int(np.ceil(arc[-1] / step)) + 1, 2)
    s = np.linspace(0.0, arc[-1], count)
    return np.interp(s, arc, x), np.interp(s, arc, y), s / arc[-1], arc[-1] / (count - 1)


def _shell_map(geometry):
    r, phi = _polar()
    image = np.zeros_like(r)
    for shell in geometry["shells"]:
        radius, half = shell["radius"], np.radians(shell["opening"]) / 2.0
        # Sharp outer edge (0.06"), light fading inwards over a scale length.
        edge = 0.5 * scipy.special.erfc((r - radius) / (np.sqrt(2.0) * 0.06))
        radial = np.exp(-np.clip(radius - r, 0.0, None) / shell["fade"]) * edge
        angular = _smoothstep((half - np.abs(_wrap(phi - shell["side"]))) / (0.3 * half))
        image += shell["amplitude"] * radial * angular
    return image


def _stream_map(geometry):
    a, b, e = geometry["semi_major"], geometry["closest"], geometry["lopsidedness"]
    theta = np.linspace(-np.pi, np.pi, 4001) + geometry["arc_centre"]
    scale = 1.0 + e * np.cos(theta - geometry["lopsided_angle"])
    ex, ey = a * np.cos(theta) * scale, b * np.sin(theta) * scale
    # Centre the band of the required length on arc_centre.
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(ex), np.diff(ey)))])
    middle = np.interp(0.0, theta - geometry["arc_centre"], arc)
    keep = np.abs(arc - middle) <= geometry["length"] / 2.0
    c, s = np.cos(geometry["position_angle"]), np.sin(geometry["position_angle"])
    x, y = c * ex[keep] - s * ey[keep], s * ex[keep] + c * ey[keep]
    width = geometry["width"]
    x, y, t, step = _along_curve(x, y, 0.2 * width)
    # Ends taper over 15% of the length; the density ripples gently along the stream.
    taper = _smoothstep(np.minimum(t, 1.0 - t) / 0.15)
    ripple = 1.0 + geometry["ripple"] * np.sin(2.0 * np.pi * geometry["ripple_waves"] * t + geometry["ripple_phase"])
    return _blob_map(x, y, np.full(x.shape, width), taper * ripple * step)


def _tail_map(geometry):
    t = np.linspace(0.0, 1.0, 2001)
    start, end = geometry["start"], geometry["end"]
    radius = start + (end - start) * t
    angle = geometry["angle"] + geometry["curvature"] * t
    x, y, t, step = _along_curve(radius * np.cos(angle), radius * np.sin(angle), 0.2 * geometry["width"])
    width = geometry["width"] * (1.0 + (geometry["widening"] - 1.0) * t)
    density = np.exp(-t / geometry["fade"]) * (1.0 - np.exp(-t / 0.05))
    return _blob_map(x, y, width, density * step)


def _plume_map(geometry):
    r, phi = _polar()
    start, end = geometry["start"], geometry["end"]
    direction = geometry["angle"] + geometry["bend"] * (r - start) / end
    sigma = np.radians(geometry["opening"]) / 2.3548
    angular = np.exp(-0.5 * (_wrap(phi - direction) / sigma) ** 2)
    radial = (_smoothstep((r - start) / 1.0) * np.exp(-np.clip(r - start, 0.0, None) / geometry["fade"])
              * 0.5 * scipy.special.erfc((r - end) / (np.sqrt(2.0) * 0.4)))
    return radial * angular


_FEATURE_MAPS = {"shell": _shell_map, "stream": _stream_map, "tail": _tail_map, "plume": _plume_map}


def _draw_geometry(rng, feature_type, host):
    """The feature's shape parameters (arcsec, radians, degrees for openings) at its drawn size."""
    edge = float(np.clip(1.5 * host["half_light_radius"], 1.0, 3.0))
    if feature_type == "shell":
        count = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
        alternate = bool(rng.uniform() < 0.7)
        side = rng.uniform(-np.pi, np.pi)
        return {"outer_radius": float(rng.uniform(3.0, 10.0)), "ratio": float(rng.uniform(0.6, 0.8)), "count": count,
                "fade": float(rng.uniform(0.08, 0.2)),
                "sides": [float(_wrap(side + (np.pi * k if alternate else 0.0) + rng.normal(0.0, 0.2)))
                          for k in range(count)],
                "openings": [float(rng.uniform(90.0, 200.0)) for _ in range(count)]}
    if feature_type == "stream":
        closest = float(rng.uniform(3.0, 9.0))
        lopsidedness = float(rng.uniform(0.0, 0.1))
        top = 10.0 / (1.0 + lopsidedness)
        return {"closest": closest, "semi_major": float(rng.uniform(min(closest, top), top)),
                "lopsidedness": lopsidedness, "lopsided_angle": float(rng.uniform(-np.pi, np.pi)),
                "arc_centre": float(np.pi / 2.0 + rng.uniform(-0.5, 0.5)),
                "position_angle": float(rng.uniform(0.0, 2.0 * np.pi)),
                "width": float(rng.uniform(0.3, 1.0)), "length": float(rng.uniform(8.0, 20.0)),
                "ripple": float(rng.uniform(0.0, 0.3)), "ripple_waves": float(rng.uniform(1.0, 3.0)),
                "ripple_phase": float(rng.uniform(0.0, 2.0 * np.pi))}
    if feature_type == "tail":
        return {"start": edge, "end": float(rng.uniform(5.0, 10.0)), "angle": float(rng.uniform(-np.pi, np.pi)),
                "curvature": float(rng.uniform(0.3, 1.2) * rng.choice([-1.0, 1.0])),
                "width": float(rng.uniform(0.3, 0.8)), "widening": float(rng.uniform(2.5, 4.0)),
                "fade": float(rng.uniform(0.35, 1.0))}
    return {"start": edge, "end": float(rng.uniform(4.0, 9.0)), "angle": float(rng.uniform(-np.pi, np.pi)),
            "opening": float(rng.uniform(30.0, 70.0)), "bend": float(rng.uniform(-0.4, 0.4)),
            "fade_fraction": float(rng.uniform(0.3, 0.6))}


#: Per kind, the size parameters that the SB window may rescale, and their ranges (arcsec).
_SIZE_RANGES = {
    "shell": {"outer_radius": (3.0, 10.0)},
    "stream": {"width": (0.3, 1.0), "length": (8.0, 20.0)},
    "tail": {"end": (5.0, 10.0), "width": (0.3, 0.8)},
    "plume": {"end": (4.0, 9.0)},
}


def _scale_limits(feature_type, geometry):
    """The range of size factors over which at least one size parameter can still change."""
    ranges = _SIZE_RANGES[feature_type]
    low = min(lo / geometry[key] for key, (lo, hi) in ranges.items())
    high = max(hi / geometry[key] for key, (lo, hi) in ranges.items())
    return low, high


def _map_geometry(feature_type, geometry, size_factor):
    """The geometry the map functions take, with the size parameters scaled (within their ranges)."""
    scaled = dict(geometry)
    for key, (low, high) in _SIZE_RANGES[feature_type].items():
        scaled[key] = float(np.clip(geometry[key] * size_factor, low, high))
    if feature_type == "shell":
        radii = [scaled["outer_radius"] * scaled["ratio"] ** k for k in range(scaled["count"])]
        scaled["shells"] = [
            {"radius": radius, "side": side, "opening": opening, "fade": scaled["fade"] * radius,
             # Inner shells are brighter per unit area.
             "amplitude": (radius / radii[0]) ** -0.5}
            for radius, side, opening in zip(radii, scaled["sides"], scaled["openings"]) if radius >= 3.0
        ] or [{"radius": radii[0], "side": scaled["sides"][0], "opening": scaled["openings"][0],
               "fade": scaled["fade"] * radii[0], "amplitude": 1.0}]
    elif feature_type == "stream":
        # The band never wraps round more than three quarters of its ellipse.
        a, b = scaled["semi_major"], scaled["closest"]
        perimeter = np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))
        scaled["length"] = float(min(scaled["length"], 0.75 * perimeter))
    elif feature_type == "tail":
        scaled["start"] = float(min(scaled["start"], 0.5 * scaled["end"]))
    else:
        scaled["start"] = float(min(scaled["start"], 0.5 * scaled["end"]))
        scaled["fade"] = scaled["fade_fraction"] * (scaled["end"] - scaled["start"])
    return scaled


def feature_map(feature_type, geometry, size_factor=1.0):
    """The feature's unit-flux surface-brightness map, (MAP_SIZE, MAP_SIZE), rows along y.

    Parameters
    ----------
    feature_type : {"shell", "stream", "tail", "plume"}
    geometry : dict
        Shape parameters, as in ``params["feature"]["geometry"]``.
    size_factor : float
        Factor on the size parameters (clipped to their ranges).
    """
    if feature_type not in _FEATURE_MAPS:
        raise ValueError(f"feature_type must be one of {FEATURE_TYPES}, got {feature_type!r}")
    image = _FEATURE_MAPS[feature_type](_map_geometry(feature_type, geometry, size_factor))
    image = np.clip(image, 0.0, None)
    return image / image.sum()


# ----------------------------------------------------------------------------------------
# Rendering with GalSim


def _psf(psf, band):
    return galsim.Convolve(galsim.Kolmogorov(fwhm=psf["kolmogorov_fwhm"][band], gsparams=GSPARAMS),
                           galsim.Gaussian(sigma=psf["optics_sigma"], gsparams=GSPARAMS), gsparams=GSPARAMS)


def _draw(profile, psf, band):
    """Noiseless counts of ``profile`` convolved with the PSF of ``band`` on the cutout grid."""
    image = galsim.Convolve(profile, _psf(psf, band), gsparams=GSPARAMS).drawImage(
        nx=IMAGE_SIZE, ny=IMAGE_SIZE, scale=PIXEL_SCALE)
    return image.array.astype(np.float64)


def _host_profile(host, band):
    total = float(mag_to_counts(host["mag_i"]) * _band_ratios(host["colours"])[band])
    shear = dict(q=host["q"], beta=host["position_angle"] * galsim.radians)
    if host["early_type"]:
        return galsim.Spergel(nu=host["nu"], half_light_radius=host["half_light_radius"], flux=total,
                              gsparams=GSPARAMS).shear(**shear)
    bulge_i = host["bulge_fraction"] * mag_to_counts(host["mag_i"])
    bulge = float(min(bulge_i * _band_ratios(host["bulge_colours"])[band], total))
    disc = galsim.Exponential(half_light_radius=host["half_light_radius"], flux=total - bulge,
                              gsparams=GSPARAMS).shear(**shear)
    bulge = galsim.Spergel(nu=host["bulge_nu"], half_light_radius=host["bulge_radius"], flux=bulge,
                           gsparams=GSPARAMS).shear(q=host["bulge_q"], beta=shear["beta"])
    return disc + bulge


def _field_profile(neighbours, stars, band):
    """The neighbours and stars (point sources: the PSF alone), or None if there are none."""
    parts = []
    for galaxy in neighbours:
        flux = float(mag_to_counts(galaxy["mag_i"]) * _band_ratios(galaxy["colours"])[band])
        if galaxy["nu"] is None:
            profile = galsim.Exponential(half_light_radius=galaxy["half_light_radius"], flux=flux, gsparams=GSPARAMS)
        else:
            profile = galsim.Spergel(nu=galaxy["nu"], half_light_radius=galaxy["half_light_radius"], flux=flux,
                                     gsparams=GSPARAMS)
        parts.append(profile.shear(q=galaxy["q"], beta=galaxy["position_angle"] * galsim.radians)
                     .shift(galaxy["x"], galaxy["y"]))
    for star in stars:
        flux = float(mag_to_counts(star["mag_i"]) * _band_ratios(star["colours"])[band])
        parts.append(galsim.DeltaFunction(flux=flux, gsparams=GSPARAMS).shift(star["x"], star["y"]))
    return galsim.Sum(parts, gsparams=GSPARAMS) if parts else None


def _feature_profile(unit_map):
    """A unit-flux GalSim profile of a feature map (its centre is the host's)."""
    return galsim.InterpolatedImage(galsim.Image(np.ascontiguousarray(unit_map), scale=MAP_SCALE), flux=1.0,
                                    pad_factor=2.0, calculate_stepk=False, calculate_maxk=False, gsparams=GSPARAMS)


def _fit_feature(rng, host, host_flux_i, psf, feature_type):
    """Draw the feature and rescale its size so that its mean SB falls in :data:`FEATURE_SB_WINDOW`
    where the size ranges allow; its flux is the drawn share of the host's light in the cutout."""
    geometry = _draw_geometry(rng, feature_type, host)
    low, high = FEATURE_LIGHT_FRACTION_RANGE
    light_fraction = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    bluing = float(rng.uniform())
    colours = [float(c - bluing * b) for c, b in zip(host["colours"], FEATURE_BLUING)]
    scale_low, scale_high = _scale_limits(feature_type, geometry)
    bright, faint = FEATURE_SB_WINDOW
    size_factor, trials = 1.0, []
    # SB = 5 log10(size) + constant for a feature much wider than the PSF, less steep otherwise:
    # the slope is measured from the trials (secant steps).
    slope = 5.0
    for _ in range(5):
        unit = _draw(_feature_profile(feature_map(feature_type, geometry, size_factor)), psf, 2)
        inside = float(unit.sum())
        sb = intensity_weighted_sb(unit * light_fraction * host_flux_i / inside)
        trials.append([size_factor, sb])
        if bright <= sb <= faint:
            break
        if len(trials) > 1:
            (previous_size, previous_sb), _ = trials[-2:]
            step = math.log10(size_factor / previous_size)
            if abs(step) > 1e-3:
                slope = float(np.clip((sb - previous_sb) / step, 1.0, 5.0))
        target = bright + 0.1 if sb < bright else faint - 0.1
        wanted = float(np.clip(size_factor * 10.0 ** ((target - sb) / slope), scale_low, scale_high))
        if math.isclose(wanted, size_factor, rel_tol=1e-3):
            break
        size_factor = wanted
    scaled = _map_geometry(feature_type, geometry, size_factor)
    return {
        "type": feature_type,
        "geometry": geometry,
        "size_factor": size_factor,
        "scaled_sizes": {key: scaled[key] for key in _SIZE_RANGES[feature_type]},
        "sb_trials": trials,
        "light_fraction_drawn": light_fraction,
        "bluing": bluing,
        "colours": colours,
        # The total flux in i, so that the light in the cutout is the drawn share of the host's.
        "flux_i": float(light_fraction * host_flux_i / inside),
    }


def draw_params(rng, feature_type=None):
    """Draw every parameter of a scene (JSON-ready); rendering the host and trial features in i to
    set the feature's flux and size.

    Parameters
    ----------
    rng : numpy.random.Generator
    feature_type : str, optional
        Force the feature's kind; drawn from :data:`FEATURE_TYPE_PROBABILITIES` by default.
    """
    host = _draw_host(rng)
    psf = _draw_psf(rng)
    neighbours = _draw_neighbours(rng)
    stars = _draw_stars(rng)
    noise = _draw_noise(rng)
    drawn_type = str(rng.choice(FEATURE_TYPES, p=FEATURE_TYPE_PROBABILITIES))
    feature_type = drawn_type if feature_type is None else feature_type
    if feature_type not in FEATURE_TYPES:
        raise ValueError(f"feature_type must be one of {FEATURE_TYPES}, got {feature_type!r}")
    host_flux_i = float(_draw(_host_profile(host, 2), psf, 2).sum())
    feature = _fit_feature(rng, host, host_flux_i, psf, feature_type)
    return {"generator": "data.tidal_galsim", "host": host, "host_flux_i_cutout": host_flux_i, "psf": psf,
            "neighbours": neighbours, "stars": stars, "noise": noise, "feature": feature}


def render_components(params):
    """The noiseless parts of a scene, each (128, 128, 5) float64 counts: ``host``, ``rest`` (host,
    neighbours and stars) and ``feature`` (the tidal feature alone), all PSF-convolved."""
    shape = (IMAGE_SIZE, IMAGE_SIZE, len(BANDS))
    host, rest, feature = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    spec = params["feature"]
    unit = _feature_profile(feature_map(spec["type"], spec["geometry"], spec["size_factor"]))
    ratios = _band_ratios(spec["colours"])
    for band in range(len(BANDS)):
        host[..., band] = _draw(_host_profile(params["host"], band), params["psf"], band)
        field = _field_profile(params["neighbours"], params["stars"], band)
        rest[..., band] = host[..., band] + (_draw(field, params["psf"], band) if field is not None else 0.0)
        feature[..., band] = _draw(unit.withFlux(spec["flux_i"] * ratios[band]), params["psf"], band)
    return {"host": host, "rest": rest, "feature": feature}


def noise_sigma(params):
    """The sky noise per band (counts per pixel) of this scene."""
    return [float(s * params["noise"]["factor"]) for s in NOISE_SIGMA]


def render_noise(params):
    """The sky noise of a scene, (128, 128, 5) float32, from its own seed: Gaussian noise and,
    sometimes, a plane residual."""
    sigma = np.asarray(noise_sigma(params), dtype=np.float32)
    rng = np.random.default_rng(params["noise"]["seed"])
    noise = rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE, len(BANDS)), dtype=np.float32) * sigma
    gradient = params["noise"]["gradient"]
    if gradient:
        offsets = (np.arange(IMAGE_SIZE) - CENTRE) / CENTRE
        plane = np.cos(gradient["angle"]) * offsets[None, :] + np.sin(gradient["angle"]) * offsets[:, None]
        noise += (gradient["amplitude"] * plane).astype(np.float32)[..., None] * sigma
    return noise


def render_pair(rng, feature_type=None, components=False):
    """Render one scene with and without its tidal feature, with the same noise.

    Parameters
    ----------
    rng : numpy.random.Generator or int or None
        Source of all randomness (an int or None is passed to ``np.random.default_rng``).
    feature_type : str, optional
        Force the kind of feature; drawn by default.
    components : bool
        Also return the noiseless parts (:func:`render_components`) and the noise.

    Returns
    -------
    image_with, image_without : ndarray, shape (128, 128, 5), float32
        Counts per native 0.168" pixel (zero point 27) in g, r, i, z, y, with sky noise.
    truth : dict
        JSON-ready: ``feature_type``, ``feature_sb`` (intensity-weighted mean i SB of the
        PSF-convolved feature in the cutout, mag/arcsec^2), ``feature_light_fraction`` (its i
        light over the host's, in the cutout), ``visible`` (0/1), ``feature_snr``,
        ``feature_contrast``, ``feature_footprint_pixels`` and ``params`` (every drawn parameter).
    parts : dict, only with ``components=True``
        ``host``, ``rest``, ``feature`` (noiseless, float64) and ``noise`` (float32).
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    params = draw_params(rng, feature_type)
    parts = render_components(params)
    noise = render_noise(params)
    image_without = parts["rest"].astype(np.float32) + noise
    image_with = (parts["rest"] + parts["feature"]).astype(np.float32) + noise
    visibility = feature_visibility(parts["feature"], parts["rest"], noise_sigma(params))
    truth = {
        "feature_type": params["feature"]["type"],
        "feature_sb": intensity_weighted_sb(parts["feature"][..., 2]),
        "feature_light_fraction": float(parts["feature"][..., 2].sum() / parts["host"][..., 2].sum()),
        "visible": int(bool(visibility["visible"])),
        "feature_snr": float(visibility["snr"]),
        "feature_contrast": float(visibility["contrast"]),
        "feature_footprint_pixels": int(visibility["footprint_pixels"]),
        "params": params,
    }
    if components:
        return image_with, image_without, truth, dict(parts, noise=noise)
    return image_with, image_without, truth


# ----------------------------------------------------------------------------------------
# Files


def pair_id(seed, index):
    return f"galsim-s{seed}-{index:07d}"


def write_pairs(path, n, seed, progress=True):
    """Render ``n`` pairs and write them to one HDF5 file in the tidal layout, atomically.

    Pair ``index`` draws from ``np.random.SeedSequence([seed, index])``. The twins are consecutive
    rows, ids ``galsim-s{seed}-{index:07d}-with`` and ``-without``, with the columns ``has_tidal``
    (1/0), ``feature_type`` ("none" without), ``feature_sb``, ``pair_id``, ``visible``,
    ``feature_snr``, ``feature_contrast``, ``feature_light_fraction`` (NaN, 0 or "none" for the
    twin without) and ``params`` (JSON text, the same for both twins).

    Returns
    -------
    list of dict
        The truth of each pair (:func:`render_pair`).
    """
    import tidal_data

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    images = np.empty((2 * n, IMAGE_SIZE, IMAGE_SIZE, len(BANDS)), dtype=np.float32)
    truths, ids = [], []
    for index in common.progress(range(n), desc="galsim pairs", unit="pair", disable=not progress):
        rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
        images[2 * index], images[2 * index + 1], truth = render_pair(rng)
        truths.append(truth)
        ids += [f"{pair_id(seed, index)}-with", f"{pair_id(seed, index)}-without"]

    def both(key, without, dtype=None):
        values = [value for truth in truths for value in (truth[key], without)]
        return values if dtype is None else np.asarray(values, dtype=dtype)

    nan = float("nan")
    columns = {
        "has_tidal": np.tile(np.asarray([1, 0], dtype=np.int64), n),
        "feature_type": both("feature_type", "none"),
        "feature_sb": both("feature_sb", nan, np.float64),
        "pair_id": [pair_id(seed, index) for index in range(n) for _ in range(2)],
        "visible": both("visible", 0, np.int64),
        "feature_snr": both("feature_snr", nan, np.float64),
        "feature_contrast": both("feature_contrast", nan, np.float64),
        "feature_light_fraction": both("feature_light_fraction", nan, np.float64),
        "params": [json.dumps(truth["params"], sort_keys=True) for truth in truths for _ in range(2)],
    }
    tidal_data.write_tidal_hdf5(path, images, ids, columns)
    return truths


def _display(image):
    """RGB (i, r, g) with an arcsinh stretch in units of each band's nominal noise."""
    channels = [np.clip(np.arcsinh(image[..., band] / NOISE_SIGMA[band]) / np.arcsinh(500.0), 0.0, 1.0)
                for band in (2, 1, 0)]
    return np.stack(channels, axis=-1)


def write_preview(h5_path, png_path, count=8):
    """A PNG grid of the first ``count`` pairs of a file of :func:`write_pairs`, each with and without
    its feature (gri, arcsinh stretch), captioned with the feature's kind, mean SB and visibility."""
    import h5py

    import plots

    with h5py.File(h5_path, "r") as f:
        rows = min(2 * count, len(f["image"]))
        images = f["image"][:rows]
        kinds = [k.decode() if isinstance(k, bytes) else str(k) for k in f["feature_type"][:rows]]
        sbs, visible = f["feature_sb"][:rows], f["visible"][:rows]
    pairs = rows // 2
    grid_rows = (pairs + 1) // 2
    figure, axes = plots.new_figure(grid_rows, 4, figsize=(8.0, 2.2 * grid_rows))
    axes = np.asarray(axes).reshape(grid_rows, 4)
    for axis in axes.ravel():
        axis.axis("off")
    for index in range(pairs):
        for twin in range(2):
            axis = axes[index // 2, 2 * (index % 2) + twin]
            row = 2 * index + twin
            axis.imshow(_display(images[row]), origin="lower")
            caption = "without"
            if twin == 0:
                caption = f"{kinds[row]} {sbs[row]:.1f}" + (" visible" if visible[row] else "")
            axis.set_title(caption, fontsize=7, color="C3" if twin == 0 else "black")
    figure.suptitle("GalSim pairs, gri; title: feature, mean SB (i, mag/arcsec$^2$)", fontsize=8)
    plots.save_figure(figure, png_path)


# ----------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m data.tidal_galsim",
        description="Render host-matched pairs of mock HSC cutouts, with and without a tidal feature, with GalSim.",
    )
    parser.add_argument("--n", type=int, required=True, help="number of pairs (twice as many cutouts)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", metavar="FILE.h5", required=True, help="output HDF5 file (tidal layout)")
    parser.add_argument("--preview", metavar="PNG", help="PNG grid of the first 8 pairs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    common.add_verbose_argument(parser)
    args = parser.parse_args(argv)
    try:
        if args.n < 1:
            raise ValueError(f"--n must be at least 1, got {args.n}")
        if args.seed < 0:
            raise ValueError(f"--seed must be non-negative, got {args.seed}")
        common.check_output_file(args.out, "--out")
        if args.preview:
            common.check_output_file(args.preview, "--preview")
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    truths = write_pairs(args.out, args.n, args.seed, progress=not args.quiet)
    elapsed = time.perf_counter() - started
    visible = np.mean([t["visible"] for t in truths])
    logger.info("wrote %d pairs to %s in %.1f s (%.2f s per pair); %.0f%% of the features visible",
                args.n, args.out, elapsed, elapsed / args.n, 100 * visible)
    if args.preview:
        write_preview(args.out, args.preview)
        logger.info("preview: %s", args.preview)
    return 0


if __name__ == "__main__":
    sys.exit(main())
