"""Mock HSC r-band cluster cutouts with known intracluster-light (ICL) truth, rendered with GalSim.

A second renderer of clusters, written apart from :mod:`data.clusters` so that an ICL regressor
trained on that module's mocks can be tested on clusters it has never seen the like of: other
profile families, other parameter distributions, another PSF, other noise, another drawing code.
A model that only learnt the first generator's quirks scores worse here than on its own test set.

Each mock is a square cutout of +-300 kpc (proper; FlatLambdaCDM H0 = 68.4, Om0 = 0.301, the
cosmology real cutouts are cut with) about a cluster at 0.1 <= z <= 0.5, at the native HSC pixel
scale of 0.168": an odd number of pixels, the one nearest to the 600 kpc span (1893 at z = 0.1,
1057 at 0.2, 783 at 0.3, 571 at 0.5), the cluster centre on the central pixel. Pixels are counts
at zero point 27 (counts = 10**(-0.4 (mag - 27))); pixel (row i, column j) is centred on
(x, y) = (j, i), so the centre is ((N - 1) / 2, (N - 1) / 2). The files are what a survey cutout
is (IMAGE, MASK, VARIANCE), for :mod:`prep_data` to read and resize like any real one.

Scene
-----
Magnitudes are r-band AB: M + distance modulus + k(z), with the red-galaxy k-correction of
:func:`hsc.k_correction` for every cluster galaxy.

* BCG at the centre: ``galsim.DeVaucouleurs`` (55%) or ``galsim.Spergel`` (45%, nu -0.7..-0.4,
  a de Vaucouleurs-like to Sersic n ~ 3 cusp); M_r ~ N(-22.8, 0.45) clipped to -24.2..-21.5
  (BCG luminosities of Lauer et al. 2007 and Kluge et al. 2020); half-light radius 22 kpc at
  M_r = -22.8, growing 0.4 dex per magnitude brighter (the steep size-luminosity relation of
  BCGs, Lauer et al. 2007; Bernardi et al. 2007), 0.15 dex scatter, clipped to 5-80 kpc; axis
  ratio 0.55-0.95. In 20% of the clusters a second core (a dumbbell or multiple-nucleus BCG), 0.5-1.5
  mag fainter, 0.4-0.8 times the BCG's size, 8-40 kpc away.
* ICL, in every cluster but those rendered without it: one component (60%) or two (40%, an
  inner one of r_e 20-80 kpc holding 15-50% of the ICL light and an outer one of 100-300 kpc);
  a single component has r_e 40-300 kpc (uniform ranges; the diffuse envelopes of Kluge et al.
  2020, 2021 and the DES stacks of Zhang et al. 2019, 2024 reach several hundred kpc). Each is
  ``galsim.Exponential`` (40%) or ``galsim.Sersic`` with n 0.5-2.5, axis ratio 0.35-0.85 (ICL is
  flatter than its BCG and twists, Kluge et al. 2021), its major axis turned from the BCG's by
  N(0, 20) degrees (clipped to +-45), its centre offset from the BCG's by 50 u^2 kpc (u uniform:
  median 12 kpc, up to 50; Kluge et al. 2021). Its light is set so that the ICL makes a fraction
  f ~ U(0.03, 0.6) of the ICL + BCG + member light in the 300 kpc aperture, after the PSF:
  the range of the ICL fractions reported by every method (Montes & Trujillo 2018; Kluge et al.
  2021; Contini 2021 reviews 5-50%) and somewhat beyond. The SB-threshold truth below then
  spans 0.04-0.42 (mean 0.18, standard deviation 0.08 over 200 clusters of seed 13; 0.03-0.18
  without ICL, from the BCG's envelope), its high end reached by poor clusters with extended
  ICL: the ICL light in the aperture fainter than the threshold is bounded by the threshold
  times the aperture's area, about M_r = -24.2 (rest frame), so a bright ICL in a rich cluster
  lies mostly above it, and the two truths correlate little (Pearson r = 0.17).
* Members: 10-120 (log-uniform) within 480 kpc of the centre, outside 6 kpc, a projected NFW
  distribution of scale radius 150-450 kpc (galaxy concentrations of 2-5 for r200 of 1-2 Mpc,
  Lin, Mohr & Stanford 2004; Budzynski et al. 2012), flattened to an axis ratio of 0.6-1 along
  the BCG (+-20 degrees). Magnitudes from a Schechter function M* = -21.3, alpha = -1.1 (the
  r-band luminosity function of Blanton et al. 2003 at h = 0.7; those of clusters are alike,
  Popesso et al. 2005) between -23 and -17.5, and at least 0.5 mag fainter than the BCG.
  Early types (85% at the centre falling to 45% at 480 kpc, the morphology-density relation of
  Dressler 1980) are ``galsim.Spergel`` (70%, nu -0.6..-0.1) or ``galsim.DeVaucouleurs``
  spheroids, axis ratio 0.5-1, r_e = 2.5 kpc at M_r = -21 growing 0.26 dex/mag; late types
  ``galsim.Exponential`` discs, axis ratio 0.2-1, r_e = 3.5 kpc growing 0.16 dex/mag
  (size-luminosity relations of Shen et al. 2003); 0.15 dex scatter, 0.5-25 kpc.
* Field galaxies over the cutout and its margin: 30 per arcmin^2 brighter than r = 25, counts
  rising 0.32 dex/mag, r = 18-25.5 (deep r-band galaxy counts, e.g. Yasuda et al. 2001 and the
  HSC-SSP, Aihara et al. 2018); ``galsim.Exponential`` (70%) or ``galsim.Spergel`` (nu
  -0.6..0.3), half-light radius 0.6" at r = 22 shrinking 0.12 dex/mag, 0.15 dex scatter,
  0.12-3".
* Stars: point sources (the PSF), 1 per arcmin^2 brighter than r = 24 (high Galactic latitude),
  counts rising 0.2 dex/mag from r = 16; in 20% of the images a bright star (r = 12.5-16) with a
  faint extended halo (a ``galsim.Moffat``, beta 2, holding 3% of its light), placed so that its
  mask stays at least 50 kpc from the centre (as a cluster sample keeps clusters whose centre is
  usable). Stars brighter than r = 17.5 get a BRIGHT_OBJECT disc of radius
  25" x 10**(0.2 (13 - r)) (31" at r = 12.5, 6" at 16, 3" at 17.5), of the order of the HSC-SSP
  bright-star masks (Coupon et al. 2018); at most about a third of a z = 0.5 cutout.
* PSF: ``galsim.Kolmogorov`` of FWHM 0.72" x 10**N(0, 0.08), clipped to 0.5-1.0" (HSC-SSP r-band
  seeing, Aihara et al. 2018, 2022); in 70% of the images plus wings, a ``galsim.Moffat`` of beta
  2-3, 2-4 times as wide, truncated at 6", holding 1-5% of the light (extended PSF wings, which
  matter for diffuse light: Infante-Sainz et al. 2020; Montes 2022).
* Noise: Gaussian sky noise of sigma U(0.024, 0.042) counts per native pixel (HSC-SSP Wide; 80%)
  or U(0.012, 0.022) (Deep/UltraDeep; 20%). These are the r-band 5-sigma point-source depths of
  about 26.2-26.5 (Wide) and 26.8-27.2 (Deep) of Aihara et al. 2018, 2022 turned into a
  per-pixel sigma, lowered by the pixel correlations of warped coadds. In half the images the
  noise is correlated (white noise smoothed by a Gaussian of sigma 0.4-0.7 pixel and scaled back
  to the drawn sigma), as in a coadd; in 40% a sky residual: an offset of up to +-0.3 sigma and a
  plane rising by up to 0.5 sigma across the cutout. The noise is drawn from its own seed
  (``params["noise"]["seed"]``).
* NO_DATA: in 8% of the images a strip along one edge, 3-25% of the side wide, flagged in the
  mask, its pixels NaN (half of these) or 0.

Drawing
-------
Every galaxy, star and component is a GalSim profile convolved with the PSF and drawn by GalSim
at the native scale, on a canvas of the cutout and a 64-pixel margin (so that light from just
outside scatters in). Members, field galaxies and stars are drawn on stamps (an image view of the
canvas) by GalSim's FFT, integrated over the pixel. A BCG or ICL component whose FFT would
exceed :data:`FFT_LIMIT` pixels (a wide one at low z) is evaluated at the pixel centres over the
whole canvas, sampled 8 x 8 in each pixel of its central region (64 x 64 in its central 3 x 3
pixels, where a Spergel cusp diverges), and convolved with the PSF by GalSim as an
``InterpolatedImage`` (quintic): the two ways agree within 1e-4 in every annulus
(6e-3 in the central 2 pixels of a Spergel cusp, which diverges), a test checks it. The resize
to 224 x 224 is left to the reader (:mod:`prep_data`), as for a real cutout; the truth is taken
on this module's own noiseless native pixels and their resize. A cluster takes about 0.5 s of
one core on average (2-3 s at z = 0.1, where the cutout is 1893 pixels wide and holds some 1400
field galaxies, 0.2 s at z = 0.5), and 11 MB on disk.

How it differs from :mod:`data.clusters`
----------------------------------------
=================  ====================================  =========================================
                   :mod:`data.clusters`                   this module
=================  ====================================  =========================================
code               numpy Sersic profiles on a 0.168-     GalSim profiles drawn by GalSim at the
                   0.3" grid, FFT by scipy, a sparse     native 0.168" (FFT or sampled +
                   resize of the scene                   InterpolatedImage); files resized by
                                                         the pipeline like real cutouts
cosmology          H0 = 70, Om0 = 0.3 (training)         H0 = 68.4, Om0 = 0.301
BCG                Sersic n 3.5-6, M_r -23.4 +- 0.35,    de Vaucouleurs or Spergel (nu -0.7..-0.4),
                   r_e 15 kpc (0.15 dex)                 M_r -22.8 +- 0.45, r_e 22 kpc there,
                                                         rising with L; a second core in 20%
ICL                one exponential (n = 1), r_e 40-150   one or two components (Exponential or
                   kpc, centred on the BCG, +-15 deg,    Sersic n 0.5-2.5), r_e 20-300 kpc, offset
                   f ~ U(0.02, 0.45)                     0-50 kpc, twisted, f ~ U(0.03, 0.6)
members            20-80, Sersic, cored 1/(1+(r/100)^2)  10-120, Spergel/de Vaucouleurs spheroids
                   Schechter M* -22.2, alpha -1.05       and exponential discs, projected NFW,
                                                         flattened; M* -21.3, alpha -1.1
field, stars       Sersic, 40 / arcmin^2 < 25; 3 stars   Exponential/Spergel, 30 / arcmin^2 < 25;
                   per arcmin^2, masks from r < 18.5     1 star per arcmin^2, a bright star with
                                                         a halo in 20%, masks from r < 17.5
PSF                Moffat, beta 2.5-4.5, FWHM 0.72 +-    Kolmogorov 0.5-1.0" with Moffat wings
                   0.08"                                 (beta 2-3, 1-5% of the light) in 70%
noise              white, 0.022-0.04 counts per pixel    Wide or Deep levels, correlated in half,
                                                         sky offsets and gradients in 40%
NO_DATA            10%, zeros                            8%, NaN or zeros
output             224 x 224 HDF5 shards                 native-size FITS files (IMAGE, MASK,
                                                         VARIANCE) and ``truth.csv``
=================  ====================================  =========================================

The two share no rendering code: this module uses only the constants and conversions of
:mod:`hsc` (pixel scale, zero point, k-correction, surface brightness to counts, mask bits),
:func:`prep_data.resize_image` (to see the truth at 224 pixels as the pipeline sees the image)
and the file and plot plumbing (:mod:`common`, :mod:`plots`).

Truth
-----
The definitions of :mod:`data.clusters`, computed here from this module's own pixels:

* ``f_icl_true``: ICL light / (ICL + BCG + member light) in the 300 kpc aperture (native pixels
  whose centres lie within N / 2 of the centre), on the noiseless PSF-convolved components.
* ``f_icl_sb_ideal``: the noiseless PSF-convolved cluster (BCG, members, ICL) resized to 224 x 224
  by :func:`prep_data.resize_image`; the light of the aperture pixels (centres within 112 of
  (111.5, 111.5)) fainter than mu = 26 + 10 log10(1 + z) + k(z) over the light of all aperture
  pixels: what the SB-threshold method gives when non-members are masked perfectly.
* ``f_icl_sb_ideal_scene``: the same on the noiseless whole scene (field galaxies and stars
  included): the best the automatic method, which cannot tell members from the field, can do.

Output
------
``python -m data.clusters_galsim --n 200 --seed 1 --out-dir galsim_clusters/ --preview p.png``
writes ``<id>.fits`` per cluster (id ``clusters_galsim-s<seed>-<index>``, five digits): HDUs IMAGE
(float32 counts), MASK (int32, ``MP_*`` keywords, :data:`hsc.DEFAULT_MASK_BITS`) and VARIANCE
(float32, the sky variance; NaN where there is no data), the IMAGE header holding ``Z``,
``F_ICL_T``, ``F_ICL_SB``, ``F_ICL_SC`` (scene), ``SKYSIG``, ``PSFFWHM``, ``KPCPIX``; and
``truth.csv`` (one row per cluster) and ``params.jsonl`` (every drawn parameter but the field
galaxies and stars, one JSON line per cluster). Cluster ``index`` draws from
``np.random.SeedSequence([SEED_TAG, seed, index])``, so a file is the same for any ``--workers``.

Options: ``--workers K`` (forked processes; default 1), ``--preview PNG`` (the first clusters as
the model sees them, with their truths), ``--preview-count`` (8), ``--quiet``. Impossible
arguments (``--n`` below 1, a missing ``--out-dir``, a folder that cannot be written, zero
workers) stop with one ``error:`` line and exit status 2 before any work. From Python:
:func:`render_cluster` (one cluster), :func:`write_clusters` (a folder).
"""

