"""Offline merging of ``torch_dist`` checkpoints, chunk by chunk, without gathering tensors.

Two steps:

1. :func:`plan_merge` reads only metadata. It checks the inputs agree (keys, global shapes,
   dtypes), that every byte it will read is present, and decides for every item of the newest
   input what happens to it:

   ``merge``  floating-point model tensors: ``sum_i w_i * chunk_i`` (see ``accumulate``),
              and the optimizer's fp32 master weights in every layout megatron-core saves
              (``fp32_param``, fully reshardable ``param``, dp_reshardable bucket ``param``
              -- see ``formats.distributed_optimizer``; the gaps between parameters in a
              bucket are copied);
   ``copy``   taken from the newest input unchanged: optimizer state (``optimizer.*`` keys,
              so the merge can resume training), non-float tensors, opaque objects (TE
              ``_extra_state``, RNG state, ...), and ``common.pt`` / ``metadata.json``;
   ``drop``   optimizer state with ``model_only`` (its sharded keys, and the ``optimizer`` /
              ``opt_param_scheduler`` entries of ``common.pt``, which is then re-saved).

   The output keeps the newest input's chunking and file layout: same ``.distcp`` names, same
   items in each file, in the same order.

2. :func:`execute_plan` writes each output file item by item; ``workers`` processes split the
   files. Each merged chunk is assembled from whichever stored chunks of each input overlap it,
   so inputs saved under different parallel layouts (TP=2, then TP=1) merge too.

:func:`merge_checkpoints` does both, atomically, and writes ``merge.json`` beside the result.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
from tqdm import tqdm

from megatron_merge.accumulate import (
    MERGE_THREADS,
    PieceBuffers,
    PiecePart,
    merge_piece,
    numel,
    region_within,
    resolve_accumulate_dtype,
    torch_threads,
)
from megatron_merge.atomic_output import atomic_output_dir, check_output_path
from megatron_merge.errors import MergeError, os_error_message
from megatron_merge.formats import input_format, is_extra_state, open_checkpoint
from megatron_merge.formats.distributed_optimizer import (
    bucket_gap_chunks,
    check_same_bucket_layout,
    is_bucket_master_key,
)
from megatron_merge.formats.torch_dist import (
    COMMON_FILE,
    DCP_METADATA_FILE,
    DistcpFileWriter,
    StoredItem,
    TorchDistCheckpoint,
    output_metadata,
    write_dcp_metadata,
)
from megatron_merge.record import MERGE_RECORD_FILE, input_entries, record_header
from megatron_merge.run_layout import run_entry
from megatron_merge.safe_load import load_torch
from megatron_merge.selection import CheckpointRef, explicit_checkpoints
from megatron_merge.weights import DEFAULT_EMA_ALPHA, merge_weights

logger = logging.getLogger(__name__)

OPTIMIZER_PREFIX = "optimizer."
# megatron-core's names for the optimizer's fp32 master copy of each parameter: the mixed-precision
# optimizer's `fp32_param`, the distributed optimizer's (fully reshardable) `param`.
MASTER_WEIGHT_PREFIXES = ("optimizer.state.fp32_param.", "optimizer.state.param.")
# megatron-core prefixes optimizer keys with `chained_N.` when it splits the optimizer (MoE) unless
# told not to; checkpoints written that way (e.g. by Megatron-LM) must not be averaged as weights.
_CHAINED_OPTIMIZER_KEY = re.compile(r"^chained_\d+\.optimizer\.")
# The in-training merger's own state (snapshots, EMA accumulator) inside `pretrain` checkpoints:
# training state like the optimizer's, never a model weight to average.
MERGE_STATE_PREFIX = "merge_state."
# Non-sharded optimizer entries of common.pt (Megatron-LM and `pretrain` both write these);
# a loader that finds them expects optimizer tensors too, so --model-only removes them.
COMMON_OPTIMIZER_KEYS = ("optimizer", "opt_param_scheduler", "merge_state_meta")

MERGE, COPY, DROP = "merge", "copy", "drop"

# Input bytes the merge asks the kernel to read ahead of the chunk it is merging (see
# _Readahead): enough to cover a few chunks' merge time, small next to any page cache.
READAHEAD_BYTES = 256 * 2**20


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemPlan:
    """What to do with one item of the newest input (and so of the output)."""

    index: MetadataIndex
    action: str  # MERGE or COPY
    key: str
    offsets: tuple[int, ...] | None  # None for bytes items
    sizes: tuple[int, ...] | None
    nbytes: int  # stored length in the newest input


@dataclass(frozen=True)
class FilePlan:
    """One output ``.distcp`` file: its name and items, in the newest input's order."""

    name: str
    items: tuple[ItemPlan, ...]

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self.items)


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
    files: list[FilePlan]
    merged_keys: dict[str, str]  # key -> dtype
    copied_keys: dict[str, str]  # key -> why it is copied from the newest input
    dropped_keys: dict[str, str]  # key -> why it is left out
    dropped_common_entries: list[str]  # optimizer entries left out of common.pt (model_only)
    inputs_with_other_layout: list[str]
    bytes_to_read: int
    peak_bytes_per_worker: int
    checkpoints: list[TorchDistCheckpoint] = field(repr=False, default_factory=list)
    trust_inputs: bool = False  # opaque parts copied unread (--trust-inputs)

    @property
    def newest(self) -> TorchDistCheckpoint:
        return self.checkpoints[-1]

    @property
    def ema_alpha(self) -> float | None:
        """Set for EMA merges, which combine by the recursion (see :mod:`accumulate`)."""
        return self.alpha if self.method == "ema" else None

    @property
    def bytes_to_write(self) -> int:
        return sum(f.nbytes for f in self.files)

    def describe(self) -> str:
        """Human-readable plan (what ``--dry-run`` prints)."""
        lines = [f"method: {self.method}" + (f" (alpha={self.alpha})" if self.alpha is not None else "")]
        lines.append("inputs (oldest first):")
        for ref, weight in zip(self.inputs, self.weights):
            it = "?" if ref.iteration is None else ref.iteration
            lines.append(f"  iteration {it:>10}  weight {weight:.6f}  {ref.path}")
        n_chunks = sum(1 for f in self.files for i in f.items if i.action == MERGE)
        lines += [
            f"layout from the newest input: {len(self.files)} .distcp files, "
            f"{n_chunks} merged chunks",
            f"keys: {len(self.merged_keys)} merged, {len(self.copied_keys)} copied from the "
            f"newest input, {len(self.dropped_keys)} dropped",
            f"accumulate in: {self.accumulate_dtype}",
            f"to read: {_human_bytes(self.bytes_to_read)}, to write: ~{_human_bytes(self.bytes_to_write)}",
            f"projected peak memory per worker: {_human_bytes(self.peak_bytes_per_worker)} "
            f"(largest chunk working set, on top of the Python/torch process baseline)",
        ]
        if self.inputs_with_other_layout:
            lines.append("inputs saved under a different layout (resharded on the fly):")
            lines += [f"  {p}" for p in self.inputs_with_other_layout]
        return "\n".join(lines)


