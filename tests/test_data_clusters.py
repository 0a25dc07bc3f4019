"""Physics of the mock cluster renderer: profiles, photometry, noise, truth, and GalSim as the reference."""

import dataclasses
import json

import numpy as np
import pytest
import scipy.special

import hsc
import prep_data
from data import clusters, profiles

# ----------------------------------------------------------------------------------------
# Photometric conversions of hsc.py against the formulas of SPEC Part A


def test_zero_point_flux_and_counts_of_one_count_pixel():
    assert hsc.ZERO_POINT_FLUX == pytest.approx(6.3095734448e10, rel=1e-10)
    # mu = 2.5 log10(6.3095734448e10 / c) + 5 log10(0.168) for c = 1 count.
    assert float(hsc.counts_to_sb(1.0)) == pytest.approx(2.5 * np.log10(6.3095734448e10) + 5 * np.log10(0.168), abs=1e-9)


def test_sb_counts_round_trip_and_inverse_formula():
    mu = np.array([20.0, 25.0, 26.5, 30.2])
    counts = hsc.sb_to_counts(mu)
    np.testing.assert_allclose(counts, 10 ** (-0.4 * (mu - 27 - 5 * np.log10(0.168))), rtol=1e-12)
    np.testing.assert_allclose(hsc.counts_to_sb(counts), mu, atol=1e-10)
    assert np.isinf(hsc.counts_to_sb(0.0))


def test_k_correction_and_dimming_match_spec_polynomial():
    for z in (0.1, 0.25, 0.5):
        k = 1.111 * z - 1.101 * z**2 - 75.050 * z**3 + 295.888 * z**4 - 295.390 * z**5
        assert float(hsc.k_correction(z)) == pytest.approx(k, abs=1e-12)
        assert float(hsc.observed_surface_brightness(25.0, z)) == pytest.approx(25.0 + 10 * np.log10(1 + z) + k, abs=1e-12)
    assert float(clusters.sb_threshold_counts(0.3)) == pytest.approx(
        float(hsc.sb_to_counts(26.0 + 10 * np.log10(1.3) + hsc.k_correction(0.3))), rel=1e-12
    )


def test_magnitude_to_counts():
    assert float(hsc.mag_to_counts(27.0)) == pytest.approx(1.0)
    assert float(hsc.mag_to_counts(22.0)) == pytest.approx(100.0)


# ----------------------------------------------------------------------------------------
# Sersic profiles


@pytest.mark.parametrize(
    "n, r_eff, axis_ratio",
    [(1.0, 3.0, 0.4), (4.0, 5.0, 0.7), (6.0, 2.0, 0.9), (2.5, 1.2, 0.6), (6.0, 20.0, 0.8)],
)
def test_rendered_sersic_holds_its_analytic_flux_inside_the_truncation(n, r_eff, axis_ratio):
    # Tolerance 0.75%: the worst case measured is 0.41% (n = 1, minor axis 1.2 px).
    truncation = 40.0
    image = profiles.render_sersic((129, 129), 64.2, 63.7, 1000.0, r_eff, n, axis_ratio, 0.3, truncation)
    expected = 1000.0 * float(scipy.special.gammainc(2 * n, profiles.sersic_b(n) * (truncation / r_eff) ** (1 / n)))
    assert image.sum(dtype=np.float64) == pytest.approx(expected, rel=0.0075)


def test_half_the_light_lies_inside_r_eff():
    n, r_eff, q = 4.0, 12.0, 0.6
    image = profiles.render_sersic((401, 401), 200.0, 200.0, 1000.0, r_eff, n, q, 0.0)
    yy, xx = np.mgrid[:401, :401]
    inside = (xx - 200.0) ** 2 + ((yy - 200.0) / q) ** 2 <= r_eff**2
    total_expected = 1000.0 * float(profiles.sersic_enclosed_fraction(200.0 * q, r_eff, n))
    assert image[inside].sum() == pytest.approx(500.0, rel=0.01)
    assert image.sum() >= total_expected * 0.99


