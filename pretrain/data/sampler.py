"""Deterministic, resumable micro-batches for data-parallel pre-training (Megatron's sampler).

The dataset is read in index order (GPTDataset already shuffles internally): each step takes the
next ``micro_batch_size * dp_size`` indices, and data-parallel rank r takes the r-th slice of
``micro_batch_size``. Where a step starts depends only on ``consumed_samples`` (summed over all
ranks), so a run restarted with the ``consumed_samples`` saved in its checkpoint sees exactly
the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate


class PretrainingSampler:
    """Batch sampler yielding this data-parallel rank's indices for each micro-batch.

    Args:
        total_samples: the dataset length.
        consumed_samples: samples already consumed by all ranks together; where to start.
        micro_batch_size: samples per rank per micro-batch.
        dp_rank, dp_size: this rank's position in, and the size of, the data-parallel group.

    The last incomplete step (fewer than ``micro_batch_size * dp_size`` samples left) is
    dropped, so every rank always gets full micro-batches.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)

    @property
    def samples_per_step(self) -> int:
        """Samples all data-parallel ranks consume together per micro-batch."""
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        remaining = max(0, self.total_samples - self.consumed_samples)
        return remaining // self.samples_per_step

    def __iter__(self) -> Iterator[List[int]]:
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        for step in range(len(self)):
            start = first + step * self.samples_per_step
            yield list(range(start, start + self.micro_batch_size))


def collate_batch(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
    """Stack GPTDataset samples; ``attention_mask`` is None when the dataset made none."""
    batch = default_collate(samples)
    batch.setdefault("attention_mask", None)
    return batch


def build_data_iterator(
    dataset: Optional[Dataset],
    micro_batch_size: int,
    *,
    dp_rank: int = 0,
    dp_size: int = 1,
    consumed_samples: int = 0,
    num_workers: int = 0,
    cyclic: bool = False,
) -> Optional[Iterator[Dict[str, Optional[torch.Tensor]]]]:
    """Iterator over this rank's micro-batches of ``dataset``, starting at ``consumed_samples``.

    Each batch is a dict of stacked tensors as GPTDataset returns them: tokens and labels
    [b, s] (int64), loss_mask [b, s] (float), position_ids [b, s], attention_mask [b, 1, s, s]
    (bool, True = masked) or None, plus dataset_id [b] for blends.
    The caller advances its ``consumed_samples`` by ``micro_batch_size * dp_size`` per
    micro-batch (i.e. by the global batch size per optimizer step) and saves it to resume.

    With ``cyclic`` (for evaluation data) the iterator restarts at index 0 when the dataset is
    exhausted, forever; otherwise it stops. Returns None when ``dataset`` is None.
    """
    if dataset is None:
        return None
    total = len(dataset)
    if total < micro_batch_size * dp_size:
        raise ValueError(
            f"dataset of {total} samples is smaller than one step of "
            f"micro_batch_size * dp_size = {micro_batch_size * dp_size}"
        )

    def loader(start: int) -> DataLoader:
        sampler = PretrainingSampler(total, start, micro_batch_size, dp_rank, dp_size)
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate_batch,
            persistent_workers=False,
        )

    def iterate() -> Iterator[Dict[str, Optional[torch.Tensor]]]:
        start = consumed_samples
        if cyclic:
            # One pass consumes only whole steps (the remainder is dropped), so that is the period.
            start %= (total // (micro_batch_size * dp_size)) * micro_batch_size * dp_size
        while True:
            yield from loader(start)
            if not cyclic:
                return
            start = 0

    return iterate()