def classify_key(key: str, meta, model_only: bool) -> tuple[str, str]:
    """Decide MERGE / COPY / DROP for a key of the newest input, with the reason."""
    unchained = _unchained(key)
    if unchained.startswith(MASTER_WEIGHT_PREFIXES):
        if model_only:
            return DROP, "optimizer state (--model-only)"
        # fp32 master weights: the optimizer copies them back into the model when training
        # resumes, so they are merged like the weights or the merge would be undone.
        return MERGE, f"fp32 master weights ({meta.properties.dtype})"
    if is_bucket_master_key(unchained):
        if model_only:
            return DROP, "optimizer state (--model-only)"
        return MERGE, "fp32 master weights, distributed optimizer buckets (dp_reshardable)"
    if key.startswith(OPTIMIZER_PREFIX) or _CHAINED_OPTIMIZER_KEY.match(key):
        if model_only:
            return DROP, "optimizer state (--model-only)"
        return COPY, "optimizer state"
    if key.startswith(MERGE_STATE_PREFIX):
        if model_only:
            return DROP, "in-training merge state (--model-only)"
        return COPY, "in-training merge state"
    if isinstance(meta, BytesStorageMetadata):
        return COPY, "opaque object"
    if is_extra_state(key):
        return COPY, "extra state"
    dtype = meta.properties.dtype
    if not dtype.is_floating_point:
        return COPY, f"non-float tensor ({dtype})"
    return MERGE, str(dtype)


