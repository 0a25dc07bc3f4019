"""Nearest-neighbour search by cosine similarity over catalogues of representations.

A catalogue is an (N, D) array of float vectors (for instance the 128-d NNCLR
representations of SPEC Part B) with one string id per row. Every vector is L2-normalised
when the index is built, so the inner product of two stored vectors is their cosine
similarity, in [-1, 1].

Two kinds of index:

* ``"exact"``: brute force in NumPy. The catalogue is scanned in chunks of rows and only the
  running best ``k`` per query are kept, so memory stays at the catalogue itself plus one
  (query batch x chunk) block; no N x N matrix is ever formed.
* ``"rabitq"``: an approximate two-stage scan (faiss ``IndexRaBitQ`` behind a seeded random
  rotation, wrapped in ``IndexRefineFlat``). Every vector is also stored as a 1-bit-per-component
  RaBitQ code (Gao & Long 2024, SIGMOD; 24 bytes for a 128-d vector, against 512 in float32);
  a query scans the codes, keeps the ``k * refine_factor`` best estimates and re-ranks them with the
  exact float32 vectors, so the similarities returned are exact. Builds in seconds; recall
  depends little on how the catalogue is structured.

``kind="auto"`` uses the exact index up to :data:`AUTO_EXACT_MAX_VECTORS` vectors and
``"rabitq"`` above. On 10^6 uniform random 128-d unit vectors (the hardest case,
``bench/bench_similarity.py``), RaBitQ with the default ``refine_factor`` reached recall@10
0.978 at a third of the exact scan's single-query time, built in 7.5 s; an HNSW graph (faiss
``IndexHNSWFlat``, measured before it was dropped) took 561 s to build and reached 0.93 at the
broadest search tried. Below 10^5 vectors an exact scan takes a few milliseconds per query
and needs no build.

Library use::

    index = similarity.build_index(representations, ids=galaxy_ids)
    positions, similarities = index.query(representations[:5], k=10)
    positions, similarities = index.similar_to("galaxy_42", k=10)   # the example left out
    index.save("representations.index.npz")
    index = similarity.load_index("representations.index.npz")

Command line::

    python similarity.py build VECTORS.npy --ids IDS.txt --out INDEX.npz
    python similarity.py query INDEX.npz --vector-of ID --k 10 --out matches.csv
"""

import common

if __name__ in common.MAIN_NAMES:
    common.quiet_interrupt()  # a Ctrl-C while the libraries load is one line, not a traceback

import argparse
import contextlib
import csv
import functools
import json
import logging
import pathlib
import sys
import time
import zipfile

import numpy as np

logger = logging.getLogger(__name__)

# Defaults; every one can be set from the command line.
#: Number of neighbours returned by the command line's ``query``.
DEFAULT_K = 10
#: ``kind="auto"`` builds an exact index up to this many vectors and a RaBitQ index above.
AUTO_EXACT_MAX_VECTORS = 100_000
#: RaBitQ: candidates re-ranked exactly per query = k * REFINE_FACTOR (capped at N). The
#: smallest swept value (10, 30, 100, 300, 1000) giving recall@10 >= 0.95 on 10^6 uniform
#: random 128-d vectors; clustered catalogues reach it with far fewer (see the benchmark).
RABITQ_REFINE_FACTOR = 1000
#: Catalogue rows scored at once by the exact search.
EXACT_CHUNK_ROWS = 16_384
#: Queries scored at once by the exact search; one block is QUERY_BATCH x CHUNK_ROWS floats.
EXACT_QUERY_BATCH = 256
#: Searches of fewer queries than this run on one thread (see _one_thread).
SINGLE_THREAD_MAX_QUERIES = 32

KINDS = ("auto", "exact", "rabitq")
#: Value of the ``format`` field of a saved index.
FILE_FORMAT = "similarity-index"
FILE_VERSION = 1


