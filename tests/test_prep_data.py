"""Reading cutouts (FITS, HDF5 layouts, .npy) and the SPEC Part A preprocessing."""

import h5py
import numpy as np
import pytest
from astropy.io import fits
from synthetic import write_cluster_hdf5, write_fits_cutout

import hsc
import prep_data


def test_fits_reader_uses_mp_keywords_and_header_redshift(tmp_path):
    path = write_fits_cutout(tmp_path / "a.fits", star=True, z=0.25)
    with fits.open(path, mode="update") as hdus:
        hdus["MASK"].header["HIERARCH MP_BRIGHT_OBJECT"] = 12
        hdus["MASK"].data = (hdus["MASK"].data > 0).astype(np.int32) << 12
    refs, errors = prep_data.index_cutouts([path])
    cutout = prep_data.read_cutout(refs[0])
    assert errors == [] and cutout.id == "a"
    assert cutout.mask_bits["BRIGHT_OBJECT"] == 12
    assert cutout.meta["z"] == pytest.approx(0.25)
    bad = prep_data.bad_pixels(cutout)
    assert bad[5:15, 5:15].all() and bad.sum() == 100


def test_fits_without_mp_keys_falls_back_to_default_bits(tmp_path):
    path = write_fits_cutout(tmp_path / "b.fits", star=True, hsc_keys=False)
    cutout = prep_data.read_cutout(prep_data.index_cutouts([path])[0][0])
    assert cutout.mask_bits == hsc.DEFAULT_MASK_BITS
    assert prep_data.bad_pixels(cutout).sum() == 100


def test_preprocessing_follows_spec():
    image = np.full((448, 448), 0.5, np.float32)
    image[:10] = 20.0  # clipped to 10 counts
    bad = np.zeros(image.shape, bool)
    bad[200:260, 200:260] = True
    prepared = prep_data.prepare_image(image, bad)
    assert prepared.shape == (224, 224, 1) and prepared.dtype == np.float32
    assert prepared[112, 40, 0] == pytest.approx(np.arcsinh(0.5 / hsc.ARCSINH_SCALE), rel=1e-5)
    assert prepared[0, 100, 0] == pytest.approx(np.arcsinh(10 / hsc.ARCSINH_SCALE), rel=1e-5)
    assert (prepared[102:128, 102:128] == 0).all()
    assert image[0, 0] == 20.0  # input not mutated


def test_nan_pixels_are_masked_not_propagated():
    image = np.ones((100, 100), np.float32)
    image[:, :20] = np.nan
    prepared = prep_data.prepare_image(image)
    assert np.isfinite(prepared).all()
    assert (prepared[:, :40] == 0).all()
    assert (prepared[:, 60:] > 0).all()


def test_non_square_cutout_is_padded_not_stretched():
    # A round source in a cutout twice as wide as high must stay round after preparation.
    height, width = 100, 200
    y, x = np.mgrid[:height, :width]
    image = np.exp(-np.hypot(y - 50, x - 100) / 6).astype(np.float32)
    prepared = prep_data.prepare_image(image)[..., 0]
    bright = prepared > np.arcsinh(0.2 / hsc.ARCSINH_SCALE)
    rows, cols = np.nonzero(bright)
    assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 1
    assert (prepared[:40] == 0).all() and (prepared[-40:] == 0).all()  # padding flagged NO_DATA


def test_all_three_hdf5_group_layouts(tmp_path):
    path = tmp_path / "groups.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.create_dataset("ours/image", data=rng.normal(size=(30, 30)))
        f.create_dataset("ours/mask", data=np.zeros((30, 30), np.int32))
        f["ours"].attrs["z"] = 0.2
        f.create_dataset("orig1/HDU0/DATA", data=rng.normal(size=(40, 30)))
        f.create_dataset("orig1/HDU1/DATA", data=np.zeros((40, 30), np.int32))
        f.create_dataset("orig2/DATA", data=rng.normal(size=(30, 30)))
        f.create_dataset("orig2/MASK", data=np.zeros((30, 30), np.int32))
        f.create_dataset("weird/pixels", data=np.zeros((30, 30)))
    refs, errors = prep_data.index_cutouts([path])
    assert [r.id for r in refs] == ["orig1", "orig2", "ours", "weird"]
    shapes = [prep_data.read_cutout(r).image.shape for r in refs[:3]]
    assert shapes == [(40, 30), (30, 30), (30, 30)]
    assert prep_data.read_cutout(refs[2]).meta["z"] == pytest.approx(0.2)
    with pytest.raises(prep_data.CutoutError, match=r"groups.h5:weird: unknown HDF5 layout"):
        prep_data.read_cutout(refs[3])


