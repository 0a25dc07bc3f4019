"""Survey-scale work on a Dask cluster: inputs split into partitions, one task per partition,
results gathered in input order.

``predict.py``, ``python -m measure_sb_cut``, ``nnclr_test.py`` and ``python -m data.generate``
take ``--dask ADDRESS``: the address of a running scheduler (``tcp://host:8786``, as the Rubin
Science Platform or ``dask scheduler`` give) or ``local:N`` for a ``LocalCluster`` of N worker
processes on this machine. Every worker must see the same files (a shared file system) and run
the same environment. Without ``--dask`` nothing here runs and Dask is not imported.

A partition is the unit of scheduling and of failure: a task whose worker dies is run again on
another worker (``RETRIES``), and a bad input inside a partition is reported by the task, never
lost with it.
"""

import contextlib
import logging

import common

#: Inputs per partition (cutouts, galaxies or mocks): large enough that the scheduling
#: overhead (milliseconds per task) is small against the work, small enough to balance.
PARTITION_SIZE = 256
#: Times a failed task is retried (a killed worker's task is rescheduled by Dask itself).
RETRIES = 2

logger = logging.getLogger(__name__)


def add_dask_argument(parser, partition_size=True):
    """``--dask ADDRESS`` (or ``local:N``) and, unless ``partition_size`` is false (a command
    whose unit of work is fixed otherwise), ``--partition-size``."""
    parser.add_argument("--dask", metavar="ADDRESS",
                        help="run on a Dask cluster: a scheduler address (tcp://host:8786) or local:N for N local "
                        "worker processes; the workers must see the same files")
    if partition_size:
        parser.add_argument("--partition-size", type=int, default=PARTITION_SIZE,
                            help="inputs per Dask task (default %(default)s)")
    return parser


def check_dask_arguments(parser, args):
    """Refuse a bad ``--dask`` address or ``--partition-size`` as a usage error (exit 2), before any work."""
    if getattr(args, "partition_size", 1) < 1:
        parser.error(f"--partition-size must be at least 1, got {args.partition_size}")
    if args.dask:
        try:
            parse_address(args.dask)
        except ValueError as error:
            parser.error(str(error))


def parse_address(address):
    """``("local", N)`` for ``local:N``, else ``("remote", address)``; raises ValueError on a bad one."""
    address = str(address).strip()
    if address.startswith("local:"):
        try:
            n_workers = int(address.split(":", 1)[1])
        except ValueError:
            n_workers = 0
        if n_workers < 1:
            raise ValueError(f"--dask local:N needs a number of workers N >= 1, got '{address}'")
        return "local", n_workers
    if not address or " " in address:
        raise ValueError(f"--dask must be a scheduler address (tcp://host:port) or local:N, got '{address}'")
    return "remote", address


@contextlib.contextmanager
def dask_client(address, quiet=True):
    """A ``distributed.Client`` for ``address`` (see :func:`parse_address`), closed on exit.

    ``local:N`` starts N single-threaded worker processes (each task of this project is
    vectorised or runs its own threads) and stops them at the end. With ``quiet`` every worker
    loads TensorFlow quietly (:func:`quiet_worker`) before it receives a task.
    """
    kind, value = parse_address(address)
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ValueError("--dask needs the packages dask and distributed (pip install 'dask[distributed]')") from None

    # The cluster's own start/stop chatter is not the command's output.
    for name in ("distributed", "dask"):
        logging.getLogger(name).setLevel(logging.WARNING)

    if kind == "local":
        with LocalCluster(n_workers=value, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            if quiet:
                client.run(quiet_worker)
            interrupted = False
            try:
                yield client
            except KeyboardInterrupt:
                interrupted = True  # stop at once; the workers go with the cluster
                raise
            finally:
                if not interrupted:
                    with contextlib.suppress(Exception):
                        client.run(quiet_shutdown)
        return
    try:
        client = Client(value, timeout="30s")
    except OSError as error:
        raise ValueError(f"--dask {value}: cannot reach the scheduler ({error})") from None
    with client:
        if quiet:
            client.run(quiet_worker)
        yield client


def partitions(items, size=PARTITION_SIZE):
    """``items`` cut into consecutive lists of at most ``size``, in order."""
    if size < 1:
        raise ValueError(f"partition size must be >= 1, got {size}")
    items = list(items)
    return [items[start:start + size] for start in range(0, len(items), size)]


def map_in_order(client, function, parts, *arguments, progress=None):
    """Run ``function(part, *arguments)`` for every partition on the cluster; yield the results in order.

    Tasks are submitted all at once (Dask balances them over the workers) and each result is
    yielded as soon as it and every earlier one are done, so the caller can write output in
    input order while the cluster works ahead. ``progress`` is called with each finished
    partition's position. A task that raised is retried :data:`RETRIES` times, then its
    exception is raised here.
    """
    futures = [client.submit(function, part, *arguments, retries=RETRIES, pure=False) for part in parts]
    try:
        for position, future in enumerate(futures):
            yield future.result()
            if progress is not None:
                progress(position)
    finally:
        # An early stop (an error, Ctrl-C) must not leave the cluster working for nobody.
        client.cancel([future for future in futures if not future.done()])


def quiet_shutdown():
    """On a worker of a local cluster whose work is done: its shutdown messages (a heartbeat that
    finds the scheduler already gone, printed as a traceback about one time in ten) are not the
    command's output. Worker errors during the work are still reported."""
    for name in ("distributed", "distributed.worker", "distributed.nanny", "distributed.core", "distributed.comm"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def quiet_worker():
    """Call at the start of a task that loads TensorFlow: no start-up noise from the workers."""
    common.quiet_start([], tensorflow=True)