def test_surface_brightness_at_r_eff():
    # I_e from F = 2 pi q r_e^2 n e^b b^-2n Gamma(2n) I_e; the pixel r_e away along the major axis holds I_e.
    flux, r_eff, n, q = 5000.0, 20.0, 4.0, 0.7
    image = profiles.render_sersic((161, 161), 80.0, 80.0, flux, r_eff, n, q, 0.0)
    b = scipy.special.gammaincinv(2 * n, 0.5)
    expected = flux / (2 * np.pi * q * r_eff**2 * n * np.exp(b) * b ** (-2 * n) * scipy.special.gamma(2 * n))
    assert image[80, 100] == pytest.approx(expected, rel=0.01)
    assert image[80 + 14, 80] == pytest.approx(expected, rel=0.01)  # minor axis: q r_e = 14 px
    mu = float(hsc.counts_to_sb(expected))
    assert float(hsc.counts_to_sb(image[80, 100])) == pytest.approx(mu, abs=0.011)


def test_render_sersic_rejects_bad_parameters():
    with pytest.raises(ValueError, match="r_eff must be positive, got -1"):
        profiles.render_sersic((10, 10), 5, 5, 1.0, -1.0, 1.0)
    with pytest.raises(ValueError, match=r"axis_ratio must be in \(0, 1\], got 1.5"):
        profiles.render_sersic((10, 10), 5, 5, 1.0, 1.0, 1.0, 1.5)


def test_batched_profiles_keep_their_truncated_flux():
    canvas = np.zeros((200, 200), np.float32)
    rng = np.random.default_rng(0)
    count = 30
    x, y = rng.uniform(40, 160, (2, count))
    flux = rng.uniform(10, 100, count)
    r_eff = rng.uniform(0.5, 4, count)
    n = rng.uniform(0.7, 4, count)
    truncation = rng.uniform(0.5, 20, count)
    enclosed = profiles.add_sersic_batch(canvas, x, y, flux, r_eff, n, rng.uniform(0.3, 1, count), rng.uniform(0, 3, count), truncation)
    assert canvas.sum(dtype=np.float64) == pytest.approx(enclosed.sum(), rel=1e-5)
    assert (canvas >= 0).all()


def test_moffat_psf_is_normalised_with_the_requested_fwhm():
    psf = profiles.moffat_psf(4.0, 3.0, supersampling=9)
    assert psf.sum() == pytest.approx(1.0, abs=1e-6)
    centre = psf.shape[0] // 2
    profile = psf[centre, centre:]
    half = np.interp(profile[0] / 2, profile[::-1], np.arange(profile.size)[::-1])
    assert 2 * half == pytest.approx(4.0, rel=0.05)  # pixel integration broadens it slightly


def test_fft_convolution_conserves_flux_and_keeps_position():
    image = np.zeros((64, 64), np.float32)
    image[30, 20] = 10.0
    (convolved,) = clusters.convolve_fft([image], profiles.moffat_psf(3.0, 3.5))
    assert convolved.sum() == pytest.approx(10.0 * profiles.moffat_psf(3.0, 3.5).sum(), rel=1e-4)
    assert np.unravel_index(np.argmax(convolved), convolved.shape) == (30, 20)


# ----------------------------------------------------------------------------------------
# Noise before and after the resize


@pytest.mark.parametrize("size_in", [585, 1152, 1936])
def test_resize_noise_factor_matches_the_resize_of_white_noise(size_in):
    noise = np.random.default_rng(size_in).standard_normal((size_in, size_in)).astype(np.float32)
    measured = prep_data.resize_image(noise).std()
    assert clusters.resize_noise_factor(size_in) == pytest.approx(measured, rel=0.02)
    # MOCKS.md measured 0.63-0.85 of sigma / k for these resizes.
    assert 0.6 < clusters.resize_noise_factor(size_in) * size_in / 224 < 0.9


def test_fine_grid_noise_gives_the_native_cutout_noise_after_the_resize():
    native, fine, sigma = 1936, 1152, 0.03
    assert clusters.fine_noise_sigma(sigma, 600, 600) == pytest.approx(sigma, rel=1e-12)  # native grid: the requested level itself
    fine_sigma = clusters.fine_noise_sigma(sigma, native, fine)
    rng = np.random.default_rng(1)
    fine_noise = rng.standard_normal((fine, fine)).astype(np.float32) * fine_sigma
    assert fine_noise.std() == pytest.approx(fine_sigma, rel=0.01)
    resized = prep_data.resize_image(fine_noise) / (native / fine) ** 2
    native_noise = rng.standard_normal((native, native)).astype(np.float32) * sigma
    assert resized.std() == pytest.approx(prep_data.resize_image(native_noise).std(), rel=0.03)


