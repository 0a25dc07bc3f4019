"""Tests of the surface-brightness threshold measurement (measure_sb_cut)."""

import logging

import numpy as np
import pytest
from astropy.stats import sigma_clipped_stats
from scipy import ndimage

import hsc
from measure_sb_cut import (
    SBMeasurement,
    measure_icl_fraction,
    measure_icl_fraction_manual,
)
from measure_sb_cut import measurement_helpers as helpers
from measure_sb_cut.measure_manual import is_member

SIZE = hsc.ICL_IMAGE_SIZE
CENTRE = (SIZE - 1) / 2.0
# Exponential ICL: central brightness in units of the threshold and scale length (px).
ICL_AMPLITUDE = 4.0
ICL_SCALE_PX = 12.0
# One exponential (Sersic n = 1) galaxy, away from the centre where the ICL is negligible.
GALAXY_OFFSET_PX = 65.0
GALAXY_AMPLITUDE = 20.0
GALAXY_SCALE_PX = 3.0
NOISE_RMS = 0.003  # counts per native pixel, white


def ring_flux(amplitude, scale, inner, outer):
    """Flux of amplitude * exp(-r / scale) between radii inner and outer (closed form)."""

    def outside(radius):
        return 0.0 if np.isinf(radius) else (1 + radius / scale) * np.exp(-radius / scale)

    return 2 * np.pi * amplitude * scale**2 * (outside(inner) - outside(outer))


def exponential_scene(z, seed=0, noise=NOISE_RMS, with_galaxy=True):
    """Image of the analytic scene and its expected threshold fraction.

    The ICL is A exp(-r/h) about the centre with A = 4 T (T: the 26 mag/arcsec^2 threshold at z),
    so it is brighter than T inside r_t = h ln 4 and counts as ICL between r_t and the radius
    where it fades below the 3-sigma limit in 10" boxes (or the aperture). The galaxy, I0
    exp(-r/s), sits where the ICL is ~0.02 T: its light fainter than T - ICL counts as ICL.
    """
    threshold = helpers.threshold_counts(helpers.MEASUREMENT_SB, z)
    yy, xx = np.indices((SIZE, SIZE))
    radius = np.hypot(yy - CENTRE, xx - CENTRE)
    amplitude = ICL_AMPLITUDE * threshold
    image = amplitude * np.exp(-radius / ICL_SCALE_PX)
    galaxy_x = CENTRE + GALAXY_OFFSET_PX
    galaxy_flux = galaxy_outside = 0.0
    if with_galaxy:
        galaxy_amplitude = GALAXY_AMPLITUDE * threshold
        image = image + galaxy_amplitude * np.exp(-np.hypot(yy - CENTRE, xx - galaxy_x) / GALAXY_SCALE_PX)
        local_icl = amplitude * np.exp(-GALAXY_OFFSET_PX / ICL_SCALE_PX)
        galaxy_radius = GALAXY_SCALE_PX * np.log(galaxy_amplitude / (threshold - local_icl))
        galaxy_flux = ring_flux(galaxy_amplitude, GALAXY_SCALE_PX, 0, np.inf)
        # Galaxy light outside its segment, minus the ICL under the segment.
        galaxy_outside = ring_flux(galaxy_amplitude, GALAXY_SCALE_PX, galaxy_radius, np.inf)
        galaxy_outside -= local_icl * np.pi * galaxy_radius**2
    cutout_scale = helpers.cutout_pixel_scale(z, SIZE)
    limit = helpers.SB_LIMIT_N_SIGMA * noise / (helpers.SB_LIMIT_BOX_ARCSEC / cutout_scale)
    limit_radius = min(ICL_SCALE_PX * np.log(amplitude / limit), SIZE / 2)
    threshold_radius = ICL_SCALE_PX * np.log(ICL_AMPLITUDE)
    icl = ring_flux(amplitude, ICL_SCALE_PX, threshold_radius, limit_radius) + galaxy_outside
    total = ring_flux(amplitude, ICL_SCALE_PX, 0, limit_radius) + galaxy_flux
    rng = np.random.default_rng(seed)
    noisy = (image + rng.normal(0.0, noise, image.shape)).astype(np.float32)
    return noisy, icl / total, total


@pytest.mark.parametrize("z", [0.15, 0.3, 0.45])
def test_exponential_icl_and_sersic_galaxy_give_the_analytic_fraction(z):
    image, expected, _ = exponential_scene(z)
    result = measure_icl_fraction(image, z)
    assert result.f_icl == pytest.approx(expected, abs=0.01)
    assert 0 < result.f_icl_err < 0.02


