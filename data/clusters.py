"""Mock HSC r-band cluster cutouts with known intracluster-light (ICL) truth.

Each mock is a +-300 kpc cutout around a cluster at 0.1 <= z <= 0.5, made the way real cutouts
are made (MOCKS.md): the scene is rendered at a fine pixel scale (the native 0.168" when the
cutout has at most :data:`MAX_FINE_SIZE` native pixels, else at most 0.3"), convolved with a
Moffat PSF by FFT, given Gaussian sky noise at the native HSC level, and shrunk to 224 x 224
with :func:`prep_data.resize_image`, the call that shrinks real cutouts. The scene holds a
brightest cluster galaxy (BCG), member galaxies, field galaxies, stars (the bright ones under
BRIGHT_OBJECT masks), occasional NO_DATA edges and a smooth elliptical ICL profile. (The resize
is evaluated as the equivalent sparse matrices, :func:`resize_fast`, tested equal to it.)

Pixel conventions
-----------------
Images are counts per native HSC pixel (zero point 27): the fine grid holds counts per fine
pixel, the noise is scaled so that the resized image has the noise a native-scale cutout would
get, and the resized image is rescaled back to counts per native pixel, so a surface brightness
``mu`` is always ``hsc.sb_to_counts(mu)`` whatever the grid. Pixel ``i`` spans ``[i - 0.5, i +
0.5]``; the cluster centre is the image centre, ``((N - 1) / 2, (N - 1) / 2)``.

Truth of every mock (computed from the rendered pixels, never from catalogue magnitudes,
because truncated profiles do not hold their nominal flux):

* ``f_icl_true``: ICL flux / (ICL + BCG + member flux) inside the 300 kpc aperture, before noise.
* ``f_icl_sb_ideal``: the surface-brightness-threshold fraction of the noiseless, PSF-convolved,
  resized cluster (BCG, members, ICL; no field galaxies, stars or noise): the flux in aperture
  pixels fainter than ``mu = 26 + 10 log10(1 + z) + k(z)`` over the flux of all aperture pixels
  (Canepa et al. 2025, section 3; applied per pixel, with no masks): what the method gives when
  non-members are masked perfectly.
* ``f_icl_sb_ideal_scene``: the same on the noiseless image of the whole frame (field galaxies
  and stars included): what the automatic method, which cannot tell members from the field,
  can at best reproduce.
* ``z`` and ``params`` (the generation parameters).
"""

import dataclasses
import functools
import logging

import numpy as np
import scipy.fft

import hsc
from data.profiles import add_points, add_sersic, add_sersic_batch, moffat_psf, sersic_truncation_radius
from data import profiles

logger = logging.getLogger(__name__)

#: Rest-frame surface brightness (mag/arcsec^2) that separates galaxies from ICL (SPEC Part A).
SB_THRESHOLD_REST = 26.0
#: Coarsest fine-grid pixel (arcsec) the scene is rendered at before the resize.
MAX_FINE_PIXEL_SCALE = 0.3
#: Cutouts with more native pixels than this are rendered on a coarser (<= 0.3") grid.
MAX_FINE_SIZE = 1152
#: Border (fine pixels) rendered around the frame so that the PSF does not wrap light around.
CANVAS_MARGIN = 24
#: Galaxy stamps end where the profile falls below this fraction of the per-pixel noise.
TRUNCATION_NOISE_FRACTION = 0.01
#: Galaxy stamps never extend beyond this many effective radii.
MAX_TRUNCATION_R_EFF = 15.0
#: Stars brighter than this r magnitude get a BRIGHT_OBJECT mask.
BRIGHT_STAR_MAG = 18.5
#: BRIGHT_OBJECT mask radius of a star at BRIGHT_STAR_MAG; it grows by 10^0.2 per magnitude brighter.
BRIGHT_STAR_MASK_RADIUS_ARCSEC = 5.0


# ----------------------------------------------------------------------------------------
# Convolution, noise and the resize


def convolve_fft(images, psf):
    """Convolve one or more same-shape images with ``psf`` by FFT (zero padded, same size out).

    Parameters
    ----------
    images : sequence of ndarray, shape (H, W)
    psf : ndarray, shape (k, k), k odd

    Returns
    -------
    list of ndarray of float32
    """
    height, width = images[0].shape
    half = psf.shape[0] // 2
    shape = (scipy.fft.next_fast_len(height + half, real=True), scipy.fft.next_fast_len(width + half, real=True))
    kernel = np.zeros(shape, dtype=np.float32)
    kernel[: psf.shape[0], : psf.shape[1]] = psf
    kernel = np.roll(kernel, (-half, -half), axis=(0, 1))
    kernel_ft = scipy.fft.rfft2(kernel, workers=1)
    out = []
    for image in images:
        product = scipy.fft.rfft2(image, s=shape, workers=1) * kernel_ft
        out.append(scipy.fft.irfft2(product, s=shape, workers=1)[:height, :width].astype(np.float32))
    return out