def _unchained(key: str) -> str:
    """``key`` without the ``chained_N.`` prefix a split (chained) optimizer adds."""
    return key.split(".", 1)[1] if _CHAINED_OPTIMIZER_KEY.match(key) else key


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
) -> MergePlan:
    """Read the inputs' metadata, check them, and decide what happens to every item.

    ``format`` is ``"torch_dist"``, ``"torch"`` (legacy Megatron) or ``"deepspeed"``; by default
    it is detected from the inputs. The per-rank-file formats return a
    :class:`~megatron_merge.formats.rank_files.RankFileMergePlan` (same interface).

    Every input's files are checked against its metadata. The opaque parts the output copies
    (``common.pt``, bytes items, other ``.pt`` files) are parsed by the safe reader first
    unless ``trust_inputs``, which copies them unread.
    """
    refs = _as_refs(inputs)
    if len(refs) < 2:
        raise MergeError(f"merging needs at least 2 checkpoints, got {len(refs)}")
    try:
        merge_w = merge_weights(method, len(refs), alpha=alpha, weights=weights, normalize=normalize)
    except ValueError as err:
        raise MergeError(str(err)) from None
    acc_dtype = resolve_accumulate_dtype(accumulate_dtype)  # a bad name fails before any reading
    if method == "ema" and alpha is None:
        alpha = DEFAULT_EMA_ALPHA
    fmt = input_format([ref.path for ref in refs], format)
    checkpoints = [open_checkpoint(ref.path, fmt) for ref in refs]
    refs = [
        ref if ref.iteration is not None else dataclasses.replace(ref, iteration=ckpt.iteration())
        for ref, ckpt in zip(refs, checkpoints)
    ]
    if fmt != "torch_dist":  # legacy Megatron / DeepSpeed: merged file by file
        from megatron_merge.formats.rank_files import plan_rank_file_merge

        return plan_rank_file_merge(
            refs, checkpoints, merge_w, method=method, alpha=alpha, normalize=normalize,
            model_only=model_only, accumulate_dtype=accumulate_dtype,
        )
    newest = checkpoints[-1]
    if not (newest.path / COMMON_FILE).exists():
        raise MergeError(f"{newest.path / COMMON_FILE}: missing; not a complete torch_dist checkpoint")
    for ckpt in checkpoints:
        ckpt.check_files()
    if not trust_inputs:
        newest.check_opaque_parts()
        for ckpt in checkpoints[:-1]:  # not copied, but a hostile or damaged input is refused
            if (ckpt.path / COMMON_FILE).exists():
                ckpt.load_common()
        for extra in _extra_files(newest.path):
            if extra != COMMON_FILE and extra.endswith((".pt", ".pth")) and (newest.path / extra).is_file():
                load_torch(newest.path / extra)

    actions: dict[str, tuple[str, str]] = {
        key: classify_key(key, meta, model_only)
        for key, meta in newest.metadata.state_dict_metadata.items()
    }
    dropped_common = []
    if model_only:  # common.pt is rewritten without its optimizer entries: it must be readable
        dropped_common = [k for k in COMMON_OPTIMIZER_KEYS if k in newest.load_common()]
    merged = {k: why for k, (action, why) in actions.items() if action == MERGE}
    buckets = [key for key in merged if is_bucket_master_key(_unchained(key))]
    for ckpt in checkpoints[:-1]:
        for key in buckets:
            if key in ckpt.metadata.state_dict_metadata:
                check_same_bucket_layout(ckpt, newest, key)
    _check_inputs_agree(checkpoints, merged, model_only)
    gaps = {key: bucket_gap_chunks(newest, key) for key in buckets}

    other_layout = []
    for ckpt in checkpoints[:-1]:
        if any(_boxes(ckpt, key) != _boxes(newest, key) for key in merged):
            other_layout.append(str(ckpt.path))

    sizing = _Sizing(acc_dtype.itemsize)
    files = []
    for name, items in newest.items_by_file().items():
        planned = tuple(
            _plan_item(item, _item_action(item, actions, gaps), checkpoints, sizing)
            for item in items
            if actions[item.key][0] != DROP
        )
        if planned:
            files.append(FilePlan(name, planned))

    return MergePlan(
        inputs=refs,
        weights=merge_w,
        method=method,
        alpha=alpha if method == "ema" else None,
        normalize=normalize,
        model_only=model_only,
        accumulate_dtype=accumulate_dtype,
        files=files,
        merged_keys=merged,
        copied_keys={k: why for k, (action, why) in actions.items() if action == COPY},
        dropped_keys={k: why for k, (action, why) in actions.items() if action == DROP},
        dropped_common_entries=dropped_common,
        inputs_with_other_layout=other_layout,
        bytes_to_read=sizing.bytes_to_read,
        peak_bytes_per_worker=sizing.peak_bytes,
        checkpoints=checkpoints,
        trust_inputs=trust_inputs,
    )


