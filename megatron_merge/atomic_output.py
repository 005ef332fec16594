"""Atomic output directories: written aside, renamed into place only when complete.

A merge writes into a hidden sibling of the output (same file system, so the final rename is
atomic). If anything fails, the sibling is removed and the output path is left as it was. A
merge that is killed cannot remove it: the sibling's name records the host and process id
(``.OUT.merging-<host>-<pid>-<random>``), and the next merge to the same OUT removes siblings
whose process no longer runs on this host (and logs each).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Iterator, Sequence

from megatron_merge.errors import MergeError

logger = logging.getLogger(__name__)


def check_output_path(out: str | Path, inputs: Sequence[str | Path], force: bool) -> Path:
    """Refuse an output that exists (unless ``force``) or that overlaps an input."""
    out = Path(out)
    for parent in out.absolute().parents:  # the nearest existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise MergeError(f"{parent}: a file, not a directory: --out {out} cannot be created under it")
            break
    resolved_out = out.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if resolved_out == source or source in resolved_out.parents or resolved_out in source.parents:
            raise MergeError(f"{out}: output overlaps input {source}; inputs are never modified")
    if out.exists() or out.is_symlink():
        if not force:
            raise MergeError(f"{out}: already exists; pass --force to replace it")
        if not out.is_dir() or out.is_symlink():
            raise MergeError(f"{out}: exists and is not a directory; not replacing it")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out``; on success move it to ``out``.

    An existing ``out`` (allowed by :func:`check_output_path` with ``force``) is replaced only
    after the new directory is complete.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    tmp = out.parent / f".{out.name}.merging-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.replaced-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s", out)


_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
_SIBLING = re.compile(r"^\.(?P<out>.+)\.(?:merging|replaced)-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]+$")


def remove_stale_siblings(out: Path) -> list[Path]:
    """Remove ``out``'s temporary siblings left by merges that no longer run; return them.

    Only siblings named by a process on this host are judged (on a shared file system another
    node's live merge looks the same); one whose process still runs is left alone.
    """
    removed = []
    for sibling in sorted(out.parent.glob(f".{out.name}.*")):
        match = _SIBLING.match(sibling.name)
        if match is None or match["out"] != out.name or match["host"] != _HOST:
            continue
        if _process_alive(int(match["pid"])):
            continue
        shutil.rmtree(sibling, ignore_errors=True)
        removed.append(sibling)
        logger.info("removed %s: temporary output of an earlier merge (pid %s) that did not finish",
                    sibling, match["pid"])
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