@functools.lru_cache(maxsize=256)
def resize_matrix(size_in, size_out=hsc.ICL_IMAGE_SIZE):
    """The 1-D linear map of :func:`prep_data.resize_image` as a sparse (size_out, size_in) matrix.

    ``skimage.transform.resize`` (bilinear, anti-aliased) is separable: a Gaussian filter of
    sigma = (k - 1) / 2, k = size_in / size_out (truncated at 4 sigma, mirrored at the edges),
    then linear interpolation at x_i = (i + 0.5) k - 0.5. So ``resize_image(X) == A X A^T``,
    which :func:`resize_fast` evaluates 5-30 times faster (tests hold the two to 1e-6).
    """
    import scipy.sparse

    if size_in < size_out:
        raise ValueError(f"size_in must be at least size_out ({size_out}), got {size_in}")
    scale = size_in / size_out
    sigma = (scale - 1.0) / 2.0
    if sigma > 0:
        radius = int(4.0 * sigma + 0.5)
        offsets = np.arange(-radius, radius + 1)
        taps = np.exp(-0.5 * (offsets / sigma) ** 2)
        taps /= taps.sum()
    else:
        offsets, taps = np.zeros(1, dtype=int), np.ones(1)
    position = (np.arange(size_out) + 0.5) * scale - 0.5
    left = np.floor(position).astype(np.int64)
    right_weight = position - left
    period = max(2 * (size_in - 1), 1)
    rows, cols, values = [], [], []
    for shift, weight in ((0, 1.0 - right_weight), (1, right_weight)):
        centre = np.clip(left + shift, 0, size_in - 1)
        source = np.abs(centre[:, None] + offsets[None, :]) % period
        source = np.where(source > size_in - 1, period - source, source)
        rows.append(np.repeat(np.arange(size_out), offsets.size))
        cols.append(source.ravel())
        values.append((weight[:, None] * taps[None, :]).ravel())
    return scipy.sparse.csr_matrix(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=(size_out, size_in)
    )


