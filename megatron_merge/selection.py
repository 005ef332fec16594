"""Which checkpoints to merge: explicit ``iter_*`` directories, or a pick from a run directory.

DeepSpeed's ``global_step*`` tag directories and save directories are handled the same way.

A Megatron run directory holds one ``iter_0000100``-style directory per saved iteration (and a
``latest_checkpointed_iteration.txt``). Checkpoints are always returned oldest first, the order
:func:`megatron_merge.weights.merge_weights` expects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from megatron_merge.errors import MergeError

# Megatron's iter_0000100 and DeepSpeed's global_step100 (its default tag).
_ITERATION_DIR = re.compile(r"^(?:iter_|global_step)(\d+)$")


@dataclass(frozen=True)
class CheckpointRef:
    """One input checkpoint directory and its training iteration (None if unknown)."""

    path: Path
    iteration: int | None = None


def iteration_from_path(path: str | Path) -> int | None:
    """``.../iter_0000100`` or ``.../global_step100`` -> 100; None for other names."""
    match = _ITERATION_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def saved_iterations(run_dir: str | Path) -> dict[int, Path]:
    """All ``iter_*`` checkpoint directories in a run directory, keyed by iteration."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MergeError(f"{run_dir}: no such run directory")
    found = {}
    for child in run_dir.iterdir():
        iteration = iteration_from_path(child)
        if iteration is not None and child.is_dir():
            found[iteration] = child
    return found


def select_from_run(
    run_dir: str | Path,
    last: int | None = None,
    every: int | None = None,
    iterations: Sequence[int] | None = None,
) -> list[CheckpointRef]:
    """Pick checkpoints from a run directory.

    ``last=N, every=K``: the newest saved iteration and every K-th one before it, counting saved
    iterations (not training steps) back from the newest, N in all. ``iterations``: exactly
    those iterations. Returned oldest first.
    """
    if every is not None and last is None:
        raise MergeError("--every needs --last")
    if (last is None) == (iterations is None):
        raise MergeError("choose checkpoints from a run directory with either --last or --iterations")
    saved = saved_iterations(run_dir)
    if not saved:
        raise MergeError(f"{run_dir}: no iter_* checkpoint directories in this run directory")

    if iterations is not None:
        wanted = list(iterations)
        if len(set(wanted)) != len(wanted):
            raise MergeError(f"--iterations lists an iteration twice: {wanted}")
        missing = [it for it in wanted if it not in saved]
        if missing:
            raise MergeError(
                f"{run_dir}: iterations {missing} were not saved; saved: {sorted(saved)}"
            )
        picked = sorted(wanted)
    else:
        every = 1 if every is None else every
        if last < 1 or every < 1:
            raise MergeError(f"--last and --every must be >= 1, got --last {last} --every {every}")
        newest_first = sorted(saved, reverse=True)
        picked = newest_first[::every][:last]
        if len(picked) < last:
            raise MergeError(
                f"{run_dir}: --last {last} --every {every} needs {(last - 1) * every + 1} saved "
                f"iterations, found {len(saved)}: {sorted(saved)}"
            )
        picked.sort()
    return [CheckpointRef(saved[it], it) for it in picked]


def explicit_checkpoints(paths: Sequence[str | Path]) -> list[CheckpointRef]:
    """Checkpoint directories given one by one, which must already be ordered oldest first."""
    refs = [CheckpointRef(Path(p), iteration_from_path(p)) for p in paths]
    for ref in refs:
        if not ref.path.exists():
            raise MergeError(f"{ref.path}: no such checkpoint directory")
        if not ref.path.is_dir():
            raise MergeError(f"{ref.path}: not a directory (a checkpoint is a directory)")
        if saved_iterations(ref.path) and not (ref.path / "metadata.json").exists():
            raise MergeError(
                f"{ref.path}: this is a run directory; pick checkpoints from it with "
                f"--last N [--every K] or --iterations a,b,c"
            )
    resolved = [ref.path.resolve() for ref in refs]
    if len(set(resolved)) != len(resolved):
        raise MergeError(f"the same checkpoint is given twice: {[str(r.path) for r in refs]}")
    known = [ref.iteration for ref in refs]
    if None not in known and any(a >= b for a, b in zip(known, known[1:])):
        raise MergeError(
            f"checkpoints must be given oldest first; got iterations {known} in that order"
        )
    return refs


def select_checkpoints(
    inputs: Sequence[str | Path],
    last: int | None = None,
    every: int | None = None,
    iterations: Sequence[int] | None = None,
) -> list[CheckpointRef]:
    """The CLI's selection rule: a run directory with --last/--iterations, else explicit dirs."""
    if last is not None or iterations is not None or every is not None:
        if len(inputs) != 1:
            raise MergeError(
                "--last/--every/--iterations take exactly one run directory, "
                f"got {len(inputs)} inputs"
            )
        return select_from_run(inputs[0], last=last, every=every, iterations=iterations)
    return explicit_checkpoints(inputs)