def test_total_flux_is_in_counts_with_the_cutout_pixel_area():
    z = 0.3
    image, _, total = exponential_scene(z)
    result = measure_icl_fraction(image, z)
    area = (helpers.cutout_pixel_scale(z, SIZE) / hsc.PIXEL_SCALE) ** 2
    assert result.total_flux == pytest.approx(total * area, rel=0.02)
    assert result.icl_flux == pytest.approx(result.f_icl * result.total_flux, rel=1e-6)


def test_threshold_and_limit_are_reported_in_mag_per_arcsec2():
    z = 0.3
    image, _, _ = exponential_scene(z)
    result = measure_icl_fraction(image, z)
    assert result.threshold_sb == pytest.approx(float(hsc.observed_surface_brightness(26.0, z)))
    cutout_scale = helpers.cutout_pixel_scale(z, SIZE)
    expected_limit = hsc.counts_to_sb(3 * NOISE_RMS / (10 / cutout_scale))
    assert result.sb_limit == pytest.approx(float(expected_limit), abs=0.1)
    assert result.pixel_rms == pytest.approx(NOISE_RMS, rel=0.1)


def test_brighter_injection_threshold_counts_more_light_as_icl():
    image, _, _ = exponential_scene(0.3)
    at_26 = measure_icl_fraction(image, 0.3)
    at_25 = measure_icl_fraction(image, 0.3, threshold_sb=helpers.INJECTION_SB)
    assert at_25.f_icl > at_26.f_icl + 0.05


def test_noise_error_grows_with_the_noise():
    quiet, _, _ = exponential_scene(0.3, noise=NOISE_RMS)
    loud, _, _ = exponential_scene(0.3, noise=2 * NOISE_RMS)
    quiet_err = measure_icl_fraction(quiet, 0.3, reestimate_box_sizes=()).f_icl_err_noise
    loud_err = measure_icl_fraction(loud, 0.3, reestimate_box_sizes=()).f_icl_err_noise
    assert 1.5 < loud_err / quiet_err < 3.0


def test_error_combines_noise_and_background_terms():
    image, _, _ = exponential_scene(0.3)
    result = measure_icl_fraction(image, 0.3)
    assert result.f_icl_err_background > 0
    assert result.f_icl_err == pytest.approx(np.hypot(result.f_icl_err_noise, result.f_icl_err_background))
    without = measure_icl_fraction(image, 0.3, reestimate_box_sizes=())
    assert without.f_icl_err_background == 0
    assert without.f_icl == result.f_icl


def test_masked_bright_object_is_left_out():
    z = 0.3
    image, _, _ = exponential_scene(z, with_galaxy=False)
    plain = measure_icl_fraction(image, z)
    yy, xx = np.indices(image.shape)
    star = np.hypot(yy - 40, xx - 60) < 8
    with_star = image + np.where(star, 5.0, 0.0).astype(np.float32)
    mask = np.where(star, 1 << hsc.DEFAULT_MASK_BITS["BRIGHT_OBJECT"], 0).astype(np.int32)
    masked = measure_icl_fraction(with_star, z, mask=mask)
    unmasked = measure_icl_fraction(with_star, z)
    assert masked.f_icl == pytest.approx(plain.f_icl, abs=0.003)
    assert unmasked.f_icl < plain.f_icl - 0.05


def test_inputs_are_not_mutated_and_nan_pixels_warn(caplog):
    image, _, _ = exponential_scene(0.3)
    image[5:8, 5:8] = np.nan
    mask = np.zeros(image.shape, dtype=np.int32)
    image_copy, mask_copy = image.copy(), mask.copy()
    with caplog.at_level(logging.WARNING, logger="measure_sb_cut.measure"):
        result = measure_icl_fraction(image, 0.3, mask=mask, keep_maps=True)
    assert "9 non-finite pixels treated as masked" in caplog.text
    assert np.isfinite(result.f_icl)
    assert result.maps["bad"][5:8, 5:8].all()
    np.testing.assert_array_equal(image, image_copy)
    np.testing.assert_array_equal(mask, mask_copy)


def test_result_is_a_frozen_dataclass():
    image, _, _ = exponential_scene(0.3)
    result = measure_icl_fraction(image, 0.3)
    assert isinstance(result, SBMeasurement)
    with pytest.raises(AttributeError):
        result.f_icl = 0.5


