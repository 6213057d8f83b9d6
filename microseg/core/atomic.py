"""Atomic file writes: write to a temporary name beside the target, rename on success.

Nothing half-written is ever left under the final name; on failure the temporary file is
removed. A temporary is named ``.<target name>.<pid>@<host>.<random>.tmp<suffixes>``: if its
writer was killed outright (SIGKILL, power loss) the next write of the same target on the same
host removes it once that pid is no longer alive.

A target that cannot be written (a read-only folder, a file where a folder should be, a full
disk) is a ``MicrosegError`` naming the target, not a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from microseg.core.errors import MicrosegError

WRITE_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EFBIG,
        errno.EROFS,
        errno.EIO,
        errno.EACCES,
        errno.EPERM,
        errno.ENAMETOOLONG,
        errno.EISDIR,
        errno.ENOTDIR,
    }
)
"""errnos of a write that failed because of where or how much was written, not because of a bug."""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"


def _reason(err: OSError) -> str:
    return os.strerror(err.errno) if err.errno else " ".join(str(err).split())


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _temporary_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}@{_host()}."


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``target`` left by writers on this host that are no longer alive."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)@{re.escape(_host())}\.\w+\.tmp.*")
    removed = []
    for path in target.parent.glob(glob.escape(f".{target.name}.") + "*.tmp*"):
        match = pattern.fullmatch(path.name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def make_folder(folder: str | os.PathLike) -> Path:
    """``mkdir -p folder``; MicrosegError naming the folder (or the file in its way) if impossible."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            raise MicrosegError(f"cannot create folder {folder}: {existing} is a file, not a folder") from None
        raise MicrosegError(
            f"cannot create folder {folder}: {existing} does not accept new entries ({_reason(err)})"
        ) from None
    return folder


def require_writable(target: str | os.PathLike) -> None:
    """MicrosegError naming ``target`` unless a file can be created where it goes; nothing is left behind.

    For commands that work long before they write (prepare reads every volume first): the
    nearest existing folder on the way to ``target`` must be a folder that accepts a new file.
    """
    target = Path(target)
    if target.is_dir():
        raise MicrosegError(f"cannot write {target}: it is a folder")
    folder = next(p for p in target.parents if p.exists())
    if not folder.is_dir():
        raise MicrosegError(f"cannot write {target}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=_temporary_prefix(target), suffix=".tmp", dir=folder)
    except OSError as err:
        raise MicrosegError(f"cannot write {target}: {folder} does not accept new files ({_reason(err)})") from None
    os.close(fd)
    os.unlink(probe)


WRITE_MARGIN_BYTES = 16 * 2**20
"""Room kept free beyond a write's own bytes (library caches and metadata flushed on close)."""


def require_free_space(target: str | os.PathLike, n_bytes: int) -> None:
    """MicrosegError naming ``target`` unless its disk has ``n_bytes`` + WRITE_MARGIN_BYTES available.

    For writers that cannot fail cleanly on a full disk: HDF5 (2.0) crashes the process when it
    closes a file whose write failed with ENOSPC, so the cache checks before each case it adds.
    """
    target = Path(target)
    folder = next(p for p in (target.parent, *target.parents) if p.is_dir())
    free = shutil.disk_usage(folder).free
    if free < n_bytes + WRITE_MARGIN_BYTES:
        raise MicrosegError(
            f"cannot write {target}: No space left on device ({free / 2**20:.1f} MiB free, "
            f"{(n_bytes + WRITE_MARGIN_BYTES) / 2**20:.1f} MiB needed for the next part)"
        )


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it to `target` if the block succeeds.

    `suffix` defaults to the target's own suffixes (so `.nii.gz` writers still see `.nii.gz`).
    An OSError of the block that is about the write (an errno of WRITE_ERRNOS, on the temporary
    or on no named file) becomes a MicrosegError naming `target`.
    """
    target = Path(target)
    make_folder(target.parent)
    if suffix is None:
        suffix = "".join(target.suffixes)
    remove_stale_temporaries(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(target), suffix=".tmp" + suffix, dir=target.parent)
    except OSError as err:
        raise MicrosegError(f"cannot write {target}: {_reason(err)}") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        if err.errno in WRITE_ERRNOS and err.filename in (None, tmp, str(target)):
            raise MicrosegError(f"cannot write {target}: {_reason(err)}") from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _sibling_folder(target: Path) -> Path:
    """A new empty temporary folder beside `target` (named as our temporaries are), after removing
    stale ones of `target`."""
    make_folder(target.parent)
    remove_stale_temporaries(target)
    try:
        folder = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), suffix=".tmp", dir=target.parent))
    except OSError as err:
        raise MicrosegError(f"cannot write {target}: {_reason(err)}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder the mode a plain mkdir would
    return folder


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder beside `target`; if the block succeeds it replaces `target` whole.

    Files of an earlier `target` that the block did not write are gone afterwards, and a failed
    block leaves `target` as it was. The earlier folder is renamed aside (``<temporary>.old``)
    before the new one takes its name, then removed; a writer killed in between leaves
    temporaries that the next write of `target` removes (`remove_stale_temporaries`).
    """
    target = Path(target)
    tmp = _sibling_folder(target)
    try:
        yield tmp
        aside = tmp.with_name(tmp.name + ".old")
        if target.exists():
            os.replace(target, aside)
        os.replace(tmp, target)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_files_into(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder beside the folder `target`; if the block succeeds, its files move into
    `target` (created if needed; other files there stay). A failed block leaves `target` as it was:
    a batch of outputs appears whole or not at all."""
    target = Path(target)
    tmp = _sibling_folder(target)
    try:
        yield tmp
        make_folder(target)
        for path in sorted(tmp.iterdir()):
            os.replace(path, target / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(target: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """`target` becomes a file holding `source`'s bytes, atomically: a hard link where the file
    system allows one (no second write), else a copy. A later atomic write of `source` renames a
    new file over it, so `target` keeps what it has."""
    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
