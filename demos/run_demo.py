"""The newcomer's main job (``make demo``): every part of the project on small example data.

1. ``predict.py`` with the shipped ICL checkpoint on the example clusters in
   ``demos/data/clusters/`` (HSC-style FITS made by our generator), GradCAM overlays included;
2. ``python -m measure_sb_cut`` on the same clusters, with diagnostic plots;
3. a comparison of the model, the surface-brightness measurement and the generator's truth;
4. the tidal-feature classifier with the shipped NNCLR checkpoints: ROC curve and a
   similarity search on example galaxies rendered by our generator;
5. ``results/index.html``, one page that shows it all.

Each step runs the same command a user would type, so what the demo shows is what the tools do.
A step whose shipped checkpoint is missing is skipped with a message saying which file is
missing; the other steps still run.

The tidal step evaluates the shipped classifier on the example galaxies, which it never saw in
training: ``nnclr_test.py --test-all`` makes every example galaxy a test galaxy.

    python demos/run_demo.py --out-dir results
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common

if __name__ in common.MAIN_NAMES:
    common.quiet_start()  # before TensorFlow loads: no start-up noise unless --verbose

import argparse
import html
import json
import subprocess
import time

EXAMPLE_CLUSTERS = ROOT / "demos" / "data" / "clusters"
EXAMPLE_TRUTH = ROOT / "demos" / "data" / "clusters_truth.csv"
EXAMPLE_GALAXIES = ROOT / "demos" / "data" / "galaxies.h5"
NNCLR_RUN = ROOT / "checkpoints" / "nnclr"
NNCLR_RUN_FILES = ("config.json", "encoder.keras", "classifier.keras")  # what nnclr_test.py loads from a run
SIMILAR_TO = "galaxy00"  # the query of the similarity search: the first example galaxy, which has a tidal shell
TOP_K = 11  # galaxies returned by the similarity search: with the query they fill two rows of the gallery
OUT_DIR = "results"


def run(step, command, log):
    """Run one command of the demo, echo it, and keep its output in the log; returns its exit status."""
    print(f"\n[{step}] $ {' '.join(str(c) for c in command)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run([str(c) for c in command], cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    output = (result.stdout + result.stderr).strip()
    tail = "\n".join(line for line in output.splitlines()[-8:] if "\r" not in line)
    print(tail)
    print(f"[{step}] finished in {elapsed:.0f} s with exit status {result.returncode}", flush=True)
    log.append({"step": step, "command": " ".join(str(c) for c in command), "status": result.returncode,
                "seconds": elapsed, "output": output[-4000:]})
    return result.returncode


def compare_icl(out_dir):
    """Join predictions, SB measurements and truth; write the table and a plot. Returns the table."""
    import numpy as np
    import pandas as pd

    import plots

    truth = pd.read_csv(EXAMPLE_TRUTH, dtype={"id": str}).drop(columns=["params"])
    table = truth
    predictions_path = out_dir / "icl_predictions.csv"
    if predictions_path.exists():
        predictions = pd.read_csv(predictions_path, dtype={"id": str})[["id", "f_icl", "f_icl_p15", "f_icl_p85"]]
        table = table.merge(predictions.rename(columns={"f_icl": "f_icl_model"}), on="id", how="left")
    sb_path = out_dir / "sb_measurements.csv"
    if sb_path.exists():
        measured = pd.read_csv(sb_path, dtype={"id": str})[["id", "f_icl", "f_icl_err"]]
        table = table.merge(measured.rename(columns={"f_icl": "f_icl_sb", "f_icl_err": "f_icl_sb_err"}), on="id", how="left")
    table.to_csv(out_dir / "icl_comparison.csv", index=False, float_format="%.4f")

    figure, axis = plots.new_figure(figsize=(6, 5))
    x = table["f_icl_sb_ideal"].to_numpy()
    if "f_icl_model" in table:
        errors = np.vstack([table["f_icl_model"] - table["f_icl_p15"], table["f_icl_p85"] - table["f_icl_model"]]).clip(min=0)
        axis.errorbar(x, table["f_icl_model"], yerr=errors, fmt="o", label="model (mode, 15-85%)")
    if "f_icl_sb" in table:
        axis.errorbar(x, table["f_icl_sb"], yerr=table["f_icl_sb_err"], fmt="s", label="SB threshold measurement")
    top = float(np.nanmax(table.drop(columns=["id", "z"]).to_numpy(dtype=float))) * 1.1
    axis.plot([0, top], [0, top], "k--", lw=1)
    axis.set(xlim=(0, top), ylim=(0, top), xlabel="ideal SB-threshold $f_{ICL}$ (noiseless mock)", ylabel="$f_{ICL}$",
             title="example clusters")
    axis.legend()
    plots.save_figure(figure, out_dir / "icl_comparison.png")
    return table


def missing_nnclr_files(run_dir):
    """Files of an ``nnclr_train.py`` run folder that ``nnclr_test.py`` needs and that are missing."""
    run_dir = pathlib.Path(run_dir)
    return [str(run_dir / name) for name in NNCLR_RUN_FILES if not (run_dir / name).is_file()]


def run_tidal(out_dir, log, python=sys.executable, run_dir=NNCLR_RUN, galaxies=EXAMPLE_GALAXIES, similar_to=SIMILAR_TO,
              top_k=TOP_K):
    """The tidal step: ``nnclr_test.py`` on the example galaxies, outputs in ``out_dir/tidal``.

    Skipped (logged with status "skipped" and the missing files) when the run folder is
    incomplete.

    Returns
    -------
    dict or None
        ``nnclr_test.py``'s ``metrics.json`` plus ``top_k`` and ``example_tidal_fraction`` (the
        share of tidal galaxies among all examples, the similarity search's baseline); None
        when skipped or failed.
    """
    missing = missing_nnclr_files(run_dir)
    if missing:
        message = (f"no shipped NNCLR run in {run_dir} (missing {', '.join(missing)}); "
                   "train one with nnclr_train.py INPUT... --out-dir checkpoints/nnclr")
        print(f"\n[tidal features] skipped: {message}")
        log.append({"step": "tidal features", "command": "nnclr_test.py (skipped)", "status": "skipped",
                    "seconds": 0.0, "output": message})
        return None
    tidal_dir = pathlib.Path(out_dir) / "tidal"
    status = run("tidal features", [python, "nnclr_test.py", galaxies, "--run-dir", run_dir, "--test-all",
                                    "--out-dir", tidal_dir, "--similar-to", similar_to, "--top-k", top_k], log)
    metrics_path = tidal_dir / "metrics.json"
    if status != 0 or not metrics_path.is_file():
        return None
    metrics = json.loads(metrics_path.read_text())
    # --test-all: the test set is every example galaxy
    return {**metrics, "top_k": int(top_k), "example_tidal_fraction": metrics["n_test_tidal"] / metrics["n_test"]}


def tidal_summary_html(metrics):
    """The tidal metrics as one paragraph of HTML ('' without metrics)."""
    if not metrics:
        return ""
    baselines = ", ".join(f"{name.replace('_', ' ')} {entry['auc']:.3f}" for name, entry in metrics.get("baselines", {}).items())
    paired = f" in {metrics['n_pairs']} host-matched pairs" if metrics.get("paired") else ""
    parts = [
        f"AUC {metrics['auc']:.3f} on {metrics['n_test']} example galaxies{paired} ({metrics['n_test_tidal']} with tidal "
        f"features)" + (f", next to the classical baselines: {baselines}" if baselines else ""),
        f"completeness at {metrics['contamination']:.0%} contamination: {metrics['completeness_at_contamination_fpr']:.2f} "
        f"(contamination as false-positive rate), {metrics['completeness_at_contamination_one_minus_precision']:.2f} "
        "(as 1 - precision)",
    ]
    if "similarity_tidal_fraction_top_k" in metrics:
        parts.append(f"similarity search: {metrics['similarity_tidal_fraction_top_k']:.0%} of the {metrics['top_k']} "
                     f"galaxies most similar to the query have tidal features "
                     f"({metrics['example_tidal_fraction']:.0%} of all example galaxies do)")
    return "<p>" + "; ".join(html.escape(part) for part in parts) + ".</p>"


def _status_text(status):
    return {0: "ok", "skipped": "skipped"}.get(status, f"exit {status}")


def write_index(out_dir, log, table, tidal_metrics=None):
    """One HTML page with every figure and table of the demo."""
    def images(pattern, width=320, limit=12):
        paths = sorted(out_dir.glob(pattern))[:limit]
        return "".join(
            f'<figure><img src="{html.escape(str(p.relative_to(out_dir)))}" width="{width}">'
            f"<figcaption>{html.escape(p.stem)}</figcaption></figure>"
            for p in paths
        )

    steps = "".join(
        f"<tr><td>{html.escape(entry['step'])}</td><td><code>{html.escape(entry['command'])}</code></td>"
        f"<td>{_status_text(entry['status'])}</td><td>{entry['seconds']:.0f} s</td></tr>"
        for entry in log
    )
    sections = [
        "<h1>ICL fractions and tidal features: demo results</h1>",
        f"<p>Made {time.strftime('%Y-%m-%d %H:%M')} by <code>make demo</code>. Files are in this folder.</p>",
        "".join(f"<p><b>{html.escape(e['step'])} skipped:</b> {html.escape(e['output'])}</p>"
                for e in log if e["status"] == "skipped"),
        "<h2>ICL fraction of the example clusters</h2>",
        table.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-") if table is not None else "",
        images("icl_comparison.png", 480),
        "<h3>GradCAM: where the model looks</h3>",
        images("gradcam/*.png", 260),
        "<h3>Surface-brightness threshold measurement</h3>",
        images("sb_plots/*.png", 420, limit=4),
        "<h2>Tidal features</h2>",
        tidal_summary_html(tidal_metrics),
        images("tidal/*roc*.png", 420),
        images("tidal/*similar*.png", 640),
        "<h2>Steps</h2>",
        f"<table><tr><th>step</th><th>command</th><th>status</th><th>time</th></tr>{steps}</table>",
    ]
    style = ("<style>body{font-family:sans-serif;max-width:1400px;margin:auto}figure{display:inline-block;margin:4px}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}</style>")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>demo results</title>{style}</head><body>{''.join(sections)}</body></html>"
    path = out_dir / "index.html"
    common.write_text(path, page)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=OUT_DIR, help=f"results folder (default {OUT_DIR})")
    parser.add_argument("--nnclr-run-dir", default=str(NNCLR_RUN), help="nnclr_train.py output folder (default: the shipped one)")
    parser.add_argument("--similar-to", default=SIMILAR_TO, help=f"query galaxy of the similarity search (default {SIMILAR_TO})")
    parser.add_argument("--top-k", type=int, default=TOP_K, help=f"galaxies returned by the similarity search (default {TOP_K})")
    common.add_verbose_argument(parser)
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    try:
        out_dir = common.check_output_dir(pathlib.Path(args.out_dir).resolve())
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    python = sys.executable
    log = []
    start = time.perf_counter()

    import model

    try:
        model.default_checkpoint()
    except model.CheckpointError as error:
        print(f"\n[ICL prediction] skipped: {error}")
        log.append({"step": "ICL prediction", "command": "predict.py (skipped)", "status": "skipped",
                    "seconds": 0.0, "output": str(error)})
    else:
        run("ICL prediction", [python, "predict.py", EXAMPLE_CLUSTERS, "--out", out_dir / "icl_predictions.csv",
                               "--gradcam-dir", out_dir / "gradcam"], log)
    run("SB measurement", [python, "-m", "measure_sb_cut", EXAMPLE_CLUSTERS, "--out", out_dir / "sb_measurements.csv",
                           "--plot-dir", out_dir / "sb_plots"], log)
    table = compare_icl(out_dir)
    print("\n" + table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    tidal_metrics = run_tidal(out_dir, log, python, args.nnclr_run_dir, similar_to=args.similar_to, top_k=args.top_k)

    index = write_index(out_dir, log, table, tidal_metrics)
    failed = [entry["step"] for entry in log if entry["status"] not in (0, "skipped")]
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; open {index}")
    if failed:
        print(f"steps that did not succeed: {', '.join(failed)} (their output is in the page)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