def test_empty_sky_mock_has_the_requested_noise_after_the_resize():
    empty = dataclasses.replace(
        clusters.TRAINING_DISTRIBUTION,
        bcg_abs_mag=(-5.0, 0.0),
        member_count_range=(0, 0),
        field_density_per_arcmin2=0.0,
        star_density_per_arcmin2=0.0,
        noise_sigma_range=(0.03, 0.03),
        no_data_probability=0.0,
    )
    image, mask, truth = clusters.render_cluster(np.random.default_rng(3), empty, include_icl=False, z=0.45)
    native = truth["params"]["native_size"]
    assert truth["params"]["fine_size"] == native  # rendered on the native grid at this z
    expected = 0.03 * clusters.resize_noise_factor(native)
    assert image.std() == pytest.approx(expected, rel=0.05)
    assert abs(image.mean()) < 0.1 * expected
    assert not mask.any()


# ----------------------------------------------------------------------------------------
# Whole mocks and their truth


@pytest.fixture(scope="module")
def cluster_mock():
    return clusters.render_cluster(np.random.default_rng(7), z=0.45)


def test_cluster_mock_layout_and_truth(cluster_mock):
    image, mask, truth = cluster_mock
    assert image.shape == (224, 224) and image.dtype == np.float32
    assert mask.shape == (224, 224) and mask.dtype == np.int32
    allowed = (1 << hsc.DEFAULT_MASK_BITS["NO_DATA"]) | (1 << hsc.DEFAULT_MASK_BITS["BRIGHT_OBJECT"])
    assert not (mask & ~allowed).any()
    assert set(truth) == {"z", "f_icl_true", "f_icl_sb_ideal", "f_icl_sb_ideal_scene", "params"}
    assert truth["z"] == 0.45
    params = json.loads(json.dumps(truth["params"]))  # what the shard writer stores
    assert truth["f_icl_true"] == pytest.approx(params["icl"]["target_fraction"], abs=1e-4)
    assert 0.02 <= truth["f_icl_true"] <= 0.45
    # The SB method misses the ICL brighter than the threshold and adds faint galaxy outskirts.
    assert 0.0 < truth["f_icl_sb_ideal"] < 1.0
    # The BCG sits at the centre.
    assert image[110:114, 110:114].mean() > 100 * float(clusters.sb_threshold_counts(0.45))


def test_background_has_no_icl():
    _, _, truth = clusters.render_cluster(np.random.default_rng(2), clusters.BACKGROUND_DISTRIBUTION, include_icl=False, z=0.48)
    assert truth["f_icl_true"] == 0.0
    assert truth["params"]["icl"] is None


def test_same_generator_state_gives_the_same_mock():
    first = clusters.render_cluster(np.random.default_rng(11), z=0.5)
    second = clusters.render_cluster(np.random.default_rng(11), z=0.5)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_render_cluster_rejects_redshift_outside_the_range():
    with pytest.raises(ValueError, match=r"z must be in \[0.1, 0.5\], got 0.7"):
        clusters.render_cluster(np.random.default_rng(0), z=0.7)
    with pytest.raises(ValueError, match="rng must be a numpy.random.Generator"):
        clusters.render_cluster(3)


def test_sb_threshold_fraction_of_a_flat_image():
    threshold = float(clusters.sb_threshold_counts(0.3))
    assert clusters.sb_threshold_fraction(np.full((224, 224), 0.5 * threshold), 0.3) == 1.0
    assert clusters.sb_threshold_fraction(np.full((224, 224), 2.0 * threshold), 0.3) == 0.0
    with pytest.raises(ValueError, match="must be square"):
        clusters.sb_threshold_fraction(np.ones((10, 12)), 0.3)


def test_preview_png(tmp_path, cluster_mock):
    image, mask, truth = cluster_mock
    rgb, caption, _ = clusters.preview_panel(image, truth, mask)
    assert rgb.shape == (224, 224, 3) and caption.startswith("z=0.45 true=")
    masked = (mask & hsc.mask_value(hsc.DEFAULT_MASK_BITS)) != 0
    assert (rgb[masked, 0] >= rgb[masked, 1]).all()  # masked pixels tinted red
    path = tmp_path / "preview.png"
    profiles.draw_preview([(rgb, caption, "black")] * 2, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="panels must hold at least one cutout"):
        profiles.draw_preview([], str(path))