def _item_action(item: StoredItem, actions: dict, gaps: dict) -> str:
    """The key's action, except for the gaps of a distributed-optimizer bucket (copied)."""
    if item.is_tensor and tuple(item.index.offset) in gaps.get(item.key, ()):
        return COPY
    return actions[item.key][0]


@dataclass
class _Sizing:
    """Running totals while planning: bytes to read and the largest per-chunk working set."""

    acc_itemsize: int
    bytes_to_read: int = 0
    peak_bytes: int = 0


def _plan_item(
    item: StoredItem, action: str, checkpoints: list[TorchDistCheckpoint], sizing: _Sizing
) -> ItemPlan:
    """Plan one item of the newest input: check every byte it needs is there, and size it."""
    newest = checkpoints[-1]
    newest.check_stored(item.storage, item.key)
    if not item.is_tensor:
        sizing.bytes_to_read += item.storage.length
        return ItemPlan(item.index, COPY, item.key, None, None, item.storage.length)
    chunk = newest.chunk_at(item.key, tuple(item.index.offset))
    planned = ItemPlan(item.index, action, item.key, chunk.offsets, chunk.sizes, item.storage.length)
    itemsize = newest.tensor_metadata(item.key).properties.dtype.itemsize
    n = numel(chunk.sizes)
    if action == COPY:
        sizing.bytes_to_read += item.storage.length
        sizing.peak_bytes = max(sizing.peak_bytes, 2 * n * itemsize)
        return planned
    largest_input_chunk = 0
    for ckpt in checkpoints:
        covered = 0
        for stored, _, overlap_sizes in ckpt.chunks_overlapping(item.key, chunk.offsets, chunk.sizes):
            ckpt.check_stored(stored.storage, stored.key)
            sizing.bytes_to_read += stored.storage.length
            largest_input_chunk = max(largest_input_chunk, numel(stored.sizes) * itemsize)
            covered += numel(overlap_sizes)
        if covered != n:
            raise MergeError(
                f"{ckpt.path}: key {item.key!r}: stored chunks cover {covered} of the {n} "
                f"elements at offsets {chunk.offsets} (overlapping or missing chunks)"
            )
    # accumulator + converted term + loaded input chunk and its read buffer + cast result
    working_set = 2 * n * sizing.acc_itemsize + 2 * largest_input_chunk + n * itemsize
    sizing.peak_bytes = max(sizing.peak_bytes, working_set)
    return planned


def _as_refs(inputs: Sequence[str | Path | CheckpointRef]) -> list[CheckpointRef]:
    if all(isinstance(i, CheckpointRef) for i in inputs):
        return list(inputs)
    return explicit_checkpoints([i.path if isinstance(i, CheckpointRef) else i for i in inputs])


