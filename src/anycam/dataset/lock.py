"""The writer's lock of a store: one ``explain_dataset`` writes an ``out=`` folder at a time.

The lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local file systems and on NFS
v3+), holding the writer's pid, host and process start time. A second writer finds it and is
refused, with the holder named. A lock whose process is gone is *stale* and is taken over, but
only where that can be known: on the same host, with the pid dead or reused by another process
(the start time differs, as in a container that restarts with the same pid). A lock from another
host is never broken automatically, since its process cannot be seen from here; the error says
how to remove it by hand.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

from .errors import StoreLockedError, StoreWriteError

LOCK = ".anycam-store.lock"

# Locks this process holds, so a stale lock left by an earlier process with our pid (a container
# restart) is told apart from one held by another thread of this process. The guard is held for a
# whole acquisition, so a thread never sees another's lock file before it is recorded here.
_HELD: set[str] = set()
_HELD_GUARD = threading.RLock()


def _process_start(pid: int) -> str | None:
    """Returns the start time of process ``pid`` (Linux: clock ticks since boot), or None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, start: str | None) -> bool:
    """True unless process ``pid`` of this host is known to be gone (or replaced by another)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


class StoreLock:
    """Holds ``root/.anycam-store.lock`` while a run writes the store; a context manager.

    Raises:
        StoreLockedError: another live writer holds the lock, or the lock's holder cannot be
            checked (another host, an unreadable lock file).
        StoreWriteError: the lock file cannot be created (a read-only folder, a full disk).
    """

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK
        self.held = False

    def __enter__(self) -> StoreLock:
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}
        with _HELD_GUARD:
            return self._acquire(mine)

    def _acquire(self, mine: dict[str, Any]) -> StoreLock:
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._break_if_stale(mine)
                continue
            except OSError as exc:
                raise StoreWriteError(
                    exc.errno, f"cannot create the store's lock {str(self.path)!r}: {exc.strerror or exc}"
                ) from exc
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(mine, handle)
            except OSError as exc:
                self.path.unlink(missing_ok=True)
                raise StoreWriteError(
                    exc.errno, f"cannot write the store's lock {str(self.path)!r}: {exc.strerror or exc}"
                ) from exc
            _HELD.add(str(self.path))
            self.held = True
            return self
        raise self._locked(self._holder(), "")

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            with _HELD_GUARD:
                _HELD.discard(str(self.path))
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _break_if_stale(self, mine: dict[str, Any]) -> None:
        """Removes the lock if its writer is known to be gone; raises StoreLockedError otherwise."""
        holder = self._holder()
        if holder is None:
            raise self._locked(None, "its content cannot be read")
        pid, host = holder.get("pid"), holder.get("host")
        if host != mine["host"] or not isinstance(pid, int):
            raise self._locked(holder, "it was taken on another host, whose processes cannot be checked from here")
        if pid == mine["pid"]:
            if str(self.path) in _HELD:
                raise self._locked(holder, "another explain_dataset call of this process is writing the store")
        elif _alive(pid, holder.get("start")):
            raise self._locked(holder, "that process is running")
        # Stale: its writer died without removing it (SIGKILL, power loss). Moved aside atomically
        # and compared, so that of two processes breaking it at once, the slower one cannot remove
        # the lock the faster one has just taken: it puts that one back and is refused.
        aside = self.path.with_name(f"{LOCK}.stale-{mine['pid']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            taken = json.loads(aside.read_text())
        except (OSError, ValueError):
            taken = None
        if taken != holder:
            try:
                os.link(aside, self.path)  # back, unless yet another writer holds it now
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            raise self._locked(taken if isinstance(taken, dict) else None, "it took the store just now")
        aside.unlink(missing_ok=True)

    def _locked(self, holder: dict[str, Any] | None, why: str) -> StoreLockedError:
        who = "an unknown writer" if holder is None else f"pid {holder.get('pid')} on host {holder.get('host')!r}"
        return StoreLockedError(
            f"the store at {str(self.path.parent)!r} is being written by {who}"
            + (f" ({why})" if why else "")
            + f"; two writers would lose each other's maps. Wait for that run to end, or pass another "
            f"out=. If no run is writing it (the writer was killed on another machine), delete the lock "
            f"file {str(self.path)!r} and run again."
        )