import common

if __name__ in common.MAIN_NAMES:
    common.quiet_interrupt()  # a Ctrl-C while the libraries load is one line, not a traceback

import argparse
import contextlib
import csv
import functools
import json
import logging
import math
import pathlib
import sys
import time
import warnings

import galsim
import numpy as np

import hsc

logger = logging.getLogger(__name__)

#: Name of the generator, the prefix of the cluster ids.
KIND = "clusters_galsim"
#: Mixed into every cluster's seed, so that its random stream differs from other generators'.
SEED_TAG = 20250117
#: FlatLambdaCDM (H0, Om0) of the cutouts, the one real cutouts are cut with.
COSMOLOGY = (68.4, 0.301)
#: Redshift range of the clusters.
Z_RANGE = (hsc.Z_MIN, hsc.Z_MAX)
#: Native pixel scale (arcsec) and the half-width of a cutout (proper kpc).
PIXEL_SCALE = hsc.PIXEL_SCALE
HALF_WIDTH_KPC = hsc.CUTOUT_HALF_WIDTH_KPC
#: Rest-frame surface brightness (mag/arcsec^2) that separates galaxies from ICL in the SB truth.
SB_THRESHOLD_REST = 26.0
#: Canvas margin (native pixels) drawn around the cutout, wider than the PSF wings.
MARGIN = 64
#: BCG and ICL components whose GalSim FFT would be larger than this (pixels) are sampled instead.
FFT_LIMIT = 2048
#: Sub-pixels per pixel side where a sampled component is integrated over its pixels, in its
#: central region and in its 3 x 3 central pixels (even: no sample falls on a pixel centre).
SUPERSAMPLING = 8
CORE_SUPERSAMPLING = 64
#: Largest stamp radius (pixels) of a member, field galaxy or faint star.
MAX_STAMP_RADIUS = 400
#: GalSim accuracy: the default folding threshold, a looser maxk threshold (far below the noise).
GSPARAMS = galsim.GSParams(folding_threshold=5e-3, maxk_threshold=2e-3)

#: PSF: Kolmogorov FWHM median (arcsec), log10 scatter and range; wing probability, Moffat beta
#: range, width relative to the core, share of the light, truncation radius (arcsec).
PSF_FWHM = (0.72, 0.08, (0.5, 1.0))
PSF_WING_PROBABILITY = 0.7
PSF_WING_BETA = (2.0, 3.0)
PSF_WING_WIDTH = (2.0, 4.0)
PSF_WING_FRACTION = (0.01, 0.05)
PSF_WING_TRUNCATION = 6.0

