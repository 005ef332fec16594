"""Where a run starts: auto-resume from ``checkpoint.save``, and never overwriting a run silently.

Megatron-LM users run with ``--load`` equal to ``--save``, so a restart (after a crash, a
preemption, a SLURM requeue) continues. Here ``checkpoint.load`` defaults to that: when it is
unset and ``checkpoint.save`` holds a complete checkpoint, the run continues from the newest one
(also over ``checkpoint.init_from``, which starts the first attempt only). Starting anywhere else
while ``checkpoint.save`` holds checkpoints past the start would replace them, and needs
``checkpoint.overwrite: true``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pretrain.checkpoint import CheckpointError, is_complete, iteration_dir, read_tracker
from pretrain.config import RunConfig
from pretrain.retention import saved_iterations

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartPoint:
    """What the run loads before its first step."""

    load: Optional[str]  # a checkpoint (or run directory) to resume, None to start fresh or from init_from
    automatic: bool  # True when ``load`` is checkpoint.save, found by auto-resume


def newest_complete_iteration(root: str | Path) -> Optional[int]:
    """The newest complete checkpoint in a run directory: the tracker's, or a newer published
    ``iter_N`` (a kill between a checkpoint's rename and the tracker's update leaves one)."""
    tracker = read_tracker(root)
    for iteration in reversed(saved_iterations(root)):
        if tracker is not None and iteration <= tracker:
            break
        if is_complete(iteration_dir(root, iteration)):
            return iteration
    return tracker


def choose_start(cfg: RunConfig) -> StartPoint:
    """Explicit ``checkpoint.load``, else auto-resume from ``checkpoint.save``, else a fresh start."""
    c = cfg.checkpoint
    if c.load is not None:
        return StartPoint(c.load, automatic=False)
    if c.save is None or c.overwrite:
        return StartPoint(None, automatic=False)
    newest = newest_complete_iteration(c.save)
    if newest is None:
        return StartPoint(None, automatic=False)
    return StartPoint(str(iteration_dir(c.save, newest)), automatic=True)


def refuse_overwrite(cfg: RunConfig, start_iteration: int) -> None:
    """Fail before the first step when saving from ``start_iteration`` on would replace a
    checkpoint already in ``checkpoint.save`` (unless ``checkpoint.overwrite``)."""
    c = cfg.checkpoint
    if c.save is None or c.overwrite:
        return
    later = [i for i in saved_iterations(c.save) if i > start_iteration]
    if later:
        raise CheckpointError(
            f"checkpoint.save: {c.save} already holds checkpoints after iteration {start_iteration} "
            f"(iter_{later[0]:07d}{' ...' if len(later) > 1 else ''}); this run would replace them. Leave "
            "checkpoint.load unset to continue the saved run, save elsewhere, or set checkpoint.overwrite=true"
        )

