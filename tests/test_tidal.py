"""Tests of the tidal-galaxy mock renderer (data.tidal) and its stream library."""

import json

import h5py
import numpy as np
import pytest
import scipy.special

import hsc
from data import profiles, tidal, tidal_streams


def _empty_params(fwhm_pixels=3.6, beta=3.0):
    return {
        "host": {"components": []},
        "neighbours": [],
        "stars": [],
        "psf": {"fwhm_pixels": [fwhm_pixels] * 5, "beta": beta},
        "feature": None,
    }


def _feature_image(params):
    """Noiseless i-band image of the feature alone: the scene with it minus the scene without."""
    with_feature = tidal.render_scene(params, include_feature=True)
    without = tidal.render_scene(params, include_feature=False)
    return (with_feature - without)[..., 2].astype(np.float64)


# ----------------------------------------------------------------------------------------
# Profiles


@pytest.mark.parametrize("r_e", [3.0, 4.0, 8.0])
@pytest.mark.parametrize("n", [0.5, 1.0, 2.5, 4.0])
def test_sersic_image_holds_its_total_flux(r_e, n):
    # q r_e >= 2 px: resolved profiles, rendered with the tidal galaxies' sampling, hold it within 1%.
    flux = 1000.0
    image = profiles.render_sersic((257, 257), 128.3, 127.6, flux, r_e, n, 0.7, 0.4, **tidal.STAMP_SAMPLING)
    # The image edge lies at elliptical radius >= 128 px; the analytic flux inside that radius
    # bounds from below what the image can hold.
    b = profiles.sersic_b(n)
    inside = scipy.special.gammainc(2.0 * n, b * (128.0 / r_e) ** (1.0 / n))
    assert flux * inside * 0.99 <= image.sum() <= flux * 1.01


def test_sersic_b_halves_the_light():
    for n in (0.5, 1.0, 4.0, 8.0):
        b = profiles.sersic_b(n)
        assert scipy.special.gammainc(2.0 * n, b) == pytest.approx(0.5, abs=1e-4)


def test_exponential_profile_surface_brightness_at_r_e():
    # n = 1: I(r) = F / (2 pi q h^2) exp(-r / h), h = r_e / b_1 (Freeman 1970).
    flux, r_e, q = 500.0, 6.0, 0.8
    image = profiles.render_sersic((101, 101), 50.0, 50.0, flux, r_e, 1.0, q, 0.0, **tidal.STAMP_SAMPLING)
    h = r_e / profiles.sersic_b(1.0)
    expected = flux / (2.0 * np.pi * q * h**2) * np.exp(-r_e / h)
    assert image[50, 56] == pytest.approx(expected, rel=2e-3)
    # The same brightness along the minor axis at q r_e.
    assert image[50, 50 + 6] == pytest.approx(expected, rel=2e-3)
    assert hsc.counts_to_sb(image[50, 56]) == pytest.approx(hsc.counts_to_sb(expected), abs=0.003)


def test_gaussian_profile_matches_the_analytic_gaussian():
    # n = 0.5 is a Gaussian with half-light radius sigma sqrt(2 ln 2).
    flux, sigma = 200.0, 3.0
    image = profiles.render_sersic((61, 61), 30.0, 30.0, flux, sigma * np.sqrt(2 * np.log(2)), 0.5, supersampling=1,
                                   cusp_correction=False)
    y, x = np.mgrid[:61, :61]
    expected = flux / (2 * np.pi * sigma**2) * np.exp(-((x - 30) ** 2 + (y - 30) ** 2) / (2 * sigma**2))
    np.testing.assert_allclose(image, expected, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r_eff": 0.0}, r"r_eff must be positive, got 0.0"),
        ({"n": 11.0}, r"n must be in \[0.2, 10\], got 11.0"),
        ({"axis_ratio": 1.5}, r"axis_ratio must be in \(0, 1\], got 1.5"),
    ],
)
def test_sersic_image_rejects_bad_parameters(kwargs, message):
    arguments = {"r_eff": 2.0, "n": 1.0, "axis_ratio": 1.0} | kwargs
    with pytest.raises(ValueError, match=message):
        profiles.render_sersic((11, 11), 5.0, 5.0, 1.0, **arguments)


