"""Every demo notebook runs top to bottom with the shipped checkpoints and shows sane results.

Each notebook is executed with nbclient in a fresh ``python3`` kernel from ``demos/`` (as a
user who opens it there), writing its files to ``tmp_path`` (``DEMO_OUT``). A last cell,
added for the test only, writes the values a user reads off the notebook to JSON, and the
tests check them against what they must be.
"""

import json
import pathlib

import nbformat
import numpy as np
import pandas as pd
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "checkpoints"
NOTEBOOK_TIMEOUT = 600  # seconds per cell; each notebook takes well under a minute on 2 cores

#: The shipped checkpoint files each notebook loads (relative to checkpoints/).
REQUIRED_CHECKPOINTS = {
    "run.ipynb": ("icl_finetuned.weights.h5", "icl_finetuned.config.json"),
    "gradcam.ipynb": ("icl_finetuned.weights.h5", "icl_finetuned.config.json"),
    "finetune.ipynb": ("icl_trained.weights.h5", "icl_trained.config.json"),
    "tidal.ipynb": ("nnclr/config.json", "nnclr/encoder.keras", "nnclr/classifier.keras"),
}


def missing_checkpoints(notebook, checkpoint_dir=CHECKPOINTS):
    """Shipped checkpoint files that ``notebook`` needs and ``checkpoint_dir`` lacks."""
    return [name for name in REQUIRED_CHECKPOINTS[notebook] if not (pathlib.Path(checkpoint_dir) / name).is_file()]


def execute(notebook, tmp_path, monkeypatch, probe):
    """Run ``demos/<notebook>`` plus a ``probe`` cell that writes ``PROBE`` (a dict) to JSON.

    Returns the executed notebook and the probe's values.
    """
    missing = missing_checkpoints(notebook)
    if missing:
        pytest.fail(f"{notebook} needs shipped checkpoint files that are missing: "
                    f"{', '.join(str(CHECKPOINTS / name) for name in missing)}")
    book = nbformat.read(ROOT / "demos" / notebook, as_version=4)
    probe_path = tmp_path / "probe.json"
    book.cells.append(new_code_cell(f"import json\n{probe}\nwith open({str(probe_path)!r}, 'w') as handle:\n"
                                    "    json.dump(PROBE, handle, default=float)"))
    monkeypatch.setenv("DEMO_OUT", str(tmp_path))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    client = NotebookClient(book, timeout=NOTEBOOK_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "demos")}})
    client.execute()
    return book, json.loads(probe_path.read_text())


def figures(book):
    """Number of PNG figures the notebook displayed."""
    return sum("image/png" in output.get("data", {}) for cell in book.cells if cell.cell_type == "code"
               for output in cell.get("outputs", []))


def test_notebooks_are_committed_without_outputs():
    for notebook in REQUIRED_CHECKPOINTS:
        book = nbformat.read(ROOT / "demos" / notebook, as_version=4)
        nbformat.validate(book)
        code = [cell for cell in book.cells if cell.cell_type == "code"]
        assert code and all(not cell.outputs and cell.execution_count is None for cell in code), notebook
        assert any(cell.cell_type == "markdown" for cell in book.cells), notebook


def test_missing_checkpoints_names_the_files(tmp_path):
    (tmp_path / "nnclr").mkdir()
    (tmp_path / "nnclr" / "config.json").write_text("{}")
    assert missing_checkpoints("tidal.ipynb", tmp_path) == ["nnclr/encoder.keras", "nnclr/classifier.keras"]
    assert missing_checkpoints("finetune.ipynb", tmp_path) == ["icl_trained.weights.h5", "icl_trained.config.json"]


def test_run_notebook_predicts_the_example_clusters(tmp_path, monkeypatch):
    book, values = execute("run.ipynb", tmp_path, monkeypatch, (
        "PROBE = {'table': comparison.to_dict('list'), 'pdf_integral': float(np.trapezoid(pdf, grid)),"
        " 'pdf_mode': float(grid[np.argmax(pdf)]), 'image_size': config.image_size}"
    ))
    table = pd.DataFrame(values["table"])
    truth = pd.read_csv(ROOT / "demos" / "data" / "clusters_truth.csv", dtype={"id": str})
    assert table["id"].tolist() == truth["id"].tolist()
    np.testing.assert_allclose(table["f_icl_sb_ideal"], truth["f_icl_sb_ideal"])
    assert ((0 <= table["f_icl_p15"]) & (table["f_icl_p15"] <= table["f_icl_p85"]) & (table["f_icl_p85"] <= 1)).all()
    assert table["f_icl_model"].between(0, 1).all()
    assert table["f_icl_sb"].between(0, 1, inclusive="neither").all() and (table["f_icl_sb_err"] >= 0).all()
    # The plotted density is the model's: it integrates to one and peaks at the reported mode.
    assert values["pdf_integral"] == pytest.approx(1.0, abs=0.01)
    assert values["pdf_mode"] == pytest.approx(table["f_icl_model"][0], abs=1e-6)
    assert figures(book) >= 3  # the clusters, the comparison, the density


