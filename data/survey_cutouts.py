"""Cut +-300 kpc cutouts of catalogued clusters out of a survey coadd.

For users who already hold survey images (an HSC coadd with its WCS and mask plane): given a
catalogue of clusters (id, ra, dec, z), each cluster gets a square cutout spanning
+-300 kpc (``hsc.CUTOUT_HALF_WIDTH_KPC``) at its redshift, cut with ``astropy.nddata.Cutout2D``
(the angular scale from ``astropy.cosmology.FlatLambdaCDM``; by default H0 = 68.4, Om0 = 0.301,
the cosmology of the measurement). The cluster stays at the cutout centre; the part of a cutout
that falls off the coadd is NaN in the image and flagged NO_DATA in the mask. Clusters entirely
off the coadd are reported and skipped; those partly off it are reported and kept.

Output: this project's HDF5 *groups* layout (one group per cluster, see :mod:`prep_data`) or
one FITS file per cluster with IMAGE, MASK (and VARIANCE) HDUs, readable by :mod:`prep_data`.
"""

import common

if __name__ in common.MAIN_NAMES:
    common.quiet_interrupt()  # a Ctrl-C while the libraries load is one line, not a traceback

import argparse
import dataclasses
import logging
import pathlib
import sys
import warnings

import numpy as np

import data.files
import hsc
import prep_data
from data import profiles

logger = logging.getLogger(__name__)

#: Cosmology (H0 in km/s/Mpc, Om0) of the SB measurement, used by default for real clusters.
MEASUREMENT_COSMOLOGY = (68.4, 0.301)


@dataclasses.dataclass(frozen=True)
class CoaddImage:
    """A survey coadd: image, optional mask plane and variance, and the celestial WCS."""

    image: np.ndarray
    wcs: object
    mask: np.ndarray = None
    variance: np.ndarray = None
    mask_bits: dict = dataclasses.field(default_factory=lambda: dict(hsc.DEFAULT_MASK_BITS))


@dataclasses.dataclass(frozen=True)
class SurveyCutout:
    """One cluster's cutout.

    Attributes
    ----------
    id : str
    image : ndarray of float32, shape (S, S)
        Counts; NaN off the coadd.
    mask : ndarray of int32, shape (S, S)
        Mask plane; NO_DATA off the coadd.
    variance : ndarray of float32 or None
    mask_bits : dict
    meta : dict
        z, ra, dec, the position on the coadd and the cosmology.
    """

    id: str
    image: np.ndarray
    mask: np.ndarray
    variance: np.ndarray
    mask_bits: dict
    meta: dict

    def as_cutout(self, path=""):
        """The :class:`prep_data.Cutout` record (without the variance)."""
        return prep_data.Cutout(prep_data.CutoutRef(str(path), self.id, self.id), self.image, self.mask, dict(self.mask_bits), dict(self.meta))


@dataclasses.dataclass(frozen=True)
class CutoutReport:
    """Where each catalogued cluster fell.

    Attributes
    ----------
    inside : list of str
        Ids of clusters whose cutout lies wholly on the coadd.
    partial : list of str
        Ids of clusters whose cutout runs off the coadd edge (kept, the missing part NO_DATA).
    outside : list of str
        Ids of clusters whose cutout misses the coadd (skipped).
    """

    inside: list
    partial: list
    outside: list


def read_coadd(path):
    """Read a coadd FITS file: image (EXTNAME IMAGE or the first 2-D HDU) with its WCS, MASK, VARIANCE.

    Raises
    ------
    ValueError
        If the file has no 2-D image or its header has no celestial WCS.
    """
    from astropy.io import fits
    from astropy.wcs import WCS

    with fits.open(path, memmap=True) as hdus:
        named = {hdu.name.upper(): hdu for hdu in hdus}
        arrays = [hdu for hdu in hdus if hdu.data is not None and np.ndim(hdu.data) == 2]
        image_hdu = named.get("IMAGE") or (arrays[0] if arrays else None)
        if image_hdu is None or image_hdu.data is None:
            raise ValueError(f"{path}: no 2-D image HDU")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wcs = WCS(image_hdu.header)
        if not wcs.has_celestial:
            raise ValueError(f"{path}: the image header has no celestial WCS")
        mask_hdu = named.get("MASK")
        if mask_hdu is None and len(arrays) > 1 and arrays[1] is not image_hdu:
            mask_hdu = arrays[1]
        variance_hdu = named.get("VARIANCE")
        mask_bits = dict(hsc.DEFAULT_MASK_BITS)
        if mask_hdu is not None:
            for plane in mask_bits:
                if f"MP_{plane}" in mask_hdu.header:
                    mask_bits[plane] = int(mask_hdu.header[f"MP_{plane}"])
        return CoaddImage(
            image=np.asarray(image_hdu.data, dtype=np.float32),
            wcs=wcs.celestial,
            mask=None if mask_hdu is None else np.asarray(mask_hdu.data).astype(np.int32),
            variance=None if variance_hdu is None else np.asarray(variance_hdu.data, dtype=np.float32),
            mask_bits=mask_bits,
        )


