"""Who writes which work item of a merge: this process, local worker processes, or torchrun ranks.

A merge's work items are its output files (:mod:`megatron_merge.formats.base`); an item is
written whole by one process, with a writer built from the merge's picklable
:class:`~megatron_merge.formats.base.MergeSettings`. Three ways to run them, same bits:

``write_serially``         in this process, in plan order.
``write_in_processes``     ``--workers P`` spawned processes on this machine take items from a
                           shared queue, largest first, so they balance themselves.
``RankGroup.write_share``  torchrun ranks on one or many nodes (gloo, so CPU nodes serve): no
                           shared queue, so every rank computes the same static assignment
                           (:func:`assign_by_bytes`: largest item first onto the least-loaded
                           rank) and writes only its share into the output directory, which must
                           be on a filesystem every node sees. Rank 0 plans, gathers what every
                           rank wrote, finishes and publishes (see :mod:`megatron_merge.offline`);
                           a failure on any rank fails the merge on all of them.

:func:`choose_workers` picks ``--workers`` when it is not given.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import heapq
import logging
import multiprocessing
import os
import signal
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from megatron_merge.errors import FailedOnAnotherRank, MergeError, os_error_message

logger = logging.getLogger(__name__)

# Below this much input per process, starting a worker (a fresh interpreter importing torch and
# parsing every input's metadata: ~2-5 s) costs more than it saves.
BYTES_PER_AUTO_WORKER = 1 << 30
# How long a rank waits at a collective for the others (planning on rank 0, the slowest share):
# generous, because a lost rank is noticed at once through its closed connections anyway.
RANK_TIMEOUT = datetime.timedelta(hours=12)


# --------------------------------------------------------------------------------------------
# Assignment
# --------------------------------------------------------------------------------------------


def assign_by_bytes(sizes: Sequence[int], ranks: int) -> list[list[int]]:
    """Split items of the given byte ``sizes`` over ``ranks`` ranks.

    Returns, per rank, the indices of its items (largest first). Deterministic: every rank that
    calls it with the same sizes gets the same answer. O(n log n) in the number of items.
    """
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    shares: list[list[int]] = [[] for _ in range(ranks)]
    loads = [(0, rank) for rank in range(ranks)]  # (bytes so far, rank): a heap
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    for index in order:
        load, rank = heapq.heappop(loads)
        shares[rank].append(index)
        heapq.heappush(loads, (load + sizes[index], rank))
    return shares


def share_balance(sizes: Sequence[int], shares: Sequence[Sequence[int]]) -> float:
    """max / mean bytes per rank of an assignment (1.0 is perfect; ranks without work count)."""
    loads = [sum(sizes[i] for i in share) for share in shares]
    mean = sum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean else 1.0


def first_failure(errors: Sequence[str | None]) -> str | None:
    """Every rank's error (None for none, in rank order) -> what to report: the first failing
    rank's, prefixed with that rank (``rank R of W (and K more ranks): ...``); None if none failed."""
    failed = [(rank, text) for rank, text in enumerate(errors) if text is not None]
    if not failed:
        return None
    rank, text = failed[0]
    others = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
    return f"rank {rank} of {len(errors)}{others}: {text}"