@pytest.mark.parametrize(
    ("z", "message"),
    [
        (None, "z is required"),
        (float("nan"), "z is required"),
        ("high", "z must be a number, got 'high'"),
        (0.7, r"z must be in \[0.1, 0.5\], got 0.7"),
        (0.05, r"z must be in \[0.1, 0.5\], got 0.05"),
    ],
)
def test_bad_redshift_is_refused(z, message):
    image = np.zeros((SIZE, SIZE), dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        measure_icl_fraction(image, z)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"image must be 2-D, got shape \(2, 8, 8\)"):
        measure_icl_fraction(np.zeros((2, 8, 8)), 0.3)
    with pytest.raises(ValueError, match=r"image must be square .* got shape \(224, 200\)"):
        measure_icl_fraction(np.zeros((224, 200)), 0.3)
    with pytest.raises(ValueError, match=r"mask shape \(10, 10\) does not match image shape \(224, 224\)"):
        measure_icl_fraction(np.zeros((224, 224)), 0.3, mask=np.zeros((10, 10), dtype=int))


def test_aperture_larger_than_the_cutout_is_refused():
    image, _, _ = exponential_scene(0.3)
    with pytest.raises(ValueError, match="cutout smaller than the aperture: the aperture radius 400 kpc exceeds"):
        measure_icl_fraction(image, 0.3, aperture_kpc=400)


def test_smaller_aperture_is_measured_inside_its_radius():
    image, _, _ = exponential_scene(0.3)
    result = measure_icl_fraction(image, 0.3, aperture_kpc=150, keep_maps=True)
    assert result.maps["aperture"].sum() == pytest.approx(np.pi * 56**2, rel=0.01)


def test_all_masked_aperture_is_refused():
    image, _, _ = exponential_scene(0.3)
    with pytest.raises(ValueError, match="all pixels inside the aperture are masked"):
        measure_icl_fraction(image, 0.3, mask=np.ones(image.shape, dtype=bool))


def test_failed_background_estimate_is_reported():
    image, _, _ = exponential_scene(0.3)
    mask = np.ones(image.shape, dtype=bool)
    mask[62:162, 62:162] = False  # sky only near the centre: no edge box to measure it on
    with pytest.raises(ValueError, match="background estimate failed: only 0 of 52 edge boxes"):
        measure_icl_fraction(image, 0.3, mask=mask)


def test_flat_background_is_removed():
    image, _, _ = exponential_scene(0.3)
    offset = measure_icl_fraction(image + np.float32(0.01), 0.3)
    plain = measure_icl_fraction(image, 0.3)
    assert offset.f_icl == pytest.approx(plain.f_icl, abs=0.005)


# ----------------------------------------------------------------------------------------
# Manual-style measurement


def scene_with_interloper(z_phot):
    image, _, _ = exponential_scene(0.3, with_galaxy=False)
    yy, xx = np.indices(image.shape)
    threshold = helpers.threshold_counts(helpers.MEASUREMENT_SB, 0.3)
    interloper = 30 * threshold * np.exp(-np.hypot(yy - 150, xx - 60) / 3.0)
    members = {"x": [60.0], "y": [150.0], "z_phot": [z_phot]}
    return image, (image + interloper).astype(np.float32), members


def test_non_member_galaxy_is_masked():
    clean, image, members = scene_with_interloper(z_phot=0.9)
    reference = measure_icl_fraction(clean, 0.3).f_icl
    contaminated = measure_icl_fraction(image, 0.3).f_icl
    manual = measure_icl_fraction_manual(image, 0.3, members=members)
    wider = measure_icl_fraction_manual(image, 0.3, members=members, non_member_growth_px=8)
    assert reference - contaminated > 0.1
    # The interloper's exponential halo continues below the threshold: growing its mask
    # removes more of it.
    assert manual.f_icl == pytest.approx(reference, abs=0.015)
    assert wider.f_icl == pytest.approx(reference, abs=0.003)


def test_member_galaxy_is_kept():
    _, image, members = scene_with_interloper(z_phot=0.32)
    manual = measure_icl_fraction_manual(image, 0.3, members=members)
    assert manual.f_icl == measure_icl_fraction(image, 0.3).f_icl


def test_membership_window_is_three_sigma_of_0_05_per_one_plus_z():
    width = 3 * 0.05 * 1.3
    assert is_member([0.3 + width * 0.999, 0.3 - width * 0.999], 0.3).all()
    assert not is_member([0.3 + width * 1.001, 0.3 - width * 1.001, np.nan], 0.3).any()