def resize_fast(image, size_out=hsc.ICL_IMAGE_SIZE):
    """:func:`prep_data.resize_image` of a square image, by the sparse matrices of :func:`resize_matrix`."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2 or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be square and 2-D, got shape {image.shape}")
    if image.shape[0] == size_out:
        return image.copy()
    matrix = resize_matrix(image.shape[0], size_out)
    return np.asarray((matrix @ (matrix @ image).T).T, dtype=np.float32)


@functools.lru_cache(maxsize=4096)
def resize_noise_factor(size_in, size_out=hsc.ICL_IMAGE_SIZE):
    """Ratio of output to input noise of :func:`prep_data.resize_image` for white noise.

    With the separable map ``A`` of :func:`resize_matrix`, the output variance of unit white
    noise, averaged over output pixels, is (mean_i sum_j A_ij^2)^2, so the standard-deviation
    ratio is mean_i sum_j A_ij^2. MOCKS.md measured 0.63-0.85 of 1/k for these resizes.
    """
    if size_in <= size_out:
        return 1.0
    matrix = resize_matrix(size_in, size_out)
    return float(matrix.multiply(matrix).sum() / size_out)


def fine_noise_sigma(noise_native, native_size, fine_size, size_out=hsc.ICL_IMAGE_SIZE):
    """Per-pixel noise (counts per fine pixel) to draw on the fine grid.

    Chosen so that, after the resize to ``size_out`` and the conversion to counts per native
    pixel, the noise equals that of a real cutout of ``native_size`` native pixels with
    ``noise_native`` counts per native pixel, resized the same way:
    sigma_fine = sigma_native * A * rho(native) / rho(fine), with A the fine-to-native pixel
    area ratio and rho :func:`resize_noise_factor`. On the native grid it is ``noise_native``.
    """
    if noise_native < 0:
        raise ValueError(f"noise_native must be >= 0, got {noise_native}")
    if fine_size > native_size:
        raise ValueError(f"fine_size must not exceed native_size ({native_size}), got {fine_size}")
    area_ratio = (native_size / fine_size) ** 2
    return noise_native * area_ratio * resize_noise_factor(native_size, size_out) / resize_noise_factor(fine_size, size_out)


# ----------------------------------------------------------------------------------------
# Parameter distributions


@dataclasses.dataclass(frozen=True)
class ClusterDistribution:
    """Ranges the generation parameters are drawn from (MOCKS.md, "Plausible parameter distributions").

    Ranges are uniform ``(low, high)`` unless the field says otherwise; lengths in kpc are proper.
    """

    z_range: tuple = (hsc.Z_MIN, hsc.Z_MAX)  # cluster redshift
    icl_fraction_range: tuple = (0.02, 0.45)  # physical ICL fraction inside 300 kpc
    icl_fraction_mode: float = None  # None: uniform; else the mode of a triangular draw in the range
    icl_sersic_n_range: tuple = (1.0, 1.0)  # ICL Sersic index (1: exponential, as the injection)
    icl_r_eff_kpc_range: tuple = (40.0, 150.0)  # ICL half-light radius along the major axis
    icl_axis_ratio_range: tuple = (0.4, 0.9)  # ICL minor / major axis
    icl_alignment_deg: float = 15.0  # ICL position angle within +- this of the BCG's
    bcg_abs_mag: tuple = (-23.4, 0.35)  # BCG rest-frame M_r, (mean, standard deviation)
    bcg_r_eff_kpc: tuple = (15.0, 0.15)  # BCG half-light radius, (median, log10 scatter)
    bcg_sersic_n_range: tuple = (3.5, 6.0)  # BCG Sersic index
    bcg_axis_ratio_range: tuple = (0.6, 0.95)  # BCG minor / major axis
    member_count_range: tuple = (20, 80)  # members within 420 kpc of the centre (inclusive)
    member_abs_mag_range: tuple = (-23.0, -17.5)  # Schechter function limits
    schechter: tuple = (-22.2, -1.05)  # (M*, alpha) of the member luminosity function
    member_core_radius_kpc: float = 100.0  # members follow Sigma(r) ~ 1 / (1 + (r / r_c)^2)
    field_density_per_arcmin2: float = 40.0  # field galaxies brighter than r = 25
    field_mag_range: tuple = (18.0, 25.5)  # field galaxy magnitudes, N(<m) ~ 10^(0.3 m)
    star_density_per_arcmin2: float = 3.0  # stars in the magnitude range below
    star_mag_range: tuple = (15.0, 24.0)  # star magnitudes, N(<m) ~ 10^(0.25 m)
    psf_fwhm_arcsec: tuple = (0.72, 0.08)  # Moffat FWHM (mean, standard deviation), clipped to 0.5-1.1"
    psf_beta_range: tuple = (2.5, 4.5)  # Moffat beta
    noise_sigma_range: tuple = (0.022, 0.04)  # native sky noise, counts per 0.168" pixel
    no_data_probability: float = 0.1  # chance of a NO_DATA strip along one edge
    cosmology: tuple = profiles.MOCK_COSMOLOGY  # FlatLambdaCDM (H0, Om0) used to cut the cutout
    # Domain randomisation (all off by default; drawn after everything above, so that turning
    # them off leaves every other draw, and so every mock of a seed, unchanged):
    icl_offset_kpc_range: tuple = (0.0, 0.0)  # ICL centre offset from the BCG, random direction
    icl_second_probability: float = 0.0  # chance of a second ICL component (its own n, r_e, shape)
    field_density_range: tuple = None  # field galaxies per arcmin^2 brighter than r = 25, uniform
    sky_gradient_range: tuple = (0.0, 0.0)  # sky residual plane: +-amplitude across the cutout, noise sigmas
    oversubtraction_probability: float = 0.0  # chance of dark halos around the BCG and bright members
    oversubtraction_depth_range: tuple = (0.0, 0.0)  # halo depth, noise sigmas


#: The training set (MOCKS.md ranges; the cosmology used to cut the original backgrounds).
TRAINING_DISTRIBUTION = ClusterDistribution()
#: A deliberately different population standing in for real clusters: other cosmology, worse
#: seeing, deeper noise, richer clusters, ICL fractions peaked near the typical 8-30%, and ICL
#: profiles that are not all exponential.
REAL_LIKE_DISTRIBUTION = ClusterDistribution(
    z_range=(0.12, 0.45),
    icl_fraction_range=(0.03, 0.4),
    icl_fraction_mode=0.15,
    icl_sersic_n_range=(0.7, 2.5),
    icl_r_eff_kpc_range=(60.0, 220.0),
    icl_axis_ratio_range=(0.5, 0.95),
    icl_alignment_deg=25.0,
    bcg_abs_mag=(-23.6, 0.3),
    bcg_sersic_n_range=(4.0, 7.0),
    member_count_range=(40, 120),
    psf_fwhm_arcsec=(0.8, 0.1),
    noise_sigma_range=(0.028, 0.045),
    no_data_probability=0.05,
    cosmology=(68.4, 0.301),
)
#: Training mocks as varied as real clusters (domain randomisation). Each range is wider than the
#: measured ones it covers:
#: * ICL: outer components of BCG+ICL fits have Sersic n of about 0.5-4 and r_e of 20-300 kpc
#:   (Kluge et al. 2020, ApJS 247, 43; Zhang et al. 2024, MNRAS 531, 510), are often offset
#:   (up to tens of kpc) and twisted from the BCG (Kluge et al. 2021, ApJS 252, 27), and some
#:   profiles need two components; ICL fractions of 5-50% (Montes 2022, Nat. Astron. 6, 308).
#: * BCG: Sersic n 2.5-8, M_r -22.8 +- 0.5 (Lauer et al. 2007, ApJ 662, 808), r_e 22 kpc with
#:   0.25 dex scatter (Kluge et al. 2020).
#: * Members: poor groups to rich clusters (CAMIRA richness 15-100+, Oguri et al. 2018), an
#:   r-band luminosity function of M* = -21.3, alpha = -1.1 (Popesso et al. 2005, A&A 433, 431).
#: * Seeing 0.5-1.2" with Moffat wings down to beta = 1.8, and r-band sky noise from the
#:   Deep/UltraDeep to the Wide depth (Aihara et al. 2022, PASJ 74, 247).
#: * Sky residuals: a plane of up to +-0.3 noise sigma, and over-subtracted (dark) halos
#:   around bright galaxies, which the HSC pipeline leaves (Aihara et al. 2019, PASJ 71, 114).
RANDOMISED_DISTRIBUTION = ClusterDistribution(
    icl_fraction_range=(0.0, 0.6),
    icl_sersic_n_range=(0.5, 4.0),
    icl_r_eff_kpc_range=(20.0, 300.0),
    icl_axis_ratio_range=(0.3, 1.0),
    icl_alignment_deg=90.0,
    bcg_abs_mag=(-22.8, 0.5),
    bcg_r_eff_kpc=(22.0, 0.25),
    bcg_sersic_n_range=(2.5, 8.0),
    member_count_range=(5, 150),
    schechter=(-21.3, -1.1),
    psf_fwhm_arcsec=(0.8, 0.18),
    psf_beta_range=(1.8, 5.0),
    noise_sigma_range=(0.012, 0.06),
    no_data_probability=0.1,
    icl_offset_kpc_range=(0.0, 50.0),
    icl_second_probability=0.4,
    field_density_range=(20.0, 80.0),
    sky_gradient_range=(0.0, 0.3),
    oversubtraction_probability=0.3,
    oversubtraction_depth_range=(0.05, 0.5),
)
#: ICL-free fields around luminous red galaxies, the backgrounds the injection works on.
BACKGROUND_DISTRIBUTION = dataclasses.replace(TRAINING_DISTRIBUTION, icl_fraction_range=(0.0, 0.0), member_count_range=(5, 40))


def cutout_geometry(z, cosmology=TRAINING_DISTRIBUTION.cosmology):
    """Size of the +-300 kpc cutout at redshift ``z``.

    Returns
    -------
    kpc_per_arcsec : float
    native_size : int
        Side in native 0.168" pixels.
    fine_size : int
        Side of the grid the scene is rendered on.
    """
    kpc_per_arcsec = profiles.kpc_per_arcsec(z, cosmology)
    width_arcsec = 2.0 * hsc.CUTOUT_HALF_WIDTH_KPC / kpc_per_arcsec
    native_size = int(round(width_arcsec / hsc.PIXEL_SCALE))
    coarse_size = int(np.ceil(width_arcsec / MAX_FINE_PIXEL_SCALE))
    fine_size = min(native_size, max(MAX_FINE_SIZE, coarse_size))
    return kpc_per_arcsec, native_size, fine_size


def _schechter_magnitudes(rng, count, m_star, alpha, bright, faint):
    grid = np.linspace(bright, faint, 512)
    luminosity = 10.0 ** (-0.4 * (grid - m_star))
    density = luminosity ** (alpha + 1.0) * np.exp(-luminosity)
    cdf = np.cumsum(density)
    cdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
    return np.interp(rng.uniform(size=count), cdf, grid)


def _apparent_magnitude(absolute, z, cosmology):
    return absolute + float(profiles.cosmology(*cosmology).distmod(z).value) + float(hsc.k_correction(z))



# ----------------------------------------------------------------------------------------
# Drawing the parameters of a mock


@dataclasses.dataclass(frozen=True)
class Frame:
    """The grid a mock at redshift ``z`` is rendered on (:func:`cutout_geometry`)."""

    z: float
    kpc_per_arcsec: float
    native_size: int  # side of the +-300 kpc cutout in native pixels
    fine_size: int  # side of the grid the scene is rendered on

    @property
    def fine_scale(self):
        """Arcsec per fine pixel."""
        return 2.0 * hsc.CUTOUT_HALF_WIDTH_KPC / self.kpc_per_arcsec / self.fine_size

    @property
    def kpc_per_pixel(self):
        return self.kpc_per_arcsec * self.fine_scale

    @property
    def canvas_size(self):
        """Side of the canvas: the frame and a margin of :data:`CANVAS_MARGIN` fine pixels."""
        return self.fine_size + 2 * CANVAS_MARGIN

    @property
    def centre(self):
        """The cluster centre, the centre of the canvas (fine pixels)."""
        return CANVAS_MARGIN + (self.fine_size - 1) / 2.0


@dataclasses.dataclass(frozen=True)
class ClusterParameters:
    """Every random draw of one mock cluster (:func:`draw_parameters`), ready to render.

    Positions and sizes of galaxies and stars are in fine canvas pixels, fluxes in counts;
    galaxy populations are dicts of equal-length arrays ``x``, ``y``, ``flux``, ``r_eff``,
    ``n``, ``axis_ratio``, ``position_angle`` (stars: ``x``, ``y``, ``mag``).
    """

    frame: Frame
    cosmology: tuple
    noise_native: float  # sky noise, counts per native pixel
    psf_fwhm: float  # arcsec
    psf_beta: float
    bcg: dict  # mag, r_eff_kpc, n, axis_ratio, position_angle
    members: dict
    icl: dict  # target_fraction, r_eff_kpc, n, axis_ratio, position_angle; None without ICL
    field: dict
    stars: dict
    sky_noise: np.ndarray  # unit Gaussian noise of the (fine_size, fine_size) frame, float32
    no_data: dict  # edge, width_px of the NO_DATA strip; None without one
    sky: dict = None  # sky residuals (gradient, dark halos) of the randomised distribution; None: none


def draw_parameters(rng, distribution=TRAINING_DISTRIBUTION, include_icl=True, z=None):
    """Draw the parameters of one mock cluster: a pure function of ``rng``'s state and the distribution.

    Parameters as :func:`render_cluster`.

    Returns
    -------
    ClusterParameters
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    d = distribution
    if z is None:
        z = float(rng.uniform(*d.z_range))
    if not hsc.Z_MIN <= z <= hsc.Z_MAX:
        raise ValueError(f"z must be in [{hsc.Z_MIN}, {hsc.Z_MAX}], got {z}")
    frame = Frame(z, *cutout_geometry(z, d.cosmology))
    noise_native = float(rng.uniform(*d.noise_sigma_range))
    psf_fwhm = float(np.clip(rng.normal(*d.psf_fwhm_arcsec), 0.5, 1.1))
    psf_beta = float(rng.uniform(*d.psf_beta_range))
    bcg_mag = _apparent_magnitude(rng.normal(*d.bcg_abs_mag), z, d.cosmology)
    bcg = dict(
        mag=bcg_mag,
        r_eff_kpc=d.bcg_r_eff_kpc[0] * 10.0 ** rng.normal(0.0, d.bcg_r_eff_kpc[1]),
        n=float(rng.uniform(*d.bcg_sersic_n_range)),
        axis_ratio=float(rng.uniform(*d.bcg_axis_ratio_range)),
        position_angle=float(rng.uniform(0.0, np.pi)),
    )
    members = _draw_members(rng, d, frame)
    icl = None
    if include_icl and d.icl_fraction_range[1] > 0:
        low, high = d.icl_fraction_range
        target = rng.triangular(low, d.icl_fraction_mode, high) if d.icl_fraction_mode else rng.uniform(low, high)
        icl = dict(
            target_fraction=float(target),
            r_eff_kpc=float(rng.uniform(*d.icl_r_eff_kpc_range)),
            n=float(rng.uniform(*d.icl_sersic_n_range)),
            axis_ratio=float(rng.uniform(*d.icl_axis_ratio_range)),
            position_angle=float(bcg["position_angle"] + np.radians(rng.uniform(-1, 1) * d.icl_alignment_deg)),
        )
    field = _draw_field(rng, d, frame)
    star_count = int(rng.poisson(d.star_density_per_arcmin2 * _canvas_arcmin2(frame)))
    stars = dict(mag=profiles.power_law_magnitudes(rng, star_count, 0.25, *d.star_mag_range))
    stars["x"], stars["y"] = rng.uniform(-0.5, frame.canvas_size - 0.5, (2, star_count))
    # The noise is drawn here, in its place in the random stream, so that a seed gives the same
    # mock as it always has.
    sky_noise = rng.standard_normal((frame.fine_size, frame.fine_size), dtype=np.float32)
    no_data = None
    if rng.uniform() < d.no_data_probability:
        edge = int(rng.integers(4))
        no_data = dict(edge=_EDGES[edge], width_px=int(rng.uniform(0.05, 0.3) * hsc.ICL_IMAGE_SIZE))
    icl, field, sky = _draw_randomised(rng, d, frame, icl, field)
    return ClusterParameters(frame, tuple(d.cosmology), noise_native, psf_fwhm, psf_beta, bcg, members, icl, field,
                             stars, sky_noise, no_data, sky)


