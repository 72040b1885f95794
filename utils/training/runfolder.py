"""The checkpoint folder of a training run (``{saved_path}/{project_name}/``), prepared before the first step:
checked writable (a probe file) and locked for the run, so that a second run on the same folder stops at once
instead of overwriting the first one's checkpoints, ``last`` pointer and logs.

The lock is ``.train.lock`` in the folder: one JSON line with the pid, host and start time of its run, created
atomically (a hard link of a complete file) and removed when the run ends. A lock of a process that no longer
runs on this host is stale and taken over (logged).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

from utils.weights.loading import _pid_alive

logger = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"


def check_writable(folder: Union[str, Path]) -> Path:
    """Create ``folder`` if needed and write and remove a probe file in it.

    Raises:
        OSError: one line naming the folder and the reason (a file in the way, no permission, disk full).
    """
    folder = Path(folder)
    probe = folder / f".write-probe.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        raise OSError(exc.errno, f"cannot write checkpoints to {folder}: {exc.strerror or exc} "
                                 "(choose another --saved_path)") from None
    return folder


class RunFolderLock:
    """``with RunFolderLock(folder):`` checks ``folder`` writable and holds its lock for the block.

    Raises (on entry):
        OSError: the folder cannot be written (see :func:`check_writable`).
        ValueError: another live run holds the lock (named: pid, host, start time).
    """

    def __init__(self, folder: Union[str, Path]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False
        self.created = False

    def __enter__(self) -> "RunFolderLock":
        self.created = not self.folder.exists()
        check_writable(self.folder)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            if self._create(record):
                self.held = True
                return self
            holder = self._holder()
            if holder is not None and self._alive(holder):
                raise ValueError(f"{self.path}: another training run (pid {holder.get('pid')} on "
                                 f"{holder.get('host')}, started {holder.get('started')}) uses {self.folder}; "
                                 "wait for it to end or choose another --saved_path (delete the lock file only "
                                 "if that run is gone)")
            logger.warning("%s: taking over the lock of a run that ended without releasing it (%s)", self.path,
                           holder if holder is not None else "unreadable")
            self.path.unlink(missing_ok=True)
        raise ValueError(f"{self.path}: could not take the lock of {self.folder}")

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            holder = self._holder()
            if holder is not None and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False
        if self.created:  # made for a run that saved nothing (it stopped before its first save): remove it
            try:
                if not any(self.folder.iterdir()):
                    self.folder.rmdir()
            except OSError:
                pass

    def _create(self, record: Dict[str, Any]) -> bool:
        """Write the lock atomically; False when a lock is there."""
        tmp = self.folder / f"{LOCK_NAME}.{os.getpid()}"
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _holder(self) -> Optional[Dict[str, Any]]:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    @staticmethod
    def _alive(holder: Dict[str, Any]) -> bool:
        """A lock of another host counts as alive (its process cannot be checked from here)."""
        if holder.get("host") != socket.gethostname():
            return True
        pid = holder.get("pid")
        return isinstance(pid, int) and _pid_alive(pid)
