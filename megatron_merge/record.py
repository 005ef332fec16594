"""``merge.json``: what a merged checkpoint was made from, written beside it.

Every writer -- the offline torch_dist merge, the per-rank-file formats and the in-training merge
-- starts its record with :func:`record_header` (the fields tools read: method, weights, inputs)
and adds what is particular to it.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Optional, Sequence

MERGE_RECORD_FILE = "merge.json"


def record_header(*, tool: str, out: Path, format: str, method: str, alpha: Optional[float],
                  weights: Sequence[float], inputs: Sequence[dict]) -> dict:
    """The fields every ``merge.json`` has. ``inputs``: one dict per merged checkpoint, oldest
    first, with at least ``path`` (None when it is not on disk), ``iteration`` and ``weight``."""
    from megatron_merge import __version__

    return {
        "tool": tool,
        "version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "output": str(Path(out).resolve()),
        "format": format,
        "method": method,
        "alpha": alpha,
        "weights": list(weights),
        "inputs": list(inputs),
    }


def input_entries(refs, weights: Sequence[float]) -> list[dict]:
    """``inputs`` of a record from checkpoint references (``.path``, ``.iteration``)."""
    return [{"path": str(ref.path.resolve()), "iteration": ref.iteration, "weight": w}
            for ref, w in zip(refs, weights)]


def read_record(directory: Path) -> dict:
    """The ``merge.json`` beside a merged checkpoint, or ``{}`` for a checkpoint without one."""
    path = Path(directory) / MERGE_RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def input_iterations(record: dict) -> list:
    """The iterations a record says were merged, oldest first."""
    return [entry.get("iteration") for entry in record.get("inputs", [])]
