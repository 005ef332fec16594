"""The merge engine: one pipeline for every checkpoint format, on one process or many.

    plan -> work items -> write them -> finish -> merge.json -> verify -> atomic publish

:func:`plan_merge` resolves the weights, opens the inputs in their format and asks the format to
plan (:mod:`megatron_merge.formats.base` is the contract; :mod:`.formats.torch_dist` and
:mod:`.formats.rank_files` implement it). The engine never asks which format it holds.

:func:`merge_checkpoints` writes the work items (the output files) in this process, in
``--workers`` local processes, or -- under ``torchrun`` -- spread over every rank of every node
(:mod:`megatron_merge.ranks`), then lets the format finish (e.g. torch_dist's ``.metadata``),
writes ``merge.json``, optionally verifies, and publishes the directory atomically. Every piece of
arithmetic is :func:`megatron_merge.accumulate.merge_piece`, so the bits never depend on how
the work was spread.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from megatron_merge.accumulate import MERGE_THREADS, resolve_accumulate_dtype, torch_threads
from megatron_merge.atomic_output import atomic_output_dir, check_output_path
from megatron_merge.errors import FailedOnAnotherRank, MergeError, os_error_message
from megatron_merge.formats import format_module, input_format, item_writer, open_checkpoint
from megatron_merge.formats.base import (
    FormatPlan,
    MergeSettings,
    PlanOptions,
    gc_paused,
    human_bytes,
    resolve_save_dtype,
)
from megatron_merge.ranks import (
    RankGroup,
    choose_workers,
    write_in_processes,
    write_serially,
)
from megatron_merge.record import MERGE_RECORD_FILE, input_entries, record_header
from megatron_merge.run_layout import run_entry
from megatron_merge.selection import CheckpointRef, explicit_checkpoints
from megatron_merge.weights import DEFAULT_EMA_ALPHA, merge_weights

logger = logging.getLogger(__name__)

STATE_FROM_CHOICES = ("newest", "oldest")


@dataclass
class MergePlan:
    """Everything decided before writing a byte. ``inputs`` are ordered oldest first."""

    inputs: list[CheckpointRef]
    weights: list[float]
    method: str
    alpha: float | None
    normalize: bool
    model_only: bool
    accumulate_dtype: str
    save_dtype: str | None
    format_plan: FormatPlan = field(repr=False)

    @property
    def format(self) -> str:
        return self.format_plan.format

    @property
    def checkpoints(self) -> list:
        return self.format_plan.checkpoints

    @property
    def reference(self) -> CheckpointRef:
        """The input whose layout the output keeps and whose unmerged state it copies."""
        return self.inputs[self.format_plan.reference]

    @property
    def work_items(self) -> Sequence:
        return self.format_plan.work_items

    @property
    def ema_alpha(self) -> float | None:
        """Set for EMA merges, which combine by the recursion (see :mod:`accumulate`)."""
        return self.alpha if self.method == "ema" else None

    @property
    def bytes_to_read(self) -> int:
        return self.format_plan.bytes_to_read

    @property
    def bytes_to_write(self) -> int:
        return self.format_plan.bytes_to_write

    @property
    def peak_bytes_per_worker(self) -> int:
        return self.format_plan.peak_bytes_per_worker

    def auto_workers(self) -> tuple[int, str]:
        """How many local processes to write with when ``--workers`` is not given, and why
        (:func:`megatron_merge.ranks.choose_workers`)."""
        return choose_workers(len(self.work_items), self.bytes_to_read, self.peak_bytes_per_worker,
                              self.reference.path)

    def settings(self, allow_nonfinite: bool) -> MergeSettings:
        """What every writing process needs (picklable)."""
        return MergeSettings(
            format=self.format, input_paths=tuple(str(c.path) for c in self.checkpoints),
            weights=tuple(self.weights), ema_alpha=self.ema_alpha,
            accumulate_dtype=self.accumulate_dtype, allow_nonfinite=allow_nonfinite,
            reference=self.format_plan.reference, save_dtype=self.save_dtype,
        )

    def describe(self) -> str:
        """Human-readable plan (what ``--dry-run`` prints)."""
        lines = [f"method: {self.method}" + (f" (alpha={self.alpha})" if self.alpha is not None else "")]
        lines.append("inputs (oldest first):")
        for ref, weight in zip(self.inputs, self.weights):
            it = "?" if ref.iteration is None else ref.iteration
            lines.append(f"  iteration {it:>10}  weight {weight:.6f}  {ref.path}")
        if self.format_plan.reference != len(self.inputs) - 1:
            lines.append(f"layout and unmerged state from: {self.reference.path} (--state-from)")
        lines += self.format_plan.describe_lines()
        lines += [
            f"accumulate in: {self.accumulate_dtype}",
            f"work items: {len(self.work_items)} output files",
            f"to read: {human_bytes(self.bytes_to_read)}, to write: ~{human_bytes(self.bytes_to_write)}",
            f"projected peak memory per worker: {human_bytes(self.peak_bytes_per_worker)} "
            f"({self.format_plan.peak_memory_note})",
        ]
        return "\n".join(lines)

    def record(self, out: Path, allow_nonfinite: bool) -> dict:
        """The ``merge.json`` written beside the merged checkpoint."""
        return {
            **record_header(tool="megatron-merge", out=out, format=self.format, method=self.method,
                            alpha=self.alpha, weights=self.weights,
                            inputs=input_entries(self.inputs, self.weights)),
            "normalize": self.normalize,
            "accumulate_dtype": self.accumulate_dtype,
            "save_dtype": self.save_dtype,
            "allow_nonfinite": allow_nonfinite,
            "model_only": self.model_only,
            "layout_from": str(self.reference.path.resolve()),
            "state_from": {"path": str(self.reference.path.resolve()), "iteration": self.reference.iteration},
            **self.format_plan.record_fields(),
        }


def plan_merge(
    inputs: Sequence[str | Path | CheckpointRef],
    method: str = "sma",
    *,
    alpha: float | None = None,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    model_only: bool = False,
    accumulate_dtype: str = "fp32",
    format: str | None = None,
    trust_inputs: bool = False,
    save_dtype: str | None = None,
    state_from: str | int = "newest",
) -> MergePlan:
    """Read the inputs' metadata, check them, and decide what happens to every piece.

    ``format`` is ``"torch_dist"``, ``"torch"`` (legacy Megatron) or ``"deepspeed"``; by default
    it is detected from the inputs. ``save_dtype`` (``fp32`` / ``bf16`` / ``fp16``) is the dtype
    merged model weights are written in (default: their own; the optimizer's fp32 masters keep
    theirs). ``state_from`` is the input the layout and everything not merged come from:
    ``"newest"`` (default), ``"oldest"`` or an input's iteration. See
    :func:`merge_checkpoints` for the rest.
    """
    refs = _as_refs(inputs)
    if len(refs) < 2:
        raise MergeError(f"merging needs at least 2 checkpoints, got {len(refs)}")
    try:
        merge_w = merge_weights(method, len(refs), alpha=alpha, weights=weights, normalize=normalize)
    except ValueError as err:
        raise MergeError(str(err)) from None
    acc_dtype = resolve_accumulate_dtype(accumulate_dtype)  # bad names fail before any reading
    out_dtype = resolve_save_dtype(save_dtype)
    if method == "ema" and alpha is None:
        alpha = DEFAULT_EMA_ALPHA
    fmt = input_format([ref.path for ref in refs], format)
    with gc_paused():
        checkpoints = [open_checkpoint(ref.path, fmt) for ref in refs]
        refs = [
            ref if ref.iteration is not None else dataclasses.replace(ref, iteration=ckpt.iteration())
            for ref, ckpt in zip(refs, checkpoints)
        ]
        options = PlanOptions(
            model_only=model_only, accumulate_itemsize=acc_dtype.itemsize, trust_inputs=trust_inputs,
            reference=_reference_index(refs, state_from), save_dtype=out_dtype,
        )
        format_plan = format_module(fmt).plan_format(checkpoints, options)
    return MergePlan(
        inputs=refs, weights=merge_w, method=method, alpha=alpha if method == "ema" else None,
        normalize=normalize, model_only=model_only, accumulate_dtype=accumulate_dtype,
        save_dtype=save_dtype, format_plan=format_plan,
    )


def _reference_index(refs: list[CheckpointRef], state_from: str | int) -> int:
    if state_from == "newest":
        return len(refs) - 1
    if state_from == "oldest":
        return 0
    if isinstance(state_from, int) and not isinstance(state_from, bool):
        for index, ref in enumerate(refs):
            if ref.iteration == state_from:
                return index
        known = ", ".join(str(r.iteration) for r in refs)
        raise MergeError(f"--state-from {state_from}: no input is at that iteration (inputs: {known})")
    raise MergeError(f"--state-from must be newest, oldest or an input's iteration, got {state_from!r}")


def _as_refs(inputs: Sequence[str | Path | CheckpointRef]) -> list[CheckpointRef]:
    if all(isinstance(i, CheckpointRef) for i in inputs):
        return list(inputs)
    return explicit_checkpoints([i.path if isinstance(i, CheckpointRef) else i for i in inputs])


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


@dataclass
class MergeResult:
    out: Path
    plan: MergePlan | None  # None on torchrun ranks other than 0 (they never plan)
    seconds: float
    verified_chunks: int = 0
    workers: int = 1


def merge_checkpoints(
    inputs: Sequence[str | Path | CheckpointRef],
    out: str | Path,
    method: str = "sma",
    *,
    alpha: float | None = None,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    model_only: bool = False,
    accumulate_dtype: str = "fp32",
    allow_nonfinite: bool = False,
    force: bool = False,
    workers: int | None = 1,
    verify: bool = False,
    verify_samples: int = 8,
    progress: bool = False,
    format: str | None = None,
    as_run_dir: bool = False,
    trust_inputs: bool = False,
    save_dtype: str | None = None,
    state_from: str | int = "newest",
) -> MergeResult:
    """Merge checkpoints (ordered oldest first) into ``out``, in their own format.

    ``format``: ``"torch_dist"``, ``"torch"`` (legacy Megatron) or ``"deepspeed"``; detected
    from the inputs by default. torch_dist merges chunk by chunk (inputs may differ in layout);
    the others file by file, each output file written in the reference input's layout.

    ``method``/``alpha``/``weights``/``normalize`` choose the weights
    (:func:`megatron_merge.weights.merge_weights`). ``model_only`` drops optimizer state
    (default: copied from the reference input, the newest unless ``state_from``).
    ``accumulate_dtype`` is ``"fp32"`` or ``"fp64"``; ``save_dtype`` see :func:`plan_merge`.
    ``workers`` processes split the output files (None: chosen from the cores, the input size
    and free memory, and logged). Under ``torchrun`` with several ranks the files are split
    over all ranks instead (``workers`` must then be 1 or None). ``verify`` re-reads sampled
    output pieces through an independent reader and checks them against an independent
    recomputation before the output is moved into place. ``trust_inputs`` copies opaque
    torch_dist parts (``common.pt``, RNG and extra-state items) without parsing them first
    (recorded in merge.json).

    ``as_run_dir`` writes ``out`` as a run directory: the checkpoint in ``out/iter_{N:07d}/``
    (DeepSpeed: ``global_stepN/``, N the reference input's iteration) beside the tracker file,
    so Megatron-LM's and DeepSpeed's loaders find it (see :mod:`megatron_merge.run_layout`).

    The output appears atomically; on any error nothing is left at ``out`` and
    :class:`MergeError` names the file and key (on every rank of a torchrun launch; ranks
    other than 0 raise :class:`~megatron_merge.errors.FailedOnAnotherRank`, which rank 0 reports).
    """
    job = _MergeJob(
        inputs=inputs, out=out,
        plan_args=dict(method=method, alpha=alpha, weights=weights, normalize=normalize,
                       model_only=model_only, accumulate_dtype=accumulate_dtype, format=format,
                       trust_inputs=trust_inputs, save_dtype=save_dtype, state_from=state_from),
        allow_nonfinite=allow_nonfinite, force=force, workers=workers, verify=verify,
        verify_samples=verify_samples, progress=progress, as_run_dir=as_run_dir,
    )
    group = RankGroup.from_env()
    try:
        if group is None:
            return job.run_here()
        if workers not in (None, 1):
            raise MergeError("--workers is for one process; under torchrun every rank is one worker "
                             "(use --nproc-per-node for more)")
        with group.joined():
            return job.run_on_ranks(group)
    except OSError as err:  # disk full, permissions, ...: the temporary output is already gone
        raise MergeError(os_error_message(err, writing=out)) from None


@dataclass
class _MergeJob:
    """One call of :func:`merge_checkpoints`: its arguments and the steps around the writing."""

    inputs: Sequence
    out: str | Path
    plan_args: dict
    allow_nonfinite: bool
    force: bool
    workers: int | None
    verify: bool
    verify_samples: int
    progress: bool
    as_run_dir: bool
    started: float = field(default_factory=time.perf_counter)

    def plan(self) -> tuple[Path, MergePlan]:
        refs = _as_refs(self.inputs)
        out = check_output_path(self.out, [r.path for r in refs], self.force)
        plan = plan_merge(refs, **self.plan_args)
        logger.info("merge plan:\n%s", plan.describe())
        return out, plan

    def run_here(self) -> MergeResult:
        out, plan = self.plan()
        settings = plan.settings(self.allow_nonfinite)
        workers = self.workers
        if workers is None:
            workers, why = plan.auto_workers()
            logger.info("workers: %d (%s; --workers P to choose)", workers, why)
        with atomic_output_dir(out) as tmp, self._progress(plan.work_items) as on_item:
            ckpt_tmp, ckpt_out = self._checkpoint_dirs(plan, tmp, out)
            if workers <= 1 or len(plan.work_items) <= 1:
                writer = item_writer(settings, plan.checkpoints)
                with torch_threads(MERGE_THREADS):
                    results = write_serially(writer, plan.work_items, ckpt_tmp, on_item)
            else:
                results = write_in_processes(settings, plan.work_items, ckpt_tmp, workers,
                                             MERGE_THREADS, on_item)
            verified = self._finish(plan, settings, results, ckpt_tmp, ckpt_out)
        return MergeResult(out, plan, time.perf_counter() - self.started, verified, workers)

    def run_on_ranks(self, group: RankGroup) -> MergeResult:
        """Rank 0 plans and publishes; every rank writes its share (see :mod:`.ranks`).

        The ranks meet at four collectives, in order: rank 0 broadcasts the plan (or its
        error); every rank's error is gathered (any error fails every rank, and the merge
        ends there); the results are gathered on rank 0; rank 0 broadcasts whether it
        finished and published.
        """
        if not group.is_coordinator:
            return self._work_on_rank(group)
        phase = "plan"
        try:
            out, plan = self.plan()
            settings = plan.settings(self.allow_nonfinite)
            with atomic_output_dir(out) as tmp:
                ckpt_tmp, ckpt_out = self._checkpoint_dirs(plan, tmp, out)
                group.broadcast(("plan", settings, list(plan.work_items), str(ckpt_tmp)))
                phase = "write"
                logger.info("merging on %d ranks", group.world_size)
                with self._progress(plan.work_items, share_of=group) as on_item:
                    results = group.write_share(
                        lambda: item_writer(settings, plan.checkpoints),
                        plan.work_items, ckpt_tmp, on_item)
                phase = "finish"
                verified = self._finish(plan, settings, results, ckpt_tmp, ckpt_out)
        except BaseException as err:
            if phase != "write":  # the other ranks wait for word from rank 0
                group.broadcast(("failed", str(err) or type(err).__name__))
            raise
        group.broadcast(("published",))
        return MergeResult(out, plan, time.perf_counter() - self.started, verified, group.world_size)

    def _work_on_rank(self, group: RankGroup) -> MergeResult:
        message = group.broadcast()
        if message[0] == "failed":
            raise FailedOnAnotherRank(message[1])
        _, settings, items, ckpt_tmp = message
        group.write_share(lambda: item_writer(settings),
                          items, Path(ckpt_tmp), on_item=lambda item: None)
        outcome = group.broadcast()
        if outcome[0] != "published":
            raise FailedOnAnotherRank(outcome[1])
        return MergeResult(Path(self.out), None, time.perf_counter() - self.started, 0, group.world_size)

    def _checkpoint_dirs(self, plan: MergePlan, tmp: Path, out: Path) -> tuple[Path, Path]:
        """Where the checkpoint itself goes, staged and final (a subdirectory with --as-run-dir)."""
        if not self.as_run_dir:
            return tmp, out
        entry = run_entry(plan.format, plan.reference.iteration, str(plan.reference.path))
        (tmp / entry.tracker).write_text(entry.tracker_text + "\n")
        (tmp / entry.directory).mkdir()
        return tmp / entry.directory, out / entry.directory

    def _finish(self, plan: MergePlan, settings: MergeSettings, results: dict,
                ckpt_tmp: Path, ckpt_out: Path) -> int:
        plan.format_plan.finish(ckpt_tmp, results, str(ckpt_out.resolve()), settings)
        record = plan.record(ckpt_out, self.allow_nonfinite)
        (ckpt_tmp / MERGE_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if not self.verify:
            return 0
        return plan.format_plan.verify(ckpt_tmp, settings, samples=self.verify_samples, seed=0)

    def _progress(self, items: Sequence, share_of: RankGroup | None = None):
        total = sum(item.nbytes for item in items)
        desc = "merging"
        if share_of is not None:  # rank 0 sees its own share; the others report nothing
            total = sum(item.nbytes for item in share_of.share_of(items))
            desc = f"merging (rank 0's share, {share_of.world_size} ranks)"
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                   disable=not self.progress, dynamic_ncols=True)
        return _BarUpdates(bar)


class _BarUpdates:
    """A progress bar as a context manager yielding ``on_item(item)``."""

    def __init__(self, bar: tqdm):
        self.bar = bar

    def __enter__(self):
        return lambda item: self.bar.update(item.nbytes)

    def __exit__(self, *exc) -> None:
        self.bar.close()