def test_moffat_psf_has_the_requested_fwhm():
    # Sampled at the pixel centres, as the tidal renderer's PSF is.
    fwhm = 4.0
    psf = profiles.moffat_psf(fwhm, 3.0, radius=100, supersampling=1)
    assert psf.sum() == pytest.approx(1.0)
    # Half the peak at half the FWHM from the centre.
    profile = psf[100, 100:]
    assert np.interp(fwhm / 2.0, np.arange(profile.size), profile) == pytest.approx(psf[100, 100] / 2.0, rel=1e-2)
    with pytest.raises(ValueError, match="beta must be > 1, got 1.0"):
        profiles.moffat_psf(fwhm, 1.0)


@pytest.mark.parametrize(
    "n, r_e, q, theta, flux", [(1.0, 6.0, 0.6, 0.5, 300.0), (4.0, 5.0, 0.8, 1.0, 300.0), (2.5, 10.0, 0.5, 2.0, 1000.0)]
)
def test_rendered_galaxy_agrees_with_galsim(n, r_e, q, theta, flux):
    galsim = pytest.importorskip("galsim")
    component = tidal._component(63.5 + tidal.CANVAS_MARGIN, 63.5 + tidal.CANVAS_MARGIN, [flux] * 5, r_e, n, q, theta)
    params = _empty_params(fwhm_pixels=3.6, beta=3.0)
    params["host"]["components"] = [component]
    image = tidal.render_scene(params)[..., 2]
    # GalSim's half-light radius is circularised; ours is along the major axis.
    galaxy = galsim.Sersic(n=n, half_light_radius=r_e * np.sqrt(q) * hsc.PIXEL_SCALE, flux=flux)
    galaxy = galaxy.shear(q=q, beta=theta * galsim.radians)
    psf = galsim.Moffat(beta=3.0, fwhm=3.6 * hsc.PIXEL_SCALE)
    reference = galsim.Convolve(galaxy, psf).drawImage(nx=128, ny=128, scale=hsc.PIXEL_SCALE).array
    assert image.sum() == pytest.approx(reference.sum(), rel=0.01)
    assert np.sqrt(np.mean((image - reference) ** 2)) < 0.1 * tidal.NOISE_SIGMA[2]
    assert np.abs(image - reference).max() < 0.02 * reference.max()


def test_bin_points_conserves_weight_and_places_points():
    image = tidal.bin_points(np.array([3.0, 5.5]), np.array([2.0, 7.25]), np.array([1.0, 2.0]), (10, 10))
    assert image.sum() == pytest.approx(3.0)
    assert image[2, 3] == pytest.approx(1.0)
    assert image[7, 5] == pytest.approx(2.0 * 0.5 * 0.75)
    # Points off the grid are dropped.
    assert tidal.bin_points(np.array([-5.0]), np.array([2.0]), np.array([1.0]), (10, 10)).sum() == 0.0


def test_psf_convolution_conserves_a_star_flux():
    params = _empty_params()
    params["stars"] = [{"x": 79.5, "y": 79.5, "flux": [100.0, 200.0, 300.0, 400.0, 500.0]}]
    image = tidal.render_scene(params)
    np.testing.assert_allclose(image.sum(axis=(0, 1)), [100.0, 200.0, 300.0, 400.0, 500.0], rtol=1e-3)


# ----------------------------------------------------------------------------------------
# Noise, determinism, shapes


def test_empty_sky_noise_matches_the_ultradeep_depth():
    image = tidal.render_scene(_empty_params(), noise_rng=np.random.default_rng(3))
    # 16384 pixels per band: the standard deviation is known to 0.6%.
    np.testing.assert_allclose(image.std(axis=(0, 1)), tidal.NOISE_SIGMA, rtol=0.03)
    np.testing.assert_allclose(image.mean(axis=(0, 1)), 0.0, atol=4 * max(tidal.NOISE_SIGMA) / 128)


def test_rendering_is_deterministic_for_a_seed():
    first_image, first_truth = tidal.render_tidal_galaxy(np.random.default_rng(11), has_tidal=True)
    second_image, second_truth = tidal.render_tidal_galaxy(np.random.default_rng(11), has_tidal=True)
    np.testing.assert_array_equal(first_image, second_image)
    assert json.dumps(first_truth["params"]) == json.dumps(second_truth["params"])
    other_image, _ = tidal.render_tidal_galaxy(np.random.default_rng(12), has_tidal=True)
    assert not np.array_equal(first_image, other_image)


