"""Metrics: JSON lines (appended across resumes), stdout, and TensorBoard when installed."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)


def _jsonable(value):
    # JSON has no NaN/Inf; write them as strings so a diverged run stays parseable.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


class MetricsLogger:
    """Writes one JSON object per line to ``path``; a no-op on ranks that pass ``path=None``."""

    def __init__(self, path: Optional[str], tensorboard_dir: Optional[str] = None, run_dir: Optional[str] = None):
        self.path = Path(path) if path else None
        self._file = None
        self._tb = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", buffering=1)
        tb_dir = tensorboard_dir or (str(Path(run_dir) / "tensorboard") if run_dir else None)
        if tb_dir and self.path is not None:
            self._tb = _tensorboard_writer(tb_dir)

    def log(self, record: dict, stdout: Optional[str] = None) -> None:
        """Append ``record`` (which must hold ``iteration``) and optionally print a line."""
        if self._file is not None:
            line = {k: _jsonable(v) for k, v in record.items()}
            line["time"] = round(time.time(), 3)
            self._file.write(json.dumps(line) + "\n")
        if self._tb is not None:
            step = record["iteration"]
            for key, value in _scalars(record):
                if key != "iteration":
                    self._tb.add_scalar(key, value, step)
        if stdout is not None:
            print(stdout, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _scalars(record: dict, prefix: str = ""):
    """(key, number) pairs of a record, nested dicts as ``outer/inner`` (e.g. the merge candidates)."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


def _tensorboard_writer(directory: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: JSON lines only
        return None
    return SummaryWriter(log_dir=directory)


def roll_back(path: str | Path, keep_through: Optional[int]) -> int:
    """Before a run appends to an existing metrics file: move the records of the iterations after
    ``keep_through`` (every record when None: a fresh start) to ``<stem>.rolled_back.jsonl`` beside
    it, so the file never holds two records of one iteration from two runs. Returns how many moved."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, moved = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            iteration = json.loads(line).get("iteration")
        except ValueError:  # a line cut by a kill: it belongs to no complete record
            moved.append(line)
            continue
        stays = keep_through is not None and (iteration is None or iteration <= keep_through)
        (kept if stays else moved).append(line)
    if moved:
        with path.with_name(path.stem + ".rolled_back.jsonl").open("a") as f:
            f.write(json.dumps({"event": "rolled_back", "kept_through_iteration": keep_through,
                                "records": len(moved), "time": round(time.time(), 3)}) + "\n")
            f.write("\n".join(moved) + "\n")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return len(moved)


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics file, in order."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