def test_star_masks_as_circles_and_arrays():
    clean, _, _ = scene_with_interloper(z_phot=0.9)
    yy, xx = np.indices(clean.shape)
    star = np.hypot(yy - 40, xx - 170) < 6
    image = clean + np.where(star, 3.0, 0.0).astype(np.float32)
    reference = measure_icl_fraction(clean, 0.3).f_icl
    by_circle = measure_icl_fraction_manual(image, 0.3, star_masks=[(170, 40, 7)])
    by_array = measure_icl_fraction_manual(image, 0.3, star_masks=np.hypot(yy - 40, xx - 170) <= 7)
    assert by_circle.f_icl == pytest.approx(reference, abs=0.003)
    assert by_array.f_icl == pytest.approx(by_circle.f_icl, abs=1e-9)


def test_star_mask_over_the_centre_is_ignored_with_a_warning():
    image, _, _ = exponential_scene(0.3)
    plain = measure_icl_fraction(image, 0.3)
    with pytest.warns(UserWarning, match="a star mask covers the image centre; ignoring that part of it"):
        manual = measure_icl_fraction_manual(image, 0.3, star_masks=[(CENTRE, CENTRE, 20)])
    assert manual.f_icl == plain.f_icl


def test_bright_object_plane_over_the_centre_is_ignored_with_a_warning():
    image, _, _ = exponential_scene(0.3)
    yy, xx = np.indices(image.shape)
    bright = 1 << hsc.DEFAULT_MASK_BITS["BRIGHT_OBJECT"]
    mask = np.where(np.hypot(yy - CENTRE, xx - CENTRE) < 15, bright, 0).astype(np.int32)
    mask[np.hypot(yy - 30, xx - 30) < 5] = bright
    with pytest.warns(UserWarning, match="the BRIGHT_OBJECT mask covers the image centre"):
        manual = measure_icl_fraction_manual(image, 0.3, mask=mask, keep_maps=True)
    assert not manual.maps["bad"][int(CENTRE), int(CENTRE)]
    assert manual.maps["bad"][30, 30]


def test_sky_coordinates_need_a_wcs():
    image, _, _ = exponential_scene(0.3)
    with pytest.raises(ValueError, match="members given by 'ra', 'dec' need the image's wcs"):
        measure_icl_fraction_manual(image, 0.3, members={"ra": [1.0], "dec": [2.0], "z_phot": [0.9]})
    with pytest.raises(ValueError, match="members must have a 'z_phot' column"):
        measure_icl_fraction_manual(image, 0.3, members={"x": [1.0], "y": [2.0]})


# ----------------------------------------------------------------------------------------
# Helpers


def test_clipped_mean_matches_astropy():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0, 1, 3000), rng.exponential(10, 200)])
    assert helpers._clipped_mean(values) == pytest.approx(sigma_clipped_stats(values, sigma=3, maxiters=10)[0])


def test_mesh_interpolation_is_bilinear_between_box_centres():
    mesh = np.random.default_rng(4).normal(size=(14, 14)).astype(np.float32)
    positions = np.clip((np.arange(SIZE) - 7.5) / 16, 0, 13)
    rows, columns = np.meshgrid(positions, positions, indexing="ij")
    expected = ndimage.map_coordinates(mesh, [rows, columns], order=1, mode="nearest")
    np.testing.assert_allclose(helpers.mesh_to_image(mesh, 16, (SIZE, SIZE)), expected, atol=1e-5)


def test_label_sources_keeps_groups_of_n_pixels():
    image = np.zeros((20, 20))
    image[2:4, 2:7] = 1  # 10 pixels
    image[10, 10:19] = 1  # 9 pixels
    image[15, 2] = image[16, 3] = 1  # diagonal neighbours: one group of 2
    labels, kept = helpers.label_sources(image, 0.5, np.zeros(image.shape, dtype=bool), n_pixels=10)
    assert kept.size == 1
    assert (labels > 0).sum() == 10
    pairs, _ = helpers.label_sources(image, 0.5, np.zeros(image.shape, dtype=bool), n_pixels=2)
    assert (pairs > 0).sum() == 21


def test_cutout_pixel_scale_spans_600_kpc():
    z = 0.3
    scale = helpers.cutout_pixel_scale(z, SIZE)
    kpc_per_arcsec = helpers.MEASUREMENT_COSMOLOGY.kpc_proper_per_arcmin(z).value / 60
    assert scale * SIZE * kpc_per_arcsec == pytest.approx(600.0)