def read_catalogue(path):
    """Read a cluster catalogue (any astropy Table format: CSV, ECSV, FITS) with columns id, ra, dec, z.

    ra and dec are in degrees. Returns an astropy Table.

    Raises
    ------
    ValueError
        If a column is missing.
    """
    from astropy.table import Table

    table = Table.read(path)
    columns = {name.lower(): name for name in table.colnames}
    missing = [name for name in ("id", "ra", "dec", "z") if name not in columns]
    if missing:
        raise ValueError(f"{path}: catalogue lacks column(s) {', '.join(missing)} (has {', '.join(table.colnames)})")
    table.rename_columns([columns[n] for n in ("id", "ra", "dec", "z")], ["id", "ra", "dec", "z"])
    return table


def cutout_side_pixels(z, pixel_scale, cosmology=MEASUREMENT_COSMOLOGY):
    """Odd side (pixels) of the +-300 kpc cutout at redshift ``z`` on a grid of ``pixel_scale`` arcsec/px."""
    kpc_per_arcsec = profiles.kpc_per_arcsec(z, cosmology)
    # Odd, so that the cluster falls on the centre pixel, (side - 1) / 2.
    return 2 * int(round(hsc.CUTOUT_HALF_WIDTH_KPC / kpc_per_arcsec / pixel_scale)) + 1


def cut_clusters(coadd, catalogue, cosmology=MEASUREMENT_COSMOLOGY):
    """Cut the +-300 kpc cutout of every catalogued cluster.

    Parameters
    ----------
    coadd : CoaddImage
    catalogue : astropy Table or sequence of dict
        Rows with ``id``, ``ra``, ``dec`` (degrees) and ``z`` (0.1-0.5; others are skipped with a warning).
    cosmology : tuple
        (H0, Om0) of the FlatLambdaCDM cosmology that sets the angular size.

    Returns
    -------
    cutouts : list of SurveyCutout
        Square cutouts centred on the clusters (image NaN and mask NO_DATA off the coadd), with
        ``meta`` holding z, ra, dec and the cutout's pixel position on the coadd.
    report : CutoutReport
    """
    from astropy.coordinates import SkyCoord
    from astropy.nddata import Cutout2D, NoOverlapError
    from astropy.wcs.utils import proj_plane_pixel_scales

    pixel_scale = float(np.mean(proj_plane_pixel_scales(coadd.wcs))) * 3600.0
    no_data_bit = 1 << int(coadd.mask_bits["NO_DATA"])
    cutouts, inside, partial, outside = [], [], [], []
    for row in catalogue:
        cluster_id, z = str(row["id"]), float(row["z"])
        if not hsc.Z_MIN <= z <= hsc.Z_MAX:
            logger.warning("%s: z = %.3f is outside [%s, %s]; skipped", cluster_id, z, hsc.Z_MIN, hsc.Z_MAX)
            outside.append(cluster_id)
            continue
        side = cutout_side_pixels(z, pixel_scale, cosmology)
        position = SkyCoord(float(row["ra"]), float(row["dec"]), unit="deg")
        try:
            cut = Cutout2D(coadd.image, position, (side, side), wcs=coadd.wcs, mode="partial", fill_value=np.nan, copy=True)
        except NoOverlapError:
            outside.append(cluster_id)
            continue
        image = np.asarray(cut.data, dtype=np.float32)
        slices = cut.slices_cutout
        off_edge = np.ones(image.shape, dtype=bool)
        off_edge[slices] = False
        if coadd.mask is not None:
            mask = np.full(image.shape, no_data_bit, dtype=np.int32)
            mask[slices] = coadd.mask[cut.slices_original]
        else:
            mask = np.where(off_edge, no_data_bit, 0).astype(np.int32)
        (partial if off_edge.any() else inside).append(cluster_id)
        meta = dict(z=z, ra=float(row["ra"]), dec=float(row["dec"]), x_coadd=float(cut.input_position_original[0]),
                    y_coadd=float(cut.input_position_original[1]), pixel_scale=pixel_scale,
                    cosmology=f"FlatLambdaCDM(H0={cosmology[0]}, Om0={cosmology[1]})")
        variance = None
        if coadd.variance is not None:
            variance = np.full(image.shape, np.nan, dtype=np.float32)
            variance[slices] = coadd.variance[cut.slices_original]
        cutouts.append(SurveyCutout(cluster_id, image, mask, variance, dict(coadd.mask_bits), meta))
    return cutouts, CutoutReport(inside, partial, outside)


