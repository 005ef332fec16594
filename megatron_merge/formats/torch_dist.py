"""Merging ``torch_dist`` checkpoints chunk by chunk: the format's plan and item writer.

Planning reads only metadata (:mod:`.dcp` opens the files). It checks the inputs agree (keys,
global shapes, dtypes), that every byte it will read is present, and decides for every item of
the reference input (the newest, unless ``--state-from``) what happens to it:

``merge``  floating-point model tensors: ``sum_i w_i * chunk_i`` (see ``accumulate``),
           and the optimizer's fp32 master weights in every layout megatron-core saves
           (``fp32_param``, fully reshardable ``param``, dp_reshardable bucket ``param``
           -- see :mod:`.distributed_optimizer`; the gaps between parameters in a bucket
           are copied);
``copy``   taken from the reference unchanged: optimizer state (``optimizer.*`` keys, so the
           merge can resume training), non-float tensors, opaque objects (TE ``_extra_state``,
           RNG state, ...), and ``common.pt`` / ``metadata.json``;
``drop``   optimizer state with ``model_only`` (its sharded keys, and the ``optimizer`` /
           ``opt_param_scheduler`` entries of ``common.pt``, which is then re-saved).

The output keeps the reference's chunking and file layout: same ``.distcp`` names, same items
in each file, in the same order. A work item is one output ``.distcp`` file. Each merged chunk
is assembled from whichever stored chunks of each input overlap it, so inputs saved under
different parallel layouts (TP=2, then TP=1) merge too. ``.metadata`` is written last, from the
storage entries every process returns, in plan order (so the bytes never depend on who wrote
which file).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from megatron_merge.accumulate import (
    PieceBuffers,
    PiecePart,
    merge_piece,
    numel,
    region_within,
)
from megatron_merge.errors import MergeError
from megatron_merge.formats import is_extra_state
from megatron_merge.formats.base import (
    Action,
    FormatPlan,
    ItemWriter,
    MergeSettings,
    PlanOptions,
    copy_as_is,
)
from megatron_merge.formats.dcp import (
    COMMON_FILE,
    DCP_METADATA_FILE,
    DistcpFileWriter,
    StoredItem,
    TorchDistCheckpoint,
    output_metadata,
    write_dcp_metadata,
)
from megatron_merge.formats.distributed_optimizer import (
    bucket_gap_chunks,
    check_same_bucket_layout,
    is_bucket_master_key,
)
from megatron_merge.record import MERGE_RECORD_FILE
from megatron_merge.safe_load import load_torch

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

# Input bytes the merge asks the kernel to read ahead of the chunk it is merging (see
# _Readahead): enough to cover a few chunks' merge time, small next to any page cache.
READAHEAD_BYTES = 256 * 2**20


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemPlan:
    """What to do with one item of the reference input (and so of the output)."""

    index: MetadataIndex
    action: Action  # MERGE or COPY
    key: str
    offsets: tuple[int, ...] | None  # None for bytes items
    sizes: tuple[int, ...] | None
    nbytes: int  # stored length in the reference input


@dataclass(frozen=True)
class FilePlan:
    """One output ``.distcp`` file (a work item): its name and items, in the reference's order."""

    name: str
    items: tuple[ItemPlan, ...]

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self.items)