def test_image_shape_dtype_and_truth_columns():
    image, truth = tidal.render_tidal_galaxy(np.random.default_rng(5), has_tidal=False)
    assert image.shape == (128, 128, 5)
    assert image.dtype == np.float32
    assert truth["has_tidal"] == 0
    assert truth["feature_type"] == "none"
    assert np.isnan(truth["feature_sb"])
    json.dumps(truth["params"])
    image, truth = tidal.render_tidal_galaxy(np.random.default_rng(5), has_tidal=True)
    assert truth["has_tidal"] == 1
    assert truth["feature_type"] in tidal.FEATURE_TYPES


def test_the_scene_parameters_render_the_same_image_again():
    rng = np.random.default_rng(21)
    image, truth = tidal.render_tidal_galaxy(rng, has_tidal=True)
    noiseless = tidal.render_scene(truth["params"])
    residual = image - noiseless
    np.testing.assert_allclose(residual.std(axis=(0, 1)), tidal.NOISE_SIGMA, rtol=0.05)


def test_has_tidal_must_be_a_boolean_or_none():
    with pytest.raises(ValueError, match="has_tidal must be True, False or None, got 'yes'"):
        tidal.render_tidal_galaxy(np.random.default_rng(0), has_tidal="yes")


def test_host_properties_stay_in_the_selection():
    rng = np.random.default_rng(8)
    for _ in range(40):
        params = tidal.draw_scene(rng, has_tidal=False)
        assert tidal.HOST_LOG_MASS_RANGE[0] <= params["host"]["log_stellar_mass"] <= tidal.HOST_LOG_MASS_RANGE[1]
        assert tidal.HOST_Z_RANGE[0] <= params["host"]["z"] <= tidal.HOST_Z_RANGE[1]
        g_r = params["host"]["colours"][0]
        assert 0.2 < g_r < 2.0


# ----------------------------------------------------------------------------------------
# Tidal features


def test_tidal_probability_averages_to_the_tidal_fraction():
    log_mass = np.linspace(*tidal.HOST_LOG_MASS_RANGE, 2001)
    density = tidal._mass_function(log_mass)
    mean = np.sum(density * tidal.tidal_probability(log_mass)) / np.sum(density)
    assert mean == pytest.approx(tidal.TIDAL_FRACTION, rel=1e-3)
    # The label carries no information about the host: the same probability at every mass.
    assert tidal.tidal_probability(11.0) == tidal.tidal_probability(10.0)


def test_forcing_the_label_does_not_change_the_host():
    # The host, neighbours, stars and PSF come from the same draws whether or not the host has a
    # feature: positives and negatives share one host population.
    for seed in range(5):
        with_feature = tidal.draw_scene(np.random.default_rng(seed), has_tidal=True)
        without = tidal.draw_scene(np.random.default_rng(seed), has_tidal=False)
        for key in ("host", "neighbours", "stars", "psf"):
            assert with_feature[key] == without[key]
        assert with_feature["feature"] is not None and without["feature"] is None


def test_drawn_feature_brightness_and_share_are_independent_of_host_mass():
    rng = np.random.default_rng(31)
    rows = []
    for _ in range(150):
        params = tidal.draw_scene(rng, has_tidal=True)
        feature = params["feature"]
        rows.append((params["host"]["log_stellar_mass"], feature["drawn_sb"], feature["light_fraction"]))
    mass, drawn_sb, share = np.asarray(rows).T
    assert abs(np.corrcoef(mass, drawn_sb)[0, 1]) < 0.2
    assert abs(np.corrcoef(mass, share)[0, 1]) < 0.2
    low, high = tidal.FEATURE_LIGHT_SHARE_RANGE
    assert np.all((share >= low) & (share <= high))


def test_tidal_fraction_over_many_draws():
    rng = np.random.default_rng(2024)
    n = 2000
    drawn = sum(tidal.draw_scene(rng)["feature"] is not None for _ in range(n))
    expected = tidal.TIDAL_FRACTION * n
    assert abs(drawn - expected) < 4.0 * np.sqrt(expected * (1.0 - tidal.TIDAL_FRACTION))


@pytest.mark.parametrize("seed", range(6))
def test_feature_surface_brightness_equals_the_truth(seed):
    _, truth = tidal.render_tidal_galaxy(np.random.default_rng(seed), has_tidal=True)
    feature = _feature_image(truth["params"])
    assert tidal.intensity_weighted_sb(np.maximum(feature, 0.0)) == pytest.approx(truth["feature_sb"], abs=0.02)


