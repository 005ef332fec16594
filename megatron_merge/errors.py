"""The exception types the merger (and the safe checkpoint reader) raise for bad input."""

from __future__ import annotations

import errno


class MergeError(Exception):
    """A merge cannot proceed. The message names the file, the key and what was expected.

    The CLI prints it as ``error: <message>`` and exits non-zero; nothing is left at the
    output path.
    """


class FailedOnAnotherRank(MergeError):
    """A merge spread over torchrun ranks failed; rank 0 reports why, this rank says nothing."""


class UnsafeCheckpointError(MergeError):
    """A pickled part of a checkpoint names a class outside the allowlist (see
    :mod:`megatron_merge.safe_load`): ``path`` is the file, ``key`` the item holding the object
    (None when unknown) and ``qualname`` its class. Nothing was built from it."""

    def __init__(self, message: str, *, path=None, key: str | None = None, qualname: str = "?"):
        super().__init__(message)
        self.path, self.key, self.qualname = path, key, qualname


_OS_ERROR_ADVICE = {
    errno.ENOSPC: "no space left on the device: free some space or write --out elsewhere",
    errno.EDQUOT: "disk quota exceeded: free some space or write --out elsewhere",
    errno.EFBIG: "file too large for this file system or process limit: write --out elsewhere",
    errno.EACCES: "permission denied: fix the permissions or choose another path",
    errno.EPERM: "operation not permitted: fix the permissions or choose another path",
    errno.EROFS: "read-only file system: write --out elsewhere",
    errno.ENOTDIR: "a parent of this path is a file, not a directory: choose another path",
    errno.EIO: "input/output error: the disk or the file is damaged",
}


def os_error_message(err: OSError, writing: object = None) -> str:
    """A one-line message for an OS error: the path, what went wrong and what to do about it.

    ``writing`` names the output being written, for errors that carry no file name (a failed
    ``write`` on an open file)."""
    if err.filename is not None:
        path = err.filename
    elif writing is not None:
        path = f"{writing} (while writing it)"
    else:
        path = "?"
    advice = _OS_ERROR_ADVICE.get(err.errno, err.strerror or str(err))
    return f"{path}: {advice} ({err.strerror or type(err).__name__}); nothing was written to the output"
