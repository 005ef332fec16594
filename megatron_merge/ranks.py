"""Who does which work item of a merge: balanced shares for torchrun ranks.

A merge's work items are its output files (see :mod:`megatron_merge.engine`); an item is written
whole by one process. Local worker processes take items from a shared queue, largest first, so
they balance themselves. torchrun ranks on many nodes have no shared queue: each rank computes
the same static assignment from the plan, by bytes, largest item first onto the least-loaded
rank (ties to the lowest rank), and writes only its share.
"""

from __future__ import annotations

import heapq
from typing import Sequence


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
