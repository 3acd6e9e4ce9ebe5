"""One writer per output folder: `train`, `eval` and `run` hold OUT/.soarbench.lock while they write there.

The lock is an flock on that file, so the kernel drops it when its holder dies, however it dies; the file also
holds who took it (pid, host, command, start time, launch), so a refusal names the live process and a lock left
by a killed one is taken over with a line saying so.

A multi-process launch (accelerate, torchrun) is one writer: its main process (RANK 0) takes the lock; the others
only check that no other launch holds it (a file naming a live process of another launch).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from soarbench.errors import UserError

LOCK_FILE = ".soarbench.lock"


def _launch() -> str | None:
    """What the processes of one distributed launch share and two live launches cannot: the rendezvous address."""
    if "MASTER_PORT" not in os.environ:
        return None
    return f"{os.environ.get('MASTER_ADDR', '')}:{os.environ['MASTER_PORT']}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _holder(text: str) -> dict | None:
    try:
        info = json.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def _describe(info: dict) -> str:
    return (f"pid {info['pid']} on {info.get('host', '?')} (`{info.get('command', '?')}`, since "
            f"{info.get('started', '?')})")


def _refusal(folder: Path, info: dict | None) -> UserError:
    who = _describe(info) if info else "another process"
    return UserError(f"{folder}: in use by {who}: one command at a time writes a folder; wait for it to finish or "
                     f"stop it, or choose another --out")


class FolderLock:
    """Held from acquire() to release(); release() removes the lock file (and the folder, if this lock made it
    and nothing else was written there)."""

    def __init__(self, folder: str | os.PathLike, command: str | None = None,
                 log: Callable[[str], None] | None = None):
        self.folder, self.path = Path(folder), Path(folder) / LOCK_FILE
        self.command = command or " ".join(["soarbench", *sys.argv[1:]])
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.fd: int | None = None
        self.made_folder = False

    def acquire(self) -> "FolderLock":
        if int(os.environ.get("RANK", "0")) != 0:
            self._check_other_launch()
            return self
        self.made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _refusal(self.folder, self._read_holder()) from None
            # A releaser may have unlinked the file between our open and our flock: lock the file that is there.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        previous = _holder(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
        if previous is not None:
            self.log(f"note: {self.folder}: taking over the lock of {_describe(previous)}, which is no longer "
                     f"running")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "launch": _launch()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return self

    def _read_holder(self) -> dict | None:
        for _ in range(20):  # the holder writes its line right after taking the lock
            try:
                info = _holder(self.path.read_text(encoding="utf-8", errors="replace"))
            except FileNotFoundError:
                return None
            if info is not None:
                return info
            time.sleep(0.05)
        return None

    def _check_other_launch(self) -> None:
        """A non-main process of a launch: refuse a folder a live process of another launch holds."""
        if not self.path.is_file():
            return
        info = self._read_holder()
        if info is None or info.get("host") != socket.gethostname() or not _alive(info["pid"]):
            return
        if info.get("launch") is None or info.get("launch") != _launch():
            raise _refusal(self.folder, info)

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # before the close: nobody can lock the old file once it is unlinked
        os.close(self.fd)
        self.fd = None
        if self.made_folder:
            try:
                self.folder.rmdir()  # only if empty: the command failed before writing anything
            except OSError:
                pass

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
