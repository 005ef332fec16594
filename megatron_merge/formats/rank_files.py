"""Checkpoints made of whole ``torch.save`` files, one per rank, merged file by file.

Legacy Megatron ``torch`` checkpoints (``mp_rank_*/model_optim_rng.pt``) and DeepSpeed checkpoints
(``*_model_states.pt``, ``*_optim_states.pt``) keep each rank's state as one pickled object tree.
Nothing is resharded: every file of the newest input is written again under the same name, with

``merge``  the format's weight tensors (model weights, fp32 master weights) replaced by
           ``sum_i w_i * x_i`` (EMA: the paper's recursion) over the same file of every input,
           through the shared merge loop (:func:`megatron_merge.accumulate.merge_piece`); a
           tensor is one piece, or -- in a padded flat buffer -- each range of weights is;
``copy``   everything else taken from the newest input's file (optimizer moments, scheduler,
           RNG, args, non-float and empty tensors, unknown objects);
``drop``   optimizer entries or whole optimizer files with ``--model-only``.

A *slot* is a tensor's position in a file's tree: the keys and list indices that lead to it.
The formats (:mod:`.legacy`, :mod:`.deepspeed`) only say which files a checkpoint has, which
slots of a file are merged, what ``--model-only`` removes, and which classes their files may
pickle. This module is their part of the merge engine's contract (:mod:`.base`): planning, the item
writer, finishing and verifying; :mod:`megatron_merge.offline` runs it.

Safety: files are read by :func:`megatron_merge.safe_load.load_torch`
(``torch.load(weights_only=True)`` under an explicit allowlist, plus a per-format list); anything
else is refused with the file, key and class named. Memory: inputs are memory-mapped (``mmap=True``); a process holds one output file's
merged tensors plus one tensor's accumulator, so its peak is bounded by one file.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from megatron_merge.accumulate import PiecePart, merge_piece, resolve_accumulate_dtype
from megatron_merge.errors import MergeError, UnsafeCheckpointError
from megatron_merge.formats import is_extra_state
from megatron_merge.formats.base import (
    FormatPlan,
    ItemWriter,
    MergeSettings,
    PlanOptions,
    copy_as_is,
)
from megatron_merge.record import MERGE_RECORD_FILE
from megatron_merge.safe_load import load_torch
from megatron_merge.verify import reference_step

logger = logging.getLogger(__name__)


SlotPath = tuple  # keys (str/int/...) and list indices from the root of a file's object tree


# --------------------------------------------------------------------------------------------
# Reading files safely, walking their trees
# --------------------------------------------------------------------------------------------

def iter_tensors(obj: Any, prefix: SlotPath = ()) -> Iterator[tuple[SlotPath, torch.Tensor]]:
    """Every tensor in a tree of dicts, lists and tuples, with its slot path (depth first)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from iter_tensors(value, prefix + (key,))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from iter_tensors(value, prefix + (index,))


def weight_tensors(obj: Any, prefix: SlotPath = ()) -> Iterator[tuple[SlotPath, torch.Tensor]]:
    """Tensors under ``obj`` that a merge combines: floating point, not empty, not extra state."""
    for path, tensor in iter_tensors(obj, prefix):
        if tensor.dtype.is_floating_point and tensor.numel() > 0 and not (
                path and isinstance(path[-1], str) and is_extra_state(path[-1])):
            yield path, tensor


def get_at(obj: Any, path: SlotPath) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def replace_at(obj: Any, path: SlotPath, value: Any) -> Any:
    """``obj`` with the item at ``path`` replaced (in place where the containers allow it)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    child = replace_at(obj[head], rest, value)
    if isinstance(obj, tuple) and type(obj) is tuple:
        return obj[:head] + (child,) + obj[head + 1:]
    obj[head] = child
    return obj


def slot_text(path: SlotPath) -> str:
    """``("model", "decoder.final_layernorm.weight")`` -> ``model/decoder.final_layernorm.weight``."""
    return "/".join(str(key) for key in path)


# --------------------------------------------------------------------------------------------
# What a format provides
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileRule:
    """A format's decision for one file of the newest input."""

    merged: tuple[SlotPath, ...] = ()  # slots merged across inputs
    # For flat buffers with padding (ZeRO partitions): the [start, stop) element ranges of the
    # flattened tensor that hold weights. Only those are merged; the rest (padding, which may be
    # uninitialised memory) is copied from the newest input. Absent: the whole tensor is merged.
    ranges: dict = field(default_factory=dict)
    dropped_entries: tuple[str, ...] = ()  # top-level keys removed (--model-only)
    emptied_entries: tuple[str, ...] = ()  # top-level keys set to None (--model-only)
    drop_file: bool = False  # the whole file is left out (--model-only)
    why_dropped: str = ""