def normalise_vectors(vectors, name="vectors"):
    """Validate an (N, D) array of vectors and return an L2-normalised float32 copy.

    Parameters
    ----------
    vectors : array_like, shape (N, D)
        Real numbers; every row finite and not all zero.
    name : str
        Parameter name used in error messages.

    Returns
    -------
    ndarray of float32, shape (N, D)
        Each row divided by its Euclidean norm (a new array; the input is not modified).

    Raises
    ------
    ValueError
        If the array is not 2-D, holds no vectors or no components, holds NaN or infinite
        values, or has a row of zeros (whose direction, hence cosine similarity, is undefined).
    """
    array = np.asarray(vectors)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one vector, got shape {array.shape}")
    if array.shape[1] == 0:
        raise ValueError(f"{name} must have at least one component, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    array = array.astype(np.float32, copy=True)
    # Row blocks keep the temporaries (a float64 copy, a mask) small for catalogues of millions.
    norms = np.empty(array.shape[0], dtype=np.float64)
    finite = np.empty(array.shape[0], dtype=bool)
    for start in range(0, array.shape[0], EXACT_CHUNK_ROWS):
        block = array[start:start + EXACT_CHUNK_ROWS]
        finite[start:start + block.shape[0]] = np.isfinite(block).all(axis=1)
        # float64: squares of large float32 components would overflow.
        norms[start:start + block.shape[0]] = np.linalg.norm(block.astype(np.float64), axis=1)
    bad_rows = np.flatnonzero(~finite)
    if bad_rows.size:
        raise ValueError(
            f"{name} must be finite; {bad_rows.size} row(s) hold NaN or infinite values "
            f"(first: {bad_rows[:5].tolist()})"
        )
    zero_rows = np.flatnonzero(norms == 0)
    if zero_rows.size:
        raise ValueError(
            f"{name} must not contain all-zero rows (their cosine similarity is undefined); "
            f"{zero_rows.size} row(s) are zero (first: {zero_rows[:5].tolist()})"
        )
    array /= norms[:, None].astype(np.float32)
    return array


def _validate_ids(ids, size):
    """Return ``ids`` as a 1-D str array of length ``size`` (row numbers when None)."""
    if ids is None:
        return np.arange(size).astype(str)
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
    if ids.shape[0] != size:
        raise ValueError(f"ids must have one entry per vector ({size}), got {ids.shape[0]}")
    ids = ids.astype(str)
    unique, counts = np.unique(ids, return_counts=True)
    if unique.size != ids.size:
        duplicated = unique[counts > 1]
        raise ValueError(
            f"ids must be unique; {duplicated.size} are repeated (first: {duplicated[:5].tolist()})"
        )
    return ids


def _validate_k(k, size):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= size:
        raise ValueError(f"k must be in [1, {size}] (the catalogue size), got {k}")
    return int(k)


def _sort_rows(positions, similarities):
    """Order each row by decreasing similarity, ties by increasing position."""
    order = np.lexsort((positions, -similarities), axis=-1)
    return np.take_along_axis(positions, order, axis=1), np.take_along_axis(similarities, order, axis=1)


def exact_search(catalogue, queries, k, chunk_rows=EXACT_CHUNK_ROWS, query_batch=EXACT_QUERY_BATCH):
    """Top ``k`` inner products of each query over the catalogue, scanned in chunks.

    Parameters
    ----------
    catalogue : ndarray of float32, shape (N, D)
        L2-normalised rows (see :func:`normalise_vectors`).
    queries : ndarray of float32, shape (Q, D)
        L2-normalised rows.
    k : int
        Neighbours per query, 1 <= k <= N.
    chunk_rows, query_batch : int
        Block size of the scan: at most ``query_batch * chunk_rows`` similarities are held at once.

    Returns
    -------
    positions : ndarray of int64, shape (Q, k)
        Catalogue rows, most similar first; equal similarities are listed by increasing row
        (which of several vectors tied at the k-th place is kept is unspecified).
    similarities : ndarray of float32, shape (Q, k)
        Cosine similarities, decreasing along each row.
    """
    size = catalogue.shape[0]
    positions_out = np.empty((queries.shape[0], k), dtype=np.int64)
    similarities_out = np.empty((queries.shape[0], k), dtype=np.float32)
    for query_start in range(0, queries.shape[0], query_batch):
        batch = queries[query_start:query_start + query_batch]
        best_positions = np.empty((batch.shape[0], 0), dtype=np.int64)
        best_similarities = np.empty((batch.shape[0], 0), dtype=np.float32)
        for chunk_start in range(0, size, chunk_rows):
            block = batch @ catalogue[chunk_start:chunk_start + chunk_rows].T
            keep = min(k, block.shape[1])
            if keep < block.shape[1]:
                candidates = np.argpartition(block, block.shape[1] - keep, axis=1)[:, -keep:]
            else:
                candidates = np.broadcast_to(np.arange(block.shape[1]), block.shape)
            merged_positions = np.concatenate([best_positions, candidates + chunk_start], axis=1)
            merged_similarities = np.concatenate(
                [best_similarities, np.take_along_axis(block, candidates, axis=1)], axis=1
            )
            if merged_positions.shape[1] > k:
                merged_positions, merged_similarities = _sort_rows(merged_positions, merged_similarities)
                merged_positions = merged_positions[:, :k]
                merged_similarities = merged_similarities[:, :k]
            best_positions, best_similarities = merged_positions, merged_similarities
        best_positions, best_similarities = _sort_rows(best_positions, best_similarities)
        positions_out[query_start:query_start + batch.shape[0]] = best_positions
        similarities_out[query_start:query_start + batch.shape[0]] = best_similarities
    return positions_out, similarities_out


class Index:
    """A searchable catalogue of unit vectors with string ids (base of the index kinds).

    Attributes
    ----------
    kind : str
        ``"exact"`` or ``"rabitq"``.
    ids : ndarray of str, shape (N,)
        One id per catalogue row.
    dimension : int
        Components per vector, D.
    """

    kind = None

    def __init__(self, ids, dimension):
        self.ids = ids
        self.dimension = int(dimension)
        self._position_of_id = None

    def __len__(self):
        return int(self.ids.shape[0])

    def __repr__(self):
        return f"{type(self).__name__}(kind={self.kind!r}, size={len(self)}, dimension={self.dimension})"

    def position(self, id_):
        """Catalogue row of the vector with id ``id_`` (ValueError when absent)."""
        if self._position_of_id is None:
            self._position_of_id = {value: row for row, value in enumerate(self.ids.tolist())}
        try:
            return self._position_of_id[str(id_)]
        except KeyError:
            raise ValueError(f"id {str(id_)!r} is not in the catalogue ({len(self)} ids)") from None

    def vector(self, id_):
        """The stored, L2-normalised vector of id ``id_``, shape (D,)."""
        return self._vector_at(self.position(id_))

    def query(self, vectors, k, **search_options):
        """The ``k`` catalogue vectors most similar (cosine) to each query vector.

        Parameters
        ----------
        vectors : array_like, shape (Q, D) or (D,)
            Query vectors, in the same space as the catalogue; they are L2-normalised here
            (any positive scale gives the same answer).
        k : int
            Neighbours per query, 1 <= k <= N.
        **search_options
            ``refine_factor``: RaBitQ candidates re-ranked per neighbour (default: the
            index's). The exact index accepts and ignores it, so callers need not know the kind.

        Returns
        -------
        positions : ndarray of int64, shape (Q, k), or (k,) for a 1-D query
            Catalogue rows, most similar first; ``index.ids[positions]`` gives the ids.
        similarities : ndarray of float32, same shape
            Cosine similarities, decreasing.

        Notes
        -----
        Fewer than :data:`SINGLE_THREAD_MAX_QUERIES` queries run on one thread, set through
        process-wide BLAS and faiss settings that are restored afterwards; batch queries rather
        than calling this from several Python threads at once.
        """
        vectors = np.asarray(vectors)
        single = vectors.ndim == 1
        queries = normalise_vectors(vectors[None, :] if single else vectors, name="query vectors")
        if queries.shape[1] != self.dimension:
            raise ValueError(
                f"query vectors must have {self.dimension} components like the catalogue, "
                f"got {queries.shape[1]}"
            )
        k = _validate_k(k, len(self))
        if queries.shape[0] < SINGLE_THREAD_MAX_QUERIES:
            with _one_thread():
                positions, similarities = self._search(queries, k, **search_options)
        else:
            positions, similarities = self._search(queries, k, **search_options)
        if single:
            return positions[0], similarities[0]
        return positions, similarities

    def similar_to(self, id_, k, include_self=False, **search_options):
        """The ``k`` catalogue vectors most similar to the catalogue's own vector ``id_``.

        Parameters
        ----------
        id_ : str
            Id of the example (for instance one galaxy).
        k : int
            Neighbours to return; at most N - 1 when the example itself is left out.
        include_self : bool
            Keep the example itself (similarity 1) among the results.
        **search_options
            As for :meth:`query`.

        Returns
        -------
        positions : ndarray of int64, shape (k,)
        similarities : ndarray of float32, shape (k,)
        """
        position = self.position(id_)
        if include_self:
            return self.query(self._vector_at(position), k, **search_options)
        if len(self) < 2:
            raise ValueError("the catalogue must hold at least 2 vectors to find neighbours other than the example")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(self) - 1:
            raise ValueError(
                f"k must be an integer in [1, {len(self) - 1}] (the catalogue size less the example), got {k!r}"
            )
        positions, similarities = self.query(self._vector_at(position), int(k) + 1, **search_options)
        others = positions != position
        # Normally the example is its own first match; if a duplicate vector outranks it,
        # or an approximate search misses it, drop the last match instead.
        return positions[others][:k], similarities[others][:k]

    def save(self, path):
        """Write the index and its ids to one ``.npz`` file, atomically.

        Parameters
        ----------
        path : str or path-like
            Destination; written to a temporary sibling first and renamed, so a reader
            never sees a half-written index.
        """
        arrays = {
            "format": np.array(FILE_FORMAT),
            "version": np.array(FILE_VERSION),
            "kind": np.array(self.kind),
            "parameters": np.array(json.dumps(self._parameters())),
            "ids": self.ids,
        }
        arrays.update(self._arrays())
        # A file object stops numpy from appending ".npz" to the temporary name.
        with common.atomic_write(path) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, **arrays)
        logger.info("saved %s to %s", self, path)

    def _parameters(self):
        return {}


