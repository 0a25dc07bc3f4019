"""Validate the surface-brightness measurement on mock clusters that know the truth.

    python -m measure_sb_cut.validate SHARDS... --report measure_sb_cut/VALIDATION.md

SHARDS are HDF5 files in the stacked layout of the cluster mocks (``image``, ``mask``, ``id``,
``z``, ``f_icl_true``, ``f_icl_sb_ideal``). Every cluster is measured (in parallel) with each
``--method``: ``canepa2025`` (the original code's measurement, ``measure_sb_cut.canepa2025``),
``canepa2025+FIX+...`` (the same with some of its mistakes fixed) or ``improved``
(:func:`measure_sb_cut.measure_icl_fraction`), and the report gives, per method, the mean
absolute error, the bias (mean of measured - truth) and the scatter (standard deviation of
measured - truth) against

* ``f_icl_sb_ideal``: the same threshold method on the noiseless image, the answer the
  measurement should reproduce, and
* ``f_icl_true``: the physical ICL fraction, which the threshold method is not meant to equal,

overall and in redshift bins, with the command, the date and the machine. When the shards also
hold ``f_icl_sb_ideal_scene`` (the threshold fraction of the noiseless scene with the field
galaxies and stars that the measured image holds), the report compares with it too.

``--manual N`` adds the manual variant (the masking of non-members used for real clusters): N
mocks drawn with :mod:`data.clusters` get a catalogue of their members (photometric redshifts
scattered by 0.05 (1 + z)) and field galaxies (redshifts uniform in 0-1.2), and both manual
measurements are compared with ``f_icl_sb_ideal``, the threshold fraction of the cluster alone.

``--synthetic N`` first writes N simple synthetic clusters (exponential ICL, Sersic galaxies,
noise drawn at native resolution and resized like the real cutouts) into the first SHARD, to
try the script without the mock generator.

An input that cannot be read, or a file without any truth column, is reported on one line and
left out; the exit status is then 1 (2 when no cluster with truth remains).
"""

import common

if __name__ in common.MAIN_NAMES:
    common.quiet_interrupt()  # a Ctrl-C while the libraries load is one line, not a traceback

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import sys

import numpy as np

import hsc
from measure_sb_cut import measurement_helpers as helpers
from measure_sb_cut.canepa2025 import FIXES, check_fixes
from measure_sb_cut.measure import CSV_COLUMNS, METHODS, measure_refs, write_csv

# Defaults; each can be set on the command line.
REDSHIFT_BINS = (0.1, 0.2, 0.3, 0.4, 0.5)
METHOD = "canepa2025"
WORKERS = os.cpu_count() or 1
#: Truth columns compared with, when present: what each one is.
TARGETS = {
    "f_icl_sb_ideal": "the threshold fraction of the noiseless cluster image",
    "f_icl_sb_ideal_scene": "the threshold fraction of the noiseless scene, field galaxies and stars included "
    "(what an automatic measurement, blind to membership, can reproduce)",
    "f_icl_true": "the physical ICL fraction (the threshold method is not meant to equal it)",
}

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# Statistics and report


def error_statistics(measured, truth):
    """MAE, bias and scatter of ``measured - truth`` over the finite pairs.

    Returns
    -------
    dict
        ``n``, ``mae`` (mean |d|), ``bias`` (mean d), ``scatter`` (standard deviation of d,
        ddof=1; NaN for fewer than 2 pairs).
    """
    measured = np.asarray(measured, dtype=float)
    truth = np.asarray(truth, dtype=float)
    good = np.isfinite(measured) & np.isfinite(truth)
    difference = measured[good] - truth[good]
    n = int(difference.size)
    if n == 0:
        return {"n": 0, "mae": np.nan, "bias": np.nan, "scatter": np.nan}
    return {
        "n": n,
        "mae": float(np.mean(np.abs(difference))),
        "bias": float(np.mean(difference)),
        "scatter": float(np.std(difference, ddof=1)) if n > 1 else np.nan,
    }


def statistics_table(rows, target, bins=REDSHIFT_BINS):
    """Markdown table of :func:`error_statistics` against ``target``, overall and per z bin."""
    z = np.array([row["z"] for row in rows], dtype=float)
    measured = np.array([row["f_icl"] for row in rows], dtype=float)
    truth = np.array([row.get(target, np.nan) for row in rows], dtype=float)
    lines = ["| z range | N | MAE | bias | scatter |", "|---|---|---|---|---|"]
    selections = [("all", np.ones(z.size, dtype=bool))]
    for low, high in zip(bins[:-1], bins[1:]):
        last = high == bins[-1]
        selections.append((f"{low:g}-{high:g}", (z >= low) & ((z <= high) if last else (z < high))))
    for name, selection in selections:
        stats = error_statistics(measured[selection], truth[selection])
        lines.append(
            f"| {name} | {stats['n']} | {stats['mae']:.4f} | {stats['bias']:+.4f} | {stats['scatter']:.4f} |"
        )
    return "\n".join(lines)