def test_gradcam_notebook_writes_heat_maps_and_overlays(tmp_path, monkeypatch):
    book, values = execute("gradcam.ipynb", tmp_path, monkeypatch, (
        "PROBE = {'shape': list(heatmaps.shape), 'min': float(heatmaps.min()),"
        " 'maxima': heatmaps.max(axis=(1, 2)).tolist(), 'image_size': config.image_size,"
        " 'overlays': [str(path) for path in overlay_paths], 'modes': summary['mode'].tolist(),"
        " 'central_share': [None if np.isnan(v) else float(v) for v in central_share]}"
    ))
    size = values["image_size"]
    assert values["shape"] == [4, size, size]
    assert values["min"] >= 0
    # Each map is divided by its own maximum, so it peaks at exactly 1 (or is all zero).
    assert all(peak == pytest.approx(1.0) or peak == 0 for peak in values["maxima"])
    assert [pathlib.Path(path).name for path in values["overlays"]] == [f"example0{i}_gradcam.png" for i in range(4)]
    assert all(pathlib.Path(path).parent == tmp_path / "gradcam" and pathlib.Path(path).stat().st_size > 0
               for path in values["overlays"])
    assert all(0 <= mode <= 1 for mode in values["modes"])
    assert all(share is None or 0 <= share <= 1 for share in values["central_share"])
    assert figures(book) >= 2


def test_finetune_notebook_cross_validates(tmp_path, monkeypatch):
    book, values = execute("finetune.ipynb", tmp_path, monkeypatch, (
        "PROBE = {'results': results.to_dict('list'), 'metrics': metrics, 'n_folds': settings.n_folds,"
        " 'labels': labels.tolist()}"
    ))
    results = pd.DataFrame(values["results"])
    n_folds = values["n_folds"]
    assert len(results) == len(values["labels"]) == 30 and results["id"].is_unique
    assert sorted(results["fold"].unique()) == list(range(n_folds))
    assert all((tmp_path / "finetune" / f"fold{k}.weights.h5").is_file() for k in range(n_folds))
    for name in ("metrics.json", "results.csv", "scatter.png", "binned.png"):
        assert (tmp_path / "finetune" / name).is_file(), name
    overall = values["metrics"]["overall"]
    # The reported MAE before and after is that of the per-cluster table.
    assert overall["after"]["mae"] == pytest.approx(np.abs(results["mode"] - results["label"]).mean(), rel=1e-5)
    assert overall["before"]["mae"] == pytest.approx(np.abs(results["mode_before"] - results["label"]).mean(), rel=1e-5)
    assert overall["after"]["n"] == overall["before"]["n"] == 30
    assert results[["mode", "p15", "p85", "mode_before"]].stack().between(0, 1).all()
    assert figures(book) >= 1


def test_tidal_notebook_roc_and_similarity_search(tmp_path, monkeypatch):
    from sklearn.metrics import roc_auc_score

    book, values = execute("tidal.ipynb", tmp_path, monkeypatch, (
        "PROBE = {'scores': scores.tolist(), 'labels': labels.tolist(), 'auc': rocs['NNCLR classifier']['auc'],"
        " 'completeness': rocs['NNCLR classifier']['completeness'], 'host_auc': rocs['host flux alone']['auc'],"
        " 'found': found, 'gallery': str(gallery_path)}"
    ))
    scores, labels = np.asarray(values["scores"]), np.asarray(values["labels"])
    assert len(scores) == 32 and labels.sum() == 16
    assert ((scores >= 0) & (scores <= 1)).all()
    assert values["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert all(0 <= value <= 1 for value in values["completeness"].values())
    assert values["host_auc"] == pytest.approx(0.5, abs=0.05)  # host-matched pairs: the host alone tells nothing
    found = values["found"]
    top = found["top"]
    assert found["query"] == {"id": "galaxy00", "has_tidal": 1}
    assert len(top) == 11 and "galaxy00" not in [row["id"] for row in top]
    similarities = [row["similarity"] for row in top]
    assert similarities == sorted(similarities, reverse=True)
    assert found["tidal_fraction_top_k"] == pytest.approx(np.mean([row["has_tidal"] for row in top]))
    assert pathlib.Path(values["gallery"]).stat().st_size > 0
    assert figures(book) >= 3  # galaxies, ROC and scores, gallery