def _draw_randomised(rng, d, frame, icl, field):
    """The domain-randomisation draws, last in the stream and only where the distribution asks."""
    if icl is not None and d.icl_offset_kpc_range[1] > 0:
        offset, angle = rng.uniform(*d.icl_offset_kpc_range), rng.uniform(0.0, 2.0 * np.pi)
        icl = {**icl, "offset_x_kpc": float(offset * np.cos(angle)), "offset_y_kpc": float(offset * np.sin(angle))}
    if icl is not None and d.icl_second_probability > 0 and rng.uniform() < d.icl_second_probability:
        offset, angle = rng.uniform(*d.icl_offset_kpc_range), rng.uniform(0.0, 2.0 * np.pi)
        icl = {**icl, "second": {
            "share": float(rng.uniform(0.2, 0.8)),  # of the ICL light
            "r_eff_kpc": float(rng.uniform(*d.icl_r_eff_kpc_range)),
            "n": float(rng.uniform(*d.icl_sersic_n_range)),
            "axis_ratio": float(rng.uniform(*d.icl_axis_ratio_range)),
            "position_angle": float(rng.uniform(0.0, np.pi)),
            "offset_x_kpc": float(offset * np.cos(angle)),
            "offset_y_kpc": float(offset * np.sin(angle)),
        }}
    if d.field_density_range is not None:
        # Thin or thicken the field drawn at the nominal density: keep each galaxy with probability
        # density / nominal, or add a second, independent field.
        density = rng.uniform(*d.field_density_range)
        extra = _draw_field(rng, d, frame)
        ratio = density / d.field_density_per_arcmin2
        keep = rng.uniform(size=len(field["x"])) < min(ratio, 1.0)
        add = rng.uniform(size=len(extra["x"])) < max(ratio - 1.0, 0.0)
        field = {key: np.concatenate([field[key][keep], extra[key][add]]) for key in field}
    sky = None
    if d.sky_gradient_range[1] > 0 or d.oversubtraction_probability > 0:
        sky = {"gradient_sigma": float(rng.uniform(*d.sky_gradient_range)),
               "gradient_angle": float(rng.uniform(0.0, 2.0 * np.pi)), "halo_depth_sigma": 0.0}
        if rng.uniform() < d.oversubtraction_probability:
            sky.update(halo_depth_sigma=float(rng.uniform(*d.oversubtraction_depth_range)),
                       halo_scale=float(rng.uniform(3.0, 8.0)))  # halo radius in units of the galaxy's r_eff
    return icl, field, sky