class RankFileCheckpoint:
    """Base of the per-rank-file formats: a checkpoint directory holding ``torch.save`` files.

    Subclasses set ``format`` and ``safe_globals()`` and implement ``_list_files``, ``rule``,
    ``iteration`` and optionally ``layout`` / ``check_matches``.
    """

    format = "?"
    # Classes allowed by name, imported only when a file turns out to need them (so that
    # merging files that hold none does not pay for importing megatron-core or DeepSpeed).
    on_demand_globals: frozenset[str] = frozenset()
    _resolved: dict[str, Any]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._resolved = {}

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MergeError(f"{self.path}: no such checkpoint directory")
        self._files = self._list_files()

    # -- provided by the formats ----------------------------------------------------------------

    def _list_files(self) -> list[str]:
        raise NotImplementedError

    def safe_globals(self) -> list:
        """Classes and functions (beyond torch's defaults) this format's files may pickle."""
        return []

    def rule(self, name: str, obj: Any, model_only: bool) -> FileRule:
        """Which slots of file ``name`` (already loaded as ``obj``) are merged, what is dropped."""
        raise NotImplementedError

    def iteration(self) -> int | None:
        return None

    def layout(self) -> dict:
        """The parallel layout, for the plan and merge.json."""
        return {}

    def check_complete(self) -> None:
        """Raise if a file the checkpoint's own stored layout calls for is missing."""

    def check_matches(self, source: "RankFileCheckpoint") -> None:
        """Raise if this input cannot be merged file by file with ``source`` (the reference
        input, whose layout the output keeps)."""
        mine, theirs = self.layout(), source.layout()
        if mine != theirs:
            raise MergeError(
                f"{self.path}: saved at layout {_layout_text(mine)}, the newest input {source.path} at "
                f"{_layout_text(theirs)}; {self.format} checkpoints are merged file by file and "
                f"need the same layout"
            )

    # -- shared ---------------------------------------------------------------------------------

    def files(self) -> list[str]:
        """Data files, relative to the checkpoint directory, sorted."""
        return list(self._files)

    def extra_files(self) -> list[str]:
        """Top-level entries that are not data files (copied from the newest input as they are)."""
        data_tops = {name.split("/", 1)[0] for name in self._files}
        return sorted(
            p.name for p in self.path.iterdir()
            if p.name not in data_tops and p.name != MERGE_RECORD_FILE
        )

    def load(self, name: str, mmap: bool = True) -> Any:
        """File ``name`` of this checkpoint, loaded safely (memory-mapped by default)."""
        return self.load_file(self.path / name, mmap)

    def load_file(self, path: Path, mmap: bool = True) -> Any:
        """Any file of this format, loaded with ``weights_only=True`` and the format's allowlist."""
        while True:
            try:
                return load_torch(path, extra_globals=[*self.safe_globals(), *self._resolved.values()],
                                  mmap=mmap)
            except UnsafeCheckpointError as err:
                if err.qualname not in self.on_demand_globals or err.qualname in self._resolved:
                    raise
                self._resolved[err.qualname] = self._import_global(err, path)

    def _import_global(self, err: UnsafeCheckpointError, path: Path) -> Any:
        import importlib

        module_name, _, attr = err.qualname.rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            raise MergeError(
                f"{path}: pickles {err.qualname}, which is allowed but cannot be imported here "
                f"(install the package that defines it)"
            ) from None

    def file_size(self, name: str) -> int:
        try:
            return (self.path / name).stat().st_size
        except FileNotFoundError:
            raise MergeError(f"{self.path / name}: missing") from None


