"""
State that is nobody else's: the gateway's and the device's state directories are 0700 and
every file in them 0600, whatever the umask. SQLite gives a database's -wal and -shm the
database file's mode, so creating that file 0600 first covers them. State left looser by an
older version or by hand is tightened at start, with a log line naming it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.logger import Logger

log = Logger()

DIR_MODE = 0o700
FILE_MODE = 0o600
SQLITE_SIDECARS = ("-wal", "-shm", "-journal")


def tighten(path, mode: int) -> None:
    """Give ``path`` exactly ``mode``; say so if it was readable or writable by others."""
    old = stat.S_IMODE(os.lstat(path).st_mode)
    if old != mode:
        os.chmod(path, mode)
        if old & ~mode:
            log.warn("{path} was mode {old}, open to other users: now {new}",
                     path=str(path), old=f"{old:04o}", new=f"{mode:04o}")


def ensure_dir(path) -> Path:
    """Create a state directory 0700, or tighten it and the regular files in it."""
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    tighten(path, DIR_MODE)
    for child in path.iterdir():
        if child.is_file() and not child.is_symlink():
            tighten(child, FILE_MODE)
    return path


def write(path, data: bytes) -> None:
    """
    Write a file readable by its owner only, atomically and durably: a reader sees old or
    new, and once this returns the new content survives a crash (the file and then its
    directory are fsync'd). Callers rely on the order of their writes surviving too
    (enrol.rotate_secret writes the old secret before the new one; a renewal writes
    renewal.pem before replacing device.key and device.pem). Run as root (``sudo pushctl
    keys ...`` for a gateway running as its own user), the file keeps the owner of the file
    it replaces, or of its directory: else the daemon could not read it.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # a tmp file left behind by a crash may be looser
        if os.geteuid() == 0:
            owner = os.stat(path if path.exists() else path.parent)
            os.fchown(fd, owner.st_uid, owner.st_gid)
        with os.fdopen(fd, "wb") as f:
            fd = None
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        if fd is not None:
            os.close(fd)
    os.replace(tmp, path)
    sync_dir(path.parent)


def sync_dir(path) -> None:
    """fsync a directory: a rename or unlink in it is durable only after this."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def sqlite_file(path) -> None:
    """Before SQLite opens ``path``: create it 0600 (its -wal and -shm inherit that), or tighten all three."""
    path = Path(path)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT, FILE_MODE))
    tighten(path, FILE_MODE)
    for suffix in SQLITE_SIDECARS:
        side = path.with_name(path.name + suffix)
        if side.exists():
            tighten(side, FILE_MODE)