#: Edges of a NO_DATA strip; index e covers rows (e even) or columns (e odd), from 0 (e < 2) or from the end.
_EDGES = ("top", "left", "bottom", "right")


def _canvas_arcmin2(frame):
    return (frame.canvas_size * frame.fine_scale / 60.0) ** 2


def _draw_members(rng, d, frame):
    """Members: a cored projected distribution, Schechter magnitudes, early types towards the centre."""
    count = int(rng.integers(d.member_count_range[0], d.member_count_range[1] + 1))
    r_max = np.sqrt(2.0) * hsc.CUTOUT_HALF_WIDTH_KPC
    core = d.member_core_radius_kpc
    radius_kpc = core * np.sqrt(np.expm1(rng.uniform(size=count) * np.log1p((r_max / core) ** 2)))
    angle = rng.uniform(0.0, 2.0 * np.pi, count)
    absolute = _schechter_magnitudes(rng, count, d.schechter[0], d.schechter[1], *d.member_abs_mag_range)
    early = rng.uniform(size=count) < np.clip(0.85 - 0.5 * radius_kpc / r_max, 0.3, 0.85)
    r_eff_kpc = 3.5 * 10.0 ** (-0.2 * (absolute + 21.0) + rng.normal(0.0, 0.15, count))
    return dict(
        n=np.where(early, rng.uniform(2.5, 5.0, count), rng.uniform(0.7, 1.5, count)),
        axis_ratio=np.where(early, rng.uniform(0.5, 1.0, count), rng.uniform(0.25, 1.0, count)),
        position_angle=rng.uniform(0.0, np.pi, count),
        x=frame.centre + radius_kpc * np.cos(angle) / frame.kpc_per_pixel,
        y=frame.centre + radius_kpc * np.sin(angle) / frame.kpc_per_pixel,
        flux=hsc.mag_to_counts(absolute + _apparent_magnitude(0.0, frame.z, d.cosmology)),
        r_eff=r_eff_kpc / frame.kpc_per_pixel,
    )


