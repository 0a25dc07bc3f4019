"""+-300 kpc cutouts of catalogued clusters from a large mock coadd with a WCS."""

import numpy as np
import pytest
from astropy.cosmology import FlatLambdaCDM
from astropy.io import fits
from astropy.wcs import WCS

import hsc
import prep_data
from data import survey_cutouts

SIZE = 2500
NO_DATA = 1 << 8
BRIGHT = 1 << 9


def _wcs():
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [SIZE / 2 + 0.5, SIZE / 2 + 0.5]
    wcs.wcs.cdelt = [-hsc.PIXEL_SCALE / 3600, hsc.PIXEL_SCALE / 3600]
    return wcs


@pytest.fixture(scope="module")
def coadd():
    wcs = _wcs()
    rng = np.random.default_rng(0)
    image = rng.normal(0, 0.03, (SIZE, SIZE)).astype(np.float32)
    mask = np.zeros((SIZE, SIZE), np.int32)
    image[1200, 1300] = 100.0  # a marker on cluster "centre"
    mask[1200, 1300] = BRIGHT
    variance = np.full((SIZE, SIZE), 0.03**2, np.float32)
    return survey_cutouts.CoaddImage(image, wcs, mask, variance)


def _catalogue(wcs):
    (ra_centre, dec_centre), (ra_edge, dec_edge) = wcs.wcs_pix2world([[1300, 1200], [60, 1200]], 0)
    return [
        dict(id="centre", ra=float(ra_centre), dec=float(dec_centre), z=0.3),
        dict(id="edge", ra=float(ra_edge), dec=float(dec_edge), z=0.25),
        dict(id="away", ra=151.0, dec=2.0, z=0.3),
    ]


def test_cutouts_span_600_kpc_and_keep_the_cluster_at_the_centre(coadd):
    cutouts, report = survey_cutouts.cut_clusters(coadd, _catalogue(coadd.wcs))
    assert report.inside == ["centre"] and report.partial == ["edge"] and report.outside == ["away"]
    centre = cutouts[0]
    kpc_per_arcsec = FlatLambdaCDM(H0=68.4, Om0=0.301).kpc_proper_per_arcmin(0.3).value / 60
    expected_side = 600.0 / kpc_per_arcsec / hsc.PIXEL_SCALE
    assert centre.image.shape[0] == centre.image.shape[1]
    assert centre.image.shape[0] % 2 == 1  # odd, so the cluster is on the centre pixel
    assert centre.image.shape[0] == pytest.approx(expected_side, abs=1.5)
    middle = (centre.image.shape[0] - 1) // 2
    assert centre.image[middle, middle] == 100.0
    assert centre.mask[middle, middle] == BRIGHT
    assert centre.variance[middle, middle] == pytest.approx(0.03**2)
    assert centre.meta["z"] == 0.3


def test_cutout_off_the_edge_is_flagged_no_data(coadd):
    cutouts, _ = survey_cutouts.cut_clusters(coadd, _catalogue(coadd.wcs))
    edge = cutouts[1]
    off = np.isnan(edge.image)
    assert off.any() and not off.all()
    np.testing.assert_array_equal((edge.mask & NO_DATA) != 0, off)
    # The coadd ends 60 pixels left of the cluster: everything further left is off it.
    middle = (edge.image.shape[0] - 1) // 2
    assert off[:, : middle - 60].all() and not off[:, middle - 60 :].any()


def test_redshift_outside_the_range_is_skipped(coadd, caplog):
    row = dict(_catalogue(coadd.wcs)[0], id="far", z=0.8)
    cutouts, report = survey_cutouts.cut_clusters(coadd, [row])
    assert cutouts == [] and report.outside == ["far"]
    assert "outside [0.1, 0.5]" in caplog.text


def _write_inputs(tmp_path, coadd):
    coadd_path = tmp_path / "coadd.fits"
    mask_header = fits.Header()
    fits.HDUList([
        fits.PrimaryHDU(),
        fits.ImageHDU(coadd.image, header=coadd.wcs.to_header(), name="IMAGE"),
        fits.ImageHDU(coadd.mask, header=mask_header, name="MASK"),
        fits.ImageHDU(coadd.variance, name="VARIANCE"),
    ]).writeto(coadd_path)
    catalogue_path = tmp_path / "clusters.csv"
    rows = _catalogue(coadd.wcs)
    catalogue_path.write_text("id,ra,dec,z\n" + "".join(f"{r['id']},{r['ra']!r},{r['dec']!r},{r['z']}\n" for r in rows))
    return coadd_path, catalogue_path


def test_command_line_writes_groups_hdf5_and_reports_the_edge(tmp_path, coadd, capsys):
    coadd_path, catalogue_path = _write_inputs(tmp_path, coadd)
    out = tmp_path / "cutouts.h5"
    assert survey_cutouts.main([str(coadd_path), str(catalogue_path), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "off the coadd edge (kept, missing part NO_DATA): edge" in captured.out
    assert "not on the coadd (skipped): away" in captured.err
    refs, errors = prep_data.index_cutouts(str(out))
    assert sorted(ref.id for ref in refs) == ["centre", "edge"] and not errors
    cutout = prep_data.read_cutout(next(ref for ref in refs if ref.id == "centre"))
    assert cutout.meta["z"] == 0.3
    middle = (cutout.image.shape[0] - 1) // 2
    assert cutout.image[middle, middle] == 100.0
    assert prep_data.load_prepared(refs[1]).shape == (224, 224, 1)


def test_command_line_writes_fits_files(tmp_path, coadd):
    coadd_path, catalogue_path = _write_inputs(tmp_path, coadd)
    out = tmp_path / "fits_cutouts"
    assert survey_cutouts.main([str(coadd_path), str(catalogue_path), "--out-dir", str(out)]) == 0
    refs, errors = prep_data.index_cutouts(str(out))
    assert sorted(ref.id for ref in refs) == ["centre", "edge"] and not errors
    cutout = prep_data.read_cutout(next(ref for ref in refs if ref.id == "edge"))
    assert cutout.meta["z"] == 0.25
    assert (cutout.mask & NO_DATA).any()
    with fits.open(out / "edge.fits") as hdus:
        assert [hdu.name for hdu in hdus] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
    assert sorted(p.name for p in out.iterdir()) == ["centre.fits", "edge.fits"]  # no temporary files left


def test_command_line_out_names_an_hdf5_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        survey_cutouts.main(["coadd.fits", "clusters.csv", "--out", str(tmp_path / "folder")])
    assert exit_info.value.code == 2
    assert "--out names one HDF5 file (FILE.h5); a folder of FITS files is --out-dir DIR" in capsys.readouterr().err


def test_catalogue_without_redshift_is_a_clear_error(tmp_path, coadd, capsys):
    coadd_path, _ = _write_inputs(tmp_path, coadd)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,ra,dec\na,150,2\n")
    with pytest.raises(SystemExit):
        survey_cutouts.main([str(coadd_path), str(bad), "--out", str(tmp_path / "o.h5")])
    assert "catalogue lacks column(s) z" in capsys.readouterr().err


def test_help():
    with pytest.raises(SystemExit) as exit_info:
        survey_cutouts.main(["--help"])
    assert exit_info.value.code == 0