def write_fits_cutouts(cutouts, folder):
    """Write one FITS file per :class:`SurveyCutout` (IMAGE, MASK and, if known, VARIANCE HDUs) into ``folder``, atomically.

    Returns the list of paths written.
    """
    from astropy.io import fits

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for cutout in cutouts:
        header = fits.Header()
        mask_header = fits.Header()
        with warnings.catch_warnings():
            # Keywords longer than eight characters become HIERARCH cards, which astropy announces.
            warnings.simplefilter("ignore")
            for key, value in cutout.meta.items():
                header[key.upper()] = value
            for plane, bit in cutout.mask_bits.items():
                mask_header[f"MP_{plane}"] = int(bit)
        hdus = [fits.PrimaryHDU(), fits.ImageHDU(cutout.image, header=header, name="IMAGE"),
                fits.ImageHDU(cutout.mask, header=mask_header, name="MASK")]
        if cutout.variance is not None:
            hdus.append(fits.ImageHDU(cutout.variance, name="VARIANCE"))
        path = folder / f"{cutout.id}.fits"
        with common.atomic_write(path) as temporary, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits.HDUList(hdus).writeto(temporary, output_verify="silentfix")
        paths.append(str(path))
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m data.survey_cutouts",
        description="Cut +-300 kpc cutouts of catalogued clusters (id, ra, dec, z) out of a coadd FITS image.",
    )
    parser.add_argument("coadd", help="coadd FITS file with a WCS (IMAGE, MASK, VARIANCE HDUs or image first)")
    parser.add_argument("catalogue", help="cluster catalogue (CSV, ECSV or FITS table) with id, ra, dec, z")
    output = parser.add_mutually_exclusive_group(required=True)
    output.add_argument("--out", metavar="FILE", help="one HDF5 file, FILE.h5, in the groups layout")
    output.add_argument("--out-dir", metavar="DIR", help="a folder of FITS files, one per cluster")
    parser.add_argument("--h0", type=float, default=MEASUREMENT_COSMOLOGY[0], help="Hubble constant (default 68.4)")
    parser.add_argument("--om0", type=float, default=MEASUREMENT_COSMOLOGY[1], help="matter density (default 0.301)")
    args = parser.parse_args(argv)
    if args.out and pathlib.Path(args.out).suffix.lower() not in prep_data.HDF5_SUFFIXES:
        parser.error(f"--out {args.out}: --out names one HDF5 file (FILE.h5); a folder of FITS files is --out-dir DIR")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        coadd = read_coadd(args.coadd)
        catalogue = read_catalogue(args.catalogue)
    except (OSError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    cutouts, report = cut_clusters(coadd, catalogue, (args.h0, args.om0))
    out = pathlib.Path(args.out or args.out_dir)
    try:
        if args.out and cutouts:
            data.files.write_groups_hdf5(out, [cutout.as_cutout(out) for cutout in cutouts])
        elif args.out_dir:
            write_fits_cutouts(cutouts, out)
    except OSError as error:
        option = "--out" if args.out else "--out-dir"
        parser.exit(2, f"error: {option} {out}: cannot write ({error.strerror or error})\n")
    print(f"wrote {len(cutouts)} cutouts to {out}")
    if report.partial:
        print(f"off the coadd edge (kept, missing part NO_DATA): {', '.join(report.partial)}")
    if report.outside:
        print(f"not on the coadd (skipped): {', '.join(report.outside)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