def _draw_field(rng, d, frame):
    """Field galaxies over the canvas: counts rising 0.3 dex/mag, mostly discs."""
    density = d.field_density_per_arcmin2 * 10.0 ** (0.3 * (d.field_mag_range[1] - 25.0))
    count = int(rng.poisson(density * _canvas_arcmin2(frame)))
    mag = profiles.power_law_magnitudes(rng, count, 0.3, *d.field_mag_range)
    r_eff = 0.6 * 10.0 ** (-0.1 * (mag - 22.0) + rng.normal(0.0, 0.2, count)) / frame.fine_scale
    disk = rng.uniform(size=count) < 0.7
    n = np.where(disk, rng.uniform(0.7, 1.5, count), rng.uniform(2.0, 4.0, count))
    axis_ratio = rng.uniform(0.25, 1.0, count)
    position_angle = rng.uniform(0.0, np.pi, count)
    x, y = rng.uniform(-0.5, frame.canvas_size - 0.5, (2, count))
    return dict(x=x, y=y, flux=hsc.mag_to_counts(mag), r_eff=r_eff, n=n, axis_ratio=axis_ratio,
                position_angle=position_angle)


# ----------------------------------------------------------------------------------------
# Rendering


def render_cluster(rng, distribution=TRAINING_DISTRIBUTION, include_icl=True, z=None, return_components=False):
    """Render one mock cluster cutout with its truth: :func:`render_parameters` of :func:`draw_parameters`.

    Parameters
    ----------
    rng : numpy.random.Generator
    distribution : ClusterDistribution
        Parameter ranges.
    include_icl : bool
        False renders a background (no ICL; ``f_icl_true`` = 0).
    z : float, optional
        Redshift; drawn from ``distribution.z_range`` when None.
    return_components : bool
        Also return the noiseless, PSF-convolved, resized components (for checks and plots).

    Returns
    -------
    image : ndarray of float32, shape (224, 224)
        Counts per native 0.168" pixel (zero point 27), NO_DATA pixels set to 0.
    mask : ndarray of int32, shape (224, 224)
        HSC mask plane with bits ``hsc.DEFAULT_MASK_BITS`` (BRIGHT_OBJECT, NO_DATA).
    truth : dict
        ``z``, ``f_icl_true``, ``f_icl_sb_ideal``, ``f_icl_sb_ideal_scene`` (floats) and ``params``
        (a JSON-able dict).
    components : dict, only with ``return_components``
        ``icl``, ``galaxies`` (BCG and members) and ``others`` (field galaxies and stars), each
        (224, 224) float32 counts per native pixel, without noise or masks.
    """
    return render_parameters(draw_parameters(rng, distribution, include_icl, z), return_components)


