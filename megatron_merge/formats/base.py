"""The small contract every checkpoint format fulfils for the merge engine.

The engine (:mod:`megatron_merge.offline`) knows nothing about formats. It asks a format's
module (see :func:`megatron_merge.formats.format_module`) for two things:

``plan_format(checkpoints, options) -> FormatPlan``
    Read the inputs' metadata, check they agree, and cut the output into *work items*: the
    output files, each written whole by one process (:class:`WorkItem`). Also what
    ``--dry-run`` prints, what ``merge.json`` records, and how the output is finished and
    verified (:class:`FormatPlan`).
``item_writer(settings, checkpoints) -> ItemWriter``
    Write work items with the shared merge loop (:func:`megatron_merge.accumulate.merge_piece`)
    from the opened inputs. The engine makes one in the planning process, in every local worker
    process and on every torchrun rank (:func:`megatron_merge.formats.item_writer` opens the
    inputs there); everything a writer needs travels in :class:`MergeSettings`, which is small
    and picklable.

Inputs are ordered oldest first. One of them is the *reference* (``options.reference``; the
newest unless ``--state-from`` says otherwise): the output keeps its layout and files, and takes
from it whatever is copied rather than merged (optimizer moments, opaque objects, extra state).
"""

from __future__ import annotations

import contextlib
import enum
import gc
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch

from megatron_merge.accumulate import resolve_accumulate_dtype
from megatron_merge.errors import MergeError

# Output dtypes ``--save-dtype`` accepts for merged model weights.
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Action(str, enum.Enum):
    """What happens to a piece of the reference input (and so of the output)."""

    MERGE = "merge"  # sum_i w_i * piece_i through the merge loop
    COPY = "copy"  # taken unchanged from the reference input
    DROP = "drop"  # left out (optimizer state with --model-only)


@dataclass(frozen=True)
class PlanOptions:
    """What a format's planner needs to know beyond the inputs."""

    model_only: bool = False
    accumulate_itemsize: int = 4
    trust_inputs: bool = False  # copy opaque parts unread
    reference: int = -1  # index of the input the layout and copied state come from
    save_dtype: torch.dtype | None = None  # dtype of merged model weights (None: their own)


@dataclass(frozen=True)
class MergeSettings:
    """Everything a process needs to write work items, beside the items themselves."""

    format: str
    input_paths: tuple[str, ...]  # oldest first
    weights: tuple[float, ...]
    ema_alpha: float | None  # set for EMA merges, which combine by the recursion
    accumulate_dtype: str
    allow_nonfinite: bool
    reference: int  # index into input_paths
    save_dtype: str | None = None  # a key of SAVE_DTYPES

    def output_dtype(self, source: torch.dtype, model_weight: bool) -> torch.dtype:
        """The dtype a merged tensor is written in: ``--save-dtype`` for model weights (never
        for the optimizer's fp32 masters), else its own."""
        if model_weight and self.save_dtype is not None:
            return SAVE_DTYPES[self.save_dtype]
        return source


def resolve_save_dtype(name: str | None) -> torch.dtype | None:
    """``"bf16"`` -> ``torch.bfloat16``; None stays None."""
    if name is None:
        return None
    try:
        return SAVE_DTYPES[name]
    except KeyError:
        raise MergeError(f"save dtype must be one of {sorted(SAVE_DTYPES)}, got {name!r}") from None


class WorkItem(Protocol):
    """One output file, written whole by one process."""

    name: str  # path relative to the output checkpoint directory

    @property
    def nbytes(self) -> int:  # bytes it writes: for balancing and progress
        ...


class ItemWriter(ABC):
    """Writes work items of one merge in one process; inputs are opened once per process."""

    def __init__(self, checkpoints: list, settings: MergeSettings):
        self.checkpoints = checkpoints
        self.settings = settings
        self.source = checkpoints[settings.reference]  # the reference input
        self.acc_dtype = resolve_accumulate_dtype(settings.accumulate_dtype)

    @abstractmethod
    def write(self, item: WorkItem, out_dir: Path) -> Any:
        """Write ``item`` under ``out_dir``; return what :meth:`FormatPlan.finish` needs of it
        (small and picklable: it is gathered from every process)."""


class FormatPlan(ABC):
    """A format's part of a merge plan."""

    format: str
    checkpoints: list  # the opened inputs, oldest first
    reference: int
    work_items: Sequence[WorkItem]
    bytes_to_read: int
    peak_bytes_per_worker: int
    peak_memory_note: str  # what the projected peak counts (for --dry-run)

    @property
    def reference_checkpoint(self):
        return self.checkpoints[self.reference]

    @property
    def bytes_to_write(self) -> int:
        return sum(item.nbytes for item in self.work_items)

    @abstractmethod
    def describe_lines(self) -> list[str]:
        """The format's lines of the human-readable plan (``--dry-run``)."""

    @abstractmethod
    def record_fields(self) -> dict:
        """The format's fields of ``merge.json``."""

    @abstractmethod
    def finish(self, out_dir: Path, results: dict[str, Any], checkpoint_id: str,
               settings: MergeSettings) -> None:
        """After every work item is written (``results``: item name -> what its writer
        returned): write the format's metadata and copy the reference's other files."""

    @abstractmethod
    def verify(self, out_dir: Path, settings: MergeSettings, samples: int, seed: int) -> int:
        """Check sampled merged pieces of ``out_dir`` against an independent recomputation;
        return how many were checked."""


def copy_as_is(source: Path, target: Path) -> None:
    """Copy a file or a directory tree of the reference input into the output unchanged."""
    if source.is_dir():
        shutil.copytree(source, target, symlinks=True)
    else:
        shutil.copy2(source, target)


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block (restored after, if it was on).

    Reading a checkpoint's metadata and planning its chunks create millions of small objects
    that live on; every few thousand allocations Python's collector walks all of them again,
    which made planning 2-7x slower (bench/merge_plan_bench.py). Nothing planned is cyclic
    garbage, so nothing is lost by waiting.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