def _layout_text(layout: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in layout.items() if k != "decided_from") or "unknown"


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One merged tensor: where it is in the file, its shape and dtype, and -- for a padded
    flat buffer -- the element ranges that are merged (each range is one piece)."""

    path: SlotPath
    shape: tuple[int, ...]
    dtype: torch.dtype
    ranges: tuple[tuple[int, int], ...] | None = None

    @property
    def text(self) -> str:
        return slot_text(self.path)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class RankFilePlan:
    """One output file: its name, the slots merged in it, the entries removed."""

    name: str
    merged: tuple[Slot, ...]
    dropped_entries: tuple[str, ...]
    emptied_entries: tuple[str, ...]
    copied: tuple[str, ...]  # what is taken from the newest input (for merge.json)
    nbytes: int  # size of the newest input's file

    @property
    def copy_only(self) -> bool:
        return not (self.merged or self.dropped_entries or self.emptied_entries)


@dataclass
class RankFileMergePlan(FormatPlan):
    """Everything decided about a per-rank-file merge before writing a byte."""

    format: str
    checkpoints: list[RankFileCheckpoint] = field(repr=False)
    reference: int
    files: list[RankFilePlan]
    dropped_files: dict[str, str]  # file -> why it is left out
    layout: dict
    bytes_to_read: int
    peak_bytes_per_worker: int
    saved_as: torch.dtype | None = None  # merged model weights' output dtype (--save-dtype)
    peak_memory_note = "one file's merged tensors and one tensor's working set; inputs are memory-mapped"

    @property
    def work_items(self) -> list[RankFilePlan]:
        return self.files

    @property
    def merged_keys(self) -> dict[str, dict[str, str]]:
        return {f.name: {s.text: str(s.dtype) for s in f.merged} for f in self.files if f.merged}

    def describe_lines(self) -> list[str]:
        n_merged = sum(len(f.merged) for f in self.files)
        lines = [
            f"format: {self.format} ({_layout_text(self.layout)}), merged file by file",
            f"files: {len(self.files)} written in the layout of {self.reference_checkpoint.path}, "
            f"{sum(1 for f in self.files if f.copy_only)} of them copied unchanged, "
            f"{len(self.dropped_files)} dropped",
            f"tensors: {n_merged} merged; everything else copied from that input",
        ]
        if self.saved_as is not None:
            lines.append(f"merged model weights saved as {self.saved_as}")
        return lines

    def record_fields(self) -> dict:
        return {
            "layout": self.layout,
            "merged": self.merged_keys,
            # fp32 master weights of the optimizer (Megatron's optimizer / distrib_optim.pt,
            # DeepSpeed's *optim_states.pt); their moments stay the reference input's
            "optimizer_merged": self._merged_optimizer_slots(),
            "copied_from_newest": {f.name: list(f.copied) for f in self.files},
            "dropped": {
                **{f.name: [*f.dropped_entries, *(f"{k} (set to None)" for k in f.emptied_entries)]
                   for f in self.files if f.dropped_entries or f.emptied_entries},
                **self.dropped_files,
            },
            "files_copied_from_newest": self.reference_checkpoint.extra_files(),
            "trust_inputs": False,  # every file is parsed: it is merged or checked
        }

    def _merged_optimizer_slots(self) -> dict[str, list[str]]:
        found = {}
        for f in self.files:
            chosen = [s.text for s in f.merged if is_optimizer_slot(f.name, s.path)]
            if chosen:
                found[f.name] = chosen
        return found

    def finish(self, out_dir: Path, results: dict, checkpoint_id: str, settings: MergeSettings) -> None:
        source = self.reference_checkpoint
        for extra in source.extra_files():
            copy_as_is(source.path / extra, out_dir / extra)

    def verify(self, out_dir: Path, settings: MergeSettings, samples: int, seed: int) -> int:
        return verify_rank_file_merge(self, out_dir, settings, samples=samples, seed=seed)


def is_optimizer_slot(name: str, path: SlotPath) -> bool:
    """Whether a merged slot is optimizer state: any slot of an optimizer file
    (``distrib_optim.pt``, ``*optim_states.pt``), or one under ``optimizer`` in a model file."""
    base = name.rsplit("/", 1)[-1]
    return base == "distrib_optim.pt" or base.endswith("optim_states.pt") or (bool(path) and path[0] == "optimizer")


def plan_format(checkpoints: list[RankFileCheckpoint], options: PlanOptions) -> RankFileMergePlan:
    """Check the inputs agree file by file and decide what happens to every file and tensor."""
    ref_index = options.reference % len(checkpoints)
    source = checkpoints[ref_index]
    others = [c for i, c in enumerate(checkpoints) if i != ref_index]
    for ckpt in checkpoints:
        ckpt.check_complete()
    for ckpt in others:
        ckpt.check_matches(source)
        extra = sorted(set(ckpt.files()) - set(source.files()))
        if extra:
            raise MergeError(
                f"{ckpt.path / extra[0]}: not in {source.path} (inputs must have the same files)"
            )
    acc_itemsize = options.accumulate_itemsize
    files, dropped_files = [], {}
    bytes_to_read, peak = 0, 0
    for name in source.files():
        obj = source.load(name)
        rule = source.rule(name, obj, options.model_only)
        if rule.drop_file:
            dropped_files[name] = rule.why_dropped
            continue
        slots = tuple(_slot(obj, path, rule) for path in rule.merged)
        _check_other_inputs(source, others, name, rule, slots, options.model_only)
        size = source.file_size(name)
        plan = RankFilePlan(
            name, slots, rule.dropped_entries, rule.emptied_entries,
            _copied_entries(obj, rule), size,
        )
        files.append(plan)
        bytes_to_read += size + sum(s.nbytes for s in slots) * (len(checkpoints) - 1)
        merged_bytes = sum(s.nbytes for s in slots)
        largest = max((s.nbytes for s in slots), default=0)
        largest_numel = max((s.nbytes // s.dtype.itemsize for s in slots), default=0)
        # merged tensors of the file + accumulator and converted term + one input tensor
        peak = max(peak, merged_bytes + 2 * largest_numel * acc_itemsize + largest)
        del obj
    return RankFileMergePlan(
        format=source.format, checkpoints=checkpoints, reference=ref_index, files=files,
        dropped_files=dropped_files, layout=source.layout(), bytes_to_read=bytes_to_read,
        peak_bytes_per_worker=peak, saved_as=options.save_dtype,
    )


def _slot(obj: Any, path: SlotPath, rule: FileRule) -> Slot:
    tensor = get_at(obj, path)
    ranges = rule.ranges.get(path)
    return Slot(path, tuple(tensor.shape), tensor.dtype, None if ranges is None else tuple(ranges))


def _check_other_inputs(source: RankFileCheckpoint, others: list[RankFileCheckpoint], name: str,
                        rule: FileRule, slots: tuple[Slot, ...], model_only: bool) -> None:
    """Every other input's file has the reference input's (``source``) merged tensors, same
    shapes and dtypes, no more."""
    wanted = {s.path for s in slots}
    for ckpt in others:
        where = ckpt.path / name
        if not where.is_file():
            raise MergeError(f"{where}: missing ({source.path} has {name})")
        obj = ckpt.load(name)
        for slot in slots:
            try:
                value = get_at(obj, slot.path)
            except (KeyError, IndexError, TypeError):
                raise MergeError(
                    f"{where}: key {slot.text!r} is missing (present in {source.path / name})"
                ) from None
            if not isinstance(value, torch.Tensor):
                raise MergeError(f"{where}: key {slot.text!r} is {type(value).__name__}, not a tensor")
            if tuple(value.shape) != slot.shape:
                raise MergeError(
                    f"{where}: key {slot.text!r} has shape {tuple(value.shape)}, "
                    f"{source.path / name} has {slot.shape}"
                )
            if value.dtype != slot.dtype:
                raise MergeError(
                    f"{where}: key {slot.text!r} has dtype {value.dtype}, "
                    f"{source.path / name} has {slot.dtype}"
                )
        older_rule = ckpt.rule(name, obj, model_only)
        for slot in slots:
            ranges = older_rule.ranges.get(slot.path)
            if (None if ranges is None else tuple(ranges)) != slot.ranges:
                raise MergeError(
                    f"{where}: key {slot.text!r}: the parameters are laid out differently in this "
                    f"flat buffer than in {source.path / name}"
                )
        extra = [p for p in older_rule.merged if p not in wanted]
        if extra:
            raise MergeError(
                f"{where}: key {slot_text(extra[0])!r} is a merged tensor here but not in the "
                f"newest input {source.path / name}"
            )
        del obj


def _copied_entries(obj: Any, rule: FileRule) -> tuple[str, ...]:
    """Top-level entries taken from the newest input (annotated where part of them is merged)."""
    if not isinstance(obj, dict):
        return ("(whole object)",) if not rule.merged else ("everything but the merged tensors",)
    merged_tops = {path[0] for path in rule.merged}
    removed = set(rule.dropped_entries) | set(rule.emptied_entries)
    copied = []
    for key in obj:
        if key in removed:
            continue
        if key not in merged_tops:
            copied.append(str(key))
            continue
        n_leaves = _count_leaves(obj[key])
        n_merged = sum(1 for p in rule.merged if p[0] == key)
        if n_leaves > n_merged:
            copied.append(f"{key}: everything but its {n_merged} merged tensors")
    return tuple(copied)


def _count_leaves(obj: Any) -> int:
    if isinstance(obj, dict):
        return sum(_count_leaves(v) for v in obj.values())
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        return sum(_count_leaves(v) for v in obj)
    return 1


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def item_writer(settings: MergeSettings, checkpoints: list[RankFileCheckpoint]) -> "RankFileItemWriter":
    """This format's writer of work items, in this process."""
    return RankFileItemWriter(list(checkpoints), settings)