#: Sky noise per native pixel (counts): Wide and Deep ranges, and the chance of a Deep image.
NOISE_WIDE = (0.024, 0.042)
NOISE_DEEP = (0.012, 0.022)
DEEP_PROBABILITY = 0.2
#: Chance of correlated noise and the range of the smoothing Gaussian's sigma (pixels).
CORRELATED_NOISE_PROBABILITY = 0.5
CORRELATION_SIGMA = (0.4, 0.7)
#: Chance of a sky residual, its largest offset and its largest rise across the cutout (sigma).
SKY_RESIDUAL_PROBABILITY = 0.4
SKY_OFFSET_MAX = 0.3
SKY_GRADIENT_MAX = 0.5
#: Chance of a NO_DATA strip, its width range (fraction of the side), the chance its pixels are NaN.
NO_DATA_PROBABILITY = 0.08
NO_DATA_WIDTH = (0.03, 0.25)
NO_DATA_NAN_PROBABILITY = 0.5
#: Edges a NO_DATA strip can lie along ("bottom" is row 0, "left" column 0).
EDGES = ("bottom", "top", "left", "right")

#: BCG absolute magnitude M_r: mean, standard deviation, clip range.
BCG_ABS_MAG = (-22.8, 0.45, (-24.2, -21.5))
#: BCG half-light radius: kpc at the mean M_r, dex per magnitude brighter, scatter (dex), range (kpc).
BCG_SIZE = (22.0, 0.4, 0.15, (5.0, 80.0))
#: Chance of a Spergel BCG (else de Vaucouleurs) and its nu range; the BCG axis-ratio range.
BCG_SPERGEL_PROBABILITY = 0.45
BCG_SPERGEL_NU = (-0.7, -0.4)
BCG_AXIS_RATIO = (0.55, 0.95)
#: Second core: chance, magnitudes fainter than the BCG, size relative to it, separation (kpc).
SECOND_CORE_PROBABILITY = 0.2
SECOND_CORE_DMAG = (0.5, 1.5)
SECOND_CORE_SIZE = (0.4, 0.8)
SECOND_CORE_SEPARATION_KPC = (8.0, 40.0)

#: ICL fraction of the ICL + BCG + member light in the aperture (uniform range).
ICL_FRACTION_RANGE = (0.03, 0.6)
#: Chance of two ICL components; r_e ranges (kpc, uniform) of one, or of the inner and outer two.
ICL_TWO_COMPONENT_PROBABILITY = 0.4
ICL_R_E_SINGLE = (40.0, 300.0)
ICL_R_E_INNER = (20.0, 80.0)
ICL_R_E_OUTER = (100.0, 300.0)
#: Share of the ICL light in the inner of two components.
ICL_INNER_SHARE = (0.15, 0.5)
#: Chance of an exponential ICL component (else Sersic) and the Sersic index range.
ICL_EXPONENTIAL_PROBABILITY = 0.4
ICL_SERSIC_N = (0.5, 2.5)
#: ICL axis ratio range, the standard deviation and limit of its twist from the BCG (degrees),
#: and its largest offset from the BCG (kpc, drawn as ICL_OFFSET_MAX_KPC u^2).
ICL_AXIS_RATIO = (0.35, 0.85)
ICL_TWIST_DEG = (20.0, 45.0)
ICL_OFFSET_MAX_KPC = 50.0

#: Members: count range (log-uniform), Schechter (M*, alpha), absolute magnitude range.
MEMBER_COUNT = (10, 120)
MEMBER_SCHECHTER = (-21.3, -1.1)
MEMBER_ABS_MAG = (-23.0, -17.5)
#: Members are at least this much fainter than the BCG (magnitudes).
MEMBER_GAP = 0.5
#: Projected NFW scale radius range (kpc), the radii members lie between (kpc), the flattening
#: of their distribution (axis ratio range) and its alignment with the BCG (degrees).
MEMBER_NFW_SCALE_KPC = (150.0, 450.0)
MEMBER_RADIUS_KPC = (6.0, 480.0)
MEMBER_AXIS_RATIO = (0.6, 1.0)
MEMBER_ALIGNMENT_DEG = 20.0
#: Early-type fraction at the centre and at the largest radius; chance an early type is a Spergel.
MEMBER_EARLY_FRACTION = (0.85, 0.45)
MEMBER_SPERGEL_PROBABILITY = 0.7
#: Member sizes: (r_e in kpc at M_r = -21, dex per magnitude brighter) of early and late types,
#: the scatter (dex) and range (kpc).
MEMBER_SIZE_EARLY = (2.5, 0.26)
MEMBER_SIZE_LATE = (3.5, 0.16)
MEMBER_SIZE_SCATTER = 0.15
MEMBER_SIZE_RANGE = (0.5, 25.0)

#: Field galaxies per arcmin^2 brighter than r = 25, the slope of the counts (dex/mag), magnitudes.
FIELD_DENSITY = (30.0, 0.32)
FIELD_MAG_RANGE = (18.0, 25.5)
#: Field half-light radius: arcsec at r = 22, dex/mag, scatter (dex), range (arcsec).
FIELD_SIZE = (0.6, -0.12, 0.15, (0.12, 3.0))
FIELD_SPERGEL_PROBABILITY = 0.3

#: Stars per arcmin^2 brighter than r = 24, the slope of the counts, and their magnitudes.
STAR_DENSITY = (1.0, 0.2)
STAR_MAG_RANGE = (16.0, 24.0)
#: Chance of a bright star, its magnitudes, the smallest distance (kpc) between its mask and the
#: centre, and its halo (Moffat beta, width relative to the PSF FWHM, share of the star's light).
BRIGHT_STAR_PROBABILITY = 0.2
BRIGHT_STAR_MAG_RANGE = (12.5, 16.0)
BRIGHT_STAR_CLEARANCE_KPC = 50.0
BRIGHT_STAR_HALO = (2.0, 6.0, 0.03)
#: Stars brighter than this get a BRIGHT_OBJECT disc of radius MASK_RADIUS[0] * 10**(0.2 (MASK_RADIUS[1] - r)).
BRIGHT_OBJECT_MAG = 17.5
MASK_RADIUS = (25.0, 13.0)


# ----------------------------------------------------------------------------------------
# Geometry and photometry


@functools.lru_cache(maxsize=1)
def _cosmology():
    from astropy.cosmology import FlatLambdaCDM

    return FlatLambdaCDM(H0=COSMOLOGY[0], Om0=COSMOLOGY[1])


def kpc_per_arcsec(z):
    """Proper kpc per arcsec at redshift ``z`` (:data:`COSMOLOGY`)."""
    return float(_cosmology().kpc_proper_per_arcmin(z).value) / 60.0


def native_size(z):
    """Side (native pixels, odd) of the +-300 kpc cutout at redshift ``z``: the odd number nearest
    to the span, so that the cluster centre is the central pixel."""
    width = 2.0 * HALF_WIDTH_KPC / kpc_per_arcsec(z) / PIXEL_SCALE
    return 2 * round(width / 2.0 - 0.5) + 1


def apparent_magnitude(absolute, z):
    """r magnitude of a galaxy of absolute magnitude ``absolute`` at ``z`` (distance modulus and
    the red-galaxy k-correction of :func:`hsc.k_correction`)."""
    return np.asarray(absolute, dtype=float) + float(_cosmology().distmod(z).value) + float(hsc.k_correction(z))


def mag_to_counts(mag):
    """Counts of a source of AB magnitude ``mag`` at the zero point 27."""
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - hsc.ZERO_POINT))


def sb_threshold_counts(z, mu_rest=SB_THRESHOLD_REST):
    """Counts per native pixel of the observed threshold mu_rest + 10 log10(1 + z) + k(z)."""
    return float(hsc.sb_to_counts(hsc.observed_surface_brightness(mu_rest, z)))


def aperture(size):
    """Boolean (size, size) map of the 300 kpc aperture: pixel centres within size / 2 of the centre."""
    centre = (size - 1) / 2.0
    rows, columns = np.ogrid[:size, :size]
    return (columns - centre) ** 2 + (rows - centre) ** 2 <= (size / 2.0) ** 2