def test_drawn_parameters_render_the_mock_of_the_seed():
    parameters = clusters.draw_parameters(np.random.default_rng(13), clusters.REAL_LIKE_DISTRIBUTION, z=0.2)
    again = clusters.draw_parameters(np.random.default_rng(13), clusters.REAL_LIKE_DISTRIBUTION, z=0.2)
    np.testing.assert_array_equal(parameters.members["x"], again.members["x"])
    assert parameters.frame == again.frame and parameters.icl == again.icl
    assert parameters.frame.fine_size == parameters.frame.native_size  # z >= 0.185: the native grid
    image, mask, truth = clusters.render_parameters(parameters)
    expected = clusters.render_cluster(np.random.default_rng(13), clusters.REAL_LIKE_DISTRIBUTION, z=0.2)
    np.testing.assert_array_equal(image, expected[0])
    np.testing.assert_array_equal(mask, expected[1])
    assert truth == expected[2]
    assert truth["params"]["member_count"] == len(parameters.members["x"])


# ----------------------------------------------------------------------------------------
# GalSim as the accuracy reference


def _galsim_scene(components, size, psf_fwhm, psf_beta):
    galsim = pytest.importorskip("galsim")
    image = galsim.ImageF(size, size, scale=1.0)
    psf = galsim.Moffat(beta=psf_beta, fwhm=psf_fwhm)
    centre = (size - 1) / 2.0
    for flux, x0, y0, r_eff, n, q, angle, truncation in components:
        # GalSim's half-light radius is circularised and its truncation circular before the shear.
        profile = galsim.Sersic(n=n, half_light_radius=r_eff * np.sqrt(q), flux=flux,
                                trunc=truncation * np.sqrt(q), flux_untruncated=True)
        profile = profile.shear(q=q, beta=angle * galsim.radians)
        galsim.Convolve(profile, psf).drawImage(image, offset=galsim.PositionD(x0 - centre, y0 - centre), add_to_image=True)
    return image.array.astype(np.float64)


def _numpy_scene(components, size, psf_fwhm, psf_beta):
    canvas = np.zeros((size, size), np.float32)
    for flux, x0, y0, r_eff, n, q, angle, truncation in components:
        profiles.add_sersic(canvas, x0, y0, flux, r_eff, n, q, angle, truncation)
    (convolved,) = clusters.convolve_fft([canvas], profiles.moffat_psf(psf_fwhm, psf_beta))
    return convolved.astype(np.float64)


def _labels(galaxies, icl, threshold):
    aperture = clusters.aperture_mask(galaxies.shape[0])
    f_true = icl[aperture].sum() / (icl[aperture].sum() + galaxies[aperture].sum())
    cluster = galaxies + icl
    values = cluster[aperture]
    return f_true, values[values < threshold].sum() / values.sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_numpy_renderer_agrees_with_galsim(seed):
    rng = np.random.default_rng(seed)
    size, fwhm, beta = 96, float(rng.uniform(2.0, 3.5)), float(rng.uniform(2.5, 4.5))
    centre = (size - 1) / 2.0
    bcg = (3000.0, centre, centre, float(rng.uniform(3, 6)), float(rng.choice([3.5, 4.0, 5.0, 6.0])), float(rng.uniform(0.6, 0.95)), float(rng.uniform(0, np.pi)), 40.0)
    members = [
        (float(rng.uniform(50, 400)), *rng.uniform(10, size - 10, 2), float(rng.uniform(0.8, 3)),
         float(rng.choice([1.0, 2.5, 4.0])), float(rng.uniform(0.4, 1)), float(rng.uniform(0, np.pi)), 15.0)
        for _ in range(3)
    ]
    icl = [(float(rng.uniform(500, 1500)), centre, centre, float(rng.uniform(15, 30)), 1.0, float(rng.uniform(0.5, 0.9)), bcg[6], 60.0)]
    galaxies_np = _numpy_scene([bcg] + members, size, fwhm, beta)
    galaxies_gs = _galsim_scene([bcg] + members, size, fwhm, beta)
    icl_np = _numpy_scene(icl, size, fwhm, beta)
    icl_gs = _galsim_scene(icl, size, fwhm, beta)
    assert galaxies_np.sum() == pytest.approx(galaxies_gs.sum(), rel=0.01)
    assert icl_np.sum() == pytest.approx(icl_gs.sum(), rel=0.01)
    threshold = float(np.percentile(galaxies_gs + icl_gs, 60))
    true_np, sb_np = _labels(galaxies_np, icl_np, threshold)
    true_gs, sb_gs = _labels(galaxies_gs, icl_gs, threshold)
    assert true_np == pytest.approx(true_gs, abs=0.005)
    assert sb_np == pytest.approx(sb_gs, abs=0.005)


