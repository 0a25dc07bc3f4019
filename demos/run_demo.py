"""The newcomer's main job (``make demo``): every part of the project on small example data.

1. ``predict.py`` with the shipped ICL checkpoint on the example clusters in
   ``demos/data/clusters/`` (HSC-style FITS made by our generator), GradCAM overlays included;
2. ``python -m measure_sb_cut`` on the same clusters, with diagnostic plots;
3. a comparison of the model, the surface-brightness measurement and the generator's truth;
4. the tidal-feature classifier with the shipped NNCLR checkpoints: ROC curve and a
   similarity search on example galaxies rendered by our generator;
5. ``results/index.html``, one page that shows it all.

Each step runs the same command a user would type, so what the demo shows is what the tools do.

    python demos/run_demo.py --out results
"""

import argparse
import html
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXAMPLE_CLUSTERS = ROOT / "demos" / "data" / "clusters"
EXAMPLE_TRUTH = ROOT / "demos" / "data" / "clusters_truth.csv"
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

    plt, (figure, axis) = plots._figure(figsize=(6, 5))
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


def _status_text(status):
    return {0: "ok", "skipped": "skipped"}.get(status, f"exit {status}")


def write_index(out_dir, log, table):
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
        images("tidal/*roc*.png", 420),
        images("tidal/*similar*.png", 640),
        "<h2>Steps</h2>",
        f"<table><tr><th>step</th><th>command</th><th>status</th><th>time</th></tr>{steps}</table>",
    ]
    style = ("<style>body{font-family:sans-serif;max-width:1400px;margin:auto}figure{display:inline-block;margin:4px}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}</style>")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>demo results</title>{style}</head><body>{''.join(sections)}</body></html>"
    path = out_dir / "index.html"
    temporary = path.with_name(f".partial-{os.getpid()}-{path.name}")
    temporary.write_text(page)
    os.replace(temporary, path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=OUT_DIR, help=f"results folder (default {OUT_DIR})")
    args = parser.parse_args(argv)
    out_dir = pathlib.Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    log = []
    start = time.perf_counter()

    import model
    import predict

    try:
        predict.default_checkpoint()
    except model.CheckpointError as error:
        print(f"\n[ICL prediction] skipped: {error}")
        log.append({"step": "ICL prediction", "command": "predict.py (skipped)", "status": "skipped",
                    "seconds": 0.0, "output": str(error)})
    else:
        run("ICL prediction", [python, "predict.py", EXAMPLE_CLUSTERS, "--out", out_dir / "icl_predictions.csv",
                               "--gradcam", out_dir / "gradcam"], log)
    run("SB measurement", [python, "-m", "measure_sb_cut", EXAMPLE_CLUSTERS, "--out", out_dir / "sb_measurements.csv",
                           "--plot", out_dir / "sb_plots"], log)
    table = compare_icl(out_dir)
    print("\n" + table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))

    index = write_index(out_dir, log, table)
    failed = [entry["step"] for entry in log if entry["status"] not in (0, "skipped")]
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; open {index}")
    if failed:
        print(f"steps that did not succeed: {', '.join(failed)} (their output is in the page)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
