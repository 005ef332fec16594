"""PMA-init: start a new phase of training (continued training, annealing, SFT) from merged weights.

``checkpoint.init_from`` names either a checkpoint to start from as it is (typically a merged
one, from ``megatron-merge`` or ``<save>/merged/``), or, with ``checkpoint.init_merge.enabled``, a
run directory whose checkpoints (``checkpoint.init_merge``: method, window, every, iterations,
weights) every rank merges on the fly, each its own partition.
Unlike ``checkpoint.load`` (resume the same run), this starts a new phase: a fresh optimizer
(or the newest input's state, ``init_optimizer: checkpoint``) and, unless
``init_keep_iteration``, iteration 0 and the start of the data.
"""

from __future__ import annotations

import logging
from pathlib import Path

from megatron_merge.record import input_iterations, read_record
from megatron_merge.selection import select_checkpoints
from pretrain import checkpoint as ckpt
from pretrain.config import RunConfig
from pretrain.merging import install_merged_checkpoints, leave_out_hint, reset_optimizer_state

logger = logging.getLogger(__name__)


def initialize_from(cfg: RunConfig, model, optimizer, scheduler) -> tuple[ckpt.TrainState, dict]:
    """Load or merge ``checkpoint.init_from`` into the model; returns the start state and a metrics record."""
    c = cfg.checkpoint
    keep_optimizer = c.init_optimizer == "checkpoint"
    record = {"event": "init", "from": str(c.init_from), "optimizer": c.init_optimizer}
    selection = c.init_merge
    if not selection.enabled:
        directory, _ = ckpt.resolve_checkpoint(c.init_from)
        state = ckpt.load_checkpoint(cfg, model, optimizer, scheduler, directory,
                                     load_optimizer=keep_optimizer, load_rng=False)
        record.update(_described_by_merge_record(directory))
    else:
        chosen = [int(i) for i in selection.iterations] or None
        refs = select_checkpoints([c.init_from], last=None if chosen else selection.window,
                                  every=None if chosen else selection.every, iterations=chosen)
        directories = [ref.path for ref in refs]
        state = ckpt.load_checkpoint(cfg, model, optimizer, scheduler, directories[-1],
                                     load_optimizer=keep_optimizer, load_rng=False)
        weights = install_merged_checkpoints(
            model, optimizer, directories, selection,
            leave_out_hint("checkpoint.init_merge.iterations, or a smaller checkpoint.init_merge.window"))
        record.update(method=selection.method, iterations=[ref.iteration for ref in refs], weights=weights,
                      inputs=[str(d) for d in directories])
    if not keep_optimizer:
        reset_optimizer_state(optimizer)
    if not c.init_keep_iteration:
        state = ckpt.TrainState()
    scheduler.num_steps = 0
    scheduler.step(increment=state.iteration)
    record.update(iteration=state.iteration, consumed_samples=state.consumed_samples)
    logger.info("initialised from %s: %s", c.init_from,
                {k: v for k, v in record.items() if k in ("method", "iterations", "weights", "optimizer")})
    return state, record


def _described_by_merge_record(directory: Path) -> dict:
    """What a merged checkpoint's merge.json says about its inputs, if it has one."""
    record = read_record(directory)
    if not record:
        return {"method": None, "iterations": None, "weights": None}
    return {"method": record.get("method"), "weights": record.get("weights"),
            "iterations": input_iterations(record)}