def sb_fraction(image, z, mu_rest=SB_THRESHOLD_REST):
    """Light of the aperture pixels fainter than the observed threshold over that of all aperture
    pixels, for a noiseless square ``image`` in counts per native pixel (any side)."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2 or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be square and 2-D, got shape {image.shape}")
    values = image[aperture(image.shape[0])]
    total = values.sum()
    if total <= 0:
        raise ValueError("image holds no light inside the aperture")
    return float(values[values < sb_threshold_counts(z, mu_rest)].sum() / total)


# ----------------------------------------------------------------------------------------
# Drawing the parameters


def _log_uniform(rng, low, high, size=None):
    return np.exp(rng.uniform(np.log(low), np.log(high), size))


def _power_law_mags(rng, count, slope, bright, faint):
    """``count`` magnitudes with counts rising as 10^(slope m) between ``bright`` and ``faint``."""
    low, high = 10.0 ** (slope * bright), 10.0 ** (slope * faint)
    return np.log10(low + rng.uniform(size=count) * (high - low)) / slope


def _schechter_mags(rng, count, m_star, alpha, bright, faint):
    grid = np.linspace(bright, faint, 1024)
    luminosity = 10.0 ** (-0.4 * (grid - m_star))
    cdf = np.cumsum(luminosity ** (alpha + 1.0) * np.exp(-luminosity))
    cdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
    return np.interp(rng.uniform(size=count), cdf, grid)


def _projected_nfw(x):
    """Surface density of an NFW halo at x = R / r_s, up to a constant (Bartelmann 1996)."""
    x = np.asarray(x, dtype=float)
    out = np.full(x.shape, 1.0 / 3.0)
    inner, outer = x < 1.0 - 1e-6, x > 1.0 + 1e-6
    xi, xo = x[inner], x[outer]
    out[inner] = (1.0 - 2.0 / np.sqrt(1.0 - xi**2) * np.arctanh(np.sqrt((1.0 - xi) / (1.0 + xi)))) / (xi**2 - 1.0)
    out[outer] = (1.0 - 2.0 / np.sqrt(xo**2 - 1.0) * np.arctan(np.sqrt((xo - 1.0) / (xo + 1.0)))) / (xo**2 - 1.0)
    return out


def _nfw_radii(rng, count, scale_kpc):
    low, high = MEMBER_RADIUS_KPC
    grid = np.linspace(low, high, 2048)
    cdf = np.cumsum(grid * _projected_nfw(grid / scale_kpc))
    cdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
    return np.interp(rng.uniform(size=count), cdf, grid)


def _uniform(rng, bounds):
    return float(rng.uniform(*bounds))


def _draw_psf(rng):
    median, scatter, (low, high) = PSF_FWHM
    psf = {"fwhm": float(np.clip(median * 10.0 ** rng.normal(0.0, scatter), low, high)), "wing": None}
    if rng.uniform() < PSF_WING_PROBABILITY:
        psf["wing"] = {"beta": _uniform(rng, PSF_WING_BETA), "fwhm": psf["fwhm"] * _uniform(rng, PSF_WING_WIDTH),
                       "fraction": _uniform(rng, PSF_WING_FRACTION)}
    return psf


def _draw_noise(rng):
    survey = "deep" if rng.uniform() < DEEP_PROBABILITY else "wide"
    noise = {"survey": survey, "sigma": _uniform(rng, NOISE_DEEP if survey == "deep" else NOISE_WIDE),
             "correlation_sigma": None, "sky": None, "seed": int(rng.integers(2**32))}
    if rng.uniform() < CORRELATED_NOISE_PROBABILITY:
        noise["correlation_sigma"] = _uniform(rng, CORRELATION_SIGMA)
    if rng.uniform() < SKY_RESIDUAL_PROBABILITY:
        noise["sky"] = {"offset": float(rng.uniform(-SKY_OFFSET_MAX, SKY_OFFSET_MAX)),
                        "gradient": float(rng.uniform(0.0, SKY_GRADIENT_MAX)),
                        "angle": float(rng.uniform(0.0, 2.0 * np.pi))}
    return noise


def _draw_bcg(rng, z, scale):
    mean, sigma, (bright, faint) = BCG_ABS_MAG
    absolute = float(np.clip(rng.normal(mean, sigma), bright, faint))
    size_at, slope, scatter, (small, large) = BCG_SIZE
    r_e = float(np.clip(size_at * 10.0 ** (-slope * (absolute - mean) + rng.normal(0.0, scatter)), small, large))
    spergel = bool(rng.uniform() < BCG_SPERGEL_PROBABILITY)
    bcg = {"profile": "spergel" if spergel else "devaucouleurs", "nu": _uniform(rng, BCG_SPERGEL_NU) if spergel else None,
           "abs_mag": absolute, "mag": float(apparent_magnitude(absolute, z)), "r_e_kpc": r_e, "hlr": r_e / scale,
           "q": _uniform(rng, BCG_AXIS_RATIO), "pa": float(rng.uniform(0.0, np.pi)), "x": 0.0, "y": 0.0}
    second = None
    if rng.uniform() < SECOND_CORE_PROBABILITY:
        separation, angle = _uniform(rng, SECOND_CORE_SEPARATION_KPC), float(rng.uniform(0.0, 2.0 * np.pi))
        r_e2 = r_e * _uniform(rng, SECOND_CORE_SIZE)
        second = {"profile": "spergel" if rng.uniform() < 0.5 else "devaucouleurs", "nu": _uniform(rng, BCG_SPERGEL_NU),
                  "mag": bcg["mag"] + _uniform(rng, SECOND_CORE_DMAG), "r_e_kpc": r_e2, "hlr": r_e2 / scale,
                  "q": _uniform(rng, BCG_AXIS_RATIO), "pa": float(rng.uniform(0.0, np.pi)),
                  "x": separation * math.cos(angle) / scale, "y": separation * math.sin(angle) / scale}
        if second["profile"] == "devaucouleurs":
            second["nu"] = None
    return bcg, second


def _icl_component(rng, r_e_range, bcg_pa, scale):
    r_e = _uniform(rng, r_e_range)
    exponential = bool(rng.uniform() < ICL_EXPONENTIAL_PROBABILITY)
    sigma, limit = ICL_TWIST_DEG
    twist = float(np.clip(rng.normal(0.0, sigma), -limit, limit))
    offset, angle = ICL_OFFSET_MAX_KPC * rng.uniform() ** 2, rng.uniform(0.0, 2.0 * np.pi)
    return {"profile": "exponential" if exponential else "sersic",
            "n": 1.0 if exponential else _uniform(rng, ICL_SERSIC_N), "r_e_kpc": r_e, "hlr": r_e / scale,
            "q": _uniform(rng, ICL_AXIS_RATIO), "twist_deg": twist, "pa": float((bcg_pa + np.radians(twist)) % np.pi),
            "offset_kpc": float(offset), "x": float(offset * math.cos(angle) / scale),
            "y": float(offset * math.sin(angle) / scale)}


def _draw_icl(rng, bcg, scale, fraction=None):
    if fraction is None:
        fraction = _uniform(rng, ICL_FRACTION_RANGE)
    if rng.uniform() < ICL_TWO_COMPONENT_PROBABILITY:
        inner = _icl_component(rng, ICL_R_E_INNER, bcg["pa"], scale)
        outer = _icl_component(rng, ICL_R_E_OUTER, bcg["pa"], scale)
        inner["share"] = _uniform(rng, ICL_INNER_SHARE)
        outer["share"] = 1.0 - inner["share"]
        components = [inner, outer]
    else:
        components = [dict(_icl_component(rng, ICL_R_E_SINGLE, bcg["pa"], scale), share=1.0)]
    return {"fraction": float(fraction), "components": components}


def _draw_members(rng, z, scale, bcg):
    low, high = MEMBER_COUNT
    count = int(np.clip(round(float(_log_uniform(rng, low, high + 1)) - 0.5), low, high))
    radius = _nfw_radii(rng, count, _uniform(rng, MEMBER_NFW_SCALE_KPC))
    angle = rng.uniform(0.0, 2.0 * np.pi, count)
    flattening = _uniform(rng, MEMBER_AXIS_RATIO)
    tilt = bcg["pa"] + np.radians(rng.uniform(-1.0, 1.0) * MEMBER_ALIGNMENT_DEG)
    along, across = radius * np.cos(angle), radius * np.sin(angle) * flattening
    x_kpc = along * np.cos(tilt) - across * np.sin(tilt)
    y_kpc = along * np.sin(tilt) + across * np.cos(tilt)
    # The BCG is the brightest: members are at least MEMBER_GAP magnitudes fainter.
    bright = max(MEMBER_ABS_MAG[0], bcg["abs_mag"] + MEMBER_GAP)
    absolute = _schechter_mags(rng, count, *MEMBER_SCHECHTER, bright, MEMBER_ABS_MAG[1])
    centre, edge = MEMBER_EARLY_FRACTION
    early = rng.uniform(size=count) < centre + (edge - centre) * radius / MEMBER_RADIUS_KPC[1]
    spergel = rng.uniform(size=count) < MEMBER_SPERGEL_PROBABILITY
    size_at = np.where(early, MEMBER_SIZE_EARLY[0], MEMBER_SIZE_LATE[0])
    slope = np.where(early, MEMBER_SIZE_EARLY[1], MEMBER_SIZE_LATE[1])
    r_e = np.clip(size_at * 10.0 ** (-slope * (absolute + 21.0) + rng.normal(0.0, MEMBER_SIZE_SCATTER, count)),
                  *MEMBER_SIZE_RANGE)
    nu = rng.uniform(-0.6, -0.1, count)
    q = np.where(early, rng.uniform(0.5, 1.0, count), rng.uniform(0.2, 1.0, count))
    pa = rng.uniform(0.0, np.pi, count)
    kinds = np.where(early, np.where(spergel, "spergel", "devaucouleurs"), "exponential")
    return {"x": (x_kpc / scale).tolist(), "y": (y_kpc / scale).tolist(), "abs_mag": absolute.tolist(),
            "mag": apparent_magnitude(absolute, z).tolist(), "hlr": (r_e / scale).tolist(), "kind": kinds.tolist(),
            "nu": [float(v) if k == "spergel" else None for v, k in zip(nu, kinds)], "q": q.tolist(), "pa": pa.tolist()}


def _canvas_half_width(size):
    """Half-width (arcsec) of the canvas of a cutout of ``size`` native pixels."""
    return (size + 2 * MARGIN) * PIXEL_SCALE / 2.0


def _draw_field(rng, size):
    half = _canvas_half_width(size)
    area = (2.0 * half / 60.0) ** 2
    density, slope = FIELD_DENSITY
    bright, faint = FIELD_MAG_RANGE
    expected = density * (10.0 ** (slope * (faint - 25.0)) - 10.0 ** (slope * (bright - 25.0))) * area
    count = int(rng.poisson(expected))
    mag = _power_law_mags(rng, count, slope, bright, faint)
    size_at, size_slope, scatter, (small, large) = FIELD_SIZE
    hlr = np.clip(size_at * 10.0 ** (size_slope * (mag - 22.0) + rng.normal(0.0, scatter, count)), small, large)
    spergel = rng.uniform(size=count) < FIELD_SPERGEL_PROBABILITY
    nu = rng.uniform(-0.6, 0.3, count)
    x, y = rng.uniform(-half, half, (2, count))
    return {"x": x.tolist(), "y": y.tolist(), "mag": mag.tolist(), "hlr": hlr.tolist(),
            "kind": np.where(spergel, "spergel", "exponential").tolist(),
            "nu": [float(v) if s else None for v, s in zip(nu, spergel)],
            "q": rng.uniform(0.2, 1.0, count).tolist(), "pa": rng.uniform(0.0, np.pi, count).tolist()}


def _draw_stars(rng, size, scale):
    half = _canvas_half_width(size)
    area = (2.0 * half / 60.0) ** 2
    density, slope = STAR_DENSITY
    bright, faint = STAR_MAG_RANGE
    expected = density * (1.0 - 10.0 ** (slope * (bright - faint))) * area
    count = int(rng.poisson(expected))
    stars = {"x": rng.uniform(-half, half, count).tolist(), "y": rng.uniform(-half, half, count).tolist(),
             "mag": _power_law_mags(rng, count, slope, bright, faint).tolist(), "bright": [False] * count}
    if rng.uniform() < BRIGHT_STAR_PROBABILITY:
        mag = _uniform(rng, BRIGHT_STAR_MAG_RANGE)
        inner = mask_radius(mag) + BRIGHT_STAR_CLEARANCE_KPC / scale
        cutout_half = size * PIXEL_SCALE / 2.0
        while True:
            x, y = rng.uniform(-cutout_half, cutout_half, 2)
            if math.hypot(x, y) >= inner:
                break
        stars["x"].append(float(x))
        stars["y"].append(float(y))
        stars["mag"].append(mag)
        stars["bright"].append(True)
    return stars


def _draw_no_data(rng, size):
    if rng.uniform() >= NO_DATA_PROBABILITY:
        return None
    return {"edge": EDGES[int(rng.integers(len(EDGES)))], "width": max(1, int(_uniform(rng, NO_DATA_WIDTH) * size)),
            "fill": "nan" if rng.uniform() < NO_DATA_NAN_PROBABILITY else "zero"}


def draw_params(rng, include_icl=True, z=None, icl_fraction=None):
    """Draw every parameter of one mock cluster (JSON-ready).

    Positions and half-light radii (``x``, ``y``, ``hlr``) are in arcsec, positions relative to the
    cutout centre, x along the columns and y along the rows.

    Parameters
    ----------
    rng : numpy.random.Generator
    include_icl : bool
        False draws a cluster without ICL (``params["icl"]`` is None); the other draws are the
        same as with ICL, so the two render the same BCG, members, field and noise.
    z : float, optional
        Redshift; drawn from :data:`Z_RANGE` when None.
    icl_fraction : float, optional
        The ICL fraction in the aperture; drawn from :data:`ICL_FRACTION_RANGE` when None.
    """
    drawn_z = _uniform(rng, Z_RANGE)
    z = drawn_z if z is None else float(z)
    if not Z_RANGE[0] * 0.5 <= z <= 1.5:
        raise ValueError(f"z must lie in 0.05-1.5, got {z}")
    if icl_fraction is not None and not 0.0 <= icl_fraction < 1.0:
        raise ValueError(f"icl_fraction must lie in [0, 1), got {icl_fraction}")
    scale = kpc_per_arcsec(z)
    size = native_size(z)
    psf = _draw_psf(rng)
    noise = _draw_noise(rng)
    bcg, second = _draw_bcg(rng, z, scale)
    icl = _draw_icl(rng, bcg, scale, icl_fraction)
    members = _draw_members(rng, z, scale, bcg)
    field = _draw_field(rng, size)
    stars = _draw_stars(rng, size, scale)
    no_data = _draw_no_data(rng, size)
    return {"generator": f"data.{KIND}", "z": z, "cosmology": list(COSMOLOGY), "kpc_per_arcsec": scale,
            "native_size": size, "psf": psf, "noise": noise, "bcg": bcg, "second_core": second,
            "icl": icl if include_icl else None, "members": members, "field": field, "stars": stars,
            "no_data": no_data}


# ----------------------------------------------------------------------------------------
# Rendering


def _psf(spec):
    core = galsim.Kolmogorov(fwhm=spec["fwhm"], gsparams=GSPARAMS)
    wing = spec["wing"]
    if wing is None:
        return core
    moffat = galsim.Moffat(beta=wing["beta"], fwhm=wing["fwhm"], trunc=PSF_WING_TRUNCATION, gsparams=GSPARAMS)
    return galsim.Sum([core.withFlux(1.0 - wing["fraction"]), moffat.withFlux(wing["fraction"])], gsparams=GSPARAMS)


def _galaxy(kind, flux, hlr, q, pa, nu=None, n=None):
    """A GalSim galaxy profile of ``kind`` (spergel, devaucouleurs, exponential or sersic)."""
    if kind == "spergel":
        profile = galsim.Spergel(nu=nu, half_light_radius=hlr, flux=flux, gsparams=GSPARAMS)
    elif kind == "devaucouleurs":
        profile = galsim.DeVaucouleurs(half_light_radius=hlr, flux=flux, gsparams=GSPARAMS)
    elif kind == "exponential":
        profile = galsim.Exponential(half_light_radius=hlr, flux=flux, gsparams=GSPARAMS)
    elif kind == "sersic":
        profile = galsim.Sersic(n=n, half_light_radius=hlr, flux=flux, gsparams=GSPARAMS)
    else:
        raise ValueError(f"unknown profile kind {kind!r}")
    return profile.shear(q=q, beta=pa * galsim.radians)


def _new_canvas(size):
    """A zero float64 GalSim image of the cutout and its margin, pixel (0, 0) at the cluster centre."""
    canvas = galsim.ImageD(size + 2 * MARGIN, size + 2 * MARGIN, scale=PIXEL_SCALE)
    canvas.setCenter(0, 0)
    return canvas


def _position(x, y):
    """Canvas position (pixels) of a point ``x``, ``y`` arcsec from the centre."""
    return galsim.PositionD(x / PIXEL_SCALE, y / PIXEL_SCALE)


def _stamp_bounds(canvas, position, radius):
    ix, iy = round(position.x), round(position.y)
    return galsim.BoundsI(ix - radius, ix + radius, iy - radius, iy + radius) & canvas.bounds


@contextlib.contextmanager
def _hard_edges_by_fft():
    """Silence GalSim's advice to convolve two hard-edged profiles (a truncated PSF wing or star
    halo, and the pixel) in real space, which is slower here and no more accurate at this sampling."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Doing convolution of 2 objects", galsim.GalSimWarning)
        yield