def render_parameters(parameters, return_components=False):
    """Render a mock cluster from its :class:`ClusterParameters`; returns what :func:`render_cluster` does."""
    p, frame = parameters, parameters.frame
    noise_fine = fine_noise_sigma(p.noise_native, frame.native_size, frame.fine_size)
    truncation_level = TRUNCATION_NOISE_FRACTION * noise_fine
    galaxies = np.zeros((frame.canvas_size, frame.canvas_size), np.float32)
    others = np.zeros_like(galaxies)
    bcg = p.bcg
    add_sersic(galaxies, frame.centre, frame.centre, float(hsc.mag_to_counts(bcg["mag"])),
               bcg["r_eff_kpc"] / frame.kpc_per_pixel, bcg["n"], bcg["axis_ratio"], bcg["position_angle"])
    m = p.members
    for i in range(len(m["x"])):
        _add_galaxy(galaxies, m["x"][i], m["y"][i], m["flux"][i], m["r_eff"][i], m["n"][i], m["axis_ratio"][i],
                    m["position_angle"][i], truncation_level)
    icl_image, icl, f_icl_true = _render_icl(p, galaxies)
    f = p.field
    truncation = np.minimum(sersic_truncation_radius(f["flux"], f["r_eff"], f["n"], f["axis_ratio"], truncation_level),
                            MAX_TRUNCATION_R_EFF * f["r_eff"])
    add_sersic_batch(others, f["x"], f["y"], f["flux"], f["r_eff"], f["n"], f["axis_ratio"], f["position_angle"], truncation)
    add_points(others, p.stars["x"], p.stars["y"], hsc.mag_to_counts(p.stars["mag"]))

    # PSF, noise, resize (to counts per native pixel).
    psf = moffat_psf(p.psf_fwhm / frame.fine_scale, p.psf_beta)
    cluster_convolved, others_convolved = convolve_fft([galaxies + icl_image if icl else galaxies, others], psf)
    crop = slice(CANVAS_MARGIN, CANVAS_MARGIN + frame.fine_size)
    area_ratio = np.float32((frame.fine_scale / hsc.PIXEL_SCALE) ** 2)
    scene = cluster_convolved[crop, crop] + others_convolved[crop, crop]
    scene += p.sky_noise * np.float32(noise_fine)
    image = resize_fast(scene) / area_ratio
    if p.sky is not None:
        image += _sky_residuals(p, image.shape[0])
    ideal = resize_fast(cluster_convolved[crop, crop]) / area_ratio
    # The automatic SB method cannot tell field galaxies and stars from members; this is the
    # answer it would give on the noiseless image of everything in the frame.
    ideal_scene = resize_fast(cluster_convolved[crop, crop] + others_convolved[crop, crop]) / area_ratio
    mask = _mask(p, image)
    params = dict(
        z=frame.z, cosmology=list(p.cosmology), kpc_per_arcsec=frame.kpc_per_arcsec, native_size=frame.native_size,
        fine_size=frame.fine_size, fine_pixel_scale=frame.fine_scale, noise_sigma_native=p.noise_native,
        psf_fwhm_arcsec=p.psf_fwhm, psf_beta=p.psf_beta, bcg=bcg, icl=icl, member_count=len(m["x"]),
        field_count=len(f["x"]), star_count=len(p.stars["x"]), bright_star_count=int((p.stars["mag"] < BRIGHT_STAR_MAG).sum()),
        no_data=p.no_data, sb_threshold_counts=float(sb_threshold_counts(frame.z)),
    )
    truth = dict(z=frame.z, f_icl_true=float(f_icl_true), f_icl_sb_ideal=float(sb_threshold_fraction(ideal, frame.z)),
                 f_icl_sb_ideal_scene=float(sb_threshold_fraction(ideal_scene, frame.z)), params=_json_safe(params))
    if not return_components:
        return image.astype(np.float32), mask, truth
    icl_convolved, galaxies_convolved = convolve_fft([icl_image, galaxies], psf)
    components = {
        name: resize_fast(array[crop, crop]) / area_ratio
        for name, array in (("icl", icl_convolved), ("galaxies", galaxies_convolved), ("others", others_convolved))
    }
    return image.astype(np.float32), mask, truth, components


def _sky_residuals(p, size):
    """Sky residuals of the output image (counts per native pixel): a plane and dark halos.

    The plane rises from -A to +A noise sigmas between opposite corners along a random direction; the
    halos are Gaussian dips of the drawn depth (noise sigmas) and of ``halo_scale`` times each
    galaxy's r_eff around the BCG and the members brighter than 2 mag below it.
    """
    frame, sky = p.frame, p.sky
    rows, cols = np.mgrid[:size, :size].astype(np.float32)
    cos, sin = np.cos(sky["gradient_angle"]), np.sin(sky["gradient_angle"])
    u = ((cols - (size - 1) / 2) * cos + (rows - (size - 1) / 2) * sin) / ((size - 1) / 2 * (abs(cos) + abs(sin)))
    residual = sky["gradient_sigma"] * p.noise_native * u
    if sky["halo_depth_sigma"] > 0:
        scale = size / frame.fine_size  # output pixels per fine pixel
        bcg_flux = float(hsc.mag_to_counts(p.bcg["mag"]))
        bcg_r_eff = p.bcg["r_eff_kpc"] / frame.kpc_per_pixel
        x = np.concatenate([[frame.centre], p.members["x"]])
        y = np.concatenate([[frame.centre], p.members["y"]])
        flux = np.concatenate([[bcg_flux], p.members["flux"]])
        r_eff = np.concatenate([[bcg_r_eff], p.members["r_eff"]])
        bright = flux > bcg_flux * 10 ** (-0.4 * 2.0)
        for xi, yi, ri in zip(x[bright], y[bright], r_eff[bright]):
            cx, cy = (xi - CANVAS_MARGIN + 0.5) * scale - 0.5, (yi - CANVAS_MARGIN + 0.5) * scale - 0.5
            width = max(sky["halo_scale"] * ri * scale, 2.0)
            residual -= sky["halo_depth_sigma"] * p.noise_native * np.exp(-((cols - cx) ** 2 + (rows - cy) ** 2) / (2 * width**2))
    return residual.astype(np.float32)


def _render_icl(p, galaxies):
    """The ICL image, its parameters (with its magnitude) and f_icl_true inside the aperture.

    The ICL flux is set so that the rendered ICL makes the drawn fraction of the aperture light.
    """
    frame = p.frame
    aperture = profiles.disc_mask(galaxies.shape, frame.centre, frame.centre, frame.fine_size / 2.0)
    galaxy_light = float(galaxies[aperture].sum(dtype=np.float64))
    icl_image = np.zeros_like(galaxies)
    if p.icl is None:
        return icl_image, None, 0.0
    icl, target = p.icl, p.icl["target_fraction"]
    second = icl.get("second")
    components = [(1.0 - second["share"], icl), (second["share"], second)] if second else [(1.0, icl)]
    for share, component in components:
        single = np.zeros_like(galaxies) if second else icl_image
        add_sersic(single, frame.centre + component.get("offset_x_kpc", 0.0) / frame.kpc_per_pixel,
                   frame.centre + component.get("offset_y_kpc", 0.0) / frame.kpc_per_pixel, 1.0,
                   component["r_eff_kpc"] / frame.kpc_per_pixel, component["n"], component["axis_ratio"],
                   component["position_angle"])
        if second:  # each component's light in the aperture is its share of the ICL's
            icl_image += single * np.float32(share / max(float(single[aperture].sum(dtype=np.float64)), 1e-30))
    unit_light = float(icl_image[aperture].sum(dtype=np.float64))
    icl_image *= np.float32(target * galaxy_light / ((1.0 - target) * unit_light))
    icl_light = float(icl_image[aperture].sum(dtype=np.float64))
    icl = dict(icl, mag=float(hsc.counts_to_mag(icl_image.sum(dtype=np.float64))))
    return icl_image, icl, icl_light / (icl_light + galaxy_light)