@dataclass
class TorchDistPlan(FormatPlan):
    """Everything decided about a torch_dist merge before writing a byte."""

    checkpoints: list[TorchDistCheckpoint] = field(repr=False)
    reference: int
    files: list[FilePlan]
    merged_keys: dict[str, str]  # key -> dtype
    copied_keys: dict[str, str]  # key -> why it is copied from the reference
    dropped_keys: dict[str, str]  # key -> why it is left out
    dropped_common_entries: list[str]  # optimizer entries left out of common.pt (model_only)
    inputs_with_other_layout: list[str]
    output_dtypes: dict[str, torch.dtype]  # merged keys stored in another dtype (--save-dtype)
    bytes_to_read: int
    peak_bytes_per_worker: int
    trust_inputs: bool = False  # opaque parts copied unparsed
    format: str = "torch_dist"
    peak_memory_note = "largest chunk working set, on top of the Python/torch process baseline"

    @property
    def work_items(self) -> list[FilePlan]:
        return self.files

    def describe_lines(self) -> list[str]:
        n_chunks = sum(1 for f in self.files for i in f.items if i.action is Action.MERGE)
        lines = [
            f"layout from {self.reference_checkpoint.path}: {len(self.files)} .distcp files, "
            f"{n_chunks} merged chunks",
            f"keys: {len(self.merged_keys)} merged, {len(self.copied_keys)} copied from it, "
            f"{len(self.dropped_keys)} dropped",
        ]
        if self.output_dtypes:
            lines.append(f"saved as {next(iter(self.output_dtypes.values()))}: "
                         f"{len(self.output_dtypes)} merged model keys")
        if self.inputs_with_other_layout:
            lines.append("inputs saved under a different layout (resharded on the fly):")
            lines += [f"  {p}" for p in self.inputs_with_other_layout]
        return lines

    def record_fields(self) -> dict:
        return {
            "inputs_with_other_layout": self.inputs_with_other_layout,
            "merged": self.merged_keys,
            "optimizer_merged": sorted(k for k in self.merged_keys if is_optimizer_key(k)),
            "copied_from_newest": self.copied_keys,
            "dropped": self.dropped_keys,
            "dropped_from_common_pt": self.dropped_common_entries,
            "files_copied_from_newest": extra_files(self.reference_checkpoint.path),
            "trust_inputs": self.trust_inputs,
        }

    def finish(self, out_dir: Path, results: dict[str, Any], checkpoint_id: str,
               settings: MergeSettings) -> None:
        source = self.reference_checkpoint
        storage_data: dict[MetadataIndex, _StorageInfo] = {}
        for file_plan in self.files:  # plan order, whoever wrote the file
            storage_data.update(results[file_plan.name])
        # Derived, not random: the same merge to the same place gives the same bytes.
        save_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{checkpoint_id}|{settings!r}"))
        metadata = output_metadata(
            source.metadata, storage_data, set(self.dropped_keys), checkpoint_id=checkpoint_id,
            save_id=save_id, dtypes=self.output_dtypes,
        )
        write_dcp_metadata(out_dir, metadata)
        for extra in extra_files(source.path):
            if extra == COMMON_FILE and self.dropped_common_entries:
                _write_common_without_optimizer(source, out_dir / COMMON_FILE)
            else:
                copy_as_is(source.path / extra, out_dir / extra)

    def verify(self, out_dir: Path, settings: MergeSettings, samples: int, seed: int) -> int:
        from megatron_merge.verify import verify_dcp_merge

        return verify_dcp_merge(self, out_dir, settings, samples=samples, seed=seed)


def is_optimizer_key(key: str) -> bool:
    return key.startswith(OPTIMIZER_PREFIX) or _CHAINED_OPTIMIZER_KEY.match(key) is not None


def classify_key(key: str, meta, model_only: bool) -> tuple[Action, str]:
    """Decide MERGE / COPY / DROP for a key of the reference input, with the reason."""
    unchained = _unchained(key)
    if unchained.startswith(MASTER_WEIGHT_PREFIXES):
        if model_only:
            return Action.DROP, "optimizer state (--model-only)"
        # fp32 master weights: the optimizer copies them back into the model when training
        # resumes, so they are merged like the weights or the merge would be undone.
        return Action.MERGE, f"fp32 master weights ({meta.properties.dtype})"
    if is_bucket_master_key(unchained):
        if model_only:
            return Action.DROP, "optimizer state (--model-only)"
        return Action.MERGE, "fp32 master weights, distributed optimizer buckets (dp_reshardable)"
    if is_optimizer_key(key):
        if model_only:
            return Action.DROP, "optimizer state (--model-only)"
        return Action.COPY, "optimizer state"
    if key.startswith(MERGE_STATE_PREFIX):
        if model_only:
            return Action.DROP, "in-training merge state (--model-only)"
        return Action.COPY, "in-training merge state"
    if isinstance(meta, BytesStorageMetadata):
        return Action.COPY, "opaque object"
    if is_extra_state(key):
        return Action.COPY, "extra state"
    dtype = meta.properties.dtype
    if not dtype.is_floating_point:
        return Action.COPY, f"non-float tensor ({dtype})"
    return Action.MERGE, str(dtype)


