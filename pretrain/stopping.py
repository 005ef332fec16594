"""When a run stops early, cleanly: on a signal, at a time budget or at an iteration budget.

Megatron-LM's ``--exit-signal-handler``, ``--exit-duration-in-mins`` and ``--exit-interval``:
a cluster sends SIGTERM before a job's time limit (SLURM) or a preemption, a user presses
Ctrl-C. The handler only records the signal; at the end of each iteration every rank asks
:meth:`StopConditions.reason` (one small all-reduce), so all ranks agree to stop at the same
iteration, save a checkpoint and exit 0. A second signal kills the process at once (the
handler restores the default action before returning).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from pretrain.config import TrainConfig
from pretrain.platform import collective_device

logger = logging.getLogger(__name__)


class StopConditions:
    """The early-stop rules of one run; :meth:`close` puts the previous signal handlers back."""

    def __init__(self, train: TrainConfig, started: Optional[float] = None):
        self.exit_interval = train.exit_interval
        self.duration_s = train.exit_duration_mins * 60 if train.exit_duration_mins is not None else None
        self.started = time.monotonic() if started is None else started
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}
        if train.exit_signal_handler and threading.current_thread() is threading.main_thread():
            for name in train.exit_signals:
                number = signal.Signals[name]
                self._previous[number] = signal.signal(number, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signum, signal.SIG_DFL)  # a second one is not deferred: it kills at once
        logger.warning("received %s: stopping at the end of this iteration (send it again to abort now)",
                       signal.Signals(signum).name)

    @property
    def collective(self) -> bool:
        """Whether :meth:`reason` needs every rank (signals and clocks differ between ranks)."""
        return bool(self._previous) or self.duration_s is not None

    def reason(self, iteration: int) -> Optional[str]:
        """Why the run stops after ``iteration``, or None to go on. Collective when
        :attr:`collective`: every rank calls it at every iteration and gets the same answer."""
        if self.collective:
            timed_out = self.duration_s is not None and time.monotonic() - self.started >= self.duration_s
            flags = torch.tensor([self.received or 0, int(timed_out)], dtype=torch.int64, device=collective_device())
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            received, timed_out = int(flags[0]), bool(flags[1])
            if received:
                return signal.Signals(received).name
            if timed_out:
                return f"train.exit_duration_mins={self.duration_s / 60:g} reached"
        if self.exit_interval and iteration % self.exit_interval == 0:
            return f"train.exit_interval={self.exit_interval} reached"
        return None

    def close(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