def test_features_lie_within_about_ten_arcsec():
    rng = np.random.default_rng(99)
    y, x = np.mgrid[:128, :128]
    for _ in range(8):
        _, truth = tidal.render_tidal_galaxy(rng, has_tidal=True)
        feature = _feature_image(truth["params"])
        centre = np.asarray(truth["params"]["feature"]["centre"]) - tidal.CANVAS_MARGIN
        radius_arcsec = np.hypot(x - centre[0], y - centre[1]) * hsc.PIXEL_SCALE
        assert feature[radius_arcsec < 11.0].sum() / feature.sum() > 0.85


def test_feature_keeps_its_light_share_and_its_drawn_sb_unless_a_size_limit_binds():
    rng = np.random.default_rng(7)
    floor = tidal.FEATURE_FLOOR_RADIUS_ARCSEC / hsc.PIXEL_SCALE
    largest = tidal.FEATURE_MAX_RADIUS_ARCSEC / hsc.PIXEL_SCALE
    for _ in range(20):
        params = tidal.draw_scene(rng, has_tidal=True)
        feature = params["feature"]
        assert feature["type"] in tidal.FEATURE_TYPES
        host_flux = tidal._host_flux_i(params["host"])
        assert feature["flux"][2] == pytest.approx(feature["light_fraction"] * host_flux, rel=1e-6)
        radius = feature["radius_90_pixels"]
        assert floor - 1e-9 <= radius <= largest + 1e-9
        smallest = min(max(tidal.FEATURE_MIN_RADIUS_ARCSEC / hsc.PIXEL_SCALE,
                           tidal.FEATURE_MIN_RADIUS_HOST * params["host"]["r_e_pixels"]), largest)
        if smallest + 1e-6 < radius < largest - 1e-6:  # no size limit binds: the drawn SB (aimed in one step)
            assert feature["mean_sb"] == pytest.approx(feature["drawn_sb"], abs=0.3)
        elif radius < smallest - 1e-6:  # shrunk below the smallest size to stay above the SB limit
            assert feature["mean_sb"] <= tidal.FEATURE_SB_LIMIT + 0.3 or radius == pytest.approx(floor)
        if not params["host"]["early_type"]:
            assert feature["type"] != "shell"  # shells around early types only


def test_pair_twins_differ_by_the_feature_alone():
    image_with, image_without, truth_with, truth_without = tidal.render_tidal_pair(np.random.default_rng(4), "p1")
    rest, feature = tidal.render_components(truth_with["params"])
    np.testing.assert_allclose(image_with - image_without, feature, atol=1e-5)
    np.testing.assert_array_equal(image_without, rest + tidal.scene_noise(truth_with["params"]))
    assert (truth_with["has_tidal"], truth_without["has_tidal"]) == (1, 0)
    assert truth_with["pair_id"] == truth_without["pair_id"] == "p1"
    assert truth_without["feature_type"] == "none" and np.isnan(truth_without["feature_sb"])
    assert truth_without["visible"] == 0 and np.isfinite(truth_with["feature_snr"])


def test_visible_pairs_have_visible_features():
    for seed in range(3):
        _, _, truth, _ = tidal.render_tidal_pair(np.random.default_rng(seed), visible=True)
        assert truth["visible"] == 1
        assert truth["feature_snr"] >= tidal.VISIBLE_MIN_SNR
        assert truth["feature_contrast"] >= tidal.VISIBLE_MIN_CONTRAST


def test_a_galaxy_renders_again_from_its_parameters():
    image, truth = tidal.render_tidal_galaxy(np.random.default_rng(12), has_tidal=True)
    np.testing.assert_array_equal(tidal.render_scene(truth["params"], noise_rng=True), image)


def test_feature_points_are_scaled_to_unit_radius():
    for feature_type in tidal.FEATURE_TYPES:
        x, y = tidal.feature_points(feature_type, seed=4)
        assert np.quantile(np.hypot(x, y), 0.9) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="feature_type must be one of"):
        tidal.feature_points("bridge", seed=4)