@pytest.mark.parametrize("size_in", [224, 301, 585, 1082, 1152])
def test_fast_resize_equals_prep_data_resize(size_in):
    image = np.random.default_rng(size_in).lognormal(0.0, 1.0, (size_in, size_in)).astype(np.float32)
    expected = prep_data.resize_image(image)
    np.testing.assert_allclose(clusters.resize_fast(image), expected, rtol=1e-5, atol=1e-6)


def test_centred_profile_uses_its_symmetry_without_changing_values():
    centred = profiles.render_sersic((101, 101), 50.0, 50.0, 100.0, 6.0, 3.0, 0.6, 0.7)
    nudged = profiles.render_sersic((101, 101), 50.0 + 1e-9, 50.0, 100.0, 6.0, 3.0, 0.6, 0.7)
    np.testing.assert_allclose(centred, nudged, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(centred, centred[::-1, ::-1])


def test_mock_icl_is_smooth_and_the_labels_follow_from_the_pixels():
    image, mask, truth, parts = clusters.render_cluster(np.random.default_rng(21), z=0.45, return_components=True)
    icl, galaxies = parts["icl"].astype(np.float64), parts["galaxies"].astype(np.float64)
    # Never zeroed under galaxies (no step a network could learn): positive everywhere and
    # falling steadily from the centre along the central row.
    aperture = clusters.aperture_mask()
    assert (icl[aperture] > 0).all()
    assert icl.min() > -1e-6 * icl.max()  # FFT round-off in the far corners
    row = icl[112, 112:]
    assert (np.diff(row[2:]) < 0).all()
    recomputed = icl[aperture].sum() / (icl[aperture].sum() + galaxies[aperture].sum())
    assert recomputed == pytest.approx(truth["f_icl_true"], abs=2e-3)
    assert clusters.sb_threshold_fraction(icl + galaxies, 0.45) == pytest.approx(truth["f_icl_sb_ideal"], abs=1e-4)
    scene = clusters.sb_threshold_fraction(icl + galaxies + parts["others"].astype(np.float64), 0.45)
    assert scene == pytest.approx(truth["f_icl_sb_ideal_scene"], abs=1e-4)


def test_randomised_distribution_varies_what_the_training_one_holds_fixed():
    rng = np.random.default_rng(21)
    drawn = [clusters.draw_parameters(rng, clusters.RANDOMISED_DISTRIBUTION) for _ in range(40)]
    icl = [p.icl for p in drawn if p.icl is not None]
    assert max(np.hypot(c["offset_x_kpc"], c["offset_y_kpc"]) for c in icl) > 25.0
    assert 5 < sum("second" in c for c in icl) < 30
    assert min(c["n"] for c in icl) < 1.0 and max(c["n"] for c in icl) > 3.0
    assert any(p.sky["halo_depth_sigma"] > 0 for p in drawn) and any(p.sky["gradient_sigma"] > 0.1 for p in drawn)
    field_counts = [len(p.field["x"]) for p in drawn]
    assert max(field_counts) > 1.5 * min(field_counts)
    # The training distribution draws none of it, so its mocks stay those of their seeds.
    plain = clusters.draw_parameters(np.random.default_rng(21), clusters.TRAINING_DISTRIBUTION)
    assert plain.sky is None and "offset_x_kpc" not in plain.icl and "second" not in plain.icl


def test_randomised_mock_renders_its_sky_residuals_and_a_two_component_icl():
    rng = np.random.default_rng(5)
    while True:
        parameters = clusters.draw_parameters(rng, clusters.RANDOMISED_DISTRIBUTION)
        if parameters.icl is not None and "second" in parameters.icl and parameters.sky["halo_depth_sigma"] > 0:
            break
    image, _, truth = clusters.render_parameters(parameters)
    flat = dataclasses.replace(parameters, sky=None)
    plain, _, plain_truth = clusters.render_parameters(flat)
    residual = image - plain
    # A plane of +-A noise sigmas (the halos only darken), and the truth is untouched.
    plane = parameters.sky["gradient_sigma"] * parameters.noise_native
    assert residual.max() <= 1.001 * plane + 1e-6
    assert residual.min() < -plane - 0.5 * parameters.sky["halo_depth_sigma"] * parameters.noise_native
    assert truth == plain_truth
    assert 0 < truth["f_icl_true"] < 1