def usable_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def choose_workers(items: int, bytes_to_read: int, peak_bytes_per_worker: int,
                   input_path: str | Path) -> tuple[int, str]:
    """A ``--workers`` default: as many processes as help, and why.

    At most one per usable core (more compete for them and are slower than fewer), per work
    item, per ``BYTES_PER_AUTO_WORKER`` of input, and per what free memory holds; one on a
    rotating disk, where parallel readers only add seeks.
    """
    cores = usable_cores()
    limits = {  # the most processes each consideration allows, and how to say it
        "cores": (cores, f"{cores} usable cores"),
        "items": (max(1, items), f"{items} output files"),
        "size": (max(1, bytes_to_read // BYTES_PER_AUTO_WORKER),
                 f"{bytes_to_read / 2**30:.2f} GiB to read, one process per "
                 f"{BYTES_PER_AUTO_WORKER // 2**30} GiB"),
    }
    available = _available_memory()
    if available is not None and peak_bytes_per_worker > 0:
        fit = max(1, available // (2 * peak_bytes_per_worker))
        limits["memory"] = (fit, f"{fit} fit twice in free memory")
    if _on_rotating_disk(input_path):
        limits["disk"] = (1, "inputs on a rotating disk")
    workers = min(limit for limit, _ in limits.values())
    why = "; ".join(text for limit, text in limits.values() if limit == workers)
    return workers, why


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _on_rotating_disk(path: str | Path) -> bool:
    """Whether ``path`` is on a spinning disk (Linux sysfs; False when unknown)."""
    try:
        dev = os.stat(path).st_dev
        block = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
        for directory in (block, block.parent):  # a partition's queue is its disk's
            flag = directory / "queue" / "rotational"
            if flag.is_file():
                return flag.read_text().strip() == "1"
    except OSError:
        pass
    return False


# --------------------------------------------------------------------------------------------
# One process, local processes
# --------------------------------------------------------------------------------------------

OnItem = Callable[[Any], None]  # called with each work item once it is written


def write_serially(writer, items: Sequence, out_dir: Path, on_item: OnItem) -> dict[str, Any]:
    """Write ``items`` in order with ``writer`` in this process; item name -> result."""
    results = {}
    for item in items:
        results[item.name] = writer.write(item, out_dir)
        on_item(item)
    return results


_WORKER_WRITER = None


def _init_worker(settings, threads: int) -> None:
    global _WORKER_WRITER
    import torch

    from megatron_merge.formats import item_writer

    torch.set_num_threads(threads)
    _WORKER_WRITER = item_writer(settings)


def _write_in_worker(item, out_dir: str):
    return _WORKER_WRITER.write(item, Path(out_dir))


def write_in_processes(settings, items: Sequence, out_dir: Path, workers: int, threads: int,
                       on_item: OnItem) -> dict[str, Any]:
    """Write ``items`` in ``workers`` spawned processes, largest first; item name -> result."""
    ordered = sorted(items, key=lambda item: item.nbytes, reverse=True)
    results = {}
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=min(workers, len(ordered)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(settings, threads),
    ) as pool:
        futures = {pool.submit(_write_in_worker, item, str(out_dir)): item for item in ordered}
        try:
            for future in concurrent.futures.as_completed(futures):
                item = futures[future]
                results[item.name] = future.result()
                on_item(item)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results


# --------------------------------------------------------------------------------------------
# torchrun ranks
# --------------------------------------------------------------------------------------------


class RankGroup:
    """This process's place in a torchrun launch of ``megatron-merge`` (a gloo group).

    Rank 0 is the coordinator. Every exchange is a collective, so all ranks go through the same
    steps: the plan (or rank 0's error) is broadcast, shares are written, errors and results
    are gathered, and rank 0's final outcome is broadcast.
    """

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.group = None  # set while joined

    @classmethod
    def from_env(cls) -> "RankGroup | None":
        """The group torchrun set up the environment for; None outside torchrun or for one rank."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 or "MASTER_ADDR" not in os.environ:
            return None
        return cls(int(os.environ["RANK"]), world)

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def joined(self) -> Iterator["RankGroup"]:
        """Join a gloo group of all ranks for the block (a new one beside the caller's when
        torch.distributed is already initialized, e.g. NCCL in a training script). SIGTERM
        (torchrun stopping the launch) unwinds the block as ``SystemExit(143)``, so rank 0
        removes its unpublished output."""
        import torch.distributed as dist

        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        owns_world = not dist.is_initialized()
        if owns_world:
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world_size, timeout=RANK_TIMEOUT)
            self.group = None  # the default group
        else:
            self.group = dist.new_group(backend="gloo", timeout=RANK_TIMEOUT)
        try:
            yield self
        finally:
            if owns_world:
                dist.destroy_process_group()
            else:
                dist.destroy_process_group(self.group)
            signal.signal(signal.SIGTERM, previous)

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return self._collective("broadcast", obj)

    def gather_errors(self, error: str | None) -> list[str | None]:
        """Every rank's error (None for none), on every rank."""
        return self._collective("all_gather", error)

    def gather_results(self, results: dict) -> dict | None:
        """Every rank's results merged into one dict on rank 0 (None elsewhere)."""
        gathered = self._collective("gather", results)
        if gathered is None:
            return None
        merged = {}
        for part in gathered:
            merged.update(part)
        return merged

    def _collective(self, kind: str, obj: Any) -> Any:
        import torch.distributed as dist

        try:
            if kind == "broadcast":
                box = [obj]
                dist.broadcast_object_list(box, src=0, group=self.group)
                return box[0]
            if kind == "all_gather":
                out = [None] * self.world_size
                dist.all_gather_object(out, obj, group=self.group)
                return out
            out = [None] * self.world_size if self.is_coordinator else None
            dist.gather_object(obj, out, dst=0, group=self.group)
            return out
        except RuntimeError as err:  # a rank died or the connection broke
            raise MergeError(
                f"rank {self.rank} of {self.world_size}: lost contact with the other ranks of the merge "
                f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); nothing was published"
            ) from None

    def write_share(self, make_writer: Callable[[], Any], items: Sequence, out_dir: Path,
                    on_item: OnItem) -> dict[str, Any] | None:
        """Write this rank's share of ``items``; raise on every rank if any rank failed.

        Returns every rank's results on rank 0, None on the others.
        """
        mine = self.share_of(items)
        results, error = {}, None
        try:
            if not Path(out_dir).is_dir():
                raise MergeError(
                    f"{out_dir}: not visible from rank {self.rank}; the output of a merge on "
                    f"several nodes must be on a filesystem every node shares"
                )
            results = write_serially(make_writer(), mine, out_dir, on_item)
        except MergeError as err:
            error = str(err)
        except OSError as err:
            error = os_error_message(err)
        except Exception as err:  # noqa: BLE001 - reported by rank 0, with the traceback logged here
            logger.error("rank %d failed:\n%s", self.rank, traceback.format_exc())
            error = f"{type(err).__name__}: {err}"
        message = first_failure(self.gather_errors(error))
        if message is not None:
            raise (MergeError if self.is_coordinator else FailedOnAnotherRank)(message)
        return self.gather_results(results)

    def share_of(self, items: Sequence, rank: int | None = None) -> list:
        """The items ``rank`` (default: this one) writes, largest first (:func:`assign_by_bytes`)."""
        shares = assign_by_bytes([item.nbytes for item in items], self.world_size)
        return [items[i] for i in shares[self.rank if rank is None else rank]]


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)
