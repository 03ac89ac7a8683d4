"""File input and output: '-' for stdin/stdout, atomic writes (temp file + rename), clean errors.

Every write to stdout goes through `write_stdout`, which checks that all bytes arrived: a full device or an I/O
error ends the command with exit 2 and one line. A reader that closes the pipe early (`| head`) has not received
the whole output, so that is a failure too: one line on stderr and exit 141 (128 + SIGPIPE, what a shell reports
for a process killed by SIGPIPE, and what `set -o pipefail` passes on). A closed stdin or stdout is a one-line
error (exit 2) when a command needs it.

Temporary files and folders are named `.<target>.<pid>.<random>.tmp`, so a later write to the same target removes
the ones that a killed process (`kill -9`) left behind, and never those of a process still running.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from loramem.errors import LoramemError
from loramem.log import log

# The largest text or JSON input read whole (documents, datasets, QA files): a bound, so a device or an endless
# pipe is refused instead of filling memory.
MAX_INPUT_BYTES = 4 * 1024**3
EXIT_BROKEN_PIPE = 141


class StdoutClosed(LoramemError):
    """The reader of stdout went away before the whole output was written."""

    exit_code = EXIT_BROKEN_PIPE


def _os_error(exc: OSError, path: str | Path) -> LoramemError:
    reason = exc.strerror or str(exc)
    return LoramemError(f"cannot access {path}: {reason.lower()}")


def check_working_directory() -> None:
    """Refuse to start in a deleted working directory, before torch is imported: its native libraries then fail
    to load with a message that does not name the cause."""
    try:
        os.getcwd()
    except FileNotFoundError as exc:
        raise LoramemError("the working directory no longer exists (it was deleted); cd to an existing folder") from exc


def stdout_is_terminal() -> bool:
    """Whether stdout is an interactive terminal (a closed stdout is not)."""
    return sys.stdout is not None and sys.stdout.isatty()


def open_input(path: str | Path, what: str) -> tuple[IO[bytes], str, int | None]:
    """A binary stream of a path (regular file or pipe) or of stdin for '-': (stream, name for messages, size
    when known). Devices and other special files are refused, so `/dev/zero` is not read forever."""
    if str(path) == "-":
        if sys.stdin is None:
            raise LoramemError(f"expected a {what} on stdin, but stdin is closed")
        if sys.stdin.isatty():
            raise LoramemError(f"expected a {what} on stdin, but stdin is a terminal")
        return sys.stdin.buffer, "stdin", None
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        raise LoramemError(f"{what} not found: {path}") from exc
    except OSError as exc:
        raise _os_error(exc, path) from exc
    noun = what if what.endswith("file") else f"{what} file"  # "questions file", not "questions file file"
    if stat.S_ISDIR(info.st_mode):
        raise LoramemError(f"{path} is a directory, expected a {noun}")
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
        raise LoramemError(f"{path} is not a regular file or a pipe; expected a {noun}")
    try:
        return open(path, "rb"), str(path), info.st_size if stat.S_ISREG(info.st_mode) else None
    except OSError as exc:
        raise _os_error(exc, path) from exc


# How long a read from a pipe waits before Python looks at signals again (`read_upto`).
SIGNAL_CHECK_SECONDS = 0.1
PIPE_CHUNK = 64 * 1024 * 1024


def read_upto(stream: IO[bytes], n: int) -> bytes:
    """Up to n bytes of a stream (fewer only at its end), in pieces, so a short pipe is not over-allocated.

    A signal that another thread of the process took (torch's, a tokenizer's) does not wake a read() blocked in the
    main thread, so Ctrl-C or SIGTERM would wait for the writer: the main thread waits in select() a moment at a
    time instead, and Python runs the signal's handler between waits."""
    try:
        fd: int | None = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's BytesIO): nothing blocks
        fd = None
    read = getattr(stream, "read1", stream.read)  # one read of what is there, nothing left in a buffer
    parts, left = [], n
    while left > 0:
        while fd is not None and not select.select([fd], [], [], SIGNAL_CHECK_SECONDS)[0]:
            pass
        piece = read(min(left, PIPE_CHUNK))
        if not piece:
            break
        parts.append(piece)
        left -= len(piece)
    return b"".join(parts)