class RankFileItemWriter(ItemWriter):
    """Writes output files: the reference input's tree with the merged slots replaced."""

    def write(self, item: RankFilePlan, out_dir: Path) -> None:
        target = Path(out_dir) / item.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if item.copy_only:
            shutil.copyfile(self.source.path / item.name, target)
            return None
        trees = [ckpt.load(item.name) for ckpt in self.checkpoints]  # memory-mapped
        out = trees[self.settings.reference]
        for slot in item.merged:
            original = get_at(out, slot.path)
            if slot.ranges is None:
                merged = self._merge_whole(item.name, trees, slot)
            else:
                merged = self._merge_ranges(item.name, trees, slot)
            if isinstance(original, torch.nn.Parameter):
                merged = torch.nn.Parameter(merged, requires_grad=original.requires_grad)
            elif original.requires_grad:  # e.g. DeepSpeed's fp32 partitions: keep what was saved
                merged.requires_grad_(True)
            out = replace_at(out, slot.path, merged)
        for key in item.dropped_entries:
            out.pop(key, None)
        for key in item.emptied_entries:
            out[key] = None
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(out, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(target)
        trees.clear()  # release the memory-mapped inputs now, not at the next file
        return None

    def _merge_whole(self, name: str, trees: list, slot: Slot) -> torch.Tensor:
        def parts_of_input(i: int) -> Iterator[PiecePart]:
            values = get_at(trees[i], slot.path)
            if not isinstance(values, torch.Tensor) or tuple(values.shape) != slot.shape:
                raise MergeError(
                    f"{self.checkpoints[i].path / name}: key {slot.text!r} changed since planning"
                )
            region = tuple(slice(None) for _ in slot.shape)
            yield PiecePart(region, values.detach(), f"{self.checkpoints[i].path / name} (key {slot.text!r})")

        return merge_piece(
            slot.shape, self.settings.output_dtype(slot.dtype, not is_optimizer_slot(name, slot.path)),
            self.settings.weights, parts_of_input, self.acc_dtype, self.settings.allow_nonfinite,
            describe_piece=f"key {slot.text!r} of {name}", ema_alpha=self.settings.ema_alpha,
        )

    def _merge_ranges(self, name: str, trees: list, slot: Slot) -> torch.Tensor:
        """A padded flat buffer: each weight range is a piece of the merge loop; padding is the
        reference input's."""
        out = get_at(trees[self.settings.reference], slot.path).detach().clone(
            memory_format=torch.contiguous_format)
        flat = out.view(-1)
        for start, stop in slot.ranges:

            def parts_of_input(i: int, start: int = start, stop: int = stop) -> Iterator[PiecePart]:
                values = get_at(trees[i], slot.path).detach().reshape(-1)[start:stop]
                origin = (f"{self.checkpoints[i].path / name} (key {slot.text!r}, "
                          f"elements [{start}, {stop}))")
                yield PiecePart((slice(None),), values, origin)

            flat[start:stop] = merge_piece(
                (stop - start,), slot.dtype, self.settings.weights, parts_of_input, self.acc_dtype,
                self.settings.allow_nonfinite,
                describe_piece=f"key {slot.text!r} of {name} [{start}, {stop})",
                ema_alpha=self.settings.ema_alpha,
            )
        return out


# --------------------------------------------------------------------------------------------
# --verify
# --------------------------------------------------------------------------------------------


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN padding equals itself, unlike ``torch.equal``)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.dtype.itemsize]
        return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))
    return torch.equal(a, b)


