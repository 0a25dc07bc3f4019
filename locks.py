"""Locks that keep two runs from writing one output at the same time.

A lock is a small file created with ``O_CREAT | O_EXCL`` that holds the id of the process
writing the output, the time that process started and the host name. A second run finds it
and is refused with one line; a lock whose process has ended (or whose process id now belongs
to another process, as the start time tells) is stale and taken over. Locks from another host
cannot be checked and count as held.

Importing this module has no side effects and does not import TensorFlow.
"""

import contextlib
import json
import logging
import os
import pathlib
import socket
import time

logger = logging.getLogger(__name__)

#: A lock file without a process id (being written) younger than this many seconds is held.
UNREADABLE_LOCK_AGE = 10


def _process_start(pid):
    """When process ``pid`` started (clock ticks since boot, from /proc), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return int(fields[19])  # field 22 of proc(5); the first two come before the ')'
    except (OSError, IndexError, ValueError):
        return None


def lock_text():
    """What a lock holds: this process's id, its start time ('-' where unknown) and the host name."""
    start = _process_start(os.getpid())
    return f"{os.getpid()} {start if start is not None else '-'} {socket.gethostname()}\n"


def holder_alive(text):
    """Whether the process a lock's ``text`` names still runs; None when the text names none.

    A process id alone can be reused after its holder died; the start time recorded next to it
    tells a new process with the same id from the holder. A lock of another host counts as alive.
    """
    parts = text.split()
    if not parts or not parts[0].isdigit():
        return None
    pid = int(parts[0])
    if len(parts) >= 3 and parts[2] != socket.gethostname():
        return True  # cannot be checked from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if len(parts) >= 2 and parts[1].isdigit():
        start = _process_start(pid)
        return start is None or start == int(parts[1])
    return True


def _holder(text):
    parts = text.split()
    name = f"process {parts[0]}" if parts else "another process"
    if len(parts) >= 3 and parts[2] != socket.gethostname():
        name += f" on {parts[2]}"
    return name


def acquire(lock, label, option, error=ValueError):
    """Create the lock file ``lock`` for the output ``label`` (e.g. ``--out FILE``); returns its path.

    Raises
    ------
    ValueError (or ``error``)
        One line naming the holder when a live process holds the lock (``option`` is the
        command-line option to change), or when the lock cannot be created.
    """
    lock = pathlib.Path(lock)
    refused = f"{label}: {{}} is writing this output (lock {lock}); wait for it to finish or choose another {option}"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            try:
                text = lock.read_text().strip()
                age = time.time() - lock.lstat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except OSError as failure:
                raise error(f"{label}: cannot read the lock file {lock} ({failure.strerror})") from None
            alive = holder_alive(text)
            if alive or (alive is None and age < UNREADABLE_LOCK_AGE):
                raise error(refused.format(_holder(text) if alive else "another process")) from None
            logger.warning("%s: taking over the lock of process %s, which is no longer running", lock,
                           (text.split() or ["?"])[0])
            # Moved aside rather than deleted: of two runs taking over at once, only one moves the
            # stale lock; the other would move the winner's fresh lock, sees it and puts it back.
            grave = lock.with_name(f"{lock.name}.stale.{os.getpid()}")
            try:
                os.rename(lock, grave)
            except FileNotFoundError:
                continue
            moved = grave.read_text().strip()
            if moved != text:
                with contextlib.suppress(FileExistsError):
                    os.link(grave, lock)
                grave.unlink(missing_ok=True)
                raise error(refused.format(_holder(moved)))
            grave.unlink(missing_ok=True)
            continue
        except OSError as failure:
            raise error(f"{label}: cannot create the lock file {lock} ({failure.strerror})") from None
        with os.fdopen(fd, "w") as handle:
            handle.write(lock_text())
        return lock
    raise error(f"{label}: cannot take the lock {lock}; another run keeps taking it")


def _task_suffix():
    """'' for a one-process run or the chief of a TF_CONFIG cluster, else '-<type>-<index>':
    each process of a multi-worker run writes its own folder and holds its own lock."""
    try:
        config = json.loads(os.environ.get("TF_CONFIG") or "{}")
        task, cluster = config.get("task") or {}, config.get("cluster") or {}
    except (ValueError, AttributeError):
        return ""
    kind, index = task.get("type"), int(task.get("index", 0) or 0)
    if kind is None or kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cluster):
        return ""
    return f"-{kind}-{index}"


@contextlib.contextmanager
def folder_lock(folder, option="--out-dir", error=ValueError):
    """Hold the lock of the output folder ``folder`` (created) while the block runs.

    A second run writing the same folder at the same time is refused (``error``, one line)
    instead of mixing its checkpoints and results with the first's.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = acquire(folder / f".lock{_task_suffix()}", f"{option} {folder}", option, error)
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def file_lock(path, option="--out", error=ValueError):
    """Hold the lock of the output file ``path`` (``.NAME.lock`` beside it) while the block runs."""
    path = pathlib.Path(path)
    lock = acquire(path.with_name(f".{path.name}.lock"), f"{option} {path}", option, error)
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)