def _unchained(key: str) -> str:
    """``key`` without the ``chained_N.`` prefix a split (chained) optimizer adds."""
    return key.split(".", 1)[1] if _CHAINED_OPTIMIZER_KEY.match(key) else key


def plan_format(checkpoints: list[TorchDistCheckpoint], options: PlanOptions) -> TorchDistPlan:
    """Check the inputs (oldest first) and decide what happens to every item of the reference.

    Every input's files are checked against its metadata. The opaque parts the output copies
    (``common.pt``, bytes items, other ``.pt`` files) are parsed by the safe reader first
    unless ``options.trust_inputs``, which copies them unread.
    """
    ref_index = options.reference % len(checkpoints)
    source = checkpoints[ref_index]
    others = [c for i, c in enumerate(checkpoints) if i != ref_index]
    if not (source.path / COMMON_FILE).exists():
        raise MergeError(f"{source.path / COMMON_FILE}: missing; not a complete torch_dist checkpoint")
    for ckpt in checkpoints:
        ckpt.check_files()
    if not options.trust_inputs:
        source.check_opaque_parts()
        for ckpt in others:  # not copied, but a hostile or damaged input is refused
            if (ckpt.path / COMMON_FILE).exists():
                ckpt.load_common()
        for extra in extra_files(source.path):
            if extra != COMMON_FILE and extra.endswith((".pt", ".pth")) and (source.path / extra).is_file():
                load_torch(source.path / extra)

    model_only = options.model_only
    actions = {key: classify_key(key, meta, model_only)
               for key, meta in source.metadata.state_dict_metadata.items()}
    dropped_common = []
    if model_only:  # common.pt is rewritten without its optimizer entries: it must be readable
        dropped_common = [k for k in COMMON_OPTIMIZER_KEYS if k in source.load_common()]
    merged = {k: why for k, (action, why) in actions.items() if action is Action.MERGE}
    buckets = [key for key in merged if is_bucket_master_key(_unchained(key))]
    for ckpt in others:
        for key in buckets:
            if key in ckpt.metadata.state_dict_metadata:
                check_same_bucket_layout(ckpt, source, key)
    _check_inputs_agree(source, others, merged, model_only)
    gaps = {key: bucket_gap_chunks(source, key) for key in buckets}
    other_layout = [str(c.path) for c in others
                    if any(_boxes(c, key) != _boxes(source, key) for key in merged)]
    output_dtypes = {}
    if options.save_dtype is not None:
        output_dtypes = {
            key: options.save_dtype for key in merged
            if not is_optimizer_key(key) and source.tensor_metadata(key).properties.dtype != options.save_dtype
        }

    sizing = _Sizing(options.accumulate_itemsize)
    files = []
    for name, items in source.items_by_file().items():
        planned = tuple(
            _plan_item(item, _item_action(item, actions, gaps), checkpoints, ref_index, sizing)
            for item in items
            if actions[item.key][0] is not Action.DROP
        )
        if planned:
            files.append(FilePlan(name, planned))
    return TorchDistPlan(
        checkpoints=checkpoints,
        reference=ref_index,
        files=files,
        merged_keys=merged,
        copied_keys={k: why for k, (action, why) in actions.items() if action is Action.COPY},
        dropped_keys={k: why for k, (action, why) in actions.items() if action is Action.DROP},
        dropped_common_entries=dropped_common,
        inputs_with_other_layout=other_layout,
        output_dtypes=output_dtypes,
        bytes_to_read=sizing.bytes_to_read,
        peak_bytes_per_worker=sizing.peak_bytes,
        trust_inputs=options.trust_inputs,
    )