def verify_rank_file_merge(plan: RankFileMergePlan, out_dir: str | Path, settings: MergeSettings,
                           samples: int = 8, seed: int = 0) -> int:
    """Re-read the output and check sampled merged tensors against an independent recomputation.

    Every output file is loaded with plain ``torch.load(weights_only=True)`` (no memory map),
    dropped entries must be gone, and for up to ``samples`` merged tensors the expected value is
    recomputed from each input file (loaded the same way) with the documented formula and
    compared bit for bit. Returns how many tensors were checked.
    """
    out_dir = Path(out_dir)
    source = plan.reference_checkpoint
    expected_files = sorted(f.name for f in plan.files)
    written = sorted(
        str(p.relative_to(out_dir)) for p in out_dir.rglob("*.pt") if p.is_file()
    )
    if written != expected_files:
        raise MergeError(f"{out_dir}: verify: output files differ from the plan")
    candidates = [(f, s) for f in plan.files for s in f.merged]
    chosen = random.Random(seed).sample(candidates, min(samples, len(candidates)))
    acc_dtype = resolve_accumulate_dtype(settings.accumulate_dtype)
    for file_plan in plan.files:
        out_obj = source.load_file(out_dir / file_plan.name, mmap=False)
        if isinstance(out_obj, dict) and any(k in out_obj for k in file_plan.dropped_entries):
            raise MergeError(f"{out_dir / file_plan.name}: verify: dropped entries are still there")
        mine = [s for f, s in chosen if f is file_plan]
        if not mine:
            continue
        expected = [torch.zeros(s.shape, dtype=acc_dtype) for s in mine]
        padding = []  # what unmerged elements of padded flat buffers must hold: the reference's
        for i, (ckpt, weight) in enumerate(zip(plan.checkpoints, settings.weights)):
            tree = ckpt.load(file_plan.name, mmap=False)
            for acc, slot in zip(expected, mine):
                reference_step(acc, get_at(tree, slot.path), i, weight, settings.ema_alpha)
            if ckpt is source:
                padding = [get_at(tree, s.path) for s in mine]
            del tree
        for acc, slot, source_value in zip(expected, mine, padding):
            if slot.ranges is not None:
                want = acc.to(slot.dtype)
                keep = source_value.clone().reshape(-1)
                for start, stop in slot.ranges:
                    keep[start:stop] = want.reshape(-1)[start:stop]
                want = keep.reshape(slot.shape)
            else:
                want = acc.to(settings.output_dtype(slot.dtype, not is_optimizer_slot(file_plan.name, slot.path)))
            got = get_at(out_obj, slot.path)
            if not (isinstance(got, torch.Tensor) and same_bits(got, want)):
                raise MergeError(
                    f"{out_dir / file_plan.name}: verify failed: key {slot.text!r} differs from an "
                    f"independent recomputation"
                )
        del out_obj
    logger.info("verified %d merged tensors against an independent recomputation", len(chosen))  # out_dir: staging
    return len(chosen)
