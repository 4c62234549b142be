"""User-facing errors.

Every error a user can cause (bad file, bad manifest row, unknown model or tap,
checkpoint that does not fit) is a :class:`MedfeatError`. Its message is one
line that names the item and the reason; the CLI prints it without a traceback
and exits non-zero. Subclasses also derive from the matching builtin so library
callers can catch ``ValueError`` / ``KeyError`` as usual.
"""


class MedfeatError(Exception):
    """Base class of all user-facing errors."""


class InputError(MedfeatError, ValueError):
    """Bad input data: unreadable or truncated file, NaN volume, wrong dimensions, singular affine."""


class ManifestError(MedfeatError, ValueError):
    """A missing manifest, or a bad row in one."""


class UnknownNameError(MedfeatError, KeyError):
    """An unknown model, tap, variant or format name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsError(MedfeatError, ValueError):
    """A checkpoint that cannot be read or does not fit the architecture."""


class RuntimeUnavailableError(MedfeatError, RuntimeError):
    """A runtime, execution provider or operator that this machine cannot run."""


class StoreError(MedfeatError, ValueError):
    """A feature store that is missing, locked, or inconsistent."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``exc``'s message on one line (whitespace runs folded), at most ``limit`` characters;
    the exception's type name when the message is empty."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:limit]


def os_error_reason(exc: OSError) -> str:
    """A short reason for a failed write or read: a full disk and a read-only file system by
    name (the usual causes), else the system's message."""
    import errno
    import os

    names = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
             errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}
    return names.get(exc.errno or 0) or (os.strerror(exc.errno) if exc.errno else one_line(exc, 120))