class ExactIndex(Index):
    """Exact cosine search by a chunked NumPy scan (see :func:`exact_search`)."""

    kind = "exact"

    def __init__(self, unit_vectors, ids, chunk_rows=EXACT_CHUNK_ROWS, query_batch=EXACT_QUERY_BATCH):
        super().__init__(ids, unit_vectors.shape[1])
        self.vectors = unit_vectors
        self.chunk_rows = int(chunk_rows)
        self.query_batch = int(query_batch)

    def _search(self, queries, k, refine_factor=None):
        _check_refine_factor(refine_factor)
        return exact_search(self.vectors, queries, k, self.chunk_rows, self.query_batch)

    def _vector_at(self, position):
        return self.vectors[position].copy()

    def _arrays(self):
        return {"vectors": self.vectors}


@functools.lru_cache(maxsize=1)
def _blas_controller():
    import threadpoolctl

    return threadpoolctl.ThreadpoolController()


@contextlib.contextmanager
def _one_thread():
    """Run BLAS and faiss on one thread inside the block (restored afterwards).

    A single query is memory-bound: splitting it over threads does not speed it up, and on a
    busy machine the threads wait for each other. Measured on 2 shared cores: a 20,000 x 128
    matrix-vector product took 15 ms on two BLAS threads and 0.8 ms on one; a RaBitQ query
    over 50,000 vectors 28 ms on two OpenMP threads and 1.8 ms on one.
    """
    faiss = sys.modules.get("faiss")
    faiss_threads = faiss.omp_get_max_threads() if faiss is not None else None
    try:
        if faiss is not None:
            faiss.omp_set_num_threads(1)
        with _blas_controller().limit(limits=1, user_api="blas"):
            yield
    finally:
        if faiss is not None:
            faiss.omp_set_num_threads(faiss_threads)


