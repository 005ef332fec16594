"""The in-training merger: every rank merges its own parameter partition, in place.

Every ``interval`` iterations each rank takes a snapshot of the parameters it holds (its TP
shard of its PP stage, its experts). Data-parallel replicas hold identical parameters, so each
parameter's snapshots live on one replica only (its *owner*, chosen by size within the
replica group): host memory is not duplicated across DP ranks. When merged weights are needed
(an evaluation, a merged checkpoint) owners merge their parameters and broadcast the result to
the other replicas of their group. No collective ever gathers weights across tensor, pipeline or
expert partitions.

The arithmetic is the offline tool's, from one place (:mod:`megatron_merge.accumulate`):
stored snapshots are merged by :func:`~megatron_merge.accumulate.merge_piece`, saved
checkpoints (``storage: disk``, PMA-init, loss-spike recovery: :meth:`PartitionMerger.merge_checkpoints`)
by one :class:`~megatron_merge.accumulate.PieceAccumulator` per owned parameter fed one
checkpoint at a time, and the running EMA by :func:`~megatron_merge.accumulate.ema_update`.
This module only decides which values go in: who owns what, where snapshots are kept, which
checkpoints to read. A merge that fails on one rank (NaN/Inf in its shard, a directory it cannot
see) fails on every rank together, with that rank's message (:func:`_fail_together`).

Storage (``storage``):

* ``host`` / ``device``: snapshots (sma, wma, wsm-*, weights: the newest ``window``) or one fp32
  accumulator (ema: a running EMA over every snapshot) in CPU (pinned when CUDA is used) or GPU
  memory.
* ``disk``: nothing in memory; the snapshots are the training checkpoints saved at those
  iterations, and each rank reads back only its own partition of them.

The merge state (snapshots or accumulator, and their iterations) is saved inside the training
checkpoint under ``merge_state.*`` keys that are sharded exactly like the parameters, so a
resumed run (even at another parallel layout) has the merged weights an uninterrupted run has.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_merge.accumulate import PieceAccumulator, PiecePart, ema_update, merge_piece, resolve_accumulate_dtype
from megatron_merge.errors import MergeError
from megatron_merge.ranks import first_failure
from megatron_merge.weights import merge_weights

logger = logging.getLogger(__name__)

STATE_PREFIX = "merge_state"
# The NaN/Inf error's advice in merges of saved checkpoints during a run: the run config has no
# override (megatron-merge's --allow-nonfinite has no counterpart); callers name their own keys.
ONLINE_NONFINITE_HINT = ("the merge refuses NaN/Inf (no config key overrides this): that checkpoint is damaged or "
                         "training had diverged when it was saved")
SNAPSHOT_NONFINITE_HINT = ("the merge refuses NaN/Inf (no config key overrides this): training had diverged when "
                           "that snapshot was taken")


@dataclass(frozen=True)
class OnlineMergeSpec:
    """What to merge and where to keep it (the run config's ``merge`` section, resolved)."""

    method: str
    window: int
    interval: int  # V, in iterations
    start_iteration: int = 0
    ema_alpha: float = 0.2
    weights: tuple[float, ...] = ()
    storage: str = "host"
    store: int = 0  # snapshots other merges (the run's merge candidates) need kept beyond the window

    @property
    def store_size(self) -> int:
        """How many of the newest snapshots the store keeps (host/device storage)."""
        return max(0 if self.method == "ema" else self.window, self.store)

    def weights_for(self, count: int) -> list[float]:
        """Weights of ``count`` snapshots (oldest first); one snapshot is taken as it is."""
        if count == 1:
            return [1.0]
        if self.method == "weights":
            return merge_weights("weights", count, weights=list(self.weights)[-count:])
        return merge_weights(self.method, count, alpha=self.ema_alpha if self.method == "ema" else None)

    def is_snapshot_iteration(self, iteration: int) -> bool:
        return iteration >= self.start_iteration and iteration > 0 and iteration % self.interval == 0


@dataclass
class _Slot:
    """One parameter of this rank and its merge state."""

    name: str
    param: torch.nn.Parameter
    sharded: object  # the parameter's ShardedTensor (or factory) in the model's sharded state dict
    group: Optional[dist.ProcessGroup]  # the replicas holding the same values
    owner: int  # global rank that keeps this parameter's merge state
    snapshots: list = field(default_factory=list)  # oldest first (host/device storage)
    accumulator: Optional[torch.Tensor] = None  # ema


class PartitionMerger:
    """Snapshots and merged weights of this rank's own parameters.

    ``model_chunks`` are the (unwrapped) megatron-core modules of this rank; ``sharded_params``
    maps each parameter to its sharded-state-dict entry (see :func:`map_sharded_params`);
    ``replica_group_of`` gives, per parameter, the process group of the ranks holding the same
    values (data-parallel replicas), or None for no replicas.
    """

    def __init__(self, spec: OnlineMergeSpec, named_params: Sequence[tuple[str, torch.nn.Parameter]],
                 sharded_params: dict, replica_group_of, run_dir: Optional[str] = None):
        self.spec = spec
        self.run_dir = run_dir
        self.iterations: list[int] = []  # snapshot iterations in the window, oldest first
        self.total_snapshots = 0  # every snapshot ever taken (the EMA's length)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self._pending_copy = None  # CUDA event of the newest asynchronous snapshot
        self.slots = _assign_owners(named_params, sharded_params, replica_group_of)
        # Other merges served from this store (megatron_merge.candidates.CandidateMerges): their
        # state is saved and restored with this merger's.
        self.candidates = None

    # -- taking snapshots -------------------------------------------------------------------

    @property
    def owned(self) -> list[_Slot]:
        return [s for s in self.slots if s.owner == self.rank]

    def maybe_snapshot(self, iteration: int) -> bool:
        """Snapshot this rank's parameters if ``iteration`` is a merge point; returns whether it did."""
        if not self.spec.is_snapshot_iteration(iteration):
            return False
        self.iterations.append(iteration)
        self.total_snapshots += 1
        if self.spec.method != "ema":
            self.iterations = self.iterations[-self.spec.store_size:]
        if self.spec.storage == "disk" and self.spec.method != "ema":
            return True  # the checkpoint saved at this iteration is the snapshot
        with torch.no_grad():
            for slot in self.owned:
                self._record(slot)
        if self.candidates is not None:
            self.candidates.after_snapshot()
        if torch.cuda.is_available():
            event = torch.cuda.Event()
            event.record()
            self._pending_copy = event
        return True

    def _record(self, slot: _Slot) -> None:
        value = slot.param.detach()
        if self.spec.method == "ema":
            if slot.accumulator is None:
                slot.accumulator = self.new_buffer(value, torch.float32)
            first = self.total_snapshots == 1
            ema_update(slot.accumulator, value.to(slot.accumulator.device, non_blocking=False),
                       self.spec.ema_alpha, first=first)
            if self.spec.store_size == 0:
                return
        if len(slot.snapshots) == self.spec.store_size:  # reuse the oldest buffer
            buffer = slot.snapshots.pop(0)
        else:
            buffer = self.new_buffer(value, value.dtype)
        buffer.copy_(value, non_blocking=buffer.is_pinned())  # ordered before later in-place updates
        slot.snapshots.append(buffer)

    def new_buffer(self, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor shaped like ``like`` where this merger keeps its state."""
        return torch.empty(like.shape, dtype=dtype, device=self.state_device(like), pin_memory=self._pin(like))

    def state_device(self, value: torch.Tensor) -> torch.device:
        """Where merge state for ``value`` lives (its device with storage device, else the CPU)."""
        return value.device if self.spec.storage == "device" else torch.device("cpu")

    def _pin(self, value: torch.Tensor) -> bool:
        return self.spec.storage == "host" and value.is_cuda

    def wait_for_copies(self) -> None:
        """Wait until the newest asynchronous snapshot copy has landed."""
        if self._pending_copy is not None:
            self._pending_copy.synchronize()
            self._pending_copy = None

    # -- merged weights ---------------------------------------------------------------------

    @property
    def count(self) -> int:
        """How many snapshots the merged weights combine."""
        return self.total_snapshots if self.spec.method == "ema" else min(len(self.iterations), self.spec.window)

    @property
    def _reads_from_disk(self) -> bool:
        return self.spec.storage == "disk" and self.spec.method != "ema"

    @property
    def stored(self) -> int:
        """How many snapshots the store holds (the newest of :attr:`iterations`)."""
        if self._reads_from_disk:
            return 0
        return min(len(self.iterations), self.spec.store_size)

    @property
    def merged_iterations(self) -> list[int]:
        """The snapshot iterations the merged weights combine, oldest first."""
        return list(self.iterations[-self.count:]) if self.count else []

    def weights(self) -> list[float]:
        return self.spec.weights_for(self.count)

    def merged_owned(self) -> dict[str, torch.Tensor]:
        """Merged values of the parameters this rank owns (in the parameters' dtype, on CPU or device)."""
        if self.count == 0:
            raise RuntimeError("no snapshot taken yet: nothing to merge")
        self.wait_for_copies()
        if self.spec.method == "ema":
            return {s.name: s.accumulator.to(s.param.dtype) for s in self.owned}
        if self.spec.storage == "disk":
            return self._merge_from_disk()
        return self.merge_stored(range(self.stored - self.count, self.stored), self.weights())

    def merge_stored(self, positions: Sequence[int], weights: Sequence[float]) -> dict[str, torch.Tensor]:
        """Merge stored snapshots (``positions`` in the store, oldest first) of the owned parameters.

        Collective (every rank calls it): a failure on any rank (NaN/Inf in a snapshot) raises
        the same MergeError on every rank."""
        self.wait_for_copies()
        positions = list(positions)
        merged, failure = {}, None
        try:
            for slot in self.owned:
                parts = lambda i, slot=slot: [PiecePart(_whole(slot.param), slot.snapshots[positions[i]],
                                                        f"snapshot of {slot.name}")]
                merged[slot.name] = merge_piece(slot.param.shape, slot.param.dtype, list(weights), parts,
                                                describe_piece=slot.name, nonfinite_hint=SNAPSHOT_NONFINITE_HINT)
        except MergeError as err:
            failure = err
        _fail_together(failure)
        return merged

    def _merge_from_disk(self) -> dict[str, torch.Tensor]:
        directories = [Path(self.run_dir) / f"iter_{it:07d}" for it in self.merged_iterations]
        return self.merge_checkpoints(directories, self.weights())

    def merge_checkpoints(self, directories: Sequence[Path], weights: Sequence[float],
                          ema_alpha: Optional[float] = None, *, accumulate_dtype: str = "fp32",
                          allow_nonfinite: bool = False,
                          nonfinite_hint: str = ONLINE_NONFINITE_HINT) -> dict[str, torch.Tensor]:
        """Merge this rank's owned parameters from saved torch_dist checkpoints (oldest first).

        Each checkpoint is read once, only this rank's owned part of it (collective: every rank
        calls it), and fed to one :class:`~megatron_merge.accumulate.PieceAccumulator` per owned
        parameter: the offline tool's arithmetic, checks and bits (a weighted sum, or the EMA
        recursion with ``ema_alpha``). Memory: one accumulator per owned parameter plus one
        checkpoint's owned part. ``accumulate_dtype`` is ``"fp32"`` or ``"fp64"``;
        ``nonfinite_hint`` ends the NaN/Inf error (what the caller's user can do about it).

        A failure on any rank fails the merge on every rank together (see :func:`_fail_together`):
        the directories are checked before the first load, and every rank's outcome is exchanged
        after each checkpoint's accumulation, so no rank is left waiting in the next load.

        Raises:
            MergeError (with several ranks the same on every rank, naming the rank that found
            it): a directory is not a torch_dist checkpoint, a load failed, or (unless
            ``allow_nonfinite``) an owned parameter holds NaN/Inf.
        """
        from megatron_merge import safe_dist_checkpointing

        if len(directories) != len(weights):
            raise MergeError(f"{len(directories)} checkpoints but {len(weights)} weights")
        owned = self.owned
        acc_dtype = resolve_accumulate_dtype(accumulate_dtype)
        pieces = {s.name: PieceAccumulator(s.param.shape, s.param.dtype, weights, acc_dtype=acc_dtype,
                                           allow_nonfinite=allow_nonfinite, describe_piece=s.name,
                                           ema_alpha=ema_alpha, nonfinite_hint=nonfinite_hint) for s in owned}
        directories = [Path(d) for d in directories]
        # Our own checks first, agreed on before anyone enters a load (a file missing on one node).
        _fail_together(next(filter(None, map(_check_checkpoint_dir, directories)), None))
        for directory in directories:
            failure = None
            try:
                request = {s.name: _retarget(s.sharded, s.sharded.key,
                                             torch.empty(s.param.shape, dtype=s.param.dtype), owner=True)
                           for s in owned}
                # Collective: every rank calls it. DCP gathers its own read errors onto every rank.
                loaded = safe_dist_checkpointing.load(request, directory)
                for slot in owned:
                    origin = f"{directory} (key {slot.sharded.key!r})"
                    pieces[slot.name].add([PiecePart(_whole(slot.param), loaded.pop(slot.name), origin)])
                del loaded
            except (Exception, CheckpointException) as err:  # noqa: BLE001 - DCP's is a BaseException
                failure = err
            _fail_together(failure, where=directory)
        return {name: piece.result() for name, piece in pieces.items()}

    def install(self, merged_owned: dict[str, torch.Tensor]) -> None:
        """Write merged values into the model: owners copy theirs, then broadcast to their replicas."""
        with torch.no_grad():
            for slot in self.slots:
                if slot.owner == self.rank:
                    slot.param.copy_(merged_owned[slot.name])
                if slot.group is not None:
                    dist.broadcast(slot.param.data, src=slot.owner, group=slot.group)

    @contextlib.contextmanager
    def merged_weights_in_model(self) -> Iterator[None]:
        """Swap the merged weights into the model (no grad) and restore the raw ones bit-exactly."""
        merged = self.merged_owned()
        with self.raw_weights_kept():
            self.install(merged)
            del merged
            yield

    @contextlib.contextmanager
    def raw_weights_kept(self) -> Iterator[None]:
        """Keep a copy of the raw parameters; restore them bit-exactly on exit (merges may be
        installed any number of times in between)."""
        with torch.no_grad():
            backup = [s.param.detach().clone() for s in self.slots]
            try:
                yield
            finally:
                for slot, raw in zip(self.slots, backup):
                    slot.param.copy_(raw)

    # -- checkpointing ----------------------------------------------------------------------

    def common_state(self) -> dict:
        state = {"method": self.spec.method, "iterations": list(self.iterations),
                 "total_snapshots": self.total_snapshots, "storage": self.spec.storage,
                 "ema_alpha": self.spec.ema_alpha, "interval": self.spec.interval, "stored": self.stored}
        if self.candidates is not None:
            state["candidates"] = self.candidates.common_state()
        return state

    def sharded_state_dict(self, is_loading: bool = False, saved: Optional[dict] = None) -> dict:
        """``merge_state.*`` entries sharded like the parameters; only owners take part.

        On load, ``saved`` is the checkpoint's :meth:`common_state` (how many snapshots it holds).
        """
        state = saved if is_loading else self.common_state()
        if state is None:
            return {}
        entries = {}
        if self.candidates is not None:
            entries.update(self.candidates.sharded_state_dict(is_loading, state.get("candidates")))
        stored = 0 if self._reads_from_disk else _stored_in(state)
        for slot in self.owned:
            if self.spec.method == "ema" and state["total_snapshots"] > 0:
                data = (torch.empty(slot.param.shape, dtype=torch.float32) if is_loading else slot.accumulator)
                key = f"{STATE_PREFIX}.ema.{slot.sharded.key}"
                entries[f"ema/{slot.name}"] = _retarget(slot.sharded, key, data, owner=True)
            for j in range(stored):
                data = (torch.empty(slot.param.shape, dtype=slot.param.dtype) if is_loading else slot.snapshots[j])
                key = f"{STATE_PREFIX}.snapshot{j}.{slot.sharded.key}"
                entries[f"snapshot{j}/{slot.name}"] = _retarget(slot.sharded, key, data, owner=True)
        return entries

    def state_entry(self, slot: _Slot, key: str, data: torch.Tensor):
        """A sharded entry for merge state of ``slot`` under ``key``, this rank its main replica."""
        return _retarget(slot.sharded, key, data, owner=True)

    def load_state(self, saved: dict, loaded: dict) -> None:
        """Restore from a checkpoint's common state and the loaded ``merge_state`` entries."""
        if self.candidates is not None:
            self.candidates.load_state(saved.get("candidates"), loaded)
        if saved.get("method") != self.spec.method:
            logger.warning("checkpoint merge state is for method %r, this run merges with %r: starting afresh",
                           saved.get("method"), self.spec.method)
            return
        self.iterations = list(saved["iterations"])
        self.total_snapshots = int(saved["total_snapshots"])
        stored = 0 if self._reads_from_disk else _stored_in(saved)
        for slot in self.owned:
            if self.spec.method == "ema" and self.total_snapshots:
                slot.accumulator = loaded[f"ema/{slot.name}"].to(self.state_device(slot.param))
            slot.snapshots = [loaded[f"snapshot{j}/{slot.name}"].to(self.state_device(slot.param))
                              for j in range(stored)][-self.spec.store_size:] if self.spec.store_size else []
        if self.spec.method != "ema" and len(self.iterations) > self.spec.store_size:
            self.iterations = self.iterations[-self.spec.store_size:]
        if self.spec.storage != "disk" and self.spec.method != "ema" and stored < len(self.iterations):
            self.iterations = self.iterations[-stored:] if stored else []  # only what the checkpoint held

    def describe(self) -> dict:
        """What the merged weights are: for metrics and merge.json."""
        merged = self.merged_iterations
        span = [merged[0], merged[-1]] if merged else None
        return {"merge_method": self.spec.method, "merge_n": self.count, "merge_span": span}

    def store_bytes(self, snapshots: int, fp32_accumulators: int) -> int:
        """Bytes this rank needs for ``snapshots`` stored snapshots and ``fp32_accumulators`` EMAs."""
        return sum(s.param.numel() * (snapshots * s.param.element_size() + 4 * fp32_accumulators)
                   for s in self.owned)

    def memory_bytes(self) -> int:
        """Bytes this rank holds for merging right now."""
        total = 0
        for slot in self.owned:
            total += sum(t.numel() * t.element_size() for t in slot.snapshots)
            if slot.accumulator is not None:
                total += slot.accumulator.numel() * slot.accumulator.element_size()
        if self.candidates is not None:
            total += self.candidates.memory_bytes()
        return total


# ---------------------------------------------------------------------------------------------


def map_sharded_params(model_sharded_state_dict: dict, params: Sequence[torch.nn.Parameter]) -> dict:
    """``id(param) -> ShardedTensor or ShardedTensorFactory`` of the model's sharded state dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    by_data = {}
    for entry in nested_values(model_sharded_state_dict):
        if isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
            by_data[id(entry.data)] = entry
    missing = [i for i, p in enumerate(params) if id(p) not in by_data and id(p.data) not in by_data]
    if missing:
        raise RuntimeError(f"{len(missing)} parameters have no entry in the model's sharded state dict")
    return {id(p): by_data.get(id(p), by_data.get(id(p.data))) for p in params}


def _assign_owners(named_params, sharded_params, replica_group_of) -> list[_Slot]:
    """Spread parameters over their replica groups, largest first onto the least-loaded rank."""
    slots = []
    load: dict[tuple, dict[int, int]] = {}
    order = sorted(range(len(named_params)), key=lambda i: -named_params[i][1].numel())
    owners = {}
    for i in order:
        name, param = named_params[i]
        group = replica_group_of(param)
        ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else (dist.get_rank(),)
        tally = load.setdefault(ranks, {r: 0 for r in ranks})
        owner = min(ranks, key=lambda r: (tally[r], r))
        tally[owner] += param.numel()
        owners[i] = (owner, group if len(ranks) > 1 else None)
    for i, (name, param) in enumerate(named_params):
        owner, group = owners[i]
        slots.append(_Slot(name, param, sharded_params[id(param)], group, owner))
    return slots


def _retarget(sharded, key: str, data: torch.Tensor, owner: bool):
    """A copy of a parameter's sharded entry under ``key``, holding ``data``, with this rank as
    the main replica of the shard (replicas of other parallel dimensions keep their ids)."""
    replica = sharded.replica_id
    if isinstance(replica, tuple):
        replica = (*replica[:-1], 0 if owner else 1)
    else:
        replica = 0 if owner else 1
    return dataclasses.replace(sharded, key=key, data=data, replica_id=replica)


def _check_checkpoint_dir(directory: Path) -> Optional[str]:
    """Why ``directory`` cannot be merged, seen from this rank (None when it can)."""
    for name in ("metadata.json", ".metadata"):
        if not (directory / name).is_file():
            return f"{directory}: missing or not a torch_dist checkpoint (no {name}; needed for merging)"
    return None


def _fail_together(failure, where: Optional[Path] = None) -> None:
    """Raise the same MergeError on every rank if any rank failed (collective: every rank calls it).

    ``failure`` is this rank's error (a message or an exception; None for none). The message is
    the first failing rank's, prefixed with that rank, so whichever rank reports it says what
    went wrong where; that rank alone logs the traceback of an unexpected exception. One small
    all-gather of the messages on the default group (gloo, or NCCL with the current CUDA device
    set, as pretrain sets it). Alone, the error is raised as it is.
    """
    from megatron_merge.safe_dist_checkpointing import merge_error_in

    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        if isinstance(failure, BaseException):
            raise failure
        if failure is not None:
            raise MergeError(failure)
        return
    texts: list = [None] * world
    dist.all_gather_object(texts, None if failure is None else _describe(failure, where))
    message = first_failure(texts)
    if message is not None:
        cause = failure if isinstance(failure, BaseException) else None
        first = next(rank for rank, text in enumerate(texts) if text is not None)
        if first == dist.get_rank() and cause is not None and merge_error_in(cause) is None:
            logger.error("rank %d: %s", first, texts[first], exc_info=cause)  # unexpected: its traceback too
        raise MergeError(message) from cause


def _describe(failure, where: Optional[Path]) -> str:
    """One line for this rank's failure: our own messages as they are (also from inside DCP's
    per-rank wrapper), other exceptions with their type and first line."""
    from megatron_merge.safe_dist_checkpointing import merge_error_in

    if isinstance(failure, str):
        return failure
    ours = merge_error_in(failure)
    if ours is not None:
        return str(ours)
    lines = str(failure).strip().splitlines()
    return f"{where}: {type(failure).__name__}" + (f": {lines[0]}" if lines else "")


def _stored_in(state: dict) -> int:
    """Snapshots a merge state holds (checkpoints before the store was counted: the window's)."""
    if "stored" in state:
        return int(state["stored"])
    disk = state.get("storage") == "disk"
    return 0 if state["method"] == "ema" or disk else len(state["iterations"])


def _whole(t: torch.Tensor) -> tuple:
    return tuple(slice(0, n) for n in t.shape)
