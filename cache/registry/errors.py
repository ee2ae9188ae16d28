"""The registry's own error: a failed pull or push (exit 1), naming the reference."""

from __future__ import annotations

from cache.errors import EXIT_BUILD_FAILED, LbuildError


class RegistryError(LbuildError):
    """A registry refused or failed a request, or its answer was not usable (exit 1)."""

    exit_code = EXIT_BUILD_FAILED

    def __init__(self, message: str, *, status: int | None = None, code: str = "",
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.code = code