def read_input_bytes(path: str | Path, what: str = "file", limit: int = MAX_INPUT_BYTES) -> tuple[bytes, str]:
    """All bytes of a path, or of stdin for '-', at most `limit`; returns (data, name for messages)."""
    stream, source, size = open_input(path, what)
    if size is not None and size > limit:
        stream.close()
        raise LoramemError(f"{source} is {size} bytes, more than loramem reads as a {what} ({limit})")
    try:
        data = stream.read(limit + 1) if size is not None else read_upto(stream, limit + 1)
    except OSError as exc:
        raise _os_error(exc, source) from exc
    finally:
        if source != "stdin":
            stream.close()
    if len(data) > limit:
        raise LoramemError(f"{source} is more than {limit} bytes, more than loramem reads as a {what}")
    if not data and source == "stdin":
        raise LoramemError(f"stdin is empty; expected a {what}")
    return data, source


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


def text_lines(text: str) -> list[str]:
    """`text` split at `\\n` only (a trailing `\\r` removed), the way JSONL and line files are written."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True


def remove_stale_temporaries(target: Path) -> None:
    """Remove the temporary files and folders of `target` that killed loramem processes left behind."""
    parent = target.parent if str(target.parent) else Path(".")
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[^./]+\.(?:tmp|old)")
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match[1])):
            continue
        if entry.name.endswith(".old") and not target.exists():
            continue  # killed between the two renames of a replace: this holds the only copy
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def check_output_path(
    path: str | Path,
    force: bool = False,
    what: str = "output",
    *,
    inputs: Sequence[str | Path | None] = (),
    ours: Callable[[Path], bool] | None = None,
) -> None:
    """Refuse an output path that cannot be written, before any long work starts: a missing or unwritable folder,
    a directory in the way, an output that is (or holds) one of the command's `inputs`, or an existing target
    unless `force`, and even then one that loramem did not make (`ours` tells: `adapters.validate.is_adapter_folder`,
    `kv.cache.is_cache_file`): --force never deletes anything else."""
    if str(path) == "-":
        return
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise LoramemError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LoramemError(f"cannot write {path}: folder {parent} is not writable")
    where = target.resolve()
    for source in inputs:
        if source is not None and str(source) != "-" and Path(source).resolve().is_relative_to(where):
            held = "is" if Path(source).resolve() == where else "holds"
            raise LoramemError(f"output {path} {held} the input {source}; write the output elsewhere")
    if target.exists() and not force:
        raise LoramemError(f"{path} already exists; use --force to replace it")
    if target.exists() and ours is not None and not ours(target):
        raise LoramemError(
            f"{path} is not {'an' if what[0] in 'aeiou' else 'a'} {what} loramem wrote; --force replaces only those "
            "(move it away or choose another output)"
        )
    if target.is_dir() and what not in ("directory", "adapter"):
        raise LoramemError(f"cannot write {path}: it is a directory")


@contextmanager
def locked_folder(folder: Path, what: str, *, committed: str, wait: bool) -> Iterator[bool]:
    """Create `folder` if needed and hold an exclusive lock on it, so two writers (library adds, eval runs) never
    overwrite each other's files: `wait` for the other to finish, else refuse; yields whether this process created
    the folder. `what` names the folder in messages ("library").

    On failure the folder is removed again, under the lock, only if this process created it and no writer has
    committed the file `committed` in it; a process that was waiting on a folder removed meanwhile starts over.
    """
    if not folder.parent.is_dir():
        raise LoramemError(f"cannot create {what} {folder}: folder {folder.parent} does not exist")
    while True:
        created = False
        try:
            folder.mkdir()
            created = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise LoramemError(f"cannot create {what} {folder}: {(exc.strerror or str(exc)).lower()}") from exc
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue  # removed between mkdir and open by a writer that failed: start over
        except OSError as exc:
            raise LoramemError(f"{what} {folder} is not a folder loramem can open") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise LoramemError(
                        f"{what} {folder} is being written by another loramem process; wait for it to finish"
                    ) from None
                log(f"{what} {folder} is being changed by another loramem process; waiting for it to finish")
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(folder))
            except FileNotFoundError:
                same = False
            if not same:
                continue  # the folder was removed (and maybe made again) while this process waited
            try:
                yield created
            except BaseException:
                if created and not (folder / committed).exists():
                    shutil.rmtree(folder, ignore_errors=True)
                raise
            return
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so no half-written file remains."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise LoramemError(f"cannot write {path}: folder {parent} does not exist")
    remove_stale_temporaries(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=parent)
    except OSError as exc:
        raise _os_error(exc, path) from exc
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the user's usual mode
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


def flush_stdout() -> None:
    """Flush what was printed to stdout, so that a full disk or a closed pipe is reported as the command ends. A
    stdout closed from the start (`>&-`) holds nothing: a command that writes there refuses it (`write_stdout`),
    and one whose output went to a file succeeds."""
    if sys.stdout is not None:
        sys.stdout.flush()


def write_stdout(data: bytes | str) -> None:
    """Write all of `data` to stdout or fail with one line: exit 141 when the reader closed the pipe, 2 otherwise."""
    out = sys.stdout
    if out is None:
        raise LoramemError("stdout is closed; nothing can be written there")
    payload = data if isinstance(data, bytes) else data.encode(out.encoding or "utf-8", out.errors or "strict")
    try:
        out.flush()  # text printed through sys.stdout before goes first
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):  # a stdout replaced in-process (tests, notebooks): no descriptor
        fd = None
    try:
        if fd is None:
            if hasattr(out, "buffer"):
                out.buffer.write(payload)
            else:
                out.write(payload.decode(out.encoding or "utf-8"))
            out.flush()
            return
        view = memoryview(payload)
        while view:
            written = os.write(fd, view)
            if written <= 0:
                raise OSError(errno.EIO, "short write")
            view = view[written:]
    except BrokenPipeError as exc:
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd if fd is not None else 1)  # nothing more reaches the reader
        raise StdoutClosed("stdout was closed before the whole output was written (broken pipe)") from exc
    except OSError as exc:
        raise LoramemError(f"cannot write to stdout: {(exc.strerror or str(exc)).lower()}") from exc


class CheckedStdout:
    """A text stream for rich's Console whose writes go through `write_stdout`."""

    encoding = "utf-8"

    def write(self, text: str) -> int:
        write_stdout(text)
        return len(text)

    def flush(self) -> None:
        return None

    def isatty(self) -> bool:
        return stdout_is_terminal()

    def fileno(self) -> int:
        if sys.stdout is None:
            raise OSError(errno.EBADF, "stdout is closed")
        return sys.stdout.fileno()