def _item_action(item: StoredItem, actions: dict, gaps: dict) -> Action:
    """The key's action, except for the gaps of a distributed-optimizer bucket (copied)."""
    if item.is_tensor and tuple(item.index.offset) in gaps.get(item.key, ()):
        return Action.COPY
    return actions[item.key][0]


@dataclass
class _Sizing:
    """Running totals while planning: bytes to read and the largest per-chunk working set."""

    acc_itemsize: int
    bytes_to_read: int = 0
    peak_bytes: int = 0


def _plan_item(item: StoredItem, action: Action, checkpoints: list[TorchDistCheckpoint],
               ref_index: int, sizing: _Sizing) -> ItemPlan:
    """Plan one item of the reference input: check every byte it needs is there, and size it."""
    source = checkpoints[ref_index]
    source.check_stored(item.storage, item.key)
    if not item.is_tensor:
        sizing.bytes_to_read += item.storage.length
        return ItemPlan(item.index, Action.COPY, item.key, None, None, item.storage.length)
    chunk = source.chunk_at(item.key, tuple(item.index.offset))
    planned = ItemPlan(item.index, action, item.key, chunk.offsets, chunk.sizes, item.storage.length)
    itemsize = source.tensor_metadata(item.key).properties.dtype.itemsize
    n = numel(chunk.sizes)
    if action is Action.COPY:
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


def _check_inputs_agree(source: TorchDistCheckpoint, others: list[TorchDistCheckpoint],
                        merged: dict[str, str], model_only: bool) -> None:
    """Every input has exactly the reference's merged keys, with equal shapes and dtypes."""
    for ckpt in others:
        where = ckpt.path / DCP_METADATA_FILE
        for key in merged:
            meta = ckpt.metadata.state_dict_metadata.get(key)
            ref = source.tensor_metadata(key)
            if meta is None:
                raise MergeError(f"{where}: key {key!r} is missing (present in {source.path})")
            if ckpt.tensor_metadata(key) is None:
                raise MergeError(f"{where}: key {key!r} is not a tensor (it is in {source.path})")
            if tuple(meta.size) != tuple(ref.size):
                raise MergeError(
                    f"{where}: key {key!r} has global shape {tuple(meta.size)}, "
                    f"{source.path} has {tuple(ref.size)}"
                )
            if meta.properties.dtype != ref.properties.dtype:
                raise MergeError(
                    f"{where}: key {key!r} has dtype {meta.properties.dtype}, "
                    f"{source.path} has {ref.properties.dtype}"
                )
        for key, meta in ckpt.metadata.state_dict_metadata.items():
            if key not in merged and classify_key(key, meta, model_only)[0] is Action.MERGE:
                raise MergeError(
                    f"{where}: key {key!r} is not a merged tensor in {source.path}"
                )


def _boxes(ckpt: TorchDistCheckpoint, key: str) -> set[tuple]:
    return {(c.offsets, c.sizes) for c in ckpt.chunks(key)}


def extra_files(checkpoint_dir: Path) -> list[str]:
    """Files of the reference copied as they are: common.pt, metadata.json, anything else
    that is not DCP data (which we regenerate) or a previous merge record."""
    skip = {DCP_METADATA_FILE, MERGE_RECORD_FILE}
    return sorted(
        p.name for p in checkpoint_dir.iterdir()
        if p.name not in skip and not p.name.endswith(".distcp")
    )