def _check_inputs_agree(
    checkpoints: list[TorchDistCheckpoint], merged: dict[str, str], model_only: bool
) -> None:
    """Every input has exactly the newest input's merged keys, with equal shapes and dtypes."""
    newest = checkpoints[-1]
    for ckpt in checkpoints[:-1]:
        where = ckpt.path / DCP_METADATA_FILE
        for key in merged:
            meta = ckpt.metadata.state_dict_metadata.get(key)
            ref = newest.tensor_metadata(key)
            if meta is None:
                raise MergeError(f"{where}: key {key!r} is missing (present in {newest.path})")
            if ckpt.tensor_metadata(key) is None:
                raise MergeError(f"{where}: key {key!r} is not a tensor (it is in {newest.path})")
            if tuple(meta.size) != tuple(ref.size):
                raise MergeError(
                    f"{where}: key {key!r} has global shape {tuple(meta.size)}, "
                    f"{newest.path} has {tuple(ref.size)}"
                )
            if meta.properties.dtype != ref.properties.dtype:
                raise MergeError(
                    f"{where}: key {key!r} has dtype {meta.properties.dtype}, "
                    f"{newest.path} has {ref.properties.dtype}"
                )
        for key, meta in ckpt.metadata.state_dict_metadata.items():
            if key not in merged and classify_key(key, meta, model_only)[0] == MERGE:
                raise MergeError(
                    f"{where}: key {key!r} is not a merged tensor in the newest input {newest.path}"
                )


def _boxes(ckpt: TorchDistCheckpoint, key: str) -> set[tuple]:
    return {(c.offsets, c.sizes) for c in ckpt.chunks(key)}


# --------------------------------------------------------------------------------------------
# Executing the plan
# --------------------------------------------------------------------------------------------


@dataclass
class _MergeContext:
    """What a process needs to write output files: open inputs, weights, options."""

    checkpoints: list[TorchDistCheckpoint]
    weights: list[float]
    acc_dtype: torch.dtype
    allow_nonfinite: bool
    out_dir: Path
    ema_alpha: float | None = None  # EMA merges use the recursion (see accumulate)
    buffers: PieceBuffers = field(default_factory=PieceBuffers)  # reused across chunks


_WORKER_CONTEXT: _MergeContext | None = None


def _init_worker(paths, weights, acc_dtype_name, allow_nonfinite, out_dir, threads, ema_alpha) -> None:
    global _WORKER_CONTEXT
    torch.set_num_threads(threads)
    _WORKER_CONTEXT = _MergeContext(
        [TorchDistCheckpoint(p) for p in paths], weights, resolve_accumulate_dtype(acc_dtype_name),
        allow_nonfinite, Path(out_dir), ema_alpha,
    )


def _write_file_in_worker(file_plan: FilePlan):
    return write_output_file(_WORKER_CONTEXT, file_plan)


def write_output_file(
    ctx: _MergeContext, file_plan: FilePlan, on_item: Callable[[int], None] | None = None
) -> list[tuple[MetadataIndex, _StorageInfo]]:
    """Write one output ``.distcp`` file; return the storage entry of each item written."""
    newest = ctx.checkpoints[-1]
    results = []
    items = file_plan.items
    readahead = _Readahead(ctx, items)
    with DistcpFileWriter(ctx.out_dir / file_plan.name) as writer:
        for position, item in enumerate(items):
            readahead.ask_beyond(position)
            if item.offsets is None:
                stored = StoredItem(item.index, newest.metadata.storage_data[item.index])
                info = writer.copy_item(newest, stored)
            elif item.action == COPY:
                stored_chunk = newest.chunk_at(item.key, item.offsets)
                info = writer.write_tensor(newest.read_chunk(stored_chunk, ctx.buffers))
            else:
                info = writer.write_tensor(_merge_chunk(ctx, item))
            results.append((item.index, info))
            if on_item is not None:
                on_item(item.nbytes)
    return results