def machine_description():
    """One line naming the machine: OS, processor and cores."""
    processor = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    processor = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}, {processor}, {os.cpu_count()} cores"


def method_options(spec):
    """``measure_ref`` options of a method spec: ``canepa2025``, ``canepa2025+FIX+...`` or ``improved``.

    Raises
    ------
    ValueError
        For an unknown method or fix.
    """
    method, *fixes = spec.split("+")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} in {spec!r}: choose from {', '.join(METHODS)}")
    check_fixes(fixes)
    if fixes and method != "canepa2025":
        raise ValueError(f"{spec!r}: fixes apply to canepa2025 only")
    return {"method": method, "fixes": tuple(sorted(fixes))} if method == "canepa2025" else {"method": method}


def _method_sections(rows, bins, heading):
    lines = []
    for target, description in TARGETS.items():
        if any(np.isfinite(float(row.get(target, np.nan))) for row in rows):
            lines += ["", f"{heading} Against `{target}`: {description}", "", statistics_table(rows, target, bins)]
    errors = [row["f_icl_err"] for row in rows if np.isfinite(row["f_icl_err"])]
    if errors:
        lines += ["", f"Median quoted error f_icl_err: {np.median(errors):.4f} (the systematic bias above is not part of it)."]
    return lines


def summary_table(rows_by_method, targets):
    """Markdown table: one row per method, MAE and bias against each target over all clusters."""
    first = next(iter(rows_by_method))
    header = "| method | N | " + " | ".join(f"MAE `{t}` | bias `{t}`" for t in targets)
    header += f" | mean \\|f - f({first})\\| | max |"
    lines = [header, "|---|---|" + "---|---|" * len(targets) + "---|---|"]
    reference = np.array([row["f_icl"] for row in rows_by_method[first]], dtype=float)
    for method, rows in rows_by_method.items():
        measured = [row for row in rows if not row["error"]]
        cells = []
        for target in targets:
            stats = error_statistics([row["f_icl"] for row in measured], [row.get(target, np.nan) for row in measured])
            cells.append(f"{stats['mae']:.4f} | {stats['bias']:+.4f}")
        difference = np.abs(np.array([row["f_icl"] for row in rows], dtype=float) - reference)
        cells.append(f"{np.nanmean(difference):.4f} | {np.nanmax(difference):.4f}" if np.isfinite(difference).any() else "- | -")
        lines.append(f"| {method} | {len(measured)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(rows_by_method, path, command, bins=REDSHIFT_BINS, elapsed_s=None, note=None, manual=None):
    """Write the markdown validation report atomically.

    Parameters
    ----------
    rows_by_method : dict of str -> list of dict
        Measurement rows of every cluster, by method spec.
    note : str, optional
        A sentence about the clusters.
    manual : dict of str -> list of dict, optional
        Rows of the manual variant by method (:func:`manual_rows`).
    """
    import common

    rows = next(iter(rows_by_method.values()))
    n_failed = {method: sum(1 for row in method_rows if row["error"]) for method, method_rows in rows_by_method.items()}
    lines = [
        "# Validation of the surface-brightness threshold measurement",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine_description()}",
        f"- Clusters: {len(rows)} ("
        + ", ".join(f"{count} could not be measured with {method}" for method, count in n_failed.items())
        + ")",
    ]
    if note:
        lines.append(f"- Note: {note}")
    if elapsed_s is not None:
        total = len(rows) * len(rows_by_method)
        lines.append(f"- Time: {elapsed_s:.1f} s ({total / max(elapsed_s, 1e-9):.1f} measurements/s)")
    lines += [
        "",
        "Differences are measured minus truth. MAE: mean |difference|; bias: mean difference;",
        "scatter: standard deviation of the difference.",
    ]
    measured = {method: [row for row in method_rows if not row["error"]] for method, method_rows in rows_by_method.items()}
    if len(rows_by_method) == 1:
        method, method_rows = next(iter(measured.items()))
        lines += ["", f"Method: `{method}`."]
        lines += _method_sections(method_rows, bins, "##")
    else:
        targets = [t for t in TARGETS if any(np.isfinite(float(r.get(t, np.nan))) for rs in measured.values() for r in rs)]
        lines += ["", "## Summary", "", summary_table(rows_by_method, targets)]
        for method, method_rows in measured.items():
            lines += ["", f"## Method `{method}`"]
            lines += _method_sections(method_rows, bins, "###")
    if manual:
        lines += [
            "",
            "## Manual variant (non-members masked from a member catalogue)",
            "",
            "Truth: `f_icl_sb_ideal`, the threshold fraction of the noiseless cluster alone (no field galaxies or",
            "stars), which masking the non-members perfectly would give.",
            "",
            summary_table(manual, ["f_icl_sb_ideal", "f_icl_sb_ideal_scene"]),
        ]
        for method, method_rows in manual.items():
            failed = [row["error"] for row in method_rows if row["error"]]
            if failed:
                lines += ["", f"Not measured with the manual variant of {method} ({len(failed)}):", ""]
                lines += [f"- {error}" for error in failed[:10]]
    for method, method_rows in rows_by_method.items():
        if n_failed[method]:
            lines += ["", f"## Clusters that could not be measured ({method})", ""]
            lines += [f"- {row['error']}" for row in method_rows if row["error"]][:20]
    temporary = common.atomic_path(path)
    with open(temporary, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(temporary, path)


def manual_rows(n, seed=0, methods=(METHOD, "improved"), progress=True):
    """Measure ``n`` mock clusters with the manual variants, given a catalogue of their galaxies.

    Members (BCG included) get photometric redshifts z + N(0, 0.05 (1 + z)); field galaxies
    redshifts uniform in [0, 1.2]. Returns rows by method, each with ``f_icl``, ``z``, the
    truths and ``error``.
    """
    import common
    from data import clusters
    from measure_sb_cut.canepa2025 import measure_icl_fraction_manual_canepa2025
    from measure_sb_cut.measure_manual import measure_icl_fraction_manual

    rng = np.random.default_rng(seed)
    results = {method: [] for method in methods}
    for _ in common.progress(range(n), desc="manual variant", unit="cluster", disable=not progress):
        parameters = clusters.draw_parameters(rng)
        image, mask, truth = clusters.render_parameters(parameters)
        frame, z = parameters.frame, float(truth["z"])
        scale = hsc.ICL_IMAGE_SIZE / frame.fine_size

        def pixels(x, scale=scale):
            return (np.asarray(x, dtype=float) - clusters.CANVAS_MARGIN + 0.5) * scale - 0.5

        members, field = parameters.members, parameters.field
        x = np.concatenate([[pixels(frame.centre)], pixels(members["x"]), pixels(field["x"])])
        y = np.concatenate([[pixels(frame.centre)], pixels(members["y"]), pixels(field["y"])])
        n_members = 1 + len(members["x"])
        z_phot = np.concatenate([
            z + rng.normal(0.0, 0.05 * (1 + z), n_members),
            rng.uniform(0.0, 1.2, len(field["x"])),
        ])
        catalogue = {"x": x, "y": y, "z_phot": z_phot}
        for method in methods:
            row = {"z": z, **{key: truth[key] for key in TARGETS}, "f_icl": np.nan, "f_icl_err": np.nan, "error": ""}
            try:
                if method == "improved":
                    result = measure_icl_fraction_manual(image, z, mask, members=catalogue, reestimate_box_sizes=())
                else:
                    result = measure_icl_fraction_manual_canepa2025(image, z, mask, members=catalogue,
                                                                    fixes=method_options(method)["fixes"])
                row.update(f_icl=result.f_icl, f_icl_err=result.f_icl_err)
            except ValueError as error:
                row["error"] = str(error)
            results[method].append(row)
    return results


# ----------------------------------------------------------------------------------------
# Synthetic clusters (to try the validation without the mock generator)


def _sersic(shape, x0, y0, flux, r_eff, n, axis_ratio, angle):
    """Sersic profile of total ``flux`` (summed over pixels), r_eff along the major axis, px."""
    from scipy.special import gamma, gammaincinv

    b_n = gammaincinv(2 * n, 0.5)
    yy, xx = np.indices(shape)
    dx, dy = xx - x0, yy - y0
    major = dx * np.cos(angle) + dy * np.sin(angle)
    minor = (-dx * np.sin(angle) + dy * np.cos(angle)) / axis_ratio
    radius = np.hypot(major, minor)
    i_eff = flux / (2 * np.pi * r_eff**2 * axis_ratio * n * np.exp(b_n) * b_n ** (-2 * n) * gamma(2 * n))
    return i_eff * np.exp(-b_n * ((radius / r_eff) ** (1 / n) - 1))


def synthetic_cluster(z, icl_fraction, rng, native_noise=0.03, n_members=15, size=hsc.ICL_IMAGE_SIZE):
    """A simple mock cluster on the 224-px grid: BCG, members, exponential ICL and resized noise.

    Parameters
    ----------
    z : float
    icl_fraction : float
        ICL flux / (ICL + galaxy flux) inside the 300 kpc aperture.
    rng : numpy.random.Generator
    native_noise : float
        Noise rms in counts per native 0.168" pixel; drawn at native resolution and resized
        with ``prep_data.resize_image``, which smooths and correlates it as in real cutouts.
    n_members : int
    size : int

    Returns
    -------
    image : ndarray of float32, shape (size, size)
        Counts per native pixel.
    truth : dict
        ``z``, ``f_icl_true`` and ``f_icl_sb_ideal`` (the threshold fraction of the noiseless
        image: pixels of the aperture outside 10-px segments above the 26 mag/arcsec^2 threshold).
    """
    import prep_data

    scale = helpers.cutout_pixel_scale(z, size)
    native_per_pixel = scale / hsc.PIXEL_SCALE
    kpc_per_pixel = 2 * hsc.CUTOUT_HALF_WIDTH_KPC / size
    centre = (size - 1) / 2.0
    distance_pc = helpers.MEASUREMENT_COSMOLOGY.luminosity_distance(z).to("pc").value
    bcg_flux = float(hsc.mag_to_counts(rng.normal(-23.4, 0.35) + 5 * np.log10(distance_pc / 10)))
    shape = (size, size)
    galaxies = _sersic(shape, centre, centre, bcg_flux, 15 / kpc_per_pixel, rng.uniform(3.5, 6), rng.uniform(0.6, 0.9),
                       rng.uniform(0, np.pi))
    for _ in range(n_members):
        radius, angle = rng.uniform(10, 105), rng.uniform(0, 2 * np.pi)
        galaxies += _sersic(shape, centre + radius * np.cos(angle), centre + radius * np.sin(angle),
                            bcg_flux * 10 ** (-0.4 * rng.uniform(1, 4.5)), rng.uniform(1, 4), rng.uniform(1, 4),
                            rng.uniform(0.5, 1), rng.uniform(0, np.pi))
    in_aperture = helpers.aperture(shape, size / 2)
    galaxy_flux = galaxies[in_aperture].sum()
    icl = _sersic(shape, centre, centre, 1.0, rng.uniform(40, 150) / kpc_per_pixel, 1.0, rng.uniform(0.5, 0.9),
                  rng.uniform(0, np.pi))
    icl *= icl_fraction / (1 - icl_fraction) * galaxy_flux / icl[in_aperture].sum()
    # Fluxes summed over cutout pixels -> counts per native pixel.
    noiseless = ((galaxies + icl) / native_per_pixel**2).astype(np.float32)
    native_side = int(round(size * native_per_pixel))
    noise = rng.normal(0.0, native_noise, (native_side, native_side)).astype(np.float32)
    image = noiseless + prep_data.resize_image(noise, size)
    threshold = helpers.threshold_counts(helpers.MEASUREMENT_SB, z)
    segments = helpers.segment_sources(noiseless, threshold, np.zeros(shape, dtype=bool))
    ideal = noiseless[in_aperture & ~segments].sum() / noiseless[in_aperture].sum()
    truth = {"z": float(z), "f_icl_true": float(icl_fraction), "f_icl_sb_ideal": float(ideal)}
    return image.astype(np.float32), truth


def write_synthetic_shard(path, n_clusters, seed=None):
    """Write ``n_clusters`` synthetic clusters in the stacked HDF5 layout of the mocks."""
    import data.files

    rng = np.random.default_rng(seed)
    images, truths = [], []
    for _ in range(n_clusters):
        z = rng.uniform(hsc.Z_MIN, hsc.Z_MAX)
        image, truth = synthetic_cluster(z, rng.uniform(0.02, 0.45), rng, rng.uniform(0.022, 0.04),
                                         int(rng.integers(5, 40)))
        images.append(image)
        truths.append(truth)
    columns = {key: [truth[key] for truth in truths] for key in ("z", "f_icl_true", "f_icl_sb_ideal")}
    columns["params"] = [json.dumps({"generator": "measure_sb_cut.validate.synthetic_cluster"})] * n_clusters
    data.files.write_stacked_hdf5(
        path,
        np.asarray(images, dtype=np.float16),
        masks=np.zeros((n_clusters,) + images[0].shape, dtype=np.int32),
        ids=[f"synthetic_{i:05d}" for i in range(n_clusters)],
        columns=columns,
    )


# ----------------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m measure_sb_cut.validate",
        description="Measure mock clusters and report MAE, bias and scatter against their known ICL fractions.",
    )
    parser.add_argument("shards", nargs="+", metavar="SHARD", help="stacked HDF5 files of mock clusters")
    parser.add_argument("--report", required=True, help="markdown report to write")
    parser.add_argument("--csv", help="also write the per-cluster measurements and truths to this CSV")
    parser.add_argument("--workers", type=int, default=WORKERS, help=f"parallel processes (default {WORKERS})")
    parser.add_argument("--limit", type=int, help="measure at most this many clusters (the first ones)")
    parser.add_argument("--bins", type=float, nargs="+", default=list(REDSHIFT_BINS),
                        help=f"redshift bin edges (default {' '.join(f'{b:g}' for b in REDSHIFT_BINS)})")
    parser.add_argument("--synthetic", type=int, metavar="N",
                        help="first write N synthetic clusters into the first SHARD (overwriting it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic clusters (default 0)")
    parser.add_argument("--note", help="a sentence for the report about where the clusters come from")
    parser.add_argument("--method", action="append", metavar="SPEC",
                        help=f"method to validate, repeat for several: canepa2025, canepa2025+FIX (FIX from "
                        f"{', '.join(FIXES)}, joined by +) or improved (default {METHOD})")
    parser.add_argument("--manual", type=int, metavar="N", default=0,
                        help="also validate the manual variant on N mock clusters with member catalogues")
    return parser


