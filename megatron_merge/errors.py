"""The exception types the merger (and the safe checkpoint reader) raise for bad input."""

from __future__ import annotations


class MergeError(Exception):
    """A merge cannot proceed. The message names the file, the key and what was expected.

    The CLI prints it as ``error: <message>`` and exits non-zero; nothing is left at the
    output path.
    """


class UnsafeCheckpointError(MergeError):
    """A pickled part of a checkpoint names a class outside the allowlist (see
    :mod:`megatron_merge.safe_load`): ``path`` is the file, ``key`` the item holding the object
    (None when unknown) and ``qualname`` its class. Nothing was built from it."""

    def __init__(self, message: str, *, path=None, key: str | None = None, qualname: str = "?"):
        super().__init__(message)
        self.path, self.key, self.qualname = path, key, qualname