class _Readahead:
    """Asks the kernel to read the input chunks of the items after the one being merged, up to
    ``READAHEAD_BYTES`` ahead (page-cache hints; see :meth:`TorchDistCheckpoint.prefetch`).

    The disk then stays busy while the CPU merges -- also while the merge waits for a CPU on
    a busy host -- instead of idling until the next read asks for data.
    """

    def __init__(self, ctx: _MergeContext, items: Sequence[ItemPlan]):
        self.ctx, self.items, self.asked = ctx, items, 0  # items[:asked] were asked for
        self.ahead = 0  # input bytes asked for beyond the current item

    def ask_beyond(self, position: int) -> None:
        """Called before merging ``items[position]``: keep the window ahead of it full."""
        if self.asked <= position:  # the first item, or one the window did not reach
            self.ahead = 0
            self._ask(position)
            self.asked = position + 1
        else:
            self.ahead -= self._input_bytes(self.items[position])
        # At least the next item, then more while the window has room.
        while self.asked < len(self.items) and (
            self.asked == position + 1 or self.ahead < READAHEAD_BYTES
        ):
            self.ahead += self._ask(self.asked)
            self.asked += 1

    def _ask(self, position: int) -> int:
        item = self.items[position]
        if item.offsets is None:
            return 0  # bytes items are small
        for ckpt in self._sources(item):
            for stored, _, _ in ckpt.chunks_overlapping(item.key, item.offsets, item.sizes):
                ckpt.prefetch(stored.storage)
        return self._input_bytes(item)

    def _sources(self, item: ItemPlan) -> list[TorchDistCheckpoint]:
        return self.ctx.checkpoints if item.action == MERGE else self.ctx.checkpoints[-1:]

    def _input_bytes(self, item: ItemPlan) -> int:
        return 0 if item.offsets is None else item.nbytes * len(self._sources(item))


def _merge_chunk(ctx: _MergeContext, item: ItemPlan) -> torch.Tensor:
    """One output chunk from the overlapping stored chunks of every input."""

    def parts_of_input(i: int) -> Iterator[PiecePart]:
        ckpt = ctx.checkpoints[i]
        for stored, offsets, sizes in ckpt.chunks_overlapping(item.key, item.offsets, item.sizes):
            # Into the reused input buffer: merge_piece is done with a part before asking for
            # the next, and the result has its own buffer.
            values = ckpt.read_chunk(stored, ctx.buffers)
            if tuple(sizes) != stored.sizes:
                values = values[region_within(offsets, sizes, stored.offsets)]
            origin = (
                f"{ckpt.path / stored.storage.relative_path} (key {item.key!r}, "
                f"chunk offsets {stored.offsets})"
            )
            yield PiecePart(region_within(offsets, sizes, item.offsets), values, origin)

    dtype = ctx.checkpoints[-1].tensor_metadata(item.key).properties.dtype
    return merge_piece(
        item.sizes, dtype, ctx.weights, parts_of_input, ctx.acc_dtype, ctx.allow_nonfinite,
        describe_piece=f"key {item.key!r} chunk at offsets {item.offsets}", ema_alpha=ctx.ema_alpha,
        buffers=ctx.buffers,  # the chunk is written before the next one is merged
    )


def execute_plan(
    plan: MergePlan,
    out_dir: str | Path,
    *,
    workers: int = 1,
    allow_nonfinite: bool = False,
    progress: bool = False,
    checkpoint_id: str | None = None,
) -> None:
    """Write the merged checkpoint described by ``plan`` into the existing ``out_dir``.

    ``checkpoint_id`` is recorded in the DCP metadata (default: ``out_dir``); pass the final
    path when ``out_dir`` is a temporary directory that will be renamed.
    """
    out_dir = Path(out_dir)
    storage_data: dict[MetadataIndex, _StorageInfo] = {}
    bar = tqdm(
        total=plan.bytes_to_write, unit="B", unit_scale=True, unit_divisor=1024,
        desc="merging", disable=not progress, dynamic_ncols=True,
    )
    with bar:
        if workers <= 1 or len(plan.files) <= 1:
            ctx = _MergeContext(
                plan.checkpoints, plan.weights, resolve_accumulate_dtype(plan.accumulate_dtype),
                allow_nonfinite, out_dir, plan.ema_alpha,
            )
            with torch_threads(MERGE_THREADS):
                for file_plan in plan.files:
                    storage_data.update(write_output_file(ctx, file_plan, on_item=bar.update))
        else:
            storage_data.update(_run_workers(plan, out_dir, workers, allow_nonfinite, bar))

    newest = plan.newest
    metadata = output_metadata(
        newest.metadata, storage_data, set(plan.dropped_keys),
        checkpoint_id=checkpoint_id or str(out_dir),
    )
    write_dcp_metadata(out_dir, metadata)
    for extra in _extra_files(newest.path):
        source = newest.path / extra
        if extra == COMMON_FILE and plan.dropped_common_entries:
            _write_common_without_optimizer(newest, out_dir / COMMON_FILE)
        elif source.is_dir():
            shutil.copytree(source, out_dir / extra, symlinks=True)
        else:
            shutil.copy2(source, out_dir / extra)


