"""The demo runner and the script that made its example data."""

import pathlib
import subprocess
import sys

import pandas as pd
from astropy.io import fits

import prep_data

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_example_clusters_are_readable_hsc_style_fits():
    refs, errors = prep_data.index_cutouts([ROOT / "demos" / "data" / "clusters"])
    truth = pd.read_csv(ROOT / "demos" / "data" / "clusters_truth.csv", dtype={"id": str})
    assert errors == [] and [ref.id for ref in refs] == truth["id"].tolist()
    cutout = prep_data.read_cutout(refs[0])
    assert cutout.meta["z"] == round(truth["z"][0], 4)
    assert prep_data.prepare_cutout(cutout).shape == (224, 224, 1)


def test_make_example_data_writes_fits_and_truth(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "demos" / "make_example_data.py"), "--n", "1", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    with fits.open(tmp_path / "clusters" / "example00.fits.gz") as hdus:
        assert [hdu.name for hdu in hdus] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
        assert hdus["MASK"].header["MP_BRIGHT_OBJECT"] == 9
    truth = pd.read_csv(tmp_path / "clusters_truth.csv")
    assert 0 < truth["f_icl_sb_ideal"][0] < 1


def test_demo_writes_results_page(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "demos" / "run_demo.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"open {tmp_path / 'index.html'}" in result.stdout
    page = (tmp_path / "index.html").read_text()
    assert "icl_comparison.png" in page and "sb_plots/" in page
    table = pd.read_csv(tmp_path / "icl_comparison.csv")
    assert len(table) == 8 and table["f_icl_sb"].between(0, 1).all()
