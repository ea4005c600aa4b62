"""A filesystem that fills up, for fault tests: a small tmpfs to put a data directory on, and a
ballast file that takes all but a few bytes of it.

    with mount_small_tmpfs(base / "data", 16 * MiB) as data:   # MountNotPermitted: skip
        ... start the service with data_dir = data ...
        ballast = Ballast()
        ballast.fill(data, leave_bytes=0)    # writes now fail with DiskFull
        ...
        ballast.release()                    # and succeed again

Unmount only after every process with a file open there has exited (an owner's map keeps the
filesystem busy); a busy filesystem is detached lazily rather than left mounted.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MiB = 2**20
CHUNK = MiB
"""Bytes the ballast writes at a time."""
BALLAST_NAME = ".ballast"
"""The ballast file's name in the directory it fills."""


class MountNotPermitted(OSError):
    """This process may not mount a filesystem (not root, or no CAP_SYS_ADMIN in a
    container); the message says why, for a test's skip reason."""


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged process may still write on the filesystem of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@contextmanager
def mount_small_tmpfs(path: str | os.PathLike[str], size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted on ``path`` (made if missing) for the block."""
    where = Path(path)
    where.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        raise MountNotPermitted(errno.EPERM, "mounting a tmpfs needs root and mount(8)")
    done = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                           str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        raise MountNotPermitted(errno.EPERM, f"mount -t tmpfs failed: {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


class Ballast:
    """A file that fills a filesystem until only ``leave_bytes`` are free; ``release()``
    deletes it and gives the space back. Filling again tops it up."""

    def __init__(self) -> None:
        self.path: Path | None = None

    @property
    def size(self) -> int:
        """Bytes the ballast holds now."""
        return self.path.stat().st_size if self.path is not None else 0

    def fill(self, directory: str | os.PathLike[str], leave_bytes: int = 0) -> int:
        """Write zeros to a file in ``directory`` until at most ``leave_bytes`` are free there
        (0: until the filesystem refuses more); the bytes the ballast holds."""
        path = Path(directory) / BALLAST_NAME
        if self.path is not None and self.path != path:
            raise ValueError(f"this ballast fills {self.path.parent}, not {directory}")
        self.path = path
        zeros = bytes(CHUNK)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while (want := free_bytes(directory) - leave_bytes) > 0:
                block = os.statvfs(directory).f_frsize
                try:
                    # Written, not a hole (which takes no blocks); whole blocks, so each write
                    # takes space even when the file's last block had room.
                    os.write(fd, zeros[:min(CHUNK, max(want, block))])
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    break
            os.fsync(fd)
        finally:
            os.close(fd)
        return self.size

    def release(self) -> None:
        """Delete the ballast file (nothing if there is none)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def __enter__(self) -> Ballast:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