def _write_common_without_optimizer(newest: TorchDistCheckpoint, target: Path) -> None:
    common = newest.load_common()
    for key in COMMON_OPTIMIZER_KEYS:
        common.pop(key, None)
    torch.save(common, target)


def _run_workers(plan, out_dir, workers, allow_nonfinite, bar) -> dict:
    # Largest files first, so the pool finishes evenly.
    files = sorted(plan.files, key=lambda f: f.nbytes, reverse=True)
    storage_data = {}
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=min(workers, len(files)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(
            [str(c.path) for c in plan.checkpoints], plan.weights, plan.accumulate_dtype,
            allow_nonfinite, str(out_dir), MERGE_THREADS, plan.ema_alpha,
        ),
    ) as pool:
        futures = {pool.submit(_write_file_in_worker, f): f for f in files}
        try:
            for future in concurrent.futures.as_completed(futures):
                storage_data.update(future.result())
                bar.update(futures[future].nbytes)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return storage_data


def _extra_files(checkpoint_dir: Path) -> list[str]:
    """Files of the newest input copied as they are: common.pt, metadata.json, anything else
    that is not DCP data (which we regenerate) or a previous merge record."""
    skip = {DCP_METADATA_FILE, MERGE_RECORD_FILE}
    return sorted(
        p.name for p in checkpoint_dir.iterdir()
        if p.name not in skip and not p.name.endswith(".distcp")
    )


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------


@dataclass
class MergeResult:
    out: Path
    plan: MergePlan
    seconds: float
    verified_chunks: int = 0


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
    workers: int = 1,
    verify: bool = False,
    verify_samples: int = 8,
    progress: bool = False,
    format: str | None = None,
    as_run_dir: bool = False,
    trust_inputs: bool = False,
) -> MergeResult:
    """Merge checkpoints (ordered oldest first) into ``out``, in their own format.

    ``format``: ``"torch_dist"``, ``"torch"`` (legacy Megatron) or ``"deepspeed"``; detected
    from the inputs by default. torch_dist merges chunk by chunk (inputs may differ in layout);
    the others file by file, each output file written in the newest input's layout.

    ``method``/``alpha``/``weights``/``normalize`` choose the weights
    (:func:`megatron_merge.weights.merge_weights`). ``model_only`` drops optimizer state
    (default: copied from the newest input). ``accumulate_dtype`` is ``"fp32"`` or ``"fp64"``.
    ``workers`` processes split the output files. ``verify`` re-reads sampled output chunks
    through torch's own DCP reader and checks them against an independent recomputation before
    the output is moved into place. ``trust_inputs`` copies opaque torch_dist parts (``common.pt``,
    RNG and extra-state items) without parsing them first (recorded in merge.json).

    ``as_run_dir`` writes ``out`` as a run directory: the checkpoint in ``out/iter_{N:07d}/``
    (DeepSpeed: ``global_stepN/``, N the newest input's iteration) beside the tracker file, so
    Megatron-LM's and DeepSpeed's loaders find it (see :mod:`megatron_merge.run_layout`).

    The output appears atomically; on any error nothing is left at ``out`` and
    :class:`MergeError` names the file and key.
    """
    try:
        return _merge_checkpoints(
            inputs, out, method, alpha=alpha, weights=weights, normalize=normalize,
            model_only=model_only, accumulate_dtype=accumulate_dtype,
            allow_nonfinite=allow_nonfinite, force=force, workers=workers, verify=verify,
            verify_samples=verify_samples, progress=progress, format=format,
            as_run_dir=as_run_dir, trust_inputs=trust_inputs,
        )
    except OSError as err:  # disk full, permissions, ...: the temporary output is already gone
        raise MergeError(os_error_message(err, writing=out)) from None