def test_stacked_layout_round_trip(tmp_path):
    labels = write_cluster_hdf5(tmp_path / "s.h5", 4, size=32)
    refs, _ = prep_data.index_cutouts([tmp_path])
    assert [r.id for r in refs] == [f"c0_{i:03d}" for i in range(4)]
    np.testing.assert_allclose(prep_data.read_labels(refs, "f_icl_sb"), labels)
    with pytest.raises(prep_data.CutoutError, match="has no label 'f_icl_true'"):
        prep_data.read_labels(refs, "f_icl_true")


def test_prepared_npy_skips_preprocessing(tmp_path):
    prepared = np.random.default_rng(0).uniform(0, 7, size=(3, 224, 224)).astype(np.float32)
    np.save(tmp_path / "p.npy", prepared)
    refs, _ = prep_data.index_cutouts([tmp_path / "p.npy"])
    np.testing.assert_array_equal(prep_data.load_prepared(refs[1])[..., 0], prepared[1])


@pytest.mark.parametrize(
    "image, mask, message",
    [
        (np.zeros((3, 8, 8)), None, r"image must be 2-D, got shape \(3, 8, 8\)"),
        (np.full((8, 8), np.nan), None, "image has no finite pixels"),
        (np.zeros((0, 8)), None, "image is empty"),
        (np.zeros((8, 8)), np.zeros((4, 4), np.int32), r"mask shape \(4, 4\) does not match image shape \(8, 8\)"),
    ],
)
def test_bad_cutouts_get_clear_errors(image, mask, message):
    cutout = prep_data.Cutout(prep_data.CutoutRef("f.fits", None, "f"), np.asarray(image, np.float32), mask)
    with pytest.raises(prep_data.CutoutError, match=f"^f.fits: {message}"):
        prep_data.prepare_cutout(cutout)


def test_missing_and_unknown_inputs(tmp_path):
    with pytest.raises(prep_data.CutoutError, match="no such file or directory"):
        prep_data.find_files([tmp_path / "nope.fits"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(prep_data.CutoutError, match="unknown file type"):
        prep_data.find_files([tmp_path / "notes.txt"])
    (tmp_path / "broken.fits").write_text("not a fits file")
    refs, _ = prep_data.index_cutouts([tmp_path / "broken.fits"])
    with pytest.raises(prep_data.CutoutError, match="broken.fits: cannot read FITS file"):
        prep_data.read_cutout(refs[0])


def test_dataset_streams_in_order_and_marks_bad_cutouts(tmp_path):
    write_cluster_hdf5(tmp_path / "a.h5", 5, size=32)
    (tmp_path / "b.fits").write_text("garbage")
    refs, _ = prep_data.index_cutouts([tmp_path])
    batches = list(prep_data.cutout_dataset(refs, batch_size=4, size=32))
    indices = np.concatenate([b["index"].numpy() for b in batches])
    errors = [e.decode() for b in batches for e in b["error"].numpy()]
    assert indices.tolist() == list(range(6))
    assert errors[:5] == [""] * 5 and "b.fits" in errors[5]
    assert batches[0]["image"].shape == (4, 32, 32, 1)


def test_mask_is_resized_as_the_original_any_masked_contribution_masks():
    """The original resized the integer mask plane and masked every pixel where the result is > 0."""
    from skimage.transform import resize

    rng = np.random.default_rng(4)
    plane = np.zeros((300, 300), np.int64)
    plane[rng.integers(0, 300, 40), rng.integers(0, 300, 40)] = 512
    plane[100:130, 40:90] = 1
    expected = resize(plane, (224, 224)) > 0
    resized = prep_data.resize_mask(plane != 0, 224)
    np.testing.assert_array_equal(resized, expected)
    # A lone masked pixel masks its whole anti-aliasing footprint, not just the nearest pixel.
    lone = np.zeros((300, 300), bool)
    lone[151, 151] = True
    assert prep_data.resize_mask(lone, 224).sum() >= 4
    assert prep_data.resize_mask(lone, 224, rule="nearest").sum() <= 1
    with pytest.raises(ValueError, match="rule must be one of"):
        prep_data.resize_mask(plane != 0, 224, rule="half")


def test_bad_pixel_values_never_reach_the_prepared_image():
    image = np.full((300, 300), 0.05, np.float32)
    bad = np.zeros(image.shape, bool)
    bad[150, 150] = True
    clean = prep_data.prepare_image(image, bad)
    image[150, 150] = 1e4  # what a saturated, masked pixel may hold
    np.testing.assert_array_equal(prep_data.prepare_image(image, bad), clean)
