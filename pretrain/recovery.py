"""Automatic loss-spike recovery: roll back to the PMA of the last good checkpoints.

The paper recovered a diverged MoE run by re-initialising from the average of the 3
checkpoints saved before the collapse. Here that happens inside the run:

1. :class:`SpikeDetector` watches every iteration's loss and gradient norm against robust
   running baselines (medians of recent healthy values);
2. all ranks decide together: one all-reduce of a small flag per iteration, so no rank ever
   acts alone (only last-stage ranks see the loss; every rank sees the gradient norm);
3. on a spike every rank merges its own partition of the last ``recovery.merge.window`` checkpoints
   saved before the spike began, restores the rest of the training state (scheduler, RNG,
   in-training merge state; optimizer state if ``recovery.optimizer: checkpoint``) from the newest of
   them, optionally skips the data that preceded the spike, and training goes on.
"""

from __future__ import annotations

import collections
import logging
import math
import statistics
from typing import Optional

import torch
import torch.distributed as dist

from megatron_merge.selection import saved_iterations
from pretrain import checkpoint as ckpt
from pretrain.config import RunConfig
from pretrain.merging import install_merged_checkpoints, leave_out_hint, reset_optimizer_state
from pretrain.platform import collective_device

logger = logging.getLogger(__name__)


class RecoveryError(RuntimeError):
    """A spike that cannot be recovered from (no good checkpoint, or retries exhausted)."""


class SpikeDetector:
    """Flags iterations whose loss or gradient norm leaves its running baseline.

    Only healthy values enter the baselines, so a spike never raises the bar it is measured against.
    """

    def __init__(self, loss_factor: float, grad_norm_factor: Optional[float], window: int):
        self.loss_factor = loss_factor
        self.grad_norm_factor = grad_norm_factor
        self.losses = collections.deque(maxlen=window)
        self.grad_norms = collections.deque(maxlen=window)

    def anomaly(self, loss: Optional[float], grad_norm: Optional[float]) -> Optional[str]:
        """Why this iteration is anomalous, or None (and then its values join the baselines)."""
        for name, value in (("loss", loss), ("grad_norm", grad_norm)):
            if value is not None and not math.isfinite(value):
                return f"non-finite {name} ({value})"
        reason = None
        if loss is not None and self._full(self.losses):
            baseline = statistics.median(self.losses)
            if loss > self.loss_factor * baseline:
                reason = f"loss {loss:.4g} > {self.loss_factor} x median {baseline:.4g}"
        if reason is None and grad_norm is not None and self.grad_norm_factor and self._full(self.grad_norms):
            baseline = statistics.median(self.grad_norms)
            if grad_norm > self.grad_norm_factor * baseline:
                reason = f"grad norm {grad_norm:.4g} > {self.grad_norm_factor} x median {baseline:.4g}"
        if reason is None:
            if loss is not None:
                self.losses.append(loss)
            if grad_norm is not None:
                self.grad_norms.append(grad_norm)
        return reason

    @staticmethod
    def _full(values: collections.deque) -> bool:
        return len(values) == values.maxlen


class LossSpikeRecovery:
    """Detection and roll-back for one run (every rank holds one)."""

    def __init__(self, cfg: RunConfig):
        r = cfg.recovery
        self.cfg = cfg
        self.detector = SpikeDetector(r.loss_factor, r.grad_norm_factor, r.baseline_window)
        self.consecutive = 0
        self.spike_start: Optional[int] = None
        self.retries = 0
        self.reason: Optional[str] = None

    def spike_detected(self, iteration: int, loss: Optional[float], grad_norm: Optional[float]) -> bool:
        """Feed one iteration; True on every rank when the run must roll back (collective)."""
        reason = self.detector.anomaly(loss, grad_norm)
        if reason is None:
            self.consecutive, self.spike_start = 0, None
        else:
            self.consecutive += 1
            self.spike_start = self.spike_start or iteration
            self.reason = reason
        immediate = reason is not None and reason.startswith("non-finite")
        local = immediate or self.consecutive >= self.cfg.recovery.patience
        # [decide, -(first spiking iteration)]: one MAX all-reduce gives "any rank" and the
        # earliest start seen by any rank (so no checkpoint saved during the spike counts as good).
        flag = torch.tensor([1.0 if local else 0.0, -float(self.spike_start) if local else -math.inf],
                            dtype=torch.float64, device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag[0] > 0:
            self.spike_start = int(-flag[1])
            return True
        return False

    def recover(self, model, optimizer, scheduler, merger, state: ckpt.TrainState) -> tuple[ckpt.TrainState, dict]:
        """Roll every rank back to the PMA of the good checkpoints before the spike (collective)."""
        r, c = self.cfg.recovery, self.cfg.checkpoint
        self.retries += 1
        if self.retries > r.max_retries:
            raise RecoveryError(f"iteration {state.iteration}: loss spike ({self.reason}) after "
                                f"{r.max_retries} recoveries (recovery.max_retries); stopping")
        saved = saved_iterations(c.save)
        # The loss (and gradient norm) of iteration i is measured on the weights saved at i - 1,
        # so the first anomalous iteration s condemns the checkpoint of s - 1 too.
        good = sorted(it for it in saved if it < self.spike_start - 1)[-r.merge.window:]
        if not good:
            raise RecoveryError(f"iteration {state.iteration}: loss spike ({self.reason}) but no checkpoint in "
                                f"{c.save} was saved before it began (iteration {self.spike_start})")
        directories = [saved[it] for it in good]
        keep_optimizer = r.optimizer == "checkpoint"
        restored = ckpt.load_checkpoint(self.cfg, model, optimizer, scheduler, directories[-1],
                                        load_optimizer=keep_optimizer, load_rng=True, merger=merger)
        weights = install_merged_checkpoints(
            model, optimizer, directories, r.merge,
            leave_out_hint("a smaller recovery.merge.window keeps only the newest checkpoints before the spike"))
        if not keep_optimizer:
            reset_optimizer_state(optimizer)
        scheduler.num_steps = 0
        scheduler.step(increment=restored.iteration)
        consumed = state.consumed_samples if r.skip_data else restored.consumed_samples
        record = {
            "iteration": state.iteration, "event": "recovery", "reason": self.reason,
            "spike_started_at": self.spike_start, "restored_iteration": restored.iteration,
            "merged_iterations": good, "weights": weights, "method": r.merge.method if len(good) > 1 else "newest",
            "optimizer": r.optimizer, "skipped_samples": consumed - restored.consumed_samples,
            "retry": self.retries,
        }
        if not dist.is_initialized() or dist.get_rank() == 0:  # every rank rolls back; say it once
            logger.warning("loss spike at iteration %d (%s): rolled back to iteration %d with the %s of checkpoints %s",
                           state.iteration, self.reason, restored.iteration, record["method"], good)
        self.consecutive, self.spike_start = 0, None
        return ckpt.TrainState(iteration=restored.iteration, consumed_samples=consumed), record
