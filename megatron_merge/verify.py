"""``--verify``: re-read a merged checkpoint and check sampled chunks independently.

The check shares nothing with the merge's read path: tensors come through torch's own DCP
loader (``torch.distributed.checkpoint.load``), which also proves the output's ``.metadata``
and ``.distcp`` files are readable by torch. The expected values are recomputed from whole
tensors with the documented formula (``accumulate`` module docstring) and compared bit for bit.

Memory: one whole tensor of a sampled key at a time (not one chunk); keys larger than
``max_tensor_bytes`` are not sampled.
"""

from __future__ import annotations

import logging
import random
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from megatron_merge.accumulate import region_within, resolve_accumulate_dtype
from megatron_merge.errors import MergeError
from megatron_merge.safe_load import SafeFileSystemReader, read_dcp_metadata

logger = logging.getLogger(__name__)


def verify_dcp_merge(plan, out_dir: str | Path, settings, samples: int = 8, seed: int = 0,
                     max_tensor_bytes: int = 2 << 30) -> int:
    """Check up to ``samples`` merged chunks of the torch_dist merge ``plan`` (a
    :class:`~megatron_merge.formats.torch_dist.TorchDistPlan`) in ``out_dir``, merged with
    ``settings``; return how many were checked."""
    out_dir = Path(out_dir)
    source = plan.reference_checkpoint
    out_metadata = read_dcp_metadata(out_dir)
    expected_keys = set(source.metadata.state_dict_metadata) - set(plan.dropped_keys)
    if set(out_metadata.state_dict_metadata) != expected_keys:
        raise MergeError(f"{out_dir}: verify: output keys differ from the plan")

    candidates = [
        item for f in plan.files for item in f.items
        if item.action == "merge" and _tensor_bytes(source, item.key) <= max_tensor_bytes
    ]
    chosen = random.Random(seed).sample(candidates, min(samples, len(candidates)))
    acc_dtype = resolve_accumulate_dtype(settings.accumulate_dtype)
    for key in sorted({item.key for item in chosen}):
        items = [item for item in chosen if item.key == key]
        meta = source.tensor_metadata(key)
        expected = [torch.zeros(tuple(item.sizes), dtype=acc_dtype) for item in items]
        for i, (ckpt, weight) in enumerate(zip(plan.checkpoints, settings.weights)):
            whole = _load_whole(ckpt.path, key, meta.size, meta.properties.dtype)
            for acc, item in zip(expected, items):
                reference_step(acc, whole[_box(item)], i, weight, settings.ema_alpha)
            del whole
        out_dtype = out_metadata.state_dict_metadata[key].properties.dtype
        if out_dtype != plan.output_dtypes.get(key, meta.properties.dtype):
            raise MergeError(f"{out_dir}: verify failed: key {key!r} is stored as {out_dtype}")
        merged = _load_whole(out_dir, key, meta.size, out_dtype)
        for acc, item in zip(expected, items):
            got = merged[_box(item)]
            if not torch.equal(got, acc.to(out_dtype)):
                raise MergeError(
                    f"{out_dir}: verify failed: key {key!r} chunk at offsets {item.offsets} "
                    f"differs from an independent recomputation"
                )
    # out_dir is still the hidden staging directory: name no path the user cannot find.
    logger.info("verified %d merged chunks against an independent recomputation", len(chosen))
    return len(chosen)


def reference_step(acc: torch.Tensor, x: torch.Tensor, i: int, weight: float,
                   ema_alpha: float | None) -> None:
    """Add input ``i`` (oldest first) to the independently recomputed merge ``acc``, by the
    documented formula in ``acc``'s dtype: ``sum_i w_i x_i``, or for EMA the recursion
    ``M = x_1``, then ``M = a x_i + (1 - a) M``. Written apart from the merge loop on purpose."""
    x = x.detach().to(acc.dtype)
    if ema_alpha is None:
        acc.add_(x * torch.tensor(weight, dtype=acc.dtype))
    elif i == 0:
        acc.copy_(x)
    else:
        a = torch.tensor(ema_alpha, dtype=acc.dtype)
        acc.copy_(x * a + acc * torch.tensor(1.0 - ema_alpha, dtype=acc.dtype))


def _box(item) -> tuple[slice, ...]:
    return region_within(item.offsets, item.sizes, [0] * len(item.sizes))


def _tensor_bytes(ckpt, key: str) -> int:
    meta = ckpt.tensor_metadata(key)
    return meta.size.numel() * meta.properties.dtype.itemsize


def _load_whole(checkpoint_dir: Path, key: str, size, dtype: torch.dtype) -> torch.Tensor:
    state = {key: torch.empty(tuple(size), dtype=dtype)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=SafeFileSystemReader(checkpoint_dir), no_dist=True)
    return state[key]
