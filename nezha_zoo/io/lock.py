"""One writer per destination: an exclusive lock beside it, held for a whole save or conversion.

``nezha-zoo convert`` and every backend's ``save_pretrained`` write a directory ``DST`` by staging
files in ``.DST.<pid>.<random>.staging`` beside it and renaming them into place.  Two writers into one
``DST`` would mix their files, and a killed writer leaves its staging directory behind.  So a
writer first takes :func:`destination_lock`: ``flock`` on ``.DST.lock`` beside ``DST`` (the kernel
frees it when the holder dies, even by ``kill -9``).  A second writer fails at once with
:class:`DestinationLockedError` naming the holder's pid.  The holder of the lock is the only live
writer, so staging directories of ``DST`` left by dead runs are removed as the lock is taken
(:func:`remove_stale_staging`), and the lock file itself is removed when it is released.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator

from nezha_zoo.io.errors import DestinationError, DestinationLockedError

try:  # POSIX; elsewhere writers are not serialised (no flock), everything else works the same
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["destination_lock", "remove_stale_staging", "staging_prefix", "lock_path"]

# lock file -> [owning thread, depth, fd]: a writer that takes the lock again (convert, then the
# staged write inside it) nests instead of failing against itself.
_HELD: dict[str, list[int]] = {}
_HELD_GUARD = threading.Lock()


def _parent_and_name(target: str | os.PathLike) -> tuple[str, str]:
    full = os.path.abspath(os.fspath(target))
    return os.path.dirname(full), os.path.basename(full)


def lock_path(target: str | os.PathLike) -> str:
    """The lock file of ``target``: ``.NAME.lock`` beside it (str)."""
    parent, name = _parent_and_name(target)
    return os.path.join(parent, f".{name}.lock")


def staging_prefix(target: str | os.PathLike) -> str:
    """The name prefix of ``target``'s staging directories: ``.NAME.<pid>.`` (this process's pid)."""
    return f".{_parent_and_name(target)[1]}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    try:  # a zombie (dead, not yet reaped) is dead for our purpose
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_staging(target: str | os.PathLike) -> list[str]:
    """Remove the staging directories of ``target`` left by dead runs; returns their names.

    Call it only while holding :func:`destination_lock` on ``target``: then no live writer of this
    version stages into ``target``.  A directory whose name records a live pid is kept all the same;
    ones without a pid (from versions before the lock) and nested ones are removed.
    """
    parent, name = _parent_and_name(target)
    # .NAME.<pid>.<8 chars>.staging, repeated for nested staging; the pid is absent in older names
    pattern = re.compile(rf"^\.+{re.escape(name)}((\.\d+)?\.[a-z0-9_]{{8}}\.staging)+$")
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry)
        if not m:
            continue
        owner = re.match(rf"^\.+{re.escape(name)}\.(\d+)\.", entry)
        if owner and (int(owner.group(1)) == os.getpid() or _pid_alive(int(owner.group(1)))):
            continue  # ours (an outer write in progress) or a live process's
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        removed.append(entry)
    return removed


def _holder(path: str) -> str:
    try:
        with open(path, encoding="ascii") as fh:
            pid = fh.read().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


def _check_writable(directory: str) -> None:
    """Create and remove a file in ``directory``: the only test that holds for root and ACLs alike."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".nezha-zoo-probe.", dir=directory)
    except OSError as e:
        raise DestinationError(f"{directory!r} is not writable ({e.strerror or e})") from e
    os.close(fd)
    os.unlink(probe)


def _acquire(path: str, target: str) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            where = os.path.dirname(path)
            raise DestinationError(f"cannot write {target!r}: {where!r} is not writable ({e.strerror})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DestinationError(f"cannot lock {path!r} ({e.strerror})") from e
            raise DestinationLockedError(
                f"{target!r} is being written by another process ({_holder(path)}, lock {path!r}); "
                f"wait for it to finish"
            ) from None
        # The holder before us may have removed the file between our open and our flock: then we
        # hold a lock on a file nobody else can find, so take the one at ``path`` instead.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            return fd
        os.close(fd)


@contextlib.contextmanager
def destination_lock(target: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive write lock of ``target`` (a directory, existing or not) for the block.

    Taking it creates ``target``'s parent if needed, checks that the parent and an existing
    ``target`` are writable, and removes staging directories of dead runs.  The same thread may take
    it again (nested writes); the lock file is removed when the outermost block ends.

    Raises:
        DestinationLockedError: another live process (or thread) holds the lock; raised at once.
        DestinationError: the parent or ``target`` is not writable.
    """
    target = os.fspath(target)
    parent, _ = _parent_and_name(target)
    path = lock_path(target)
    key = os.path.realpath(path) if os.path.isdir(parent) else path
    me = threading.get_ident()
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            if held[0] != me:
                raise DestinationLockedError(f"{target!r} is being written by another thread of this process")
            held[1] += 1
    if held is not None:
        try:
            yield
        finally:
            with _HELD_GUARD:
                held[1] -= 1
        return
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise DestinationError(f"cannot create {parent!r} ({e.strerror})") from e
    fd = _acquire(path, target) if fcntl is not None else -1
    key = os.path.realpath(path)
    with _HELD_GUARD:
        _HELD[key] = [me, 1, fd]
    try:
        if os.path.isdir(target):
            _check_writable(target)
        remove_stale_staging(target)
        yield
    finally:
        with _HELD_GUARD:
            del _HELD[key]
        if fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # before unlocking: a waiter that opened it retries (see _acquire)
            os.close(fd)