def test_intensity_weighted_sb_of_a_uniform_patch_is_its_sb():
    image = np.zeros((20, 20))
    image[5:15, 5:15] = hsc.sb_to_counts(26.0)
    assert tidal.intensity_weighted_sb(image) == pytest.approx(26.0)
    with pytest.raises(ValueError, match="image must hold positive flux"):
        tidal.intensity_weighted_sb(np.zeros((4, 4)))


# ----------------------------------------------------------------------------------------
# Stream library


def test_leapfrog_conserves_energy_in_the_host_potential():
    positions, velocities = tidal_streams._integrate_orbit([1.0, 0.0, 0.0], [0.0, 0.6, 0.1], 2000, 0.025)
    energy = 0.5 * np.sum(velocities**2, axis=1) + 0.5 * np.log(
        np.sum(positions**2, axis=1) + tidal_streams.CORE_RADIUS**2
    )
    assert np.ptp(energy) < 1e-3 * abs(energy[0]) + 1e-3


def test_stream_library_is_deterministic_and_shaped():
    first = tidal_streams.stream_library(n_runs=2, n_particles=50, seed=3)
    tidal_streams.stream_library.cache_clear()
    second = tidal_streams.stream_library(n_runs=2, n_particles=50, seed=3)
    assert len(first) == 6
    assert all(snapshot.shape == (50, 3) for snapshot in first)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="n_runs must be >= 1, got 0"):
        tidal_streams.stream_library(n_runs=0)


# ----------------------------------------------------------------------------------------
# Files and preview


def test_write_tidal_hdf5_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    rendered = [tidal.render_tidal_galaxy(rng, has_tidal=flag) for flag in (True, False)]
    path = tmp_path / "shard.h5"
    tidal.write_tidal_hdf5(path, [image for image, _ in rendered], [truth for _, truth in rendered], ["a", "b"])
    with h5py.File(path, "r") as f:
        assert f.attrs["bands"] == "grizy"
        assert f["image"].shape == (2, 128, 128, 5)
        assert f["image"].dtype == np.float32
        np.testing.assert_array_equal(f["image"][0], rendered[0][0])
        assert list(f["has_tidal"][:]) == [1, 0]
        assert f["feature_type"][1].decode() == "none"
        assert np.isnan(f["feature_sb"][1])
        assert json.loads(f["params"][0])["feature"]["type"] == rendered[0][1]["feature_type"]
    assert [p.name for p in tmp_path.iterdir()] == ["shard.h5"]
    with pytest.raises(ValueError, match=r"images must be \(N, 128, 128, 5\), got shape \(2, 64, 64, 5\)"):
        tidal.write_tidal_hdf5(path, np.zeros((2, 64, 64, 5)), [{}, {}], ["a", "b"])


def test_draw_preview_writes_a_png(tmp_path):
    rng = np.random.default_rng(2)
    rendered = [tidal.render_tidal_galaxy(rng, has_tidal=flag) for flag in (True, False, True)]
    panels = [tidal.preview_panel(image, truth) for image, truth in rendered]
    assert panels[1][1:] == ("no feature", "black") and panels[0][1].startswith(rendered[0][1]["feature_type"])
    assert panels[0][0].shape == (128, 128, 3) and 0.0 <= panels[0][0].min() <= panels[0][0].max() <= 1.0
    path = tmp_path / "preview.png"
    profiles.draw_preview(panels, path, columns=6, title=tidal.PREVIEW_TITLE)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["preview.png"]


def test_visibility_rule():
    sigma = np.sqrt(0.017**2 + 0.020**2 + 0.022**2)
    feature = np.zeros((128, 128, 5))
    rest = np.zeros((128, 128, 5))
    # 100 pixels at one detection sigma (a third in each of g, r, i): S/N 100 sigma / (sigma sqrt(100)) = 10.
    feature[:10, :10, :3] = sigma / 3
    rest[:10, :10, :3] = sigma / 3
    result = tidal.feature_visibility(feature, rest)
    assert result["footprint_pixels"] == 100
    assert result["snr"] == pytest.approx(10.0)
    assert result["contrast"] == pytest.approx(1.0)
    assert not result["visible"]
    feature[:10, :10, :3] *= 4  # S/N 40 and contrast 4: visible
    assert tidal.feature_visibility(feature, rest)["visible"]
    feature[:] = 0.2 * sigma / 3  # below the footprint threshold everywhere
    assert tidal.feature_visibility(feature, rest) == {
        "snr": 0.0, "contrast": 0.0, "footprint_pixels": 0, "visible": False}