def _write_common_without_optimizer(source: TorchDistCheckpoint, target: Path) -> None:
    common = source.load_common()
    for key in COMMON_OPTIMIZER_KEYS:
        common.pop(key, None)
    torch.save(common, target)


# --------------------------------------------------------------------------------------------
# Writing work items
# --------------------------------------------------------------------------------------------


def item_writer(settings: MergeSettings, checkpoints: Sequence[TorchDistCheckpoint]) -> "TorchDistItemWriter":
    """This format's writer of work items, in this process."""
    return TorchDistItemWriter(list(checkpoints), settings)


class TorchDistItemWriter(ItemWriter):
    """Writes output ``.distcp`` files; returns each item's new storage entry."""

    def __init__(self, checkpoints: list[TorchDistCheckpoint], settings: MergeSettings):
        super().__init__(checkpoints, settings)
        self.buffers = PieceBuffers()  # reused across chunks

    def write(self, item: FilePlan, out_dir: Path) -> list[tuple[MetadataIndex, _StorageInfo]]:
        results = []
        readahead = _Readahead(self, item.items)
        with DistcpFileWriter(Path(out_dir) / item.name) as writer:
            for position, piece in enumerate(item.items):
                readahead.ask_beyond(position)
                if piece.offsets is None:
                    stored = StoredItem(piece.index, self.source.metadata.storage_data[piece.index])
                    info = writer.copy_item(self.source, stored)
                elif piece.action is Action.COPY:
                    stored_chunk = self.source.chunk_at(piece.key, piece.offsets)
                    info = writer.write_tensor(self.source.read_chunk(stored_chunk, self.buffers))
                else:
                    info = writer.write_tensor(self._merge_chunk(piece))
                results.append((piece.index, info))
        return results

    def _merge_chunk(self, item: ItemPlan) -> torch.Tensor:
        """One output chunk from the overlapping stored chunks of every input."""

        def parts_of_input(i: int) -> Iterator[PiecePart]:
            ckpt = self.checkpoints[i]
            for stored, offsets, sizes in ckpt.chunks_overlapping(item.key, item.offsets, item.sizes):
                # Into the reused input buffer: merge_piece is done with a part before asking
                # for the next, and the result has its own buffer.
                values = ckpt.read_chunk(stored, self.buffers)
                if tuple(sizes) != stored.sizes:
                    values = values[region_within(offsets, sizes, stored.offsets)]
                origin = (
                    f"{ckpt.path / stored.storage.relative_path} (key {item.key!r}, "
                    f"chunk offsets {stored.offsets})"
                )
                yield PiecePart(region_within(offsets, sizes, item.offsets), values, origin)

        source_dtype = self.source.tensor_metadata(item.key).properties.dtype
        return merge_piece(
            item.sizes, self.settings.output_dtype(source_dtype, not is_optimizer_key(item.key)),
            self.settings.weights, parts_of_input, self.acc_dtype, self.settings.allow_nonfinite,
            describe_piece=f"key {item.key!r} chunk at offsets {item.offsets}",
            ema_alpha=self.settings.ema_alpha,
            buffers=self.buffers,  # the chunk is written before the next one is merged
        )


class _Readahead:
    """Asks the kernel to read the input chunks of the items after the one being merged, up to
    ``READAHEAD_BYTES`` ahead (page-cache hints; see :meth:`TorchDistCheckpoint.prefetch`).

    The disk then stays busy while the CPU merges -- also while the merge waits for a CPU on
    a busy host -- instead of idling until the next read asks for data.
    """

    def __init__(self, writer: TorchDistItemWriter, items: Sequence[ItemPlan]):
        self.writer, self.items, self.asked = writer, items, 0  # items[:asked] were asked for
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
        return self.writer.checkpoints if item.action is Action.MERGE else [self.writer.source]

    def _input_bytes(self, item: ItemPlan) -> int:
        return 0 if item.offsets is None else item.nbytes * len(self._sources(item))
