"""Which saved checkpoints to delete: ``keep_last`` / ``keep_every`` for ``<save>/iter_*`` and
``<save>/merged/iter_*`` (and ``<save>/merged_candidates/<name>/iter_*``, as merged/).

A checkpoint is kept when it is one of the newest ``keep_last``, when its iteration is a
multiple of ``keep_every``, when it is the newest complete one, or when something still needs
it (the in-training merge with ``merge.storage: disk`` reads the checkpoints of its window, and
loss-spike recovery the last ``recovery.merge.window``). Called only after a new checkpoint has been
published, so a deletion never leaves a run without the checkpoint it would resume from.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Iterable, Optional

from megatron_merge.selection import saved_iterations as saved_checkpoints
from pretrain.config import RunConfig
from pretrain.merging import CANDIDATES_DIR, MERGED_DIR

logger = logging.getLogger(__name__)


def saved_iterations(root: str | Path) -> list[int]:
    """Iterations of the published ``iter_N`` directories under ``root``, oldest first."""
    return sorted(saved_checkpoints(root)) if Path(root).is_dir() else []


def iterations_to_delete(iterations: Iterable[int], keep_last: Optional[int], keep_every: Optional[int],
                         protected: Iterable[int] = ()) -> list[int]:
    """The iterations the retention rule drops (none when neither rule is set)."""
    iterations = sorted(set(iterations))
    if not iterations or (keep_last is None and keep_every is None):
        return []
    keep = set(protected) | {iterations[-1]}
    if keep_last:
        keep.update(iterations[-keep_last:])
    if keep_every:
        keep.update(i for i in iterations if i % keep_every == 0)
    return [i for i in iterations if i not in keep]


def prune(root: str | Path, keep_last: Optional[int], keep_every: Optional[int],
          protected: Iterable[int] = ()) -> list[int]:
    """Delete the ``iter_N`` directories of ``root`` the rule drops; returns their iterations."""
    saved = saved_checkpoints(root) if Path(root).is_dir() else {}
    doomed = iterations_to_delete(saved, keep_last, keep_every, protected)
    for iteration in doomed:
        path = saved[iteration]
        # Rename first: a kill during the delete leaves a name nothing mistakes for a checkpoint.
        trash = path.with_name(path.name + ".deleting")
        path.rename(trash)
        shutil.rmtree(trash)
    if doomed:
        logger.info("retention: deleted %s under %s", ", ".join(f"iter_{i:07d}" for i in doomed), root)
    return doomed


def still_needed(cfg: RunConfig, merger, iteration: int, saved: Iterable[int]) -> set[int]:
    """Checkpoints the run may still read: the disk merge's window, and what loss-spike
    recovery could roll back to (the ``recovery.merge.window`` saved before a spike that might have
    begun up to ``recovery.patience + 1`` iterations ago, and everything after)."""
    needed: set[int] = set()
    if merger is not None and merger.spec.storage == "disk" and merger.spec.method != "ema":
        needed.update(merger.iterations)
    r = cfg.recovery
    if r.enabled:
        horizon = iteration - r.patience - 1
        saved = sorted(saved)
        needed.update(i for i in saved if i >= horizon)
        needed.update([i for i in saved if i < horizon][-r.merge.window:])
    return needed


def apply_retention(cfg: RunConfig, merger, iteration: int) -> None:
    """Rank 0, right after the checkpoint of ``iteration`` was published: ``checkpoint.keep_*``
    for ``<save>/iter_*``."""
    c = cfg.checkpoint
    root = Path(c.save)
    if c.keep_last is not None or c.keep_every is not None:
        prune(root, c.keep_last, c.keep_every, still_needed(cfg, merger, iteration, saved_iterations(root)))


def apply_merged_retention(cfg: RunConfig) -> None:
    """Rank 0, after a save's merged checkpoints were written: ``merge.keep_*`` for
    ``<save>/merged/`` and each ``<save>/merged_candidates/<name>/``."""
    m = cfg.merge
    if m.keep_last is None and m.keep_every is None:
        return
    save = Path(cfg.checkpoint.save)
    for root in (save / MERGED_DIR, *sorted((save / CANDIDATES_DIR).glob("*/"))):
        prune(root, m.keep_last, m.keep_every)
