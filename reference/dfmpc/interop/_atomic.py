"""Atomic file writes: write a temp file in the target directory, then ``os.replace``."""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def write_atomically(path: str | os.PathLike, write: Callable, overwrite: bool = False) -> None:
    """Call ``write(fileobj)`` on a temp file next to ``path``, then move it into place.

    Parameters
    ----------
    path : str or PathLike
        Destination; its directory must exist.
    write : callable
        Writes the whole content to the binary file object it is given.
    overwrite : bool
        Replace an existing file; otherwise an existing ``path`` is an error.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False (nothing is written).
    FileNotFoundError
        The destination directory does not exist.
    OSError
        The file cannot be created or moved into place (e.g. ``/proc``, no permission, disk full);
        the message names ``path``, never the temp file.

    Nothing is left behind if ``write`` raises: the temp file is removed and
    any existing file at ``path`` is untouched. The new file gets the permissions an ordinary
    ``open(path, "w")`` would give it (those of the file it replaces, else ``0o666`` minus the umask),
    not the owner-only mode of a temp file.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace it")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"directory {directory!r} does not exist")
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o666 & ~_umask()
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    except OSError as exc:
        raise _naming(exc, path) from exc
    try:
        try:
            os.chmod(tmp, mode)
            f = os.fdopen(fd, "wb")
        except OSError as exc:
            os.close(fd)
            raise _naming(exc, path) from exc
        with f:
            write(f)
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:
                raise _naming(exc, path) from exc
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise _naming(exc, path) from exc
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _naming(exc: OSError, path: str) -> OSError:
    """The same kind of OSError, naming the user's ``path`` instead of the temp file."""
    return type(exc)(f"cannot write {path!r}: {exc.strerror or exc}")


def _umask() -> int:
    mask = os.umask(0)      # the only portable way to read it is to set it ...
    os.umask(mask)          # ... and put it back
    return mask