def main(argv=None):
    import time

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    import common
    import prep_data

    methods = args.method or [METHOD]
    try:
        options = {method: method_options(method) for method in methods}
    except ValueError as error:
        parser.error(f"--method: {error}")
    try:
        common.check_output_file(args.report, "--report")
        if args.csv:
            common.check_output_file(args.csv, "--csv")
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    if args.synthetic:
        write_synthetic_shard(args.shards[0], args.synthetic, args.seed)
    try:
        refs, file_errors = prep_data.index_cutouts(args.shards)
    except prep_data.CutoutError as error:
        parser.exit(2, f"error: {error}\n")
    # Every input that is skipped is reported (one line each) and makes the exit status 1.
    n_skipped = len(file_errors)
    for source, message in file_errors:
        print(f"error: {message}", file=sys.stderr)
    if args.limit:
        refs = refs[: args.limit]
    if not refs:
        parser.exit(2, "error: no clusters found in the shards\n")
    start = time.perf_counter()
    rows_by_method = {
        method: list(measure_refs(refs, workers=args.workers, meta_columns=tuple(TARGETS), options=options[method]))
        for method in methods
    }
    elapsed = time.perf_counter() - start
    rows = rows_by_method[methods[0]]
    # Files without any truth column cannot validate anything: reported and left out.
    with_truth = {}
    for ref, row in zip(refs, rows):
        truth = [row.get(target) for target in TARGETS]
        has = any(isinstance(value, (int, float, np.floating)) and np.isfinite(value) for value in truth)
        with_truth[ref.path] = with_truth.get(ref.path, False) or has
    for path, has in with_truth.items():
        if not has:
            n_skipped += 1
            print(f"error: {path}: no truth to compare with (none of {', '.join(TARGETS)}); skipped", file=sys.stderr)
    rows_by_method = {
        method: [row for ref, row in zip(refs, method_rows) if with_truth[ref.path]]
        for method, method_rows in rows_by_method.items()
    }
    if not rows_by_method[methods[0]]:
        parser.exit(2, "error: no clusters with truth to validate\n")
    if args.csv:
        write_csv([row for method_rows in rows_by_method.values() for row in method_rows], args.csv,
                  CSV_COLUMNS + tuple(TARGETS))
    manual = manual_rows(args.manual, args.seed, [m for m in methods if m.startswith("canepa2025")][:1] + ["improved"]) \
        if args.manual else None
    command = "python -m measure_sb_cut.validate " + shlex.join(argv if argv is not None else sys.argv[1:])
    note = args.note
    if args.synthetic:
        note = (
            "synthetic clusters of measure_sb_cut.validate.synthetic_cluster (exponential ICL, Sersic BCG and "
            "members, white noise drawn at native resolution and resized), not the project's cluster mocks"
        )
    write_report(rows_by_method, args.report, command, tuple(args.bins), elapsed, note, manual)
    print(open(args.report).read())
    return 1 if n_skipped else 0


if __name__ == "__main__":
    raise SystemExit(main())
