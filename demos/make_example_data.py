"""Write the demo's example data with the mock generator: clusters (FITS) and galaxies (HDF5).

The files in ``demos/data/`` were made with this script (the defaults below); rerun it to
remake them.

* ``clusters/exampleNN.fits.gz``: real-like mock clusters as HSC-style FITS cutouts. Each file
  has IMAGE, MASK (with ``MP_*`` keywords) and VARIANCE HDUs and the redshift in the primary
  header (``Z``), as a user's own cutouts would; ``clusters_truth.csv`` holds what the
  generator knows about each cluster.
* ``galaxies.h5``: mock HSC Ultradeep galaxies for the tidal-feature demo: host-matched pairs,
  each scene with a visible tidal feature and the same scene without it (same host, neighbours,
  PSF and noise), 128 x 128 px in g, r, i, z, y, in the tidal stacked HDF5 layout
  (``image``, ``id``, ``has_tidal``, ``pair_id``, ``visible``, ``feature_type``, ``feature_sb``,
  ``params``...). The counts are stored as float16, which the tidal readers turn back into
  float32: it halves the file, and the rounding (relative 5e-4) is far below the sky noise.
* ``finetune_clusters.h5``: a small real-like cluster set for the fine-tuning notebook,
  written by ``python -m data.generate clusters --distribution real-like --measure-sb`` (the
  stacked HDF5 layout; ``f_icl_sb``, the SB measurement on the noisy image, is the label a
  user would have for real clusters, and ``f_icl_sb_ideal`` the noiseless truth).

    python demos/make_example_data.py
"""

import argparse
import gzip
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

N_CLUSTERS = 8
SEED = 20251
N_GALAXIES_PER_CLASS = 16  # example galaxies with a tidal feature, and as many without
GALAXY_SEED = 20252
GALAXIES_FILE = "galaxies.h5"
N_FINETUNE_CLUSTERS = 30  # enough for 5-fold cross-validation with 6 clusters per fold
FINETUNE_SEED = 20253
FINETUNE_FILE = "finetune_clusters.h5"
OUT_DIR = pathlib.Path(__file__).resolve().parent / "data"


def write_example_clusters(out_dir, n=N_CLUSTERS, seed=SEED):
    """Render ``n`` real-like mock clusters into HSC-style FITS files; returns the truth table path."""
    import numpy as np
    import pandas as pd
    from astropy.io import fits

    import common
    import hsc
    from data import clusters, shards

    folder = pathlib.Path(out_dir) / "clusters"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(n):
        rng = shards.cutout_rng("clusters", seed, index)
        image, mask, truth = clusters.render_cluster(rng, clusters.REAL_LIKE_DISTRIBUTION)
        name = f"example{index:02d}"
        noise = float(truth["params"]["noise_sigma_native"])
        mask_header = fits.Header()
        for plane, bit in hsc.DEFAULT_MASK_BITS.items():
            mask_header[f"HIERARCH MP_{plane}"] = bit
        primary = fits.PrimaryHDU(header=fits.Header({"Z": round(truth["z"], 4), "OBJECT": name}))
        hdus = fits.HDUList(
            [
                primary,
                fits.ImageHDU(image.astype(np.float32), name="IMAGE"),
                fits.ImageHDU(mask.astype(np.int32), header=mask_header, name="MASK"),
                fits.ImageHDU(np.full(image.shape, noise**2, np.float32), name="VARIANCE"),
            ]
        )
        # Compressed through gzip: astropy would choose the compression from the temporary name.
        with common.atomic_write(folder / f"{name}.fits.gz") as temporary, gzip.open(temporary, "wb") as handle:
            hdus.writeto(handle)
        rows.append({"id": name, "z": truth["z"], "f_icl_true": truth["f_icl_true"], "f_icl_sb_ideal": truth["f_icl_sb_ideal"],
                     "f_icl_sb_ideal_scene": truth["f_icl_sb_ideal_scene"],
                     "params": json.dumps(truth["params"], default=float)})
    table_path = pathlib.Path(out_dir) / "clusters_truth.csv"
    pd.DataFrame(rows).to_csv(table_path, index=False, float_format="%.5f")
    return table_path