def _draw_stamp(canvas, profile, x, y, max_radius=MAX_STAMP_RADIUS):
    """Add ``profile`` (PSF-convolved), centred ``x``, ``y`` arcsec from the centre, by GalSim's FFT
    on a stamp as wide as that FFT (at most ``max_radius`` pixels from its centre)."""
    position = _position(x, y)
    radius = min(profile.getGoodImageSize(PIXEL_SCALE) // 2, max_radius)
    bounds = _stamp_bounds(canvas, position, radius)
    if bounds.isDefined() and bounds.area() > 0:
        with _hard_edges_by_fft():
            profile.drawImage(image=canvas[bounds], add_to_image=True, center=position, method="fft")


def _integrate_pixels(profile, image, position, half, sub):
    """Replace the pixels of ``image`` within ``half`` of the one holding ``position`` by the mean
    of ``profile`` over ``sub`` x ``sub`` samples in each (``sub`` even: never at a pixel centre,
    so never on the centre of a component drawn there, where a Spergel cusp diverges)."""
    ix, iy = round(position.x), round(position.y)
    bounds = galsim.BoundsI(ix - half, ix + half, iy - half, iy + half)
    if not image.bounds.includes(bounds):
        return
    side = (2 * half + 1) * sub
    fine = galsim.ImageD(side, side, scale=PIXEL_SCALE / sub)
    offset = galsim.PositionD((position.x - ix) * sub, (position.y - iy) * sub)
    profile.drawImage(image=fine, method="no_pixel", center=fine.true_center + offset)
    image[bounds].array[:] = fine.array.reshape(2 * half + 1, sub, 2 * half + 1, sub).sum(axis=(1, 3))


def _sample(profile, canvas, x, y, hlr):
    """``profile`` (no PSF) on a canvas like ``canvas``: sampled at the pixel centres, integrated
    over each pixel (SUPERSAMPLING^2 samples) in a box of 2 half-light radii (8-48 pixels) about its
    centre and (CORE_SUPERSAMPLING^2 samples) in the 3 x 3 pixels there."""
    image = _new_canvas(canvas.array.shape[0] - 2 * MARGIN)
    position = _position(x, y)
    with np.errstate(all="ignore"):
        profile.drawImage(image=image, method="no_pixel", center=position)
    _integrate_pixels(profile, image, position, int(np.clip(2.0 * hlr / PIXEL_SCALE, 8, 48)), SUPERSAMPLING)
    _integrate_pixels(profile, image, position, 1, CORE_SUPERSAMPLING)
    if not np.isfinite(image.array).all():
        raise ValueError(f"sampling {profile} gave non-finite pixels")
    return image


def _draw_extended(canvas, parts, psf):
    """Add the PSF-convolved ``parts`` (profile, x, y, hlr) to ``canvas``: by GalSim's FFT when it
    fits in :data:`FFT_LIMIT` pixels, else sampled (:func:`_sample`) and convolved with the PSF
    by GalSim as an interpolated image. Returns the methods used."""
    sampled, methods = None, []
    for profile, x, y, hlr in parts:
        convolved = galsim.Convolve(profile, psf, gsparams=GSPARAMS)
        if convolved.getGoodImageSize(PIXEL_SCALE) <= FFT_LIMIT:
            _draw_stamp(canvas, convolved, x, y, max_radius=FFT_LIMIT)
            methods.append("fft")
        else:
            image = _sample(profile, canvas, x, y, hlr)
            sampled = image if sampled is None else sampled + image
            methods.append("sampled")
    if sampled is not None:
        interpolated = galsim.InterpolatedImage(sampled, x_interpolant="quintic", pad_factor=1.0, calculate_stepk=False,
                                                calculate_maxk=False, gsparams=GSPARAMS)
        galsim.Convolve(interpolated, psf, gsparams=GSPARAMS).drawImage(image=canvas, add_to_image=True,
                                                                        method="no_pixel")
    return methods


def _galaxy_parts(spec, flux_key="mag"):
    flux = float(mag_to_counts(spec[flux_key]))
    return (_galaxy(spec["profile"], flux, spec["hlr"], spec["q"], spec["pa"], nu=spec.get("nu")),
            spec["x"], spec["y"], spec["hlr"])


def _draw_population(canvas, population, psf):
    for i in range(len(population["x"])):
        profile = _galaxy(population["kind"][i], float(mag_to_counts(population["mag"][i])), population["hlr"][i],
                          population["q"][i], population["pa"][i], nu=population["nu"][i])
        _draw_stamp(canvas, galsim.Convolve(profile, psf, gsparams=GSPARAMS), population["x"][i], population["y"][i])


def mask_radius(mag):
    """BRIGHT_OBJECT disc radius (arcsec) of a star of r magnitude ``mag``."""
    radius, reference = MASK_RADIUS
    return float(radius * 10.0 ** (0.2 * (reference - mag)))


def _draw_stars_on(canvas, stars, psf, spec):
    for x, y, mag, bright in zip(stars["x"], stars["y"], stars["mag"], stars["bright"]):
        flux = float(mag_to_counts(mag))
        if bright:
            beta, width, share = BRIGHT_STAR_HALO
            halo = galsim.Moffat(beta=beta, fwhm=width * spec["fwhm"], trunc=mask_radius(mag), gsparams=GSPARAMS)
            with _hard_edges_by_fft():
                halo = galsim.Convolve(halo, psf, real_space=False, gsparams=GSPARAMS)
            star = galsim.Sum([psf.withFlux(flux * (1.0 - share)), halo.withFlux(flux * share)], gsparams=GSPARAMS)
            _draw_stamp(canvas, star, x, y, max_radius=int(mask_radius(mag) / PIXEL_SCALE) + 32)
        else:
            _draw_stamp(canvas, psf.withFlux(flux), x, y)


def _crop(canvas):
    return canvas.array[MARGIN:-MARGIN, MARGIN:-MARGIN].copy()


def render_noise(params):
    """The sky of a cluster, (N, N) float32 counts: Gaussian noise of sigma ``params["noise"]["sigma"]``
    from its own seed, correlated when asked (and scaled back to sigma), plus any sky residual."""
    import scipy.ndimage

    spec, size = params["noise"], params["native_size"]
    rng = np.random.default_rng(spec["seed"])
    noise = rng.standard_normal((size, size), dtype=np.float32)
    if spec["correlation_sigma"]:
        smoothing = spec["correlation_sigma"]
        noise = scipy.ndimage.gaussian_filter(noise, smoothing, mode="wrap")
        impulse = np.zeros((33, 33), dtype=np.float64)
        impulse[16, 16] = 1.0
        kernel = scipy.ndimage.gaussian_filter(impulse, smoothing, mode="constant")
        noise /= np.float32(np.sqrt(np.sum(kernel**2)))
    noise *= np.float32(spec["sigma"])
    sky = spec["sky"]
    if sky:
        offsets = (np.arange(size) - (size - 1) / 2.0) / ((size - 1) / 2.0)
        plane = 0.5 * (np.cos(sky["angle"]) * offsets[None, :] + np.sin(sky["angle"]) * offsets[:, None])
        noise += ((sky["offset"] + sky["gradient"] * plane) * spec["sigma"]).astype(np.float32)
    return noise


def _mask(params):
    size, scale = params["native_size"], PIXEL_SCALE
    mask = np.zeros((size, size), dtype=np.int32)
    centre = (size - 1) / 2.0
    rows, columns = np.ogrid[:size, :size]
    stars = params["stars"]
    for x, y, mag in zip(stars["x"], stars["y"], stars["mag"]):
        if mag < BRIGHT_OBJECT_MAG:
            radius = mask_radius(mag) / scale
            disc = (columns - centre - x / scale) ** 2 + (rows - centre - y / scale) ** 2 <= radius**2
            mask[disc] |= np.int32(1 << hsc.DEFAULT_MASK_BITS["BRIGHT_OBJECT"])
    strip = _no_data_strip(params)
    if strip is not None:
        mask[strip] |= np.int32(1 << hsc.DEFAULT_MASK_BITS["NO_DATA"])
    return mask


def _no_data_strip(params):
    spec, size = params["no_data"], params["native_size"]
    if spec is None:
        return None
    width = spec["width"]
    return {"bottom": np.s_[:width, :], "top": np.s_[size - width:, :], "left": np.s_[:, :width],
            "right": np.s_[:, size - width:]}[spec["edge"]]


def render_cluster_light(params):
    """The noiseless, PSF-convolved light of the cluster: (N, N) float64 images ``bcg`` (with a
    second core), ``members`` and ``icl`` (its flux set so that it makes the drawn fraction of the
    aperture light; zero without ICL), ``icl_flux`` (the ICL's total flux before cropping, counts)
    and ``drawing`` (how each BCG and ICL component was drawn: "fft" or "sampled")."""
    size = params["native_size"]
    psf = _psf(params["psf"])
    bcg_canvas = _new_canvas(size)
    cores = [params["bcg"]] + ([params["second_core"]] if params["second_core"] else [])
    drawing = {"bcg": _draw_extended(bcg_canvas, [_galaxy_parts(core) for core in cores], psf), "icl": []}
    member_canvas = _new_canvas(size)
    _draw_population(member_canvas, params["members"], psf)
    bcg, members = _crop(bcg_canvas), _crop(member_canvas)
    icl, icl_flux = np.zeros_like(bcg), 0.0
    if params["icl"] is not None:
        inside = aperture(size)
        icl_canvas = _new_canvas(size)
        parts = [(_galaxy(c["profile"], c["share"], c["hlr"], c["q"], c["pa"], n=c["n"]), c["x"], c["y"], c["hlr"])
                 for c in params["icl"]["components"]]
        drawing["icl"] = _draw_extended(icl_canvas, parts, psf)
        unit = _crop(icl_canvas)
        fraction = params["icl"]["fraction"]
        icl_flux = fraction / (1.0 - fraction) * float((bcg + members)[inside].sum()) / float(unit[inside].sum())
        icl = unit * icl_flux
    return {"bcg": bcg, "members": members, "icl": icl, "icl_flux": float(icl_flux), "drawing": drawing}


def cluster_truth(params, light=None):
    """The truth of a cluster from its noiseless light (:func:`render_cluster_light`, rendered here
    when ``light`` is None): ``z``, ``f_icl_true``, ``f_icl_sb_ideal``, ``native_size``,
    ``kpc_per_pixel``, ``sb_threshold_counts``, ``icl_flux``, ``drawing``; ``light`` gains
    ``cluster`` (native) and ``cluster_224`` (resized by :func:`prep_data.resize_image`)."""
    import prep_data

    light = render_cluster_light(params) if light is None else light
    z, size = params["z"], params["native_size"]
    inside = aperture(size)
    light["cluster"] = light["bcg"] + light["members"] + light["icl"]
    light["cluster_224"] = prep_data.resize_image(light["cluster"])
    icl_light = float(light["icl"][inside].sum())
    return {
        "z": z,
        "f_icl_true": icl_light / float(light["cluster"][inside].sum()),
        "f_icl_sb_ideal": sb_fraction(light["cluster_224"], z),
        "native_size": size,
        "kpc_per_pixel": params["kpc_per_arcsec"] * PIXEL_SCALE,
        "sb_threshold_counts": sb_threshold_counts(z),
        "icl_flux": light["icl_flux"],
        "drawing": light["drawing"],
    }


def render_others(params):
    """The noiseless, PSF-convolved field galaxies and stars, (N, N) float64."""
    psf = _psf(params["psf"])
    canvas = _new_canvas(params["native_size"])
    _draw_population(canvas, params["field"], psf)
    _draw_stars_on(canvas, params["stars"], psf, params["psf"])
    return _crop(canvas)


def render(params, components=False):
    """Render a mock cluster from its :func:`draw_params`.

    Returns
    -------
    image : ndarray of float32, shape (N, N)
        Counts per native 0.168" pixel (zero point 27) with sky noise; NO_DATA pixels NaN or 0.
    mask : ndarray of int32, shape (N, N)
        HSC mask plane, bits :data:`hsc.DEFAULT_MASK_BITS` (BRIGHT_OBJECT, NO_DATA).
    variance : ndarray of float32, shape (N, N)
        The sky variance, NaN where there is no data.
    truth : dict
        :func:`cluster_truth` and ``f_icl_sb_ideal_scene``.
    parts : dict, only with ``components=True``
        Noiseless, PSF-convolved (N, N) float64 images ``bcg`` (with a second core), ``members``,
        ``icl``, ``cluster`` (their sum), ``others`` (field galaxies and stars), the sky ``noise``
        (float32) and ``cluster_224``, the resized noiseless cluster the SB truth is taken on.
    """
    import prep_data

    z, size = params["z"], params["native_size"]
    light = render_cluster_light(params)
    truth = cluster_truth(params, light)
    others = render_others(params)
    noise = render_noise(params)
    scene = light["cluster"] + others
    truth["f_icl_sb_ideal_scene"] = sb_fraction(prep_data.resize_image(scene), z)
    image = scene.astype(np.float32) + noise
    mask = _mask(params)
    variance = np.full((size, size), params["noise"]["sigma"] ** 2, dtype=np.float32)
    strip = _no_data_strip(params)
    if strip is not None:
        image[strip] = np.nan if params["no_data"]["fill"] == "nan" else 0.0
        variance[strip] = np.nan
    if components:
        parts = {key: light[key] for key in ("bcg", "members", "icl", "cluster", "cluster_224")}
        parts.update(others=others, noise=noise)
        return image, mask, variance, truth, parts
    return image, mask, variance, truth


def render_cluster(rng, include_icl=True, z=None, icl_fraction=None, components=False):
    """:func:`render` of :func:`draw_params`; returns ``image, mask, variance, truth`` (and the parts
    with ``components=True``), ``truth["params"]`` holding every drawn parameter.

    Parameters
    ----------
    rng : numpy.random.Generator or int or None
        Source of all randomness (an int or None is passed to ``np.random.default_rng``).
    include_icl, z, icl_fraction
        As in :func:`draw_params`.
    components : bool
        Also return the noiseless parts (see :func:`render`).
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    params = draw_params(rng, include_icl=include_icl, z=z, icl_fraction=icl_fraction)
    out = render(params, components)
    out[3]["params"] = params
    return out


# ----------------------------------------------------------------------------------------
# Files


def cluster_id(seed, index):
    """The id (and file stem) of cluster ``index`` of a run with ``seed``."""
    return f"{KIND}-s{seed}-{index:05d}"


def cluster_rng(seed, index):
    """The random generator of cluster ``index`` of a run with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([SEED_TAG, seed, index]))


