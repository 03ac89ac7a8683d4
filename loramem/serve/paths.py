"""Names a request gives, confined to the server's root: relative, no `..`, and, once symlinks are resolved, still
inside the root. Nothing outside the root is opened or listed on a request's behalf."""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from loramem.errors import LoramemError


class Refused(LoramemError):
    """A request refused with an HTTP status (and the `ask` exit code a client maps it to)."""

    def __init__(self, status: int, message: str, exit_code: int = 2, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.exit_code = exit_code
        self.kind = kind


def confined(root: Path, name: str, what: str) -> Path:
    """The file or folder `name` (relative to `root`, which is resolved) names, refused unless it stays inside."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise Refused(400, f"{what}: give a name relative to the server's root")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or "\\" in name:
        raise Refused(403, f"{what} {name!r}: an absolute path; name it relative to the server's root")
    if ".." in posix.parts:
        raise Refused(403, f"{what} {name!r}: '..' leaves the server's root")
    path = root / posix
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        raise Refused(404, f"{what} {name!r}: not found under the server's root") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise Refused(400, f"{what} {name!r}: {type(exc).__name__}") from None
    if not resolved.is_relative_to(root):
        raise Refused(403, f"{what} {name!r}: a symlink that leaves the server's root")
    return resolved