def write_output(path: str | Path | None, data: bytes, what: str = "artifact") -> str:
    """Write to a path atomically, or stream to stdout for '-' or when stdout is a pipe."""
    if path is None or str(path) == "-":
        if path is None and stdout_is_terminal():
            raise LoramemError(f"refusing to write a binary {what} to the terminal; give -o FILE or pipe it")
        write_stdout(data)
        return "stdout"
    atomic_write_bytes(path, data)
    return str(path)


@contextmanager
def atomic_directory(
    path: str | Path, force: bool = False, ours: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """Build a directory (an adapter) under a temporary name, then rename it into place as a whole (`force`: in
    place of a folder that `ours` says loramem wrote, never of anything else)."""
    target = Path(path)
    check_output_path(path, force, "adapter", ours=ours)  # the library API's callers too
    parent = target.parent if str(target.parent) else Path(".")
    remove_stale_temporaries(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the folder follows the user's umask like mkdir
    except OSError as exc:
        raise _os_error(exc, path) from exc
    try:
        yield tmp
        _follow_umask(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".old", dir=parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as exc:
        raise _os_error(exc, path) from exc
    except Exception as exc:
        reason = _serializing_error(exc)
        if reason is None:
            raise
        raise LoramemError(f"cannot write {path}: {reason}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _serializing_error(exc: Exception) -> str | None:
    """The reason of a failed write that safetensors reports as its own error (not an OSError): "Error while
    serializing: I/O error: No space left on device (os error 28)" -> "no space left on device"."""
    from safetensors import SafetensorError

    match = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", str(exc))
    return match[1].lower() if isinstance(exc, SafetensorError) and match else None


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _follow_umask(folder: Path) -> None:
    """Give files that libraries wrote 0600 (safetensors, PEFT) the mode the user's umask gives new files."""
    mode = 0o666 & ~_umask()
    for entry in folder.rglob("*"):
        if entry.is_file() and not entry.is_symlink():
            entry.chmod(mode)
        elif entry.is_dir() and not entry.is_symlink():
            entry.chmod(0o777 & ~_umask())