class RaBitQIndex(Index):
    """Approximate cosine search: a RaBitQ code scan, then exact re-ranking (see the module notes).

    Parameters
    ----------
    faiss_index : faiss.IndexRefineFlat
        RaBitQ codes (behind a random rotation) as the first stage, float32 vectors as the second.
    ids : ndarray of str
    refine_factor : int
        Default number of candidates re-ranked per requested neighbour.
    """

    kind = "rabitq"

    def __init__(self, faiss_index, ids, refine_factor=RABITQ_REFINE_FACTOR):
        super().__init__(ids, faiss_index.d)
        self.faiss_index = faiss_index
        self.refine_factor = _positive_int(refine_factor, "refine_factor")

    def _search(self, queries, k, refine_factor=None):
        import faiss

        _check_refine_factor(refine_factor)
        refine_factor = self.refine_factor if refine_factor is None else refine_factor
        # Asking the first stage for more candidates than vectors would return empty slots.
        refine_factor = max(1, min(refine_factor, len(self) // k))
        parameters = faiss.IndexRefineSearchParameters(k_factor=refine_factor)
        similarities, positions = self.faiss_index.search(queries, k, params=parameters)
        return positions.astype(np.int64), similarities.astype(np.float32)

    def _vector_at(self, position):
        return self.faiss_index.reconstruct(int(position))

    def _parameters(self):
        return {"refine_factor": self.refine_factor}

    def _arrays(self):
        import faiss

        return {"faiss_index": faiss.serialize_index(self.faiss_index)}


def _check_refine_factor(refine_factor):
    if refine_factor is not None:
        _positive_int(refine_factor, "refine_factor")


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def build_index(vectors, ids=None, kind="auto", seed=None, refine_factor=RABITQ_REFINE_FACTOR,
                chunk_rows=EXACT_CHUNK_ROWS, query_batch=EXACT_QUERY_BATCH):
    """Build a cosine-similarity index over a catalogue of vectors.

    Parameters
    ----------
    vectors : array_like, shape (N, D)
        The catalogue, for instance NNCLR representations (D = 128). Rows are L2-normalised
        inside (a copy); they must be finite and non-zero.
    ids : sequence of str, shape (N,), optional
        Unique id of each row; row numbers ("0", "1", ...) when omitted.
    kind : {"auto", "exact", "rabitq"}
        ``"auto"``: exact up to :data:`AUTO_EXACT_MAX_VECTORS` vectors, RaBitQ above.
    seed : int or None
        Seeds the RaBitQ random rotation.
    refine_factor : int
        Default RaBitQ candidates re-ranked per requested neighbour (overridable per query).
    chunk_rows, query_batch : int
        Block size of the exact search.

    Returns
    -------
    Index
        An :class:`ExactIndex` or :class:`RaBitQIndex`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    unit_vectors = normalise_vectors(vectors)
    ids = _validate_ids(ids, unit_vectors.shape[0])
    chunk_rows = _positive_int(chunk_rows, "chunk_rows")
    query_batch = _positive_int(query_batch, "query_batch")
    if kind == "auto":
        kind = "exact" if unit_vectors.shape[0] <= AUTO_EXACT_MAX_VECTORS else "rabitq"
    if kind == "exact":
        return ExactIndex(unit_vectors, ids, chunk_rows=chunk_rows, query_batch=query_batch)

    import faiss

    refine_factor = _positive_int(refine_factor, "refine_factor")
    # 1-bit codes estimate inner products best when the components are spread evenly;
    # a random rotation ensures that whatever axes the representations favour.
    rotation = faiss.RandomRotationMatrix(unit_vectors.shape[1], unit_vectors.shape[1])
    rotation.init(int(np.random.default_rng(seed).integers(2**31 - 1)))
    codes = faiss.IndexRaBitQ(unit_vectors.shape[1], faiss.METRIC_INNER_PRODUCT)
    faiss_index = faiss.IndexRefineFlat(faiss.IndexPreTransform(rotation, codes))
    start = time.perf_counter()
    faiss_index.train(unit_vectors)
    faiss_index.add(unit_vectors)
    logger.info("built a RaBitQ index over %d vectors in %.1f s", unit_vectors.shape[0], time.perf_counter() - start)
    return RaBitQIndex(faiss_index, ids, refine_factor=refine_factor)

def load_index(path):
    """Read an index written by :meth:`Index.save`.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    Index
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"index file {str(path)!r} does not exist")
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic == b"\x93NUMPY":
        raise ValueError(f"index file {str(path)!r} is a single array, not a saved similarity index "
                         "(make one with 'similarity.py build')")
    if not magic.startswith(b"PK"):
        raise ValueError(f"index file {str(path)!r} is not a saved similarity index (not an .npz archive)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"index file {str(path)!r} is not a saved similarity index: {error}") from None
    with archive:
        if "format" not in archive.files or str(archive["format"]) != FILE_FORMAT:
            raise ValueError(f"index file {str(path)!r} is not a saved similarity index (no format {FILE_FORMAT!r})")
        version = int(archive["version"])
        if version != FILE_VERSION:
            raise ValueError(
                f"index file {str(path)!r} has version {version}; this code reads version {FILE_VERSION}"
            )
        kind = str(archive["kind"])
        parameters = json.loads(str(archive["parameters"]))
        ids = archive["ids"]
        if kind == "exact":
            vectors = archive["vectors"]
            return ExactIndex(vectors, ids)
        if kind == "rabitq":
            import faiss

            faiss_index = faiss.deserialize_index(archive["faiss_index"])
            return RaBitQIndex(faiss_index, ids, refine_factor=parameters["refine_factor"])
    raise ValueError(f"index file {str(path)!r} holds an unknown kind {kind!r}")


def load_array(path, what):
    """A ``.npy`` array (never pickled, memory-mapped); ValueError naming ``path`` if it is not one."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic != b"\x93NUMPY":
        raise ValueError(f"{what} {str(path)!r} is not a NumPy .npy file (write it with numpy.save)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        reason = "it holds Python objects" if "object" in str(error) or "pickle" in str(error) else error
        raise ValueError(f"{what} {str(path)!r} is not a NumPy .npy array of numbers ({reason})") from None
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{what} {str(path)!r} is an .npz archive, not a single .npy array")
    return array


def read_ids(path):
    """Ids from a text file, one per line (trailing newlines and carriage returns removed)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return [line.rstrip("\r\n") for line in handle]
    except FileNotFoundError:
        raise ValueError(f"ids file {str(path)!r} does not exist") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"ids file {str(path)!r} is not UTF-8 text (byte {error.start})") from None


def _write_matches_csv(path, ids, similarities):
    with common.atomic_write(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "id", "similarity"])
        for rank, (id_, similarity) in enumerate(zip(ids, similarities), start=1):
            writer.writerow([rank, id_, f"{similarity:.6f}"])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Cosine-similarity search over a catalogue of representation vectors.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="build an index from an (N, D) .npy array of vectors")
    build.add_argument("vectors_path", metavar="VECTORS", help="(N, D) float array saved with numpy.save")
    build.add_argument("--ids", dest="ids_path", help="text file with one id per line (default: row numbers)")
    build.add_argument("--out", dest="out_path", required=True, help="index file to write (.npz)")
    build.add_argument("--kind", choices=KINDS, default="auto",
                       help=f"index kind; auto = exact up to {AUTO_EXACT_MAX_VECTORS} vectors (default: auto)")
    build.add_argument("--refine-factor", type=int, default=RABITQ_REFINE_FACTOR,
                       help=f"RaBitQ default candidates re-ranked per neighbour (default: {RABITQ_REFINE_FACTOR})")
    build.add_argument("--seed", type=int, default=None, help="seed of the RaBitQ rotation")

    query = commands.add_parser("query", help="print the catalogue entries most similar to one example")
    query.add_argument("index_path", metavar="INDEX", help="index file written by 'build'")
    target = query.add_mutually_exclusive_group(required=True)
    target.add_argument("--vector-of", dest="vector_of", metavar="ID", help="query with the catalogue's vector of ID")
    target.add_argument("--vector", dest="vector_path", metavar="NPY", help="query with a (D,) vector saved as .npy")
    query.add_argument("--k", type=int, default=DEFAULT_K, help=f"number of matches (default: {DEFAULT_K})")
    query.add_argument("--refine-factor", type=int, default=None,
                       help="RaBitQ candidates re-ranked per neighbour (default: the index's)")
    query.add_argument("--include-self", action="store_true",
                       help="with --vector-of, keep the example itself among the matches")
    query.add_argument("--out", dest="out_path", help="also write the matches to this CSV (rank,id,similarity)")
    return parser.parse_args(argv)