#: Columns of ``truth.csv``.
TRUTH_COLUMNS = ("id", "z", "f_icl_true", "f_icl_sb_ideal", "f_icl_sb_ideal_scene", "native_size", "kpc_per_pixel",
                 "psf_fwhm", "noise_sigma", "survey", "bcg_profile", "bcg_mag", "icl_components", "icl_r_e_kpc",
                 "member_count", "field_count", "star_count", "bright_star", "second_core", "no_data")


def truth_row(identifier, truth, params):
    """The ``truth.csv`` row of one cluster."""
    icl = params["icl"]
    return {
        "id": identifier, "z": truth["z"], "f_icl_true": truth["f_icl_true"], "f_icl_sb_ideal": truth["f_icl_sb_ideal"],
        "f_icl_sb_ideal_scene": truth["f_icl_sb_ideal_scene"], "native_size": truth["native_size"],
        "kpc_per_pixel": truth["kpc_per_pixel"], "psf_fwhm": params["psf"]["fwhm"],
        "noise_sigma": params["noise"]["sigma"], "survey": params["noise"]["survey"],
        "bcg_profile": params["bcg"]["profile"], "bcg_mag": params["bcg"]["mag"],
        "icl_components": 0 if icl is None else len(icl["components"]),
        "icl_r_e_kpc": ";".join(f"{c['r_e_kpc']:.1f}" for c in icl["components"]) if icl else "",
        "member_count": len(params["members"]["x"]), "field_count": len(params["field"]["x"]),
        "star_count": len(params["stars"]["x"]), "bright_star": int(any(params["stars"]["bright"])),
        "second_core": int(params["second_core"] is not None),
        "no_data": "" if params["no_data"] is None else params["no_data"]["edge"],
    }


