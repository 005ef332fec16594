"""Say a fatal error exactly once per launch, whichever rank meets it first.

Under torchrun every rank usually fails the same way (config validation is deterministic), and
as soon as one rank exits torchrun kills the others. If each rank printed, the user would read
the error N times; if only rank 0 printed, the error vanished whenever another rank happened to
exit first (torchrun then reports nothing but ``exitcode: 2``).

The rule here: rank 0 prints at once and exits. Any other rank waits a grace period before
printing, during which torchrun kills it when rank 0 exits with the same error. A rank that
fails alone (a file missing on one node, an error only one stage meets) outlives the grace
period and prints its own message, so no failure goes unreported. Waiting is invisible in the
common case, because rank 0 ends the launch as soon as it has spoken.
"""

from __future__ import annotations

import os
import sys
import time

GRACE_ENV = "PRETRAIN_ERROR_GRACE_S"
DEFAULT_GRACE_S = 30.0


def report_fatal(message: str, details: str | None = None) -> None:
    """Print ``details`` (e.g. a traceback) and ``error: message`` to stderr once per launch
    (see the module docstring).

    Returns after printing; the caller then exits non-zero. On ranks other than 0 this first
    waits up to ``$PRETRAIN_ERROR_GRACE_S`` seconds (30) for the launcher to end the process.
    """
    rank = int(os.environ.get("RANK", 0))
    if rank != 0 and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        sys.stdout.flush()
        time.sleep(float(os.environ.get(GRACE_ENV, DEFAULT_GRACE_S)))
        message = f"{message} (reported by rank {rank})"
    if details:
        print(details.rstrip(), file=sys.stderr)
    print(f"error: {message}", file=sys.stderr, flush=True)
