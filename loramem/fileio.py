"""File input and output: '-' for stdin/stdout, atomic writes (temp file + rename), clean errors."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loramem.errors import LoramemError


def _os_error(exc: OSError, path: str | Path) -> LoramemError:
    reason = exc.strerror or str(exc)
    return LoramemError(f"cannot access {path}: {reason.lower()}")


def read_input_bytes(path: str | Path, what: str = "file") -> tuple[bytes, str]:
    """All bytes of a path, or of stdin for '-'; returns (data, name for messages)."""
    if str(path) == "-":
        if sys.stdin.isatty():
            raise LoramemError(f"expected a {what} on stdin, but stdin is a terminal")
        data = sys.stdin.buffer.read()
        if not data:
            raise LoramemError(f"stdin is empty; expected a {what}")
        return data, "stdin"
    p = Path(path)
    if not p.exists():
        raise LoramemError(f"{what} not found: {path}")
    if p.is_dir():
        raise LoramemError(f"{path} is a directory, expected a {what} file")
    try:
        return p.read_bytes(), str(path)
    except OSError as exc:
        raise _os_error(exc, path) from exc


def read_text(path: str | Path, what: str = "document") -> str:
    """A UTF-8 text input (path or '-'); empty or binary input is refused."""
    data, source = read_input_bytes(path, what)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LoramemError(f"{source} is not UTF-8 text") from exc
    if "\x00" in text:
        raise LoramemError(f"{source} is not text (it contains NUL bytes)")
    if not text.strip():
        raise LoramemError(f"{what} {source} is empty")
    return text


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so no half-written file remains."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise LoramemError(f"cannot write {path}: folder {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise _os_error(exc, path) from exc
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the user's usual mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        raise _os_error(exc, path) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_output(path: str | Path | None, data: bytes, what: str = "artifact") -> str:
    """Write to a path atomically, or stream to stdout for '-' or when stdout is a pipe."""
    if path is None or str(path) == "-":
        if path is None and sys.stdout.isatty():
            raise LoramemError(f"refusing to write a binary {what} to the terminal; give -o FILE or pipe it")
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return "stdout"
    atomic_write_bytes(path, data)
    return str(path)


@contextmanager
def atomic_directory(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name, then rename it into place as a whole."""
    target = Path(path)
    if target.exists() and not force:
        raise LoramemError(f"{path} already exists; use --force to replace it")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise LoramemError(f"cannot write {path}: folder {parent} does not exist")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise _os_error(exc, path) from exc
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