def params_record(identifier, truth, params):
    """The ``params.jsonl`` record of one cluster: the truth and every parameter, the field galaxies
    and stars summarised by their counts."""
    summary = {key: value for key, value in params.items() if key not in ("field", "stars")}
    summary["field_count"] = len(params["field"]["x"])
    summary["stars"] = {"count": len(params["stars"]["x"]),
                        "bright": [{"x": x, "y": y, "mag": m} for x, y, m, b in
                                   zip(params["stars"]["x"], params["stars"]["y"], params["stars"]["mag"],
                                       params["stars"]["bright"]) if b or m < BRIGHT_OBJECT_MAG]}
    return {"id": identifier, "truth": {k: v for k, v in truth.items() if k != "params"}, "params": summary}


def write_fits(path, image, mask, variance, truth, params, identifier=None):
    """One cluster as a FITS file with IMAGE, MASK and VARIANCE HDUs (read by :mod:`prep_data`), atomically."""
    from astropy.io import fits

    header = fits.Header()
    header["Z"] = (float(truth["z"]), "cluster redshift")
    header["F_ICL_T"] = (float(truth["f_icl_true"]), "ICL / (ICL+BCG+members) in 300 kpc, noiseless")
    header["F_ICL_SB"] = (float(truth["f_icl_sb_ideal"]), "SB-threshold fraction of the noiseless cluster")
    header["F_ICL_SC"] = (float(truth["f_icl_sb_ideal_scene"]), "SB-threshold fraction of the noiseless scene")
    header["SKYSIG"] = (float(params["noise"]["sigma"]), "sky noise, counts per pixel")
    header["PSFFWHM"] = (float(params["psf"]["fwhm"]), "Kolmogorov FWHM, arcsec")
    header["KPCPIX"] = (float(truth["kpc_per_pixel"]), "proper kpc per pixel")
    header["PIXSCALE"] = (PIXEL_SCALE, "arcsec per pixel")
    header["MAGZERO"] = (hsc.ZERO_POINT, "AB magnitude of one count")
    header["H0"], header["OM0"] = COSMOLOGY
    header["GENERATR"] = f"data.{KIND}"
    if identifier:
        header["CLUSTER"] = identifier
    mask_header = fits.Header()
    with warnings.catch_warnings():
        # MP_NO_DATA and MP_BRIGHT_OBJECT become HIERARCH cards, as in HSC's own files.
        warnings.simplefilter("ignore")
        for plane, bit in hsc.DEFAULT_MASK_BITS.items():
            mask_header[f"MP_{plane}"] = int(bit)
    hdus = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image.astype(np.float32), header=header, name="IMAGE"),
                         fits.ImageHDU(mask.astype(np.int32), header=mask_header, name="MASK"),
                         fits.ImageHDU(variance.astype(np.float32), name="VARIANCE")])
    with common.atomic_write(path) as temporary, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hdus.writeto(temporary, output_verify="silentfix")