def _mask(p, image):
    """The mask plane: BRIGHT_OBJECT circles around bright stars, the NO_DATA strip (``image`` zeroed there)."""
    frame, stars = p.frame, p.stars
    size = image.shape[0]
    mask = np.zeros(image.shape, np.int32)
    output_scale = frame.fine_size / size  # fine pixels per output pixel
    bright = stars["mag"] < BRIGHT_STAR_MAG
    for x, y, mag in zip(stars["x"][bright], stars["y"][bright], stars["mag"][bright]):
        radius_arcsec = BRIGHT_STAR_MASK_RADIUS_ARCSEC * 10.0 ** (0.2 * (BRIGHT_STAR_MAG - mag))
        cx = (x - CANVAS_MARGIN + 0.5) / output_scale - 0.5
        cy = (y - CANVAS_MARGIN + 0.5) / output_scale - 0.5
        radius = radius_arcsec / frame.fine_scale / output_scale
        mask[profiles.disc_mask(image.shape, cx, cy, radius)] |= 1 << hsc.DEFAULT_MASK_BITS["BRIGHT_OBJECT"]
    if p.no_data is not None:
        edge, width = _EDGES.index(p.no_data["edge"]), p.no_data["width_px"]
        strip = [slice(None), slice(None)]
        strip[edge % 2] = slice(0, width) if edge < 2 else slice(size - width, size)
        image[tuple(strip)] = 0.0
        mask[tuple(strip)] |= 1 << hsc.DEFAULT_MASK_BITS["NO_DATA"]
    return mask


def _add_galaxy(canvas, x, y, flux, r_eff, n, axis_ratio, position_angle, truncation_level):
    radius = min(sersic_truncation_radius(flux, r_eff, n, axis_ratio, truncation_level), MAX_TRUNCATION_R_EFF * r_eff)
    if radius < 1.0:
        # Fainter than the noise floor everywhere beyond a pixel: a point carries it well enough.
        add_points(canvas, x, y, flux)
    else:
        add_sersic(canvas, x, y, flux, r_eff, n, axis_ratio, position_angle, radius)


def sb_threshold_counts(z, mu_rest=SB_THRESHOLD_REST):
    """Counts per native pixel of the observed ICL threshold at redshift ``z`` (dimming and k-correction)."""
    return hsc.sb_to_counts(hsc.observed_surface_brightness(mu_rest, z))


def aperture_mask(size=hsc.ICL_IMAGE_SIZE):
    """Boolean (size, size) map of the 300 kpc aperture: the circle of radius size/2 about the centre."""
    return profiles.disc_mask((size, size), (size - 1) / 2.0, (size - 1) / 2.0, size / 2.0)


def sb_threshold_fraction(image, z, mu_rest=SB_THRESHOLD_REST):
    """Surface-brightness-threshold ICL fraction of a noiseless image.

    Flux in aperture pixels fainter than ``mu_rest + 10 log10(1 + z) + k(z)`` over the flux of
    all aperture pixels (Canepa et al. 2025, applied per pixel).

    Parameters
    ----------
    image : ndarray, shape (S, S)
        Counts per native pixel.
    z : float
        Redshift.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2 or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be square and 2-D, got shape {image.shape}")
    inside = aperture_mask(image.shape[0])
    values = image[inside]
    total = values.sum()
    if total <= 0:
        raise ValueError("image holds no positive flux inside the aperture")
    return float(values[values < sb_threshold_counts(z)].sum() / total)


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    return value


# ----------------------------------------------------------------------------------------
# Preview


def preview_panel(image, truth, mask=None):
    """A panel of :func:`data.profiles.draw_preview`: the cutout in the model's arcsinh stretch
    (masked pixels in red) captioned with its truth (``z``, ``f_icl_true``, ``f_icl_sb_ideal``)."""
    stretched = np.arcsinh(np.clip(np.asarray(image, np.float32), -0.1, 10.0) / hsc.ARCSINH_SCALE)
    scaled = np.clip(stretched / np.arcsinh(10.0 / hsc.ARCSINH_SCALE / 4.0), 0.0, 1.0)
    rgb = np.repeat(scaled[..., None], 3, axis=-1)
    if mask is not None:
        bad = (np.asarray(mask) & hsc.mask_value(hsc.DEFAULT_MASK_BITS)) != 0
        rgb[bad] = 0.6 * rgb[bad] + 0.4 * np.array([1.0, 0.0, 0.0])
    caption = f"z={truth['z']:.2f} true={truth['f_icl_true']:.3f}\nSB ideal={truth['f_icl_sb_ideal']:.3f}"
    return rgb, caption, "black"
