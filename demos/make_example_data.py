"""Write the demo's example clusters: HSC-style FITS cutouts from the mock generator, with truth.

The files in ``demos/data/clusters/`` were made with this script (the defaults below); rerun
it to remake them. Each FITS file has IMAGE, MASK (with ``MP_*`` keywords) and VARIANCE HDUs
and the redshift in the primary header (``Z``), as a user's own cutouts would;
``demos/data/clusters_truth.csv`` holds what the generator knows about each cluster.

    python demos/make_example_data.py
"""

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

N_CLUSTERS = 8
SEED = 20251
OUT_DIR = pathlib.Path(__file__).resolve().parent / "data"


def write_example_clusters(out_dir, n=N_CLUSTERS, seed=SEED):
    """Render ``n`` real-like mock clusters into HSC-style FITS files; returns the truth table path."""
    import numpy as np
    import pandas as pd
    from astropy.io import fits

    import hsc
    from data import clusters, generate

    folder = pathlib.Path(out_dir) / "clusters"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(n):
        rng = generate.cutout_rng("clusters", seed, index)
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
        path = folder / f"{name}.fits.gz"
        temporary = path.with_name(f".partial-{os.getpid()}-{path.name}")
        hdus.writeto(temporary, overwrite=True)
        os.replace(temporary, path)
        rows.append({"id": name, "z": truth["z"], "f_icl_true": truth["f_icl_true"], "f_icl_sb_ideal": truth["f_icl_sb_ideal"],
                     "f_icl_sb_ideal_scene": truth["f_icl_sb_ideal_scene"],
                     "params": json.dumps(truth["params"], default=float)})
    table_path = pathlib.Path(out_dir) / "clusters_truth.csv"
    pd.DataFrame(rows).to_csv(table_path, index=False, float_format="%.5f")
    return table_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=N_CLUSTERS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", default=str(OUT_DIR))
    args = parser.parse_args(argv)
    path = write_example_clusters(args.out, args.n, args.seed)
    print(f"wrote {args.n} example clusters to {pathlib.Path(args.out) / 'clusters'} (truth in {path})")


if __name__ == "__main__":
    main()