@common.interruptible("interrupted: nothing was written (outputs appear only when complete)")
def main(argv=None):
    args = parse_args(argv)
    # This module's progress at INFO; other libraries (faiss reports which build it loads) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    try:
        return _run(args)
    except (ValueError, KeyError, OSError, UnicodeDecodeError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2


def _run(args):
    if args.out_path:
        common.check_output_file(args.out_path)
    if args.command == "build":
        vectors = load_array(args.vectors_path, "vectors file")
        ids = read_ids(args.ids_path) if args.ids_path else None
        index = build_index(vectors, ids=ids, kind=args.kind, seed=args.seed, refine_factor=args.refine_factor)
        index.save(args.out_path)
        print(f"wrote {index} to {args.out_path}")
        return 0

    index = load_index(args.index_path)
    if args.vector_of is not None:
        positions, similarities = index.similar_to(args.vector_of, args.k, include_self=args.include_self,
                                                   refine_factor=args.refine_factor)
    else:
        vector = load_array(args.vector_path, "query vector file")
        positions, similarities = index.query(np.asarray(vector).reshape(-1), args.k, refine_factor=args.refine_factor)
    matched_ids = index.ids[positions]
    print("rank,id,similarity")
    for rank, (id_, similarity) in enumerate(zip(matched_ids, similarities), start=1):
        print(f"{rank},{id_},{similarity:.6f}")
    if args.out_path:
        _write_matches_csv(args.out_path, matched_ids, similarities)
    return 0


if __name__ == "__main__":
    sys.exit(main())
