"""The error root of lbuild: one base class, a few categories, exit codes in one table.

Every error carries a one-line ``message``, an optional ``hint``, and where it comes from a
Dockerfile, the ``file`` and ``line``.  The CLI prints ``str(err)`` and exits with
``err.exit_code``; nothing else decides exit codes.

This module imports nothing from lbuild.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUILD_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class LbuildError(Exception):
    """Base of every error lbuild reports to a user."""

    exit_code: int = EXIT_BUILD_FAILED

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        file: str | None = None,
        line: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.file = file
        self.line = line

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line}: " if self.line is not None else f"{self.file}: "
        text = f"{where}{self.message}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return text


class InvalidInput(LbuildError):
    """Bad usage or bad input: a Dockerfile error, a missing source, a bad flag."""

    exit_code = EXIT_BAD_INPUT


class NotFound(InvalidInput):
    """Something named by the user does not exist (file, stage, image, build context)."""


class Unsupported(InvalidInput):
    """A valid request lbuild does not implement yet."""


class AlreadyExists(LbuildError):
    """An object is already present; callers usually treat this as success."""


class DigestMismatch(LbuildError):
    """Bytes did not hash to the digest they were expected to have."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: digest mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class CorruptBlob(DigestMismatch):
    """A blob in the content store no longer matches its name (found as it left the store).

    Whoever raises it has removed the blob, so the records that need it are misses: a build
    that meets it builds again (once), never outputs it."""

    def __init__(self, digest: str, actual: str) -> None:
        super().__init__(f"blob {digest} in the content store is corrupt", digest, actual)
        self.digest = digest


class DiskFull(LbuildError):
    """The filesystem under the cache home (or an output) is full; partial files are gone."""

    exit_code = EXIT_BUILD_FAILED


def disk_full(e: OSError, home: object, doing: str) -> DiskFull:
    """The one line for ENOSPC/EDQUOT met ``doing`` something with the cache ``home``."""
    where = f" writing {e.filename}" if e.filename else ""
    return DiskFull(
        f"no space left on device{where} (cache home {home}) {doing}",
        hint="free some space, or run `lbuild cache prune`",
    )


class StepFailed(LbuildError):
    """A build step ran and failed (for example a RUN command exited nonzero)."""

    exit_code = EXIT_BUILD_FAILED


class StoreError(LbuildError):
    """The cache store cannot be used as it is (schema version, corruption, locking)."""

    exit_code = EXIT_BUILD_FAILED


class Interrupted(LbuildError):
    """The build was interrupted by a signal."""

    exit_code = EXIT_INTERRUPTED