def make_cluster(out_dir, seed, index):
    """Render cluster ``index`` of a run and write ``<id>.fits`` into ``out_dir``; returns its
    ``truth.csv`` row and ``params.jsonl`` record."""
    identifier = cluster_id(seed, index)
    image, mask, variance, truth = render_cluster(cluster_rng(seed, index))
    params = truth.pop("params")
    write_fits(pathlib.Path(out_dir) / f"{identifier}.fits", image, mask, variance, truth, params, identifier)
    return truth_row(identifier, truth, params), params_record(identifier, truth, params)


def _make_cluster_task(task):
    return make_cluster(*task)


def write_clusters(out_dir, n, seed, workers=1, progress=True):
    """Render ``n`` clusters into ``out_dir``: ``<id>.fits`` each, ``truth.csv`` and ``params.jsonl``.

    Cluster ``index`` draws from :func:`cluster_rng` ``(seed, index)``, so the files do not depend
    on ``workers`` (processes, forked).

    Returns
    -------
    list of dict
        The ``truth.csv`` rows, in index order.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(str(out_dir), seed, index) for index in range(n)]
    bar = common.progress(total=n, desc="galsim clusters", unit="cluster", disable=not progress)
    results = []
    with bar:
        if workers == 1:
            for task in tasks:
                results.append(_make_cluster_task(task))
                bar.update(1)
        else:
            import concurrent.futures
            import multiprocessing

            context = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(min(workers, n), mp_context=context) as pool:
                for result in pool.map(_make_cluster_task, tasks):
                    results.append(result)
                    bar.update(1)
    rows = [row for row, _ in results]
    with common.atomic_write(out_dir / "truth.csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=TRUTH_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()})
    common.write_text(out_dir / "params.jsonl", "".join(json.dumps(record, sort_keys=True) + "\n"
                                                         for _, record in results))
    return rows


def write_preview(out_dir, ids, png_path):
    """A PNG grid of the clusters ``ids`` of ``out_dir`` as the ICL model sees them (read and
    prepared by :mod:`prep_data`: 224 x 224, arcsinh stretch, masked pixels in red), captioned
    with z and the two truths (from the FITS headers)."""
    from astropy.io import fits

    import plots
    import prep_data

    panels = []
    for identifier in ids:
        ref = prep_data.CutoutRef(str(pathlib.Path(out_dir) / f"{identifier}.fits"), None, identifier)
        cutout = prep_data.read_cutout(ref)
        bad = prep_data.bad_pixels(cutout)
        shown = np.clip(prep_data.prepare_image(cutout.image, bad)[..., 0] / prep_data.PREPARED_MAX * 1.6, 0.0, 1.0)
        rgb = np.repeat(shown[..., None], 3, axis=-1)
        bad_224 = prep_data.resize_mask(bad)
        rgb[bad_224] = 0.6 * rgb[bad_224] + 0.4 * np.array([1.0, 0.0, 0.0])
        header = fits.getheader(ref.path, "IMAGE")
        panels.append((rgb, f"z={header['Z']:.2f} true={header['F_ICL_T']:.2f}\nSB ideal={header['F_ICL_SB']:.2f}"))
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plots.new_figure(rows, columns, figsize=(2.2 * columns, 2.5 * rows))
    axes = np.asarray(axes, dtype=object).ravel()
    for axis in axes:
        axis.set_axis_off()
    for axis, (rgb, caption) in zip(axes, panels):
        axis.imshow(rgb, origin="lower", interpolation="nearest")
        axis.set_title(caption, fontsize=7)
    figure.suptitle("GalSim clusters as the model sees them (224 px); f_ICL truths", fontsize=8)
    plots.save_figure(figure, png_path, dpi=90)


# ----------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one ``error:`` line and exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def main(argv=None):
    parser = _Parser(
        prog=f"python -m data.{KIND}",
        description="Render mock HSC r-band cluster cutouts (FITS, native scale) with ICL truth, with GalSim.",
    )
    parser.add_argument("--n", type=int, required=True, help="number of clusters")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out-dir", metavar="DIR", required=True,
                        help="output folder: <id>.fits per cluster, truth.csv, params.jsonl")
    parser.add_argument("--preview", metavar="PNG", help="PNG grid of the first clusters as the model sees them")
    parser.add_argument("--preview-count", type=int, default=8, help="clusters in the preview (default 8)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.n < 1:
            raise ValueError(f"--n must be at least 1, got {args.n}")
        if args.seed < 0:
            raise ValueError(f"--seed must be non-negative, got {args.seed}")
        if args.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {args.workers}")
        if args.preview_count < 1:
            raise ValueError(f"--preview-count must be at least 1, got {args.preview_count}")
        out_dir = common.check_output_dir(args.out_dir, "--out-dir")
        if args.preview:
            common.check_output_file(args.preview, "--preview")
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ours = {f"{cluster_id(args.seed, index)}.fits" for index in range(args.n)}
    strangers = sorted(p.name for p in out_dir.glob("*.fits") if p.name not in ours)
    if strangers:
        logger.warning("%s already holds %d other FITS file(s) (%s...); readers of the folder will see them too",
                       out_dir, len(strangers), strangers[0])
    started = time.perf_counter()
    rows = write_clusters(out_dir, args.n, args.seed, workers=args.workers, progress=not args.quiet)
    elapsed = time.perf_counter() - started
    sb = np.array([row["f_icl_sb_ideal"] for row in rows])
    true = np.array([row["f_icl_true"] for row in rows])
    logger.info("wrote %d clusters to %s in %.1f s (%.2f s per cluster); f_icl_sb_ideal %.3f +- %.3f (%.3f-%.3f), "
                "f_icl_true %.3f +- %.3f (%.3f-%.3f)", args.n, out_dir, elapsed, elapsed / args.n, sb.mean(), sb.std(),
                sb.min(), sb.max(), true.mean(), true.std(), true.min(), true.max())
    if args.preview:
        write_preview(out_dir, [row["id"] for row in rows[: args.preview_count]], args.preview)
        logger.info("preview: %s", args.preview)
    return 0


if __name__ == "__main__":
    sys.exit(main())
