"""Cosine-similarity search: exact against brute force, RaBitQ recall, save/load, errors, CLI."""

import csv
import importlib.util
import json
import pathlib

import numpy as np
import pytest

import similarity

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]


def random_vectors(count, dimension, seed):
    return np.random.default_rng(seed).standard_normal((count, dimension)).astype(np.float32)


def brute_force(catalogue, queries, k):
    """Reference answer: full similarity matrix, full sort."""
    catalogue = catalogue / np.linalg.norm(catalogue, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    similarities = queries @ catalogue.T
    order = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(similarities, order, axis=1)


def clustered_vectors(n_clusters, per_cluster, dimension, seed):
    """Tight clusters around random directions, with the cluster of each row."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dimension))
    labels = np.repeat(np.arange(n_clusters), per_cluster)
    vectors = centres[labels] + 0.3 * rng.standard_normal((labels.size, dimension))
    return vectors.astype(np.float32), labels


@pytest.fixture
def catalogue():
    return random_vectors(600, 16, seed=1)


# Small blocks make the exact scan merge across several chunks and query batches.
@pytest.mark.parametrize("chunk_rows, query_batch", [(97, 7), (16_384, 256)])
def test_exact_search_matches_brute_force(catalogue, chunk_rows, query_batch):
    queries = random_vectors(40, 16, seed=2)
    index = similarity.build_index(catalogue, kind="exact", chunk_rows=chunk_rows, query_batch=query_batch)
    positions, similarities = index.query(queries, k=12)
    expected_positions, expected_similarities = brute_force(catalogue, queries, 12)
    np.testing.assert_array_equal(positions, expected_positions)
    np.testing.assert_allclose(similarities, expected_similarities, atol=1e-5)
    assert positions.shape == (40, 12) and positions.dtype == np.int64 and similarities.dtype == np.float32


def test_exact_search_with_k_equal_to_catalogue_size_ranks_everything():
    catalogue = random_vectors(9, 4, seed=3)
    index = similarity.build_index(catalogue, kind="exact", chunk_rows=4)
    positions, similarities = index.query(catalogue[0], k=9)
    assert sorted(positions.tolist()) == list(range(9))
    assert positions[0] == 0 and similarities[0] == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.diff(similarities) <= 0)


def test_query_is_scale_invariant_and_one_dimensional_for_one_vector(catalogue):
    index = similarity.build_index(catalogue, kind="exact")
    positions, similarities = index.query(catalogue[5], k=3)
    scaled_positions, scaled_similarities = index.query(catalogue[5] * 40.0, k=3, refine_factor=8)
    assert positions.shape == (3,) and positions[0] == 5
    np.testing.assert_array_equal(positions, scaled_positions)
    np.testing.assert_allclose(similarities, scaled_similarities, atol=1e-6)


def test_inputs_are_not_modified(catalogue):
    original = catalogue.copy()
    queries = random_vectors(3, 16, seed=4)
    queries_original = queries.copy()
    index = similarity.build_index(catalogue, kind="exact")
    index.query(queries, k=2)
    np.testing.assert_array_equal(catalogue, original)
    np.testing.assert_array_equal(queries, queries_original)


def test_approximate_recall_on_clustered_set_is_high():
    vectors, labels = clustered_vectors(n_clusters=30, per_cluster=60, dimension=32, seed=5)
    queries = vectors[::9]
    index = similarity.build_index(vectors, kind="rabitq", seed=0)
    found, _ = index.query(queries, k=10, refine_factor=10)
    truth, _ = brute_force(vectors, queries, 10)
    recall = np.mean([np.intersect1d(a, b).size for a, b in zip(found, truth)]) / 10
    assert recall >= 0.95
    # Every neighbour found lies in the query's own cluster.
    assert np.all(labels[found] == labels[::9][:, None])


def test_approximate_similarities_are_cosines(catalogue):
    index = similarity.build_index(catalogue, kind="rabitq", seed=0)
    positions, similarities = index.query(catalogue[:5], k=4)
    unit = catalogue / np.linalg.norm(catalogue, axis=1, keepdims=True)
    expected = np.einsum("qd,qkd->qk", unit[:5], unit[positions])
    np.testing.assert_allclose(similarities, expected, atol=1e-5)
    np.testing.assert_array_equal(positions[:, 0], np.arange(5))


def test_auto_kind_switches_to_rabitq_above_the_threshold(catalogue, monkeypatch):
    assert similarity.build_index(catalogue).kind == "exact"
    monkeypatch.setattr(similarity, "AUTO_EXACT_MAX_VECTORS", 100)
    assert similarity.build_index(catalogue).kind == "rabitq"


def test_rabitq_recall_on_unstructured_set_is_high_and_similarities_exact():
    catalogue = random_vectors(5000, 32, seed=8)
    queries = random_vectors(50, 32, seed=9)
    index = similarity.build_index(catalogue, kind="rabitq", seed=0)
    found, similarities = index.query(queries, k=10, refine_factor=50)
    truth, _ = brute_force(catalogue, queries, 10)
    recall = np.mean([np.intersect1d(a, b).size for a, b in zip(found, truth)]) / 10
    assert recall >= 0.95
    unit = catalogue / np.linalg.norm(catalogue, axis=1, keepdims=True)
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    np.testing.assert_allclose(similarities, np.einsum("qd,qkd->qk", unit_queries, unit[found]), atol=1e-5)


def test_rabitq_with_more_candidates_than_vectors_is_exact():
    catalogue = random_vectors(50, 8, seed=10)
    index = similarity.build_index(catalogue, kind="rabitq", seed=0, refine_factor=1000)
    positions, _ = index.query(catalogue[:5], k=7)
    expected, _ = brute_force(catalogue, catalogue[:5], 7)
    np.testing.assert_array_equal(positions, expected)


@pytest.mark.parametrize("kind", ["exact", "rabitq"])
def test_similar_to_leaves_the_example_out_unless_asked(catalogue, kind):
    ids = [f"galaxy_{row}" for row in range(len(catalogue))]
    index = similarity.build_index(catalogue, ids=ids, kind=kind, seed=0)
    positions, similarities = index.similar_to("galaxy_7", k=5)
    assert 7 not in positions.tolist() and positions.shape == (5,)
    expected, _ = brute_force(catalogue, catalogue[7:8], 6)
    np.testing.assert_array_equal(positions, expected[0, 1:])
    with_self, self_similarities = index.similar_to("galaxy_7", k=5, include_self=True)
    assert with_self[0] == 7 and self_similarities[0] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(index.vector("galaxy_7"), catalogue[7] / np.linalg.norm(catalogue[7]), atol=1e-6)


@pytest.mark.parametrize("kind", ["exact", "rabitq"])
def test_save_and_load_round_trip(tmp_path, catalogue, kind):
    ids = [f"g{row:04d}" for row in range(len(catalogue))]
    index = similarity.build_index(catalogue, ids=ids, kind=kind, seed=0, refine_factor=33)
    path = tmp_path / "catalogue.index"
    index.save(path)
    assert sorted(item.name for item in tmp_path.iterdir()) == ["catalogue.index"]
    loaded = similarity.load_index(path)
    assert loaded.kind == kind and len(loaded) == len(catalogue) and loaded.dimension == 16
    np.testing.assert_array_equal(loaded.ids, np.array(ids))
    queries = random_vectors(10, 16, seed=6)
    for expected, got in zip(index.query(queries, k=5), loaded.query(queries, k=5)):
        np.testing.assert_array_equal(expected, got)
    if kind == "rabitq":
        assert loaded.refine_factor == 33


@pytest.mark.parametrize(
    "vectors, message",
    [
        (np.ones(8), r"vectors must be 2-D \(N, D\), got shape \(8,\)"),
        (np.ones((0, 8)), r"vectors must hold at least one vector, got shape \(0, 8\)"),
        (np.ones((3, 0)), r"vectors must have at least one component, got shape \(3, 0\)"),
        (np.array([[1.0, 2.0], [np.nan, 1.0], [1.0, np.inf]]),
         r"vectors must be finite; 2 row\(s\) hold NaN or infinite values \(first: \[1, 2\]\)"),
        (np.array([[1.0, 2.0], [0.0, 0.0]]),
         r"vectors must not contain all-zero rows \(their cosine similarity is undefined\); 1 row\(s\) are zero"),
        (np.array([["a", "b"]]), r"vectors must hold real numbers, got dtype <U1"),
    ],
)
def test_bad_catalogues_are_refused(vectors, message):
    with pytest.raises(ValueError, match=message):
        similarity.build_index(vectors)


def test_bad_build_arguments_are_refused(catalogue):
    with pytest.raises(ValueError, match=r"kind must be one of 'auto', 'exact', 'rabitq', got 'hnsw'"):
        similarity.build_index(catalogue, kind="hnsw")
    with pytest.raises(ValueError, match=r"ids must have one entry per vector \(600\), got 2"):
        similarity.build_index(catalogue, ids=["a", "b"])
    with pytest.raises(ValueError, match=r"ids must be unique; 1 are repeated \(first: \['a'\]\)"):
        similarity.build_index(catalogue[:3], ids=["a", "b", "a"])
    with pytest.raises(ValueError, match=r"refine_factor must be a positive integer, got 0"):
        similarity.build_index(catalogue, kind="rabitq", refine_factor=0)


@pytest.mark.parametrize("kind", ["exact", "rabitq"])
def test_bad_queries_are_refused(catalogue, kind):
    index = similarity.build_index(catalogue, kind=kind, seed=0)
    with pytest.raises(ValueError, match=r"query vectors must have 16 components like the catalogue, got 8"):
        index.query(np.ones(8), k=3)
    with pytest.raises(ValueError, match=r"k must be in \[1, 600\] \(the catalogue size\), got 601"):
        index.query(catalogue[0], k=601)
    with pytest.raises(ValueError, match=r"k must be in \[1, 600\] \(the catalogue size\), got 0"):
        index.query(catalogue[0], k=0)
    with pytest.raises(ValueError, match=r"k must be an integer, got 2.5"):
        index.query(catalogue[0], k=2.5)
    with pytest.raises(ValueError, match=r"query vectors must be finite; 1 row\(s\) hold NaN"):
        index.query(np.full(16, np.nan), k=3)
    with pytest.raises(ValueError, match=r"refine_factor must be a positive integer, got 0"):
        index.query(catalogue[0], k=3, refine_factor=0)
    with pytest.raises(ValueError, match=r"id 'missing' is not in the catalogue \(600 ids\)"):
        index.similar_to("missing", k=3)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 599\] "
                                         r"\(the catalogue size less the example\), got 600"):
        index.similar_to("0", k=600)


def test_loading_a_file_that_is_not_an_index_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"index file '.*absent.npz' does not exist"):
        similarity.load_index(tmp_path / "absent.npz")
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"index file '.*empty.npz' is not a saved similarity index \(not an .npz archive\)"):
        similarity.load_index(empty)
    other = tmp_path / "other.npz"
    np.savez(other, values=np.arange(3))
    with pytest.raises(ValueError, match=r"is not a saved similarity index \(no format 'similarity-index'\)"):
        similarity.load_index(other)


def test_command_line_build_and_query(tmp_path, capsys):
    vectors, _ = clustered_vectors(n_clusters=5, per_cluster=20, dimension=8, seed=7)
    np.save(tmp_path / "vectors.npy", vectors)
    ids = [f"galaxy_{row}" for row in range(len(vectors))]
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    index_path = tmp_path / "catalogue.index.npz"
    assert similarity.main(["build", str(tmp_path / "vectors.npy"), "--ids", str(tmp_path / "ids.txt"),
                            "--out", str(index_path)]) == 0
    assert index_path.exists()
    capsys.readouterr()

    csv_path = tmp_path / "matches.csv"
    assert similarity.main(["query", str(index_path), "--vector-of", "galaxy_3", "--k", "4",
                            "--out", str(csv_path)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected, expected_similarities = brute_force(vectors, vectors[3:4], 5)
    assert [row["id"] for row in rows] == [ids[row] for row in expected[0, 1:]]
    assert [row["rank"] for row in rows] == ["1", "2", "3", "4"]
    np.testing.assert_allclose([float(row["similarity"]) for row in rows], expected_similarities[0, 1:], atol=1e-5)
    assert printed[0] == "rank,id,similarity" and printed[1].startswith(f"1,{rows[0]['id']},")

    np.save(tmp_path / "query.npy", vectors[3] * 2.0)
    assert similarity.main(["query", str(index_path), "--vector", str(tmp_path / "query.npy"), "--k", "1"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[1].startswith("1,galaxy_3,1.0000")


@pytest.mark.parametrize("arguments", [["--help"], ["build", "--help"], ["query", "--help"]])
def test_command_line_help(arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        similarity.main(arguments)
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def load_benchmark():
    path = REPOSITORY / "bench" / "bench_similarity.py"
    spec = importlib.util.spec_from_file_location("bench_similarity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_script_runs(tmp_path, capsys):
    bench = load_benchmark()
    out_path = tmp_path / "figures.json"
    assert bench.main(["--n", "400", "--dimension", "16", "--queries", "20", "--single-queries", "3",
                       "--refine-factor", "1,40", "--out", str(out_path)]) == 0
    figures = json.loads(out_path.read_text())
    output = capsys.readouterr().out
    assert "cores" in output and "recall@10" in output
    assert figures["n_vectors"] == 400 and figures["exact_batch_s_per_query"] > 0
    assert 0.0 <= figures["rabitq"]["recall"] <= 1.0 and figures["rabitq"]["single_s_per_query_median"] > 0
    # Re-ranking k * 40 = all 400 vectors exactly must give the exact answer.
    assert figures["rabitq"]["sweep"][-1]["recall"] == 1.0 or figures["rabitq"]["sweep"][0]["recall"] >= 0.95


def test_benchmark_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark().main(["--help"])
    assert exit_info.value.code == 0
    assert "--n" in capsys.readouterr().out


def test_command_line_refuses_broken_inputs_in_one_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "v.npy", rng.normal(size=(20, 4)).astype(np.float32))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "garbage.npy").write_bytes(b"hello world")
    np.save(tmp_path / "scalar.npy", np.float32(3.0))
    np.save(tmp_path / "q3.npy", np.ones(3, np.float32))
    (tmp_path / "ids.txt").write_text("\n".join(f"g{i}" for i in range(19)))
    (tmp_path / "latin1.txt").write_bytes(b"\xff\n" * 20)
    index = str(tmp_path / "index.npz")
    assert similarity.main(["build", str(tmp_path / "v.npy"), "--out", index]) == 0
    cases = {
        ("build", "garbage.npy"): "garbage.npy' is not a NumPy .npy file",
        ("build", "objects.npy"): "objects.npy' is not a NumPy .npy array of numbers (it holds Python objects)",
        ("build", "scalar.npy"): "vectors must be 2-D",
        ("build", "missing.npy"): "missing.npy' does not exist",
        ("build", "v.npy", "--ids", "ids.txt"): "ids must have one entry per vector (20), got 19",
        ("build", "v.npy", "--ids", "latin1.txt"): "latin1.txt' is not UTF-8 text",
        ("query", "v.npy", "--vector-of", "g1"): "is a single array, not a saved similarity index",
        ("query", "garbage.npy", "--vector-of", "g1"): "is not a saved similarity index (not an .npz archive)",
        ("query", "index.npz", "--vector-of", "nope"): "id 'nope' is not in the catalogue",
        ("query", "index.npz", "--vector", "q3.npy"): "must have 4 components like the catalogue, got 3",
    }
    for arguments, message in cases.items():
        argv = [arguments[0], *(str(tmp_path / a) if a.endswith((".npy", ".npz", ".txt")) else a for a in arguments[1:])]
        if argv[0] == "build":
            argv += ["--out", str(tmp_path / "other.npz")]
        capsys.readouterr()
        assert similarity.main(argv) == 2, arguments
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: ") and "\n" not in error and message in error, (arguments, error)
    assert not (tmp_path / "other.npz").exists()
    (tmp_path / "file").write_text("x")
    assert similarity.main(["query", index, "--vector-of", "1", "--out", str(tmp_path / "file" / "m.csv")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
