"""The output as a run directory (``--as-run-dir``): the merged checkpoint inside, named as its
training framework names the newest input's iteration, beside the tracker file that framework's
loader reads first. Then Megatron-LM's ``--load OUT``, DeepSpeed's ``load_checkpoint(OUT)`` and
``pretrain``'s ``checkpoint.load=OUT`` find it with no wrapper:

    torch_dist, torch   OUT/iter_{N:07d}/   OUT/latest_checkpointed_iteration.txt  ("N")
    deepspeed           OUT/global_step{N}/ OUT/latest                             ("global_stepN")
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_merge.errors import MergeError


@dataclass(frozen=True)
class RunEntry:
    """Where the merged checkpoint goes inside the run directory, and the tracker naming it."""

    directory: str
    tracker: str
    tracker_text: str


def run_entry(format: str, iteration: int | None, newest: str) -> RunEntry:
    """The run-directory entry for a merge whose newest input (``newest``) is at ``iteration``."""
    if iteration is None:
        raise MergeError(
            f"{newest}: its iteration is unknown, so the merge cannot be named as a run's checkpoint "
            f"(--as-run-dir); merge without it"
        )
    if format == "deepspeed":
        tag = f"global_step{iteration}"
        return RunEntry(tag, "latest", tag)
    return RunEntry(f"iter_{iteration:07d}", "latest_checkpointed_iteration.txt", str(iteration))
