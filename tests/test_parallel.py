"""Dask: partitions, order, retries of killed workers, and predict.py on a local cluster."""

import os
import pathlib

import pytest
from synthetic import write_cluster_hdf5

import parallel
import predict


def test_addresses_and_partitions():
    assert parallel.parse_address("local:3") == ("local", 3)
    assert parallel.parse_address("tcp://node1:8786") == ("remote", "tcp://node1:8786")
    for bad in ("local:0", "local:two", ""):
        with pytest.raises(ValueError, match="--dask"):
            parallel.parse_address(bad)
    assert parallel.partitions(range(7), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert parallel.partitions([], 3) == []
    with pytest.raises(ValueError, match="partition size must be >= 1"):
        parallel.partitions([1], 0)


def square_or_die(part, marker):
    """Square the numbers; the first task to run on a fresh marker kills its worker process."""
    marker = pathlib.Path(marker)
    if 3 in part and not marker.exists():
        marker.write_text("killed once")
        os._exit(1)
    return [value * value for value in part]


@pytest.fixture(scope="module")
def client():
    with parallel.dask_client("local:2") as client:
        yield client


def test_results_in_input_order_and_killed_worker_retried(client, tmp_path):
    parts = parallel.partitions(range(10), 2)
    seen = []
    results = list(parallel.map_in_order(client, square_or_die, parts, str(tmp_path / "marker"), progress=seen.append))
    assert results == [[0, 1], [4, 9], [16, 25], [36, 49], [64, 81]]
    assert seen == [0, 1, 2, 3, 4]
    assert (tmp_path / "marker").exists()  # the partition holding 3 did kill a worker


def test_predict_on_local_cluster_writes_the_single_process_csv(tmp_path, tiny_checkpoint):
    write_cluster_hdf5(tmp_path / "a.h5", 13, size=48, seed=1)
    (tmp_path / "broken.h5").write_bytes(b"not an HDF5 file")
    write_cluster_hdf5(tmp_path / "b.h5", 6, size=48, seed=2)
    inputs = [str(tmp_path / name) for name in ("a.h5", "broken.h5", "b.h5")]
    common = ["--checkpoint", str(tiny_checkpoint), "--batch-size", "4"]
    assert predict.main([*inputs, "--out", str(tmp_path / "single.csv"), *common]) == 1
    assert predict.main([*inputs, "--out", str(tmp_path / "dask.csv"), *common, "--dask", "local:2",
                         "--partition-size", "4"]) == 1
    single = (tmp_path / "single.csv").read_text()
    assert single.count("\n") == 1 + 19
    assert (tmp_path / "dask.csv").read_text() == single


def test_dask_is_not_imported_without_the_flag(tmp_path, tiny_checkpoint):
    import subprocess
    import sys

    write_cluster_hdf5(tmp_path / "a.h5", 3, size=48, seed=1)
    code = ("import sys, predict; status = predict.main(sys.argv[1:]); "
            "assert 'dask' not in sys.modules and 'distributed' not in sys.modules; sys.exit(status)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.h5"), "--out", str(tmp_path / "p.csv"),
                             "--checkpoint", str(tiny_checkpoint)], capture_output=True, text=True,
                            cwd=pathlib.Path(__file__).resolve().parents[1], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def _worker_log_levels():
    import logging

    return [logging.getLogger(name).getEffectiveLevel() for name in ("distributed.worker", "distributed.nanny")]


def test_workers_of_a_finished_local_cluster_keep_their_shutdown_quiet(client, monkeypatch, tmp_path):
    """After the work, a worker's heartbeat that finds the scheduler gone is not printed; the
    local cluster's workers are told so before it closes (not while they work)."""
    import logging

    assert all(level < logging.CRITICAL for levels in client.run(_worker_log_levels).values() for level in levels)
    client.run(parallel.quiet_shutdown)
    assert all(level > logging.CRITICAL for levels in client.run(_worker_log_levels).values() for level in levels)
    marker = tmp_path / "quiet"
    monkeypatch.setattr(parallel, "quiet_shutdown", lambda: marker.touch())  # runs on the worker
    with parallel.dask_client("local:1", quiet=False) as local:
        local.submit(sum, [1, 2]).result()
        assert not marker.exists()
    assert marker.exists()