def write_example_galaxies(out_dir, n_per_class=N_GALAXIES_PER_CLASS, seed=GALAXY_SEED):
    """Render ``n_per_class`` mock galaxies with a tidal feature and as many without.

    Parameters
    ----------
    out_dir : str or pathlib.Path
        Folder of ``galaxies.h5`` (created if needed).
    n_per_class : int
        Galaxies with a tidal feature, and galaxies without; >= 1.
    seed : int
        The galaxies are host-matched pairs with visible features, as ``python -m data.generate
        tidal_pairs --distribution visible`` renders them: galaxy ``2 k`` is pair ``k`` with its
        feature, galaxy ``2 k + 1`` the same scene without it (``data.shards.render_cutouts``), so
        one pair can be remade alone.

    Returns
    -------
    pathlib.Path
        The file written (atomically).
    """
    import numpy as np

    import data.files
    import hsc
    import tidal_data
    from data import shards, tidal

    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    folder = pathlib.Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    images, ids, truths = [], [], []
    for pair in range(n_per_class):
        for image, _, truth, _ in shards.render_cutouts("tidal_pairs", seed, pair, "visible"):
            images.append(image)
            truths.append(dict(truth, pair_id=f"pair{pair:02d}"))
            ids.append(f"galaxy{len(ids):02d}")
    path = folder / GALAXIES_FILE
    data.files.write_stacked_hdf5(path, np.stack(images).astype(np.float16), ids=ids, columns=tidal.truth_columns(truths),
                                 pixel_scale=hsc.PIXEL_SCALE, attributes={"bands": tidal_data.TIDAL_BANDS})
    return path


def write_finetune_clusters(out_dir, n=N_FINETUNE_CLUSTERS, seed=FINETUNE_SEED, workers=2):
    """Render ``n`` real-like mock clusters with their SB-measured labels into ``finetune_clusters.h5``.

    The SB method cannot measure every cluster (too few unmasked boxes to estimate the
    background, say); those get no label and would stop fine-tuning, so clusters are rendered
    until ``n`` have one, and only those are kept, in generation order.

    Returns
    -------
    pathlib.Path
        The file written (atomically).
    """
    import tempfile

    import h5py
    import numpy as np

    import data.files
    import hsc
    from data import shards

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    folder = pathlib.Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    n_rendered = n + max(2, n // 5)  # about one cluster in 15 fails the SB measurement
    with tempfile.TemporaryDirectory() as scratch:
        rendered = pathlib.Path(scratch) / FINETUNE_FILE
        shards.generate_file("clusters", n_rendered, seed, rendered, workers=workers, distribution="real-like",
                             measure_sb=True, progress=False)
        with h5py.File(rendered, "r") as f:
            measured = np.flatnonzero(np.isfinite(f["f_icl_sb"][()]))
            if measured.size < n:
                raise ValueError(f"only {measured.size} of {n_rendered} clusters could be measured, {n} needed; "
                                 "try another seed")
            keep = measured[:n]
            columns = {name: f[name][()][keep] for name in f if f[name].ndim == 1 and name != "id"}
            columns["params"] = [value.decode() for value in columns["params"]]
            ids = [value.decode() for value in f["id"][()][keep]]
            images, masks = f["image"][()][keep], f["mask"][()][keep]
    path = folder / FINETUNE_FILE
    data.files.write_stacked_hdf5(path, images, masks, ids, columns, mask_bits=hsc.DEFAULT_MASK_BITS,
                                 pixel_scale=hsc.PIXEL_SCALE)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=N_CLUSTERS, help=f"example clusters (default {N_CLUSTERS})")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed of the clusters (default {SEED})")
    parser.add_argument("--galaxies-per-class", type=int, default=N_GALAXIES_PER_CLASS,
                        help=f"example galaxies with a tidal feature, and as many without (default {N_GALAXIES_PER_CLASS}; 0: none)")
    parser.add_argument("--galaxy-seed", type=int, default=GALAXY_SEED, help=f"seed of the galaxies (default {GALAXY_SEED})")
    parser.add_argument("--finetune-clusters", type=int, default=N_FINETUNE_CLUSTERS,
                        help=f"real-like clusters of the fine-tuning notebook (default {N_FINETUNE_CLUSTERS}; 0: none)")
    parser.add_argument("--finetune-seed", type=int, default=FINETUNE_SEED, help=f"their seed (default {FINETUNE_SEED})")
    parser.add_argument("--workers", type=int, default=2, help="processes rendering the fine-tuning clusters (default 2)")
    parser.add_argument("--out-dir", default=str(OUT_DIR), help="output folder (default demos/data)")
    args = parser.parse_args(argv)
    for option, value in (("--n", args.n), ("--galaxies-per-class", args.galaxies_per_class),
                          ("--finetune-clusters", args.finetune_clusters)):
        if value < 0:
            parser.error(f"{option} must be >= 0, got {value}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.n:
        path = write_example_clusters(args.out_dir, args.n, args.seed)
        print(f"wrote {args.n} example clusters to {pathlib.Path(args.out_dir) / 'clusters'} (truth in {path})")
    if args.galaxies_per_class:
        path = write_example_galaxies(args.out_dir, args.galaxies_per_class, args.galaxy_seed)
        print(f"wrote {2 * args.galaxies_per_class} example galaxies to {path}")
    if args.finetune_clusters:
        path = write_finetune_clusters(args.out_dir, args.finetune_clusters, args.finetune_seed, args.workers)
        print(f"wrote {args.finetune_clusters} real-like clusters for fine-tuning to {path}")


if __name__ == "__main__":
    main()