def _merge_checkpoints(inputs, out, method, *, alpha, weights, normalize, model_only,
                       accumulate_dtype, allow_nonfinite, force, workers, verify, verify_samples,
                       progress, format, as_run_dir, trust_inputs) -> MergeResult:
    started = time.perf_counter()
    refs = _as_refs(inputs)
    out = check_output_path(out, [r.path for r in refs], force)
    plan = plan_merge(
        refs, method, alpha=alpha, weights=weights, normalize=normalize,
        model_only=model_only, accumulate_dtype=accumulate_dtype, format=format,
        trust_inputs=trust_inputs,
    )
    logger.info("merge plan:\n%s", plan.describe())
    verified = 0
    entry = None
    if as_run_dir:
        newest = plan.inputs[-1]
        entry = run_entry(getattr(plan, "format", "torch_dist"), newest.iteration, str(newest.path))
    with atomic_output_dir(out) as tmp:
        ckpt_tmp, ckpt_out = (tmp / entry.directory, out / entry.directory) if entry else (tmp, out)
        ckpt_tmp.mkdir(exist_ok=True)
        if isinstance(plan, MergePlan):
            execute_plan(
                plan, ckpt_tmp, workers=workers, allow_nonfinite=allow_nonfinite, progress=progress,
                checkpoint_id=str(ckpt_out.resolve()),
            )
            record = merge_record(plan, ckpt_out, allow_nonfinite)
        else:  # a per-rank-file format plans, writes and records itself
            plan.execute(ckpt_tmp, workers=workers, allow_nonfinite=allow_nonfinite, progress=progress)
            record = plan.record(ckpt_out, allow_nonfinite)
        # torch_dist copies opaque parts; with trust_inputs it did so without parsing them.
        record["trust_inputs"] = trust_inputs and isinstance(plan, MergePlan)
        (ckpt_tmp / MERGE_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if verify:
            from megatron_merge.verify import verify_merge

            verified = verify_merge(plan, ckpt_tmp, samples=verify_samples)
        if entry:
            (tmp / entry.tracker).write_text(entry.tracker_text + "\n")
    return MergeResult(out, plan, time.perf_counter() - started, verified)


def merge_record(plan: MergePlan, out: Path, allow_nonfinite: bool) -> dict:
    """The ``merge.json`` written beside the merged checkpoint."""
    return {
        **record_header(tool="megatron-merge", out=out, format="torch_dist", method=plan.method,
                        alpha=plan.alpha, weights=plan.weights,
                        inputs=input_entries(plan.inputs, plan.weights)),
        "normalize": plan.normalize,
        "accumulate_dtype": plan.accumulate_dtype,
        "allow_nonfinite": allow_nonfinite,
        "model_only": plan.model_only,
        "layout_from": str(plan.newest.path.resolve()),
        "inputs_with_other_layout": plan.inputs_with_other_layout,
        "merged": plan.merged_keys,
        "optimizer_merged": sorted(k for k in plan.merged_keys if _is_optimizer_key(k)),
        "copied_from_newest": plan.copied_keys,
        "dropped": plan.dropped_keys,
        "dropped_from_common_pt": plan.dropped_common_entries,
        "files_copied_from_newest": _extra_files(plan.newest.path),
    }


def _is_optimizer_key(key: str) -> bool:
    return key.startswith(OPTIMIZER_PREFIX) or _CHAINED_OPTIMIZER_KEY.match(key) is not None


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"
