"""One error tree for edgepack.

Every error carries the process exit code the CLI uses (README, "Exit codes") and a hint that tells
the user what to do next. Foreign errors are wrapped with ``raise ... from e`` so the cause is
kept for ``EDGEPACK_DEBUG=1``.
"""

from __future__ import annotations

# Exit codes, as documented in the README ("Exit codes") and `edgepack --help`.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_FETCH = 4
EXIT_BUILD = 5
EXIT_INTEGRITY = 6
EXIT_RUNTIME = 7


class EdgepackError(Exception):
    """Base of every error edgepack raises on purpose."""

    exit_code: int = EXIT_INTERNAL

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        """The one-paragraph message the CLI prints."""
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class UsageError(EdgepackError):
    """The command line asked for something that makes no sense."""

    exit_code = EXIT_USAGE


class ConfigError(EdgepackError):
    """A configuration or device profile is missing or invalid."""

    exit_code = EXIT_CONFIG


class ProfileError(ConfigError):
    """A device profile is unknown or does not match the schema."""


class FetchError(EdgepackError):
    """A model or update could not be fetched (network, hub, repository)."""

    exit_code = EXIT_FETCH


class BuildError(EdgepackError):
    """Conversion, quantization, validation or planning failed (incl. nothing fits)."""

    exit_code = EXIT_BUILD


class ValidationFailed(BuildError):
    """A converted model loaded and ran but missed a check against its original (agreement,
    KL, cosine, a golden prompt). ``checks`` names the failed checks, ``summary`` their figures.

    Only this failure lets ``build`` step up to a higher precision; conversion, disk and
    network errors stay plain BuildError/FetchError.
    """

    def __init__(self, message: str, *, checks: tuple[str, ...], summary: str,
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.checks = checks
        self.summary = summary


class IntegrityError(EdgepackError):
    """A file does not match its manifest digest, or metadata is not trusted."""

    exit_code = EXIT_INTEGRITY


class RuntimeHealthError(EdgepackError):
    """The runtime could not start, load, or pass its health check."""

    exit_code = EXIT_RUNTIME
