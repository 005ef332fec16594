"""Asynchronous checkpoint saving (``checkpoint.async_save``, Megatron-LM's ``--async-save``).

megatron-core's ``dist_checkpointing.save(..., async_sharded_save=True)`` copies each rank's
tensors to host memory and returns an ``AsyncRequest``; a forked writer process writes the
files while training goes on. The request's finalize functions (megatron-core's
``metadata.json``, then our rename into place and tracker update) run on every rank once
every rank's writer has finished, so the tracker only ever names a complete checkpoint.

Every rank must make the same calls in the same order: :meth:`AsyncCheckpointSaver.poll` at
each iteration (a one-integer all-reduce while a save is pending, nothing otherwise) and
:meth:`AsyncCheckpointSaver.wait` before the next save and at the end of the run.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest

logger = logging.getLogger(__name__)


class AsyncCheckpointSaver:
    """The queue of this run's checkpoint saves still being written."""

    def __init__(self):
        self._queue = AsyncCallsQueue(persistent=False)
        self.waited_s = 0.0  # time training spent blocked on unfinished writes

    def schedule(self, request: AsyncRequest, on_complete: Callable[[], None]) -> None:
        """Start writing ``request``; ``on_complete`` runs on every rank after every rank is done."""
        request.add_finalize_fn(on_complete)
        self._queue.schedule_async_request(request)

    @property
    def pending(self) -> int:
        return self._queue.get_num_unfinalized_calls()

    def poll(self) -> None:
        """Publish the saves whose files are all written (collective while any is pending)."""
        if self.pending:
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until every pending save is written and published (collective)."""
        if self.pending:
            began = time.perf_counter()
            self._queue.maybe_finalize_async_calls(blocking=True)
            self.waited_s += time.perf_counter() - began

    def close(self) -> None:
        self.wait()
        self._queue.close()
